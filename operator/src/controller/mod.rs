//! The controller of ScaledServices, on the leader: what it shares (the [`Context`],
//! the per-service [`ServiceState`], the [`Error`] enum, the bounded API call) here,
//! each stage in its own module:
//!
//! - `reconcile`: the entry, the error policy, the lookups before applying;
//! - `read`: what a reconcile reads (caches first) and what stops a ScaledService;
//! - `apply`: references → ports → routing objects → replicas → status;
//! - `tick`: the once-a-second autoscale decisions, and the spec → policy mapping;
//! - `wake`: an activator's wake signal (and the services it needs), wake outcomes;
//! - `write`: the one door for replicas, and the status writer;
//! - `routes`: routes that bypass the managed Service;
//! - `cleanup`: what deleting a ScaledService restores and deletes.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use parking_lot::Mutex;
use serde_json::json;
use snooze_crds::stats::ServiceRef;
use snooze_crds::{FINALIZER, MANAGER, PortStatus, ScaledService, ScaledServiceStatus};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::autoscale::{self, Autoscale, Replicas, Sample, ScaleState};
use crate::decision::{self, Load, Policy, Reason};
use crate::metrics::{Metrics, ScaleLabels, ServiceLabels};
use crate::objects;
use crate::ports::{Exhausted, PortAllocator};
use crate::replicas::{self, Applied};
use crate::stats::StatsStore;
use crate::status::{self, Problem};
use crate::{bypass, group, wakefail};

mod apply;
mod cleanup;
mod read;
mod reconcile;
mod routes;
mod tick;
mod wake;
mod write;

pub(crate) use apply::*;
pub(crate) use cleanup::*;
pub(crate) use read::*;
pub use reconcile::*;
pub(crate) use routes::*;
pub use tick::*;
pub use wake::*;
pub use write::*;

pub use crate::activators::Activators;

pub struct Context {
    pub client: Client,
    pub store: Store<ScaledService>,
    /// EndpointSlices of backend Services (managed by the EndpointSlice controller).
    /// What a reconcile reads (`caches.rs`).
    pub caches: Arc<crate::caches::Caches>,
    pub ports: Mutex<PortAllocator>,
    pub stats: Arc<StatsStore>,
    pub activators: watch::Receiver<Activators>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub started: SystemTime,
    /// Resolved scale targets by group/version/kind (None: not scalable).
    pub discovery: Discovery,
    /// Bound on every API call.
    pub api_timeout: Duration,
    /// What this leader remembers of each ScaledService (dropped on delete).
    pub services: Mutex<HashMap<ServiceRef, ServiceState>>,
    /// The routes of a namespace as last listed, shared by its ScaledServices for
    /// `ROUTES_FRESH` (`check_routes`).
    pub routes: Mutex<HashMap<String, ListedRoutes>>,
    /// One listing of a namespace's routes at a time (`namespace_routes`).
    pub routes_listing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The activators' ceiling on one service's held requests (`queue_share` is
    /// clamped to it).
    pub max_queued_per_service: u32,
}

/// A namespace's routes and when they were listed.
pub type ListedRoutes = (Instant, Arc<Vec<bypass::Route>>);

/// What the leader remembers of one ScaledService between reconciles and ticks. A new
/// leader starts from the API objects (status included) and builds this up again.
#[derive(Default)]
pub struct ServiceState {
    /// Replicas (current, ready) as last read; `None` until a reconcile programmed it
    /// (the autoscaler leaves it alone until then).
    pub replicas: Option<(i32, i32)>,
    /// Per-second load samples (trimmed to the autoscaler's longest window).
    pub history: VecDeque<Sample>,
    /// The autoscaler's memory (last change, panic).
    pub scale: ScaleState,
    /// The last scale the operator made: when and why (for the status).
    pub last_scale: Option<(Time, String)>,
    /// The replicas the workload had when this leader took it over, until the status
    /// shows them: a reconcile that reads a cached object from before the first status
    /// write must not record the replicas Snooze itself set as the original ones.
    pub original: Option<i32>,
    /// A wake in progress or just done: repeated signals for the same cold start
    /// (every waiting request, every activator) patch once.
    pub waking: Option<Instant>,
    /// Activation timeouts (504s) the activators reported, as last seen.
    pub timeouts_seen: Option<u64>,
    /// When (and at which generation) this leader last looked for routes that bypass
    /// the managed Service, and what it found (`bypass`).
    pub routes_checked: Option<(Instant, Option<i64>)>,
    pub routes_reported: Vec<String>,
    /// The `WakeSucceeded` condition as this leader last wrote it (`wake_outcome`).
    pub wake_condition: Option<Condition>,
    /// Reconciles of this object that failed in a row (the error policy's backoff).
    pub failures: u32,
    /// The bad annotation values last told in a Warning event (`manual`).
    pub annotations_warned: Vec<String>,
    /// The replicas this leader last wrote, and when: until the workload cache shows
    /// them (its watch lags the write by a moment), the replicas are read from `/scale`.
    pub written: Option<(i32, Instant)>,
}

impl Context {
    /// Runs `f` on the remembered state of `key` (created empty on first use).
    pub fn state<R>(&self, key: &ServiceRef, f: impl FnOnce(&mut ServiceState) -> R) -> R {
        f(self.services.lock().entry(key.clone()).or_default())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("API call timed out")]
    Timeout,
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error(transparent)]
    Ports(#[from] Exhausted),
    #[error("writing the replicas of {workload}: {source}")]
    Replicas {
        workload: String,
        #[source]
        source: replicas::WriteError,
    },
}

impl Error {
    /// The cause, for the `reconcile_errors` metric: an error inside the finalizer's
    /// apply or cleanup is labelled by what failed there, not `finalizer`.
    pub fn metric_label(&self) -> &'static str {
        use kube::runtime::finalizer::Error as F;
        match self {
            Error::Kube(_) => "kube",
            Error::Timeout => "timeout",
            Error::Ports(_) => "ports_exhausted",
            Error::Replicas { .. } => "replicas",
            Error::Finalizer(f) => match f.as_ref() {
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.metric_label(),
                F::AddFinalizer(_) | F::RemoveFinalizer(_) => "finalizer_patch",
                F::UnnamedObject => "unnamed_object",
                F::InvalidFinalizer => "invalid_finalizer",
            },
        }
    }
}

async fn timed<T>(ctx: &Context, f: impl Future<Output = kube::Result<T>>) -> Result<T, Error> {
    match tokio::time::timeout(ctx.api_timeout, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(Error::Timeout),
    }
}

fn key_of(ss: &ScaledService) -> ServiceRef {
    ServiceRef {
        namespace: ss.namespace().unwrap_or_default(),
        name: ss.name_any(),
    }
}

async fn publish(ctx: &Context, ss: &ScaledService, type_: EventType, reason: &str, note: String) {
    let reference: ObjectReference = ss.object_ref(&());
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
        warn!("publishing event: {e}");
    }
}

fn now_time() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn to_time(t: SystemTime) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::try_from(t).ok().map(Time)
}

fn to_system(t: &Time) -> SystemTime {
    SystemTime::from(t.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::finalizer::Error as F;

    #[test]
    fn failed_reconciles_back_off_per_object() {
        let secs: Vec<u64> = (1..=9).map(|n| retry_after(n).as_secs()).collect();
        assert_eq!(secs, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(retry_after(0).as_secs(), 5);
        assert_eq!(retry_after(u32::MAX).as_secs(), 300);
    }

    #[test]
    fn reconcile_errors_are_labelled_by_their_cause_inside_the_finalizer() {
        let cases: Vec<(Error, &str)> = vec![
            (Error::Timeout, "timeout"),
            (
                Error::Finalizer(Box::new(F::ApplyFailed(Error::Timeout))),
                "timeout",
            ),
            (
                Error::Finalizer(Box::new(F::CleanupFailed(Error::Ports(Exhausted::Range(
                    1..=2,
                ))))),
                "ports_exhausted",
            ),
            (
                Error::Finalizer(Box::new(F::UnnamedObject)),
                "unnamed_object",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.metric_label(), want, "{e}");
        }
    }
}
