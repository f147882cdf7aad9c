//! Snooze's activator: the data plane in front of every ScaledService.
//!
//! Requests arrive on the activator port the operator assigned to a (ScaledService,
//! Service port). With a ready pod they are forwarded at once; with none they wait in
//! a bounded queue while the operator is told to wake the workload, and are released
//! by the endpoint event itself. See DESIGN.md.

// A connection's path, one stage after the other (DESIGN.md, "One request through
// the activator"): accept → classify → admit → dispatch → answer.
pub mod accept;
pub mod admit;
pub mod answer;
pub mod classify;
pub mod dispatch;

pub mod activity;
pub mod admin;
pub mod config;
pub mod metrics;
pub mod probe;
pub mod rules;
pub mod stats;
pub mod table;
pub mod waiting;
pub mod watch;
