//! `POST /v1/tokens`: hands an access token for an account at a provider to an internal service allowed
//! to have it. Checks, in this order: 401 key, 400 body, 403 grant (provider, account, app, scopes), 404
//! (unknown provider, then no installation), 409 ambiguity, then the upstream.

use std::borrow::Cow;
use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};

use super::{AppState, auth, body, openapi, repeat};
use crate::broker::{BrokerError, UpstreamError};
use crate::domain::{ScopeSet, TextField};
use crate::error::ApiError;
use crate::provider::{Provider, Providers, TRACKUNIT};
use crate::store::api_client::ApiClient;
use crate::store::installation::Installation;

pub(super) const MAX_REQUEST_BYTES: usize = 64 * 1024;
const DEFAULT_MIN_TTL_SECS: u64 = 60;
/// A day: longer than any access token lives, so anything above is a mistake.
const LONGEST_MIN_TTL_SECS: u64 = 86_400;

/// A checked token request.
struct TokenRequest {
    /// The provider, or the name asked for when no provider has it (404 once the grants are checked).
    provider: Result<std::sync::Arc<Provider>, String>,
    account_id: TextField,
    app_id: Option<TextField>,
    /// The scopes to ask for: those requested, or the provider's defaults when none were.
    scopes: ScopeSet,
    min_ttl: Duration,
}

impl TokenRequest {
    fn provider_name(&self) -> &str {
        match &self.provider {
            Ok(provider) => &provider.name,
            Err(name) => name,
        }
    }
}

#[utoipa::path(
    post,
    path = "/v1/tokens",
    operation_id = "issueToken",
    tag = "internal",
    security(("service_key" = [])),
    summary = "An access token for an account at a provider",
    description = "Hands out a token from memory, else from the shared database cache, else freshly minted by \
                   the provider's token endpoint (`trackunit` unless `provider` says). Checks, in this order: the \
                   service key (401), the body (415, 413, 400), the key's provider, account, app and scope grants \
                   (403), the provider (404 `unknown_provider`), the installation (404 `not_installed`, 409), \
                   then the token endpoint (422, 502, 503). A token granted scopes beyond the request goes only \
                   to keys granted all of them (403). After a transient failure, a token that has not expired may \
                   be answered instead, with less than `min_ttl_seconds` left.",
    request_body(content = openapi::TokenRequest, content_type = "application/json",
                 example = json!({"account_id": "7b1c5e0a-acme", "scopes": ["asset.view"], "min_ttl_seconds": 120})),
    responses(
        (status = 200, description = "The token.", body = openapi::TokenAnswer,
         headers(("Cache-Control" = String, description = "`no-store`"), ("Pragma" = String, description = "`no-cache`")),
         example = json!({"access_token": "eyJ…", "token_type": "Bearer", "expires_in": 3542,
                          "expires_at": "2026-11-22T13:05:00Z", "scope": "asset.view"})),
        openapi::TokenProblems,
    ),
)]
// DEBUG, not INFO: this is the hot path, and building a span per request costs as much as the rest of a
// cache hit. Refusals and failures are still logged as WARN events.
#[tracing::instrument(level = "debug", skip_all, fields(client.name, account.id, installation.id))]
pub async fn issue(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let result = receive(&request, payload, &state).await;
    match &result {
        Ok(_) => SERVED.increment(1),
        Err(error) => metrics::counter!("tokenvault_token_requests_total", "outcome" => error.code()).increment(1),
    }
    result
}

/// The counter of successful token requests, registered once: a registry lookup per request costs about
/// as much as a cache hit's other bookkeeping, and this is the hot path.
static SERVED: std::sync::LazyLock<metrics::Counter> =
    std::sync::LazyLock::new(|| metrics::counter!("tokenvault_token_requests_total", "outcome" => "ok"));

/// The HTTP part, on the actix worker: key header, body, response. The rest is offloaded.
async fn receive(
    request: &HttpRequest,
    payload: web::Payload,
    state: &web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let digest = auth::presented_key(request)?;
    // Read the body whatever the key; its errors are answered only once the key is known good (401 first).
    let body = match body::require_json(request) {
        Ok(()) => body::read(request, payload, MAX_REQUEST_BYTES).await,
        Err(error) => Err(error),
    };
    let token = match cached_token(&digest, &body, state) {
        Some(token) => token,
        None => {
            let state_for_task = web::Data::clone(state);
            // Boxed: the full path's future is large, and unboxed it would make every request's future
            // (allocated and moved per request by actix) that large too, cache hits included.
            let work = Box::pin(async move { issue_token(&digest, body, &state_for_task).await });
            super::offload(state, work).await?
        }
    };

    // The answer was serialized when the token was made; only `expires_in` is written here. Header values
    // are static, so none is parsed or copied per request.
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .insert_header((header::PRAGMA, HeaderValue::from_static("no-cache")))
        .content_type(HeaderValue::from_static("application/json"))
        .body(token.answer_json(chrono::Utc::now())))
}

/// The hot path, on the worker and all in memory: a request seen before (see [`repeat`]), or else a
/// cached client, a valid body, the grants, a cached installation and a token fresh enough. Any doubt
/// gives `None`, and the full path (offloaded) decides, errors included, so all paths answer alike.
fn cached_token(
    digest: &[u8; 32],
    body: &Result<zeroize::Zeroizing<Vec<u8>>, ApiError>,
    state: &AppState,
) -> Option<std::sync::Arc<crate::broker::Token>> {
    let body = body.as_ref().ok()?;
    // Read before any lookup: if anything changes while we look, what we find is not remembered.
    let generation = state.directory.generation();
    if let Some(token) = repeat::replay(state, generation, digest, body) {
        return Some(token);
    }
    let client = state.directory.cached_client(digest)?;
    client.usage.mark();
    let wanted = parse(body, &state.providers).ok()?;
    authorize(&client, &wanted).ok()?;
    let provider = wanted.provider.as_ref().ok()?;
    let app_id = wanted.app_id.as_ref().map(TextField::as_str);
    let (token, lease) = state.broker.cached(
        &provider.name,
        wanted.account_id.as_str(),
        app_id,
        &wanted.scopes,
        wanted.min_ttl,
        |app| client.may_use_app(app),
    )?;
    // A token granted more than was asked: the full path decides (and refuses a caller not granted it all).
    if !token.extra_scopes().is_empty() && beyond_grant(&client, &token).is_some() {
        return None;
    }
    record_on_span(&client, lease.installation());
    repeat::learn(state, generation, digest, body, client, lease);
    Some(token)
}

/// Names the client, account and installation on the request's span (a repeated request too).
pub(super) fn record_on_span(client: &ApiClient, installation: &Installation) {
    let span = tracing::Span::current();
    span.record("client.name", client.name.as_str()).record("account.id", installation.account_id.as_str());
    span.record("installation.id", tracing::field::display(installation.id));
}

/// 403 unless `client` is granted the provider, the account, the app when one is named, and every scope
/// (whether or not the account is installed, or the provider exists).
fn authorize(client: &ApiClient, wanted: &TokenRequest) -> Result<(), ApiError> {
    if !client.may_use_provider(wanted.provider_name()) {
        return Err(ApiError::Forbidden("this key is not granted this provider".into()));
    }
    if !client.may_access_account(wanted.account_id.as_str()) {
        return Err(ApiError::Forbidden("this key is not granted this account".into()));
    }
    if let Some(app_id) = &wanted.app_id
        && !client.may_use_app(app_id.as_str())
    {
        return Err(ApiError::Forbidden("this key is not granted this app".into()));
    }
    if let Some(scope) = wanted.scopes.iter().find(|s| !client.may_request_scope(s)) {
        return Err(ApiError::Forbidden(format!("this key is not granted the scope {scope:?}")));
    }
    Ok(())
}

async fn issue_token(
    digest: &[u8; 32],
    body: Result<zeroize::Zeroizing<Vec<u8>>, ApiError>,
    state: &AppState,
) -> Result<std::sync::Arc<crate::broker::Token>, ApiError> {
    let client = auth::authenticate(digest, state).await?;
    let span = tracing::Span::current();
    span.record("client.name", client.name.as_str());
    let raw = body?;
    let wanted = parse(&raw, &state.providers)?;
    span.record("account.id", wanted.account_id.as_str());
    authorize(&client, &wanted)?;
    let provider = wanted.provider.as_ref().map_err(|_| ApiError::UnknownProvider)?;

    let broker = &state.broker;
    let app_id = wanted.app_id.as_ref().map(TextField::as_str);
    // Twice at most: an installation that changed while the request waited for a mint is looked up again.
    let mut looked_up = 0;
    let token = loop {
        looked_up += 1;
        let installation = broker
            .resolve(&provider.name, wanted.account_id.as_str(), app_id, |app| client.may_use_app(app))
            .await
            .map_err(broker_error)?;
        span.record("installation.id", tracing::field::display(installation.id));
        match broker.token(&installation, &wanted.scopes, wanted.min_ttl).await {
            Err(BrokerError::Changed) if looked_up < 2 => continue,
            other => break other.map_err(broker_error)?,
        }
    };
    if let Some(extra) = beyond_grant(&client, &token) {
        metrics::counter!("tokenvault_token_scope_exceeded_total").increment(1);
        tracing::warn!(
            client.name = %client.name,
            extra_scopes = %extra,
            "the token endpoint granted scopes beyond the request that this key is not granted; token withheld"
        );
        return Err(ApiError::Forbidden(format!("the token endpoint granted scopes this key is not granted: {extra}")));
    }
    Ok(token)
}

/// The scopes `token` carries beyond its request that `client` is not granted, space-joined (shown only
/// when they are valid scope-tokens; each is at most 256 characters).
fn beyond_grant(client: &ApiClient, token: &crate::broker::Token) -> Option<String> {
    let missing: Vec<&str> = token
        .extra_scopes()
        .iter()
        .map(|scope| &**scope)
        .filter(|scope| !client.may_request_scope(scope))
        .map(|scope| if crate::domain::Scope::parse(scope).is_ok() { scope } else { "(unprintable scope)" })
        .collect();
    (!missing.is_empty()).then(|| missing.join(" "))
}

fn broker_error(error: BrokerError) -> ApiError {
    match error {
        BrokerError::NotInstalled | BrokerError::Changed => ApiError::NotInstalled,
        BrokerError::UnknownProvider => ApiError::UnknownProvider,
        BrokerError::AmbiguousApp => ApiError::AmbiguousApp,
        BrokerError::AppNotGranted => {
            ApiError::Forbidden("this key is not granted the app of this installation".into())
        }
        BrokerError::PreviouslyRejected | BrokerError::Upstream(UpstreamError::InvalidClient) => {
            ApiError::UpstreamRejected("the credentials were refused (invalid_client or invalid_grant)".into())
        }
        BrokerError::Upstream(UpstreamError::InvalidGrant) => {
            ApiError::UpstreamRejected("the grant was refused (invalid_grant)".into())
        }
        BrokerError::CredentialsUnreadable(_) => ApiError::CredentialsUnreadable,
        BrokerError::Upstream(UpstreamError::InvalidScope) => ApiError::InvalidScope,
        BrokerError::Upstream(UpstreamError::Rejected { status, error }) => {
            ApiError::UpstreamRejected(format!("HTTP {status}, {error}"))
        }
        BrokerError::Upstream(UpstreamError::Failed { attempts, reason }) => {
            tracing::warn!(attempts, reason, "upstream failed");
            ApiError::UpstreamError { attempts, reason }
        }
        BrokerError::Upstream(UpstreamError::Unavailable { retry_after, reason }) => {
            tracing::warn!(reason, "upstream unavailable");
            ApiError::UpstreamUnavailable { retry_after_secs: retry_after.as_secs().max(1) }
        }
        BrokerError::Database(error) => ApiError::from_database(error),
    }
}

/// The body as sent. Deserialized straight from the bytes, borrowing where it can: this runs on every
/// request of the hot path. serde refuses a repeated known field; unknown fields are ignored.
#[derive(serde::Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow, default)]
    provider: Option<Cow<'a, str>>,
    #[serde(borrow)]
    account_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    app_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    scopes: Option<Vec<Cow<'a, str>>>,
    #[serde(default)]
    min_ttl_seconds: Option<serde_json::Number>,
}

fn parse(raw: &[u8], providers: &Providers) -> Result<TokenRequest, ApiError> {
    let bad = |detail: String| ApiError::InvalidRequest(detail);
    let request: RawRequest<'_> =
        serde_json::from_slice(raw).map_err(|e| bad(format!("the body is not a valid token request: {e}")))?;
    let text = |name: &str, value: &str| TextField::parse(value).map_err(|e| bad(format!("`{name}` {e}")));
    let name = request.provider.as_deref().unwrap_or(TRACKUNIT);
    if !crate::settings::valid_provider_name(name) {
        return Err(bad("`provider` must match [a-z][a-z0-9_-]{0,31}".into()));
    }
    let provider = providers.get(name).cloned().ok_or_else(|| name.to_owned());
    let account_id = text("account_id", &request.account_id.ok_or_else(|| bad("`account_id` is missing".into()))?)?;
    let app_id = request.app_id.map(|app| text("app_id", &app)).transpose()?;
    if app_id.is_some() && name != TRACKUNIT {
        return Err(bad("`app_id` applies to the trackunit provider only".into()));
    }
    let requested = match request.scopes {
        Some(scopes) if !scopes.is_empty() => {
            Some(ScopeSet::parse(scopes.iter().map(|s| s.as_ref())).map_err(|e| bad(format!("`scopes`: {e}")))?)
        }
        _ => None,
    };
    let scopes = match (&provider, requested) {
        (_, Some(scopes)) => scopes,
        (Ok(provider), None) if provider.needs_scopes() => {
            return Err(bad("`scopes` must name at least one scope: this provider has no default scopes".into()));
        }
        (Ok(provider), None) => provider.scopes_for(None),
        (Err(_), None) => ScopeSet::empty(),
    };
    let min_ttl_secs = match request.min_ttl_seconds {
        None => DEFAULT_MIN_TTL_SECS,
        Some(number) => number
            .as_u64()
            .filter(|secs| *secs <= LONGEST_MIN_TTL_SECS)
            .ok_or_else(|| bad(format!("`min_ttl_seconds` must be a whole number from 0 to {LONGEST_MIN_TTL_SECS}")))?,
    };
    Ok(TokenRequest { provider, account_id, app_id, scopes, min_ttl: Duration::from_secs(min_ttl_secs) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Trackunit, and a provider with default scopes and one that sends none.
    fn providers() -> Providers {
        let url = |path: &str| format!("https://auth.example.com/{path}").parse().unwrap();
        let mut with_defaults = Provider::trackunit(url("trulioo"));
        with_defaults.name = "trulioo".into();
        with_defaults.default_scopes = ScopeSet::parse(["workflow.studio.api"]).unwrap();
        let mut scopeless = Provider::trackunit(url("triumph"));
        scopeless.name = "triumph".into();
        scopeless.send_scope = false;
        Providers::new([Provider::trackunit(url("apptoken")), with_defaults, scopeless])
    }

    fn parse(raw: &[u8]) -> Result<TokenRequest, ApiError> {
        super::parse(raw, &providers())
    }

    #[test]
    fn parses_a_full_request_and_applies_defaults() {
        let request = parse(br#"{"account_id":"a","scopes":["x","y"]}"#).unwrap();
        assert_eq!(request.min_ttl, Duration::from_secs(60));
        assert!(request.app_id.is_none());
        assert_eq!(request.provider_name(), "trackunit", "the default provider");
        let request = parse(br#"{"account_id":"a","scopes":["x"],"app_id":"@o/a","min_ttl_seconds":0}"#).unwrap();
        assert_eq!(request.app_id.unwrap().as_str(), "@o/a");
    }

    #[test]
    fn scopes_default_to_the_providers_and_an_unknown_provider_is_kept_for_a_404_after_the_grants() {
        let request = parse(br#"{"provider":"trulioo","account_id":"a"}"#).unwrap();
        assert_eq!(&**request.scopes.key(), "workflow.studio.api");
        let request = parse(br#"{"provider":"trulioo","account_id":"a","scopes":[]}"#).unwrap();
        assert_eq!(&**request.scopes.key(), "workflow.studio.api", "empty is the same as omitted");
        let request = parse(br#"{"provider":"trulioo","account_id":"a","scopes":["other"]}"#).unwrap();
        assert_eq!(&**request.scopes.key(), "other");
        let request = parse(br#"{"provider":"triumph","account_id":"a"}"#).unwrap();
        assert!(request.scopes.is_empty(), "a provider that sends no scope needs none");
        let request = parse(br#"{"provider":"nope","account_id":"a","scopes":["x"]}"#).unwrap();
        assert_eq!(request.provider.unwrap_err(), "nope");
    }

    #[test]
    fn provider_names_app_ids_and_missing_scopes_are_checked() {
        for body in [
            &br#"{"provider":"Bad Name","account_id":"a","scopes":["x"]}"#[..],
            br#"{"provider":7,"account_id":"a","scopes":["x"]}"#,
            br#"{"provider":"trulioo","account_id":"a","app_id":"@o/a"}"#,
            br#"{"account_id":"a"}"#,
        ] {
            assert!(matches!(parse(body), Err(ApiError::InvalidRequest(_))), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn refuses_bad_min_ttl_scopes_and_shapes() {
        for body in [
            &br#"{"account_id":"a","scopes":["x"],"min_ttl_seconds":-1}"#[..],
            br#"{"account_id":"a","scopes":["x"],"min_ttl_seconds":86401}"#,
            br#"{"account_id":"a","scopes":["x"],"min_ttl_seconds":1.5}"#,
            br#"{"account_id":"a","scopes":["a b"]}"#,
            br#"{"account_id":"a","scopes":["a\nb"]}"#,
            br#"{"account_id":"a","scopes":[]}"#,
            br#"{"account_id":"a","scopes":"x"}"#,
            br#"{"account_id":"a","scopes":null}"#,
            br#"{"account_id":5,"scopes":["x"]}"#,
            br#"{"scopes":["x"]}"#,
        ] {
            assert!(matches!(parse(body), Err(ApiError::InvalidRequest(_))), "{}", String::from_utf8_lossy(body));
        }
    }

    proptest! {
        #[test]
        fn fuzz_any_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }
    }
}
