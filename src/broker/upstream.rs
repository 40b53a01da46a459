//! The OAuth2 token endpoint client (RFC 6749 §4.4, client credentials). What differs between providers
//! (reply field names, default lifetime) is data in [`ProviderProfile`], not code, so supporting another
//! provider means adding a profile value (and, later, a setting that selects it), not forking the client.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use url::Url;

use crate::domain::ScopeSet;
use crate::outbound;
use crate::settings::UpstreamSettings;

const MAX_REPLY_BYTES: usize = 64 * 1024;
/// The longest `Retry-After` we wait out inside one request; longer ones are passed on to the caller.
const LONGEST_INLINE_RETRY_AFTER: Duration = Duration::from_secs(5);
/// What we tell callers to wait when the upstream gave no `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);
/// A year: no real token lives longer, and bounding it keeps date arithmetic safe.
const LONGEST_LIFETIME_SECS: i64 = 365 * 24 * 3600;

/// Names of the reply members, for providers that spell them differently (e.g. `Token`/`ExpiresIn`).
#[derive(Debug, Clone)]
pub struct ReplyFields {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: String,
    pub scope: String,
}

/// Everything provider-specific about minting a token.
#[derive(Debug, Clone)]
pub struct ProviderProfile {
    pub reply: ReplyFields,
    /// Lifetime assumed when the reply has no `expires_in` and the token is not a JWT with `exp`.
    pub default_lifetime: Duration,
}

impl ProviderProfile {
    /// Trackunit's `/apptoken`: standard RFC 6749 member names.
    pub fn trackunit() -> Self {
        Self {
            reply: ReplyFields {
                access_token: "access_token".into(),
                token_type: "token_type".into(),
                expires_in: "expires_in".into(),
                scope: "scope".into(),
            },
            default_lifetime: Duration::from_secs(300),
        }
    }
}

/// A token as the upstream granted it.
pub struct MintedToken {
    pub access_token: SecretString,
    pub token_type: String,
    pub scope: Option<String>,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Why minting failed, as callers must branch on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream refused the client credentials (invalid_client)")]
    InvalidClient,
    #[error("the upstream refused a requested scope (invalid_scope)")]
    InvalidScope,
    #[error("the upstream refused the request with HTTP {status} ({error})")]
    Rejected { status: u16, error: String },
    #[error("the upstream failed: {reason} (after {attempts} attempts)")]
    Failed { attempts: u32, reason: String },
    #[error("the upstream could not be reached or is rate-limiting: {reason}")]
    Unavailable { retry_after: Duration, reason: String },
}

/// What one attempt tells the retry loop.
enum Attempt {
    Done(Result<MintedToken, UpstreamError>),
    Retry { error: UpstreamError, retry_after: Option<Duration> },
}

pub struct TokenEndpoint {
    url: Url,
    http: reqwest::Client,
    profile: ProviderProfile,
    max_attempts: u32,
    backoff_base: Duration,
}

impl TokenEndpoint {
    pub fn new(settings: &UpstreamSettings, profile: ProviderProfile) -> Self {
        Self {
            url: settings.token_url.clone(),
            http: outbound::client(settings.timeout),
            profile,
            max_attempts: settings.max_attempts,
            backoff_base: settings.backoff_base,
        }
    }

    /// Mints a token, retrying connection errors, 5xx and 429 with exponential backoff and jitter.
    #[tracing::instrument(skip_all, fields(upstream.attempts))]
    pub async fn mint(
        &self,
        client_id: &SecretString,
        client_secret: &SecretString,
        scopes: &ScopeSet,
    ) -> Result<MintedToken, UpstreamError> {
        let scope = scopes.key();
        let mut attempt = 1;
        loop {
            let started = std::time::Instant::now();
            let outcome = self.attempt(client_id, client_secret, scope).await;
            metrics::histogram!("tokenvault_upstream_duration_seconds").record(started.elapsed().as_secs_f64());
            tracing::Span::current().record("upstream.attempts", attempt);
            let (error, retry_after) = match outcome {
                Attempt::Done(Err(UpstreamError::Failed { reason, .. })) => {
                    return Err(UpstreamError::Failed { attempts: attempt, reason });
                }
                Attempt::Done(result) => return result,
                Attempt::Retry { error, retry_after } => (error, retry_after),
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
            if attempt >= self.max_attempts {
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

    async fn attempt(&self, client_id: &SecretString, client_secret: &SecretString, scope: &str) -> Attempt {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", client_id.expose_secret()),
            ("client_secret", client_secret.expose_secret()),
            ("scope", scope),
        ];
        let sent = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .send()
            .await;
        let response = match sent {
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
            return Attempt::Retry { error, retry_after };
        }
        if status.is_server_error() {
            let error = UpstreamError::Failed { attempts: 0, reason: format!("HTTP {}", status.as_u16()) };
            return Attempt::Retry { error, retry_after };
        }
        let body = match body {
            Ok(body) => body,
            Err(error) => {
                return Attempt::Done(Err(UpstreamError::Failed { attempts: 1, reason: error.to_string() }));
            }
        };
        if status.is_success() {
            return Attempt::Done(
                parse_reply(&body, &self.profile, Utc::now())
                    .map_err(|reason| UpstreamError::Failed { attempts: 1, reason: reason.into() }),
            );
        }
        Attempt::Done(Err(classify_refusal(status.as_u16(), &body)))
    }
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
        Some("invalid_scope") => UpstreamError::InvalidScope,
        Some(other) if other.len() <= 64 && other.bytes().all(|b| b.is_ascii_graphic()) => {
            UpstreamError::Rejected { status, error: other.to_owned() }
        }
        _ => UpstreamError::Rejected { status, error: "no error code".into() },
    }
}

/// Reads a successful token reply. Expiry comes from `expires_in`, else from the access token's JWT `exp`,
/// else the profile's default lifetime.
pub fn parse_reply(body: &[u8], profile: &ProviderProfile, now: DateTime<Utc>) -> Result<MintedToken, &'static str> {
    let reply = crate::strict_json::from_slice(body).map_err(|_| "the token reply is not JSON")?;
    let fields = &profile.reply;
    let access_token = reply
        .get(&fields.access_token)
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or("the token reply has no access token")?;
    let token_type = reply.get(&fields.token_type).and_then(Value::as_str).unwrap_or("Bearer").to_owned();
    let scope = reply.get(&fields.scope).and_then(Value::as_str).map(str::to_owned);
    let lifetime_secs = match reply.get(&fields.expires_in) {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.as_i64().ok_or("expires_in is not a whole number")?),
        // Some providers send the number as a string.
        Some(Value::String(s)) => Some(s.trim().parse::<i64>().map_err(|_| "expires_in is not a number")?),
        Some(_) => return Err("expires_in is not a number"),
    };
    let expires_at = match lifetime_secs {
        Some(secs) if secs > 0 => now + chrono::Duration::seconds(secs.min(LONGEST_LIFETIME_SECS)),
        Some(_) => return Err("expires_in is not positive"),
        None => jwt_expiry(access_token)
            .filter(|exp| *exp > now)
            .unwrap_or_else(|| now + chrono::Duration::from_std(profile.default_lifetime).unwrap_or_default()),
    };
    Ok(MintedToken {
        access_token: SecretString::from(access_token.to_owned()),
        token_type,
        scope,
        issued_at: now,
        expires_at,
    })
}

/// The `exp` of a JWT access token, read without verifying it: it came straight from the token endpoint
/// over TLS, and we only use it to know when to mint again.
fn jwt_expiry(token: &str) -> Option<DateTime<Utc>> {
    let payload = token.split('.').nth(1)?;
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    DateTime::from_timestamp(claims.get("exp")?.as_i64()?, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    #[test]
    fn reads_a_standard_reply() {
        let body = br#"{"access_token":"tok","token_type":"Bearer","expires_in":3600,"scope":"a b"}"#;
        let token = parse_reply(body, &ProviderProfile::trackunit(), now()).unwrap();
        assert_eq!(token.access_token.expose_secret(), "tok");
        assert_eq!((token.expires_at - now()).num_seconds(), 3600);
        assert_eq!(token.scope.as_deref(), Some("a b"));
    }

    #[test]
    fn falls_back_to_the_jwt_exp_then_to_five_minutes() {
        let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{}}}"#, 1_800_000_900));
        let body = format!(r#"{{"access_token":"h.{claims}.s"}}"#);
        let token = parse_reply(body.as_bytes(), &ProviderProfile::trackunit(), now()).unwrap();
        assert_eq!((token.expires_at - now()).num_seconds(), 900);
        let opaque = parse_reply(br#"{"access_token":"opaque"}"#, &ProviderProfile::trackunit(), now()).unwrap();
        assert_eq!((opaque.expires_at - now()).num_seconds(), 300);
    }

    #[test]
    fn non_standard_member_names_are_configuration() {
        let profile = ProviderProfile {
            reply: ReplyFields {
                access_token: "Token".into(),
                token_type: "TokenType".into(),
                expires_in: "ExpiresIn".into(),
                scope: "Scope".into(),
            },
            ..ProviderProfile::trackunit()
        };
        let token = parse_reply(br#"{"Token":"tok","ExpiresIn":"120"}"#, &profile, now()).unwrap();
        assert_eq!(token.access_token.expose_secret(), "tok");
        assert_eq!((token.expires_at - now()).num_seconds(), 120);
    }

    #[test]
    fn refusals_are_classified_by_their_error_code() {
        assert!(matches!(classify_refusal(401, br#"{"error":"invalid_client"}"#), UpstreamError::InvalidClient));
        assert!(matches!(classify_refusal(400, br#"{"error":"invalid_scope"}"#), UpstreamError::InvalidScope));
        assert!(matches!(classify_refusal(400, b"<html>"), UpstreamError::Rejected { status: 400, .. }));
    }

    #[test]
    fn bad_replies_are_errors_not_panics() {
        for body in [
            &b""[..],
            b"[]",
            br#"{"access_token":""}"#,
            br#"{"access_token":"t","expires_in":-5}"#,
            br#"{"access_token":"t","expires_in":1.5}"#,
        ] {
            assert!(
                parse_reply(body, &ProviderProfile::trackunit(), now()).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
