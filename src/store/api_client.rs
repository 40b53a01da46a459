//! Service clients (`api_client`): who may call the token API, for what. Only key digests are stored.

use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// Whether a client's key was used since the last time that was written down (`api_client_usage`, at most
/// once a minute, never on a request's path). A clone starts unmarked: marks live on the shared copy.
#[derive(Debug, Default)]
pub struct UsageMark(AtomicBool);

impl Clone for UsageMark {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl UsageMark {
    /// Marks a use: one relaxed load on the hot path, and a store the first time in a minute.
    pub fn mark(&self) {
        if !self.0.load(Ordering::Relaxed) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    /// Whether it was used since the last call, clearing the mark.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::Relaxed)
    }
}

/// An internal service allowed to call the token API. Holds no key: only digests, never shown.
#[derive(Debug, Clone, sqlx::FromRow)]
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
    /// After this the key no longer works.
    pub expires_at: Option<DateTime<Utc>>,
    /// The key a rotation replaced, valid until `previous_key_expires_at`.
    pub previous_key_sha256: Option<Vec<u8>>,
    pub previous_key_expires_at: Option<DateTime<Utc>>,
    #[sqlx(skip)]
    pub usage: UsageMark,
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

    /// Whether the key hashing to `digest` works now: not expired, and if it is the key a rotation
    /// replaced, still within its grace period. Without expiries (the usual case) no clock is read.
    pub fn key_works(&self, digest: &[u8; 32]) -> bool {
        if self.expires_at.is_none() && self.previous_key_sha256.is_none() {
            return true;
        }
        let now = Utc::now();
        if self.expires_at.is_some_and(|at| at <= now) {
            return false;
        }
        match &self.previous_key_sha256 {
            Some(previous) if previous.as_slice() == digest => self.previous_key_expires_at.is_some_and(|at| at > now),
            _ => true,
        }
    }
}

/// A client as the admin API and `clients list` show it: never a key or a digest.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct ClientView {
    pub name: String,
    /// `active`, `revoked` or `expired`.
    pub status: String,
    pub admin: bool,
    pub accounts: Vec<String>,
    pub scopes: Vec<String>,
    pub apps: Vec<String>,
    pub providers: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Until when the key a rotation replaced still works.
    pub previous_key_expires_at: Option<DateTime<Utc>>,
    /// To within a minute.
    pub last_used_at: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("a client named {0:?} already exists")]
    NameTaken(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

const COLUMNS: &str = "id, name, accounts, scopes, apps, providers, admin, created_at, revoked_at, expires_at, \
                       previous_key_sha256, previous_key_expires_at";
const VIEW: &str = "select c.name,
        case when c.revoked_at is not null then 'revoked'
             when c.expires_at is not null and c.expires_at <= now() then 'expired' else 'active' end as status,
        c.admin, c.accounts, c.scopes, c.apps, c.providers, c.created_at, c.revoked_at, c.expires_at,
        case when c.previous_key_expires_at > now() then c.previous_key_expires_at end as previous_key_expires_at,
        u.last_used_at
    from api_client c left join api_client_usage u on u.client_id = c.id";

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
    create_expiring(pool, name, key_sha256, grants, None).await
}

/// Creates a client whose key works until `expires_at` (for ever when `None`).
pub async fn create_expiring(
    conn: impl sqlx::PgExecutor<'_>,
    name: &str,
    key_sha256: &[u8; 32],
    grants: &Grants,
    expires_at: Option<DateTime<Utc>>,
) -> Result<ApiClient, CreateError> {
    sqlx::query_as(&format!(
        "insert into api_client (name, key_sha256, accounts, scopes, apps, providers, admin, expires_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8)
         returning {COLUMNS}"
    ))
    .bind(name)
    .bind(&key_sha256[..])
    .bind(&grants.accounts)
    .bind(&grants.scopes)
    .bind(&grants.apps)
    .bind(&grants.providers)
    .bind(grants.admin)
    .bind(expires_at)
    .fetch_one(conn)
    .await
    .map_err(|error| match &error {
        sqlx::Error::Database(db) if db.constraint() == Some("api_client_active_name_key") => {
            CreateError::NameTaken(name.to_owned())
        }
        _ => CreateError::Database(error),
    })
}

/// The unrevoked, unexpired client whose key (or previous key, within its grace) hashes to `key_sha256`.
pub async fn find_active(pool: &PgPool, key_sha256: &[u8; 32]) -> sqlx::Result<Option<ApiClient>> {
    sqlx::query_as(&format!(
        "select {COLUMNS} from api_client
         where (key_sha256 = $1 or (previous_key_sha256 = $1 and previous_key_expires_at > now()))
             and revoked_at is null and (expires_at is null or expires_at > now())"
    ))
    .bind(&key_sha256[..])
    .fetch_optional(pool)
    .await
}

/// The key digests of every client that may call now, previous keys within their grace included.
pub async fn active_digests(pool: &PgPool) -> sqlx::Result<Vec<[u8; 32]>> {
    let rows: Vec<Vec<u8>> = sqlx::query_scalar(
        "select key_sha256 from api_client where revoked_at is null and (expires_at is null or expires_at > now())
         union all
         select previous_key_sha256 from api_client
         where revoked_at is null and previous_key_sha256 is not null and previous_key_expires_at > now()",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().filter_map(|digest| digest.try_into().ok()).collect())
}

/// Every client, revoked ones included, by name.
pub async fn list(pool: &PgPool) -> sqlx::Result<Vec<ClientView>> {
    sqlx::query_as(&format!("{VIEW} order by c.name, c.created_at")).fetch_all(pool).await
}

/// The client named `name` that is not revoked, if any.
pub async fn by_name(pool: &PgPool, name: &str) -> sqlx::Result<Option<ClientView>> {
    sqlx::query_as(&format!("{VIEW} where c.name = $1 and c.revoked_at is null")).bind(name).fetch_optional(pool).await
}

/// Revokes the client named `name`; returns whether one was revoked.
pub async fn revoke(conn: impl sqlx::PgExecutor<'_>, name: &str) -> sqlx::Result<bool> {
    let result = sqlx::query("update api_client set revoked_at = now() where name = $1 and revoked_at is null")
        .bind(name)
        .execute(conn)
        .await?;
    Ok(result.rows_affected() == 1)
}

/// Gives the client named `name` the key hashing to `key_sha256`; its current key keeps working for
/// `grace` (a previous key still in its grace stops now). Returns whether there was such a client.
pub async fn rotate(
    conn: impl sqlx::PgExecutor<'_>,
    name: &str,
    key_sha256: &[u8; 32],
    grace: std::time::Duration,
) -> sqlx::Result<bool> {
    let result = sqlx::query(
        "update api_client set previous_key_sha256 = key_sha256,
             previous_key_expires_at = now() + make_interval(secs => $3), key_sha256 = $2
         where name = $1 and revoked_at is null",
    )
    .bind(name)
    .bind(&key_sha256[..])
    .bind(grace.as_secs_f64())
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Writes down that the clients `ids` used their keys now. A client's row is written at most once a
/// minute whatever the number of replicas: a use within a minute of the recorded one changes nothing.
pub async fn record_usage(pool: &PgPool, ids: &[Uuid]) -> sqlx::Result<()> {
    sqlx::query(
        "insert into api_client_usage (client_id, last_used_at) select used.id, now() from unnest($1::uuid[]) as used(id)
         where exists (select 1 from api_client where api_client.id = used.id)
         on conflict on constraint api_client_usage_pkey do update set last_used_at = excluded.last_used_at
         where api_client_usage.last_used_at <= excluded.last_used_at - interval '1 minute'",
    )
    .bind(ids)
    .execute(pool)
    .await
    .map(drop)
}

/// The names of clients whose keys expired since last asked (each is answered once).
pub async fn newly_expired(conn: impl sqlx::PgExecutor<'_>) -> sqlx::Result<Vec<(Uuid, String)>> {
    sqlx::query_as(
        "update api_client set expiry_audited = true
         where expires_at <= now() and revoked_at is null and not expiry_audited
         returning id, name",
    )
    .fetch_all(conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> ApiClient {
        ApiClient {
            id: Uuid::nil(),
            name: "c".into(),
            accounts: vec![],
            scopes: vec![],
            apps: vec![],
            providers: vec![],
            admin: false,
            created_at: Utc::now(),
            revoked_at: None,
            expires_at: None,
            previous_key_sha256: None,
            previous_key_expires_at: None,
            usage: UsageMark::default(),
        }
    }

    #[test]
    fn a_key_works_until_it_expires_and_a_replaced_one_until_its_grace_ends() {
        let (current, previous) = ([1; 32], [2; 32]);
        let in_an_hour = Some(Utc::now() + chrono::Duration::hours(1));
        let an_hour_ago = Some(Utc::now() - chrono::Duration::hours(1));
        assert!(client().key_works(&current));
        assert!(!ApiClient { expires_at: an_hour_ago, ..client() }.key_works(&current));
        assert!(ApiClient { expires_at: in_an_hour, ..client() }.key_works(&current));
        let rotated = |grace_until| ApiClient {
            previous_key_sha256: Some(previous.to_vec()),
            previous_key_expires_at: grace_until,
            ..client()
        };
        assert!(rotated(in_an_hour).key_works(&previous));
        assert!(!rotated(an_hour_ago).key_works(&previous));
        assert!(rotated(an_hour_ago).key_works(&current), "the new key is unaffected");
    }

    #[test]
    fn a_use_is_marked_once_until_taken() {
        let mark = UsageMark::default();
        assert!(!mark.take());
        mark.mark();
        mark.mark();
        assert!(mark.take());
        assert!(!mark.take());
        mark.mark();
        assert!(!mark.clone().take(), "a clone starts unmarked");
    }
}
