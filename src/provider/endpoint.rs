//! The OAuth2 token endpoint client (RFC 6749 §4.4 client credentials, §6 refresh): one for every
//! provider, shaped by the provider's data. Retries what is safe to retry, never follows a redirect, never
//! reads more than 64 KiB of a reply, and never passes the upstream's `error_description` on.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::{ClientAuth, Provider};
use crate::domain::ScopeSet;
use crate::outbound;

const MAX_REPLY_BYTES: usize = 64 * 1024;
/// The longest `Retry-After` we wait out inside one request; longer ones are passed on to the caller.
const LONGEST_INLINE_RETRY_AFTER: Duration = Duration::from_secs(5);
/// What we tell callers to wait when the upstream gave no `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);

/// A token as the upstream granted it.
pub struct MintedToken {
    pub access_token: SecretString,
    pub token_type: String,
    pub scope: Option<String>,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// A refresh token that came with it (Keycloak's client-credentials refresh tokens, or a rotated one).
    pub refresh_token: Option<SecretString>,
    /// When that refresh token expires, when the reply says.
    pub refresh_expires_at: Option<DateTime<Utc>>,
}

/// Why minting failed, as callers must branch on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream refused the client credentials (invalid_client)")]
    InvalidClient,
    #[error("the upstream refused the refresh token (invalid_grant)")]
    InvalidGrant,
    #[error("the upstream refused a requested scope (invalid_scope)")]
    InvalidScope,
    #[error("the upstream refused the request with HTTP {status} ({error})")]
    Rejected { status: u16, error: String },
    #[error("the upstream failed: {reason} (after {attempts} attempts)")]
    Failed { attempts: u32, reason: String },
    #[error("the upstream could not be reached or is rate-limiting: {reason}")]
    Unavailable { retry_after: Duration, reason: String },
}

/// A client's credentials at a provider. `Debug` shows neither.
pub struct Credentials {
    pub client_id: SecretString,
    /// `None` for a public client (user-delegated credentials may have none).
    pub client_secret: Option<SecretString>,
}

/// What a token request presents.
pub enum Grant<'a> {
    ClientCredentials,
    /// Spends this refresh token. Never retried once sent: a retry of a request the upstream carried out
    /// would present a refresh token it has already rotated away.
    RefreshToken(&'a SecretString),
}

impl Grant<'_> {
    fn name(&self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::RefreshToken(_) => "refresh_token",
        }
    }
}

/// What one attempt tells the retry loop.
enum Attempt {
    Done(Result<MintedToken, UpstreamError>),
    /// Worth another attempt. `sent`: the request may have reached the upstream.
    Retry {
        error: UpstreamError,
        retry_after: Option<Duration>,
        sent: bool,
    },
}

/// The HTTP side of minting, shared by every provider: timeouts and the retry policy.
pub struct Endpoint {
    http: reqwest::Client,
    max_attempts: u32,
    backoff_base: Duration,
}

impl Endpoint {
    pub fn new(timeout: Duration, max_attempts: u32, backoff_base: Duration) -> Self {
        Self { http: outbound::client(timeout), max_attempts, backoff_base }
    }

    /// Mints a token at `provider` with `grant`, retrying connection errors, 5xx and 429 with exponential
    /// backoff and jitter. A refresh grant is retried only when it cannot have been sent.
    #[tracing::instrument(skip_all, fields(provider = %provider.name, grant = grant.name(), upstream.attempts))]
    pub async fn mint(
        &self,
        provider: &Provider,
        credentials: &Credentials,
        grant: Grant<'_>,
        scopes: &ScopeSet,
    ) -> Result<MintedToken, UpstreamError> {
        let mut attempt = 1;
        loop {
            let started = std::time::Instant::now();
            let outcome = self.attempt(provider, credentials, &grant, scopes).await;
            metrics::histogram!("tokenvault_upstream_duration_seconds").record(started.elapsed().as_secs_f64());
            tracing::Span::current().record("upstream.attempts", attempt);
            let (error, retry_after, sent) = match outcome {
                Attempt::Done(Err(UpstreamError::Failed { reason, .. })) => {
                    return Err(UpstreamError::Failed { attempts: attempt, reason });
                }
                Attempt::Done(result) => return result,
                Attempt::Retry { error, retry_after, sent } => (error, retry_after, sent),
            };
            let wait = self.backoff(attempt).max(retry_after.unwrap_or_default());
            let waited_too_long = retry_after.is_some_and(|r| r > LONGEST_INLINE_RETRY_AFTER);
            if waited_too_long {
                // The upstream asked for more patience than a caller has: pass its Retry-After on.
                let reason = error.to_string();
                return Err(UpstreamError::Unavailable {
                    retry_after: retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
                    reason,
                });
            }
            let spent_refresh = sent && matches!(grant, Grant::RefreshToken(_));
            if attempt >= self.max_attempts || spent_refresh {
                return Err(match error {
                    UpstreamError::Failed { reason, .. } => UpstreamError::Failed { attempts: attempt, reason },
                    UpstreamError::Unavailable { reason, .. } => {
                        UpstreamError::Unavailable { retry_after: retry_after.unwrap_or(DEFAULT_RETRY_AFTER), reason }
                    }
                    other => other,
                });
            }
            tracing::warn!(attempt, wait_ms = wait.as_millis() as u64, error = %error, "upstream attempt failed; retrying");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let exponential = self.backoff_base.saturating_mul(1 << (attempt - 1).min(8));
        let jitter_ms = rand::rng().random_range(0..=self.backoff_base.as_millis().max(1) as u64);
        exponential + Duration::from_millis(jitter_ms)
    }

    async fn attempt(
        &self,
        provider: &Provider,
        credentials: &Credentials,
        grant: &Grant<'_>,
        scopes: &ScopeSet,
    ) -> Attempt {
        let form = form(provider, credentials, grant, scopes);
        let mut request = self
            .http
            .post(provider.token_url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form.iter().map(|(k, v)| (*k, v.expose_secret())).collect::<Vec<_>>());
        if let (ClientAuth::ClientSecretBasic, Some(secret)) = (provider.client_auth, &credentials.client_secret) {
            request =
                request.header(reqwest::header::AUTHORIZATION, basic(&credentials.client_id, secret).expose_secret());
        }
        let response = match request.send().await {
            Ok(response) => response,
            // A timeout is not retried: the caller has already waited the whole timeout once.
            Err(error) if error.is_timeout() => {
                metrics::counter!("tokenvault_upstream_requests_total", "outcome" => "timeout").increment(1);
                return Attempt::Done(Err(UpstreamError::Unavailable {
                    retry_after: DEFAULT_RETRY_AFTER,
                    reason: "timed out".into(),
                }));
            }
            Err(error) => {
                metrics::counter!("tokenvault_upstream_requests_total", "outcome" => "connect_error").increment(1);
                return Attempt::Retry {
                    error: UpstreamError::Unavailable {
                        retry_after: DEFAULT_RETRY_AFTER,
                        reason: connection_reason(&error),
                    },
                    retry_after: None,
                    // Only a failure to connect proves nothing was sent.
                    sent: !error.is_connect(),
                };
            }
        };
        let status = response.status();
        metrics::counter!("tokenvault_upstream_requests_total", "outcome" => status.as_str().to_owned()).increment(1);
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = outbound::read_limited(response, MAX_REPLY_BYTES).await;
        if status.as_u16() == 429 {
            let error = UpstreamError::Unavailable {
                retry_after: retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
                reason: "HTTP 429".into(),
            };
            return Attempt::Retry { error, retry_after, sent: true };
        }
        if status.is_server_error() {
            let error = UpstreamError::Failed { attempts: 0, reason: format!("HTTP {}", status.as_u16()) };
            return Attempt::Retry { error, retry_after, sent: true };
        }
        let body = match body {
            Ok(body) => body,
            Err(error) => {
                return Attempt::Done(Err(UpstreamError::Failed { attempts: 1, reason: error.to_string() }));
            }
        };
        if status.is_success() {
            return Attempt::Done(
                super::parse_reply(&body, provider, Utc::now())
                    .map_err(|reason| UpstreamError::Failed { attempts: 1, reason }),
            );
        }
        Attempt::Done(Err(classify_refusal(status.as_u16(), &body)))
    }
}

/// The token request's form: the grant, the client (unless it authenticates with Basic), the scope (unless
/// the provider refuses one), then the provider's extra parameters. Values are secrets until sent.
fn form<'a>(
    provider: &'a Provider,
    credentials: &Credentials,
    grant: &Grant<'_>,
    scopes: &ScopeSet,
) -> Vec<(&'a str, SecretString)> {
    let mut form: Vec<(&'a str, SecretString)> = vec![("grant_type", SecretString::from(grant.name()))];
    if let Grant::RefreshToken(refresh_token) = grant {
        form.push(("refresh_token", SecretString::from(refresh_token.expose_secret().to_owned())));
    }
    let basic = provider.client_auth == ClientAuth::ClientSecretBasic && credentials.client_secret.is_some();
    if !basic {
        // A public client (no secret) names itself in the form whatever the provider's method.
        form.push(("client_id", SecretString::from(credentials.client_id.expose_secret().to_owned())));
        if let Some(secret) = &credentials.client_secret {
            form.push(("client_secret", SecretString::from(secret.expose_secret().to_owned())));
        }
    }
    if provider.send_scope && !scopes.is_empty() {
        form.push(("scope", SecretString::from(scopes.iter().collect::<Vec<_>>().join(&provider.scope_separator))));
    }
    for (name, value) in &provider.extra_params {
        // Checked at load: no extra parameter shadows one of the above.
        form.push((name, SecretString::from(value.clone())));
    }
    form
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))` (RFC 6749 §2.3.1).
fn basic(client_id: &SecretString, client_secret: &SecretString) -> SecretString {
    let encode = |value: &str| url::form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>();
    let pair = zeroize::Zeroizing::new(format!(
        "{}:{}",
        encode(client_id.expose_secret()),
        encode(client_secret.expose_secret())
    ));
    SecretString::from(format!("Basic {}", STANDARD.encode(pair.as_bytes())))
}

fn connection_reason(error: &reqwest::Error) -> String {
    // The whole chain, for operators; a reqwest error names the URL, which holds no secret.
    tracing::debug!(error = ?error, "upstream request failed");
    if error.is_connect() { "connection failed".into() } else { "request failed".into() }
}

/// Maps an RFC 6749 §5.2 error response. Only the `error` code is read: `error_description` is free text
/// from upstream and never reaches our callers.
fn classify_refusal(status: u16, body: &[u8]) -> UpstreamError {
    let code = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned));
    match code.as_deref() {
        Some("invalid_client") => UpstreamError::InvalidClient,
        Some("invalid_grant") => UpstreamError::InvalidGrant,
        Some("invalid_scope") => UpstreamError::InvalidScope,
        Some(other) if other.len() <= 64 && other.bytes().all(|b| b.is_ascii_graphic()) => {
            UpstreamError::Rejected { status, error: other.to_owned() }
        }
        _ => UpstreamError::Rejected { status, error: "no error code".into() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(auth: ClientAuth) -> Provider {
        let mut provider = Provider::trackunit("https://auth.example.com/token".parse().unwrap());
        provider.client_auth = auth;
        provider
    }

    fn credentials(secret: Option<&str>) -> Credentials {
        Credentials { client_id: SecretString::from("id:+/ é"), client_secret: secret.map(SecretString::from) }
    }

    fn names<'a>(form: &[(&'a str, SecretString)]) -> Vec<&'a str> {
        form.iter().map(|(name, _)| *name).collect()
    }

    #[test]
    fn client_secret_basic_keeps_the_credentials_out_of_the_form_and_form_encodes_them() {
        let scopes = ScopeSet::parse(["a", "b"]).unwrap();
        let basic_provider = provider(ClientAuth::ClientSecretBasic);
        let sent = form(&basic_provider, &credentials(Some("s e+c")), &Grant::ClientCredentials, &scopes);
        assert_eq!(names(&sent), ["grant_type", "scope"]);
        let header = basic(&SecretString::from("id:+/ é"), &SecretString::from("s e+c"));
        let decoded = STANDARD.decode(header.expose_secret().strip_prefix("Basic ").unwrap()).unwrap();
        assert_eq!(String::from_utf8(decoded).unwrap(), "id%3A%2B%2F+%C3%A9:s+e%2Bc");
    }

    #[test]
    fn post_refresh_public_clients_scopes_and_extra_parameters() {
        let mut provider = provider(ClientAuth::ClientSecretPost);
        provider.scope_separator = ",".into();
        provider.extra_params.insert("audience".into(), "https://api".into());
        let refresh = SecretString::from("rt");
        let scopes = ScopeSet::parse(["b", "a"]).unwrap();
        let refreshing = form(&provider, &credentials(None), &Grant::RefreshToken(&refresh), &scopes);
        assert_eq!(names(&refreshing), ["grant_type", "refresh_token", "client_id", "scope", "audience"]);
        assert_eq!(refreshing[3].1.expose_secret(), "a,b");
        provider.send_scope = false;
        let basic_public = Provider { client_auth: ClientAuth::ClientSecretBasic, ..provider };
        let public = form(&basic_public, &credentials(None), &Grant::ClientCredentials, &scopes);
        assert_eq!(names(&public), ["grant_type", "client_id", "audience"], "a public client names itself; no scope");
    }

    #[test]
    fn refusals_are_classified_by_their_error_code() {
        assert!(matches!(classify_refusal(401, br#"{"error":"invalid_client"}"#), UpstreamError::InvalidClient));
        assert!(matches!(classify_refusal(400, br#"{"error":"invalid_grant"}"#), UpstreamError::InvalidGrant));
        assert!(matches!(classify_refusal(400, br#"{"error":"invalid_scope"}"#), UpstreamError::InvalidScope));
        assert!(matches!(classify_refusal(400, b"<html>"), UpstreamError::Rejected { status: 400, .. }));
    }
}
