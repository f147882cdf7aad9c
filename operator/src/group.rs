//! Wake groups (`spec.needs`): which ScaledServices of a namespace wake with one, and
//! which hold one awake. Pure: the controller gives the namespace's needs and who is
//! awake.
//!
//! The rules: waking a service wakes everything it needs, transitively, at the same
//! moment; a service does not sleep while one that needs it (transitively) is awake.
//! A service whose needs lead back to itself (a cycle) holds nothing awake — the
//! members of a cycle would otherwise keep each other up forever — and says so in its
//! status; names that do not exist are said too and skipped.

use std::collections::{BTreeMap, BTreeSet};

/// The condition a ScaledService with `spec.needs` carries: `True` (`Resolved`, what
/// it wakes with) or `False` (`NeedNotFound`, `NeedCycle`).
pub const CONDITION: &str = "Needs";

/// The needs of the ScaledServices of one namespace that have any, by name.
pub type Needs = BTreeMap<String, Vec<String>>;

/// What a service's needs resolve to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Closure {
    /// Every existing service it needs, directly or not (itself excluded).
    pub members: BTreeSet<String>,
    /// Names it needs, directly or not, that are no ScaledService of the namespace.
    pub missing: BTreeSet<String>,
    /// Its needs lead back to itself.
    pub cycle: bool,
}

/// The needs of `name`, followed through the namespace. `exists` says whether a
/// ScaledService of that name exists (one with no needs is not in `needs`).
pub fn closure(needs: &Needs, name: &str, exists: impl Fn(&str) -> bool) -> Closure {
    let mut out = Closure::default();
    let mut todo: Vec<&str> = needs
        .get(name)
        .map(|v| v.iter().map(String::as_str).collect())
        .unwrap_or_default();
    // Bounded: each name is expanded once.
    while let Some(n) = todo.pop() {
        if n == name {
            out.cycle = true;
            continue;
        }
        if out.members.contains(n) || out.missing.contains(n) {
            continue;
        }
        if !exists(n) {
            out.missing.insert(n.to_string());
            continue;
        }
        out.members.insert(n.to_string());
        todo.extend(needs.get(n).into_iter().flatten().map(String::as_str));
    }
    out
}

/// The awake services that hold `name` awake: those that need it, directly or not,
/// and are not in a cycle themselves. Sorted.
pub fn needed_by(
    needs: &Needs,
    name: &str,
    exists: impl Fn(&str) -> bool + Copy,
    awake: impl Fn(&str) -> bool,
) -> Vec<String> {
    needs
        .keys()
        .filter(|s| s.as_str() != name && awake(s))
        .filter(|s| {
            let c = closure(needs, s, exists);
            !c.cycle && c.members.contains(name)
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs(edges: &[(&str, &[&str])]) -> Needs {
        edges
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    const ALL: &[&str] = &["web", "api", "db", "cache", "a", "b"];
    fn exists(n: &str) -> bool {
        ALL.contains(&n)
    }

    #[test]
    fn needs_are_followed_transitively() {
        let g = needs(&[("web", &["api", "cache"]), ("api", &["db"])]);
        let c = closure(&g, "web", exists);
        assert_eq!(
            c.members.iter().map(String::as_str).collect::<Vec<_>>(),
            ["api", "cache", "db"]
        );
        assert!(!c.cycle && c.missing.is_empty());
        assert!(closure(&g, "db", exists).members.is_empty());
    }

    #[test]
    fn a_service_is_held_by_awake_services_that_need_it() {
        let g = needs(&[("web", &["api"]), ("api", &["db"])]);
        let awake = |n: &str| n == "web";
        assert_eq!(needed_by(&g, "db", exists, awake), ["web"]);
        assert_eq!(needed_by(&g, "api", exists, awake), ["web"]);
        assert!(needed_by(&g, "web", exists, awake).is_empty());
        // Nobody awake: nothing held.
        assert!(needed_by(&g, "db", exists, |_| false).is_empty());
    }

    #[test]
    fn cycles_and_missing_names_are_reported_and_hold_nothing() {
        let g = needs(&[("a", &["b"]), ("b", &["a"]), ("web", &["ghost", "db"])]);
        assert!(closure(&g, "a", exists).cycle);
        assert!(needed_by(&g, "b", exists, |_| true).is_empty());
        let c = closure(&g, "web", exists);
        assert_eq!(c.missing.iter().collect::<Vec<_>>(), ["ghost"]);
        assert_eq!(c.members.iter().collect::<Vec<_>>(), ["db"]);
        // Self-need is a cycle too.
        let g = needs(&[("web", &["web"])]);
        assert!(closure(&g, "web", exists).cycle);
    }
}
