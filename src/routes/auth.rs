//! Service-key authentication for the internal API: `Authorization: Bearer tvk_...`, looked up by SHA-256.

use std::sync::Arc;

use actix_web::HttpRequest;
use actix_web::http::header;

use super::AppState;
use crate::domain::ServiceKey;
use crate::domain::service_key::SERVICE_KEY_PREFIX;
use crate::error::ApiError;
use crate::store::api_client::ApiClient;

/// The digest of the service key in the `Authorization` header, or 401 if there is none of the right shape.
/// Only the digest leaves this function: the key itself is never stored, logged or passed on.
pub fn presented_key(request: &HttpRequest) -> Result<[u8; 32], ApiError> {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|key| key.starts_with(SERVICE_KEY_PREFIX) && key.len() <= 128)
        .map(ServiceKey::digest)
        .ok_or(ApiError::Unauthenticated)
}

/// The client whose key hashes to `digest`, or 401. Keys are looked up by digest (in memory, else the
/// database index), so no timing difference reveals how much of a guessed key was right.
pub async fn authenticate(digest: &[u8; 32], state: &AppState) -> Result<Arc<ApiClient>, ApiError> {
    let client = state.directory.client(digest).await?.ok_or(ApiError::Unauthenticated)?;
    client.usage.mark();
    Ok(client)
}

/// The client if it is an admin; 401 without a valid key, 403 with a non-admin one.
pub async fn authenticate_admin(digest: &[u8; 32], state: &AppState) -> Result<Arc<ApiClient>, ApiError> {
    let client = authenticate(digest, state).await?;
    if !client.admin {
        return Err(ApiError::Forbidden("this route needs an admin key".into()));
    }
    // What this request changes is audited as done by this client.
    crate::request_context::set_actor(format!("client:{}", client.name));
    Ok(client)
}
