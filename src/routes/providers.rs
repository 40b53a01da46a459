//! Admin API over providers and the credentials registered at them (every provider but Trackunit, whose
//! credentials arrive by its callback). Answers never hold a secret, a client id or a refresh token.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::Value;

use super::{AppState, auth, body, openapi};
use crate::credentials::{self, NewCredentials, Registered};
use crate::domain::TextField;
use crate::error::ApiError;
use crate::store::installation::Summary;

/// Largest credentials body accepted: three fields of at most 8 KiB each, and JSON around them.
const MAX_CREDENTIALS_BYTES: usize = 32 * 1024;

#[utoipa::path(
    get,
    path = "/v1/providers",
    operation_id = "listProviders",
    tag = "internal",
    security(("service_key" = [])),
    summary = "Every provider's settings as loaded (admin only)",
    description = "Admin only. The built-in `trackunit` and each `[providers.NAME]` table of the settings file, \
                   with every default applied. Providers hold no secret.",
    responses(
        (status = 200, description = "The providers, by name.", body = Object,
         example = json!({"providers": [{"name": "trulioo", "token_url": "https://auth-api.trulioo.com/connect/token",
                          "client_auth": "client_secret_post", "default_scopes": ["workflow.studio.api"],
                          "scope_separator": " ", "send_scope": true, "extra_params": {},
                          "use_refresh_tokens": true,
                          "reply": {"access_token": "Token", "token_type": "TokenType", "expires_in": "ExpiresIn",
                                    "scope": "scope", "refresh_token": "refresh_token",
                                    "refresh_expires_in": "refresh_expires_in"},
                          "expiry_from_jwt": "earliest", "default_lifetime_secs": 300, "expiry_margin_secs": 30,
                          "credentials_from": "admin_api"}]})),
        openapi::ListProblems,
    ),
)]
pub async fn list(request: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let digest = auth::presented_key(&request)?;
    let task_state = state.clone();
    super::offload(&state, async move { auth::authenticate_admin(&digest, &task_state).await.map(drop) }).await?;
    let providers: Vec<&crate::provider::Provider> = state.providers.iter().map(|p| &**p).collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "providers": providers })))
}

/// What a credentials answer shows: never a secret.
#[derive(serde::Serialize)]
struct CredentialsAnswer<'a> {
    provider: &'a str,
    account_id: &'a str,
    status: &'a str,
    created_at: chrono::DateTime<chrono::Utc>,
    updated_at: chrono::DateTime<chrono::Utc>,
}

impl<'a> From<&'a Summary> for CredentialsAnswer<'a> {
    fn from(summary: &'a Summary) -> Self {
        Self {
            provider: &summary.provider,
            account_id: &summary.account_id,
            status: &summary.status,
            created_at: summary.created_at,
            updated_at: summary.updated_at,
        }
    }
}

/// The provider and account of a credentials path: 404 `unknown_provider`, 409 for Trackunit, 400 for an
/// account id that is not a text field.
fn credentials_target(state: &AppState, path: (String, String)) -> Result<(String, TextField), ApiError> {
    let (provider, account_id) = path;
    let found = state.providers.get(&provider).ok_or(ApiError::UnknownProvider)?;
    if found.is_trackunit() {
        return Err(ApiError::CredentialsFromCallback);
    }
    let account_id =
        TextField::parse(account_id).map_err(|e| ApiError::InvalidRequest(format!("the account id {e}")))?;
    Ok((provider, account_id))
}

#[utoipa::path(
    put,
    path = "/v1/providers/{provider}/accounts/{account_id}/credentials",
    operation_id = "putCredentials",
    tag = "internal",
    security(("service_key" = [])),
    summary = "Register or replace an account's credentials at a provider (admin only)",
    description = "Admin only. Sealed with AES-256-GCM, bound to the provider, account and field. Replacing them \
                   erases every token of the old credentials on every replica. With a `refresh_token` the \
                   credentials are user-delegated: every token is minted with the refresh token grant, and the \
                   refresh token is rotated and spent at most once. Trackunit's credentials arrive by its \
                   callback (409).",
    params(
        ("provider" = String, Path, description = "A provider other than `trackunit`."),
        ("account_id" = String, Path, description = "The account."),
    ),
    request_body(content = openapi::CredentialsRequest, content_type = "application/json",
                 example = json!({"client_id": "example-client-id", "client_secret": "example-client-secret"})),
    responses(
        (status = 201, description = "Registered.", body = openapi::CredentialsSummary,
         example = json!({"provider": "trulioo", "account_id": "acme", "status": "active",
                          "created_at": "2026-12-04T12:00:00.5Z", "updated_at": "2026-12-04T12:00:00.5Z"})),
        (status = 200, description = "Replaced.", body = openapi::CredentialsSummary),
        openapi::CredentialsProblems,
    ),
)]
pub async fn put(
    request: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let digest = auth::presented_key(&request)?;
    let body = match body::require_json(&request) {
        Ok(()) => body::read(&request, payload, MAX_CREDENTIALS_BYTES).await,
        Err(error) => Err(error),
    };
    let (task_state, path) = (state.clone(), path.into_inner());
    let (status, answer) = super::offload(&state, async move {
        auth::authenticate_admin(&digest, &task_state).await?;
        let (provider, account_id) = credentials_target(&task_state, path)?;
        let new = parse(&body?)?;
        let registered =
            credentials::register(&task_state.pool, &task_state.keys, &provider, account_id.as_str(), &new).await?;
        let (status, summary) = match &registered {
            Registered::Created(summary) => (StatusCode::CREATED, summary),
            Registered::Replaced(summary) => (StatusCode::OK, summary),
        };
        task_state.broker.forget(summary.id);
        task_state.directory.forget_account(account_id.as_str());
        tracing::info!(provider, account.id = %account_id, replaced = status == StatusCode::OK, "credentials registered");
        Ok((status, serde_json::to_value(CredentialsAnswer::from(summary)).map_err(|e| ApiError::Internal(e.into()))?))
    })
    .await?;
    Ok(HttpResponse::build(status).json(answer))
}

#[utoipa::path(
    delete,
    path = "/v1/providers/{provider}/accounts/{account_id}/credentials",
    operation_id = "deleteCredentials",
    tag = "internal",
    security(("service_key" = [])),
    summary = "Erase an account's credentials at a provider (admin only)",
    description = "Admin only. Erases the ciphertexts and every cached token; token requests then get 404 \
                   `not_installed` without an upstream call.",
    params(
        ("provider" = String, Path, description = "A provider other than `trackunit`."),
        ("account_id" = String, Path, description = "The account."),
    ),
    responses(
        (status = 204, description = "Erased."),
        openapi::CredentialsDeleteProblems,
    ),
)]
pub async fn delete(
    request: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let digest = auth::presented_key(&request)?;
    let (task_state, path) = (state.clone(), path.into_inner());
    super::offload(&state, async move {
        auth::authenticate_admin(&digest, &task_state).await?;
        let (provider, account_id) = credentials_target(&task_state, path)?;
        let id =
            credentials::erase(&task_state.pool, &provider, account_id.as_str()).await?.ok_or(ApiError::NotFound)?;
        task_state.broker.forget(id);
        task_state.directory.forget_account(account_id.as_str());
        tracing::info!(provider, account.id = %account_id, "credentials deleted");
        Ok(())
    })
    .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `{"client_id", "client_secret", "refresh_token"}`: strings, no duplicate keys, nothing else.
fn parse(raw: &[u8]) -> Result<NewCredentials, ApiError> {
    let bad = |detail: String| ApiError::InvalidRequest(detail);
    let value = crate::strict_json::from_slice(raw).map_err(|_| bad("the body is not valid JSON".into()))?;
    let Value::Object(mut object) = value else {
        return Err(bad("the body must be a JSON object".into()));
    };
    let mut field = |name: &str| match object.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(bad(format!("`{name}` must be a string"))),
    };
    let (client_id, client_secret, refresh_token) =
        (field("client_id")?, field("client_secret")?, field("refresh_token")?);
    if let Some(unknown) = object.keys().next() {
        let shown: String = unknown.chars().take(64).filter(|c| !c.is_control()).collect();
        return Err(bad(format!("unknown field `{shown}`")));
    }
    NewCredentials::new(client_id, client_secret, refresh_token).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_credentials_and_refuses_bad_shapes_without_quoting_secrets() {
        assert!(parse(br#"{"client_id":"id","client_secret":"s"}"#).is_ok());
        assert!(parse(br#"{"client_id":"id","refresh_token":"rt","client_secret":null}"#).is_ok());
        for body in [
            &br#"{"client_id":"id","client_secret":"s3cret","client_secret":"x"}"#[..],
            br#"{"client_id":"id","client_secret":7}"#,
            br#"{"client_id":"id","client_secret":"s3cret","extra":1}"#,
            br#"{"client_id":"id"}"#,
            br#"["s3cret"]"#,
            b"s3cret",
        ] {
            let Err(ApiError::InvalidRequest(detail)) = parse(body) else { panic!("accepted") };
            assert!(!detail.contains("s3cret"), "{detail}");
        }
    }

    proptest::proptest! {
        #[test]
        fn fuzz_any_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }
    }
}
