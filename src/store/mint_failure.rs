//! The last failed mint of a key (`mint_failure`), shared by every replica, so a replica that waited for a
//! failing mint answers with its failure instead of calling the token endpoint again.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// A recorded failure, as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MintFailureRow {
    pub failures: i32,
    pub retry_at: DateTime<Utc>,
    /// `unavailable`, `failed`, `rejected` or `invalid_scope`.
    pub kind: String,
    pub http_status: Option<i32>,
    pub error_code: Option<String>,
    /// For `failed`: how many attempts the mint made.
    pub attempts: Option<i32>,
}

/// The recorded failure of a key, and whether it was recorded within the last `recent` (while the caller
/// waited for the key's lock: it is then the outcome of the mint the caller waited for).
pub async fn get(
    conn: &mut PgConnection,
    installation_id: Uuid,
    scope_key: &str,
    recent: std::time::Duration,
) -> sqlx::Result<Option<(MintFailureRow, bool)>> {
    #[derive(sqlx::FromRow)]
    struct Found {
        #[sqlx(flatten)]
        row: MintFailureRow,
        recent: bool,
    }
    let found: Option<Found> = sqlx::query_as(
        "select failures, retry_at, kind, http_status, error_code, attempts,
             updated_at >= clock_timestamp() - make_interval(secs => $3) as recent
         from mint_failure where installation_id = $1 and scope_key = $2",
    )
    .bind(installation_id)
    .bind(scope_key)
    .bind(recent.as_secs_f64())
    .fetch_optional(conn)
    .await?;
    Ok(found.map(|found| (found.row, found.recent)))
}

/// Records a failure (replacing the last one): `row.failures` counts it already.
pub async fn put(
    conn: &mut PgConnection,
    installation_id: Uuid,
    scope_key: &str,
    row: &MintFailureRow,
) -> sqlx::Result<()> {
    sqlx::query(
        // clock_timestamp, not now(): the failure happened at the end of a transaction that began before
        // the upstream call, and waiters compare it with how long they waited.
        "insert into mint_failure (installation_id, scope_key, failures, retry_at, kind, http_status, error_code,
             attempts, updated_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8, clock_timestamp())
         on conflict on constraint mint_failure_pkey do update set
             failures = excluded.failures, retry_at = excluded.retry_at, kind = excluded.kind,
             http_status = excluded.http_status, error_code = excluded.error_code, attempts = excluded.attempts,
             updated_at = clock_timestamp()",
    )
    .bind(installation_id)
    .bind(scope_key)
    .bind(row.failures)
    .bind(row.retry_at)
    .bind(&row.kind)
    .bind(row.http_status)
    .bind(&row.error_code)
    .bind(row.attempts)
    .execute(conn)
    .await
    .map(drop)
}

pub async fn delete(conn: &mut PgConnection, installation_id: Uuid, scope_key: &str) -> sqlx::Result<()> {
    sqlx::query("delete from mint_failure where installation_id = $1 and scope_key = $2")
        .bind(installation_id)
        .bind(scope_key)
        .execute(conn)
        .await
        .map(drop)
}

/// Forgets an installation's failures: its credentials changed, or an operator reactivated it.
pub async fn delete_for_installation(conn: &mut PgConnection, installation_id: Uuid) -> sqlx::Result<()> {
    sqlx::query("delete from mint_failure where installation_id = $1")
        .bind(installation_id)
        .execute(conn)
        .await
        .map(drop)
}
