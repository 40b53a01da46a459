//! The HTTP client for the two upstreams (JWKS and token endpoint) and a size-bounded body reader:
//! a hostile or broken upstream must not make us buffer an unbounded body.

use std::time::Duration;

/// An HTTP client that never follows redirects (a redirect would carry client secrets to another
/// origin) and gives up after `timeout`.
pub fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tokenvault/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the TLS backend initialises")
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the response body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the response body failed")]
    Transport(#[source] reqwest::Error),
}

/// Reads at most `limit` bytes of `response`'s body.
pub async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, BodyError> {
    if response.content_length().is_some_and(|len| len > limit as u64) {
        return Err(BodyError::TooLarge(limit));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
