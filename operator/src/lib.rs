//! Snooze's operator: reconciles ScaledServices — routing objects, scaling decisions,
//! status — and keeps the stats stream from every activator. See DESIGN.md.

pub mod activators;
pub mod autoscale;
pub mod backstop;
pub mod bypass;
pub mod caches;
pub mod check;
pub mod config;
pub mod controller;
pub mod decision;
pub mod group;
pub mod lead;
pub mod manual;
pub mod metrics;
pub mod objects;
pub mod ports;
pub mod probe;
pub mod replicas;
pub mod run;
pub mod schedule;
pub mod stats;
pub mod status;
pub mod wakefail;
