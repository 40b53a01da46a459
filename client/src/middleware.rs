//! A [`reqwest_middleware`] middleware that adds `Authorization: Bearer <token>` (feature `middleware`).

use reqwest::header::{self, HeaderValue};
use reqwest_middleware::{Middleware, Next};

use crate::{TokenRequest, TokenvaultClient};

/// Adds `Authorization: Bearer <token>` to every request sent through a
/// [`reqwest_middleware::ClientWithMiddleware`], with a token from [`TokenvaultClient::token`] (so from
/// memory while it has at least `min_ttl` left). Made by [`TokenvaultClient::middleware`].
///
/// The token is for the [`TokenRequest`] given to [`TokenvaultClient::middleware`], or, for one request,
/// for a [`TokenRequest`] put in its extensions
/// ([`RequestBuilder::with_extension`](reqwest_middleware::RequestBuilder::with_extension)). When no
/// token can be had, the request is not sent, and the error is a
/// [`reqwest_middleware::Error::Middleware`] whose cause downcasts to [`crate::Error`].
///
/// ```
/// # async fn example(tokens: tokenvault_client::TokenvaultClient) -> Result<(), Box<dyn std::error::Error>> {
/// use tokenvault_client::TokenRequest;
///
/// let acme = TokenRequest::new("7b1c5e0a-acme").with_scopes(["asset.view"]);
/// let http = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(tokens.middleware(acme))
///     .build();
/// let assets = http.get("https://iris.trackunit.com/public/api/assets").send().await?;
/// // Another account for one request:
/// let globex = TokenRequest::new("globex").with_scopes(["asset.view"]);
/// let theirs = http.get("https://iris.trackunit.com/public/api/assets").with_extension(globex).send().await?;
/// # let _ = (assets, theirs);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct BearerToken {
    client: TokenvaultClient,
    request: TokenRequest,
}

impl TokenvaultClient {
    /// A middleware adding a token for `request` to each outgoing request (see [`BearerToken`]).
    pub fn middleware(&self, request: TokenRequest) -> BearerToken {
        BearerToken { client: self.clone(), request }
    }
}

#[async_trait::async_trait]
impl Middleware for BearerToken {
    async fn handle(
        &self,
        mut request: reqwest::Request,
        extensions: &mut http::Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let wanted = extensions.get::<TokenRequest>().unwrap_or(&self.request);
        let token = self.client.token(wanted).await.map_err(reqwest_middleware::Error::middleware)?;
        let mut value = HeaderValue::try_from(format!("Bearer {}", token.expose_secret()))
            .map_err(|_| reqwest_middleware::Error::middleware(UnusableToken))?;
        value.set_sensitive(true);
        request.headers_mut().insert(header::AUTHORIZATION, value);
        next.run(request, extensions).await
    }
}

/// A token that a header cannot carry (never shown).
#[derive(Debug, thiserror::Error)]
#[error("the access token holds characters an Authorization header cannot carry")]
struct UnusableToken;
