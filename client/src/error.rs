//! The errors of [`TokenvaultClient`](crate::TokenvaultClient): one variant per problem `code` that
//! `POST /v1/tokens` answers, plus [`Error::Transport`] and [`Error::UnexpectedResponse`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A problem answer of tokenvault (`application/problem+json`, RFC 9457), as carried by the variants of
/// [`Error`] that stand for a problem `code`.
///
/// tokenvault promises that `detail` never holds a secret, a client id, a token or a service key; this
/// client adds none either.
#[derive(Clone, PartialEq, Eq)]
pub struct Problem {
    /// The stable machine-readable `code`, for example `not_installed`.
    pub code: String,
    /// The HTTP status of the answer.
    pub status: u16,
    /// The human-readable `detail` (may change between versions: branch on the variant, not on this).
    pub detail: String,
    /// The answer's `Retry-After`, when it had one (tokenvault sends one with every 503).
    pub retry_after: Option<Duration>,
    /// The problem's `instance`, when the server sent one: the request's id
    /// (`urn:tokenvault:request:…`), also on tokenvault's log lines of the request.
    pub instance: Option<String>,
}

impl fmt::Debug for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Problem");
        debug.field("code", &self.code).field("status", &self.status).field("detail", &self.detail);
        if let Some(retry_after) = self.retry_after {
            debug.field("retry_after", &retry_after);
        }
        if let Some(instance) = &self.instance {
            debug.field("instance", instance);
        }
        debug.finish()
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.detail)?;
        if let Some(retry_after) = self.retry_after {
            write!(f, " (retry after {} s)", retry_after.as_secs())?;
        }
        Ok(())
    }
}

/// Why [`TokenvaultClient::token`](crate::TokenvaultClient::token) gave no token.
///
/// Each documented problem `code` of `POST /v1/tokens` has its own variant (named after the code),
/// carrying the answer's status, `detail` and `Retry-After`. Neither `Display` nor `Debug` ever shows the
/// service key or a token. The enum is `#[non_exhaustive]`: tokenvault may add codes, which this version
/// reports as [`Error::OtherProblem`].
///
/// ```
/// # async fn example(client: &tokenvault_client::TokenvaultClient) {
/// use tokenvault_client::{Error, TokenRequest};
///
/// match client.token(&TokenRequest::new("7b1c5e0a-acme").with_scopes(["asset.view"])).await {
///     Ok(token) => println!("expires in {:?}", token.expires_in()),
///     Err(Error::NotInstalled(problem)) => println!("the account has not installed the app: {}", problem.detail),
///     Err(error) if error.is_transient() => println!("try again later: {error}"),
///     Err(error) => println!("no token: {error}"),
/// }
/// # }
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// 400 `invalid_request`: the request is not a valid token request (a bad scope, `min_ttl` over a day,
    /// `app_id` with another provider than Trackunit, no scopes for a provider without default ones…).
    #[error("tokenvault refused the request: {0}")]
    InvalidRequest(Problem),
    /// 401 `unauthenticated`: no service key, an unknown one, or a revoked one.
    #[error("tokenvault refused the service key: {0}")]
    Unauthenticated(Problem),
    /// 403 `forbidden`: the key is not granted this provider, account, app or scope (or the token
    /// endpoint granted scopes the key is not granted).
    #[error("the service key is not allowed this token: {0}")]
    Forbidden(Problem),
    /// 404 `unknown_provider`: no provider of this name is configured.
    #[error("tokenvault has no such provider: {0}")]
    UnknownProvider(Problem),
    /// 404 `not_installed`: no usable installation (or registered credentials) for this account (and app).
    #[error("no installation for this account: {0}")]
    NotInstalled(Problem),
    /// 409 `ambiguous_app`: the account has several usable installations; set
    /// [`TokenRequest::app_id`](crate::TokenRequest::app_id).
    #[error("several apps are installed for this account, name one: {0}")]
    AmbiguousApp(Problem),
    /// 422 `invalid_scope`: the provider's token endpoint refused a requested scope.
    #[error("the token endpoint refused a scope: {0}")]
    InvalidScope(Problem),
    /// 502 `upstream_rejected`: the provider's token endpoint refused the credentials or the request.
    #[error("the token endpoint refused the request: {0}")]
    UpstreamRejected(Problem),
    /// 502 `upstream_error`: the token endpoint failed (5xx on its last attempt, or an unreadable reply).
    #[error("the token endpoint failed: {0}")]
    UpstreamError(Problem),
    /// 503 `upstream_unavailable`: the token endpoint cannot be reached now, or the request backs off
    /// after a failed mint. Carries `Retry-After`; the client retried it as far as its retry budget allowed.
    #[error("the token endpoint is unavailable: {0}")]
    UpstreamUnavailable(Problem),
    /// 503 `database_unavailable`: tokenvault's database cannot be reached now. Carries `Retry-After`.
    #[error("tokenvault's database is unavailable: {0}")]
    DatabaseUnavailable(Problem),
    /// 500 `credentials_unreadable`: the stored credentials of the installation do not decrypt.
    #[error("tokenvault cannot read the stored credentials: {0}")]
    CredentialsUnreadable(Problem),
    /// 413 `payload_too_large`: the request body is larger than tokenvault accepts (64 KiB).
    #[error("the request is too large: {0}")]
    PayloadTooLarge(Problem),
    /// 415 `unsupported_media_type`: the request body was not sent as JSON.
    #[error("the request was not sent as JSON: {0}")]
    UnsupportedMediaType(Problem),
    /// 500 `internal`: a bug or an unexpected database error in tokenvault.
    #[error("tokenvault failed: {0}")]
    Internal(Problem),
    /// 404 `not_found`: no such route (the internal URL is probably wrong, or points at the public
    /// listener).
    #[error("tokenvault has no such route (check the internal URL): {0}")]
    NotFound(Problem),
    /// 405 `method_not_allowed`: the route does not take this method (the URL is probably wrong).
    #[error("tokenvault does not take this method here (check the internal URL): {0}")]
    MethodNotAllowed(Problem),
    /// A problem answer whose `code` this version of the client does not know.
    #[error("tokenvault answered a problem: {0}")]
    OtherProblem(Problem),
    /// The request could not be sent or its answer not received: connection refused, timeout, TLS…
    #[error("could not reach tokenvault: {0}")]
    Transport(#[source] Arc<reqwest::Error>),
    /// An answer that is neither a token nor a problem: another server answering on the URL, or a proxy.
    /// The answer's body is never quoted (it could hold a token).
    #[error("unexpected answer from tokenvault: HTTP {status}: {detail}")]
    UnexpectedResponse {
        /// The HTTP status of the answer.
        status: u16,
        /// What was wrong with it, in this client's words.
        detail: String,
        /// The answer's `Retry-After`, when it had one.
        retry_after: Option<Duration>,
    },
}

impl Error {
    /// Maps a problem answer to its variant.
    pub(crate) fn from_problem(problem: Problem) -> Self {
        match problem.code.as_str() {
            "invalid_request" => Error::InvalidRequest(problem),
            "unauthenticated" => Error::Unauthenticated(problem),
            "forbidden" => Error::Forbidden(problem),
            "unknown_provider" => Error::UnknownProvider(problem),
            "not_installed" => Error::NotInstalled(problem),
            "ambiguous_app" => Error::AmbiguousApp(problem),
            "invalid_scope" => Error::InvalidScope(problem),
            "upstream_rejected" => Error::UpstreamRejected(problem),
            "upstream_error" => Error::UpstreamError(problem),
            "upstream_unavailable" => Error::UpstreamUnavailable(problem),
            "database_unavailable" => Error::DatabaseUnavailable(problem),
            "credentials_unreadable" => Error::CredentialsUnreadable(problem),
            "payload_too_large" => Error::PayloadTooLarge(problem),
            "unsupported_media_type" => Error::UnsupportedMediaType(problem),
            "internal" => Error::Internal(problem),
            "not_found" => Error::NotFound(problem),
            "method_not_allowed" => Error::MethodNotAllowed(problem),
            _ => Error::OtherProblem(problem),
        }
    }

    /// The problem answer behind this error, if tokenvault answered one.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Error::InvalidRequest(problem)
            | Error::Unauthenticated(problem)
            | Error::Forbidden(problem)
            | Error::UnknownProvider(problem)
            | Error::NotInstalled(problem)
            | Error::AmbiguousApp(problem)
            | Error::InvalidScope(problem)
            | Error::UpstreamRejected(problem)
            | Error::UpstreamError(problem)
            | Error::UpstreamUnavailable(problem)
            | Error::DatabaseUnavailable(problem)
            | Error::CredentialsUnreadable(problem)
            | Error::PayloadTooLarge(problem)
            | Error::UnsupportedMediaType(problem)
            | Error::Internal(problem)
            | Error::NotFound(problem)
            | Error::MethodNotAllowed(problem)
            | Error::OtherProblem(problem) => Some(problem),
            Error::Transport(_) | Error::UnexpectedResponse { .. } => None,
        }
    }

    /// The problem `code` (`"not_installed"`, …), if tokenvault answered a problem.
    pub fn code(&self) -> Option<&str> {
        self.problem().map(|problem| problem.code.as_str())
    }

    /// The HTTP status of the answer, if there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::UnexpectedResponse { status, .. } => Some(*status),
            Error::Transport(error) => error.status().map(|status| status.as_u16()),
            other => other.problem().map(|problem| problem.status),
        }
    }

    /// The answer's `detail` (or, for [`Error::UnexpectedResponse`], what was wrong with it).
    pub fn detail(&self) -> Option<&str> {
        match self {
            Error::UnexpectedResponse { detail, .. } => Some(detail),
            other => other.problem().map(|problem| problem.detail.as_str()),
        }
    }

    /// The answer's `Retry-After`, if it had one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::UnexpectedResponse { retry_after, .. } => *retry_after,
            other => other.problem().and_then(|problem| problem.retry_after),
        }
    }

    /// Whether the same request may succeed later without any change: a 503, a 502 `upstream_error`,
    /// or a transport failure. Refusals (401, 403, 404, 409, 422, 502 `upstream_rejected`) are not.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport(_) => true,
            Error::UpstreamError(_) => true,
            other => other.status() == Some(503),
        }
    }
}

impl From<reqwest::Error> for Error {
    fn from(error: reqwest::Error) -> Self {
        Error::Transport(Arc::new(error))
    }
}

/// Why [`TokenvaultClientBuilder::build`](crate::TokenvaultClientBuilder::build) made no client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// No service key was given ([`TokenvaultClientBuilder::service_key`](crate::TokenvaultClientBuilder::service_key)).
    #[error("a service key is required (TokenvaultClientBuilder::service_key)")]
    MissingServiceKey,
    /// The service key is not usable in a header (empty, or with control characters). It is not shown.
    #[error("the service key is empty or holds characters a header cannot carry")]
    InvalidServiceKey,
    /// The internal URL is not an absolute `http` or `https` URL.
    #[error("the internal URL is not an absolute http(s) URL: {0}")]
    InvalidUrl(String),
    /// The HTTP client could not be built (TLS set-up).
    #[error("the HTTP client could not be built: {0}")]
    Http(#[source] reqwest::Error),
}
