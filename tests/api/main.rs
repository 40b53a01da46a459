//! One integration-test binary: the real app against a real PostgreSQL, with Trackunit faked at the
//! HTTP boundary (a local JWKS and token endpoint signing and serving real keys).

mod admin;
mod callbacks;
mod clients;
mod conformance;
mod hardening;
mod helpers;
mod identity;
mod observe;
mod openapi;
mod provider_guarantees;
mod providers;
mod redteam;
mod repeat;
mod resilience;
mod rotation;
mod storage;
mod tokens;
mod upgrade;
