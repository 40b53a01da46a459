use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// One audit record of a verified callback. Never holds a credential.
pub struct CallbackEvent<'a> {
    pub event_type: &'a str,
    pub app_id: Option<&'a str>,
    pub account_id: Option<&'a str>,
    pub outcome: &'a str,
    pub identity_issued_at: Option<DateTime<Utc>>,
}

pub async fn record(conn: &mut PgConnection, event: &CallbackEvent<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "insert into callback_event (event_type, app_id, account_id, outcome, identity_issued_at)
         values ($1, $2, $3, $4, $5)",
    )
    .bind(event.event_type)
    .bind(event.app_id)
    .bind(event.account_id)
    .bind(event.outcome)
    .bind(event.identity_issued_at)
    .execute(conn)
    .await
    .map(drop)
}
