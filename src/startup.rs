//! Builds the shared state and the two HTTP servers: the public one (callback, health) and the internal
//! one (token and admin API, health, metrics, OpenAPI document). Both stop gracefully on SIGINT/SIGTERM:
//! in-flight requests finish first.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use sqlx::PgPool;
use tracing_actix_web::{DefaultRootSpanBuilder, RootSpanBuilder, TracingLogger};

use crate::broker::Broker;
use crate::directory::{Change, Directory};
use crate::identity::{IdentityVerifier, JwksCache};
use crate::in_flight::InFlight;
use crate::provider::Endpoint;
use crate::routes::{self, AppState};
use crate::settings::Settings;
use crate::store;
use crate::trace_export;

/// How long a client may take to send its request headers (slow-loris defence).
const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Application {
    in_flight: InFlight,
    /// How long in-flight requests get to finish after a stop signal (TOKENVAULT_SHUTDOWN_GRACE_SECS).
    shutdown_grace: Duration,
    public_port: u16,
    internal_port: u16,
    public: Server,
    internal: Server,
    pool: PgPool,
    /// Its marks of used keys are written down once more when the process stops.
    directory: Arc<Directory>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

/// Refuses to start when a stored ciphertext names a key id the key ring lacks: better than failing at
/// the first request for that account.
async fn check_key_ids(pool: &PgPool, settings: &Settings) -> anyhow::Result<()> {
    let stored: Vec<String> = sqlx::query_scalar(
        "select key_id from installation where key_id is not null
         union select key_id from refresh_token
         union select key_id from token_cache where expires_at > now()",
    )
    .fetch_all(pool)
    .await
    .context("cannot read the key ids in use (is the database reachable and migrated?)")?;
    let missing: Vec<&str> =
        stored.iter().map(String::as_str).filter(|id| !settings.encryption_keys.contains(id)).collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "TOKENVAULT_ENCRYPTION_KEYS lacks key id(s) {} that stored credentials or cached tokens are sealed with",
            missing.join(", ")
        );
    }
    Ok(())
}

/// The request id `routes::observe` gave a request, for its span.
fn request_id_of(request: &actix_web::dev::ServiceRequest) -> String {
    use actix_web::HttpMessage;
    request.extensions().get::<routes::observe::RequestId>().map(|id| id.0.to_string()).unwrap_or_default()
}

/// Request spans at INFO, named by our request id (the caller's `X-Request-Id` or trace id, else new).
/// The public listener's callbacks are rare and worth tracing.
struct InfoRootSpan;

impl RootSpanBuilder for InfoRootSpan {
    fn on_request_start(request: &actix_web::dev::ServiceRequest) -> tracing::Span {
        let id = request_id_of(request);
        let span = tracing_actix_web::root_span!(request, request.id = %id);
        trace_export::adopt_remote_parent(&span, request.headers());
        span
    }

    fn on_request_end<B: actix_web::body::MessageBody>(
        span: tracing::Span,
        outcome: &Result<actix_web::dev::ServiceResponse<B>, actix_web::Error>,
    ) {
        DefaultRootSpanBuilder::on_request_end(span, outcome);
    }
}

/// Request spans at DEBUG for the internal listener, whose token path is the hot path: at INFO, building a
/// span with a dozen fields per request costs as much as serving a cached token. While traces are exported
/// they are at INFO, as on the public listener.
struct DebugRootSpan;

impl RootSpanBuilder for DebugRootSpan {
    fn on_request_start(request: &actix_web::dev::ServiceRequest) -> tracing::Span {
        if trace_export::exporting() {
            // Exported spans are wanted for every request, whatever the log level.
            return InfoRootSpan::on_request_start(request);
        }
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return tracing::Span::none();
        }
        let id = request_id_of(request);
        tracing_actix_web::root_span!(level = tracing::Level::DEBUG, request, request.id = %id)
    }

    fn on_request_end<B: actix_web::body::MessageBody>(
        span: tracing::Span,
        outcome: &Result<actix_web::dev::ServiceResponse<B>, actix_web::Error>,
    ) {
        DefaultRootSpanBuilder::on_request_end(span, outcome);
    }
}

/// Keeps `tokenvault_installations{status}` current (a count query every 30 s, off every request's path).
fn spawn_installation_gauges(pool: PgPool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match store::installation::count_by_status(&pool).await {
                Ok(counts) => {
                    for status in ["active", "uninstalled", "revoked", "rejected"] {
                        let count = counts.iter().find(|(s, _)| s == status).map_or(0, |(_, n)| *n);
                        metrics::gauge!("tokenvault_installations", "status" => status).set(count as f64);
                    }
                }
                Err(error) => tracing::debug!(error = %error, "counting installations failed; will retry"),
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    })
}

/// Deletes audit records older than `days` days, hourly (never when `days` is 0). Every replica runs it;
/// the deletes are idempotent.
fn spawn_audit_pruner(pool: PgPool, days: u32) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if days == 0 {
            return;
        }
        loop {
            let pruned = match pool.acquire().await {
                Ok(mut conn) => store::audit::prune(&mut conn, days).await,
                Err(error) => Err(error),
            };
            match pruned {
                Ok(0) => {}
                Ok(rows) => tracing::info!(rows, days, "pruned audit records past retention"),
                Err(error) => tracing::debug!(error = %error, "pruning audit records failed; will retry"),
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    })
}

/// Resolves on the first SIGINT or SIGTERM.
async fn stop_signal() {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(error) => {
            tracing::warn!(error = %error, "cannot listen for SIGTERM; only SIGINT stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

impl Application {
    /// Binds both listeners (port 0 picks a free one), loads the JWKS once, and builds the servers.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pool = store::pool(&settings.database_url, settings.database_max_connections)?;
        check_key_ids(&pool, &settings).await?;

        let jwks = Arc::new(JwksCache::new(settings.identity.jwks_url.clone(), settings.identity.jwks_min_refresh));
        let loaded = jwks.refresh().await;
        if let Err(error) = &loaded {
            tracing::warn!(error = %error, "JWKS not loaded at start; callbacks answer 503 until it is");
        }
        let directory = Arc::new(Directory::new(pool.clone()));
        let broker = Arc::new(Broker::new(
            pool.clone(),
            Arc::clone(&settings.encryption_keys),
            Endpoint::new(settings.upstream.timeout, settings.upstream.max_attempts, settings.upstream.backoff_base),
            Arc::new(settings.providers.clone()),
            Arc::clone(&directory),
            crate::broker::Limits {
                // Each mint holds a connection across the upstream call. Leave one for the LISTEN
                // connection and half of the rest for callbacks, readiness and directory reads.
                max_concurrent_mints: (settings.database_max_connections as usize).saturating_sub(1) / 2,
                capacity: settings.token_cache_capacity,
                probe_schedule: settings.rejected_probe_schedule.clone(),
            },
        ));
        if settings.insecure_http_upstreams {
            tracing::warn!(
                "TOKENVAULT_INSECURE_ALLOW_HTTP_UPSTREAMS is on: credentials may be sent over plain http to hosts \
                 other than this one. For development only (a sandbox in another container); never in production"
            );
        }
        if !settings.identity.binds_tokens() {
            tracing::warn!(
                "identity tokens are bound to nothing but Trackunit's signature: a token Trackunit signed for \
                 another purpose (another app's install, say) whose claims do not contradict the body delivers one \
                 message until it expires. Set TOKENVAULT_TRACKUNIT_ISSUER, \
                 TOKENVAULT_TRACKUNIT_AUDIENCE or TOKENVAULT_TRACKUNIT_REQUIRED_CLAIMS (`tokenvault identity claims` \
                 shows the claims Trackunit's tokens carry) to bind them to this deployment"
            );
        }
        let forget_tokens = Arc::clone(&broker);
        let background = vec![
            Arc::clone(&jwks).spawn_refresher(jwks.next_refresh(&loaded)),
            store::token_cache::spawn_purger(pool.clone(), Duration::from_secs(600)),
            Arc::clone(&directory).spawn_listener(settings.listener_heartbeat, move |change| {
                if let Change::Installation { id, .. } = change {
                    forget_tokens.forget(*id);
                }
            }),
            Arc::clone(&broker).spawn_prober(),
            spawn_installation_gauges(pool.clone()),
            spawn_audit_pruner(pool.clone(), settings.audit_retention_days),
            Arc::clone(&directory).spawn_usage_recorder(),
        ];

        let state = web::Data::new(AppState {
            pool: pool.clone(),
            keys: Arc::clone(&settings.encryption_keys),
            identity: IdentityVerifier::new(&settings.identity, jwks),
            claim_names: crate::claim_names::ClaimNames::new(pool.clone()),
            database: crate::readiness::DatabaseProbe::of_pool(pool.clone()),
            broker,
            providers: Arc::new(settings.providers.clone()),
            directory: Arc::clone(&directory),
            apps: settings.apps.clone(),
            metrics: crate::telemetry::metrics_handle(),
            openapi: routes::openapi::document_json().context("cannot serialize the OpenAPI document")?,
            runtime: tokio::runtime::Handle::current(),
        });

        let public_listener = TcpListener::bind(settings.public_addr)
            .with_context(|| format!("cannot listen on TOKENVAULT_PUBLIC_ADDR {}", settings.public_addr))?;
        let internal_listener = TcpListener::bind(settings.internal_addr)
            .with_context(|| format!("cannot listen on TOKENVAULT_INTERNAL_ADDR {}", settings.internal_addr))?;
        let public_port = public_listener.local_addr()?.port();
        let internal_port = internal_listener.local_addr()?.port();

        // actix counts connections per worker: split each listener's limit among them.
        let workers = std::thread::available_parallelism().map_or(1, usize::from);
        let per_worker = |limit: usize| limit.div_ceil(workers).max(1);
        let in_flight = InFlight::default();
        let (public_state, public_in_flight) = (state.clone(), in_flight.clone());
        let public = HttpServer::new(move || {
            App::new()
                .wrap(TracingLogger::<InfoRootSpan>::new())
                .wrap(routes::observe::middleware(routes::observe::Listener::Public, public_in_flight.clone()))
                .app_data(web::Data::new(routes::observe::Listener::Public))
                .app_data(public_state.clone())
                .configure(routes::public)
        })
        .workers(workers)
        .max_connections(per_worker(settings.public_max_connections))
        .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
        .shutdown_timeout(settings.shutdown_grace.as_secs())
        // Signals are handled in `run_until_stopped`, for both servers together.
        .disable_signals()
        .listen(public_listener)?
        .run();
        let internal_in_flight = in_flight.clone();
        let internal = HttpServer::new(move || {
            App::new()
                .wrap(TracingLogger::<DebugRootSpan>::new())
                .wrap(routes::observe::middleware(routes::observe::Listener::Internal, internal_in_flight.clone()))
                .app_data(web::Data::new(routes::observe::Listener::Internal))
                .app_data(state.clone())
                .configure(routes::internal)
        })
        .workers(workers)
        .max_connections(per_worker(settings.internal_max_connections))
        .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
        .shutdown_timeout(settings.shutdown_grace.as_secs())
        .disable_signals()
        .listen(internal_listener)?
        .run();

        tracing::info!(public.port = public_port, internal.port = internal_port, "tokenvault listening");
        let shutdown_grace = settings.shutdown_grace;
        Ok(Self {
            in_flight,
            shutdown_grace,
            public_port,
            internal_port,
            public,
            internal,
            pool,
            directory,
            background,
        })
    }

    pub fn public_port(&self) -> u16 {
        self.public_port
    }

    pub fn internal_port(&self) -> u16 {
        self.internal_port
    }

    /// Handles that stop both servers (tests stop each app when they end).
    pub fn server_handles(&self) -> [actix_web::dev::ServerHandle; 2] {
        [self.public.handle(), self.internal.handle()]
    }

    /// Serves until SIGINT or SIGTERM (or a [`server_handles`](Self::server_handles) stop), then stops
    /// both servers gracefully: no new connections, in-flight requests finish (up to TOKENVAULT_SHUTDOWN_GRACE_SECS).
    ///
    /// Both servers are always awaited to the end: with `try_join!`, an error from one (a worker that
    /// panicked while shutting down) would drop the other mid-request.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let [public, internal] = self.server_handles();
        let servers = async { tokio::join!(self.public, self.internal) };
        tokio::pin!(servers);
        let (public_result, internal_result) = tokio::select! {
            results = &mut servers => results,
            () = stop_signal() => {
                tracing::info!(requests = self.in_flight.count(), "stop signal received; finishing in-flight requests");
                // Handles send their commands at once, but the servers act on them only while polled:
                // keep polling them while we wait for the requests in flight to finish.
                let _pausing = (public.pause(), internal.pause());
                let drain = async {
                    let drained = tokio::time::timeout(self.shutdown_grace, self.in_flight.drained());
                    if drained.await.is_err() {
                        tracing::warn!(requests = self.in_flight.count(), "requests still in flight after the shutdown timeout");
                    }
                    (public.stop(true), internal.stop(true))
                };
                let (results, _stopping) = tokio::join!(servers, drain);
                results
            }
        };
        for task in self.background {
            task.abort();
        }
        // The uses of keys since the last minute's write, so a replica that stops loses none of them.
        if tokio::time::timeout(Duration::from_secs(2), self.directory.record_usage()).await.is_err() {
            tracing::debug!("recording key usage at stop timed out");
        }
        self.pool.close().await;
        public_result.context("the public server failed")?;
        internal_result.context("the internal server failed")
    }
}
