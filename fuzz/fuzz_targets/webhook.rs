//! Reservation webhooks (`POST /webhooks/reservations`): fuzzed bodies sent correctly signed
//! (so that they reach the payload's parsing, the claim's naming and admission), and fuzzed
//! timestamp and signature headers. Never a 500, every refusal JSON; a bad signature is always
//! 401; the signature check agrees with signing; claim names are DNS labels.
#![no_main]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use libfuzzer_sys::fuzz_target;
use poolkeeper_fuzz::{Fields, WEBHOOK_SECRET, api};
use poolkeeper_http::webhook::{
    HEADER_SIGNATURE, HEADER_TIMESTAMP, SignatureError, claim_name, sign, unix_now, verify,
};

fuzz_target!(|data: &[u8]| {
    let mut f = Fields(data);
    let mode = f.byte();
    let timestamp = f.string();
    let signature = f.string();
    let body = f.rest().to_vec();
    let now = unix_now();

    // Signing and checking agree; a fuzzed signature verifies only if it is the right one.
    let good = sign(WEBHOOK_SECRET, now, &body);
    assert!(
        verify(
            WEBHOOK_SECRET,
            Some(&now.to_string()),
            Some(&good),
            &body,
            now
        )
        .is_ok()
    );
    let fuzzed = verify(
        WEBHOOK_SECRET,
        Some(&timestamp),
        Some(&signature),
        &body,
        now,
    );
    if let Ok(signed) = &fuzzed {
        let at = signed.at;
        assert_eq!(
            signed.key,
            sign(WEBHOOK_SECRET, at, &body),
            "a signature verified that signing does not make"
        );
    }

    // Whatever the names, a reservation's claim is a DNS label of at most 63 characters.
    if let Ok(event) = serde_json::from_slice::<poolkeeper_http::webhook::ReservationEvent>(&body) {
        let name = claim_name(&event.resource_name, &event.username);
        assert!(name.len() <= 63, "{name:?}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !name.ends_with('-'),
            "{name:?}"
        );
    }

    let (ts, sig) = if mode % 4 == 0 {
        (timestamp, signature)
    } else {
        // A fresh timestamp per request: the same body twice is then not a replay.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let at = now - 200 + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 400;
        (at.to_string(), sign(WEBHOOK_SECRET, at, &body))
    };
    let request = Request::post("/webhooks/reservations")
        .header("content-type", "application/json")
        .header(HEADER_TIMESTAMP, ts.as_str())
        .header(HEADER_SIGNATURE, sig.as_str())
        .body(Body::from(body));
    let Ok(request) = request else {
        return; // header values that HTTP cannot carry
    };
    let (status, _) = api().send(request);
    // (Not one outside the window: the handler's clock may have moved into it since.)
    if mode % 4 == 0
        && matches!(
            fuzzed,
            Err(SignatureError::Mismatch
                | SignatureError::Missing(_)
                | SignatureError::BadTimestamp)
        )
    {
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "a bad signature was not refused"
        );
    }
});
