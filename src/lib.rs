//! tokenvault: receives Trackunit IrisX app installs, keeps each account's client credentials encrypted in
//! PostgreSQL, and hands out per-account access tokens to internal services.
//!
//! Data flows one way: `routes` -> `broker` / `identity` / `store` -> `crypto` / `domain`.
#![forbid(unsafe_code)]

pub mod broker;
pub mod claim_names;
pub mod cli;
pub mod credentials;
pub mod crypto;
pub mod directory;
pub mod domain;
pub mod error;
pub mod identity;
pub mod in_flight;
pub mod installs;
pub mod outbound;
pub mod provider;
pub mod rate_limit;
pub mod readiness;
pub mod request_context;
pub mod rotation;
pub mod routes;
pub mod sandbox;
pub mod service_clients;
pub mod settings;
pub mod startup;
pub mod store;
pub mod strict_json;
pub mod telemetry;
pub mod trace_export;
