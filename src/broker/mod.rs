//! Token brokering: finds the installation a caller asks for, and hands out a token for it from the
//! in-process cache, else the shared `token_cache` table, else one fresh upstream mint.
//!
//! Minting one (installation, scope set) is single-flight twice over: within the process a per-key mutex
//! makes concurrent requests share one mint, and across processes `pg_advisory_xact_lock` on the same key
//! makes other replicas wait and then read the token this one stored. Client secrets are decrypted only
//! for the upstream call and never leave this module.

mod token;
pub mod upstream;

pub use token::Token;
pub use upstream::{ProviderProfile, TokenEndpoint, UpstreamError};

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use moka::sync::Cache;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use uuid::Uuid;

use crate::crypto::{Aad, KeyRing, SecretField};
use crate::domain::ScopeSet;
use crate::store::installation::{self, Installation, Status};
use crate::store::token_cache::{self, CachedTokenRow};

/// Most tokens kept in memory; beyond this the least useful are evicted (TinyLFU).
const MEMORY_CAPACITY: u64 = 200_000;

/// Why no token could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no active installation")]
    NotInstalled,
    #[error("several active installations; app_id is required")]
    AmbiguousApp,
    #[error(
        "the upstream rejected this installation's credentials earlier; waiting for a new install"
    )]
    PreviouslyRejected,
    #[error("the stored credentials of installation {0} cannot be decrypted")]
    CredentialsUnreadable(Uuid),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    installation_id: Uuid,
    credentials_version: i64,
    scope_key: Arc<str>,
}

pub struct Broker {
    pool: PgPool,
    keys: Arc<KeyRing>,
    upstream: TokenEndpoint,
    memory: Cache<CacheKey, Arc<Token>>,
    /// One mutex per key being minted, so concurrent requests in this process share one mint.
    flights: Cache<CacheKey, Arc<tokio::sync::Mutex<()>>>,
}

impl Broker {
    pub fn new(pool: PgPool, keys: Arc<KeyRing>, upstream: TokenEndpoint) -> Self {
        Self {
            pool,
            keys,
            upstream,
            memory: Cache::builder()
                .max_capacity(MEMORY_CAPACITY)
                .expire_after(token::UntilExpiry)
                .support_invalidation_closures()
                .build(),
            flights: Cache::builder()
                .time_to_idle(Duration::from_secs(60))
                .build(),
        }
    }

    /// The installation a token request is for: the one of `app_id`, or the account's only usable one.
    pub async fn resolve(
        &self,
        account_id: &str,
        app_id: Option<&str>,
    ) -> Result<Installation, BrokerError> {
        let usable = |i: &Installation| matches!(i.status(), Status::Active | Status::Rejected);
        let mut candidates: Vec<Installation> =
            installation::for_account(&self.pool, account_id, app_id)
                .await?
                .into_iter()
                .filter(usable)
                .collect();
        match candidates.len() {
            0 => Err(BrokerError::NotInstalled),
            1 => Ok(candidates.remove(0)),
            _ => Err(BrokerError::AmbiguousApp),
        }
    }

    /// A token for `installation` and `scopes` valid for at least `min_ttl` (see [`Token::fresh_for`]).
    pub async fn token(
        &self,
        installation: &Installation,
        scopes: &ScopeSet,
        min_ttl: Duration,
    ) -> Result<Arc<Token>, BrokerError> {
        if installation.status() == Status::Rejected {
            return Err(BrokerError::PreviouslyRejected);
        }
        let key = CacheKey {
            installation_id: installation.id,
            credentials_version: installation.credentials_version,
            scope_key: scopes.key().into(),
        };
        if let Some(token) = self
            .memory
            .get(&key)
            .filter(|t| t.fresh_for(min_ttl, Utc::now()))
        {
            metrics::counter!("tokenvault_token_cache_total", "tier" => "memory").increment(1);
            return Ok(token);
        }
        let flight = self.flights.get_with(key.clone(), Default::default);
        let _turn = flight.lock().await;
        // Whoever held the mutex before us may have just stored what we need.
        if let Some(token) = self
            .memory
            .get(&key)
            .filter(|t| t.fresh_for(min_ttl, Utc::now()))
        {
            metrics::counter!("tokenvault_token_cache_total", "tier" => "memory").increment(1);
            return Ok(token);
        }
        let token = Arc::new(
            self.shared_or_mint(installation, &key, scopes, min_ttl)
                .await?,
        );
        self.memory.insert(key, Arc::clone(&token));
        Ok(token)
    }

    /// Under the cross-process lock: the token another replica stored, or a fresh mint stored for all.
    #[tracing::instrument(skip_all, fields(installation.id = %installation.id))]
    async fn shared_or_mint(
        &self,
        installation: &Installation,
        key: &CacheKey,
        scopes: &ScopeSet,
        min_ttl: Duration,
    ) -> Result<Token, BrokerError> {
        let mut tx = self.pool.begin().await?;
        token_cache::lock_key(&mut tx, key.installation_id, &key.scope_key).await?;
        let aad = Aad::cached_token(
            &key.installation_id,
            key.credentials_version,
            &key.scope_key,
        );
        if let Some(row) = token_cache::get(
            &mut tx,
            key.installation_id,
            &key.scope_key,
            key.credentials_version,
        )
        .await?
        {
            match self
                .keys
                .open_string(&row.key_id, &row.access_token_ciphertext, &aad)
            {
                Ok(access_token) => {
                    let token = Token::from_row(access_token, &row);
                    if token.fresh_for(min_ttl, Utc::now()) {
                        tx.commit().await?;
                        metrics::counter!("tokenvault_token_cache_total", "tier" => "database")
                            .increment(1);
                        return Ok(token);
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error, "cached token unreadable; minting a new one")
                }
            }
        }

        let (client_id, client_secret) = self.open_credentials(installation)?;
        metrics::counter!("tokenvault_token_cache_total", "tier" => "mint").increment(1);
        let minted = match self.upstream.mint(&client_id, &client_secret, scopes).await {
            Ok(minted) => minted,
            Err(UpstreamError::InvalidClient) => {
                installation::mark_rejected(
                    &mut tx,
                    installation.id,
                    installation.credentials_version,
                )
                .await?;
                tx.commit().await?;
                tracing::warn!(
                    "upstream rejected the client credentials; installation marked rejected"
                );
                return Err(UpstreamError::InvalidClient.into());
            }
            Err(error) => return Err(error.into()),
        };
        let token = Token::from_minted(minted, scopes);
        let sealed = self
            .keys
            .seal(token.access_token.expose_secret().as_bytes(), &aad);
        let row = CachedTokenRow {
            key_id: sealed.key_id.as_str().to_owned(),
            access_token_ciphertext: sealed.bytes,
            token_type: token.token_type.clone(),
            granted_scope: token.scope.clone(),
            issued_at: token.issued_at,
            expires_at: token.expires_at,
        };
        token_cache::put(
            &mut tx,
            key.installation_id,
            &key.scope_key,
            key.credentials_version,
            &row,
        )
        .await?;
        tx.commit().await?;
        Ok(token)
    }

    fn open_credentials(
        &self,
        installation: &Installation,
    ) -> Result<(secrecy::SecretString, secrecy::SecretString), BrokerError> {
        let unreadable = || BrokerError::CredentialsUnreadable(installation.id);
        let (Some(key_id), Some(id_sealed), Some(secret_sealed)) = (
            installation.key_id.as_deref(),
            installation.client_id_ciphertext.as_deref(),
            installation.client_secret_ciphertext.as_deref(),
        ) else {
            return Err(unreadable());
        };
        let open = |sealed: &[u8], field| {
            self.keys
                .open_string(key_id, sealed, &Aad::installation(&installation.app_id, &installation.account_id, field))
                .map_err(|error| {
                    tracing::error!(installation.id = %installation.id, error = %error, "stored credentials do not decrypt");
                    unreadable()
                })
        };
        Ok((
            open(id_sealed, SecretField::ClientId)?,
            open(secret_sealed, SecretField::ClientSecret)?,
        ))
    }

    /// Drops every in-memory token of an installation (its credentials changed or were erased).
    pub fn forget(&self, installation_id: Uuid) {
        // Only fails when invalidation closures are not enabled, and they are.
        let _ = self
            .memory
            .invalidate_entries_if(move |key, _| key.installation_id == installation_id);
    }
}
