//! `GET /v1/audit`: the audit trail, newest first, in pages (admin only). Never a secret.

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use super::{AppState, auth, openapi};
use crate::error::ApiError;
use crate::store::audit::{self, Filter};

const DEFAULT_PAGE: i64 = 100;
const LONGEST_PAGE: i64 = 1000;

/// `GET /v1/audit`'s query.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only records of this account.
    account_id: Option<String>,
    /// Only records of this provider.
    provider: Option<String>,
    /// Only records of this action (e.g. `INSTALLED`, `CREDENTIALS_REGISTERED`, `CLIENT_ROTATED`).
    action: Option<String>,
    /// RFC 3339: only records at or after.
    #[param(value_type = Option<String>, format = DateTime)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// RFC 3339: only records before.
    #[param(value_type = Option<String>, format = DateTime)]
    until: Option<chrono::DateTime<chrono::Utc>>,
    /// The `next` cursor of the previous page.
    before: Option<i64>,
    /// Records per page, 1 to 1000 (default 100).
    limit: Option<i64>,
}

#[utoipa::path(
    get, path = "/v1/audit", operation_id = "listAudit", tag = "internal", security(("service_key" = [])),
    summary = "The audit trail (admin only)",
    description = "Admin only. Every change of who can get what: installs (stored, unchanged, stale, retried, \
                   refused replays), uninstalls, revokes, rejections, probes and reactivations, credentials \
                   registered, replaced or deleted, service keys created, rotated, revoked or expired, encryption \
                   key rotations. Each names its actor (`callback`, `cli`, `prober`, `client:<name>`), action, \
                   target, outcome and request id. Newest first; `next` is the cursor (`before`) of the next page, \
                   null on the last. Kept for TOKENVAULT_AUDIT_RETENTION_DAYS.",
    params(AuditQuery),
    responses((status = 200, description = "A page of records.", body = openapi::AuditPage), openapi::AuditProblems),
)]
pub async fn list(request: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let digest = auth::presented_key(&request)?;
    let query = web::Query::<AuditQuery>::from_query(request.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::InvalidRequest(format!("the query is not valid: {e}")));
    let task_state = state.clone();
    let (events, limit) = super::offload(&state, async move {
        auth::authenticate_admin(&digest, &task_state).await?;
        let query = query?;
        let limit = query.limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=LONGEST_PAGE).contains(&limit) {
            return Err(ApiError::InvalidRequest(format!("`limit` must be from 1 to {LONGEST_PAGE}")));
        }
        let filter = Filter {
            account_id: query.account_id,
            provider: query.provider,
            action: query.action,
            since: query.since,
            until: query.until,
            before: query.before,
            limit,
        };
        Ok((audit::list(&task_state.pool, &filter).await?, limit))
    })
    .await?;
    let next = (events.len() as i64 == limit).then(|| events.last().map(|e| e.id)).flatten();
    Ok(HttpResponse::Ok().json(json!({ "events": events, "next": next })))
}
