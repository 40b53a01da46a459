//! The claim names verified identity JWTs carried (`identity_claim_set`): names only, never values.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// Records that a verified token carried `names` (sorted, comma-joined). Returns whether the set was new.
pub async fn record(pool: &PgPool, names: &str) -> sqlx::Result<bool> {
    let inserted: bool = sqlx::query_scalar(
        "insert into identity_claim_set (names) values ($1)
         on conflict on constraint identity_claim_set_pkey do update set last_seen_at = now()
         returning (xmax = 0)",
    )
    .bind(names)
    .fetch_one(pool)
    .await?;
    Ok(inserted)
}

/// One set of claim names, as `tokenvault identity claims` shows it.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct ClaimSet {
    pub names: String,
    pub first_seen_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
}

pub async fn list(pool: &PgPool) -> sqlx::Result<Vec<ClaimSet>> {
    sqlx::query_as("select names, first_seen_at, last_seen_at from identity_claim_set order by last_seen_at desc")
        .fetch_all(pool)
        .await
}
