//! The one door for replicas: every change of a workload's replicas — a wake, the
//! autoscaler's tick, an idle sleep, the bounds a reconcile enforces, the restore on
//! delete — is a decision handed to [`apply`], which writes it with optimistic
//! concurrency. A decision is made on the replicas read from `/scale` together with
//! their `resourceVersion`, and the write carries that version as a precondition: when
//! someone else changed the workload meanwhile (another decider of this operator, a
//! follower's wake, a user's `kubectl scale`), the API server refuses it (409), and the
//! decision is made again on what is there now (at most [`MAX_TRIES`] times). No
//! decider's write can so undo another's it did not see.
//!
//! Must not: decide (the deciders are the caller's closures), or record why (the caller
//! counts, logs and tells the change it gets back).

use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::core::DynamicObject;
use serde_json::json;
use snooze_crds::MANAGER;

/// Writes tried for one decision before giving up (each conflict re-reads and
/// re-decides).
pub const MAX_TRIES: u32 = 4;

/// The replicas of a workload as read from `/scale`, and the version they were read at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read {
    pub replicas: i32,
    pub version: Option<String>,
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
        version: scale.metadata.resource_version,
    })
}

/// Applies `decide` to the workload's replicas: reads them (or starts from `first`,
/// read by the caller), asks `decide` what they should be, and writes that with the
/// version read as a precondition; on a conflict reads again and asks again. `decide`
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
        // The version read is the precondition: a merge patch that names a
        // resourceVersion applies only to that version (409 otherwise).
        let patch = match &now.version {
            Some(v) => json!({"metadata": {"resourceVersion": v}, "spec": {"replicas": to}}),
            None => json!({"spec": {"replicas": to}}),
        };
        match bounded(limit, api.patch_scale(name, &pp, &Patch::Merge(&patch))).await {
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
            Err(WriteError::Api(kube::Error::Api(e))) if e.code == 409 => {
                conflicts += 1;
                if conflicts >= MAX_TRIES {
                    return Err(WriteError::Contended(conflicts));
                }
                now = read(api, name, limit).await?;
            }
            Err(e) => return Err(e),
        }
    }
}
