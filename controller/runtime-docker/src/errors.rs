//! The daemon's errors, as the engine's `RuntimeError`s.

use bollard::errors::Error as DockerError;

use poolkeeper_runtime::RuntimeError;

pub(crate) fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

pub(crate) fn docker_message(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

pub(crate) fn map_err(e: DockerError, what: &str) -> RuntimeError {
    match &e {
        DockerError::DockerResponseServerError {
            status_code: 404, ..
        } => RuntimeError::NotFound(what.to_owned()),
        DockerError::DockerResponseServerError { message, .. } => {
            RuntimeError::Failed(message.clone())
        }
        // Transport failures (the daemon is down, restarting or gone away mid-request) say
        // nothing about the instance.
        DockerError::HyperResponseError { .. }
        | DockerError::HyperLegacyError { .. }
        | DockerError::IOError { .. }
        | DockerError::RequestTimeoutError
        | DockerError::SocketNotFoundError(_) => RuntimeError::Unavailable(e.to_string()),
        _ => RuntimeError::Failed(e.to_string()),
    }
}

/// A start error, with "port in use" recognised so the engine picks another port.
pub(crate) fn start_error(e: DockerError, name: &str) -> RuntimeError {
    let msg = docker_message(&e);
    if let Some(port) = port_in_use(&msg) {
        return RuntimeError::PortInUse { port };
    }
    map_err(e, name)
}

/// Docker's messages for a host port that is taken: `Bind for 0.0.0.0:8000 failed: port is
/// already allocated` (by another container) and `listen tcp4 0.0.0.0:8000: bind: address
/// already in use` (by another process).
pub fn port_in_use(msg: &str) -> Option<u16> {
    if !(msg.contains("port is already allocated") || msg.contains("address already in use")) {
        return None;
    }
    let marker = if let Some(i) = msg.find("Bind for ") {
        &msg[i + "Bind for ".len()..]
    } else if let Some(i) = msg.find("listen tcp") {
        &msg[i..]
    } else if let Some(i) = msg.find("listen udp") {
        &msg[i..]
    } else {
        return None;
    };
    let addr = marker
        .split([' ', ','])
        .find(|w| w.contains(':'))?
        .trim_end_matches(':');
    addr.rsplit(':').next()?.parse().ok()
}
