//! poolkeeper: a declarative reconciliation controller for warm container pools, claims, users
//! and deployments.
//!
//! Layers, with dependencies flowing one way:
//! - [`api`], [`model`], [`units`], [`validate`], [`core`]: types and pure decisions, no I/O;
//! - [`loader`]: files to objects with located diagnostics;
//! - [`runtime`]: the runtime trait and its implementations;
//! - [`engine`]: the reconcile loop that joins desired and observed state and executes plans;
//! - [`source`]: where desired state comes from (a watched directory);
//! - [`cli`]: the command line.

pub mod api;
pub mod bench;
pub mod cli;
pub mod cli_table;
pub mod client;
pub mod core;
pub mod crdgen;
pub mod edit;
pub mod engine;
pub mod filewriter;
pub mod loader;
pub mod model;
pub mod notify;
pub mod reach;
pub mod runtime;
pub mod server;
pub mod source;
pub mod units;
pub mod upload;
pub mod validate;
pub mod webhook;
