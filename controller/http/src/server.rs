//! Serving the API under bounds ([`Limits`]): at most so many connections (one more is answered
//! 503 and closed), a request's headers within a time and a size, its body within a time and
//! the route's size; and every rejection, the framework's included, in the API's error shape
//! (`{"error": ...}`). Each refusal is counted (`poolkeeper_refusals_total{reason}`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use poolkeeper_engine::limits::{Limits, Refusal, Refusals};

use crate::error::ApiError;
use crate::{ApiState, BODY_LIMIT, UPLOAD_LIMIT};

/// The most hyper buffers of a request's head. Above [`Limits::max_header_bytes`], so that the
/// API's own check (with a JSON answer) refuses first; only a head beyond this gets hyper's bare
/// 431.
const MAX_HEAD_BUFFER: usize = 256 << 10;
/// The most header lines hyper parses; likewise above [`Limits::max_headers`].
const MAX_HEADER_LINES: usize = 256;

/// Serves `app` on `listener` until it fails.
pub(crate) async fn serve_connections(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    refusals: Arc<Refusals>,
) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut accept_errors = 0u64;
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors (EMFILE) and the like pass: wait a moment rather than spin.
                accept_errors += 1;
                if accept_errors.is_power_of_two() {
                    tracing::warn!(error = %e, times = accept_errors, "accepting a connection failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Without TCP_NODELAY, a small write after another (an event on the stream, an answer
        // sent in two parts) waits for the peer's delayed acknowledgement: up to 40 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on a connection");
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refusals.count(Refusal::TooManyConnections);
            tokio::spawn(refuse_connection(tcp, limits.max_connections));
            continue;
        };
        // The client's address, for those that limit per address (the console's sign-in).
        let service = hyper_util::service::TowerToHyperService::new(
            tower::ServiceBuilder::new()
                .map_request(move |mut r: axum::http::Request<hyper::body::Incoming>| {
                    r.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                    r
                })
                .service(app.clone()),
        );
        let (header_timeout, refusals) = (limits.header_timeout, refusals.clone());
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(MAX_HEAD_BUFFER)
                .max_headers(MAX_HEADER_LINES);
            let served = http
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .with_upgrades()
                .await;
            if let Err(e) = served {
                if e.is_timeout() {
                    refusals.count(Refusal::HeaderTimeout);
                    tracing::debug!("a client did not send its request's headers in time");
                } else {
                    tracing::debug!(error = %e, "a connection ended with an error");
                }
            }
            drop(slot);
        });
    }
}

/// Answers a connection over the limit with a JSON 503, then closes it.
async fn refuse_connection(mut tcp: TcpStream, max: usize) {
    let body = serde_json::json!({
        "error": format!("too many connections (at most {max}, --max-connections); try again")
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        // What the client sent first is read, so that closing does not reset the connection
        // under the answer.
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut buf)).await;
        let _ = tcp.write_all(answer.as_bytes()).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

/// The request's bounds (headers' size, the body's time) and the answers' shape: a rejection
/// made by the framework (a body over the limit, a wrong content type, an unreadable path, a
/// method not allowed) is answered as the API's own errors are.
pub(crate) async fn guard(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let limits = &state.limits;
    let head_bytes: usize = request
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    let lines = request.headers().len();
    if head_bytes > limits.max_header_bytes || lines > limits.max_headers {
        state.refusals.count(Refusal::HeadersTooLarge);
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request's headers are too large ({lines} lines, {head_bytes} bytes; at most \
                 {} lines and {} bytes)",
                limits.max_headers, limits.max_header_bytes
            ),
        )
        .into_response();
    }
    let limit = body_limit(request.method(), request.uri().path());
    // A body declared larger than the route takes is refused before any of it is read.
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large(&state, limit);
    }
    // Who asks is in the headers: an API request without a valid token is answered before any
    // of its body is read, so that holding bodies open (16 MiB uploads, 1 MiB JSON, each for up
    // to --body-timeout) takes a token.
    let path = request.uri().path();
    if path.starts_with("/api/v1/")
        && let Err(e) = crate::auth::who(&state, request.headers())
    {
        return e.into_response();
    }
    // The console's upload (16 MiB) likewise, by its session.
    if path.starts_with("/ui/")
        && path.ends_with("/files")
        && crate::console::live_session(&state, request.headers())
            .await
            .is_none()
    {
        return ApiError::new(StatusCode::UNAUTHORIZED, "not signed in").into_response();
    }
    let timed_out = Arc::new(AtomicBool::new(false));
    let request = {
        let timed_out = timed_out.clone();
        let every = limits.body_timeout;
        request.map(move |b| Body::new(TimedBody::new(b, every, timed_out)))
    };
    let response = next.run(request).await;
    if timed_out.load(Ordering::Relaxed) {
        state.refusals.count(Refusal::BodyTimeout);
        return ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request's body did not arrive within {} s (--body-timeout)",
                limits.body_timeout.as_secs_f64()
            ),
        )
        .into_response();
    }
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return too_large(&state, limit);
    }
    as_api_error(response).await
}

fn too_large(state: &ApiState, limit: usize) -> Response {
    state.refusals.count(Refusal::BodyTooLarge);
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request's body is larger than this endpoint takes ({limit} bytes)"),
    )
    .into_response()
}

/// The body size a route takes (the uploads' own, the API's and the console's, or every other
/// route's).
fn body_limit(method: &axum::http::Method, path: &str) -> usize {
    use axum::http::Method;
    if (method == Method::PUT || method == Method::POST) && path.ends_with("/files") {
        UPLOAD_LIMIT
    } else {
        BODY_LIMIT
    }
}

/// An error answer that is not JSON (the framework's plain text, or nothing) made JSON, its
/// text the message; its status and other headers (`Allow`, say) kept.
async fn as_api_error(response: Response) -> Response {
    let status = response.status();
    let is_json_or_page = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json") || t.starts_with("text/html"));
    // The console's pages (HTML) say their refusals themselves.
    if !(status.is_client_error() || status.is_server_error()) || is_json_or_page {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // The framework's texts are short; a longer body is cut, not buffered whole.
    let text =
        match http_body_util::BodyExt::collect(http_body_util::Limited::new(body, 4096)).await {
            Ok(c) => String::from_utf8_lossy(&c.to_bytes()).trim().to_owned(),
            Err(_) => String::new(),
        };
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("refused")
            .to_lowercase()
    } else {
        text
    };
    let json = serde_json::json!({ "error": message }).to_string();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(json))
}

/// A request body that fails once its time is up (from when the request's headers were in),
/// noting so in `timed_out`.
struct TimedBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timed_out: Arc<AtomicBool>,
}

impl TimedBody {
    fn new(inner: Body, within: Duration, timed_out: Arc<AtomicBool>) -> Self {
        TimedBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(within)),
            timed_out,
        }
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(axum::Error::new(
                "the body did not arrive in time",
            ))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
