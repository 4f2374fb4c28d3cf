//! The HTTP API's requests: a fuzzed method, route, name, query, headers and body, sent with
//! the user's, the admin's, a wrong or no token. Never a 500, never a panic, every refusal a
//! JSON object with an `error` (the oracle in `poolkeeper_fuzz::check`).
#![no_main]

use axum::body::Body;
use axum::http::Request;
use libfuzzer_sys::fuzz_target;
use poolkeeper_fuzz::{ADMIN_TOKEN, Fields, USER_TOKEN, api};

const ROUTES: &[&str] = &[
    "/api/v1/claims",
    "/api/v1/claims/{}",
    "/api/v1/claims/{}/files",
    "/api/v1/pools/{}/scale",
    "/api/v1/pools/{}/reinitialise",
    "/api/v1/users/{}",
    "/api/v1/users/{}/release",
    "/api/v1/{}",
    "/api/v1/pools/{}",
    "/webhooks/reservations",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/{}",
];

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];

const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "application/x-tar",
    "multipart/form-data; boundary=b",
    "text/plain",
    "application/json; charset=utf-8",
];

fuzz_target!(|data: &[u8]| {
    let mut f = Fields(data);
    let method = METHODS[usize::from(f.byte()) % METHODS.len()];
    let route = ROUTES[usize::from(f.byte()) % ROUTES.len()];
    let name: String = f
        .string()
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '?' && c != '#' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let query = f.string();
    let auth = match f.byte() % 4 {
        0 => Some(format!("Bearer {USER_TOKEN}")),
        1 => Some(format!("Bearer {ADMIN_TOKEN}")),
        2 => Some(f.string()),
        _ => None,
    };
    let content_type = match f.byte() {
        b if usize::from(b) < CONTENT_TYPES.len() * 40 => {
            Some(CONTENT_TYPES[usize::from(b) % CONTENT_TYPES.len()].to_owned())
        }
        b if b % 2 == 0 => Some(f.string()),
        _ => None,
    };
    let body = f.rest().to_vec();

    let mut uri = route.replace("{}", &name);
    // The event stream never ends: not fuzzed here.
    if uri.starts_with("/api/v1/events") {
        return;
    }
    if !query.is_empty() {
        uri.push('?');
        uri.push_str(&query);
    }
    let mut request = Request::builder().method(method).uri(uri.as_str());
    if let Some(a) = &auth {
        request = request.header("authorization", a.as_str());
    }
    if let Some(c) = &content_type {
        request = request.header("content-type", c.as_str());
    }
    let Ok(request) = request.body(Body::from(body)) else {
        return; // a URI or header HTTP cannot carry: never reaches the API
    };
    api().send(request);
});
