//! The one API error type. Every 4xx/5xx answer is `application/problem+json` (RFC 9457) with `type`,
//! `title`, `status`, `detail` and a stable machine-readable `code`. Details never quote a secret, a client
//! id, a token or a service key; internal causes are logged once, here, and answered with an opaque 500.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};

use crate::identity::IdentityError;

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

/// Seconds a client should wait before retrying a 503.
pub const DATABASE_RETRY_AFTER_SECS: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the request body must be JSON (application/json)")]
    UnsupportedMediaType,
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("a service key is required: Authorization: Bearer tvk_...")]
    Unauthenticated,
    #[error("the Trackunit-Identity header is missing")]
    MissingIdentity,
    #[error("the Trackunit-Identity token was refused: {0}")]
    InvalidIdentity(#[source] IdentityError),
    #[error("{0}")]
    Forbidden(String),
    #[error("this app is not served here (not in TOKENVAULT_APPS)")]
    AppNotAllowed,
    #[error("no provider of this name is configured")]
    UnknownProvider,
    #[error("a client of this name exists (revoke it first to reuse the name)")]
    NameTaken,
    #[error("trackunit's credentials arrive by its callback; they cannot be registered here")]
    CredentialsFromCallback,
    #[error("no active installation (credentials) for this account, app and provider")]
    NotInstalled,
    #[error("installation not found")]
    InstallationNotFound,
    #[error("the account has several active installations; say which with app_id")]
    AmbiguousApp,
    #[error("the installation holds no credentials (uninstalled or revoked); only a new INSTALLED brings it back")]
    NoCredentials,
    #[error("the upstream refused one of the requested scopes")]
    InvalidScope,
    #[error("the upstream refused the request: {0}")]
    UpstreamRejected(String),
    /// `reason` is always our own words (an HTTP status, or which reply member was missing or
    /// ill-typed), never text from the upstream.
    #[error("the upstream failed after {attempts} attempts: {reason}")]
    UpstreamError { attempts: u32, reason: String },
    #[error("the upstream token endpoint could not be reached; retry later")]
    UpstreamUnavailable { retry_after_secs: u64 },
    #[error("the signing keys of Trackunit are not loaded yet; retry later")]
    IdentityKeysUnavailable { retry_after_secs: u64 },
    #[error("the database is unavailable; retry later")]
    DatabaseUnavailable,
    #[error("the stored credentials of this installation cannot be decrypted")]
    CredentialsUnreadable,
    #[error("no such resource")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    /// The stable code clients branch on. Changing one is a breaking API change.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::MissingIdentity => "missing_identity",
            ApiError::InvalidIdentity(_) => "invalid_identity",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::AppNotAllowed => "app_not_allowed",
            ApiError::NotInstalled => "not_installed",
            ApiError::UnknownProvider => "unknown_provider",
            ApiError::NameTaken => "name_taken",
            ApiError::CredentialsFromCallback => "credentials_from_callback",
            ApiError::InstallationNotFound | ApiError::NotFound => "not_found",
            ApiError::AmbiguousApp => "ambiguous_app",
            ApiError::NoCredentials => "no_credentials",
            ApiError::InvalidScope => "invalid_scope",
            ApiError::UpstreamRejected(_) => "upstream_rejected",
            ApiError::UpstreamError { .. } => "upstream_error",
            ApiError::UpstreamUnavailable { .. } => "upstream_unavailable",
            ApiError::IdentityKeysUnavailable { .. } => "identity_keys_unavailable",
            ApiError::DatabaseUnavailable => "database_unavailable",
            ApiError::CredentialsUnreadable => "credentials_unreadable",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Internal(_) => "internal",
        }
    }

    /// Seconds the caller should wait before retrying, sent as `Retry-After`.
    pub(crate) fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ApiError::UpstreamUnavailable { retry_after_secs }
            | ApiError::IdentityKeysUnavailable { retry_after_secs } => Some(*retry_after_secs),
            ApiError::DatabaseUnavailable => Some(DATABASE_RETRY_AFTER_SECS),
            _ => None,
        }
    }

    /// The problem+json body (RFC 9457) of this error. The OpenAPI document's examples are built from it
    /// too, so they show exactly what is sent.
    pub(crate) fn problem(&self) -> serde_json::Value {
        let status = self.status_code();
        let mut problem = serde_json::json!({
            "type": format!("urn:tokenvault:problem:{}", self.code()),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.to_string(),
            "code": self.code(),
        });
        // Which request this was, as its logs say (RFC 9457 `instance`); known while answering one.
        if let Some(id) = crate::routes::observe::current_request_id() {
            problem["instance"] = serde_json::json!(format!("urn:tokenvault:request:{}", id.0));
        }
        problem
    }

    /// Maps a database error: an unreachable database is a 503 the caller should retry; anything else is ours.
    pub fn from_database(error: sqlx::Error) -> Self {
        if is_unavailable(&error) {
            ApiError::DatabaseUnavailable
        } else {
            ApiError::Internal(anyhow::Error::new(error).context("database query failed"))
        }
    }
}

/// Whether a database error means "cannot reach the database now" rather than a bug in a query.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        // 57P01..57P03: admin shutdown, crash shutdown, cannot connect now; 08xxx: connection exceptions;
        // 53300: too many connections.
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|code| code.starts_with("57P") || code.starts_with("08") || code == "53300")
        }
        _ => false,
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        ApiError::from_database(error)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthenticated | ApiError::MissingIdentity | ApiError::InvalidIdentity(_) => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Forbidden(_) | ApiError::AppNotAllowed => StatusCode::FORBIDDEN,
            ApiError::NotInstalled
            | ApiError::UnknownProvider
            | ApiError::InstallationNotFound
            | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::AmbiguousApp
            | ApiError::NoCredentials
            | ApiError::CredentialsFromCallback
            | ApiError::NameTaken => StatusCode::CONFLICT,
            ApiError::InvalidScope => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::UpstreamRejected(_) | ApiError::UpstreamError { .. } => StatusCode::BAD_GATEWAY,
            ApiError::UpstreamUnavailable { .. }
            | ApiError::IdentityKeysUnavailable { .. }
            | ApiError::DatabaseUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::CredentialsUnreadable | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if let ApiError::Internal(cause) = self {
            // The one place an internal error is logged, with its whole cause chain.
            tracing::error!(error.cause_chain = ?cause, "request failed");
        }
        let body = self.problem();
        let mut response = HttpResponse::build(status);
        response.insert_header((header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json")));
        response.insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")));
        if let Some(seconds) = self.retry_after_secs() {
            response.insert_header((header::RETRY_AFTER, seconds.to_string()));
        }
        if matches!(self, ApiError::Unauthenticated) {
            response.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        response.body(body.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;

    #[test]
    fn problem_bodies_carry_the_code_and_retry_after() {
        let response = ApiError::DatabaseUnavailable.error_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers().get(header::RETRY_AFTER).unwrap(), "2");
        assert_eq!(response.headers().get(header::CONTENT_TYPE).unwrap(), "application/problem+json");
        let body = response.into_body().try_into_bytes().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["code"], "database_unavailable");
        assert_eq!(json["status"], 503);
    }

    #[test]
    fn internal_errors_answer_opaquely() {
        let error = ApiError::Internal(anyhow::anyhow!("password=hunter2 in a driver message"));
        let body = error.error_response().into_body().try_into_bytes().unwrap();
        assert!(!String::from_utf8_lossy(&body).contains("hunter2"));
    }
}
