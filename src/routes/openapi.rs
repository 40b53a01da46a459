//! `GET /openapi.json`: the OpenAPI 3.1 description of both listeners, serialized once at start
//! ([`document_json`], kept in `AppState`) and served as it is, on the internal listener only.
//!
//! The types here are documentation only: nothing builds or parses them. The handlers keep their own
//! parsing and writing (the token path is tuned for CPU per request), and `#[utoipa::path]` on a handler
//! adds a type beside it, not code to it. Two things keep the description true to the code: the error
//! answers are rendered from real [`ApiError`] values (status, code and body come from `error.rs`), and
//! `tests/api/openapi.rs` checks that every documented route exists and that the request schemas and
//! examples match what the handlers accept.

use std::collections::BTreeMap;

use actix_web::http::header::ContentType;
use actix_web::{HttpResponse, ResponseError, web};
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr};
use utoipa::{IntoResponses, Modify, OpenApi, PartialSchema, ToSchema};

use super::AppState;
use crate::error::ApiError;
use crate::identity::IdentityError;

/// The document, serialized once: it never changes while the process runs.
pub fn document_json() -> serde_json::Result<web::Bytes> {
    ApiDoc::openapi().to_json().map(web::Bytes::from)
}

/// The document, pretty-printed: `tokenvault openapi`, and docs/openapi.json.
pub fn document_pretty() -> serde_json::Result<String> {
    ApiDoc::openapi().to_pretty_json()
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "internal",
    summary = "This OpenAPI 3.1 document",
    description = "Describes the routes of both listeners. The tag of an operation names the listener that \
                   serves it. No key is needed.",
    responses((status = 200, description = "The OpenAPI document.", body = Object,
               content_type = "application/json")),
)]
pub async fn serve(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().content_type(ContentType::json()).body(state.openapi.clone())
}

#[derive(OpenApi)]
#[openapi(
    info(description = "tokenvault keeps the client credentials of a Trackunit IrisX app and hands out access \
                        tokens to internal services.\n\n\
                        It serves two listeners. Operations tagged `public` are on the public listener \
                        (default `0.0.0.0:8080`), the only one to expose to the internet; operations tagged \
                        `internal` are on the internal listener (default `127.0.0.1:8081`), which serves this \
                        document. `/healthz` and `/readyz` are on both.\n\n\
                        Every error answer is `application/problem+json` (RFC 9457), except the 503 of \
                        `/readyz`. An unknown path answers 404 `not_found`, and a method a path does not \
                        document answers 405 `method_not_allowed`."),
    paths(
        super::callbacks::trackunit,
        super::tokens::issue,
        super::installations::list,
        super::installations::revoke,
        super::installations::reactivate,
        super::providers::list,
        super::providers::put,
        super::providers::delete,
        super::clients::create,
        super::clients::list,
        super::clients::get,
        super::clients::revoke,
        super::clients::rotate,
        super::audit::list,
        super::health::healthz,
        super::health::readyz,
        super::health::metrics,
        serve,
    ),
    components(schemas(Problem)),
    modifiers(&ServiceKeyScheme),
    tags(
        (name = "public", description = "The public listener, default `0.0.0.0:8080`: Trackunit's callback and \
                                         health."),
        (name = "internal", description = "The internal listener, default `127.0.0.1:8081`: the token and admin \
                                           API, health, metrics and this document. Never expose it to the \
                                           internet."),
    ),
)]
struct ApiDoc;

/// Declares the bearer scheme that `security(("service_key" = []))` on the `/v1` operations refers to.
struct ServiceKeyScheme;

impl Modify for ServiceKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("tvk_…")
            .description(Some(
                "A service key made by `tokenvault clients create`: `Authorization: Bearer tvk_…`. Routes that \
                 say so need a key made with `--admin`.",
            ))
            .build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("service_key", SecurityScheme::Http(scheme));
    }
}

/// An error answer: RFC 9457 problem details, sent as `application/problem+json` with
/// `Cache-Control: no-store`. These five fields always, `instance` when answering a request, and no others.
#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct Problem {
    /// Always `urn:tokenvault:problem:<code>`.
    #[schema(format = "uri", example = "urn:tokenvault:problem:not_installed")]
    r#type: String,
    /// The reason phrase of `status`.
    #[schema(example = "Not Found")]
    title: String,
    /// The HTTP status of the answer.
    #[schema(minimum = 400, maximum = 599, example = 404)]
    status: u16,
    /// For humans; it may change. It never holds a secret, a client id, a token or a service key.
    #[schema(example = "no active installation for this account and app")]
    detail: String,
    /// Stable and machine-readable: branch on this. Each operation lists the codes it can answer.
    #[schema(example = "not_installed")]
    code: String,
    /// The request, as its log lines name it: `urn:tokenvault:request:<id>`, the id being the caller's
    /// `X-Request-Id` (or W3C `traceparent` trace id), else one tokenvault made; the answer's
    /// `X-Request-Id` header carries it too.
    #[schema(format = "uri", example = "urn:tokenvault:request:4bf92f3577b34da6a3ce929d0e0e4736")]
    instance: Option<String>,
}

/// A request for an access token for one account at one provider.
#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct TokenRequest {
    /// The provider (see `GET /v1/providers`); `trackunit` when omitted.
    #[schema(nullable = false, pattern = "^[a-z][a-z0-9_-]{0,31}$", default = "trackunit")]
    provider: Option<String>,
    /// The account the token is for. No control characters.
    #[schema(min_length = 1, max_length = 256)]
    account_id: String,
    /// The `irisAppId` (Trackunit only). Needed only when the account has installed several of your apps.
    #[schema(min_length = 1, max_length = 256)]
    app_id: Option<String>,
    /// The scopes to ask for. Order and duplicates do not matter. May be omitted or empty when the
    /// provider has `default_scopes` (or sends no scope); the key must be granted whichever are asked.
    #[schema(nullable = false, max_items = 64)]
    scopes: Option<Vec<Scope>>,
    /// The least time, in seconds, the token must have left. A cached token with less left is not handed
    /// out, except: above half the token's lifetime, half its lifetime is enough; and after a transient
    /// failure to mint, any token not yet expired may be. Always read `expires_in`.
    #[schema(nullable = false, minimum = 0, maximum = 86400, default = 60)]
    min_ttl_seconds: Option<u32>,
}

/// An RFC 6749 scope-token without a comma: printable ASCII other than space, `,`, `"` and `\`.
#[derive(ToSchema)]
#[schema(min_length = 1, max_length = 256, pattern = r#"^[!#-+\--\[\]-~]+$"#, example = "asset.view")]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct Scope(String);

/// An access token. Sent with `Cache-Control: no-store` and `Pragma: no-cache`.
#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct TokenAnswer {
    /// The token, as the provider's token endpoint issued it.
    access_token: String,
    /// As the token endpoint said, usually `Bearer`.
    token_type: String,
    /// Whole seconds left.
    #[schema(minimum = 0)]
    expires_in: u64,
    /// When the token expires, RFC 3339 UTC.
    #[schema(format = DateTime)]
    expires_at: String,
    /// The scope the token endpoint granted; if it did not say, the requested scopes, sorted and joined
    /// with spaces.
    scope: String,
}

/// An account's credentials at a provider. `client_id` is required; `client_secret` too, unless a
/// `refresh_token` is given (a public client). Each at most 8 KiB, without control characters. With a
/// `refresh_token` the credentials are user-delegated: every token is minted with the refresh token grant.
#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct CredentialsRequest {
    #[schema(min_length = 1, max_length = 8192)]
    client_id: String,
    #[schema(min_length = 1, max_length = 8192)]
    client_secret: Option<String>,
    #[schema(min_length = 1, max_length = 8192)]
    refresh_token: Option<String>,
}

/// Registered credentials, as answered: never a secret.
#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct CredentialsSummary {
    provider: String,
    account_id: String,
    status: InstallationStatus,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
}

/// A service client to create. Grants: `accounts`, `scopes`, `apps` (default all) and `providers` (default
/// `trackunit`), each value or `*`; `admin` allows the admin API.
#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct ClientRequest {
    #[schema(min_length = 1, max_length = 256)]
    name: String,
    accounts: Option<Vec<String>>,
    scopes: Option<Vec<String>>,
    apps: Option<Vec<String>>,
    providers: Option<Vec<String>>,
    admin: Option<bool>,
    /// When the key stops working (RFC 3339, in the future); never when absent.
    #[schema(format = DateTime)]
    expires_at: Option<String>,
}

/// A rotation's grace period: how long the old key keeps working (default 86400 s, at most 30 days).
#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct RotateRequest {
    #[schema(minimum = 0, maximum = 2592000)]
    grace_seconds: Option<u64>,
}

/// A service client, as listed: never a key.
#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct ClientSummary {
    name: String,
    /// `active`, `revoked` or `expired`.
    status: String,
    admin: bool,
    accounts: Vec<String>,
    scopes: Vec<String>,
    apps: Vec<String>,
    providers: Vec<String>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    revoked_at: Option<String>,
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    /// Until when a key a rotation replaced still works.
    #[schema(format = DateTime)]
    previous_key_expires_at: Option<String>,
    /// To within a minute.
    #[schema(format = DateTime)]
    last_used_at: Option<String>,
}

/// A client with its new key, shown this once (`tvk_…`; only its SHA-256 is stored): the members of a
/// client summary, and `key`.
#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct CreatedClient {
    /// The service key. Keep it secret; it cannot be shown again.
    key: String,
    name: String,
    status: String,
    admin: bool,
    accounts: Vec<String>,
    scopes: Vec<String>,
    apps: Vec<String>,
    providers: Vec<String>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    revoked_at: Option<String>,
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    #[schema(format = DateTime)]
    previous_key_expires_at: Option<String>,
    #[schema(format = DateTime)]
    last_used_at: Option<String>,
}

#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct ClientList {
    clients: Vec<ClientSummary>,
}

/// A page of the audit trail, newest first.
#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct AuditPage {
    events: Vec<AuditRecord>,
    /// The `before` of the next page; null on the last.
    next: Option<i64>,
}

/// One audit record: never a secret.
#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct AuditRecord {
    id: i64,
    #[schema(format = DateTime)]
    at: String,
    /// `callback`, `cli`, `prober`, `tokenvault` or `client:<name>`.
    actor: String,
    action: String,
    outcome: String,
    provider: Option<String>,
    app_id: Option<String>,
    account_id: Option<String>,
    #[schema(format = "uuid")]
    installation_id: Option<String>,
    client_name: Option<String>,
    request_id: Option<String>,
}

/// Every installation, oldest first. Never a credential or a client id.
#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct InstallationList {
    installations: Vec<InstallationSummary>,
}

/// One account's credentials at one provider: for Trackunit, one installation of an app by an account.
#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct InstallationSummary {
    #[schema(format = "uuid")]
    id: String,
    provider: String,
    /// The `irisAppId`; null for other providers.
    app_id: Option<String>,
    account_id: String,
    status: InstallationStatus,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
}

/// `uninstalled`: an `UNINSTALLED` callback arrived. `revoked`: an admin revoked it. `rejected`: the token
/// endpoint answered `invalid_client`.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub enum InstallationStatus {
    Active,
    Uninstalled,
    Revoked,
    Rejected,
}

/// The process is up.
#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct Health {
    #[schema(inline)]
    status: HealthStatus,
}

#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub enum HealthStatus {
    Ok,
}

/// What readiness depends on: on the public listener, both `database` and `jwks`; on the internal one,
/// `database`, or tokens in memory.
#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct Readiness {
    /// The database answers.
    database: bool,
    /// Trackunit's signing keys (JWKS) are loaded.
    jwks: bool,
    /// Access tokens this replica holds in memory. Internal listener only: the public one does not say
    /// how busy the replica is.
    tokens_in_memory: Option<u64>,
}

/// The body Trackunit sends, by `type`: `INSTALLED`, `UNINSTALLED`, or any other type (recorded, nothing
/// stored). A JSON object without duplicate keys; fields not named here are ignored.
pub struct CallbackMessage;

impl PartialSchema for CallbackMessage {
    fn schema() -> RefOr<Schema> {
        // anyOf, not oneOf: an INSTALLED message is also an object with a string `type`.
        AnyOfBuilder::new()
            .item(Ref::from_schema_name(InstalledCallback::name()))
            .item(Ref::from_schema_name(UninstalledCallback::name()))
            .item(Ref::from_schema_name(OtherCallback::name()))
            .description(Some(
                "An `INSTALLED` or `UNINSTALLED` message, or a message of another type, which is recorded and \
                 answered 202.",
            ))
            .into()
    }
}

impl ToSchema for CallbackMessage {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.extend([
            (InstalledCallback::name().into_owned(), InstalledCallback::schema()),
            (UninstalledCallback::name().into_owned(), UninstalledCallback::schema()),
            (OtherCallback::name().into_owned(), OtherCallback::schema()),
        ]);
    }
}

/// An account installed the app: store its credentials, or replace them. Each field is a non-empty
/// string of at most 256 characters without control characters.
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct InstalledCallback {
    #[schema(inline)]
    r#type: InstalledType,
    #[schema(min_length = 1, max_length = 256)]
    iris_app_id: String,
    #[schema(min_length = 1, max_length = 256)]
    account_id: String,
    /// Sealed with AES-256-GCM before it is stored; never shown again.
    #[schema(min_length = 1, max_length = 256)]
    client_id: String,
    /// Sealed with AES-256-GCM before it is stored; never shown again.
    #[schema(min_length = 1, max_length = 256)]
    client_secret: String,
}

#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub enum InstalledType {
    #[schema(rename = "INSTALLED")]
    Installed,
}

/// An account uninstalled the app: erase its credentials and cached tokens.
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct UninstalledCallback {
    #[schema(inline)]
    r#type: UninstalledType,
    #[schema(min_length = 1, max_length = 256)]
    iris_app_id: String,
    #[schema(min_length = 1, max_length = 256)]
    account_id: String,
}

#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub enum UninstalledType {
    #[schema(rename = "UNINSTALLED")]
    Uninstalled,
}

/// A message of another type: recorded in the audit trail, nothing stored.
#[derive(ToSchema)]
#[expect(dead_code, reason = "a documentation type: described, never built")]
pub struct OtherCallback {
    #[schema(min_length = 1, max_length = 256)]
    r#type: String,
}

/// The problems of `POST /v1/tokens`, in the order its checks run.
pub struct TokenProblems;

impl IntoResponses for TokenProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problem_responses(&[
            (ApiError::Unauthenticated, "No service key, an unknown key, or a revoked key."),
            (ApiError::UnsupportedMediaType, "`Content-Type` is not `application/json` or `application/*+json`."),
            (ApiError::PayloadTooLarge(super::tokens::MAX_REQUEST_BYTES), "The body is larger than 64 KiB."),
            (
                ApiError::InvalidRequest("`account_id` is missing".into()),
                "The body is unreadable, slower than 10 s, not valid JSON, or has a missing or ill-typed field.",
            ),
            (
                ApiError::Forbidden("this key is not granted this account".into()),
                "The key is not granted this provider, account, app or a requested scope; or the token endpoint \
                 granted scopes beyond the request that the key is not granted.",
            ),
            (ApiError::UnknownProvider, "No provider of this name is configured."),
            (ApiError::NotInstalled, "No usable installation for this account (and app) at this provider."),
            (ApiError::AmbiguousApp, "The account has several usable installations: set `app_id`."),
            (ApiError::InvalidScope, "The token endpoint answered `invalid_scope`."),
            (
                ApiError::UpstreamRejected("HTTP 400, invalid_grant".into()),
                "The token endpoint refused the request; `invalid_client` also marks the installation \
                 `rejected`.",
            ),
            (
                ApiError::UpstreamError { attempts: 3, reason: "HTTP 503".into() },
                "The token endpoint answered 5xx on the last attempt, or a reply that cannot be read.",
            ),
            (
                ApiError::UpstreamUnavailable { retry_after_secs: 5 },
                "The token endpoint cannot be reached, timed out, is rate-limiting, or is backed off after a \
                 failed mint.",
            ),
            (ApiError::DatabaseUnavailable, "The database cannot be reached now."),
            (ApiError::CredentialsUnreadable, "The stored credentials of this installation do not decrypt."),
            (internal(), "A bug or an unexpected database error."),
        ])
    }
}

/// The problems of `GET /v1/installations`.
pub struct ListProblems;

impl IntoResponses for ListProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problem_responses(&[
            (ApiError::Unauthenticated, "No service key, an unknown key, or a revoked key."),
            (ApiError::Forbidden("this route needs an admin key".into()), "The key is not an admin key."),
            (ApiError::DatabaseUnavailable, "The database cannot be reached now."),
            (internal(), "A bug or an unexpected database error."),
        ])
    }
}

/// The problems of `DELETE /v1/installations/{id}`.
pub struct RevokeProblems;

impl IntoResponses for RevokeProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problem_responses(&[
            (ApiError::Unauthenticated, "No service key, an unknown key, or a revoked key."),
            (ApiError::Forbidden("this route needs an admin key".into()), "The key is not an admin key."),
            (ApiError::InstallationNotFound, "The id is not a UUID, or no installation has it."),
            (ApiError::DatabaseUnavailable, "The database cannot be reached now."),
            (internal(), "A bug or an unexpected database error."),
        ])
    }
}

/// The problems of `POST /v1/installations/{id}/reactivate`.
pub struct ReactivateProblems;

impl IntoResponses for ReactivateProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problem_responses(&[
            (ApiError::Unauthenticated, "No service key, an unknown key, or a revoked key."),
            (ApiError::Forbidden("this route needs an admin key".into()), "The key is not an admin key."),
            (ApiError::InstallationNotFound, "The id is not a UUID, or no installation has it."),
            (ApiError::NoCredentials, "The installation is uninstalled or revoked: it holds no credentials."),
            (ApiError::DatabaseUnavailable, "The database cannot be reached now."),
            (internal(), "A bug or an unexpected database error."),
        ])
    }
}

/// The problems of `PUT /v1/providers/{provider}/accounts/{account_id}/credentials`.
pub struct CredentialsProblems;

impl IntoResponses for CredentialsProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problem_responses(&[
            (ApiError::InvalidRequest("`client_id` is required".into()), "The body or the account id is malformed."),
            (ApiError::Unauthenticated, "No service key, an unknown key, or a revoked key."),
            (ApiError::Forbidden("this route needs an admin key".into()), "The key is not an admin key."),
            (ApiError::UnknownProvider, "No provider of this name is configured."),
            (ApiError::CredentialsFromCallback, "The provider is `trackunit`, whose credentials arrive by callback."),
            (ApiError::PayloadTooLarge(32 * 1024), "The body is larger than 32 KiB."),
            (ApiError::UnsupportedMediaType, "`Content-Type` is not `application/json` or `application/*+json`."),
            (ApiError::DatabaseUnavailable, "The database cannot be reached now."),
            (internal(), "A bug or an unexpected database error."),
        ])
    }
}

/// The problems of `DELETE /v1/providers/{provider}/accounts/{account_id}/credentials`.
pub struct CredentialsDeleteProblems;

impl IntoResponses for CredentialsDeleteProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problem_responses(&[
            (ApiError::InvalidRequest("the account id must not be empty".into()), "The account id is malformed."),
            (ApiError::Unauthenticated, "No service key, an unknown key, or a revoked key."),
            (ApiError::Forbidden("this route needs an admin key".into()), "The key is not an admin key."),
            (ApiError::UnknownProvider, "No provider of this name is configured."),
            (ApiError::NotFound, "No credentials of this account at this provider to delete."),
            (ApiError::CredentialsFromCallback, "The provider is `trackunit`, whose credentials arrive by callback."),
            (ApiError::DatabaseUnavailable, "The database cannot be reached now."),
            (internal(), "A bug or an unexpected database error."),
        ])
    }
}

/// The problems of `POST /v1/clients`.
pub struct ClientProblems;

impl IntoResponses for ClientProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problem_responses(&[
            (ApiError::InvalidRequest("`name` must not be empty".into()), "The body is malformed or a grant invalid."),
            (ApiError::Unauthenticated, "No service key, an unknown key, or a revoked key."),
            (ApiError::Forbidden("this route needs an admin key".into()), "The key is not an admin key."),
            (ApiError::NameTaken, "A client of this name exists and is not revoked."),
            (ApiError::PayloadTooLarge(64 * 1024), "The body is larger than 64 KiB."),
            (ApiError::UnsupportedMediaType, "`Content-Type` is not `application/json` or `application/*+json`."),
            (ApiError::DatabaseUnavailable, "The database cannot be reached now."),
            (internal(), "A bug or an unexpected database error."),
        ])
    }
}

/// The problems of the `/v1/clients/{name}` routes.
pub struct ClientNameProblems;

impl IntoResponses for ClientNameProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problem_responses(&[
            (ApiError::InvalidRequest("`grace_seconds` must be at most 2592000 (30 days)".into()), "A bad body."),
            (ApiError::Unauthenticated, "No service key, an unknown key, or a revoked key."),
            (ApiError::Forbidden("this route needs an admin key".into()), "The key is not an admin key."),
            (ApiError::NotFound, "No client of this name that is not revoked."),
            (ApiError::UnsupportedMediaType, "`Content-Type` is not `application/json` or `application/*+json`."),
            (ApiError::DatabaseUnavailable, "The database cannot be reached now."),
            (internal(), "A bug or an unexpected database error."),
        ])
    }
}

/// The problems of `GET /v1/audit`.
pub struct AuditProblems;

impl IntoResponses for AuditProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problem_responses(&[
            (ApiError::InvalidRequest("`limit` must be from 1 to 1000".into()), "A bad query."),
            (ApiError::Unauthenticated, "No service key, an unknown key, or a revoked key."),
            (ApiError::Forbidden("this route needs an admin key".into()), "The key is not an admin key."),
            (ApiError::DatabaseUnavailable, "The database cannot be reached now."),
            (internal(), "A bug or an unexpected database error."),
        ])
    }
}

/// The problems of `POST /callbacks/trackunit`, in the order its checks run.
pub struct CallbackProblems;

impl IntoResponses for CallbackProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problem_responses(&[
            (ApiError::UnsupportedMediaType, "`Content-Type` is not `application/json` or `application/*+json`."),
            (ApiError::PayloadTooLarge(super::callbacks::MAX_CALLBACK_BYTES), "The body is larger than 64 KiB."),
            (ApiError::MissingIdentity, "No `Trackunit-Identity` header, or an empty one."),
            (
                ApiError::InvalidIdentity(IdentityError::Expired),
                "The identity JWT was refused, or its claims name another app or account than the body.",
            ),
            (
                ApiError::IdentityKeysUnavailable { retry_after_secs: super::callbacks::KEYS_RETRY_AFTER_SECS },
                "Trackunit's signing keys (JWKS) have not been loaded yet.",
            ),
            (
                ApiError::InvalidRequest("`clientSecret` is missing".into()),
                "The body is unreadable, slower than 10 s, not a JSON object, repeats a key, or has a missing \
                 or ill-typed field.",
            ),
            (ApiError::AppNotAllowed, "The `irisAppId` is not in `TOKENVAULT_APPS`."),
            (ApiError::DatabaseUnavailable, "The database cannot be reached now."),
            (internal(), "A bug or an unexpected database error."),
        ])
    }
}

/// What every internal error looks like from outside: the cause is logged, never sent.
fn internal() -> ApiError {
    ApiError::Internal(anyhow::anyhow!("not shown to the caller"))
}

/// One response per status, each listing its codes with when they happen, and one example per code: the
/// body `error.rs` sends for it.
fn problem_responses(problems: &[(ApiError, &str)]) -> BTreeMap<String, RefOr<Response>> {
    let mut by_status: BTreeMap<u16, Vec<&(ApiError, &str)>> = BTreeMap::new();
    for problem in problems {
        by_status.entry(problem.0.status_code().as_u16()).or_default().push(problem);
    }
    by_status
        .into_iter()
        .map(|(status, problems)| {
            let description =
                problems.iter().map(|(error, when)| format!("- `{}`: {when}", error.code())).collect::<Vec<_>>();
            let examples = problems.iter().map(|(error, when)| {
                (error.code(), ExampleBuilder::new().summary(*when).value(Some(error.problem())).build())
            });
            let content = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(Problem::name())))
                .examples_from_iter(examples)
                .build();
            let mut response = ResponseBuilder::new()
                .description(description.join("\n"))
                .content("application/problem+json", content)
                .header("Cache-Control", string_header("Always `no-store`."));
            if problems.iter().any(|(error, _)| error.retry_after_secs().is_some()) {
                let seconds = ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(1));
                let header = HeaderBuilder::new()
                    .schema(Some(seconds))
                    .description(Some("Seconds to wait before retrying."))
                    .build();
                response = response.header("Retry-After", header);
            }
            if problems.iter().any(|(error, _)| matches!(error, ApiError::Unauthenticated)) {
                response = response.header("WWW-Authenticate", string_header("`Bearer`, with `unauthenticated`."));
            }
            (status.to_string(), response.build().into())
        })
        .collect()
}

fn string_header(description: &str) -> utoipa::openapi::header::Header {
    HeaderBuilder::new()
        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
        .description(Some(description))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document() -> serde_json::Value {
        serde_json::from_slice(&document_json().unwrap()).unwrap()
    }

    #[test]
    fn the_problem_schema_names_exactly_the_fields_error_rs_sends() {
        let document = document();
        let schema = &document["components"]["schemas"]["Problem"];
        let mut documented: Vec<&str> = schema["properties"].as_object().unwrap().keys().map(String::as_str).collect();
        documented.sort_unstable();
        let mut required: Vec<&str> =
            schema["required"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
        required.sort_unstable();
        // Outside a request: the five required fields.
        let sent = ApiError::NotInstalled.problem();
        let mut sent: Vec<&str> = sent.as_object().unwrap().keys().map(String::as_str).collect();
        sent.sort_unstable();
        assert_eq!(required, sent);
        // While answering one: `instance` too.
        let id = crate::routes::observe::RequestId(std::sync::Arc::from("r-1"));
        let answered = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(crate::routes::observe::within_request(id, async { ApiError::NotInstalled.problem() }));
        assert_eq!(answered["instance"], "urn:tokenvault:request:r-1");
        let mut answered: Vec<&str> = answered.as_object().unwrap().keys().map(String::as_str).collect();
        answered.sort_unstable();
        assert_eq!(documented, answered);
    }

    #[test]
    fn the_documented_installation_statuses_are_the_stored_ones() {
        use crate::store::installation::Status;
        let document = document();
        let documented = &document["components"]["schemas"]["InstallationStatus"]["enum"];
        let stored: Vec<&str> =
            [Status::Active, Status::Uninstalled, Status::Revoked, Status::Rejected].map(Status::as_str).into();
        assert_eq!(documented, &serde_json::json!(stored));
    }

    /// Security requirements name their scheme by a string literal (the `path` macro takes no constant).
    #[test]
    fn every_security_requirement_names_a_declared_scheme() {
        let document = document();
        let schemes = document["components"]["securitySchemes"].as_object().unwrap();
        for (path, item) in document["paths"].as_object().unwrap() {
            for operation in item.as_object().unwrap().values() {
                let mut required = 0;
                for requirement in operation["security"].as_array().into_iter().flatten() {
                    for name in requirement.as_object().unwrap().keys() {
                        assert!(schemes.contains_key(name), "undeclared security scheme {name}");
                        required += 1;
                    }
                }
                assert_eq!(required, usize::from(path.starts_with("/v1/")), "{path}: a key exactly on /v1 routes");
            }
        }
    }

    /// The document is public to anyone who reaches the internal listener, and copied into other tools:
    /// no example may look like a real service key or a real token.
    #[test]
    fn no_example_looks_like_a_real_key_or_token() {
        let text = String::from_utf8(document_json().unwrap().to_vec()).unwrap();
        let key_like = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        for (at, _) in text.match_indices(crate::domain::service_key::SERVICE_KEY_PREFIX) {
            let tail: String = text[at + 4..].chars().take_while(|c| key_like(*c)).collect();
            assert!(tail.len() < 16, "a real-looking service key in the document: tvk_{tail}");
        }
        for (at, _) in text.match_indices("eyJ") {
            let tail: String = text[at..].chars().take_while(|c| key_like(*c) || *c == '.').collect();
            assert!(tail.matches('.').count() < 2 || tail.len() < 40, "a real-looking JWT in the document: {tail}");
        }
    }
}
