//! Snooze's operator: reconciles ScaledServices — routing objects, scaling decisions,
//! status — and keeps the stats stream from every activator. See DESIGN.md.

pub mod autoscale;
pub mod controller;
pub mod decision;
pub mod metrics;
pub mod objects;
pub mod ports;
pub mod schedule;
pub mod stats;
