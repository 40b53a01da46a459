//! The audit trail (`audit_event`): one row for each change of who can get what, whoever made it. Never a
//! secret, a client id or a token. The actor and the request come from `request_context` unless given.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// One audit record. Build it with [`AuditEvent::new`] and the setters that apply.
#[derive(Debug, Clone, Default)]
pub struct AuditEvent<'a> {
    pub action: &'a str,
    pub outcome: &'a str,
    /// Who did it, when the request context does not say (background work).
    pub actor: Option<&'a str>,
    pub provider: Option<&'a str>,
    pub app_id: Option<&'a str>,
    pub account_id: Option<&'a str>,
    pub installation_id: Option<Uuid>,
    pub client_name: Option<&'a str>,
    pub identity_issued_at: Option<DateTime<Utc>>,
}

impl<'a> AuditEvent<'a> {
    pub fn new(action: &'a str, outcome: &'a str) -> Self {
        Self { action, outcome, ..Self::default() }
    }
}

pub async fn record(conn: &mut PgConnection, event: &AuditEvent<'_>) -> sqlx::Result<()> {
    let context = crate::request_context::current();
    let actor =
        event.actor.map(str::to_owned).or(context.actor.map(|a| a.to_string())).unwrap_or_else(|| "tokenvault".into());
    sqlx::query(
        "insert into audit_event (action, outcome, actor, provider, app_id, account_id, installation_id,
             client_name, identity_issued_at, request_id)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(event.action)
    .bind(event.outcome)
    .bind(actor)
    .bind(event.provider)
    .bind(event.app_id)
    .bind(event.account_id)
    .bind(event.installation_id)
    .bind(event.client_name)
    .bind(event.identity_issued_at)
    .bind(context.request_id.as_deref())
    .execute(conn)
    .await
    .map(drop)
}

/// An audit record as listed.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Recorded {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub outcome: String,
    pub provider: Option<String>,
    pub app_id: Option<String>,
    pub account_id: Option<String>,
    pub installation_id: Option<Uuid>,
    pub client_name: Option<String>,
    pub request_id: Option<String>,
}

/// What `GET /v1/audit` and `tokenvault audit list` filter by.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub account_id: Option<String>,
    pub provider: Option<String>,
    pub action: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Only records older than this id (the cursor of the previous page).
    pub before: Option<i64>,
    pub limit: i64,
}

/// Newest first.
pub async fn list(pool: &PgPool, filter: &Filter) -> sqlx::Result<Vec<Recorded>> {
    sqlx::query_as(
        "select id, at, actor, action, outcome, provider, app_id, account_id, installation_id, client_name,
             request_id
         from audit_event
         where ($1::text is null or account_id = $1) and ($2::text is null or provider = $2)
             and ($3::text is null or action = $3) and ($4::timestamptz is null or at >= $4)
             and ($5::timestamptz is null or at < $5) and ($6::bigint is null or id < $6)
         order by id desc limit $7",
    )
    .bind(&filter.account_id)
    .bind(&filter.provider)
    .bind(&filter.action)
    .bind(filter.since)
    .bind(filter.until)
    .bind(filter.before)
    .bind(filter.limit)
    .fetch_all(pool)
    .await
}

/// Deletes records older than `days` days.
pub async fn prune(conn: &mut PgConnection, days: u32) -> sqlx::Result<u64> {
    let deleted = sqlx::query("delete from audit_event where at < now() - make_interval(days => $1)")
        .bind(i32::try_from(days).unwrap_or(i32::MAX))
        .execute(conn)
        .await?;
    Ok(deleted.rows_affected())
}
