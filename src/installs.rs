//! Applies verified callback messages to the store: seals credentials, upserts or erases installations,
//! drops cached tokens, and records an audit event, all in one transaction, so a callback is
//! acknowledged only after everything it changed is committed.

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use uuid::Uuid;

use crate::crypto::{Aad, KeyRing, SecretField};
use crate::domain::{AccountId, AppId};
use crate::store::callback_event::{self, CallbackEvent};
use crate::store::installation::{self, Installation, SealedCredentials, Status};
use crate::store::token_cache;

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
    /// The same credentials again (a replay or a retry): nothing changed.
    Unchanged(Uuid),
    /// Older than what is stored (by the identity token's `iat`): nothing changed.
    Stale,
    Uninstalled(Uuid),
    /// UNINSTALLED for an installation we never had.
    UnknownInstallation,
    Ignored,
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

/// Applies `message`, authenticated by an identity token issued at `issued_at` (seconds since the epoch).
pub async fn apply(
    pool: &PgPool,
    keys: &KeyRing,
    message: &CallbackMessage,
    issued_at: Option<i64>,
) -> sqlx::Result<Outcome> {
    let issued_at = issued_at.and_then(|secs| DateTime::<Utc>::from_timestamp(secs, 0));
    let mut tx = pool.begin().await?;
    let (outcome, event_type, app_id, account_id) = match message {
        CallbackMessage::Installed { app_id, account_id, client_id, client_secret } => {
            let outcome = install(&mut tx, keys, app_id, account_id, client_id, client_secret, issued_at).await?;
            (outcome, "INSTALLED", Some(app_id.as_str()), Some(account_id.as_str()))
        }
        CallbackMessage::Uninstalled { app_id, account_id } => {
            let outcome = uninstall(&mut tx, app_id, account_id, issued_at).await?;
            (outcome, "UNINSTALLED", Some(app_id.as_str()), Some(account_id.as_str()))
        }
        CallbackMessage::Other { message_type } => (Outcome::Ignored, message_type.as_str(), None, None),
    };
    let event =
        CallbackEvent { event_type, app_id, account_id, outcome: outcome.label(), identity_issued_at: issued_at };
    callback_event::record(&mut tx, &event).await?;
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
    let sealed_id =
        keys.seal(client_id.expose_secret().as_bytes(), &Aad::installation(app, account, SecretField::ClientId));
    let sealed_secret = keys
        .seal(client_secret.expose_secret().as_bytes(), &Aad::installation(app, account, SecretField::ClientSecret));
    let credentials = SealedCredentials {
        key_id: sealed_id.key_id.as_str(),
        client_id: &sealed_id.bytes,
        client_secret: &sealed_secret.bytes,
    };
    // Lock the row if it exists; otherwise insert, and if a concurrent callback inserted first, lock that.
    let existing = match installation::lock(tx, app, account).await? {
        Some(existing) => existing,
        None => match installation::insert(tx, app, account, &credentials, issued_at).await? {
            Some(id) => return Ok(Outcome::Stored(id)),
            None => installation::lock(tx, app, account).await?.ok_or(sqlx::Error::RowNotFound)?,
        },
    };
    if is_stale(existing.identity_issued_at, issued_at) {
        return Ok(Outcome::Stale);
    }
    if existing.status() == Status::Active && holds_credentials(keys, &existing, client_id, client_secret) {
        return Ok(Outcome::Unchanged(existing.id));
    }
    installation::replace_credentials(tx, existing.id, &credentials, issued_at).await?;
    token_cache::delete_for_installation(tx, existing.id).await?;
    Ok(Outcome::Stored(existing.id))
}

/// Whether the stored credentials are these (a replayed or retried INSTALLED).
fn holds_credentials(
    keys: &KeyRing,
    stored: &Installation,
    client_id: &SecretString,
    client_secret: &SecretString,
) -> bool {
    let (Some(key_id), Some(id_sealed), Some(secret_sealed)) =
        (stored.key_id.as_deref(), stored.client_id_ciphertext.as_deref(), stored.client_secret_ciphertext.as_deref())
    else {
        return false;
    };
    let same = |sealed: &[u8], field, expected: &SecretString| {
        keys.open_string(key_id, sealed, &Aad::installation(&stored.app_id, &stored.account_id, field))
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
    let event = CallbackEvent {
        event_type: "ADMIN_REVOKED",
        app_id: Some(&existing.app_id),
        account_id: Some(&existing.account_id),
        outcome: "revoked",
        identity_issued_at: None,
    };
    callback_event::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(Some(existing.account_id))
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
