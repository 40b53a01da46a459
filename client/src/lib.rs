//! A client for tokenvault's internal token API, for the internal services that
//! need access tokens of the accounts that installed your app.
//!
//! It sends what this `curl` sends:
//!
//! ```sh
//! curl -sS http://127.0.0.1:8081/v1/tokens \
//!   -H "Authorization: Bearer $TOKENVAULT_KEY" \
//!   -H 'Content-Type: application/json' \
//!   -d '{"account_id": "7b1c5e0a-acme", "scopes": ["asset.view"], "min_ttl_seconds": 120}'
//! ```
//!
//! and reads the answer (`{"access_token", "token_type", "expires_in", "expires_at", "scope"}`) into a
//! [`Token`], or a problem (`application/problem+json`) into an [`Error`] variant per `code`. On top of
//! the call, [`TokenvaultClient`]:
//!
//! - keeps each token in memory, per identical [`TokenRequest`], while it has at least the request's
//!   `min_ttl` left (counted from `expires_in` when the request was sent, on a monotonic clock);
//! - makes one HTTP call for concurrent identical requests (single flight), the others sharing its token
//!   or its error;
//! - retries a 503 (`upstream_unavailable`, `database_unavailable`) after its `Retry-After`, with a
//!   bounded number of retries and a cap on the total wait;
//! - never shows the service key or a token in `Debug` or `Display`: both are [`secrecy::SecretString`]s,
//!   and [`Token::expose_secret`] is the one way to read the token.
//!
//! ```no_run
//! use std::time::Duration;
//! use tokenvault_client::{Error, TokenRequest, TokenvaultClient};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let tokens = TokenvaultClient::builder("http://tokenvault.internal:8081")
//!     .service_key(std::env::var("TOKENVAULT_KEY")?)
//!     .timeout(Duration::from_secs(15))
//!     .max_retries(2)
//!     .build()?;
//!
//! let wanted = TokenRequest::new("7b1c5e0a-acme")
//!     .with_scopes(["asset.view"])
//!     .with_min_ttl(Duration::from_secs(120));
//! match tokens.token(&wanted).await {
//!     Ok(token) => {
//!         println!("a {} token, {} s left", token.token_type(), token.expires_in().as_secs());
//!         // Send it: `Authorization: Bearer <token>`, or let `authorize` add it.
//!         let answer = tokens
//!             .authorize(reqwest::Client::new().get("https://iris.trackunit.com/public/api/assets"), &wanted)
//!             .await?
//!             .send()
//!             .await?;
//!         # let _ = answer;
//!     }
//!     Err(Error::NotInstalled(problem)) => eprintln!("not installed: {}", problem.detail),
//!     Err(error) => return Err(error.into()),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Adding the token to outgoing requests
//!
//! [`TokenvaultClient::authorize`] adds `Authorization: Bearer <token>` to a
//! [`reqwest::RequestBuilder`]. With the feature `middleware`, `TokenvaultClient::middleware` makes a
//! `reqwest-middleware` middleware (`BearerToken`; `reqwest-middleware` 0.5 is built on reqwest 0.13,
//! like this crate) that adds it to every request of a `ClientWithMiddleware`.
//!
//! # Features
//!
//! - `middleware`: the `reqwest-middleware` middleware (`BearerToken`).
//! - `tracing`: debug and warning events through `tracing` (a call to tokenvault, a retry); never a token
//!   or a key.
//!
//! # The example
//!
//! `cargo run -p tokenvault-client --example fetch_token -- ACCOUNT_ID [SCOPE...]`, with `TOKENVAULT_URL`
//! and `TOKENVAULT_KEY` set, asks for a token and prints its expiry (not the token) and the `curl` line
//! that does the same.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// A `tracing` event when the feature is on; nothing otherwise.
macro_rules! trace_event {
    ($level:ident, $($rest:tt)*) => {
        #[cfg(feature = "tracing")]
        {
            tracing::$level!($($rest)*);
        }
    };
}

mod client;
mod error;
#[cfg(feature = "middleware")]
mod middleware;
mod token;

pub use client::{
    DEFAULT_MAX_RETRIES, DEFAULT_MAX_RETRY_WAIT, DEFAULT_TIMEOUT, TokenvaultClient, TokenvaultClientBuilder,
};
pub use error::{BuildError, Error, Problem};
#[cfg(feature = "middleware")]
pub use middleware::BearerToken;
/// The `reqwest-middleware` this crate's middleware is built for (feature `middleware`).
#[cfg(feature = "middleware")]
pub use reqwest_middleware;
pub use secrecy::{self, SecretString};
pub use token::{DEFAULT_MIN_TTL, Token, TokenRequest};
