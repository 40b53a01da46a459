use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// A cached token as stored: the access token is ciphertext.
#[derive(Clone, sqlx::FromRow)]
pub struct CachedTokenRow {
    pub key_id: String,
    pub access_token_ciphertext: Vec<u8>,
    pub token_type: String,
    pub granted_scope: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The associated-data format the ciphertext was sealed with (see `crypto::AadVersion`).
    pub aad_version: i16,
    /// A refresh token that came with the access token, sealed under the same key.
    pub refresh_token_ciphertext: Option<Vec<u8>>,
    pub refresh_expires_at: Option<DateTime<Utc>>,
}

/// Serializes minting of one (installation, scope set) across every process sharing the database, until
/// the transaction ends. Another replica that wants the same token waits here, then finds it in the table.
pub async fn lock_key(conn: &mut PgConnection, installation_id: Uuid, scope_key: &str) -> sqlx::Result<()> {
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("tokenvault/token/{installation_id}/{scope_key}"))
        .execute(conn)
        .await
        .map(drop)
}

pub async fn get(
    conn: &mut PgConnection,
    installation_id: Uuid,
    scope_key: &str,
    credentials_version: i64,
) -> sqlx::Result<Option<CachedTokenRow>> {
    sqlx::query_as(
        "select key_id, access_token_ciphertext, token_type, granted_scope, issued_at, expires_at, aad_version,
             refresh_token_ciphertext, refresh_expires_at
         from token_cache where installation_id = $1 and scope_key = $2 and credentials_version = $3",
    )
    .bind(installation_id)
    .bind(scope_key)
    .bind(credentials_version)
    .fetch_optional(conn)
    .await
}

/// Stores a minted token, unless the installation's credentials changed or it stopped being active while
/// the token was minted. Returns whether it was stored.
pub async fn put(
    conn: &mut PgConnection,
    installation_id: Uuid,
    scope_key: &str,
    credentials_version: i64,
    row: &CachedTokenRow,
) -> sqlx::Result<bool> {
    sqlx::query(
        "insert into token_cache (installation_id, scope_key, credentials_version, key_id,
             access_token_ciphertext, token_type, granted_scope, issued_at, expires_at, aad_version,
             refresh_token_ciphertext, refresh_expires_at)
         select $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12
         where exists (select 1 from installation
                       where id = $1 and credentials_version = $3 and status = 'active')
         on conflict on constraint token_cache_pkey do update set
             credentials_version = excluded.credentials_version, key_id = excluded.key_id,
             access_token_ciphertext = excluded.access_token_ciphertext, token_type = excluded.token_type,
             granted_scope = excluded.granted_scope, issued_at = excluded.issued_at,
             expires_at = excluded.expires_at, aad_version = excluded.aad_version,
             refresh_token_ciphertext = excluded.refresh_token_ciphertext,
             refresh_expires_at = excluded.refresh_expires_at",
    )
    .bind(installation_id)
    .bind(scope_key)
    .bind(credentials_version)
    .bind(&row.key_id)
    .bind(&row.access_token_ciphertext)
    .bind(&row.token_type)
    .bind(&row.granted_scope)
    .bind(row.issued_at)
    .bind(row.expires_at)
    .bind(row.aad_version)
    .bind(&row.refresh_token_ciphertext)
    .bind(row.refresh_expires_at)
    .execute(conn)
    .await
    .map(|result| result.rows_affected() == 1)
}

pub async fn delete_for_installation(conn: &mut PgConnection, installation_id: Uuid) -> sqlx::Result<u64> {
    let result =
        sqlx::query("delete from token_cache where installation_id = $1").bind(installation_id).execute(conn).await?;
    Ok(result.rows_affected())
}

/// A cached token row with its key, for re-sealing.
#[derive(sqlx::FromRow)]
pub struct KeyedRow {
    pub installation_id: Uuid,
    pub scope_key: String,
    pub credentials_version: i64,
    #[sqlx(flatten)]
    pub row: CachedTokenRow,
}

/// The rows of no further use: the access token expired, and no refresh token that may still work is
/// kept with it (one without an expiry is kept 30 days). `delete_expired` deletes them, and
/// `keys rotate --dry-run` counts them with the same predicate.
pub const SPENT: &str = "expires_at < now()
    and (refresh_token_ciphertext is null or coalesce(refresh_expires_at, expires_at + interval '30 days') < now())";

/// Deletes tokens that have expired and hold no refresh token that may still be spent: they can never be
/// served again, and they would keep an old key in use.
pub async fn delete_expired(conn: &mut PgConnection) -> sqlx::Result<u64> {
    let deleted = sqlx::query(&format!("delete from token_cache where {SPENT}")).execute(conn).await?;
    Ok(deleted.rows_affected())
}

/// Locks up to `limit` cached tokens sealed under a key other than `primary` or with associated data older
/// than `aad_version`, skipping rows that failed.
pub async fn lock_needing_reseal(
    conn: &mut PgConnection,
    primary: &str,
    aad_version: i16,
    exclude: &[String],
    limit: i64,
) -> sqlx::Result<Vec<KeyedRow>> {
    sqlx::query_as(
        "select installation_id, scope_key, credentials_version, key_id, access_token_ciphertext, token_type,
             granted_scope, issued_at, expires_at, aad_version, refresh_token_ciphertext, refresh_expires_at
         from token_cache
         where (key_id <> $1 or aad_version < $4) and not ((installation_id::text || '/' || scope_key) = any($2))
         order by installation_id, scope_key limit $3 for update",
    )
    .bind(primary)
    .bind(exclude)
    .bind(limit)
    .bind(aad_version)
    .fetch_all(conn)
    .await
}

/// Replaces the ciphertexts of a locked cached token (and its refresh token, when it has one) with the same
/// values sealed again.
pub async fn reseal(
    conn: &mut PgConnection,
    row: &KeyedRow,
    key_id: &str,
    ciphertext: &[u8],
    refresh_ciphertext: Option<&[u8]>,
    aad_version: i16,
) -> sqlx::Result<()> {
    sqlx::query(
        "update token_cache set key_id = $3, access_token_ciphertext = $4, aad_version = $5,
             refresh_token_ciphertext = $6
         where installation_id = $1 and scope_key = $2",
    )
    .bind(row.installation_id)
    .bind(&row.scope_key)
    .bind(key_id)
    .bind(ciphertext)
    .bind(aad_version)
    .bind(refresh_ciphertext)
    .execute(conn)
    .await
    .map(drop)
}

/// Deletes expired tokens and expired identity-replay records every `period` until the process ends.
/// Every replica runs it; the deletes are idempotent.
pub fn spawn_purger(pool: sqlx::PgPool, period: std::time::Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            let deleted = match pool.acquire().await {
                Ok(mut conn) => match delete_expired(&mut conn).await {
                    Ok(tokens) => {
                        super::identity_replay::delete_expired(&mut conn).await.map(|replays| tokens + replays)
                    }
                    Err(error) => Err(error),
                },
                Err(error) => Err(error),
            };
            match deleted {
                Ok(0) => {}
                Ok(rows) => tracing::debug!(rows, "expired cached tokens and identity records deleted"),
                Err(error) => tracing::debug!(error = %error, "purging expired rows failed; will retry"),
            }
        }
    })
}
