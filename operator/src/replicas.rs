//! The one door for replicas: every change of a workload's replicas — a wake, the
//! autoscaler's tick, an idle sleep, the bounds a reconcile enforces, the restore on
//! delete — is a decision handed to [`apply`], which writes it with a precondition on
//! the replicas themselves. A decision is made on the replicas read from `/scale`, and
//! the write is a JSON Patch whose `test` names them: when someone else changed the
//! replicas meanwhile (another decider of this operator, a follower's wake, a user's
//! `kubectl scale`), the API server refuses it (422), and the decision is made again on
//! what is there now (at most [`MAX_TRIES`] times). No decider's write can so undo
//! another's it did not see. Writes that leave the replicas alone — the workload
//! controller's status, a label — do not refuse it: a precondition on the
//! `resourceVersion` did, and a burst of status writes right after a scale-up (a
//! Deployment's controller makes several) could refuse a wake all [`MAX_TRIES`] times.
//!
//! Must not: decide (the deciders are the caller's closures), or record why (the caller
//! counts, logs and tells the change it gets back).

use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::core::DynamicObject;
use serde_json::json;
use snooze_crds::MANAGER;

/// The JSON Patch that sets the replicas to `to` only while they are `from`. `/scale`
/// leaves out replicas of 0 (`omitempty`: its spec is `{}`), and a `test` of a missing
/// member fails (RFC 6902), so 0 is tested as the empty spec; the value is set with
/// `add`, which also creates it.
fn write(from: i32, to: i32) -> json_patch::Patch {
    let test = if from == 0 {
        json!({"op": "test", "path": "/spec", "value": {}})
    } else {
        json!({"op": "test", "path": "/spec/replicas", "value": from})
    };
    serde_json::from_value(json!([
        test,
        {"op": "add", "path": "/spec/replicas", "value": to},
    ]))
    .expect("a JSON Patch")
}

/// Writes tried for one decision before giving up (each conflict re-reads and
/// re-decides).
pub const MAX_TRIES: u32 = 4;

/// The replicas of a workload as read from `/scale`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read {
    pub replicas: i32,
}

/// What became of a decision.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied<T> {
    /// The decider wanted no change for the replicas it was shown.
    Unchanged { replicas: i32 },
    /// Written: from what was read to what was decided, and the decider's reason.
    Changed { from: i32, to: i32, why: T },
}

/// Why a decision was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Api(#[from] kube::Error),
    #[error("the API call took longer than {0:?}")]
    Timeout(Duration),
    #[error("the workload kept changing: {0} conflicting writes in a row")]
    Contended(u32),
}

async fn bounded<T>(
    limit: Duration,
    f: impl Future<Output = kube::Result<T>>,
) -> Result<T, WriteError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| WriteError::Timeout(limit))?
        .map_err(WriteError::Api)
}

/// Reads the replicas of `name` (through `api`, the workload's `/scale`-capable API).
pub async fn read(
    api: &Api<DynamicObject>,
    name: &str,
    limit: Duration,
) -> Result<Read, WriteError> {
    let scale = bounded(limit, api.get_scale(name)).await?;
    Ok(Read {
        replicas: scale.spec.and_then(|s| s.replicas).unwrap_or(0),
    })
}

/// Applies `decide` to the workload's replicas: reads them (or starts from `first`,
/// read by the caller), asks `decide` what they should be, and writes that on the
/// condition that the replicas are still those read; when they are not, reads again and
/// asks again. `decide`
/// returns the replicas wanted and why, or None for no change. Each API call is bounded
/// by `limit`. Returns what was done and how many conflicts it met.
pub async fn apply<T>(
    api: &Api<DynamicObject>,
    name: &str,
    first: Option<Read>,
    limit: Duration,
    mut decide: impl FnMut(i32) -> Option<(i32, T)>,
) -> Result<(Applied<T>, u32), WriteError> {
    let mut now = match first {
        Some(r) => r,
        None => read(api, name, limit).await?,
    };
    let pp = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    };
    let mut conflicts = 0;
    loop {
        let Some((to, why)) = decide(now.replicas).filter(|(to, _)| *to != now.replicas) else {
            return Ok((
                Applied::Unchanged {
                    replicas: now.replicas,
                },
                conflicts,
            ));
        };
        match bounded(
            limit,
            api.patch_scale(name, &pp, &Patch::Json::<()>(write(now.replicas, to))),
        )
        .await
        {
            Ok(_) => {
                return Ok((
                    Applied::Changed {
                        from: now.replicas,
                        to,
                        why,
                    },
                    conflicts,
                ));
            }
            // 422: the `test` failed (or the patch is invalid: then the replicas read
            // again are those the decision was made on, and the error is returned).
            // 409: a conflict the API server did not retry itself.
            Err(WriteError::Api(kube::Error::Api(e))) if e.code == 422 || e.code == 409 => {
                let fresh = read(api, name, limit).await?;
                if e.code == 422 && fresh.replicas == now.replicas {
                    return Err(WriteError::Api(kube::Error::Api(e)));
                }
                conflicts += 1;
                if conflicts >= MAX_TRIES {
                    return Err(WriteError::Contended(conflicts));
                }
                now = fresh;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(doc: serde_json::Value, from: i32, to: i32) -> Result<serde_json::Value, String> {
        let mut doc = doc;
        json_patch::patch(&mut doc, &write(from, to)).map_err(|e| e.to_string())?;
        Ok(doc)
    }

    #[test]
    fn the_write_holds_only_on_the_replicas_it_was_decided_on() {
        // /scale leaves out 0.
        let zero = json!({"spec": {}});
        let three = json!({"spec": {"replicas": 3}});
        assert_eq!(on(zero.clone(), 0, 2), Ok(json!({"spec": {"replicas": 2}})));
        assert_eq!(
            on(three.clone(), 3, 0),
            Ok(json!({"spec": {"replicas": 0}}))
        );
        assert!(on(three.clone(), 0, 1).is_err(), "a wake on 3");
        assert!(on(three, 2, 1).is_err(), "a step down decided on 2");
        assert!(on(zero, 3, 2).is_err(), "decided on 3, now 0");
    }
}
