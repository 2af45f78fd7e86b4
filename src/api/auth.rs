//! API keys: who is calling. With keys configured every `/v1` route needs
//! `Authorization: Bearer <key>`, and the key's fingerprint is the owner of what it creates.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::state::AppState;

/// Who is calling: the fingerprint of their API key, or `None` when keys are off.
#[derive(Clone)]
pub struct Owner(pub Option<String>);

impl Owner {
    pub fn as_deref(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

/// The fingerprint that stands for an API key in the database (the key itself is never stored).
pub fn key_fingerprint(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let owner = if state.config.api_keys.is_empty() {
        None
    } else {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(k) if state.config.api_keys.iter().any(|known| known == k) => {
                Some(key_fingerprint(k))
            }
            _ => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a valid API key is required: Authorization: Bearer <key>",
                )
                .into_response()
            }
        }
    };
    req.extensions_mut().insert(Owner(owner));
    next.run(req).await
}
