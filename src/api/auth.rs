//! API keys: who is calling. With keys configured every `/v1` route needs
//! `Authorization: Bearer <key>`, and the key's fingerprint is the owner of what it creates.
//! Keys are compared in constant time; failed attempts are logged and, past a few a minute from
//! one address with one key prefix (or with no key), answered 429. A valid key is never refused
//! for failures: many tenants behind one proxy share an address, and one of them trying wrong
//! keys must not lock the others out.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::state::AppState;

/// Who is calling: the fingerprint of their API key, or `None` when keys are off.
#[derive(Clone)]
pub(crate) struct Owner(pub Option<String>);

impl Owner {
    pub fn as_deref(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

/// The fingerprint that stands for an API key in the database (the key itself is never stored).
pub(crate) fn key_fingerprint(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// Whether `presented` is one of `known`, in time that does not depend on where they differ:
/// both sides are hashed to 32 bytes and every byte of every key is compared.
fn key_matches(known: &[String], presented: &str) -> bool {
    let p = Sha256::digest(presented.as_bytes());
    known.iter().fold(false, |found, k| {
        let k = Sha256::digest(k.as_bytes());
        let diff = k.iter().zip(p.iter()).fold(0u8, |d, (a, b)| d | (a ^ b));
        found | (diff == 0)
    })
}

/// Failed authentications within the current minute, per client address and the first
/// characters of the key it presented (what tells one tenant's mistakes from another's), and
/// per address in all.
#[derive(Default)]
pub(crate) struct FailedAuth(Mutex<HashMap<(IpAddr, String), (Instant, u32)>>);

/// Failures from one address with one key prefix allowed per minute before it is answered 429.
const FAILURES_PER_MINUTE: u32 = 20;
/// Failures from one address in all (any prefixes) allowed per minute.
const ADDRESS_FAILURES_PER_MINUTE: u32 = 300;
const WINDOW: Duration = Duration::from_secs(60);

/// What stands for a presented key in the count: its first 8 characters (API keys are random
/// beyond any fixed prefix, so these tell tenants apart without keeping the key).
fn prefix(presented: Option<&str>) -> String {
    presented.map_or_else(String::new, |k| k.chars().take(8).collect())
}

impl FailedAuth {
    /// Seconds until a wrong key from `ip` with `presented`'s prefix may be tried again, if
    /// it is over its allowance.
    fn blocked(&self, ip: IpAddr, presented: Option<&str>) -> Option<u64> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let over = |key: &(IpAddr, String), limit: u32| {
            let (start, count) = map.get(key)?;
            let left = WINDOW.checked_sub(start.elapsed())?;
            (*count >= limit).then(|| left.as_secs().max(1))
        };
        over(&(ip, prefix(presented)), FAILURES_PER_MINUTE)
            .or_else(|| over(&(ip, "*".into()), ADDRESS_FAILURES_PER_MINUTE))
    }

    fn record(&self, ip: IpAddr, presented: Option<&str>) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            map.retain(|_, (start, _)| start.elapsed() < WINDOW);
        }
        for key in [(ip, prefix(presented)), (ip, "*".to_string())] {
            let entry = map.entry(key).or_insert((Instant::now(), 0));
            if entry.0.elapsed() >= WINDOW {
                *entry = (Instant::now(), 0);
            }
            entry.1 += 1;
        }
    }
}

/// `Authorization: Bearer <key>`, the scheme in any case (RFC 7235).
fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

pub async fn authenticate(
    State((state, failures)): State<(AppState, Arc<FailedAuth>)>,
    mut req: Request,
    next: Next,
) -> Response {
    let owner = if state.config.api_keys.is_empty() {
        None
    } else {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let presented = bearer(&req);
        if let Some(k) = presented.filter(|k| key_matches(&state.config.api_keys, k)) {
            Some(key_fingerprint(k))
        } else {
            if let Some(wait) = peer.and_then(|ip| failures.blocked(ip, presented)) {
                let mut resp = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_failed_authentications",
                    "too many requests with a wrong API key from this address; try again later",
                )
                .into_response();
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(wait));
                return resp;
            }
            if let Some(ip) = peer {
                failures.record(ip, presented);
            }
            tracing::warn!(
                peer = ?peer,
                path = %req.uri().path(),
                key_given = presented.is_some(),
                "authentication failed"
            );
            let mut resp = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid API key is required: Authorization: Bearer <key>",
            )
            .into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"qtune\""),
            );
            return resp;
        }
    };
    req.extensions_mut().insert(Owner(owner));
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_only_exactly() {
        let known = vec!["alpha".to_string(), "beta".to_string()];
        assert!(key_matches(&known, "beta"));
        assert!(!key_matches(&known, "bet"));
        assert!(!key_matches(&known, "betaa"));
        assert!(!key_matches(&[], "beta"));
    }
}
