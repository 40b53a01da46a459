//! Liveness, readiness and metrics.

use actix_web::{HttpResponse, web};

use super::{AppState, openapi};

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .service(
            web::resource("/healthz").route(web::get().to(healthz)).default_service(web::to(super::method_not_allowed)),
        )
        .service(
            web::resource("/readyz").route(web::get().to(readyz)).default_service(web::to(super::method_not_allowed)),
        );
}

/// The process is up.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tags = ["public", "internal"],
    summary = "Liveness",
    description = "Answers 200 while the process runs. Served by both listeners.",
    responses((status = 200, description = "The process is up.", body = openapi::Health,
               example = json!({"status": "ok"}))),
)]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// Ready for what the listener serves: the public one when callbacks can be stored (database and JWKS);
/// the internal one while it can hand out tokens (the database answers, or memory holds tokens to serve
/// through an outage), whatever the JWKS.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tags = ["public", "internal"],
    summary = "Readiness",
    description = "On the public listener, ready when the database answers and Trackunit's signing keys (JWKS) \
                   are loaded: what callbacks need. On the internal listener, ready while it can hand out tokens: \
                   the database answers, or memory holds tokens (served through a database outage, so an \
                   orchestrator does not take every replica out at once); the JWKS does not matter there. The \
                   database's answer is from a probe at most a second old, shared by concurrent requests. \
                   `tokens_in_memory` is on the internal listener only. The 503 is plain JSON, not a problem.",
    responses(
        (status = 200, description = "Ready.", body = openapi::Readiness,
         example = json!({"database": true, "jwks": true, "tokens_in_memory": 12})),
        (status = 503, description = "Not ready: the same body, saying what is missing.", body = openapi::Readiness,
         headers(("Retry-After" = u32, description = "Always 5 (seconds).")),
         example = json!({"database": false, "jwks": true, "tokens_in_memory": 0})),
    ),
)]
async fn readyz(state: web::Data<AppState>, listener: web::Data<super::observe::Listener>) -> HttpResponse {
    let task_state = web::Data::clone(&state);
    let database = super::offload(&state, async move { Ok(task_state.database.is_up().await) }).await.unwrap_or(false);
    let jwks = state.identity.keys().is_loaded();
    let (ready, body) = match **listener {
        super::observe::Listener::Public => {
            (database && jwks, serde_json::json!({ "database": database, "jwks": jwks }))
        }
        super::observe::Listener::Internal => {
            let tokens = state.broker.tokens_in_memory();
            let body = serde_json::json!({ "database": database, "jwks": jwks, "tokens_in_memory": tokens });
            (database || tokens > 0, body)
        }
    };
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().insert_header(("Retry-After", "5")).json(body)
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "internal",
    summary = "Prometheus metrics",
    description = "The `tokenvault_*` series in the Prometheus text format. No key is needed.",
    responses((status = 200, description = "The metrics.", body = String,
               content_type = "text/plain; version=0.0.4")),
)]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    // Gauges of this moment, set at scrape time: nothing on any request's path.
    metrics::gauge!("tokenvault_tokens_in_memory").set(state.broker.tokens_in_memory() as f64);
    let (size, idle) = (state.pool.size(), state.pool.num_idle() as u32);
    metrics::gauge!("tokenvault_database_connections", "state" => "in_use").set(f64::from(size.saturating_sub(idle)));
    metrics::gauge!("tokenvault_database_connections", "state" => "idle").set(f64::from(idle));
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render())
}
