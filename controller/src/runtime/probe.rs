//! Readiness probes run by the controller against an instance's published (or network) address:
//! an HTTP GET that must answer 2xx or 3xx, or a TCP connect. Exec probes go through the runtime.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::PortBinding;
use crate::api::PortRef;

/// The binding a probe's port refers to: by name, or by container port number.
pub fn find_port<'a>(ports: &'a [PortBinding], port: &PortRef) -> Option<&'a PortBinding> {
    ports.iter().find(|p| match port {
        PortRef::Name(n) => &p.name == n,
        PortRef::Number(n) => p.container_port == *n,
    })
}

pub async fn tcp(addr: &str, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// An HTTP/1.0 GET; ready on a 2xx or 3xx status, as Kubernetes' httpGet probe.
pub async fn http_get(addr: &str, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let req =
            format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: poolkeeper-probe\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 32];
        let mut n = 0;
        while n < 12 {
            let read = s.read(&mut buf[n..]).await.ok()?;
            if read == 0 {
                break;
            }
            n += read;
        }
        status_ok(&buf[..n])
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

/// Whether an HTTP status line begins with a 2xx or 3xx code.
fn status_ok(head: &[u8]) -> Option<bool> {
    let head = std::str::from_utf8(head).ok()?;
    let code = head.strip_prefix("HTTP/")?.split(' ').nth(1)?;
    Some(code.starts_with('2') || code.starts_with('3'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Protocol;

    #[test]
    fn status_lines() {
        assert_eq!(status_ok(b"HTTP/1.1 200 OK\r\n"), Some(true));
        assert_eq!(status_ok(b"HTTP/1.0 302 Found"), Some(true));
        assert_eq!(status_ok(b"HTTP/1.1 503 Service"), Some(false));
        assert_eq!(status_ok(b"SSH-2.0-OpenSSH"), None);
    }

    #[test]
    fn ports_by_name_or_number() {
        let ports = vec![PortBinding {
            name: "http".into(),
            container_port: 80,
            host_port: 8000,
            protocol: Protocol::Tcp,
        }];
        assert_eq!(
            find_port(&ports, &PortRef::Name("http".into())).map(|p| p.host_port),
            Some(8000)
        );
        assert_eq!(
            find_port(&ports, &PortRef::Number(80)).map(|p| p.host_port),
            Some(8000)
        );
        assert!(find_port(&ports, &PortRef::Number(81)).is_none());
    }
}
