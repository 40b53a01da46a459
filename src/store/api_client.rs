use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// An internal service allowed to call the token API. Holds no key: only its digest is stored.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct ApiClient {
    pub id: Uuid,
    pub name: String,
    pub accounts: Vec<String>,
    pub scopes: Vec<String>,
    /// Trackunit apps (`irisAppId`s) this client may get tokens of; `*` for all.
    pub apps: Vec<String>,
    /// Providers this client may get tokens of; `*` for all.
    pub providers: Vec<String>,
    pub admin: bool,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The grant that means "all".
pub const WILDCARD: &str = "*";

impl ApiClient {
    pub fn may_access_account(&self, account_id: &str) -> bool {
        self.accounts.iter().any(|a| a == WILDCARD || a == account_id)
    }

    pub fn may_request_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == WILDCARD || s == scope)
    }

    pub fn may_use_app(&self, app_id: &str) -> bool {
        self.apps.iter().any(|a| a == WILDCARD || a == app_id)
    }

    pub fn may_use_provider(&self, provider: &str) -> bool {
        self.providers.iter().any(|p| p == WILDCARD || p == provider)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("a client named {0:?} already exists")]
    NameTaken(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

const COLUMNS: &str = "id, name, accounts, scopes, apps, providers, admin, created_at, revoked_at";

/// What a new client is granted.
#[derive(Debug, Clone)]
pub struct Grants {
    pub accounts: Vec<String>,
    pub scopes: Vec<String>,
    pub apps: Vec<String>,
    pub providers: Vec<String>,
    pub admin: bool,
}

pub async fn create(
    pool: &PgPool,
    name: &str,
    key_sha256: &[u8; 32],
    grants: &Grants,
) -> Result<ApiClient, CreateError> {
    sqlx::query_as(&format!(
        "insert into api_client (name, key_sha256, accounts, scopes, apps, providers, admin)
         values ($1, $2, $3, $4, $5, $6, $7)
         returning {COLUMNS}"
    ))
    .bind(name)
    .bind(&key_sha256[..])
    .bind(&grants.accounts)
    .bind(&grants.scopes)
    .bind(&grants.apps)
    .bind(&grants.providers)
    .bind(grants.admin)
    .fetch_one(pool)
    .await
    .map_err(|error| match &error {
        sqlx::Error::Database(db) if db.constraint() == Some("api_client_name_key") => {
            CreateError::NameTaken(name.to_owned())
        }
        _ => CreateError::Database(error),
    })
}

/// The unrevoked client whose key hashes to `key_sha256`.
pub async fn find_active(pool: &PgPool, key_sha256: &[u8; 32]) -> sqlx::Result<Option<ApiClient>> {
    sqlx::query_as(&format!("select {COLUMNS} from api_client where key_sha256 = $1 and revoked_at is null"))
        .bind(&key_sha256[..])
        .fetch_optional(pool)
        .await
}

/// The key digests of every unrevoked client.
pub async fn active_digests(pool: &PgPool) -> sqlx::Result<Vec<[u8; 32]>> {
    let rows: Vec<Vec<u8>> =
        sqlx::query_scalar("select key_sha256 from api_client where revoked_at is null").fetch_all(pool).await?;
    Ok(rows.into_iter().filter_map(|digest| digest.try_into().ok()).collect())
}

pub async fn list(pool: &PgPool) -> sqlx::Result<Vec<ApiClient>> {
    sqlx::query_as(&format!("select {COLUMNS} from api_client order by name")).fetch_all(pool).await
}

/// Revokes the client named `name`; returns whether one was revoked.
pub async fn revoke(pool: &PgPool, name: &str) -> sqlx::Result<bool> {
    let result = sqlx::query("update api_client set revoked_at = now() where name = $1 and revoked_at is null")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(result.rows_affected() == 1)
}
