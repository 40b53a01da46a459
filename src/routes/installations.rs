//! Admin API over installations. Lists show ids, app, account, status and timestamps: never a secret or
//! a client id.

use actix_web::{HttpRequest, HttpResponse, web};
use uuid::Uuid;

use super::{AppState, auth};
use crate::error::ApiError;
use crate::installs;
use crate::store::installation;

pub async fn list(request: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    auth::authenticate_admin(&request, &state).await?;
    let installations = installation::list(&state.pool).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "installations": installations })))
}

pub async fn revoke(
    request: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    auth::authenticate_admin(&request, &state).await?;
    let id = Uuid::parse_str(&path).map_err(|_| ApiError::InstallationNotFound)?;
    let account_id = installs::revoke(&state.pool, id).await?.ok_or(ApiError::InstallationNotFound)?;
    state.broker.forget(id);
    state.directory.forget_account(&account_id);
    tracing::info!(installation.id = %id, "installation revoked");
    Ok(HttpResponse::NoContent().finish())
}
