//! Idempotency keys: a POST that carries an `Idempotency-Key` header and is repeated (a client
//! retrying after a timeout) answers with the object the first request made instead of making
//! another. A key is bound to the caller, the route and the request's hash.

use super::{now, Db, Result};

/// How long a key is remembered.
const KEPT_SECS: i64 = 24 * 3600;

/// What a key already stands for.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct IdempotentRequest {
    request_sha256: String,
    object_id: String,
}

/// What claiming a key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyClaim {
    /// The key is now bound to this request's object: go on and make it.
    Bound,
    /// The same request came before: answer with the object it made.
    Repeat { object_id: String },
    /// The key was used with a different request: refuse.
    Reused,
}

impl Db {
    /// Binds `key` to `object_id` unless it is bound already, and says which it was. The one
    /// helper every idempotent POST goes through.
    pub(crate) async fn claim_idempotency_key(
        &self,
        scope: &str,
        route: &str,
        key: &str,
        request_sha256: &str,
        object_id: &str,
    ) -> Result<KeyClaim> {
        // a key is remembered for a day (as OpenAI's are); the caller's older ones go first
        sqlx::query(&self.sql(
            "DELETE FROM idempotency_keys WHERE scope = ? AND route = ? AND created_at < ?::timestamptz",
        ))
        .bind(scope)
        .bind(route)
        .bind(super::in_seconds(-KEPT_SECS))
        .execute(&self.pool)
        .await?;
        let done = sqlx::query(&self.sql(
            "INSERT INTO idempotency_keys (scope, route, key, request_sha256, object_id, created_at)
             VALUES (?, ?, ?, ?, ?, ?::timestamptz) ON CONFLICT DO NOTHING",
        ))
        .bind(scope)
        .bind(route)
        .bind(key)
        .bind(request_sha256)
        .bind(object_id)
        .bind(now())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(KeyClaim::Bound);
        }
        let first: Option<IdempotentRequest> = sqlx::query_as(&self.sql(
            "SELECT request_sha256, object_id FROM idempotency_keys
             WHERE scope = ? AND route = ? AND key = ?",
        ))
        .bind(scope)
        .bind(route)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match first {
            // released between the insert and this read (its request failed): go on unbound,
            // as a request without a key would
            None => KeyClaim::Bound,
            Some(first) if first.request_sha256 == request_sha256 => KeyClaim::Repeat {
                object_id: first.object_id,
            },
            Some(_) => KeyClaim::Reused,
        })
    }

    /// Frees a key whose request failed, so that a retry can succeed.
    pub(crate) async fn release_idempotency_key(
        &self,
        scope: &str,
        route: &str,
        key: &str,
    ) -> Result<()> {
        sqlx::query(
            &self.sql("DELETE FROM idempotency_keys WHERE scope = ? AND route = ? AND key = ?"),
        )
        .bind(scope)
        .bind(route)
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
