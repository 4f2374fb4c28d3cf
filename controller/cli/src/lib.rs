//! The `poolkeeper` command line: parses arguments and wires the layers together (a source, the
//! engine, a runtime, the HTTP API). The layers are crates of their own, dependencies flowing
//! one way (see docs/architecture.md):
//! `poolkeeper-kinds` -> `poolkeeper-core` -> `poolkeeper-store` -> `poolkeeper-runtime` ->
//! `poolkeeper-runtime-docker` -> `poolkeeper-engine` -> `poolkeeper-source-dir` ->
//! `poolkeeper-http` -> this crate.
//!
//! - [`cli`]: the commands;
//! - [`table`]: `get` and `describe` output;
//! - [`client`]: the CLI's side of the HTTP API;
//! - [`kube_mode`]: a controller on a Kubernetes API server, assembled;
//! - [`install`]: the systemd unit and a first specs folder, printed;
//! - [`notify`]: the service manager's notifications (ready, watchdog, stopping);
//! - [`access`]: logs, exec, stats and volumes of the containers a controller runs;
//! - [`bench`]: the benchmarks.

pub mod access;
pub mod access_pods;
pub mod args;
pub mod bench;
pub mod cli;
pub mod client;
pub mod flows;
pub mod install;
pub mod kube_mode;
pub mod notify;
mod run;
pub mod table;
