//! What a browser could be made to send, and what every response carries.
//!
//! - `Host` must be one this server answers to ([`HostPolicy`]): a page on another site that
//!   re-points its own name at 127.0.0.1 (DNS rebinding) is refused.
//! - A write (any method but GET, HEAD, OPTIONS) from another origin is refused: browsers send
//!   `Origin` (and `Sec-Fetch-Site`) on cross-origin requests, and a form on any web page can post
//!   to a localhost server without asking.
//! - Every error body has the documented JSON shape, including the ones axum writes itself (a bad
//!   path parameter, 405); every response says `nosniff`; the dashboard's pages forbid framing,
//!   foreign scripts and referrers.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// The `Host` values this server answers to; `None`: any (a non-loopback listener with no list
/// configured, behind a proxy that checks it).
#[derive(Debug, Clone)]
pub(crate) struct HostPolicy {
    allowed: Option<Vec<String>>,
}

impl HostPolicy {
    /// `configured` (QTUNE_ALLOWED_HOSTS) when given; else, on a loopback listener, its own
    /// names with the port it is bound to.
    pub fn new(configured: &[String], bound: std::net::SocketAddr) -> HostPolicy {
        let configured: Vec<String> = configured
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        if !configured.is_empty() {
            return HostPolicy {
                allowed: Some(configured),
            };
        }
        if !bound.ip().is_loopback() {
            return HostPolicy { allowed: None };
        }
        let port = bound.port();
        let mut names = Vec::new();
        for host in ["127.0.0.1", "localhost", "[::1]"] {
            names.push(format!("{host}:{port}"));
            if port == 80 {
                names.push(host.to_string());
            }
        }
        HostPolicy {
            allowed: Some(names),
        }
    }

    fn allows(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        match &self.allowed {
            None => true,
            // an entry without a port allows that name on any port
            Some(list) => list.iter().any(|a| {
                *a == host || (!a.contains(':') && host.split(':').next() == Some(a.as_str()))
            }),
        }
    }
}

fn forbidden(message: impl Into<String>) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message).into_response()
}

/// Refuses requests for other hosts and cross-origin writes.
pub(crate) async fn browser_checks(
    State(hosts): State<Arc<HostPolicy>>,
    req: Request,
    next: Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    match &host {
        Some(h) if hosts.allows(h) => {}
        Some(h) => {
            return ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "unknown_host",
                format!("this server does not answer for host {h:?} (QTUNE_ALLOWED_HOSTS)"),
            )
            .into_response()
        }
        None if hosts.allowed.is_some() => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "unknown_host",
                "a Host header is required",
            )
            .into_response()
        }
        None => {}
    }
    let write = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if write {
        let site = req
            .headers()
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok());
        if matches!(site, Some("cross-site" | "same-site")) {
            return forbidden("cross-origin writes are refused");
        }
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("null");
            let origin_host = origin
                .split_once("://")
                .map(|(_, rest)| rest.trim_end_matches('/'))
                .unwrap_or("");
            let same = host
                .as_deref()
                .is_some_and(|h| h.eq_ignore_ascii_case(origin_host));
            if !same {
                return forbidden(format!(
                    "cross-origin writes are refused (Origin {origin:?})"
                ));
            }
        }
    }
    next.run(req).await
}

/// Requests that hold a server's resources for long (uploads being received, exports being
/// made): at most `all` at once, and at most `per_key` of them for one API key, so that one
/// tenant cannot take every slot. A request that finds none free is answered 429 at once.
pub(crate) struct Slots {
    /// What the slots are for, in the answer: `uploads`, `exports`.
    what: &'static str,
    code: &'static str,
    all: Arc<tokio::sync::Semaphore>,
    per_key: usize,
    by_key: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// A slot held; it comes back when dropped.
pub(crate) struct Slot {
    _key: Option<KeySlot>,
    _all: tokio::sync::OwnedSemaphorePermit,
}

impl Slots {
    fn new(what: &'static str, code: &'static str, all: usize, per_key: usize) -> Arc<Slots> {
        let all = all.max(1);
        Arc::new(Slots {
            what,
            code,
            all: Arc::new(tokio::sync::Semaphore::new(all)),
            per_key: per_key.clamp(1, all),
            by_key: Default::default(),
        })
    }

    /// Uploads: a quarter of the server's slots per key.
    pub(crate) fn uploads(all: usize) -> Arc<Slots> {
        Slots::new("uploads", "too_many_uploads", all, all.max(1).div_ceil(4))
    }

    /// Exports read and write whole models (CPU, memory, disk for minutes): one per key.
    pub(crate) fn exports(all: usize) -> Arc<Slots> {
        Slots::new("exports", "too_many_exports", all, 1)
    }

    /// A slot for `owner` (`None`: a server without keys), or the 429 that says which bound
    /// is reached.
    pub(crate) fn take(self: &Arc<Self>, owner: Option<&str>) -> Result<Slot, ApiError> {
        let busy = |message: String| {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, self.code, message).retry_after(1)
        };
        let key = match owner {
            Some(key) => Some(self.take_key(key).ok_or_else(|| {
                busy(format!(
                    "this API key has {} {} in progress, as many as one key may; try again when one ends",
                    self.per_key, self.what
                ))
            })?),
            None => None,
        };
        let all = self.all.clone().try_acquire_owned().map_err(|_| {
            busy(format!(
                "the server has as many {} in progress as it takes at once; try again shortly",
                self.what
            ))
        })?;
        Ok(Slot {
            _key: key,
            _all: all,
        })
    }

    fn take_key(self: &Arc<Self>, key: &str) -> Option<KeySlot> {
        let mut by_key = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        let n = by_key.entry(key.to_string()).or_insert(0);
        if *n >= self.per_key {
            return None;
        }
        *n += 1;
        Some(KeySlot {
            slots: self.clone(),
            key: key.to_string(),
        })
    }
}

/// One key's slot; it comes back when dropped.
struct KeySlot {
    slots: Arc<Slots>,
    key: String,
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        let mut by_key = self.slots.by_key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_key.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                by_key.remove(&self.key);
            }
        }
    }
}

/// Admits an upload (a POST on the upload routes) into its [`Slots`], or answers 429 at once.
pub(crate) async fn bound_uploads(
    State(slots): State<Arc<Slots>>,
    req: Request,
    next: Next,
) -> Response {
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    let owner = req
        .extensions()
        .get::<super::Owner>()
        .and_then(|o| o.as_deref().map(str::to_string));
    match slots.take(owner.as_deref()) {
        Ok(_slot) => next.run(req).await,
        Err(busy) => busy.into_response(),
    }
}

/// Gives every error the JSON shape and every response its security headers.
pub(crate) async fn response_shape(req: Request, next: Next) -> Response {
    let dashboard = matches!(req.uri().path(), "/" | "/assets/app.js" | "/assets/app.css");
    let method = req.method().clone();
    let mut resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        // axum's own rejections are text; keep their words, in the documented shape
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(std::mem::take(resp.body_mut()), 64 * 1024)
            .await
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).trim().to_string();
        let (code, message) = match status {
            StatusCode::METHOD_NOT_ALLOWED => (
                "method_not_allowed",
                format!("{method} is not allowed here"),
            ),
            StatusCode::PAYLOAD_TOO_LARGE => ("body_too_large", text),
            s if s.is_server_error() => ("internal_error", "internal error".to_string()),
            _ => ("invalid_request", text),
        };
        let mut shaped = ApiError::new(status, code, message).into_response();
        if let Some(allow) = headers.get(header::ALLOW) {
            shaped.headers_mut().insert(header::ALLOW, allow.clone());
        }
        resp = shaped;
    }
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if dashboard {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                 connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
                 frame-ancestors 'none'",
            ),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    resp
}
