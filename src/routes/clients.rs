//! Admin API over service keys, so operators need no database access: create (the key is answered once),
//! list, show, revoke and rotate (the old key kept for a grace period). Answers never hold a key.

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use super::{AppState, auth, body, openapi};
use crate::error::ApiError;
use crate::service_clients::{self, DEFAULT_ROTATION_GRACE, LONGEST_ROTATION_GRACE, NewClient};
use crate::store::api_client::{self, CreateError, Grants};

const MAX_CLIENT_BYTES: usize = 64 * 1024;

/// `POST /v1/clients`'s body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    name: String,
    #[serde(default)]
    accounts: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    apps: Vec<String>,
    #[serde(default)]
    providers: Vec<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// `POST /v1/clients/{name}/rotate`'s optional body.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateRequest {
    grace_seconds: Option<u64>,
}

fn bad_json(error: serde_json::Error) -> ApiError {
    // serde's message names a field or a type, never a value: these bodies hold no secret anyway.
    ApiError::InvalidRequest(format!(
        "the body is not valid: {}",
        error.to_string().chars().take(200).collect::<String>()
    ))
}

#[utoipa::path(
    post, path = "/v1/clients", operation_id = "createClient", tag = "internal", security(("service_key" = [])),
    summary = "Create a service client (admin only)",
    description = "Admin only. Answers the new key once (`key`); only its SHA-256 is stored. `apps` defaults to \
                   all (`*`), `providers` to `trackunit`; a non-admin client needs an account and a scope. A \
                   revoked client's name can be used again. Audited as `CLIENT_CREATED`.",
    request_body(content = openapi::ClientRequest, content_type = "application/json",
                 example = json!({"name": "billing", "accounts": ["*"], "scopes": ["asset.view"]})),
    responses(
        (status = 201, description = "Created; the key is shown this once.", body = openapi::CreatedClient),
        openapi::ClientProblems,
    ),
)]
pub async fn create(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let digest = auth::presented_key(&request)?;
    let body = match body::require_json(&request) {
        Ok(()) => body::read(&request, payload, MAX_CLIENT_BYTES).await,
        Err(error) => Err(error),
    };
    let task_state = state.clone();
    let answer = super::offload(&state, async move {
        auth::authenticate_admin(&digest, &task_state).await?;
        let request: CreateRequest = parse(&body?)?;
        let grants = Grants {
            accounts: request.accounts,
            scopes: request.scopes,
            apps: request.apps,
            providers: request.providers,
            admin: request.admin,
        };
        let new = NewClient::new(request.name, grants, request.expires_at).map_err(ApiError::InvalidRequest)?;
        let (client, key) = service_clients::create(&task_state.pool, &new).await.map_err(|error| match error {
            CreateError::NameTaken(_) => ApiError::NameTaken,
            CreateError::Database(error) => error.into(),
        })?;
        let view = api_client::by_name(&task_state.pool, &client.name).await?.ok_or(ApiError::NotFound)?;
        let mut answer = serde_json::to_value(view).map_err(|e| ApiError::Internal(e.into()))?;
        answer["key"] = json!(key.expose());
        Ok(answer)
    })
    .await?;
    Ok(no_store(HttpResponse::Created()).json(answer))
}

/// Answers holding a key must not be cached anywhere.
fn no_store(mut builder: actix_web::HttpResponseBuilder) -> actix_web::HttpResponseBuilder {
    builder.insert_header(("Cache-Control", "no-store"));
    builder
}

/// A strict JSON body (no duplicate keys) of shape `T`.
fn parse<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
    let value = crate::strict_json::from_slice(raw)
        .map_err(|_| ApiError::InvalidRequest("the body is not valid JSON (or repeats a key)".into()))?;
    serde_json::from_value(value).map_err(bad_json)
}

#[utoipa::path(
    get, path = "/v1/clients", operation_id = "listClients", tag = "internal", security(("service_key" = [])),
    summary = "Every service client (admin only)",
    description = "Admin only. Revoked ones included, with when each key was last used (to within a minute). \
                   Never a key.",
    responses((status = 200, description = "The clients.", body = openapi::ClientList), openapi::ListProblems),
)]
pub async fn list(request: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let digest = auth::presented_key(&request)?;
    let task_state = state.clone();
    let clients = super::offload(&state, async move {
        auth::authenticate_admin(&digest, &task_state).await?;
        Ok(api_client::list(&task_state.pool).await?)
    })
    .await?;
    Ok(HttpResponse::Ok().json(json!({ "clients": clients })))
}

#[utoipa::path(
    get, path = "/v1/clients/{name}", operation_id = "getClient", tag = "internal", security(("service_key" = [])),
    summary = "One service client (admin only)",
    params(("name" = String, Path, description = "The client's name (of a client that is not revoked).")),
    responses((status = 200, description = "The client.", body = openapi::ClientSummary), openapi::ClientNameProblems),
)]
pub async fn get(
    request: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let digest = auth::presented_key(&request)?;
    let (task_state, name) = (state.clone(), path.into_inner());
    let client = super::offload(&state, async move {
        auth::authenticate_admin(&digest, &task_state).await?;
        api_client::by_name(&task_state.pool, &name).await?.ok_or(ApiError::NotFound)
    })
    .await?;
    Ok(HttpResponse::Ok().json(client))
}

#[utoipa::path(
    delete, path = "/v1/clients/{name}", operation_id = "revokeClient", tag = "internal", security(("service_key" = [])),
    summary = "Revoke a service client (admin only)",
    description = "Admin only. Its keys stop working on every replica within milliseconds. Audited as \
                   `CLIENT_REVOKED`.",
    params(("name" = String, Path, description = "The client's name.")),
    responses((status = 204, description = "Revoked."), openapi::ClientNameProblems),
)]
pub async fn revoke(
    request: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let digest = auth::presented_key(&request)?;
    let (task_state, name) = (state.clone(), path.into_inner());
    super::offload(&state, async move {
        auth::authenticate_admin(&digest, &task_state).await?;
        if service_clients::revoke(&task_state.pool, &name).await? { Ok(()) } else { Err(ApiError::NotFound) }
    })
    .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(
    post, path = "/v1/clients/{name}/rotate", operation_id = "rotateClient", tag = "internal",
    security(("service_key" = [])),
    summary = "Give a service client a new key (admin only)",
    description = "Admin only. Answers the new key once; the old key keeps working for `grace_seconds` \
                   (default 86400, at most 30 days) so callers can roll over; a key still in the grace of an \
                   earlier rotation stops now. The body is optional. Audited as `CLIENT_ROTATED`.",
    params(("name" = String, Path, description = "The client's name.")),
    request_body(content = Option<openapi::RotateRequest>, content_type = "application/json",
                 example = json!({"grace_seconds": 3600})),
    responses((status = 200, description = "Rotated; the new key is shown this once.", body = openapi::CreatedClient),
               openapi::ClientNameProblems),
)]
pub async fn rotate(
    request: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let digest = auth::presented_key(&request)?;
    let declared_body = request.headers().contains_key("content-type");
    let body = match declared_body {
        true => match body::require_json(&request) {
            Ok(()) => body::read(&request, payload, MAX_CLIENT_BYTES).await.map(Some),
            Err(error) => Err(error),
        },
        false => Ok(None),
    };
    let (task_state, name) = (state.clone(), path.into_inner());
    let answer = super::offload(&state, async move {
        auth::authenticate_admin(&digest, &task_state).await?;
        let rotation: RotateRequest = match body? {
            Some(raw) if !raw.is_empty() => parse(&raw)?,
            _ => RotateRequest::default(),
        };
        let grace = rotation.grace_seconds.map_or(DEFAULT_ROTATION_GRACE, std::time::Duration::from_secs);
        if grace > LONGEST_ROTATION_GRACE {
            return Err(ApiError::InvalidRequest("`grace_seconds` must be at most 2592000 (30 days)".into()));
        }
        let key = service_clients::rotate(&task_state.pool, &name, grace).await?.ok_or(ApiError::NotFound)?;
        let view = api_client::by_name(&task_state.pool, &name).await?.ok_or(ApiError::NotFound)?;
        let mut answer = serde_json::to_value(view).map_err(|e| ApiError::Internal(e.into()))?;
        answer["key"] = json!(key.expose());
        Ok(answer)
    })
    .await?;
    Ok(no_store(HttpResponse::Ok()).json(answer))
}
