//! Applies verified callback messages to the store: seals credentials, upserts or erases installations,
//! drops cached tokens, and records an audit event, all in one transaction, so a callback is
//! acknowledged only after everything it changed is committed.

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use uuid::Uuid;

use crate::credentials::{seal_credentials, sealed_pair};
use crate::crypto::{Aad, AadVersion, CredentialRow, KeyRing, SecretField};
use crate::domain::{AccountId, AppId};
use crate::store::audit::{self, AuditEvent};
use crate::store::identity_replay::{self, Seen};
use crate::store::installation::{self, Installation, Status};
use crate::store::{mint_failure, token_cache};

/// A parsed callback body.
pub enum CallbackMessage {
    Installed {
        app_id: AppId,
        account_id: AccountId,
        client_id: SecretString,
        client_secret: SecretString,
    },
    Uninstalled {
        app_id: AppId,
        account_id: AccountId,
    },
    /// A type Trackunit has not documented: acknowledged, logged, nothing stored.
    Other {
        message_type: String,
    },
}

impl std::fmt::Debug for CallbackMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallbackMessage::Installed { app_id, account_id, .. } => f
                .debug_struct("Installed")
                .field("app_id", app_id)
                .field("account_id", account_id)
                .finish_non_exhaustive(),
            CallbackMessage::Uninstalled { app_id, account_id } => {
                f.debug_struct("Uninstalled").field("app_id", app_id).field("account_id", account_id).finish()
            }
            CallbackMessage::Other { message_type } => f.debug_struct("Other").field("type", message_type).finish(),
        }
    }
}

/// What a callback did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// New or changed credentials stored.
    Stored(Uuid),
    /// The same credentials again (a replay or a retry): nothing changed but the watermark.
    Unchanged(Uuid),
    /// Older than what is stored (by the identity token's `iat`): nothing changed.
    Stale,
    Uninstalled(Uuid),
    /// UNINSTALLED for an installation we never had.
    UnknownInstallation,
    Ignored,
    /// The same identity token with the same body again: a retry of a message already committed.
    Retried,
}

impl Outcome {
    /// The name used in the audit trail, metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Stored(_) => "stored",
            Outcome::Unchanged(_) => "unchanged",
            Outcome::Stale => "stale",
            Outcome::Uninstalled(_) => "uninstalled",
            Outcome::UnknownInstallation => "unknown_installation",
            Outcome::Ignored => "ignored",
            Outcome::Retried => "retried",
        }
    }

    /// The installation it concerns, when there is one.
    pub fn installation(self) -> Option<Uuid> {
        match self {
            Outcome::Stored(id) | Outcome::Unchanged(id) | Outcome::Uninstalled(id) => Some(id),
            _ => None,
        }
    }

    /// The installation whose cached tokens must be forgotten, if any.
    pub fn changed_installation(self) -> Option<Uuid> {
        match self {
            Outcome::Stored(id) | Outcome::Uninstalled(id) => Some(id),
            _ => None,
        }
    }
}

/// The verified identity token that delivered a message, as the replay memory and the watermark need it.
pub struct Delivery {
    /// What the token is known by: SHA-256 of its `jti` when it has one, else of the whole token.
    pub token_sha256: [u8; 32],
    /// SHA-256 of the exact body bytes.
    pub body_sha256: [u8; 32],
    /// The token's `iat`, when present: the watermark that makes older messages stale.
    pub issued_at: Option<DateTime<Utc>>,
    /// Until when the token could verify (its `exp` plus leeway): how long it is remembered.
    pub remember_until: DateTime<Utc>,
}

/// Why a verified callback was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The identity token already delivered another message; refused and audited.
    #[error("the identity token already delivered another message")]
    Replayed,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Applies `message`, delivered by `delivery`, in one transaction with its audit event and the replay
/// memory's record of the token.
pub async fn apply(
    pool: &PgPool,
    keys: &KeyRing,
    message: &CallbackMessage,
    delivery: &Delivery,
) -> Result<Outcome, ApplyError> {
    let issued_at = delivery.issued_at;
    let (event_type, app_id, account_id) = match message {
        CallbackMessage::Installed { app_id, account_id, .. } => {
            ("INSTALLED", Some(app_id.as_str()), Some(account_id.as_str()))
        }
        CallbackMessage::Uninstalled { app_id, account_id } => {
            ("UNINSTALLED", Some(app_id.as_str()), Some(account_id.as_str()))
        }
        CallbackMessage::Other { message_type } => (message_type.as_str(), None, None),
    };
    let mut tx = pool.begin().await?;
    let seen =
        identity_replay::remember(&mut tx, &delivery.token_sha256, &delivery.body_sha256, delivery.remember_until)
            .await?;
    let outcome = match seen {
        Seen::OtherBody => {
            tx.rollback().await?;
            let event = AuditEvent {
                actor: Some("callback"),
                provider: Some(crate::provider::TRACKUNIT),
                app_id,
                account_id,
                identity_issued_at: issued_at,
                ..AuditEvent::new(event_type, "replay_refused")
            };
            let mut tx = pool.begin().await?;
            audit::record(&mut tx, &event).await?;
            tx.commit().await?;
            return Err(ApplyError::Replayed);
        }
        Seen::SameBody => Outcome::Retried,
        Seen::First => match message {
            CallbackMessage::Installed { app_id, account_id, client_id, client_secret } => {
                install(&mut tx, keys, app_id, account_id, client_id, client_secret, issued_at).await?
            }
            CallbackMessage::Uninstalled { app_id, account_id } => {
                uninstall(&mut tx, app_id, account_id, issued_at).await?
            }
            CallbackMessage::Other { .. } => Outcome::Ignored,
        },
    };
    let event = AuditEvent {
        actor: Some("callback"),
        provider: Some(crate::provider::TRACKUNIT),
        app_id,
        account_id,
        installation_id: outcome.installation(),
        identity_issued_at: issued_at,
        ..AuditEvent::new(event_type, outcome.label())
    };
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(outcome)
}

/// Whether a message issued at `incoming` is older than the stored watermark (both must be known).
fn is_stale(stored: Option<DateTime<Utc>>, incoming: Option<DateTime<Utc>>) -> bool {
    matches!((stored, incoming), (Some(stored), Some(incoming)) if incoming < stored)
}

async fn install(
    tx: &mut sqlx::PgConnection,
    keys: &KeyRing,
    app_id: &AppId,
    account_id: &AccountId,
    client_id: &SecretString,
    client_secret: &SecretString,
    issued_at: Option<DateTime<Utc>>,
) -> sqlx::Result<Outcome> {
    let (app, account) = (app_id.as_str(), account_id.as_str());
    // Lock the row if it exists; otherwise insert, and if a concurrent callback inserted first, lock that.
    let existing = match installation::lock(tx, app, account).await? {
        Some(existing) => existing,
        None => {
            let id = Uuid::new_v4();
            let row = CredentialRow {
                provider: crate::provider::TRACKUNIT,
                app_id: app,
                account_id: account,
                installation_id: id,
                credentials_version: 1,
            };
            let (sealed_id, sealed_secret) = seal_credentials(keys, &row, client_id, Some(client_secret));
            let credentials = sealed_pair(&sealed_id, sealed_secret.as_ref());
            match installation::insert(tx, id, app, account, &credentials, issued_at).await? {
                Some(id) => return Ok(Outcome::Stored(id)),
                None => installation::lock(tx, app, account).await?.ok_or(sqlx::Error::RowNotFound)?,
            }
        }
    };
    if is_stale(existing.identity_issued_at, issued_at) {
        return Ok(Outcome::Stale);
    }
    if existing.status() == Status::Active && holds_credentials(keys, &existing, client_id, client_secret) {
        installation::advance_watermark(tx, existing.id, issued_at).await?;
        return Ok(Outcome::Unchanged(existing.id));
    }
    let version = existing.credentials_version + 1;
    let row = CredentialRow { credentials_version: version, ..existing.credential_row() };
    let (sealed_id, sealed_secret) = seal_credentials(keys, &row, client_id, Some(client_secret));
    installation::replace_credentials(
        tx,
        existing.id,
        version,
        &sealed_pair(&sealed_id, sealed_secret.as_ref()),
        issued_at,
    )
    .await?;
    token_cache::delete_for_installation(tx, existing.id).await?;
    mint_failure::delete_for_installation(tx, existing.id).await?;
    Ok(Outcome::Stored(existing.id))
}

/// Whether the stored credentials are these (a replayed or retried INSTALLED).
fn holds_credentials(
    keys: &KeyRing,
    stored: &Installation,
    client_id: &SecretString,
    client_secret: &SecretString,
) -> bool {
    let (Some(key_id), Some(id_sealed), Some(secret_sealed), Some(version)) = (
        stored.key_id.as_deref(),
        stored.client_id_ciphertext.as_deref(),
        stored.client_secret_ciphertext.as_deref(),
        AadVersion::from_column(stored.aad_version),
    ) else {
        return false;
    };
    let row = stored.credential_row();
    let same = |sealed: &[u8], field, expected: &SecretString| {
        keys.open_string(key_id, sealed, &Aad::credential(version, &row, field))
            .is_ok_and(|plain| plain.expose_secret() == expected.expose_secret())
    };
    same(id_sealed, SecretField::ClientId, client_id) && same(secret_sealed, SecretField::ClientSecret, client_secret)
}

async fn uninstall(
    tx: &mut sqlx::PgConnection,
    app_id: &AppId,
    account_id: &AccountId,
    issued_at: Option<DateTime<Utc>>,
) -> sqlx::Result<Outcome> {
    let Some(existing) = installation::lock(tx, app_id.as_str(), account_id.as_str()).await? else {
        return Ok(Outcome::UnknownInstallation);
    };
    if is_stale(existing.identity_issued_at, issued_at) {
        return Ok(Outcome::Stale);
    }
    installation::erase(tx, existing.id, Status::Uninstalled, issued_at).await?;
    token_cache::delete_for_installation(tx, existing.id).await?;
    mint_failure::delete_for_installation(tx, existing.id).await?;
    Ok(Outcome::Uninstalled(existing.id))
}

/// Revokes an installation by id (the admin API): erases its credentials and cached tokens, and moves
/// the watermark to now, so only an INSTALLED issued after the revocation can bring it back (a replay of
/// an earlier one is stale). Returns the account id, or `None` when there is no such installation.
pub async fn revoke(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<String>> {
    let mut tx = pool.begin().await?;
    let Some(existing) = installation::by_id(&mut tx, id).await? else {
        return Ok(None);
    };
    installation::erase(&mut tx, id, Status::Revoked, Some(Utc::now())).await?;
    token_cache::delete_for_installation(&mut tx, id).await?;
    crate::store::refresh_token::delete(&mut tx, id).await?;
    mint_failure::delete_for_installation(&mut tx, id).await?;
    let event = AuditEvent {
        provider: Some(&existing.provider),
        app_id: existing.app_id.as_deref(),
        account_id: Some(&existing.account_id),
        installation_id: Some(existing.id),
        ..AuditEvent::new("ADMIN_REVOKED", "revoked")
    };
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(Some(existing.account_id))
}

/// What reactivating an installation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reactivation {
    /// It was rejected and is active again.
    Reactivated {
        account_id: String,
    },
    /// It was already active.
    AlreadyActive,
    /// It holds no credentials (uninstalled or revoked): only a new INSTALLED brings it back.
    NoCredentials,
    NotFound,
}

/// Makes a rejected installation active again at an operator's word (`POST /v1/installations/{id}/reactivate`,
/// `tokenvault installations reactivate`), audited as `ADMIN_REACTIVATED`.
pub async fn reactivate(pool: &PgPool, id: Uuid) -> sqlx::Result<Reactivation> {
    let mut tx = pool.begin().await?;
    let Some(existing) = installation::by_id(&mut tx, id).await? else {
        return Ok(Reactivation::NotFound);
    };
    let result = match existing.status() {
        Status::Active => Reactivation::AlreadyActive,
        Status::Uninstalled | Status::Revoked => Reactivation::NoCredentials,
        Status::Rejected => {
            installation::reactivate(&mut tx, id, None).await?;
            mint_failure::delete_for_installation(&mut tx, id).await?;
            let event = AuditEvent {
                provider: Some(&existing.provider),
                app_id: existing.app_id.as_deref(),
                account_id: Some(&existing.account_id),
                installation_id: Some(existing.id),
                ..AuditEvent::new("ADMIN_REACTIVATED", "reactivated")
            };
            audit::record(&mut tx, &event).await?;
            Reactivation::Reactivated { account_id: existing.account_id.clone() }
        }
    };
    tx.commit().await?;
    if matches!(result, Reactivation::Reactivated { .. }) {
        metrics::counter!("tokenvault_installations_reactivated_total", "by" => "admin").increment(1);
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_a_message_shows_no_credential() {
        let message = CallbackMessage::Installed {
            app_id: AppId::parse("@o/a").unwrap(),
            account_id: AccountId::parse("acc").unwrap(),
            client_id: SecretString::from("cid-visible?"),
            client_secret: SecretString::from("s3cret-visible?"),
        };
        let debug = format!("{message:?}");
        assert!(debug.contains("acc") && !debug.contains("cid-visible") && !debug.contains("s3cret"), "{debug}");
    }

    #[test]
    fn only_a_strictly_older_known_iat_is_stale() {
        let at = |s| DateTime::<Utc>::from_timestamp(s, 0);
        assert!(is_stale(at(10), at(9)));
        assert!(!is_stale(at(10), at(10)), "equal: the later arrival wins");
        assert!(!is_stale(at(10), None), "missing: the later arrival wins");
        assert!(!is_stale(None, at(1)));
    }
}
