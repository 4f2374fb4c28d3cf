//! Where reservation callbacks go: a URL checked once at start (`http://` or `https://`), and
//! for `https://` the certificate authorities trusted (the system's, and those of a PEM file
//! given with `--notify-ca-file`). Each callback is one signed `POST` (see [`crate::client`]).

use std::time::Duration;

use crate::client::Client;

/// How long one delivery may take, connection and answer included.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// A callback URL, checked, with the client that reaches it.
#[derive(Clone)]
pub struct Target {
    /// As given (for messages).
    pub url: String,
    client: Client,
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
    /// Checks `url` and, for `https://`, the certificate authorities to trust: the system's
    /// and those in `ca_file` (PEM). With none to trust, or a CA file that holds no
    /// certificate, it is an error naming what is missing.
    pub fn new(url: &str, ca_file: Option<&std::path::Path>) -> Result<Target, String> {
        let p = parse(url)?;
        let client = if p.https {
            rustls::pki_types::ServerName::try_from(p.host.clone())
                .map_err(|e| format!("{url}: {:?} is not a host name: {e}", p.host))?;
            Client::new(crate::client::tls_config(ca_file, "--notify-ca-file")?)
        } else {
            if let Some(f) = ca_file {
                return Err(format!(
                    "--notify-ca-file {}: the notification URL {url} is not https://",
                    f.display()
                ));
            }
            Client::http_only()
        };
        Ok(Target {
            url: url.to_owned(),
            client,
        })
    }

    /// POSTs `body` as JSON with the signature headers; any 2xx answer is success. Errors say
    /// what failed (connecting, the TLS handshake and why, or the answer).
    pub async fn post_signed(&self, secret: &[u8], body: &[u8]) -> Result<(), String> {
        let ts = crate::webhook::unix_now();
        let signature = crate::webhook::sign(secret, ts, body);
        let ts = ts.to_string();
        let req = crate::client::request(
            "POST",
            &self.url,
            &[
                ("content-type", "application/json"),
                (crate::webhook::HEADER_TIMESTAMP, &ts),
                (crate::webhook::HEADER_SIGNATURE, &signature),
            ],
            body.to_vec(),
        )?;
        let answer = self
            .client
            .send(req, DELIVERY_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        if (200..300).contains(&answer.status) {
            Ok(())
        } else {
            Err(format!("{} answered {}", self.url, answer.status))
        }
    }
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
