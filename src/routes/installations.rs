//! Admin API over installations. Lists show ids, app, account, status and timestamps: never a secret or
//! a client id.

use actix_web::{HttpRequest, HttpResponse, web};
use uuid::Uuid;

use super::{AppState, auth};
use crate::error::ApiError;
use crate::installs;
use crate::store::installation;

pub async fn list(request: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let digest = auth::presented_key(&request)?;
    let task_state = state.clone();
    let installations = super::offload(&state, async move {
        auth::authenticate_admin(&digest, &task_state).await?;
        Ok(installation::list(&task_state.pool).await?)
    })
    .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "installations": installations })))
}

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
