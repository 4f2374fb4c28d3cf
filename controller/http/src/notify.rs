//! Where reservation callbacks go: a URL checked once at start (`http://` or `https://`), and
//! for `https://` the certificate authorities trusted (the system's, and those of a PEM file
//! given with `--notify-ca-file`). Each callback is one signed `POST` on a connection of its own.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls;

/// How long one delivery may take, connection and answer included.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// A callback URL, parsed, with what is needed to reach it.
#[derive(Clone)]
pub struct Target {
    /// As given (for messages).
    pub url: String,
    /// `HOST:PORT` to connect to (the default port filled in).
    connect: String,
    /// `Host` header: the URL's authority as given.
    authority: String,
    path: String,
    /// For `https://`: the TLS client and the name the certificate must carry.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("url", &self.url).finish()
    }
}

/// The parts of a URL a callback needs: scheme, host, port, path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub https: bool,
    /// Without brackets for an IPv6 address.
    pub host: String,
    pub port: u16,
    /// The URL's authority as given (the `Host` header).
    pub authority: String,
    pub path: String,
}

/// Parses `http://HOST[:PORT][/PATH]` or `https://…`; anything else is an error saying why.
pub fn parse(url: &str) -> Result<Parsed, String> {
    let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("{url}: an http:// or https:// URL is expected"));
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/".to_owned()),
    };
    if authority.contains('@') {
        return Err(format!("{url}: credentials in the URL are not supported"));
    }
    let default_port = if https { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url}: an IPv6 address lacks its closing ']'"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("{url}: unexpected {after:?} after the address")),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url}: the URL names no host"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{url}: {p:?} is not a port"))?,
        None => default_port,
    };
    Ok(Parsed {
        https,
        host: host.to_owned(),
        port,
        authority: authority.to_owned(),
        path,
    })
}

impl Target {
    /// Checks `url` and, for `https://`, builds the TLS client: trusting the system's
    /// certificate authorities and those in `ca_file` (PEM). With none to trust, or a CA file
    /// that holds no certificate, it is an error naming what is missing.
    pub fn new(url: &str, ca_file: Option<&std::path::Path>) -> Result<Target, String> {
        let p = parse(url)?;
        let connect = if p.host.contains(':') {
            format!("[{}]:{}", p.host, p.port)
        } else {
            format!("{}:{}", p.host, p.port)
        };
        let tls = if p.https {
            let name = rustls::pki_types::ServerName::try_from(p.host.clone())
                .map_err(|e| format!("{url}: {:?} is not a host name: {e}", p.host))?;
            Some((connector(ca_file)?, name))
        } else {
            if let Some(f) = ca_file {
                return Err(format!(
                    "--notify-ca-file {}: the notification URL {url} is not https://",
                    f.display()
                ));
            }
            None
        };
        Ok(Target {
            url: url.to_owned(),
            connect,
            authority: p.authority,
            path: p.path,
            tls,
        })
    }

    /// POSTs `body` as JSON with the signature headers; any 2xx answer is success. Errors say
    /// what failed (connecting, the TLS handshake and why, or the answer).
    pub async fn post_signed(&self, secret: &[u8], body: &[u8]) -> Result<(), String> {
        let ts = crate::webhook::unix_now();
        let signature = crate::webhook::sign(secret, ts, body);
        let mut request = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n{}: {ts}\r\n{}: {signature}\r\nConnection: close\r\n\r\n",
            self.path,
            self.authority,
            body.len(),
            crate::webhook::HEADER_TIMESTAMP,
            crate::webhook::HEADER_SIGNATURE,
        )
        .into_bytes();
        request.extend_from_slice(body);
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(&self.connect)
                .await
                .map_err(|e| format!("connecting to {}: {e}", self.connect))?;
            let _ = tcp.set_nodelay(true);
            match &self.tls {
                None => exchange(tcp, &request).await,
                Some((connector, name)) => {
                    let tls = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| format!("TLS with {}: {e}", self.connect))?;
                    exchange(tls, &request).await
                }
            }
        };
        let line = tokio::time::timeout(DELIVERY_TIMEOUT, exchange)
            .await
            .map_err(|_| {
                format!(
                    "{}: no answer within {} s",
                    self.url,
                    DELIVERY_TIMEOUT.as_secs()
                )
            })??;
        let code = line.split_whitespace().nth(1).unwrap_or("");
        if code.starts_with('2') {
            Ok(())
        } else {
            Err(format!("{} answered {line:?}", self.url))
        }
    }
}

/// Sends `request` and reads the answer's status line.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    request: &[u8],
) -> Result<String, String> {
    s.write_all(request).await.map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned())
}

/// A TLS client trusting the system's authorities and those of `ca_file`.
fn connector(ca_file: Option<&std::path::Path>) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    let (system_added, _) = roots.add_parsable_certificates(system.certs);
    let mut file_added = 0;
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| format!("--notify-ca-file {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "--notify-ca-file {}: no certificate (PEM `BEGIN CERTIFICATE`) in it",
                path.display()
            ));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| {
                format!(
                    "--notify-ca-file {}: a certificate is not usable: {e}",
                    path.display()
                )
            })?;
            file_added += 1;
        }
    }
    if system_added + file_added == 0 {
        let why = system
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(format!(
            "no certificate authority to trust for an https:// notification URL: the system \
             has none{why}; give --notify-ca-file"
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_host_port_and_path() {
        let p = parse("https://booking.example/hooks/done?x=1").expect("https");
        assert_eq!(
            (p.https, p.host.as_str(), p.port, p.path.as_str()),
            (true, "booking.example", 443, "/hooks/done?x=1")
        );
        let p = parse("http://10.0.0.5:8080").expect("http");
        assert_eq!(
            (p.https, p.host.as_str(), p.port, p.path.as_str()),
            (false, "10.0.0.5", 8080, "/")
        );
        assert_eq!(p.authority, "10.0.0.5:8080");
        let p = parse("https://[::1]:8443/cb").expect("v6");
        assert_eq!((p.host.as_str(), p.port), ("::1", 8443));
        let p = parse("http://h?q").expect("query only");
        assert_eq!(p.path, "/?q");
        for bad in [
            "ftp://h/x",
            "booking.example/x",
            "https:///x",
            "http://h:0/",
            "http://h:99999/",
            "http://h:port/",
            "https://[::1/x",
            "http://user:pw@h/",
        ] {
            assert!(parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn a_ca_file_is_checked_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").expect("write");
        let e = Target::new("https://h/", Some(&empty)).expect_err("no certificate");
        assert!(
            e.contains("empty.pem") && e.contains("no certificate"),
            "{e}"
        );
        let missing = dir.path().join("missing.pem");
        let e = Target::new("https://h/", Some(&missing)).expect_err("missing");
        assert!(e.contains("missing.pem"), "{e}");
        let e = Target::new("http://h/", Some(&empty)).expect_err("not https");
        assert!(e.contains("not https://"), "{e}");
        assert!(Target::new("http://h:81/x", None).is_ok());
    }
}
