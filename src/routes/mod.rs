//! HTTP handlers, one file per resource. Handlers parse and authorise, then call `installs`, `broker`,
//! `identity` or `store`; they hold no SQL and no cryptography.

mod audit;
mod auth;
mod body;
mod callbacks;
mod clients;
mod health;
mod installations;
pub mod observe;
pub(crate) mod openapi;
mod providers;
mod repeat;
mod tokens;

use std::collections::HashSet;
use std::sync::Arc;

use actix_web::{HttpResponse, web};
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

use crate::broker::Broker;
use crate::crypto::KeyRing;
use crate::directory::Directory;
use crate::error::ApiError;
use crate::identity::IdentityVerifier;

/// Everything a handler may use.
pub struct AppState {
    pub pool: PgPool,
    pub keys: Arc<KeyRing>,
    pub identity: IdentityVerifier,
    pub claim_names: crate::claim_names::ClaimNames,
    /// Whether the database answers, probed at most once a second (`/readyz`).
    pub database: crate::readiness::DatabaseProbe,
    pub broker: Arc<Broker>,
    /// Every provider, by name.
    pub providers: Arc<crate::provider::Providers>,
    pub directory: Arc<Directory>,
    pub apps: Option<HashSet<String>>,
    pub metrics: PrometheusHandle,
    /// The OpenAPI document, serialized once at start (see [`openapi`]).
    pub openapi: web::Bytes,
    /// The service's main runtime; see [`offload`].
    pub runtime: tokio::runtime::Handle,
}

/// Runs a handler's database and upstream work on the service's main runtime instead of the actix worker's.
///
/// Why: the connection pools (sqlx, reqwest) spawn background tasks on whichever runtime uses them. An
/// actix worker's runtime ends when the worker stops, and idle workers stop first during a graceful
/// shutdown, taking such tasks with them while other workers still finish requests that depend on them.
/// Workers therefore only speak HTTP; everything else lives on the runtime that outlives the servers.
/// A panic in `work` becomes a 500 rather than a dead connection.
async fn offload<T: Send + 'static>(
    state: &AppState,
    work: impl Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    use tracing::Instrument;
    // The request's context (its id, who acts) goes with the work to the task that does it.
    let context = crate::request_context::current();
    state
        .runtime
        .spawn(crate::request_context::scope(context, work.instrument(tracing::Span::current())))
        .await
        .map_err(|error| ApiError::Internal(anyhow::Error::new(error).context("the request's task failed")))?
}

/// The internet-facing listener: the callback and health only.
pub fn public(config: &mut web::ServiceConfig) {
    config
        .service(
            web::resource("/callbacks/trackunit")
                .route(web::post().to(callbacks::trackunit))
                .default_service(web::to(method_not_allowed)),
        )
        .configure(health::routes)
        .default_service(web::to(not_found));
}

/// The private listener: tokens, admin, health, metrics and the OpenAPI document.
pub fn internal(config: &mut web::ServiceConfig) {
    config
        .service(
            web::resource("/v1/tokens")
                .route(web::post().to(tokens::issue))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/installations")
                .route(web::get().to(installations::list))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/installations/{id}")
                .route(web::delete().to(installations::revoke))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/installations/{id}/reactivate")
                .route(web::post().to(installations::reactivate))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/providers")
                .route(web::get().to(providers::list))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/providers/{provider}/accounts/{account_id}/credentials")
                .route(web::put().to(providers::put))
                .route(web::delete().to(providers::delete))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/clients")
                .route(web::get().to(clients::list))
                .route(web::post().to(clients::create))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/clients/{name}")
                .route(web::get().to(clients::get))
                .route(web::delete().to(clients::revoke))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/clients/{name}/rotate")
                .route(web::post().to(clients::rotate))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/v1/audit").route(web::get().to(audit::list)).default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/metrics")
                .route(web::get().to(health::metrics))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/openapi.json")
                .route(web::get().to(openapi::serve))
                .default_service(web::to(method_not_allowed)),
        )
        .configure(health::routes)
        .default_service(web::to(not_found));
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}
