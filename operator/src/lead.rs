//! Leader election on a `coordination.k8s.io` Lease, with fencing: one leader at a
//! time, always.
//!
//! The rules (those of client-go's leaderelection, which Kubernetes' own controllers
//! use):
//!
//! - Every write of the Lease is a `replace` with the `resourceVersion` read just
//!   before: of two candidates writing at once, one gets 409 Conflict and stays a
//!   follower. (kube-lease-manager relied on server-side-apply conflicts between field
//!   managers; every replica passed the same manager, so two could lead at once.)
//! - A follower takes the Lease only after it has seen the record unchanged for the
//!   whole lease duration by its **own** clock (observed time, not the record's
//!   `renewTime`: no clock skew between nodes matters), or when it is released.
//! - The leader counts its term from the moment it **sent** its last successful renew
//!   and steps down when `renew_deadline` (< lease duration) has passed without another
//!   one. A follower's wait starts after that renew was written, so the old leader has
//!   stopped before any follower may start, by `duration - renew_deadline` at least.
//! - Losing the lease is not an error: the leader stops its work and becomes a
//!   follower again; the process does not exit (an API server restart longer than the
//!   renew deadline makes the leader step down, and it takes the lease back when the
//!   API server returns, since it is still the holder).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct Settings {
    pub namespace: String,
    pub lease_name: String,
    /// This replica's identity: its pod name, unique among the replicas.
    pub identity: String,
    /// How long a follower waits on an unchanged record before it takes the lease.
    pub duration: Duration,
    /// The leader steps down when it has not renewed for this long.
    pub renew_deadline: Duration,
    /// Interval between tries to acquire or renew.
    pub retry_period: Duration,
}

impl Settings {
    /// Deadlines derived from the lease duration the way client-go's defaults relate
    /// (15 s / 10 s / 2 s).
    pub fn new(namespace: &str, lease_name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            namespace: namespace.to_string(),
            lease_name: lease_name.to_string(),
            identity: identity.to_string(),
            duration,
            renew_deadline: duration * 2 / 3,
            retry_period: (duration / 7).max(Duration::from_millis(200)),
        }
    }
}

/// What a follower has seen of the record, and since when (its own clock).
#[derive(Debug, Clone, PartialEq)]
struct Observed {
    holder: Option<String>,
    renew: Option<MicroTime>,
    version: Option<String>,
    since: Instant,
}

/// What to write, if anything, given the record read now.
#[derive(Debug, PartialEq)]
enum Step {
    /// Held by another, and not yet expired by our own observation.
    Wait,
    /// Write this spec (acquire, renew or take over).
    Write(LeaseSpec),
}

/// The pure rule: may `me` write the lease now, and what.
fn decide(
    me: &str,
    current: Option<&LeaseSpec>,
    observed_since: Instant,
    now: Instant,
    duration: Duration,
    wall: Timestamp,
) -> Step {
    let holder = current
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty());
    let mine = holder.as_deref() == Some(me);
    if holder.is_some() && !mine && now < observed_since + duration {
        return Step::Wait;
    }
    let transitions = current.and_then(|s| s.lease_transitions).unwrap_or(0);
    let acquire = if mine {
        current.and_then(|s| s.acquire_time.clone())
    } else {
        None
    };
    Step::Write(LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(duration.as_secs().max(1) as i32),
        acquire_time: Some(acquire.unwrap_or(MicroTime(wall))),
        renew_time: Some(MicroTime(wall)),
        lease_transitions: Some(if mine { transitions } else { transitions + 1 }),
        ..Default::default()
    })
}

pub struct Elector {
    api: Api<Lease>,
    s: Settings,
    observed: Option<Observed>,
}

impl Elector {
    pub fn new(client: Client, s: Settings) -> Self {
        Self {
            api: Api::namespaced(client, &s.namespace),
            s,
            observed: None,
        }
    }

    /// One try: `Ok(true)` when this replica holds the lease after it.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = Instant::now();
        let lease = match self.api.get_opt(&self.s.lease_name).await? {
            Some(l) => l,
            None => {
                let spec = match decide(
                    &self.s.identity,
                    None,
                    now,
                    now,
                    self.s.duration,
                    Timestamp::now(),
                ) {
                    Step::Write(spec) => spec,
                    Step::Wait => return Ok(false),
                };
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.s.lease_name.clone()),
                        namespace: Some(self.s.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                };
            }
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let seen = Observed {
            holder: spec.holder_identity.clone(),
            renew: spec.renew_time.clone(),
            version: lease.metadata.resource_version.clone(),
            since: now,
        };
        let since = match &self.observed {
            Some(o)
                if o.holder == seen.holder
                    && o.renew == seen.renew
                    && o.version == seen.version =>
            {
                o.since
            }
            _ => {
                self.observed = Some(seen);
                now
            }
        };
        match decide(
            &self.s.identity,
            Some(&spec),
            since,
            now,
            self.s.duration,
            Timestamp::now(),
        ) {
            Step::Wait => Ok(false),
            Step::Write(next) => {
                let mut l = lease;
                l.spec = Some(next);
                match self
                    .api
                    .replace(&self.s.lease_name, &PostParams::default(), &l)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Gives the lease up (graceful shutdown): holder cleared, so a follower takes over
    /// at its next try instead of after the lease duration.
    async fn release(&mut self) {
        let Ok(Some(mut l)) = self.api.get_opt(&self.s.lease_name).await else {
            return;
        };
        let Some(spec) = l.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.s.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.s.lease_name, &PostParams::default(), &l)
            .await
        {
            Ok(_) => info!("leader lease released"),
            Err(e) => warn!("releasing the leader lease: {e}"),
        }
    }

    /// Runs until `stop`: `leading` is true exactly while this replica may act as the
    /// leader (it goes false *before* the renew deadline passes without a renew).
    pub async fn run(mut self, leading: watch::Sender<bool>, stop: CancellationToken) {
        let mut last_renew: Option<Instant> = None;
        loop {
            let sent = Instant::now();
            let r = tokio::select! {
                r = tokio::time::timeout(self.s.retry_period.max(Duration::from_secs(1)), self.try_acquire_or_renew()) => r,
                _ = stop.cancelled() => break,
            };
            match r {
                Ok(Ok(true)) => last_renew = Some(sent),
                Ok(Ok(false)) => last_renew = None,
                Ok(Err(e)) => warn!("leader lease: {e}"),
                Err(_) => warn!("leader lease: the API call timed out"),
            }
            // Still the leader only within the renew deadline of the last renew sent.
            let lead = last_renew.is_some_and(|t| t.elapsed() < self.s.renew_deadline);
            if !lead {
                last_renew = None;
            }
            leading.send_if_modified(|cur| {
                if *cur != lead {
                    *cur = lead;
                    true
                } else {
                    false
                }
            });
            // Wake up in time to step down before the deadline if renews keep failing.
            let next = match last_renew {
                Some(t) => (t + self.s.renew_deadline).min(Instant::now() + self.s.retry_period),
                None => Instant::now() + self.s.retry_period,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.cancelled() => break,
            }
        }
        leading.send_replace(false);
        if last_renew.is_some() {
            self.release().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    fn held_by(who: &str, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(who.into()),
            lease_transitions: Some(transitions),
            acquire_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
            ..Default::default()
        }
    }

    fn holder(s: &Step) -> Option<&str> {
        match s {
            Step::Write(spec) => spec.holder_identity.as_deref(),
            Step::Wait => None,
        }
    }

    #[test]
    fn another_holder_is_waited_out_for_the_whole_duration_by_our_clock() {
        let t0 = Instant::now();
        let cur = held_by("b", 3);
        let wall = Timestamp::now();
        assert_eq!(decide("a", Some(&cur), t0, t0, D, wall), Step::Wait);
        assert_eq!(
            decide(
                "a",
                Some(&cur),
                t0,
                t0 + D - Duration::from_millis(1),
                D,
                wall
            ),
            Step::Wait
        );
        let s = decide("a", Some(&cur), t0, t0 + D, D, wall);
        assert_eq!(holder(&s), Some("a"));
        let Step::Write(spec) = s else { unreachable!() };
        assert_eq!(spec.lease_transitions, Some(4));
        assert_eq!(spec.acquire_time, Some(MicroTime(wall)));
    }

    #[test]
    fn the_holder_renews_at_once_and_keeps_its_acquire_time() {
        let t0 = Instant::now();
        let cur = held_by("a", 3);
        let Step::Write(spec) = decide("a", Some(&cur), t0, t0, D, Timestamp::now()) else {
            panic!("the holder must renew");
        };
        assert_eq!(spec.lease_transitions, Some(3));
        assert_eq!(spec.acquire_time, Some(MicroTime(Timestamp::UNIX_EPOCH)));
    }

    #[test]
    fn a_released_or_missing_lease_is_taken_at_once() {
        let t0 = Instant::now();
        let released = LeaseSpec::default();
        assert_eq!(
            holder(&decide("a", Some(&released), t0, t0, D, Timestamp::now())),
            Some("a")
        );
        assert_eq!(
            holder(&decide("a", None, t0, t0, D, Timestamp::now())),
            Some("a")
        );
        let empty = held_by("", 1);
        assert_eq!(
            holder(&decide("a", Some(&empty), t0, t0, D, Timestamp::now())),
            Some("a")
        );
    }

    #[test]
    fn the_leader_stops_before_a_follower_may_start() {
        let s = Settings::new("ns", "l", "a", D);
        assert!(s.renew_deadline < s.duration);
        assert!(s.retry_period < s.renew_deadline);
    }
}
