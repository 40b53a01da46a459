//! [`TokenvaultClient`]: the builder, the in-memory cache, single flight and the bounded retry.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{self, HeaderValue};
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};

use crate::error::{BuildError, Error, Problem};
use crate::token::{Answer, Key, Token, TokenRequest};

/// The default of [`TokenvaultClientBuilder::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// The default of [`TokenvaultClientBuilder::max_retries`].
pub const DEFAULT_MAX_RETRIES: u32 = 2;
/// The default of [`TokenvaultClientBuilder::max_retry_wait`].
pub const DEFAULT_MAX_RETRY_WAIT: Duration = Duration::from_secs(10);
/// The wait before retrying a 503 that names none (tokenvault always does).
const RETRY_AFTER_WHEN_UNSAID: Duration = Duration::from_secs(1);
/// The largest answer read: a token answer or a problem is far smaller.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// How many keys the cache holds before it drops those whose token expired.
const PRUNE_ABOVE: usize = 1024;

/// A client of tokenvault's internal token API (`POST /v1/tokens`).
///
/// - keeps each token in memory, per identical [`TokenRequest`], and hands it out again while it has at
///   least the request's `min_ttl` left;
/// - makes one HTTP call for concurrent identical requests: the others wait for it and share its token,
///   or its error;
/// - retries a 503 after its `Retry-After`, at most [`max_retries`](TokenvaultClientBuilder::max_retries)
///   times and [`max_retry_wait`](TokenvaultClientBuilder::max_retry_wait) in all;
/// - returns an [`Error`] variant per problem `code`.
///
/// Cloning is cheap, and clones share the cache: make one per process (per service key) and clone it.
/// `Debug` shows the URL and settings, never the service key nor a token.
#[derive(Clone)]
pub struct TokenvaultClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    tokens_url: Url,
    service_key: SecretString,
    timeout: Duration,
    max_retries: u32,
    max_retry_wait: Duration,
    slots: Mutex<HashMap<Key, Arc<Slot>>>,
}

/// The cache entry and the single flight of one key.
#[derive(Default)]
struct Slot {
    /// The last token received, read without waiting for a call in flight.
    token: Mutex<Option<Token>>,
    /// Held for the whole of a call to tokenvault: identical requests queue here.
    flight: tokio::sync::Mutex<Option<Error>>,
    /// Calls finished (bumped under `flight`): a request that sees it change while it waited shares
    /// the outcome of the call it waited for instead of making another.
    calls: AtomicU64,
}

impl Slot {
    fn fresh(&self, min_ttl: Duration) -> Option<Token> {
        let token = self.token.lock().unwrap_or_else(|e| e.into_inner());
        token.as_ref().filter(|token| token.is_fresh_for(min_ttl)).cloned()
    }
}

impl TokenvaultClient {
    /// Starts a client of the tokenvault whose internal listener is at `internal_url`
    /// (for example `http://tokenvault.internal:8081`; a path prefix is kept).
    pub fn builder(internal_url: impl AsRef<str>) -> TokenvaultClientBuilder {
        TokenvaultClientBuilder {
            internal_url: internal_url.as_ref().to_owned(),
            service_key: None,
            timeout: DEFAULT_TIMEOUT,
            max_retries: DEFAULT_MAX_RETRIES,
            max_retry_wait: DEFAULT_MAX_RETRY_WAIT,
            http: None,
        }
    }

    /// A token for `request`: from memory when the one held has at least `request.min_ttl` left, else
    /// from tokenvault (one call for all concurrent identical requests).
    ///
    /// tokenvault itself may answer a token with less than `min_ttl` left (when `min_ttl` is more than
    /// half the token's life, or while the provider is failing): it is returned as given, so read
    /// [`Token::expires_in`]. Such a token is not fresh enough for the next request either, which asks
    /// tokenvault again (where it is served from tokenvault's memory).
    pub async fn token(&self, request: &TokenRequest) -> Result<Token, Error> {
        let slot = self.slot(request.key());
        if let Some(token) = slot.fresh(request.min_ttl) {
            trace_event!(trace, account_id = %request.account_id, "token served from memory");
            return Ok(token);
        }
        let seen = slot.calls.load(Ordering::Acquire);
        let mut flight = slot.flight.lock().await;
        if let Some(token) = slot.fresh(request.min_ttl) {
            return Ok(token);
        }
        if slot.calls.load(Ordering::Acquire) != seen
            && let Some(error) = flight.as_ref()
        {
            // The call this request waited for failed: share its error rather than repeat it at once.
            return Err(error.clone());
        }
        let outcome = self.fetch(request).await;
        match &outcome {
            Ok(token) => {
                *slot.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
                *flight = None;
            }
            Err(error) => *flight = Some(error.clone()),
        }
        slot.calls.fetch_add(1, Ordering::Release);
        outcome
    }

    /// Adds `Authorization: Bearer <token>` to `request`, with a token for `token_request` (see
    /// [`TokenvaultClient::token`]). The header is marked sensitive, so reqwest does not show it.
    ///
    /// ```
    /// # async fn example(client: &tokenvault_client::TokenvaultClient) -> Result<(), Box<dyn std::error::Error>> {
    /// use tokenvault_client::TokenRequest;
    ///
    /// let wanted = TokenRequest::new("7b1c5e0a-acme").with_scopes(["asset.view"]);
    /// let http = reqwest::Client::new();
    /// let assets = client
    ///     .authorize(http.get("https://iris.trackunit.com/public/api/assets"), &wanted)
    ///     .await?
    ///     .send()
    ///     .await?;
    /// # let _ = assets;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn authorize(
        &self,
        request: reqwest::RequestBuilder,
        token_request: &TokenRequest,
    ) -> Result<reqwest::RequestBuilder, Error> {
        let token = self.token(token_request).await?;
        Ok(request.bearer_auth(token.expose_secret()))
    }

    /// Forgets every token held in memory, so the next request of each asks tokenvault.
    pub fn clear(&self) {
        self.inner.slots.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// How many distinct requests have a token (or a call) in memory.
    pub fn cached(&self) -> usize {
        self.inner.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn slot(&self, key: Key) -> Arc<Slot> {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get(&key) {
            return Arc::clone(slot);
        }
        if slots.len() >= PRUNE_ABOVE {
            // Drop entries nobody is using whose token expired (or that never got one).
            slots.retain(|_, slot| {
                Arc::strong_count(slot) > 1
                    || slot.token.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|t| !t.is_expired())
            });
        }
        Arc::clone(slots.entry(key).or_default())
    }

    /// One request, with the retries of 503s.
    async fn fetch(&self, request: &TokenRequest) -> Result<Token, Error> {
        let inner = &self.inner;
        let mut retries = 0;
        let mut waited = Duration::ZERO;
        loop {
            let error = match self.call(request).await {
                Ok(token) => return Ok(token),
                Err(error) => error,
            };
            if error.status() != Some(503) || retries >= inner.max_retries {
                return Err(error);
            }
            let wait = error.retry_after().unwrap_or(RETRY_AFTER_WHEN_UNSAID);
            if waited + wait > inner.max_retry_wait {
                trace_event!(
                    debug,
                    wait_ms = wait.as_millis() as u64,
                    "tokenvault asked for a longer wait than is left; giving up"
                );
                return Err(error);
            }
            trace_event!(
                warn,
                code = error.code().unwrap_or("-"),
                wait_ms = wait.as_millis() as u64,
                "tokenvault answered 503; retrying after its Retry-After"
            );
            tokio::time::sleep(wait).await;
            waited += wait;
            retries += 1;
        }
    }

    /// One HTTP call.
    async fn call(&self, request: &TokenRequest) -> Result<Token, Error> {
        let inner = &self.inner;
        trace_event!(debug, account_id = %request.account_id, "asking tokenvault for a token");
        let (sent, sent_at) = (Instant::now(), SystemTime::now());
        let mut response = inner
            .http
            .post(inner.tokens_url.clone())
            .bearer_auth(inner.service_key.expose_secret())
            .header(header::ACCEPT, HeaderValue::from_static("application/json"))
            .json(&request.body())
            .timeout(inner.timeout)
            .send()
            .await?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(|value| value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
            .unwrap_or_default();
        let unexpected = |detail: String| Error::UnexpectedResponse { status: status.as_u16(), detail, retry_after };

        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(unexpected(format!("the answer is larger than {MAX_ANSWER_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }

        if status == StatusCode::OK {
            return match serde_json::from_slice::<Answer>(&body) {
                Ok(answer) => Ok(Token::from_answer(answer, sent, sent_at)),
                Err(error) => Err(unexpected(format!("the answer is not a token answer: {}", describe(&error)))),
            };
        }
        let problem = (content_type == "application/problem+json" || content_type == "application/json")
            .then(|| serde_json::from_slice::<ProblemBody>(&body).ok())
            .flatten();
        Err(match problem {
            Some(ProblemBody { code: Some(code), detail, instance }) => Error::from_problem(Problem {
                code,
                status: status.as_u16(),
                detail: detail.unwrap_or_default(),
                retry_after,
                instance,
            }),
            _ => unexpected(format!(
                "an answer that is neither a token nor a problem (content-type {:?})",
                if content_type.is_empty() { "none" } else { content_type.as_str() }
            )),
        })
    }
}

impl fmt::Debug for TokenvaultClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenvaultClient")
            .field("tokens_url", &self.inner.tokens_url.as_str())
            .field("service_key", &"[REDACTED]")
            .field("timeout", &self.inner.timeout)
            .field("max_retries", &self.inner.max_retries)
            .field("max_retry_wait", &self.inner.max_retry_wait)
            .field("cached", &self.cached())
            .finish()
    }
}

/// A problem body; only `code` is required.
#[derive(serde::Deserialize)]
struct ProblemBody {
    code: Option<String>,
    detail: Option<String>,
    instance: Option<String>,
}

/// What is wrong with a token answer, in serde's words when they cannot quote a value (a missing field),
/// else only where: a value in the answer could be the token.
fn describe(error: &serde_json::Error) -> String {
    let message = error.to_string();
    if message.starts_with("missing field") {
        message
    } else {
        format!("{:?} error at line {} column {}", error.classify(), error.line(), error.column())
    }
}

/// A `Retry-After` in seconds or as an HTTP date.
fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// Builds a [`TokenvaultClient`]; start with [`TokenvaultClient::builder`].
pub struct TokenvaultClientBuilder {
    internal_url: String,
    service_key: Option<SecretString>,
    timeout: Duration,
    max_retries: u32,
    max_retry_wait: Duration,
    http: Option<reqwest::Client>,
}

impl TokenvaultClientBuilder {
    /// The service key (`tvk_…`, from `tokenvault clients create`), sent as `Authorization: Bearer`.
    /// Required. Takes a [`SecretString`] or a `&str`/`String`.
    pub fn service_key(mut self, key: impl Into<SecretString>) -> Self {
        self.service_key = Some(key.into());
        self
    }

    /// The timeout of one HTTP call to tokenvault, from connecting to the end of the answer
    /// (default [`DEFAULT_TIMEOUT`], 15 s: above tokenvault's own 10 s upstream timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How many times a 503 is retried, after its `Retry-After` (default [`DEFAULT_MAX_RETRIES`]; 0
    /// never retries).
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// The most time spent waiting between retries of one request, in all (default
    /// [`DEFAULT_MAX_RETRY_WAIT`]). A `Retry-After` longer than what is left is not waited for: the 503
    /// is returned at once, with its `Retry-After`.
    pub fn max_retry_wait(mut self, wait: Duration) -> Self {
        self.max_retry_wait = wait;
        self
    }

    /// The `reqwest` client to send with (to share its connection pool, or set a proxy or TLS roots).
    /// By default the client makes its own. [`timeout`](Self::timeout) applies either way.
    pub fn http_client(mut self, http: reqwest::Client) -> Self {
        self.http = Some(http);
        self
    }

    /// The client.
    pub fn build(self) -> Result<TokenvaultClient, BuildError> {
        let service_key = self.service_key.ok_or(BuildError::MissingServiceKey)?;
        let key = service_key.expose_secret();
        if key.is_empty() || HeaderValue::from_str(&format!("Bearer {key}")).is_err() {
            return Err(BuildError::InvalidServiceKey);
        }
        let mut url = Url::parse(self.internal_url.trim()).map_err(|e| BuildError::InvalidUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
            return Err(BuildError::InvalidUrl(format!("the scheme {:?} is not http or https", url.scheme())));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(BuildError::InvalidUrl("it has a query or a fragment".into()));
        }
        let path = format!("{}/v1/tokens", url.path().trim_end_matches('/'));
        url.set_path(&path);
        let http = match self.http {
            Some(http) => http,
            None => reqwest::Client::builder()
                .connect_timeout(self.timeout.min(Duration::from_secs(5)))
                .build()
                .map_err(BuildError::Http)?,
        };
        Ok(TokenvaultClient {
            inner: Arc::new(Inner {
                http,
                tokens_url: url,
                service_key,
                timeout: self.timeout,
                max_retries: self.max_retries,
                max_retry_wait: self.max_retry_wait,
                slots: Mutex::default(),
            }),
        })
    }
}

impl fmt::Debug for TokenvaultClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenvaultClientBuilder")
            .field("internal_url", &self.internal_url)
            .field("service_key", &self.service_key.as_ref().map(|_| "[REDACTED]"))
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("max_retry_wait", &self.max_retry_wait)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(url: &str) -> Result<TokenvaultClient, BuildError> {
        TokenvaultClient::builder(url).service_key("tvk_secret").build()
    }

    #[test]
    fn the_tokens_url_keeps_a_path_prefix_and_bad_urls_and_keys_are_refused() {
        assert_eq!(client("http://h:8081").unwrap().inner.tokens_url.as_str(), "http://h:8081/v1/tokens");
        assert_eq!(client("https://h/tv/").unwrap().inner.tokens_url.as_str(), "https://h/tv/v1/tokens");
        for url in ["h:8081", "ftp://h", "http://h/?a=b", "not a url"] {
            assert!(matches!(client(url), Err(BuildError::InvalidUrl(_))), "{url}");
        }
        assert!(matches!(TokenvaultClient::builder("http://h").build(), Err(BuildError::MissingServiceKey)));
        let bad = TokenvaultClient::builder("http://h").service_key("tvk_\nx").build();
        assert!(matches!(bad, Err(BuildError::InvalidServiceKey)));
    }

    #[test]
    fn debug_never_shows_the_service_key() {
        let builder = TokenvaultClient::builder("http://h").service_key("tvk_secret");
        assert!(!format!("{builder:?}").contains("tvk_secret"));
        let client = builder.build().unwrap();
        assert!(!format!("{client:?}").contains("tvk_secret"), "{client:?}");
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let mut headers = header::HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        headers.insert(header::RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let wait = retry_after(&headers).unwrap();
        assert!(wait > Duration::from_secs(25) && wait <= Duration::from_secs(30), "{wait:?}");
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn a_bad_token_answer_is_described_without_quoting_it() {
        let error =
            serde_json::from_slice::<Answer>(br#"{"access_token":"at-1","token_type":"x","expires_in":"at-1"}"#)
                .err()
                .unwrap();
        assert!(!describe(&error).contains("at-1"), "{}", describe(&error));
        let error = serde_json::from_slice::<Answer>(br#"{"access_token":"at-1"}"#).err().unwrap();
        assert!(describe(&error).starts_with("missing field"), "{}", describe(&error));
    }
}
