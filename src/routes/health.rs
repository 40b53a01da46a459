//! Liveness, readiness and metrics.

use actix_web::{HttpResponse, web};

use super::AppState;
use crate::store;

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
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// Ready to serve: the database answers and a JWKS is loaded.
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let pool = state.pool.clone();
    let database = super::offload(&state, async move { Ok(store::ping(&pool).await) }).await.unwrap_or(false);
    let jwks = state.identity.keys().is_loaded();
    let body = serde_json::json!({ "database": database, "jwks": jwks });
    if database && jwks {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().insert_header(("Retry-After", "5")).json(body)
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render())
}
