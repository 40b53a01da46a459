//! The refresh tokens of user-delegated credentials (`refresh_token`), sealed. A mint of such credentials
//! locks the row for its whole refresh, so a refresh token is spent at most once across every replica.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// A stored refresh token: its ciphertext and what it is bound to.
#[derive(Clone, sqlx::FromRow)]
pub struct RefreshTokenRow {
    pub key_id: String,
    pub ciphertext: Vec<u8>,
    pub aad_version: i16,
    pub generation: i64,
    pub expires_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for RefreshTokenRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefreshTokenRow")
            .field("key_id", &self.key_id)
            .field("generation", &self.generation)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The refresh token of `installation_id`, locked until the transaction ends: whoever holds it is the
/// only one who may spend it.
pub async fn lock(conn: &mut PgConnection, installation_id: Uuid) -> sqlx::Result<Option<RefreshTokenRow>> {
    sqlx::query_as(
        "select key_id, ciphertext, aad_version, generation, expires_at from refresh_token
         where installation_id = $1 for update",
    )
    .bind(installation_id)
    .fetch_optional(conn)
    .await
}

/// Stores (or replaces) the refresh token of `installation_id`.
pub async fn put(conn: &mut PgConnection, installation_id: Uuid, row: &RefreshTokenRow) -> sqlx::Result<()> {
    sqlx::query(
        "insert into refresh_token (installation_id, key_id, ciphertext, aad_version, generation, expires_at)
         values ($1, $2, $3, $4, $5, $6)
         on conflict on constraint refresh_token_pkey do update set
             key_id = excluded.key_id, ciphertext = excluded.ciphertext, aad_version = excluded.aad_version,
             generation = excluded.generation, expires_at = excluded.expires_at, updated_at = now()",
    )
    .bind(installation_id)
    .bind(&row.key_id)
    .bind(&row.ciphertext)
    .bind(row.aad_version)
    .bind(row.generation)
    .bind(row.expires_at)
    .execute(conn)
    .await
    .map(drop)
}

pub async fn delete(conn: &mut PgConnection, installation_id: Uuid) -> sqlx::Result<()> {
    sqlx::query("delete from refresh_token where installation_id = $1")
        .bind(installation_id)
        .execute(conn)
        .await
        .map(drop)
}

/// A stored refresh token with its installation, for re-sealing.
#[derive(sqlx::FromRow)]
pub struct KeyedRefreshToken {
    pub installation_id: Uuid,
    #[sqlx(flatten)]
    pub row: RefreshTokenRow,
}

/// Locks up to `limit` refresh tokens sealed under a key other than `primary` or with associated data
/// older than `aad_version`, skipping `exclude`.
pub async fn lock_needing_reseal(
    conn: &mut PgConnection,
    primary: &str,
    aad_version: i16,
    exclude: &[Uuid],
    limit: i64,
) -> sqlx::Result<Vec<KeyedRefreshToken>> {
    sqlx::query_as(
        "select installation_id, key_id, ciphertext, aad_version, generation, expires_at from refresh_token
         where (key_id <> $1 or aad_version < $2) and not (installation_id = any($3))
         order by installation_id limit $4 for update",
    )
    .bind(primary)
    .bind(aad_version)
    .bind(exclude)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Replaces the ciphertext of a locked refresh token with the same token sealed again.
pub async fn reseal(
    conn: &mut PgConnection,
    installation_id: Uuid,
    key_id: &str,
    ciphertext: &[u8],
    aad_version: i16,
) -> sqlx::Result<()> {
    sqlx::query("update refresh_token set key_id = $2, ciphertext = $3, aad_version = $4 where installation_id = $1")
        .bind(installation_id)
        .bind(key_id)
        .bind(ciphertext)
        .bind(aad_version)
        .execute(conn)
        .await
        .map(drop)
}
