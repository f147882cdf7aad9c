//! Snooze's operator: reconciles ScaledServices — routing objects, scaling decisions,
//! status — and keeps the stats stream from every activator. See DESIGN.md.

pub mod decision;
pub mod objects;
pub mod ports;
pub mod controller;
pub mod metrics;
pub mod stats;
