//! Activator ports: one per (ScaledService, Service port), unique across the cluster,
//! stable across operator restarts (rebuilt from the ScaledServices' status), freed on
//! delete.

use std::collections::{BTreeMap, HashMap};
use std::ops::RangeInclusive;

/// (namespace, ScaledService name, Service port name or number).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub namespace: String,
    pub name: String,
    pub port: String,
}

impl PortKey {
    pub fn new(namespace: &str, name: &str, port: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            port: port.into(),
        }
    }

    fn same_service(&self, namespace: &str, name: &str) -> bool {
        self.namespace == namespace && self.name == name
    }
}

/// Why a port was not given.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Exhausted {
    #[error("no free activator port left in {0:?}")]
    Range(RangeInclusive<u16>),
    #[error(
        "namespace {namespace} holds {limit} activator ports, its limit (the operator's --max-ports-per-namespace, chart operator.maxPortsPerNamespace)"
    )]
    Namespace { namespace: String, limit: usize },
}

impl Exhausted {
    /// The reason on the ScaledService's `Ready` condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Exhausted::Range(_) => "NoActivatorPort",
            Exhausted::Namespace { .. } => "NamespacePortLimit",
        }
    }
}

#[derive(Debug)]
pub struct PortAllocator {
    range: RangeInclusive<u16>,
    by_key: HashMap<PortKey, u16>,
    by_port: BTreeMap<u16, PortKey>,
    /// Ports held by each namespace, and the most one may hold: one team cannot take
    /// the whole range.
    per_namespace: HashMap<String, usize>,
    max_per_namespace: usize,
}

impl PortAllocator {
    pub fn new(range: RangeInclusive<u16>) -> Self {
        Self::with_namespace_limit(range, usize::MAX)
    }

    pub fn with_namespace_limit(range: RangeInclusive<u16>, max_per_namespace: usize) -> Self {
        Self {
            range,
            by_key: HashMap::new(),
            by_port: BTreeMap::new(),
            per_namespace: HashMap::new(),
            max_per_namespace,
        }
    }

    fn insert(&mut self, key: PortKey, port: u16) {
        if let Some(old) = self.by_key.insert(key.clone(), port) {
            self.by_port.remove(&old);
        } else {
            *self.per_namespace.entry(key.namespace.clone()).or_default() += 1;
        }
        self.by_port.insert(port, key);
    }

    fn remove(&mut self, key: &PortKey) {
        if let Some(p) = self.by_key.remove(key) {
            self.by_port.remove(&p);
            if let Some(n) = self.per_namespace.get_mut(&key.namespace) {
                *n -= 1;
                if *n == 0 {
                    self.per_namespace.remove(&key.namespace);
                }
            }
        }
    }

    /// Ports held by a namespace.
    pub fn in_namespace(&self, namespace: &str) -> usize {
        self.per_namespace.get(namespace).copied().unwrap_or(0)
    }

    /// Records a port found in a status. Returns false when another key holds it (or
    /// it is out of range); that key keeps it and this one will get a new port.
    /// Seed the oldest ScaledServices first so they keep their ports.
    pub fn claim(&mut self, key: PortKey, port: u16) -> bool {
        if !self.range.contains(&port) {
            return false;
        }
        match self.by_port.get(&port) {
            Some(k) if *k != key => false,
            Some(_) => true,
            // Ports found in statuses are kept whatever the namespace limit (they were
            // given before it, or before a restart): only new ones are refused.
            None => {
                self.insert(key, port);
                true
            }
        }
    }

    /// The port of `key`: its current one, or the lowest free one while its namespace
    /// is under its limit.
    pub fn assign(&mut self, key: &PortKey) -> Result<u16, Exhausted> {
        if let Some(p) = self.by_key.get(key) {
            return Ok(*p);
        }
        if self.in_namespace(&key.namespace) >= self.max_per_namespace {
            return Err(Exhausted::Namespace {
                namespace: key.namespace.clone(),
                limit: self.max_per_namespace,
            });
        }
        let free = self
            .range
            .clone()
            .find(|p| !self.by_port.contains_key(p))
            .ok_or_else(|| Exhausted::Range(self.range.clone()))?;
        self.insert(key.clone(), free);
        Ok(free)
    }

    pub fn get(&self, key: &PortKey) -> Option<u16> {
        self.by_key.get(key).copied()
    }

    /// Who holds `port`.
    pub fn owner(&self, port: u16) -> Option<&PortKey> {
        self.by_port.get(&port)
    }

    /// The keys of a ScaledService's ports.
    pub fn keys_of(&self, namespace: &str, name: &str) -> Vec<PortKey> {
        self.by_key
            .keys()
            .filter(|k| k.same_service(namespace, name))
            .cloned()
            .collect()
    }

    /// Frees the ports of a ScaledService except those in `keep`.
    pub fn retain(&mut self, namespace: &str, name: &str, keep: &[PortKey]) {
        let drop: Vec<PortKey> = self
            .by_key
            .keys()
            .filter(|k| k.same_service(namespace, name) && !keep.contains(k))
            .cloned()
            .collect();
        for k in drop {
            self.remove(&k);
        }
    }

    pub fn release(&mut self, namespace: &str, name: &str) {
        self.retain(namespace, name, &[]);
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(name: &str, port: &str) -> PortKey {
        PortKey::new("ns", name, port)
    }

    #[test]
    fn assigns_lowest_free_and_is_stable() {
        let mut a = PortAllocator::new(20000..=20002);
        assert_eq!(a.assign(&k("a", "http")), Ok(20000));
        assert_eq!(a.assign(&k("b", "http")), Ok(20001));
        assert_eq!(a.assign(&k("a", "http")), Ok(20000));
        assert_eq!(a.assign(&k("a", "grpc")), Ok(20002));
        assert_eq!(
            a.assign(&k("c", "http")),
            Err(Exhausted::Range(20000..=20002))
        );
    }

    #[test]
    fn a_namespace_cannot_take_more_than_its_limit() {
        let mut a = PortAllocator::with_namespace_limit(20000..=20010, 2);
        assert_eq!(a.assign(&k("a", "http")), Ok(20000));
        assert_eq!(a.assign(&k("a", "grpc")), Ok(20001));
        // Its own ports stay its; a third is refused, other namespaces go on.
        assert_eq!(a.assign(&k("a", "http")), Ok(20000));
        assert_eq!(
            a.assign(&k("b", "http")),
            Err(Exhausted::Namespace {
                namespace: "ns".into(),
                limit: 2
            })
        );
        assert_eq!(a.assign(&PortKey::new("other", "b", "http")), Ok(20002));
        // Freed ports give room again.
        a.release("ns", "a");
        assert_eq!(a.in_namespace("ns"), 0);
        assert_eq!(a.assign(&k("b", "http")), Ok(20000));
    }

    #[test]
    fn restart_keeps_ports_and_resolves_collisions_for_the_older() {
        // Statuses as found after a restart: b and c both claim 20005 (a race).
        let mut a = PortAllocator::new(20000..=20010);
        assert!(a.claim(k("b", "http"), 20005)); // older first
        assert!(!a.claim(k("c", "http"), 20005));
        assert!(a.claim(k("a", "http"), 20003));
        assert_eq!(a.assign(&k("b", "http")), Ok(20005));
        assert_eq!(a.assign(&k("a", "http")), Ok(20003));
        // c gets a new one, not 20005.
        assert_eq!(a.assign(&k("c", "http")), Ok(20000));
        assert!(!a.claim(k("d", "http"), 30000), "out of range");
    }

    #[test]
    fn delete_frees_ports_and_retain_drops_removed_service_ports() {
        let mut a = PortAllocator::new(20000..=20010);
        a.assign(&k("a", "http")).unwrap();
        a.assign(&k("a", "grpc")).unwrap();
        a.assign(&k("b", "http")).unwrap();
        a.retain("ns", "a", &[k("a", "http")]);
        assert_eq!(a.get(&k("a", "grpc")), None);
        assert_eq!(a.len(), 2);
        a.release("ns", "a");
        assert_eq!(a.get(&k("a", "http")), None);
        assert_eq!(a.assign(&k("c", "x")), Ok(20000));
    }
}
