//! The replay memory of identity JWTs (`identity_replay`): one token, one message.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// What the memory says of a token delivering a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Never seen: now remembered (within the caller's transaction).
    First,
    /// Seen with the same body: a retry of a message already committed.
    SameBody,
    /// Seen with another body: a captured token used for another message.
    OtherBody,
}

/// Remembers `token_sha256` delivering `body_sha256` until `expires_at`, or says how it was seen before.
/// A concurrent delivery of the same token waits on the row until this transaction ends, then sees it.
pub async fn remember(
    conn: &mut PgConnection,
    token_sha256: &[u8; 32],
    body_sha256: &[u8; 32],
    expires_at: DateTime<Utc>,
) -> sqlx::Result<Seen> {
    let inserted = sqlx::query(
        "insert into identity_replay (token_sha256, body_sha256, expires_at) values ($1, $2, $3)
         on conflict on constraint identity_replay_pkey do nothing",
    )
    .bind(&token_sha256[..])
    .bind(&body_sha256[..])
    .bind(expires_at)
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(Seen::First);
    }
    let first_body: Vec<u8> = sqlx::query_scalar("select body_sha256 from identity_replay where token_sha256 = $1")
        .bind(&token_sha256[..])
        .fetch_one(conn)
        .await?;
    Ok(if first_body == body_sha256 { Seen::SameBody } else { Seen::OtherBody })
}

/// Forgets tokens that have expired: they cannot verify any more.
pub async fn delete_expired(conn: &mut PgConnection) -> sqlx::Result<u64> {
    Ok(sqlx::query("delete from identity_replay where expires_at < now()").execute(conn).await?.rows_affected())
}
