//! Re-encryption of everything stored under the primary key of the ring (`tokenvault keys rotate`), so an
//! old key can be dropped. Batched and resumable: each batch is one transaction that locks its rows, so a
//! concurrent install either waits for the batch or is waited for, and nothing is lost. Safe to run while
//! `serve` runs elsewhere, provided those processes already have the new key ring (new key first, old
//! key still present), so whatever they write meanwhile is sealed under the new key too.

use secrecy::ExposeSecret;
use sqlx::PgPool;
use uuid::Uuid;

use crate::crypto::{Aad, KeyRing, SecretField};
use crate::store::installation::{self, Installation, SealedCredentials};
use crate::store::token_cache;

/// What a rotation did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub installations: u64,
    pub cached_tokens: u64,
    pub expired_tokens_deleted: u64,
    /// Installations whose credentials could not be decrypted; left untouched.
    pub unreadable_installations: Vec<Uuid>,
    /// Cached tokens (`installation_id/scope`) that could not be decrypted; left untouched.
    pub unreadable_tokens: Vec<String>,
}

pub async fn rotate(pool: &PgPool, keys: &KeyRing, batch_size: i64) -> anyhow::Result<Report> {
    let primary = keys.primary_id().as_str();
    let mut report = Report::default();
    let mut conn = pool.acquire().await?;
    report.expired_tokens_deleted = token_cache::delete_expired(&mut conn).await?;
    drop(conn);

    loop {
        let mut tx = pool.begin().await?;
        let batch =
            installation::lock_sealed_under_other_keys(&mut tx, primary, &report.unreadable_installations, batch_size)
                .await?;
        if batch.is_empty() {
            break;
        }
        for row in &batch {
            match reseal_installation(keys, row) {
                Some((key_id, client_id, client_secret)) => {
                    let sealed =
                        SealedCredentials { key_id: &key_id, client_id: &client_id, client_secret: &client_secret };
                    installation::reseal(&mut tx, row.id, &sealed).await?;
                    report.installations += 1;
                }
                None => {
                    tracing::error!(installation.id = %row.id, "credentials do not decrypt; row left untouched");
                    report.unreadable_installations.push(row.id);
                }
            }
        }
        tx.commit().await?;
    }

    loop {
        let mut tx = pool.begin().await?;
        let batch =
            token_cache::lock_sealed_under_other_keys(&mut tx, primary, &report.unreadable_tokens, batch_size).await?;
        if batch.is_empty() {
            break;
        }
        for row in &batch {
            let aad = Aad::cached_token(&row.installation_id, row.credentials_version, &row.scope_key);
            match keys.open(&row.key_id, &row.access_token_ciphertext, &aad) {
                Ok(plain) => {
                    let sealed = keys.seal(plain.expose_secret(), &aad);
                    token_cache::reseal(&mut tx, row, sealed.key_id.as_str(), &sealed.bytes).await?;
                    report.cached_tokens += 1;
                }
                Err(_) => report.unreadable_tokens.push(format!("{}/{}", row.installation_id, row.scope_key)),
            }
        }
        tx.commit().await?;
    }
    Ok(report)
}

/// The credentials of `row` sealed under the primary key, or `None` if they do not decrypt.
fn reseal_installation(keys: &KeyRing, row: &Installation) -> Option<(String, Vec<u8>, Vec<u8>)> {
    let key_id = row.key_id.as_deref()?;
    let mut resealed = Vec::with_capacity(2);
    for (sealed, field) in [
        (row.client_id_ciphertext.as_deref()?, SecretField::ClientId),
        (row.client_secret_ciphertext.as_deref()?, SecretField::ClientSecret),
    ] {
        let aad = Aad::installation(&row.app_id, &row.account_id, field);
        let plain = keys.open(key_id, sealed, &aad).ok()?;
        resealed.push(keys.seal(plain.expose_secret(), &aad));
    }
    let secret = resealed.pop()?;
    let id = resealed.pop()?;
    Some((id.key_id.as_str().to_owned(), id.bytes, secret.bytes))
}
