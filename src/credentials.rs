//! Credentials registered through the admin API, for every provider but Trackunit (whose arrive by its
//! callback, see `installs`): register or replace, and erase, each in one transaction with its audit
//! event. The only place that seals them; what is sealed is bound to its provider, account, installation,
//! credentials version and field (see `crypto::Aad`).

use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use uuid::Uuid;

use crate::crypto::{Aad, AadVersion, CredentialRow, KeyRing, Sealed, SecretField};
use crate::store::audit::{self, AuditEvent};
use crate::store::installation::{self, SealedCredentials, Summary};
use crate::store::refresh_token::{self, RefreshTokenRow};
use crate::store::{mint_failure, token_cache};

/// Credentials as an operator registers them. `Debug` shows none of them.
pub struct NewCredentials {
    pub client_id: SecretString,
    /// Required unless `refresh_token` is given (a public client).
    pub client_secret: Option<SecretString>,
    /// For user-delegated credentials: every token is then minted with the refresh token grant.
    pub refresh_token: Option<SecretString>,
}

/// Longest client id, secret or refresh token accepted, in bytes.
pub const MAX_SECRET_BYTES: usize = 8 * 1024;

impl NewCredentials {
    /// Checks what an operator sent: `client_id` required; `client_secret` required unless a
    /// `refresh_token` is given (a public client); each at most 8 KiB without control characters. The
    /// error names the field, never its value.
    pub fn new(
        client_id: Option<String>,
        client_secret: Option<String>,
        refresh_token: Option<String>,
    ) -> Result<Self, String> {
        let check = |name: &str, value: Option<String>| -> Result<Option<SecretString>, String> {
            let Some(value) = value else { return Ok(None) };
            if value.is_empty() {
                return Err(format!("`{name}` must not be empty"));
            }
            if value.len() > MAX_SECRET_BYTES {
                return Err(format!("`{name}` must be at most {MAX_SECRET_BYTES} bytes"));
            }
            if value.chars().any(char::is_control) {
                return Err(format!("`{name}` must not contain control characters"));
            }
            Ok(Some(SecretString::from(value)))
        };
        let client_id = check("client_id", client_id)?.ok_or("`client_id` is required")?;
        let client_secret = check("client_secret", client_secret)?;
        let refresh_token = check("refresh_token", refresh_token)?;
        if client_secret.is_none() && refresh_token.is_none() {
            return Err("`client_secret` is required unless a `refresh_token` is given".into());
        }
        Ok(Self { client_id, client_secret, refresh_token })
    }
}

impl std::fmt::Debug for NewCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewCredentials")
            .field("client_secret", &self.client_secret.is_some())
            .field("refresh_token", &self.refresh_token.is_some())
            .finish_non_exhaustive()
    }
}

/// Seals a client id and (when there is one) secret for the installation row `row`.
pub(crate) fn seal_credentials(
    keys: &KeyRing,
    row: &CredentialRow<'_>,
    client_id: &SecretString,
    client_secret: Option<&SecretString>,
) -> (Sealed, Option<Sealed>) {
    let seal = |value: &SecretString, field| {
        keys.seal(value.expose_secret().as_bytes(), &Aad::credential(AadVersion::CURRENT, row, field))
    };
    (seal(client_id, SecretField::ClientId), client_secret.map(|secret| seal(secret, SecretField::ClientSecret)))
}

/// What to store of sealed credentials.
pub(crate) fn sealed_pair<'a>(id: &'a Sealed, secret: Option<&'a Sealed>) -> SealedCredentials<'a> {
    SealedCredentials {
        key_id: id.key_id.as_str(),
        client_id: &id.bytes,
        client_secret: secret.map(|secret| secret.bytes.as_slice()),
        aad_version: AadVersion::CURRENT.as_column(),
    }
}

/// A refresh token sealed for `row` at `generation`.
pub(crate) fn seal_refresh_token(
    keys: &KeyRing,
    row: &CredentialRow<'_>,
    refresh_token: &SecretString,
    generation: i64,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
) -> RefreshTokenRow {
    let sealed = keys.seal(refresh_token.expose_secret().as_bytes(), &Aad::refresh_token(row, generation));
    RefreshTokenRow {
        key_id: sealed.key_id.as_str().to_owned(),
        ciphertext: sealed.bytes,
        aad_version: AadVersion::CURRENT.as_column(),
        generation,
        expires_at,
    }
}

/// What registering did.
#[derive(Debug)]
pub enum Registered {
    Created(Summary),
    Replaced(Summary),
}

/// Registers (or replaces) the credentials of `account_id` at `provider`. Replacing bumps the credentials
/// version and erases the cached tokens, refresh token and recorded failures of the old ones in the same
/// transaction, so no replica serves a token of the old credentials again.
pub async fn register(
    pool: &PgPool,
    keys: &KeyRing,
    provider: &str,
    account_id: &str,
    credentials: &NewCredentials,
) -> sqlx::Result<Registered> {
    let grant_type = if credentials.refresh_token.is_some() { "refresh_token" } else { "client_credentials" };
    let mut tx = pool.begin().await?;
    let mut existing = installation::lock_at_provider(&mut tx, provider, account_id).await?;
    let mut created = None;
    if existing.is_none() {
        let id = Uuid::new_v4();
        let row = CredentialRow { provider, app_id: "", account_id, installation_id: id, credentials_version: 1 };
        let (sealed_id, sealed_secret) =
            seal_credentials(keys, &row, &credentials.client_id, credentials.client_secret.as_ref());
        let sealed = sealed_pair(&sealed_id, sealed_secret.as_ref());
        match installation::insert_at_provider(&mut tx, id, provider, account_id, &sealed, grant_type).await? {
            Some(id) => {
                if let Some(refresh) = &credentials.refresh_token {
                    refresh_token::put(&mut tx, id, &seal_refresh_token(keys, &row, refresh, 1, None)).await?;
                }
                created = Some(id);
            }
            // A concurrent registration won: replace what it stored.
            None => existing = installation::lock_at_provider(&mut tx, provider, account_id).await?,
        }
    }
    let (id, replaced) = match (created, existing) {
        (Some(id), _) => (id, false),
        (None, Some(existing)) => {
            let version = existing.credentials_version + 1;
            let row = CredentialRow { credentials_version: version, ..existing.credential_row() };
            let (sealed_id, sealed_secret) =
                seal_credentials(keys, &row, &credentials.client_id, credentials.client_secret.as_ref());
            let sealed = sealed_pair(&sealed_id, sealed_secret.as_ref());
            installation::replace_credentials(&mut tx, existing.id, version, &sealed, None).await?;
            installation::set_grant_type(&mut tx, existing.id, grant_type).await?;
            token_cache::delete_for_installation(&mut tx, existing.id).await?;
            mint_failure::delete_for_installation(&mut tx, existing.id).await?;
            match &credentials.refresh_token {
                Some(refresh) => {
                    refresh_token::put(&mut tx, existing.id, &seal_refresh_token(keys, &row, refresh, 1, None)).await?
                }
                None => refresh_token::delete(&mut tx, existing.id).await?,
            }
            (existing.id, true)
        }
        (None, None) => return Err(sqlx::Error::RowNotFound),
    };
    let action = if replaced { "CREDENTIALS_REPLACED" } else { "CREDENTIALS_REGISTERED" };
    let event = AuditEvent {
        provider: Some(provider),
        account_id: Some(account_id),
        installation_id: Some(id),
        ..AuditEvent::new(action, "stored")
    };
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    let summary = installation::summary(pool, id).await?.ok_or(sqlx::Error::RowNotFound)?;
    Ok(if replaced { Registered::Replaced(summary) } else { Registered::Created(summary) })
}

/// Erases the credentials of `account_id` at `provider`, with every cached token and the refresh token.
/// Returns the erased installation's id, or `None` when there was nothing to erase.
pub async fn erase(pool: &PgPool, provider: &str, account_id: &str) -> sqlx::Result<Option<Uuid>> {
    let mut tx = pool.begin().await?;
    let Some(existing) = installation::lock_at_provider(&mut tx, provider, account_id).await? else {
        return Ok(None);
    };
    installation::delete(&mut tx, existing.id).await?;
    let event = AuditEvent {
        provider: Some(provider),
        account_id: Some(account_id),
        installation_id: Some(existing.id),
        ..AuditEvent::new("CREDENTIALS_DELETED", "deleted")
    };
    audit::record(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(Some(existing.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_an_operator_sends_is_checked_and_never_quoted() {
        let some = |s: &str| Some(s.to_owned());
        assert!(NewCredentials::new(some("id"), some("s3cret"), None).is_ok());
        assert!(NewCredentials::new(some("id"), None, some("rt")).is_ok(), "a public client with a refresh token");
        let refused = [
            (None, some("s3cret"), None, "`client_id` is required"),
            (some("id"), None, None, "`client_secret` is required"),
            (some("id"), some("s3cret\n"), None, "control characters"),
            (some("id"), some(&"s3cret".repeat(2000)), None, "at most 8192 bytes"),
            (some(""), some("s3cret"), None, "must not be empty"),
        ];
        for (id, secret, refresh, expected) in refused {
            let error = NewCredentials::new(id, secret, refresh).unwrap_err();
            assert!(error.contains(expected) && !error.contains("s3cret"), "{error}");
        }
        let debug = format!("{:?}", NewCredentials::new(some("cid-x"), some("s3cret"), some("rt-y")).unwrap());
        assert!(!debug.contains("cid-x") && !debug.contains("s3cret") && !debug.contains("rt-y"), "{debug}");
    }
}
