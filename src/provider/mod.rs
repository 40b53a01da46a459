//! A provider as data: where its token endpoint is, how a client authenticates to it, what a token request
//! asks, how its replies are spelled and when its tokens expire. Every provider, the built-in `trackunit`
//! included, is minted for by the same code ([`Endpoint`]); supporting another OAuth2 server is a
//! `[providers.NAME]` table in the settings file (see docs/PROVIDERS.md), never a fork of the broker.
//!
//! Nothing here stores, caches or decrypts anything: the broker hands in the credentials to use.

mod endpoint;
mod reply;

pub use endpoint::{Credentials, Endpoint, Grant, MintedToken, UpstreamError};
pub use reply::parse_reply;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use url::Url;

use crate::domain::ScopeSet;

/// The built-in provider: Trackunit's `/apptoken`, with credentials delivered by its callback.
pub const TRACKUNIT: &str = "trackunit";

/// How a client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body.
    #[default]
    ClientSecretPost,
    /// HTTP Basic with the form-urlencoded id and secret.
    ClientSecretBasic,
}

/// Whether a JWT access token's own `exp` decides its expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpiryFromJwt {
    /// The `exp` only when the reply says nothing of the expiry.
    #[default]
    Fallback,
    /// The earlier of the reply's expiry and the `exp`.
    Earliest,
    /// Never read the token.
    Never,
}

/// Where the members of a token reply are, as dotted paths (`data.token` reaches `{"data":{"token":…}}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplyFields {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: String,
    pub scope: String,
    pub refresh_token: String,
    pub refresh_expires_in: String,
}

impl Default for ReplyFields {
    /// The RFC 6749 §5.1 names, and Keycloak's `refresh_expires_in`.
    fn default() -> Self {
        Self {
            access_token: "access_token".into(),
            token_type: "token_type".into(),
            expires_in: "expires_in".into(),
            scope: "scope".into(),
            refresh_token: "refresh_token".into(),
            refresh_expires_in: "refresh_expires_in".into(),
        }
    }
}

/// One provider, as loaded. Holds no secret: its `Serialize` is what `GET /v1/providers` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Provider {
    pub name: String,
    pub token_url: Url,
    pub client_auth: ClientAuth,
    /// Scopes asked for when a token request names none.
    #[serde(serialize_with = "scopes_as_list")]
    pub default_scopes: ScopeSet,
    pub scope_separator: String,
    pub send_scope: bool,
    pub extra_params: BTreeMap<String, String>,
    pub use_refresh_tokens: bool,
    pub reply: ReplyFields,
    pub expiry_from_jwt: ExpiryFromJwt,
    #[serde(rename = "default_lifetime_secs", serialize_with = "as_secs")]
    pub default_lifetime: Duration,
    #[serde(rename = "expiry_margin_secs", serialize_with = "as_secs")]
    pub expiry_margin: Duration,
    /// How its credentials arrive: `callback` (Trackunit's) or `admin_api`.
    pub credentials_from: &'static str,
}

fn as_secs<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(duration.as_secs())
}

fn scopes_as_list<S: serde::Serializer>(scopes: &ScopeSet, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(scopes.iter())
}

impl Provider {
    /// Trackunit's token endpoint at `token_url`: client_secret_post, standard replies, five minutes when a
    /// reply says nothing of the expiry.
    pub fn trackunit(token_url: Url) -> Self {
        Self {
            name: TRACKUNIT.into(),
            token_url,
            client_auth: ClientAuth::ClientSecretPost,
            default_scopes: ScopeSet::empty(),
            scope_separator: " ".into(),
            send_scope: true,
            extra_params: BTreeMap::new(),
            use_refresh_tokens: true,
            reply: ReplyFields::default(),
            expiry_from_jwt: ExpiryFromJwt::Fallback,
            default_lifetime: Duration::from_secs(300),
            expiry_margin: Duration::ZERO,
            credentials_from: "callback",
        }
    }

    /// Whether its credentials come from Trackunit's callback rather than the admin API.
    pub fn is_trackunit(&self) -> bool {
        self.name == TRACKUNIT
    }

    /// Whether a token request must name scopes: it sends them, and there are no defaults to send.
    pub fn needs_scopes(&self) -> bool {
        self.send_scope && self.default_scopes.is_empty()
    }

    /// The scopes a token request asks for: those named, or the provider's defaults when none are.
    pub fn scopes_for(&self, requested: Option<ScopeSet>) -> ScopeSet {
        requested.filter(|scopes| !scopes.is_empty()).unwrap_or_else(|| self.default_scopes.clone())
    }
}

/// Every provider of this deployment, by name.
#[derive(Debug, Clone, Default)]
pub struct Providers {
    by_name: BTreeMap<String, Arc<Provider>>,
}

impl Providers {
    pub fn new(providers: impl IntoIterator<Item = Provider>) -> Self {
        Self { by_name: providers.into_iter().map(|p| (p.name.clone(), Arc::new(p))).collect() }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Provider>> {
        self.by_name.get(name)
    }

    /// In name order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Provider>> {
        self.by_name.values()
    }
}
