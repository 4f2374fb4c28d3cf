//! Readiness probes run by the controller against an instance's published (or network) address:
//! an HTTP GET that must answer 2xx or 3xx, or a TCP connect. Exec probes go through the runtime.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use poolkeeper_kinds::PortRef;

use super::PortBinding;

/// The binding a probe's port refers to: by name, or by container port number.
pub fn find_port<'a>(ports: &'a [PortBinding], port: &PortRef) -> Option<&'a PortBinding> {
    ports.iter().find(|p| match port {
        PortRef::Name(n) => &p.name == n,
        PortRef::Number(n) => p.container_port == *n,
    })
}

/// A TCP connect that stays open. Docker's userland proxy accepts on the published port even
/// when nothing listens in the container, then closes at once: a connection closed by the peer
/// within a moment is a failure; one that stays open (or greets, as sshd does) is a success.
pub async fn tcp(addr: &str, timeout: Duration) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(timeout, TcpStream::connect(addr)).await else {
        return false;
    };
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(150), s.read(&mut byte)).await {
        Ok(Ok(n)) => n > 0,
        Ok(Err(_)) => false,
        Err(_) => true,
    }
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use poolkeeper_kinds::Protocol;

    #[tokio::test]
    async fn tcp_needs_a_connection_that_stays_open() {
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open_addr = open.local_addr().unwrap().to_string();
        let keep = tokio::spawn(async move {
            let (s, _) = open.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(s);
        });
        assert!(tcp(&open_addr, Duration::from_secs(1)).await);
        keep.abort();
        // What a proxy with no backend does: accept, then close.
        let closing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closing_addr = closing.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (s, _) = closing.accept().await.unwrap();
            drop(s);
        });
        assert!(!tcp(&closing_addr, Duration::from_secs(1)).await);
    }

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
