//! The one HTTP client of poolkeeper (hyper, hyper-util and hyper-rustls, as kube's client
//! uses): the CLI's requests to the API, reservations' callbacks over `http://` or `https://`,
//! and the API benchmark's clients. HTTP/1.1, keep-alive, `TCP_NODELAY`.

use std::error::Error as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as Pooled;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// What a request carries.
pub type Body = Full<Bytes>;

/// A client: cheap to clone (connections are pooled and shared).
#[derive(Clone, Debug)]
pub struct Client {
    inner: Pooled<HttpsConnector<HttpConnector>, Body>,
}

/// An answer read whole.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// Why a request got no answer. Each names where it was going.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {authority}: {message}")]
    Connect { authority: String, message: String },
    /// The TLS handshake failed (an untrusted certificate, say).
    #[error("TLS with {authority}: {message}")]
    Tls { authority: String, message: String },
    #[error("{authority}: {message}")]
    Exchange { authority: String, message: String },
    #[error("{authority}: no answer within {} s", .after.as_secs_f64())]
    Timeout { authority: String, after: Duration },
}

impl Client {
    /// A client for `http://`, and for `https://` trusting the authorities of `tls` (see
    /// [`tls_config`]).
    pub fn new(tls: rustls::ClientConfig) -> Client {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Client {
            inner: Pooled::builder(TokioExecutor::new())
                // Header names as they are usually written (`Host`, `Content-Type`): a booking
                // system's hand-written receiver may compare them so.
                .http1_title_case_headers(true)
                .build(connector),
        }
    }

    /// A client trusting the system's certificate authorities (none, where the system has
    /// none: then only `http://` works).
    pub fn with_system_roots() -> Client {
        let roots = system_roots().0;
        Client::new(config_trusting(roots))
    }

    /// A client for `http://` only (it trusts no certificate authority).
    pub fn http_only() -> Client {
        Client::new(config_trusting(rustls::RootCertStore::empty()))
    }

    /// Sends `req` and reads the whole answer, all within `timeout`.
    pub async fn send(&self, req: Request<Body>, timeout: Duration) -> Result<Answer, ClientError> {
        let authority = authority_of(&req);
        let exchange = async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| describe(&authority, &e))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Exchange {
                    authority: authority.clone(),
                    message: chain(&e),
                })?
                .to_bytes();
            Ok(Answer { status, body })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                authority: authority.clone(),
                after: timeout,
            })?
    }

    /// Sends `req` and returns the answer as it starts: its body is read as it comes (an
    /// event stream, say).
    pub async fn open(&self, req: Request<Body>) -> Result<Response<Incoming>, ClientError> {
        let authority = authority_of(&req);
        self.inner
            .request(req)
            .await
            .map_err(|e| describe(&authority, &e))
    }
}

/// A request of `method` to `url` with `body` (empty: no body).
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Request<Body>, String> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("{method} {url}: {e}"))
}

fn authority_of(req: &Request<Body>) -> String {
    let uri = req.uri();
    match (uri.host(), uri.port_u16()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => {
            let port = if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            };
            format!("{h}:{port}")
        }
        _ => uri.to_string(),
    }
}

/// An error and its causes, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = c.source();
    }
    out
}

/// The TLS error somewhere in `e`'s causes. An `io::Error`'s `source()` skips the error it
/// wraps (it goes to that error's own source), so wrapped errors are looked into too.
fn tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| tls_error(inner))
    {
        return Some(inner);
    }
    e.source().and_then(tls_error)
}

/// What went wrong, told apart: a refused TLS handshake, a failed connection, or the exchange.
fn describe(authority: &str, e: &hyper_util::client::legacy::Error) -> ClientError {
    if let Some(tls) = e.source().and_then(tls_error) {
        return ClientError::Tls {
            authority: authority.to_owned(),
            message: tls.to_string(),
        };
    }
    // The connection's own error, without hyper-util's "client error (Connect)" wrapper.
    let message = e.source().map_or_else(|| e.to_string(), chain);
    if e.is_connect() {
        ClientError::Connect {
            authority: authority.to_owned(),
            message,
        }
    } else {
        ClientError::Exchange {
            authority: authority.to_owned(),
            message,
        }
    }
}

/// The system's certificate authorities, and the first error met loading them.
fn system_roots() -> (rustls::RootCertStore, Option<String>) {
    let mut roots = rustls::RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(system.certs);
    (roots, system.errors.first().map(|e| e.to_string()))
}

fn config_trusting(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // The provider's safe defaults are TLS 1.2 and 1.3, which it supports: this cannot fail.
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| unreachable!("ring supports the default TLS versions: {e}"))
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A TLS client configuration trusting the system's certificate authorities and those of
/// `ca_file` (PEM). With none to trust at all, or a file holding no certificate, an error that
/// names what is missing (`what` names the setting, as `--notify-ca-file`).
pub fn tls_config(ca_file: Option<&Path>, what: &str) -> Result<rustls::ClientConfig, String> {
    let (mut roots, system_error) = system_roots();
    let system = roots.len();
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| format!("{what} {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{what} {}: no certificate (PEM `BEGIN CERTIFICATE`) in it",
                path.display()
            ));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| {
                format!(
                    "{what} {}: a certificate is not usable: {e}",
                    path.display()
                )
            })?;
        }
    }
    if roots.is_empty() {
        let why = system_error.map(|e| format!(" ({e})")).unwrap_or_default();
        return Err(format!(
            "no certificate authority to trust for https://: the system has none{why}; give \
             {what}"
        ));
    }
    tracing::debug!(
        system,
        from_file = roots.len() - system,
        "certificate authorities"
    );
    Ok(config_trusting(roots))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A TLS server for `localhost` with a certificate of its own authority (returned as PEM),
    /// answering every request `204`.
    async fn tls_server() -> (u16, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).expect("ca").pem();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("cert");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key"),
        )
        .expect("config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(s).await else {
                        return;
                    };
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    let _ = s.shutdown().await;
                });
            }
        });
        (port, ca_pem)
    }

    #[tokio::test]
    async fn https_goes_to_a_trusted_certificate_and_a_refused_handshake_says_tls() {
        let (port, ca_pem) = tls_server().await;
        let url = format!("https://localhost:{port}/x");
        let mut ca = tempfile::NamedTempFile::new().expect("temp");
        ca.write_all(ca_pem.as_bytes()).expect("write");
        let trusting = Client::new(tls_config(Some(ca.path()), "--ca").expect("config"));
        let req = request("POST", &url, &[], b"{}".to_vec()).expect("request");
        let answer = trusting
            .send(req, Duration::from_secs(5))
            .await
            .expect("answer");
        assert_eq!(answer.status, 204);

        let other = Client::http_only();
        let req = request("POST", &url, &[], b"{}".to_vec()).expect("request");
        let e = other
            .send(req, Duration::from_secs(5))
            .await
            .expect_err("untrusted");
        assert!(
            matches!(&e, ClientError::Tls { message, .. } if message.contains("certificate")),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with(&format!("TLS with localhost:{port}: ")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_refused_connection_names_where_it_went() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        let req =
            request("GET", &format!("http://127.0.0.1:{port}/"), &[], Vec::new()).expect("request");
        let e = Client::http_only()
            .send(req, Duration::from_secs(5))
            .await
            .expect_err("refused");
        assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
        assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    }
}
