use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Lifecycle of an installation. Stored as text; see the `installation_status_check` constraint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Active,
    Uninstalled,
    Revoked,
    /// The upstream answered `invalid_client`: no more upstream calls until a new INSTALLED arrives.
    Rejected,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Uninstalled => "uninstalled",
            Status::Revoked => "revoked",
            Status::Rejected => "rejected",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "active" => Status::Active,
            "uninstalled" => Status::Uninstalled,
            "revoked" => Status::Revoked,
            _ => Status::Rejected,
        }
    }
}

/// An installation with its sealed credentials. `Debug` shows no ciphertext.
#[derive(Clone, sqlx::FromRow)]
pub struct Installation {
    pub id: Uuid,
    pub app_id: String,
    pub account_id: String,
    pub status: String,
    pub key_id: Option<String>,
    pub client_id_ciphertext: Option<Vec<u8>>,
    pub client_secret_ciphertext: Option<Vec<u8>>,
    pub identity_issued_at: Option<DateTime<Utc>>,
    pub credentials_version: i64,
}

impl Installation {
    pub fn status(&self) -> Status {
        Status::parse(&self.status)
    }
}

impl std::fmt::Debug for Installation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installation")
            .field("id", &self.id)
            .field("app_id", &self.app_id)
            .field("account_id", &self.account_id)
            .field("status", &self.status)
            .field("key_id", &self.key_id)
            .field("credentials_version", &self.credentials_version)
            .finish_non_exhaustive()
    }
}

/// What list endpoints show: never a secret, never a client id.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Summary {
    pub id: Uuid,
    pub app_id: String,
    pub account_id: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Sealed credentials ready to store.
pub struct SealedCredentials<'a> {
    pub key_id: &'a str,
    pub client_id: &'a [u8],
    pub client_secret: &'a [u8],
}

const COLUMNS: &str = "id, app_id, account_id, status, key_id, client_id_ciphertext, client_secret_ciphertext, \
                       identity_issued_at, credentials_version";

/// Locks and returns the installation of `(app_id, account_id)`, if any.
pub async fn lock(conn: &mut PgConnection, app_id: &str, account_id: &str) -> sqlx::Result<Option<Installation>> {
    sqlx::query_as(&format!("select {COLUMNS} from installation where app_id = $1 and account_id = $2 for update"))
        .bind(app_id)
        .bind(account_id)
        .fetch_optional(conn)
        .await
}

/// Inserts a new active installation; `None` when a concurrent insert won the race (lock it and retry).
pub async fn insert(
    conn: &mut PgConnection,
    app_id: &str,
    account_id: &str,
    credentials: &SealedCredentials<'_>,
    identity_issued_at: Option<DateTime<Utc>>,
) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar(
        "insert into installation
             (app_id, account_id, status, key_id, client_id_ciphertext, client_secret_ciphertext, identity_issued_at)
         values ($1, $2, 'active', $3, $4, $5, $6)
         on conflict on constraint installation_app_account_key do nothing
         returning id",
    )
    .bind(app_id)
    .bind(account_id)
    .bind(credentials.key_id)
    .bind(credentials.client_id)
    .bind(credentials.client_secret)
    .bind(identity_issued_at)
    .fetch_optional(conn)
    .await
}

/// Replaces the credentials of a locked installation and makes it active again. `identity_issued_at`
/// only moves forward, so it stays the watermark that refuses older callbacks.
pub async fn replace_credentials(
    conn: &mut PgConnection,
    id: Uuid,
    credentials: &SealedCredentials<'_>,
    identity_issued_at: Option<DateTime<Utc>>,
) -> sqlx::Result<()> {
    sqlx::query(
        "update installation set status = 'active', key_id = $2, client_id_ciphertext = $3,
             client_secret_ciphertext = $4, identity_issued_at = greatest(identity_issued_at, $5),
             credentials_version = credentials_version + 1, updated_at = now()
         where id = $1",
    )
    .bind(id)
    .bind(credentials.key_id)
    .bind(credentials.client_id)
    .bind(credentials.client_secret)
    .bind(identity_issued_at)
    .execute(conn)
    .await
    .map(drop)
}

/// Erases the credentials of an installation and gives it a final status (uninstalled or revoked).
/// Returns whether a row changed.
pub async fn erase(
    conn: &mut PgConnection,
    id: Uuid,
    status: Status,
    identity_issued_at: Option<DateTime<Utc>>,
) -> sqlx::Result<bool> {
    debug_assert!(matches!(status, Status::Uninstalled | Status::Revoked));
    let result = sqlx::query(
        "update installation set status = $2, key_id = null, client_id_ciphertext = null,
             client_secret_ciphertext = null, identity_issued_at = greatest(identity_issued_at, $3),
             credentials_version = credentials_version + 1, updated_at = now()
         where id = $1",
    )
    .bind(id)
    .bind(status.as_str())
    .bind(identity_issued_at)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Marks an installation rejected by the upstream, unless its credentials changed meanwhile.
pub async fn mark_rejected(conn: &mut PgConnection, id: Uuid, credentials_version: i64) -> sqlx::Result<()> {
    sqlx::query(
        "update installation set status = 'rejected', updated_at = now()
         where id = $1 and credentials_version = $2 and status = 'active'",
    )
    .bind(id)
    .bind(credentials_version)
    .execute(conn)
    .await
    .map(drop)
}

/// Every installation of an account, whatever its status.
pub async fn for_account(pool: &PgPool, account_id: &str) -> sqlx::Result<Vec<Installation>> {
    sqlx::query_as(&format!("select {COLUMNS} from installation where account_id = $1 order by app_id"))
        .bind(account_id)
        .fetch_all(pool)
        .await
}

pub async fn by_id(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<Installation>> {
    sqlx::query_as(&format!("select {COLUMNS} from installation where id = $1 for update"))
        .bind(id)
        .fetch_optional(conn)
        .await
}

pub async fn list(pool: &PgPool) -> sqlx::Result<Vec<Summary>> {
    sqlx::query_as(
        "select id, app_id, account_id, status, created_at, updated_at from installation order by created_at, id",
    )
    .fetch_all(pool)
    .await
}

/// Locks up to `limit` installations sealed under a key other than `primary`, skipping `exclude` (rows that
/// failed before). Rows another transaction holds are waited for, so no concurrent install is lost.
pub async fn lock_sealed_under_other_keys(
    conn: &mut PgConnection,
    primary: &str,
    exclude: &[Uuid],
    limit: i64,
) -> sqlx::Result<Vec<Installation>> {
    sqlx::query_as(&format!(
        "select {COLUMNS} from installation
         where key_id is not null and key_id <> $1 and not (id = any($2))
         order by id limit $3 for update"
    ))
    .bind(primary)
    .bind(exclude)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Replaces the ciphertexts of a locked installation with the same credentials sealed under another key.
/// The credentials version is kept: nothing about the credentials changed.
pub async fn reseal(conn: &mut PgConnection, id: Uuid, credentials: &SealedCredentials<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "update installation set key_id = $2, client_id_ciphertext = $3, client_secret_ciphertext = $4
         where id = $1",
    )
    .bind(id)
    .bind(credentials.key_id)
    .bind(credentials.client_id)
    .bind(credentials.client_secret)
    .execute(conn)
    .await
    .map(drop)
}

/// How many sealed values each key id protects, per table: `(key_id, table, rows)`.
pub async fn key_usage(pool: &PgPool) -> sqlx::Result<Vec<(String, String, i64)>> {
    sqlx::query_as(
        "select key_id, 'installation', count(*) from installation where key_id is not null group by key_id
         union all
         select key_id, 'token_cache', count(*) from token_cache where expires_at > now() group by key_id
         order by 1, 2",
    )
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_ciphertext() {
        let installation = Installation {
            id: Uuid::nil(),
            app_id: "@o/a".into(),
            account_id: "acc".into(),
            status: "active".into(),
            key_id: Some("k1".into()),
            client_id_ciphertext: Some(b"CIPHERTEXT-ID".to_vec()),
            client_secret_ciphertext: Some(b"CIPHERTEXT-SECRET".to_vec()),
            identity_issued_at: None,
            credentials_version: 1,
        };
        let debug = format!("{installation:?}");
        assert!(debug.contains("acc") && !debug.contains("67, 73, 80"), "{debug}");
        assert!(!debug.contains("CIPHERTEXT"), "{debug}");
    }
}
