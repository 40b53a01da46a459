//! `POST /callbacks/trackunit`: verify first, parse after. The order of checks is part of the contract:
//! 415 content type, 413 size, 401/503 identity, 400 body, 401 claim/body mismatch, 403 app, then store.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use secrecy::SecretString;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{AppState, body, openapi};
use crate::domain::TextField;
use crate::error::ApiError;
use crate::identity::{IdentityError, VerifiedIdentity, VerifyError};
use crate::installs::{self, ApplyError, CallbackMessage, Delivery, Outcome};
use crate::rate_limit::PerSecond;

/// Largest callback body accepted. A real one is a few hundred bytes.
pub const MAX_CALLBACK_BYTES: usize = 64 * 1024;
const IDENTITY_HEADER: &str = "Trackunit-Identity";
/// How long Trackunit should wait when our signing keys are not loaded yet.
pub(super) const KEYS_RETRY_AFTER_SECS: u64 = 5;
/// Refused callbacks logged per second at most; the rest are counted (anyone can send refused callbacks).
static REFUSALS_LOGGED: PerSecond = PerSecond::new(5);
/// Longest attacker-controlled text put in a log field.
const LONGEST_LOGGED_FIELD: usize = 64;

#[utoipa::path(
    post,
    path = "/callbacks/trackunit",
    operation_id = "receiveTrackunitCallback",
    tag = "public",
    summary = "Trackunit's app-install callback",
    description = "Trackunit sends this when an account installs or uninstalls the app. Checks, in this order: \
                   `Content-Type` (415), size (413), the `Trackunit-Identity` JWT (401, or 503 while no JWKS is \
                   loaded), the body (400), the JWT's `irisAppId`/`accountId` claims against the body (401), \
                   `TOKENVAULT_APPS` (403). The change is committed before the answer.",
    params(("Trackunit-Identity" = String, Header,
            description = "A JWT (compact JWS, optionally prefixed `Bearer `) signed by a key in Trackunit's \
                           marketplace JWKS.")),
    request_body(content = openapi::CallbackMessage, content_type = "application/json", examples(
        ("INSTALLED" = (value = json!({"type": "INSTALLED", "irisAppId": "@acme/fleet-insights",
                                       "accountId": "7b1c5e0a-acme", "clientId": "example-client-id",
                                       "clientSecret": "example-client-secret"}))),
        ("UNINSTALLED" = (value = json!({"type": "UNINSTALLED", "irisAppId": "@acme/fleet-insights",
                                         "accountId": "7b1c5e0a-acme"}))),
        ("another type" = (value = json!({"type": "APP_UPDATED"}))),
    )),
    responses(
        (status = 204, description = "`INSTALLED` or `UNINSTALLED` was handled: stored, unchanged, stale (older \
                                      than what is stored), uninstalled, or unknown to tokenvault."),
        (status = 202, description = "A verified message of another type: recorded, nothing stored."),
        openapi::CallbackProblems,
    ),
)]
#[tracing::instrument(skip_all, fields(callback.type, app.id, account.id, callback.outcome))]
pub async fn trackunit(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let result = receive(&request, payload, &state).await;
    let label = match &result {
        Ok((outcome, _)) => outcome.label(),
        Err(error) => error.code(),
    };
    tracing::Span::current().record("callback.outcome", label);
    metrics::counter!("tokenvault_callbacks_total", "outcome" => label).increment(1);
    match &result {
        Ok(_) => tracing::info!("callback handled"),
        Err(ApiError::Internal(_)) => {}
        Err(error) => match REFUSALS_LOGGED.allow() {
            Some(suppressed) => tracing::warn!(error = %error, suppressed, "callback refused"),
            None => {
                metrics::counter!("tokenvault_log_lines_suppressed_total", "event" => "callback_refused").increment(1)
            }
        },
    }
    let (_, status) = result?;
    Ok(HttpResponse::build(status).finish())
}

/// The HTTP part, on the actix worker: content type, body, identity header. The rest is offloaded.
async fn receive(
    request: &HttpRequest,
    payload: web::Payload,
    state: &web::Data<AppState>,
) -> Result<(Outcome, StatusCode), ApiError> {
    body::require_json(request)?;
    let raw = body::read(request, payload, MAX_CALLBACK_BYTES).await?;

    let header = request.headers().get(IDENTITY_HEADER).ok_or(ApiError::MissingIdentity)?;
    let header = header
        .to_str()
        .map_err(|_| ApiError::InvalidIdentity(crate::identity::IdentityError::Malformed("the header is not ASCII")))?;
    if header.trim().is_empty() {
        return Err(ApiError::MissingIdentity);
    }
    let (header, state_for_task) = (header.to_owned(), web::Data::clone(state));
    super::offload(state, async move { handle(&header, raw, &state_for_task).await }).await
}

/// Verify, parse, authorise, store. Answers the outcome and the status that says it (a retry gets the
/// status of the message it repeats).
async fn handle(
    header: &str,
    raw: zeroize::Zeroizing<Vec<u8>>,
    state: &AppState,
) -> Result<(Outcome, StatusCode), ApiError> {
    let identity = state.identity.verify(header).await.map_err(|error| match error {
        VerifyError::Invalid(error) => ApiError::InvalidIdentity(error),
        VerifyError::KeysUnavailable => ApiError::IdentityKeysUnavailable { retry_after_secs: KEYS_RETRY_AFTER_SECS },
        VerifyError::KeyNotYetKnown { retry_after } => {
            // Whole seconds, rounded up: retrying a moment too early would be answered the same.
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            ApiError::IdentityKeysUnavailable { retry_after_secs: secs.max(1) }
        }
    })?;
    state.claim_names.note(&identity.claim_names, &state.runtime);

    let message = parse(&raw)?;
    let body_sha256: [u8; 32] = Sha256::digest(&raw[..]).into();
    drop(raw);
    let span = tracing::Span::current();
    let (app_id, account_id) = match &message {
        CallbackMessage::Installed { app_id, account_id, .. } | CallbackMessage::Uninstalled { app_id, account_id } => {
            span.record("app.id", truncated(app_id.as_str(), LONGEST_LOGGED_FIELD))
                .record("account.id", truncated(account_id.as_str(), LONGEST_LOGGED_FIELD));
            (Some(app_id.as_str()), Some(account_id.as_str()))
        }
        CallbackMessage::Other { message_type } => {
            span.record("callback.type", truncated(message_type.as_str(), LONGEST_LOGGED_FIELD));
            (None, None)
        }
    };
    if app_id.is_some() {
        identity.check_subject(app_id, account_id).map_err(ApiError::InvalidIdentity)?;
    }
    if let (Some(allowed), Some(app_id)) = (&state.apps, app_id)
        && !allowed.contains(app_id)
    {
        return Err(ApiError::AppNotAllowed);
    }

    let delivery = delivery(header, &identity, body_sha256, state.identity.policy().leeway_secs);
    let outcome =
        installs::apply(&state.pool, &state.keys, &message, &delivery).await.map_err(|error| match error {
            ApplyError::Replayed => ApiError::InvalidIdentity(IdentityError::ReplayedWithOtherBody),
            ApplyError::Database(error) => error.into(),
        })?;
    if let Some(id) = outcome.changed_installation() {
        // This replica drops its copies now; the others on the NOTIFY the row change triggers.
        state.broker.forget(id);
        if let Some(account_id) = account_id {
            state.directory.forget_account(account_id);
        }
    }
    let status = match message {
        CallbackMessage::Other { .. } => StatusCode::ACCEPTED,
        _ => StatusCode::NO_CONTENT,
    };
    Ok((outcome, status))
}

/// What the replay memory and the watermark need of the verified token: it is known by its `jti` when it
/// has one, else by the whole compact token; it is remembered until it could no longer verify.
fn delivery(header: &str, identity: &VerifiedIdentity, body_sha256: [u8; 32], leeway_secs: i64) -> Delivery {
    let mut digest = Sha256::new();
    match &identity.jti {
        Some(jti) => digest.update(format!("jti:{jti}")),
        None => digest.update(format!("jwt:{}", crate::identity::strip_bearer(header))),
    }
    let expires_at = identity.expires_at.saturating_add(leeway_secs);
    Delivery {
        token_sha256: digest.finalize().into(),
        body_sha256,
        issued_at: identity.issued_at.and_then(|secs| chrono::DateTime::from_timestamp(secs, 0)),
        remember_until: chrono::DateTime::from_timestamp(expires_at, 0)
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC),
    }
}

/// `value` cut to at most `max` characters, for attacker-controlled text in a log field.
fn truncated(value: &str, max: usize) -> &str {
    match value.char_indices().nth(max) {
        Some((at, _)) => &value[..at],
        None => value,
    }
}

/// Parses a callback body: a JSON object (no duplicate keys) whose `type` selects the fields required.
fn parse(raw: &[u8]) -> Result<CallbackMessage, ApiError> {
    let bad = |detail: String| ApiError::InvalidRequest(detail);
    let value = crate::strict_json::from_slice(raw)
        .map_err(|e| bad(format!("the body is not valid JSON: {}", json_reason(&e))))?;
    let Value::Object(object) = value else {
        return Err(bad("the body must be a JSON object".into()));
    };
    let field = |name: &'static str| text_field(&object, name);
    let message_type = field("type")?;
    Ok(match message_type.as_str() {
        "INSTALLED" => CallbackMessage::Installed {
            app_id: field("irisAppId")?,
            account_id: field("accountId")?,
            client_id: SecretString::from(field("clientId")?.as_str().to_owned()),
            client_secret: SecretString::from(field("clientSecret")?.as_str().to_owned()),
        },
        "UNINSTALLED" => CallbackMessage::Uninstalled { app_id: field("irisAppId")?, account_id: field("accountId")? },
        _ => CallbackMessage::Other { message_type: message_type.as_str().to_owned() },
    })
}

/// serde_json's error category and position only: its message may quote input, which may be a secret.
fn json_reason(error: &serde_json::Error) -> String {
    format!("{:?} error at line {} column {}", error.classify(), error.line(), error.column())
}

fn text_field(object: &Map<String, Value>, name: &'static str) -> Result<TextField, ApiError> {
    let value = object.get(name).ok_or_else(|| ApiError::InvalidRequest(format!("`{name}` is missing")))?;
    let Value::String(text) = value else {
        return Err(ApiError::InvalidRequest(format!("`{name}` must be a string")));
    };
    TextField::parse(text.as_str()).map_err(|e| ApiError::InvalidRequest(format!("`{name}` {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_installed_and_ignores_extra_fields() {
        let body = br#"{"type":"INSTALLED","irisAppId":"@o/a","accountId":"acc","clientId":"id","clientSecret":"s","extra":1}"#;
        assert!(matches!(parse(body), Ok(CallbackMessage::Installed { .. })));
    }

    #[test]
    fn refuses_wrong_types_missing_fields_and_duplicates() {
        for body in [
            &br#"{"type":"INSTALLED","irisAppId":"@o/a","accountId":7,"clientId":"id","clientSecret":"s"}"#[..],
            br#"{"type":"INSTALLED","irisAppId":"@o/a","accountId":"acc","clientId":"id"}"#,
            br#"{"type":"INSTALLED","type":"OTHER"}"#,
            br#"{"type":"INSTALLED","irisAppId":"@o/a","accountId":"a\u0000b","clientId":"id","clientSecret":"s"}"#,
            br#"[]"#,
            b"\xff\xfe",
        ] {
            assert!(matches!(parse(body), Err(ApiError::InvalidRequest(_))), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn logged_fields_are_cut_on_character_boundaries() {
        assert_eq!(truncated("héllo", 2), "hé");
        assert_eq!(truncated("hi", 5), "hi");
    }

    #[test]
    fn error_details_never_quote_the_body() {
        let body = br#"{"type":"INSTALLED","clientSecret":"s3cret-value" oops}"#;
        let Err(ApiError::InvalidRequest(detail)) = parse(body) else { panic!("expected a 400") };
        assert!(!detail.contains("s3cret"), "{detail}");
    }

    proptest! {
        #[test]
        fn fuzz_any_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }
    }
}
