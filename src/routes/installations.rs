//! Admin API over installations. Lists show ids, app, account, status and timestamps: never a secret or
//! a client id.

use actix_web::{HttpRequest, HttpResponse, web};
use uuid::Uuid;

use super::{AppState, auth, openapi};
use crate::error::ApiError;
use crate::installs::{self, Reactivation};
use crate::store::installation;

/// `GET /v1/installations?provider=NAME`.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only the installations of this provider.
    provider: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/installations",
    operation_id = "listInstallations",
    tag = "internal",
    security(("service_key" = [])),
    summary = "Every installation (admin only)",
    description = "Admin only: needs a key made with `tokenvault clients create --admin`; another valid key gets \
                   403. Lists every installation (every account's credentials at every provider), oldest first, \
                   without credentials or client ids.",
    params(ListQuery),
    responses(
        (status = 200, description = "The installations.", body = openapi::InstallationList,
         example = json!({"installations": [{"id": "0b8e1f2a-5c3d-4e6f-8a9b-0c1d2e3f4a5b", "provider": "trackunit",
                                             "app_id": "@acme/fleet-insights", "account_id": "7b1c5e0a-acme",
                                             "status": "active", "created_at": "2026-11-22T12:00:00.123456Z",
                                             "updated_at": "2026-11-22T12:00:00.123456Z"}]})),
        openapi::ListProblems,
    ),
)]
pub async fn list(request: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let digest = auth::presented_key(&request)?;
    let query = web::Query::<ListQuery>::from_query(request.query_string())
        .map(|query| query.into_inner().provider)
        .map_err(|_| ApiError::InvalidRequest("the query may hold only `provider`".into()));
    let task_state = state.clone();
    let installations = super::offload(&state, async move {
        auth::authenticate_admin(&digest, &task_state).await?;
        let provider = query?;
        Ok(installation::list(&task_state.pool, provider.as_deref()).await?)
    })
    .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "installations": installations })))
}

#[utoipa::path(
    delete,
    path = "/v1/installations/{id}",
    operation_id = "revokeInstallation",
    tag = "internal",
    security(("service_key" = [])),
    summary = "Revoke an installation (admin only)",
    description = "Admin only: needs a key made with `tokenvault clients create --admin`; another valid key gets \
                   403. Erases the installation's credentials and cached tokens, sets its status to `revoked` and \
                   records the revoke. A later `INSTALLED` callback reactivates it only if its identity JWT was \
                   issued at or after the revoke.",
    params(("id" = String, Path, format = "uuid", description = "The installation's id.")),
    responses(
        (status = 204, description = "Revoked."),
        openapi::RevokeProblems,
    ),
)]
pub async fn revoke(
    request: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let digest = auth::presented_key(&request)?;
    let (task_state, path) = (state.clone(), path.into_inner());
    super::offload(&state, async move {
        auth::authenticate_admin(&digest, &task_state).await?;
        let id = Uuid::parse_str(&path).map_err(|_| ApiError::InstallationNotFound)?;
        let account_id = installs::revoke(&task_state.pool, id).await?.ok_or(ApiError::InstallationNotFound)?;
        task_state.broker.forget(id);
        task_state.directory.forget_account(&account_id);
        tracing::info!(installation.id = %id, "installation revoked");
        Ok(())
    })
    .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(
    post,
    path = "/v1/installations/{id}/reactivate",
    operation_id = "reactivateInstallation",
    tag = "internal",
    security(("service_key" = [])),
    summary = "Make a rejected installation active again (admin only)",
    description = "Admin only. An installation is `rejected` when the token endpoint answered `invalid_client`; it \
                   is probed again on a schedule and becomes active by itself when a probe mints. This makes it \
                   active at once, for an operator who knows the credentials work again. An active installation \
                   is answered as it is. Audited as `ADMIN_REACTIVATED`.",
    params(("id" = String, Path, format = "uuid", description = "The installation's id.")),
    responses(
        (status = 200, description = "The installation, now active.", body = openapi::InstallationSummary,
         example = json!({"id": "0b8e1f2a-5c3d-4e6f-8a9b-0c1d2e3f4a5b", "provider": "trackunit",
                          "app_id": "@acme/fleet-insights",
                          "account_id": "7b1c5e0a-acme", "status": "active",
                          "created_at": "2026-11-22T12:00:00.123456Z", "updated_at": "2026-11-22T12:05:00.5Z"})),
        openapi::ReactivateProblems,
    ),
)]
pub async fn reactivate(
    request: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let digest = auth::presented_key(&request)?;
    let (task_state, path) = (state.clone(), path.into_inner());
    let summary = super::offload(&state, async move {
        auth::authenticate_admin(&digest, &task_state).await?;
        let id = Uuid::parse_str(&path).map_err(|_| ApiError::InstallationNotFound)?;
        match installs::reactivate(&task_state.pool, id).await? {
            Reactivation::Reactivated { account_id } => {
                task_state.broker.forget(id);
                task_state.directory.forget_account(&account_id);
                tracing::info!(installation.id = %id, "installation reactivated by an operator");
            }
            Reactivation::AlreadyActive => {}
            Reactivation::NoCredentials => return Err(ApiError::NoCredentials),
            Reactivation::NotFound => return Err(ApiError::InstallationNotFound),
        }
        installation::summary(&task_state.pool, id).await?.ok_or(ApiError::InstallationNotFound)
    })
    .await?;
    Ok(HttpResponse::Ok().json(summary))
}
