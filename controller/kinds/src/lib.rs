//! The declared kinds (group `poolkeeper.dev`, version `v1alpha1`): Pool, Claim, User and
//! Deployment, the source-independent [`Object`] the engine reconciles, units, validation and
//! the generated CRDs. Types and pure checks only: nothing here performs I/O.
//!
//! These types are the single source of truth: the CRDs under `crds/` are generated from them
//! (`poolkeeper crds`), and the directory source parses files into the same spec types. Specs
//! deny unknown fields so that a typo in a file is an error rather than a silently ignored key
//! (kube strips the resulting `additionalProperties: false` from the CRD schema, where the API
//! server's pruning does that job).

pub mod autoscale;
mod claim;
mod condition;
pub mod crd;
mod deployment;
mod object;
mod pool;
pub mod steps;
pub mod units;
mod user;
pub mod validate;

pub use claim::*;
pub use condition::*;
pub use deployment::*;
pub use object::*;
pub use pool::*;
pub use user::*;

pub const GROUP: &str = "poolkeeper.dev";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "poolkeeper.dev/v1alpha1";
