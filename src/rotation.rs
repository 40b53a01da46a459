//! Re-encryption of everything stored under the primary key of the ring (`tokenvault keys rotate`), so an
//! old key can be dropped. Batched and resumable: each batch is one transaction that locks its rows, so a
//! concurrent install either waits for the batch or is waited for, and nothing is lost. Safe to run while
//! `serve` runs elsewhere, provided those processes already have the new key ring (new key first, old
//! key still present), so whatever they write meanwhile is sealed under the new key too.

use secrecy::ExposeSecret;
use sqlx::PgPool;
use uuid::Uuid;

use crate::crypto::{Aad, AadVersion, KeyRing, SecretField, TokenRow};
use crate::store::audit::{self, AuditEvent};
use crate::store::installation::{self, Installation, SealedCredentials};
use crate::store::{refresh_token, token_cache};

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
    /// Refresh tokens of user-delegated credentials re-sealed.
    pub refresh_tokens: u64,
    /// Installations whose refresh token could not be decrypted; left untouched.
    pub unreadable_refresh_tokens: Vec<Uuid>,
}

/// What a rotation would re-seal now (`keys rotate --dry-run`): rows sealed under another key than the
/// primary one, or with older associated data.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub installations: i64,
    pub cached_tokens: i64,
    pub refresh_tokens: i64,
    pub expired_tokens: i64,
}

pub async fn plan(pool: &PgPool, keys: &KeyRing) -> sqlx::Result<Plan> {
    // The rotation deletes the spent cached tokens first, then re-seals the rest.
    let spent = token_cache::SPENT;
    let (installations, cached_tokens, refresh_tokens, expired_tokens): (i64, i64, i64, i64) =
        sqlx::query_as(&format!(
            "select
                 (select count(*) from installation where key_id is not null and (key_id <> $1 or aad_version < $2)),
                 (select count(*) from token_cache where (key_id <> $1 or aad_version < $2) and not ({spent})),
                 (select count(*) from refresh_token where key_id <> $1 or aad_version < $2),
                 (select count(*) from token_cache where {spent})"
        ))
        .bind(keys.primary_id().as_str())
        .bind(AadVersion::CURRENT.as_column())
        .fetch_one(pool)
        .await?;
    Ok(Plan { installations, cached_tokens, refresh_tokens, expired_tokens })
}

/// Re-seals everything under the primary key, `batch_size` rows per transaction; `progress` hears of
/// each batch (what it re-sealed, and of what).
pub async fn rotate(
    pool: &PgPool,
    keys: &KeyRing,
    batch_size: i64,
    progress: impl Fn(&str, u64),
) -> anyhow::Result<Report> {
    let primary = keys.primary_id().as_str();
    let mut report = Report::default();
    let mut conn = pool.acquire().await?;
    report.expired_tokens_deleted = token_cache::delete_expired(&mut conn).await?;
    drop(conn);

    loop {
        let mut tx = pool.begin().await?;
        let batch = installation::lock_needing_reseal(
            &mut tx,
            primary,
            AadVersion::CURRENT.as_column(),
            &report.unreadable_installations,
            batch_size,
        )
        .await?;
        if batch.is_empty() {
            break;
        }
        for row in &batch {
            match reseal_installation(keys, row) {
                Some((key_id, client_id, client_secret)) => {
                    let sealed = SealedCredentials {
                        key_id: &key_id,
                        client_id: &client_id,
                        client_secret: client_secret.as_deref(),
                        aad_version: AadVersion::CURRENT.as_column(),
                    };
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
        progress("installations", report.installations);
    }

    loop {
        let mut tx = pool.begin().await?;
        let batch = token_cache::lock_needing_reseal(
            &mut tx,
            primary,
            AadVersion::CURRENT.as_column(),
            &report.unreadable_tokens,
            batch_size,
        )
        .await?;
        if batch.is_empty() {
            break;
        }
        for keyed in &batch {
            let row = &keyed.row;
            let bound = TokenRow {
                installation_id: keyed.installation_id,
                credentials_version: keyed.credentials_version,
                scope_key: &keyed.scope_key,
                token_type: &row.token_type,
                granted_scope: &row.granted_scope,
                expires_at_ms: row.expires_at.timestamp_millis(),
            };
            let reseal = |sealed: &[u8], field: Option<SecretField>| {
                let version = AadVersion::from_column(row.aad_version)?;
                let plain = keys.open(&row.key_id, sealed, &Aad::cached_token(version, &bound, field)).ok()?;
                Some(keys.seal(plain.expose_secret(), &Aad::cached_token(AadVersion::CURRENT, &bound, field)))
            };
            let access = reseal(&row.access_token_ciphertext, None);
            let refresh =
                row.refresh_token_ciphertext.as_deref().map(|sealed| reseal(sealed, Some(SecretField::RefreshToken)));
            match (access, refresh) {
                (Some(access), refresh @ (None | Some(Some(_)))) => {
                    let refresh = refresh.flatten();
                    token_cache::reseal(
                        &mut tx,
                        keyed,
                        access.key_id.as_str(),
                        &access.bytes,
                        refresh.as_ref().map(|sealed| sealed.bytes.as_slice()),
                        AadVersion::CURRENT.as_column(),
                    )
                    .await?;
                    report.cached_tokens += 1;
                }
                _ => report.unreadable_tokens.push(format!("{}/{}", keyed.installation_id, keyed.scope_key)),
            }
        }
        tx.commit().await?;
        progress("cached tokens", report.cached_tokens);
    }

    loop {
        let mut tx = pool.begin().await?;
        let batch = refresh_token::lock_needing_reseal(
            &mut tx,
            primary,
            AadVersion::CURRENT.as_column(),
            &report.unreadable_refresh_tokens,
            batch_size,
        )
        .await?;
        if batch.is_empty() {
            break;
        }
        for keyed in &batch {
            let stored = &keyed.row;
            let owner = installation::by_id(&mut tx, keyed.installation_id).await?;
            let opened = owner.as_ref().and_then(|owner| {
                let aad = Aad::refresh_token(&owner.credential_row(), stored.generation);
                Some((keys.open(&stored.key_id, &stored.ciphertext, &aad).ok()?, aad))
            });
            match opened {
                Some((plain, aad)) => {
                    let sealed = keys.seal(plain.expose_secret(), &aad);
                    refresh_token::reseal(
                        &mut tx,
                        keyed.installation_id,
                        sealed.key_id.as_str(),
                        &sealed.bytes,
                        AadVersion::CURRENT.as_column(),
                    )
                    .await?;
                    report.refresh_tokens += 1;
                }
                None => report.unreadable_refresh_tokens.push(keyed.installation_id),
            }
        }
        tx.commit().await?;
        progress("refresh tokens", report.refresh_tokens);
    }
    let outcome = if report.unreadable_installations.is_empty()
        && report.unreadable_tokens.is_empty()
        && report.unreadable_refresh_tokens.is_empty()
    {
        "complete"
    } else {
        "incomplete"
    };
    let mut conn = pool.acquire().await?;
    let event = AuditEvent { client_name: None, ..AuditEvent::new("ENCRYPTION_KEYS_ROTATED", outcome) };
    audit::record(&mut conn, &event).await?;
    Ok(report)
}

/// The credentials of `row` (a client id, and a secret unless it is a public client) sealed under the
/// primary key with the current associated data, or `None` if they do not decrypt.
type Resealed = (String, Vec<u8>, Option<Vec<u8>>);

fn reseal_installation(keys: &KeyRing, row: &Installation) -> Option<Resealed> {
    let key_id = row.key_id.as_deref()?;
    let version = AadVersion::from_column(row.aad_version)?;
    let bound = row.credential_row();
    let reseal = |sealed: &[u8], field| {
        let plain = keys.open(key_id, sealed, &Aad::credential(version, &bound, field)).ok()?;
        Some(keys.seal(plain.expose_secret(), &Aad::credential(AadVersion::CURRENT, &bound, field)))
    };
    let id = reseal(row.client_id_ciphertext.as_deref()?, SecretField::ClientId)?;
    let secret = match row.client_secret_ciphertext.as_deref() {
        Some(sealed) => Some(reseal(sealed, SecretField::ClientSecret)?.bytes),
        None => None,
    };
    Some((id.key_id.as_str().to_owned(), id.bytes, secret))
}
