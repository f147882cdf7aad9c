//! The local cluster's node agent, the test application's helpers and the shared
//! code of the end-to-end tests.

pub mod agent;
pub mod coldstart;
pub mod faults;
pub mod slow;
pub mod startup;
pub mod testing;
