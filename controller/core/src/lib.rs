//! Pure decisions: `(desired, observed) -> plan`. Nothing in here performs I/O, reads the clock
//! or knows about files, Docker or Kubernetes; the engine feeds it facts and executes its plans.

pub mod autoscale;
pub mod claims;
pub mod deployment;
pub mod files;
pub mod pool;
pub mod ports;
