//! Minting under the cross-replica lock: the token another replica stored, or one upstream call whose
//! outcome (token, rejection or failure) is recorded for every replica in the same transaction.
//!
//! Which grant a mint uses is the provider's and the credentials' business, decided here:
//! - user-delegated credentials (registered with a refresh token) always use the refresh token grant.
//!   The refresh token's row is locked (`for update`) for the whole call and the rotated token is stored in
//!   the same transaction as the access token, so a refresh token is spent at most once across replicas.
//!   `invalid_grant` rejects the credentials until new ones are registered.
//! - client credentials use the refresh token that came with the key's last token (Keycloak), while it is
//!   valid and the provider allows it, else (and after `invalid_grant`) the client credentials grant.
//!
//! Decrypted secrets live only for the call and never leave this module.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use secrecy::{ExposeSecret, SecretString};

use super::{BrokerError, CacheKey, Obtained, Token, UpstreamError, Want, backoff};
use crate::credentials::seal_refresh_token;
use crate::crypto::{Aad, AadVersion, OpenError, SecretField};
use crate::domain::ScopeSet;
use crate::provider::{Credentials, Grant, MintedToken, Provider};
use crate::store::audit::{self, AuditEvent};
use crate::store::installation::{self, Installation};
use crate::store::mint_failure::{self, MintFailureRow};
use crate::store::refresh_token::{self, RefreshTokenRow};
use crate::store::token_cache::{self, CachedTokenRow};

/// A refresh token counts as expired this long before the provider says, so it is not presented at the
/// last moment.
const REFRESH_TOKEN_MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(5);

/// The failure a `mint_failure` row records, `remaining` before the key may mint again.
fn recorded_error(row: &MintFailureRow, remaining: Duration) -> UpstreamError {
    let recorded = || "recorded by the replica that made the call".to_owned();
    match row.kind.as_str() {
        "rejected" => UpstreamError::Rejected {
            status: row.http_status.and_then(|s| u16::try_from(s).ok()).unwrap_or(400),
            error: row.error_code.clone().unwrap_or_else(|| "no error code".into()),
        },
        "invalid_scope" => UpstreamError::InvalidScope,
        "failed" => UpstreamError::Failed {
            attempts: row.attempts.and_then(|a| u32::try_from(a).ok()).unwrap_or(1),
            reason: recorded(),
        },
        _ => UpstreamError::Unavailable { retry_after: remaining, reason: recorded() },
    }
}

/// The `mint_failure` row recording the `failures`th failure in a row, `error`, backing off for `wait`.
fn failure_row(failures: u32, wait: Duration, error: &UpstreamError) -> MintFailureRow {
    let attempts = match error {
        UpstreamError::Failed { attempts, .. } => i32::try_from(*attempts).ok(),
        _ => None,
    };
    let (kind, http_status, error_code) = match error {
        UpstreamError::Unavailable { .. } => ("unavailable", None, None),
        UpstreamError::Failed { .. } => ("failed", None, None),
        UpstreamError::InvalidScope => ("invalid_scope", None, None),
        UpstreamError::Rejected { status, error } => ("rejected", Some(i32::from(*status)), Some(error.clone())),
        // Never recorded here: they reject the whole installation instead.
        UpstreamError::InvalidClient => ("rejected", Some(401), Some("invalid_client".to_owned())),
        UpstreamError::InvalidGrant => ("rejected", Some(400), Some("invalid_grant".to_owned())),
    };
    MintFailureRow {
        failures: i32::try_from(failures).unwrap_or(i32::MAX),
        retry_at: Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default(),
        kind: kind.to_owned(),
        http_status,
        error_code,
        attempts,
    }
}

/// The refresh token a mint may present: the delegated credentials' own (locked), or the one that came
/// with the key's last token (in its shared-table row, if any).
enum Held {
    /// The stored row (locked) and the token it holds.
    Delegated(RefreshTokenRow, SecretString),
    WithToken(Option<CachedTokenRow>),
}

/// Records in the audit trail that the upstream rejected `installation`'s credentials with `error`.
async fn audit_rejection(tx: &mut sqlx::PgConnection, installation: &Installation, error: &str) -> sqlx::Result<()> {
    let event = AuditEvent {
        provider: Some(&installation.provider),
        app_id: installation.app_id.as_deref(),
        account_id: Some(&installation.account_id),
        installation_id: Some(installation.id),
        ..AuditEvent::new("INSTALLATION_REJECTED", error)
    };
    audit::record(tx, &event).await
}

/// A mint's new refresh token, and where it goes.
enum NewRefresh {
    /// Keep none (or the provider sent none).
    None,
    /// With the access token in `token_cache` (client credentials that came with one).
    WithToken(SecretString, Option<chrono::DateTime<Utc>>),
    /// Rotated: the user-delegated credentials' next refresh token, at its next generation.
    Rotated(RefreshTokenRow),
}

impl super::Broker {
    /// The provider of `installation`, or [`BrokerError::UnknownProvider`] when it is no longer configured.
    pub(super) fn provider_of(&self, installation: &Installation) -> Result<&Arc<Provider>, BrokerError> {
        self.providers.get(&installation.provider).ok_or(BrokerError::UnknownProvider)
    }

    pub(super) fn open_cached(&self, key: &CacheKey, row: &CachedTokenRow) -> Result<Token, OpenError> {
        let version = AadVersion::from_column(row.aad_version).ok_or(OpenError::Unauthentic)?;
        let bound = key.token_row(&row.token_type, &row.granted_scope, row.expires_at);
        let aad = Aad::cached_token(version, &bound, None);
        let access_token = self.keys.open_string(&row.key_id, &row.access_token_ciphertext, &aad)?;
        Ok(Token::from_row(access_token, row, &key.scope_key))
    }

    /// The refresh token that came with a cached token, if it is still worth presenting.
    fn open_cached_refresh(&self, key: &CacheKey, row: &CachedTokenRow) -> Option<SecretString> {
        let sealed = row.refresh_token_ciphertext.as_deref()?;
        if row.refresh_expires_at.is_some_and(|at| at - REFRESH_TOKEN_MARGIN <= Utc::now()) {
            return None;
        }
        let bound = key.token_row(&row.token_type, &row.granted_scope, row.expires_at);
        let aad = Aad::cached_token(AadVersion::from_column(row.aad_version)?, &bound, Some(SecretField::RefreshToken));
        self.keys.open_string(&row.key_id, sealed, &aad).ok()
    }

    /// Under the cross-process lock: the token another replica stored, or a fresh mint stored for all.
    ///
    /// Under the lock it first reads what a replica that held it before may have recorded: the
    /// installation rejected (invalid_client) or changed, or the key backing off after a failed mint.
    /// Either is answered as it is, without calling the upstream. A failed mint is recorded the same way,
    /// in the same transaction, for the requests and replicas that wait behind it.
    #[tracing::instrument(skip_all, fields(installation.id = %installation.id, provider = %installation.provider))]
    pub(super) async fn shared_or_mint(
        &self,
        installation: &Installation,
        key: &CacheKey,
        scopes: &ScopeSet,
        want: Want,
    ) -> Result<Obtained, BrokerError> {
        let satisfies = |token: &Token| match want {
            Want::FreshFor(min_ttl) => token.fresh_for(min_ttl, Utc::now()),
            Want::NewerThan(expiry) => token.expires_at > expiry && token.seconds_left(Utc::now()) > 0,
        };
        let provider = Arc::clone(self.provider_of(installation)?);
        // Most refreshes find the token another replica has just stored. Look first without a mint
        // permit or the lock, so that only mints hold permits: a burst of refreshes that only read
        // must not queue for the permits the mints need.
        let mut conn = self.pool.acquire().await?;
        if let (Some(token), _) = self.shared(key, &satisfies, &mut conn).await? {
            return Ok(Obtained { token, minted: false, stored: true });
        }
        drop(conn);
        let waiting_since = std::time::Instant::now();
        let _permit = self.mints.acquire().await.expect("the semaphore is never closed");
        let mut tx = self.pool.begin().await?;
        token_cache::lock_key(&mut tx, key.installation_id, &key.scope_key).await?;
        // Again under the lock: another replica may have minted, or failed to, while we waited for it.
        let cached = match self.shared(key, &satisfies, &mut tx).await? {
            (Some(token), _) => {
                tx.commit().await?;
                return Ok(Obtained { token, minted: false, stored: true });
            }
            (None, row) => row,
        };
        match installation::state(&mut tx, installation.id).await? {
            Some((status, version)) if version == installation.credentials_version && status == "active" => {}
            Some((status, version)) if version == installation.credentials_version && status == "rejected" => {
                self.directory.forget_account(&installation.account_id);
                return Err(BrokerError::PreviouslyRejected);
            }
            _ => {
                self.directory.forget_account(&installation.account_id);
                return Err(BrokerError::Changed);
            }
        }
        // A failure recorded while we waited for the lock is the outcome of the mint we waited for.
        let waited = waiting_since.elapsed() + Duration::from_millis(20);
        if let Some((recorded, during_wait)) =
            mint_failure::get(&mut tx, key.installation_id, &key.scope_key, waited).await?
            && let Ok(remaining) = (recorded.retry_at - Utc::now()).to_std()
            && !remaining.is_zero()
        {
            let error = recorded_error(&recorded, remaining);
            self.backoff.adopt(key, recorded.failures.max(1) as u32, remaining, error.clone());
            self.failing.insert(key.installation_id, ());
            tx.commit().await?;
            let shared = if during_wait { Some(error) } else { backoff::refusal(&error) };
            return Err(match shared {
                Some(error) => error.into(),
                None => UpstreamError::Unavailable {
                    retry_after: remaining,
                    reason: "backing off after upstream failures".into(),
                }
                .into(),
            });
        }

        let credentials = self.open_credentials(installation)?;
        // Locked until the transaction ends: no other mint, here or on any replica, can present it.
        let delegated = match installation.is_delegated() {
            true => Some(
                refresh_token::lock(&mut tx, installation.id)
                    .await?
                    .ok_or(BrokerError::CredentialsUnreadable(installation.id))?,
            ),
            false => None,
        };
        let held = match delegated {
            Some(stored) => {
                let aad = Aad::refresh_token(&installation.credential_row(), stored.generation);
                let refresh = self.keys.open_string(&stored.key_id, &stored.ciphertext, &aad).map_err(|error| {
                    tracing::error!(error = %error, "the stored refresh token does not decrypt");
                    BrokerError::CredentialsUnreadable(installation.id)
                })?;
                Held::Delegated(stored, refresh)
            }
            None => Held::WithToken(cached),
        };
        let minted = self.call(&provider, installation, key, scopes, &credentials, held).await;
        let (minted, new_refresh) = match minted {
            Ok(minted) => minted,
            Err(UpstreamError::InvalidClient) => {
                // Probed again with client credentials; delegated credentials only come back with new ones.
                let first_probe = self.probe_schedule.first().copied().unwrap_or(Duration::from_secs(60));
                let probe = (!installation.is_delegated()).then_some(first_probe);
                installation::mark_rejected(
                    &mut tx,
                    installation.id,
                    installation.credentials_version,
                    &key.scope_key,
                    probe,
                )
                .await?;
                audit_rejection(&mut tx, installation, "invalid_client").await?;
                tx.commit().await?;
                self.directory.forget_account(&installation.account_id);
                tracing::warn!(
                    probe_in_s = first_probe.as_secs(),
                    "upstream rejected the client credentials; installation marked rejected"
                );
                return Err(UpstreamError::InvalidClient.into());
            }
            Err(UpstreamError::InvalidGrant) if installation.is_delegated() => {
                // The user's grant is gone: only new credentials can bring it back, so no probe.
                installation::mark_rejected(
                    &mut tx,
                    installation.id,
                    installation.credentials_version,
                    &key.scope_key,
                    None,
                )
                .await?;
                audit_rejection(&mut tx, installation, "invalid_grant").await?;
                tx.commit().await?;
                self.directory.forget_account(&installation.account_id);
                tracing::warn!("upstream refused the delegated refresh token; credentials marked rejected");
                return Err(UpstreamError::InvalidGrant.into());
            }
            Err(error) => {
                let (failures, wait) = self.backoff.failed(key, &error);
                self.failing.insert(key.installation_id, ());
                let row = failure_row(failures, wait, &error);
                mint_failure::put(&mut tx, key.installation_id, &key.scope_key, &row).await?;
                tx.commit().await?;
                tracing::warn!(error = %error, failures, retry_in_ms = wait.as_millis() as u64, "token mint failed; backing off");
                return Err(error.into());
            }
        };
        self.backoff.succeeded(key);
        mint_failure::delete(&mut tx, key.installation_id, &key.scope_key).await?;
        let token = Token::from_minted(minted, scopes);
        let mut row = self.seal_token(key, &token);
        match new_refresh {
            NewRefresh::None => {}
            NewRefresh::WithToken(refresh, expires_at) => {
                let bound = key.token_row(&row.token_type, &row.granted_scope, row.expires_at);
                let aad = Aad::cached_token(AadVersion::CURRENT, &bound, Some(SecretField::RefreshToken));
                // Sealed now, like the access token: under the same (primary) key, the row's one key id.
                let sealed = self.keys.seal(refresh.expose_secret().as_bytes(), &aad);
                debug_assert_eq!(sealed.key_id.as_str(), row.key_id);
                row.refresh_token_ciphertext = Some(sealed.bytes);
                row.refresh_expires_at = expires_at;
            }
            NewRefresh::Rotated(next) => refresh_token::put(&mut tx, installation.id, &next).await?,
        }
        let stored =
            token_cache::put(&mut tx, key.installation_id, &key.scope_key, key.credentials_version, &row).await?;
        tx.commit().await?;
        Ok(Obtained { token, minted: true, stored })
    }

    /// The upstream call of a mint, with the grant the credentials call for (see the module's docs), and
    /// where the refresh token it returned must go.
    async fn call(
        &self,
        provider: &Provider,
        installation: &Installation,
        key: &CacheKey,
        scopes: &ScopeSet,
        credentials: &Credentials,
        held: Held,
    ) -> Result<(MintedToken, NewRefresh), UpstreamError> {
        let cached = match held {
            Held::WithToken(cached) => cached,
            Held::Delegated(stored, refresh) => {
                let row = installation.credential_row();
                return self.refresh_delegated(provider, credentials, scopes, &row, stored, &refresh).await;
            }
        };
        let held =
            cached.as_ref().filter(|_| provider.use_refresh_tokens).and_then(|row| self.open_cached_refresh(key, row));
        let minted = match held {
            Some(refresh) => match self.mint(provider, credentials, Grant::RefreshToken(&refresh), scopes).await {
                Err(UpstreamError::InvalidGrant) => {
                    tracing::debug!("the refresh token was refused; falling back to client credentials");
                    self.mint(provider, credentials, Grant::ClientCredentials, scopes).await?
                }
                other => other?,
            },
            None => self.mint(provider, credentials, Grant::ClientCredentials, scopes).await?,
        };
        let mut minted = minted;
        let refresh = match minted.refresh_token.take() {
            Some(refresh) if provider.use_refresh_tokens => NewRefresh::WithToken(refresh, minted.refresh_expires_at),
            _ => NewRefresh::None,
        };
        Ok((minted, refresh))
    }

    /// Spends the delegated credentials' refresh token `refresh` (stored as `stored`, locked by the
    /// caller) and says what replaces it: the rotated one at the next generation, or the same one.
    async fn refresh_delegated(
        &self,
        provider: &Provider,
        credentials: &Credentials,
        scopes: &ScopeSet,
        row: &crate::crypto::CredentialRow<'_>,
        stored: RefreshTokenRow,
        refresh: &SecretString,
    ) -> Result<(MintedToken, NewRefresh), UpstreamError> {
        let mut minted = self.mint(provider, credentials, Grant::RefreshToken(refresh), scopes).await?;
        let next = match minted.refresh_token.take() {
            Some(rotated) => {
                seal_refresh_token(&self.keys, row, &rotated, stored.generation + 1, minted.refresh_expires_at)
            }
            // Not rotated: the same token stays, as it was stored.
            None => stored,
        };
        Ok((minted, NewRefresh::Rotated(next)))
    }

    /// One upstream call, counted.
    pub(super) async fn mint(
        &self,
        provider: &Provider,
        credentials: &Credentials,
        grant: Grant<'_>,
        scopes: &ScopeSet,
    ) -> Result<MintedToken, UpstreamError> {
        metrics::counter!("tokenvault_token_cache_total", "tier" => "mint").increment(1);
        self.endpoint.mint(provider, credentials, grant, scopes).await
    }

    /// `token` sealed for the shared table, bound to its key and to what it is (type, scope, expiry).
    pub(super) fn seal_token(&self, key: &CacheKey, token: &Token) -> CachedTokenRow {
        let bound = key.token_row(&token.token_type, &token.scope, token.expires_at);
        let aad = Aad::cached_token(AadVersion::CURRENT, &bound, None);
        let sealed = self.keys.seal(token.access_token.expose_secret().as_bytes(), &aad);
        CachedTokenRow {
            key_id: sealed.key_id.as_str().to_owned(),
            access_token_ciphertext: sealed.bytes,
            token_type: token.token_type.clone(),
            granted_scope: token.scope.clone(),
            issued_at: token.issued_at,
            expires_at: token.expires_at,
            aad_version: AadVersion::CURRENT.as_column(),
            refresh_token_ciphertext: None,
            refresh_expires_at: None,
        }
    }

    /// The token in the shared table for `key`, if it satisfies the caller, and the row as read (for the
    /// refresh token it may hold). A row that does not decrypt (its key retired) counts as none, and the
    /// caller mints; a database error is the caller's, who must not mint while the table cannot be read.
    async fn shared(
        &self,
        key: &CacheKey,
        satisfies: &impl Fn(&Token) -> bool,
        conn: &mut sqlx::PgConnection,
    ) -> Result<(Option<Token>, Option<CachedTokenRow>), sqlx::Error> {
        let Some(row) = token_cache::get(conn, key.installation_id, &key.scope_key, key.credentials_version).await?
        else {
            return Ok((None, None));
        };
        match self.open_cached(key, &row) {
            Ok(token) if satisfies(&token) => {
                metrics::counter!("tokenvault_token_cache_total", "tier" => "database").increment(1);
                Ok((Some(token), Some(row)))
            }
            Ok(_) => Ok((None, Some(row))),
            Err(error) => {
                tracing::warn!(error = %error, "cached token unreadable; minting a new one");
                Ok((None, None))
            }
        }
    }

    /// The installation's client id and (when it has one) secret, decrypted for one call.
    pub(super) fn open_credentials(&self, installation: &Installation) -> Result<Credentials, BrokerError> {
        let unreadable = || BrokerError::CredentialsUnreadable(installation.id);
        let (Some(key_id), Some(id_sealed), Some(version)) = (
            installation.key_id.as_deref(),
            installation.client_id_ciphertext.as_deref(),
            AadVersion::from_column(installation.aad_version),
        ) else {
            return Err(unreadable());
        };
        let row = installation.credential_row();
        let open = |sealed: &[u8], field| {
            self.keys.open_string(key_id, sealed, &Aad::credential(version, &row, field)).map_err(|error| {
                tracing::error!(installation.id = %installation.id, error = %error, "stored credentials do not decrypt");
                unreadable()
            })
        };
        let client_secret = match installation.client_secret_ciphertext.as_deref() {
            Some(sealed) => Some(open(sealed, SecretField::ClientSecret)?),
            None => None,
        };
        Ok(Credentials { client_id: open(id_sealed, SecretField::ClientId)?, client_secret })
    }
}
