//! Reservations from booking systems: signed webhook events that become Claims, and signed
//! callbacks that tell the booking system where its reservation runs.
//!
//! Signing (both ways): `X-Poolkeeper-Timestamp: <unix seconds>` and
//! `X-Poolkeeper-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`. A request
//! older or newer than [`REPLAY_WINDOW_SECS`] is refused, and so is the same signature twice
//! (a replay); the same event sent again with a fresh signature is a duplicate, answered as the
//! first and changing nothing.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const HEADER_TIMESTAMP: &str = "x-poolkeeper-timestamp";
pub const HEADER_SIGNATURE: &str = "x-poolkeeper-signature";
pub const REPLAY_WINDOW_SECS: u64 = 300;

/// Now, in unix seconds (what signatures' timestamps are compared with).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 (RFC 2104), as RustCrypto's `hmac` computes it.
fn mac_of(key: &[u8], timestamp: u64, body: &[u8]) -> HmacSha256 {
    // Any key length is valid for HMAC: `new_from_slice` cannot fail here.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The signature header's value for `body` sent at `timestamp`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let tag = mac_of(secret, timestamp, body).finalize().into_bytes();
    format!("sha256={}", hex::encode(tag))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing {0} header")]
    Missing(&'static str),
    #[error("the timestamp is not a number of seconds")]
    BadTimestamp,
    #[error("the timestamp is {0} s away from now (the window is {REPLAY_WINDOW_SECS} s)")]
    OutsideWindow(u64),
    #[error("the signature does not match")]
    Mismatch,
}

/// A request whose signature verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// Its timestamp (unix seconds).
    pub at: u64,
    /// Its signature in one canonical form (`sha256=<lowercase hex>`), whatever form it came
    /// in: a replay is recognised by it.
    pub key: String,
}

/// Checks a request's signature at time `now` (unix seconds).
pub fn verify(
    secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: u64,
) -> Result<Signed, SignatureError> {
    let ts = timestamp.ok_or(SignatureError::Missing(HEADER_TIMESTAMP))?;
    let sig = signature.ok_or(SignatureError::Missing(HEADER_SIGNATURE))?;
    let ts: u64 = ts
        .trim()
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    let skew = now.abs_diff(ts);
    if skew > REPLAY_WINDOW_SECS {
        return Err(SignatureError::OutsideWindow(skew));
    }
    let got = sig.trim();
    let got = got.strip_prefix("sha256=").unwrap_or(got);
    let tag = hex::decode(got).map_err(|_| SignatureError::Mismatch)?;
    // `verify_slice` compares in constant time.
    mac_of(secret, ts, body)
        .verify_slice(&tag)
        .map_err(|_| SignatureError::Mismatch)?;
    Ok(Signed {
        at: ts,
        key: format!("sha256={}", hex::encode(tag)),
    })
}

/// The signatures accepted while they could still verify (until their timestamp is more than
/// the window in the past), with their timestamps. The API keeps them in its state folder, so
/// that a restart does not make a replay acceptable again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SeenSignatures(BTreeMap<String, u64>);

/// The key prefix of a release's record among the signatures (which begin `sha256=`).
const RELEASED: &str = "released:";

impl SeenSignatures {
    /// Records `signed`, received at `now`: false when it was recorded already (a replay).
    /// Signatures that can no longer verify are forgotten.
    pub fn record(&mut self, signed: &Signed, now: u64) -> bool {
        self.0
            .retain(|_, at| at.saturating_add(REPLAY_WINDOW_SECS) >= now);
        match self.0.entry(signed.key.clone()) {
            std::collections::btree_map::Entry::Occupied(_) => false,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(signed.at);
                true
            }
        }
    }

    /// Forgets `signed` (its request was not acted on).
    pub fn forget(&mut self, signed: &Signed) {
        self.0.remove(&signed.key);
    }

    /// Records that reservation `claim` was released by a request signed at `at`, for as long as
    /// a request signed no later could still verify: a provision that arrives after its own
    /// release (sent earlier, delivered late, or retried) is then refused. Kept with the
    /// signatures, under a key no signature has, and forgotten with them.
    pub fn record_release(&mut self, claim: &str, at: u64) {
        let t = self.0.entry(format!("{RELEASED}{claim}")).or_insert(at);
        *t = (*t).max(at);
    }

    /// When reservation `claim` was last released, if within the window.
    pub fn released_at(&self, claim: &str) -> Option<u64> {
        self.0.get(&format!("{RELEASED}{claim}")).copied()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A reservation event as booking systems send it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationEvent {
    /// `provision` or `release`.
    pub event: String,
    pub resource_name: String,
    #[serde(default)]
    pub user_id: Option<serde_json::Value>,
    pub username: String,
    #[serde(default)]
    pub custom_parameters: CustomParameters,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CustomParameters {
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub cpu_limit: Option<String>,
    #[serde(default)]
    pub memory_limit: Option<String>,
    #[serde(default)]
    pub ports: Option<serde_json::Value>,
    #[serde(default)]
    pub environment: Option<BTreeMap<String, String>>,
    /// Persistent storage, as the older reservation service took it: accepted, and listed as
    /// ignored (the pool's template decides its instances' storage).
    #[serde(default)]
    pub storage_limit: Option<String>,
    #[serde(default)]
    pub persistent_storage: Option<serde_json::Value>,
}

/// How every reservation's claim name begins; the API refuses it to other claims.
pub const RESERVATION_PREFIX: &str = "rsv-";

/// The claim name of a reservation, which is one resource for one user: `rsv-`, the user and the
/// resource made a DNS label (lowercase, other characters as `-`), and a short digest of both,
/// so that two users' reservations of a resource never share a claim, nor do two resources that
/// differ only in case or punctuation.
pub fn claim_name(resource: &str, user: &str) -> String {
    let mut base = label(&format!("{user}-{resource}"));
    base.truncate(40);
    let base = base.trim_matches('-');
    let mut both = user.as_bytes().to_vec();
    both.push(0);
    both.extend_from_slice(resource.as_bytes());
    let digest = hex::encode(&Sha256::digest(&both)[..4]);
    if base.is_empty() {
        format!("{RESERVATION_PREFIX}{digest}")
    } else {
        format!("{RESERVATION_PREFIX}{base}-{digest}")
    }
}

/// The name reservations' claims had before they were named after their user too (a release
/// finds those).
pub fn legacy_claim_name(resource: &str) -> String {
    let mut base = label(resource);
    base.truncate(40);
    let base = base.trim_matches('-');
    let digest = hex::encode(&Sha256::digest(resource.as_bytes())[..4]);
    if base.is_empty() {
        format!("{RESERVATION_PREFIX}{digest}")
    } else {
        format!("{RESERVATION_PREFIX}{base}-{digest}")
    }
}

fn label(s: &str) -> String {
    s.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The pool that serves `image`, among pools `(name, image)`: the first (by name) that the
/// user may use (`user_pools`: the user's allowed pools, empty for all), else the first that
/// runs it (admission then says why it may not). Refused with a reason when the image is not
/// allowed or no pool runs it.
pub fn pool_for_image<'a>(
    image: &str,
    allowed: &[String],
    pools: &'a [(String, String)],
    user_pools: &[&str],
) -> Result<&'a str, String> {
    if !allowed.is_empty() && !allowed.iter().any(|a| a == image) {
        return Err(format!(
            "image {image:?} is not allowed (allowed: {})",
            allowed.join(", ")
        ));
    }
    let mut running = pools
        .iter()
        .filter(|(_, i)| i == image)
        .map(|(p, _)| p.as_str());
    let first = running
        .clone()
        .next()
        .ok_or_else(|| format!("no pool runs image {image:?}"))?;
    Ok(running
        .find(|p| user_pools.is_empty() || user_pools.contains(p))
        .unwrap_or(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("any key length");
        mac.update(message);
        mac.finalize().into_bytes().to_vec()
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        let mac = hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            hex::encode(mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn signatures_are_checked_with_a_window() {
        let body = br#"{"event":"provision"}"#;
        let sig = sign(b"s3cret", 1_000, body);
        let signed = Signed {
            at: 1_000,
            key: sig.clone(),
        };
        assert_eq!(
            verify(b"s3cret", Some("1000"), Some(&sig), body, 1_100),
            Ok(signed.clone())
        );
        // Without the prefix too, and with the same key: a replay cannot hide by its form.
        let bare = sig.trim_start_matches("sha256=");
        assert_eq!(
            verify(b"s3cret", Some("1000"), Some(bare), body, 1_000),
            Ok(signed)
        );
        assert_eq!(
            verify(b"other", Some("1000"), Some(&sig), body, 1_000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"s3cret", Some("1000"), Some(&sig), b"{}", 1_000),
            Err(SignatureError::Mismatch)
        );
        // The timestamp is signed: moving it breaks the signature.
        assert_eq!(
            verify(b"s3cret", Some("1001"), Some(&sig), body, 1_000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"s3cret", Some("1000"), Some(&sig), body, 1_301),
            Err(SignatureError::OutsideWindow(301))
        );
        assert_eq!(
            verify(b"s3cret", None, Some(&sig), body, 1_000),
            Err(SignatureError::Missing(HEADER_TIMESTAMP))
        );
        assert_eq!(
            verify(b"s3cret", Some("soon"), Some(&sig), body, 1_000),
            Err(SignatureError::BadTimestamp)
        );
    }

    #[test]
    fn a_signature_is_a_replay_while_it_could_still_verify() {
        let body = b"{}";
        let at = |ts: u64| Signed {
            at: ts,
            key: sign(b"k", ts, body),
        };
        let mut seen = SeenSignatures::default();
        assert!(seen.record(&at(1_000), 1_000));
        assert!(!seen.record(&at(1_000), 1_200), "the same signature again");
        // A timestamp ahead of the clock verifies until it is a window in the past: kept so
        // long, though received long before.
        assert!(seen.record(&at(1_290), 1_000));
        assert!(!seen.record(&at(1_290), 1_590));
        // At 1,301 the first can no longer verify: forgotten; the second is kept.
        assert!(seen.record(&at(1_301), 1_301));
        assert_eq!(seen.len(), 2);
        assert!(
            verify(b"k", Some("1000"), Some(&at(1_000).key), body, 1_301).is_err(),
            "what is forgotten no longer verifies"
        );
        seen.forget(&at(1_301));
        assert!(seen.record(&at(1_301), 1_301), "forgotten: accepted again");
        // Kept on disk as a plain map.
        let json = serde_json::to_string(&seen).expect("json");
        let back: SeenSignatures = serde_json::from_str(&json).expect("back");
        assert_eq!(back, seen);
    }

    #[test]
    fn claim_names_are_dns_labels_distinct_per_resource_and_user() {
        let a = claim_name("Lab Room #4", "bob");
        assert!(poolkeeper_kinds::units::check_name(&a).is_ok(), "{a}");
        assert!(a.starts_with("rsv-bob-lab-room--4-"), "{a}");
        assert_ne!(
            claim_name("lab-room-4", "bob"),
            claim_name("Lab Room 4", "bob")
        );
        // One resource, two users: two reservations.
        assert_ne!(
            claim_name("lab-room-4", "alice"),
            claim_name("lab-room-4", "bob")
        );
        // The boundary between user and resource is part of the name's digest.
        assert_ne!(claim_name("b-c", "a"), claim_name("c", "a-b"));
        assert!(poolkeeper_kinds::units::check_name(&claim_name("###", "#")).is_ok());
        assert!(
            poolkeeper_kinds::units::check_name(&claim_name(&"x".repeat(300), &"y".repeat(300)))
                .is_ok()
        );
        let legacy = legacy_claim_name("Lab Room #4");
        assert!(legacy.starts_with("rsv-lab-room--4-"), "{legacy}");
    }

    #[test]
    fn an_image_maps_to_its_pool_within_the_allow_list() {
        let pools = vec![
            ("web".to_owned(), "nginx:1.27".to_owned()),
            ("py".to_owned(), "python:3".to_owned()),
        ];
        assert_eq!(pool_for_image("python:3", &[], &pools, &[]), Ok("py"));
        let allowed = vec!["nginx:1.27".to_owned()];
        let e = pool_for_image("python:3", &allowed, &pools, &[]).expect_err("refused");
        assert!(e.contains("not allowed"), "{e}");
        let e = pool_for_image("redis", &[], &pools, &[]).expect_err("no pool");
        // Two pools run the image: the user's own is chosen.
        let two = vec![
            ("a-site".to_owned(), "nginx".to_owned()),
            ("web".to_owned(), "nginx".to_owned()),
        ];
        assert_eq!(pool_for_image("nginx", &[], &two, &["web"]), Ok("web"));
        assert_eq!(pool_for_image("nginx", &[], &two, &[]), Ok("a-site"));
        assert_eq!(pool_for_image("nginx", &[], &two, &["other"]), Ok("a-site"));
        assert!(e.contains("no pool"), "{e}");
    }
}

/// Hostile input to the parsers behind the API never panics: any bytes as a webhook body and
/// signature, any bytes as an upload archive or form; and what an archive or a form yields
/// always stays inside the mount path.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
        ))]

        #[test]
        fn webhook_bodies_and_signatures(body in proptest::collection::vec(any::<u8>(), 0..512),
                                         ts in ".{0,24}", sig in ".{0,80}") {
            let _ = super::verify(b"0123456789abcdef", Some(&ts), Some(&sig), &body, 1_000);
            let _ = serde_json::from_slice::<super::ReservationEvent>(&body);
            let name = super::claim_name(&String::from_utf8_lossy(&body), &ts);
            prop_assert!(poolkeeper_kinds::units::check_name(&name).is_ok(), "{}", name);
        }

        #[test]
        fn upload_archives(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = poolkeeper_core::files::parse_tar(&bytes[..], "fuzz");
        }

        #[test]
        fn upload_forms(bytes in proptest::collection::vec(any::<u8>(), 0..2048),
                        boundary in "[a-zA-Z0-9'()+_,-./:=? ]{0,30}") {
            let ct = format!("multipart/form-data; boundary={boundary}");
            let _ = futures::executor::block_on(crate::upload::parse_multipart(&ct, bytes.into()));
        }

        #[test]
        fn form_paths_stay_inside(names in proptest::collection::vec("[a-z./\\\\]{1,20}", 1..5)) {
            let mut form = String::new();
            for n in &names {
                form.push_str(&format!(
                    "--B\r\nContent-Disposition: form-data; name=\"f\"; filename=\"{n}\"\r\n\r\nx\r\n"
                ));
            }
            form.push_str("--B--\r\n");
            let parsed = futures::executor::block_on(crate::upload::parse_multipart(
                "multipart/form-data; boundary=B",
                form.into(),
            ));
            if let Ok(files) = parsed {
                for (path, _) in files {
                    prop_assert!(poolkeeper_core::files::is_plain_relative(std::path::Path::new(&path)), "{}", path);
                    prop_assert!(!path.is_empty());
                }
            }
        }

        #[test]
        fn archive_paths_stay_inside(names in proptest::collection::vec("[a-z./]{1,20}", 1..5)) {
            let mut b = tar::Builder::new(Vec::new());
            for n in &names {
                let mut h = tar::Header::new_gnu();
                h.set_mode(0o644);
                h.set_size(1);
                h.set_entry_type(tar::EntryType::Regular);
                let bytes = n.as_bytes();
                h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
                h.set_cksum();
                b.append(&h, &b"x"[..]).expect("append");
            }
            let archive = b.into_inner().expect("tar");
            if let Ok(files) = poolkeeper_core::files::parse_tar(&archive[..], "fuzz") {
                for (path, _) in files {
                    prop_assert!(poolkeeper_core::files::is_plain_relative(std::path::Path::new(&path)), "{}", path);
                    prop_assert!(!path.is_empty());
                }
            }
        }
    }
}
