//! [`TokenRequest`] (what to ask for) and [`Token`] (what comes back).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use secrecy::{ExposeSecret, SecretString};

/// The `min_ttl` of [`TokenRequest::new`]: tokenvault's own default for `min_ttl_seconds`.
pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(60);

/// What to ask tokenvault for: a token of `provider` for `account_id` (and `app_id`), with `scopes`,
/// that has at least `min_ttl` left.
///
/// Two requests that differ only in `min_ttl` (or in the order or repetition of scopes) share one cached
/// token: a token fresh enough for the larger `min_ttl` serves both.
///
/// ```
/// use std::time::Duration;
/// use tokenvault_client::TokenRequest;
///
/// let request = TokenRequest::new("7b1c5e0a-acme")
///     .with_scopes(["asset.view", "asset.edit"])
///     .with_min_ttl(Duration::from_secs(120));
/// assert_eq!(request.provider, None); // tokenvault's default provider, `trackunit`
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The provider (`provider`); `None` is tokenvault's default, `trackunit`.
    pub provider: Option<String>,
    /// The account the token is for (`account_id`).
    pub account_id: String,
    /// The Trackunit `irisAppId` (`app_id`), needed only when the account installed several of the apps
    /// the service key is granted.
    pub app_id: Option<String>,
    /// The scopes to ask for (`scopes`). Empty means the provider's default scopes (an error for
    /// Trackunit, which has none).
    pub scopes: Vec<String>,
    /// The least time the token must have left, sent as `min_ttl_seconds` (whole seconds, rounded up;
    /// tokenvault accepts up to a day).
    pub min_ttl: Duration,
}

impl TokenRequest {
    /// A request for `account_id` at the default provider, with no scopes yet and a `min_ttl` of
    /// [`DEFAULT_MIN_TTL`].
    pub fn new(account_id: impl Into<String>) -> Self {
        Self {
            provider: None,
            account_id: account_id.into(),
            app_id: None,
            scopes: Vec::new(),
            min_ttl: DEFAULT_MIN_TTL,
        }
    }

    /// Sets [`TokenRequest::provider`].
    pub fn with_provider(mut self, provider: impl Into<String>) -> Self {
        self.provider = Some(provider.into());
        self
    }

    /// Sets [`TokenRequest::app_id`].
    pub fn with_app_id(mut self, app_id: impl Into<String>) -> Self {
        self.app_id = Some(app_id.into());
        self
    }

    /// Adds `scopes` to [`TokenRequest::scopes`].
    pub fn with_scopes<S: Into<String>>(mut self, scopes: impl IntoIterator<Item = S>) -> Self {
        self.scopes.extend(scopes.into_iter().map(Into::into));
        self
    }

    /// Sets [`TokenRequest::min_ttl`].
    pub fn with_min_ttl(mut self, min_ttl: Duration) -> Self {
        self.min_ttl = min_ttl;
        self
    }

    /// `min_ttl` in whole seconds, rounded up, as sent.
    pub(crate) fn min_ttl_seconds(&self) -> u64 {
        let secs = self.min_ttl.as_secs();
        if self.min_ttl.subsec_nanos() > 0 { secs.saturating_add(1) } else { secs }
    }

    /// The cache key: the request without `min_ttl`, scopes sorted and without repeats (as tokenvault
    /// keys its own cache).
    pub(crate) fn key(&self) -> Key {
        let mut scopes = self.scopes.clone();
        scopes.sort_unstable();
        scopes.dedup();
        Key {
            provider: self.provider.clone(),
            account_id: self.account_id.clone(),
            app_id: self.app_id.clone(),
            scopes,
        }
    }

    /// The JSON body of `POST /v1/tokens`.
    pub(crate) fn body(&self) -> serde_json::Value {
        let mut body = serde_json::json!({
            "account_id": self.account_id,
            "scopes": self.scopes,
            "min_ttl_seconds": self.min_ttl_seconds(),
        });
        if let Some(provider) = &self.provider {
            body["provider"] = provider.as_str().into();
        }
        if let Some(app_id) = &self.app_id {
            body["app_id"] = app_id.as_str().into();
        }
        body
    }
}

/// Identical requests, whatever their `min_ttl`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    provider: Option<String>,
    account_id: String,
    app_id: Option<String>,
    scopes: Vec<String>,
}

/// An access token from tokenvault.
///
/// The token itself is kept as a [`SecretString`] and shown only by [`Token::expose_secret`]: `Debug`
/// prints its type, scope and expiry, never the token. Cloning is cheap (the token is shared).
#[derive(Clone)]
pub struct Token(Arc<Inner>);

struct Inner {
    access_token: SecretString,
    token_type: String,
    scope: String,
    /// When it expires, by tokenvault's clock (`expires_at`), or by ours when it sent none.
    expires_at: SystemTime,
    /// When it expires by this process's monotonic clock: `expires_in` counted from when the request
    /// was sent, so a slow answer or a clock step never makes it look fresher than it is.
    deadline: Instant,
}

impl Token {
    /// Makes a token from tokenvault's answer to a request sent at `sent`.
    pub(crate) fn from_answer(answer: Answer, sent: Instant, sent_at: SystemTime) -> Self {
        let expires_in = Duration::from_secs(answer.expires_in);
        let expires_at = answer
            .expires_at
            .as_deref()
            .and_then(|text| chrono::DateTime::parse_from_rfc3339(text).ok())
            .map(SystemTime::from)
            .unwrap_or(sent_at + expires_in);
        Token(Arc::new(Inner {
            access_token: answer.access_token,
            token_type: answer.token_type,
            scope: answer.scope.unwrap_or_default(),
            expires_at,
            deadline: sent + expires_in,
        }))
    }

    /// The access token, to send as `Authorization: Bearer <token>`. Keep it out of logs.
    pub fn expose_secret(&self) -> &str {
        self.0.access_token.expose_secret()
    }

    /// The token type, as the provider spelled it (usually `Bearer`).
    pub fn token_type(&self) -> &str {
        &self.0.token_type
    }

    /// The scope the token endpoint granted, space-separated (`scope`).
    pub fn scope(&self) -> &str {
        &self.0.scope
    }

    /// The granted scopes, one by one.
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.0.scope.split_ascii_whitespace()
    }

    /// When the token expires (`expires_at`, by tokenvault's clock).
    pub fn expires_at(&self) -> SystemTime {
        self.0.expires_at
    }

    /// How long the token has left now (zero once expired), by this process's monotonic clock.
    pub fn expires_in(&self) -> Duration {
        self.0.deadline.saturating_duration_since(Instant::now())
    }

    /// Whether the token has at least `min_ttl` left.
    pub fn is_fresh_for(&self, min_ttl: Duration) -> bool {
        self.expires_in() >= min_ttl && !self.is_expired()
    }

    /// Whether the token has expired.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.0.deadline
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("access_token", &"[REDACTED]")
            .field("token_type", &self.0.token_type)
            .field("scope", &self.0.scope)
            .field("expires_in", &self.expires_in())
            .finish()
    }
}

/// The answer of `POST /v1/tokens` (200).
#[derive(serde::Deserialize)]
pub(crate) struct Answer {
    access_token: SecretString,
    token_type: String,
    expires_in: u64,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    scope: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_the_wire_format_and_min_ttl_rounds_up() {
        let request = TokenRequest::new("acc").with_scopes(["b", "a"]).with_min_ttl(Duration::from_millis(1500));
        assert_eq!(
            request.body(),
            serde_json::json!({"account_id": "acc", "scopes": ["b", "a"], "min_ttl_seconds": 2})
        );
        let request = request.with_provider("trulioo").with_app_id("@o/a").with_min_ttl(Duration::ZERO);
        assert_eq!(
            request.body(),
            serde_json::json!({"provider": "trulioo", "account_id": "acc", "app_id": "@o/a",
                               "scopes": ["b", "a"], "min_ttl_seconds": 0})
        );
    }

    #[test]
    fn requests_differing_in_min_ttl_or_scope_order_share_a_key() {
        let a = TokenRequest::new("acc").with_scopes(["x", "y", "x"]);
        let b = TokenRequest::new("acc").with_scopes(["y", "x"]).with_min_ttl(Duration::from_secs(600));
        assert_eq!(a.key(), b.key());
        assert_ne!(a.key(), a.clone().with_provider("trackunit").key());
        assert_ne!(a.key(), a.clone().with_app_id("@o/a").key());
    }

    #[test]
    fn a_token_never_shows_itself_and_counts_its_life_from_the_request() {
        let answer: Answer = serde_json::from_str(
            r#"{"access_token":"at-secret","token_type":"Bearer","expires_in":120,
                "expires_at":"2030-01-01T00:00:00Z","scope":"a b"}"#,
        )
        .unwrap();
        let token = Token::from_answer(answer, Instant::now(), SystemTime::now());
        assert_eq!(token.expose_secret(), "at-secret");
        assert!(!format!("{token:?}").contains("at-secret"), "{token:?}");
        assert_eq!(token.scopes().collect::<Vec<_>>(), ["a", "b"]);
        assert!(token.is_fresh_for(Duration::from_secs(100)) && !token.is_fresh_for(Duration::from_secs(121)));
        let at = chrono::DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z").unwrap();
        assert_eq!(token.expires_at(), SystemTime::from(at));
    }
}
