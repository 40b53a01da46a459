use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::crypto::CredentialRow;

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

/// One account's credentials at one provider, sealed. For Trackunit, what an IrisX install delivered (one
/// per app and account); for other providers, what an operator registered (one per account, no app).
/// `Debug` shows no ciphertext.
#[derive(Clone, sqlx::FromRow)]
pub struct Installation {
    pub id: Uuid,
    pub provider: String,
    /// The Trackunit app; `None` for other providers.
    pub app_id: Option<String>,
    pub account_id: String,
    pub status: String,
    pub key_id: Option<String>,
    pub client_id_ciphertext: Option<Vec<u8>>,
    pub client_secret_ciphertext: Option<Vec<u8>>,
    pub identity_issued_at: Option<DateTime<Utc>>,
    pub credentials_version: i64,
    /// The associated-data format the ciphertexts were sealed with (see `crypto::AadVersion`).
    pub aad_version: i16,
    /// `client_credentials`, or `refresh_token` for user-delegated credentials.
    pub grant_type: String,
}

impl Installation {
    pub fn status(&self) -> Status {
        Status::parse(&self.status)
    }

    /// The Trackunit app, or "" for other providers.
    pub fn app(&self) -> &str {
        self.app_id.as_deref().unwrap_or_default()
    }

    /// Whether its tokens are minted with a refresh token registered for it (user-delegated credentials).
    pub fn is_delegated(&self) -> bool {
        self.grant_type == "refresh_token"
    }

    /// The row its credential ciphertexts are bound to.
    pub fn credential_row(&self) -> CredentialRow<'_> {
        CredentialRow {
            provider: &self.provider,
            app_id: self.app(),
            account_id: &self.account_id,
            installation_id: self.id,
            credentials_version: self.credentials_version,
        }
    }
}

impl std::fmt::Debug for Installation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installation")
            .field("id", &self.id)
            .field("provider", &self.provider)
            .field("app_id", &self.app_id)
            .field("account_id", &self.account_id)
            .field("status", &self.status)
            .field("key_id", &self.key_id)
            .field("credentials_version", &self.credentials_version)
            .field("aad_version", &self.aad_version)
            .finish_non_exhaustive()
    }
}

/// What list endpoints show: never a secret, never a client id.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Summary {
    pub id: Uuid,
    pub provider: String,
    pub app_id: Option<String>,
    pub account_id: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Sealed credentials ready to store.
pub struct SealedCredentials<'a> {
    pub key_id: &'a str,
    pub client_id: &'a [u8],
    /// `None` for a public client (user-delegated credentials without a secret).
    pub client_secret: Option<&'a [u8]>,
    /// The associated-data format they were sealed with.
    pub aad_version: i16,
}

const COLUMNS: &str = "id, provider, app_id, account_id, status, key_id, client_id_ciphertext, \
                       client_secret_ciphertext, identity_issued_at, credentials_version, aad_version, grant_type";
const SUMMARY_COLUMNS: &str = "id, provider, app_id, account_id, status, created_at, updated_at";

/// Locks and returns the installation of `(app_id, account_id)`, if any.
pub async fn lock(conn: &mut PgConnection, app_id: &str, account_id: &str) -> sqlx::Result<Option<Installation>> {
    sqlx::query_as(&format!("select {COLUMNS} from installation where app_id = $1 and account_id = $2 for update"))
        .bind(app_id)
        .bind(account_id)
        .fetch_optional(conn)
        .await
}

/// Inserts a new active installation with id `id` at credentials version 1 (the credentials are sealed
/// for both); `None` when a concurrent insert won the race (lock that one instead).
pub async fn insert(
    conn: &mut PgConnection,
    id: Uuid,
    app_id: &str,
    account_id: &str,
    credentials: &SealedCredentials<'_>,
    identity_issued_at: Option<DateTime<Utc>>,
) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar(
        "insert into installation (id, app_id, account_id, status, key_id, client_id_ciphertext,
             client_secret_ciphertext, identity_issued_at, credentials_version, aad_version)
         values ($7, $1, $2, 'active', $3, $4, $5, $6, 1, $8)
         on conflict on constraint installation_app_account_key do nothing
         returning id",
    )
    .bind(app_id)
    .bind(account_id)
    .bind(credentials.key_id)
    .bind(credentials.client_id)
    .bind(credentials.client_secret)
    .bind(identity_issued_at)
    .bind(id)
    .bind(credentials.aad_version)
    .fetch_optional(conn)
    .await
}

/// Replaces the credentials of a locked installation, sealed for `credentials_version` (one more than
/// the row's), and makes it active again. `identity_issued_at` only moves forward, so it stays the
/// watermark that refuses older callbacks.
pub async fn replace_credentials(
    conn: &mut PgConnection,
    id: Uuid,
    credentials_version: i64,
    credentials: &SealedCredentials<'_>,
    identity_issued_at: Option<DateTime<Utc>>,
) -> sqlx::Result<()> {
    sqlx::query(
        "update installation set status = 'active', key_id = $2, client_id_ciphertext = $3,
             client_secret_ciphertext = $4, identity_issued_at = greatest(identity_issued_at, $5),
             credentials_version = $6, aad_version = $7, rejected_at = null, probe_count = 0,
             next_probe_at = null, probe_scope_key = null, updated_at = now()
         where id = $1",
    )
    .bind(id)
    .bind(credentials.key_id)
    .bind(credentials.client_id)
    .bind(credentials.client_secret)
    .bind(identity_issued_at)
    .bind(credentials_version)
    .bind(credentials.aad_version)
    .execute(conn)
    .await
    .map(drop)
}

/// Moves the watermark of a locked installation forward to `identity_issued_at`, for an accepted message
/// that changed nothing else (the same credentials again): a delayed, older UNINSTALLED is then stale.
/// Writes only when the watermark moves, so retries cost no row update (and no change notification).
pub async fn advance_watermark(
    conn: &mut PgConnection,
    id: Uuid,
    identity_issued_at: Option<DateTime<Utc>>,
) -> sqlx::Result<()> {
    let Some(issued_at) = identity_issued_at else {
        return Ok(());
    };
    sqlx::query(
        "update installation set identity_issued_at = $2
         where id = $1 and (identity_issued_at is null or identity_issued_at < $2)",
    )
    .bind(id)
    .bind(issued_at)
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
             rejected_at = null, probe_count = 0, next_probe_at = null, probe_scope_key = null,
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

/// Marks an installation rejected by the upstream, unless its credentials changed meanwhile, and
/// schedules its first probe `first_probe_in` from now, asking for the scopes of `scope_key` (no probe
/// when `None`: refused user-delegated credentials only come back with new ones).
pub async fn mark_rejected(
    conn: &mut PgConnection,
    id: Uuid,
    credentials_version: i64,
    scope_key: &str,
    first_probe_in: Option<std::time::Duration>,
) -> sqlx::Result<()> {
    sqlx::query(
        "update installation set status = 'rejected', rejected_at = now(), probe_count = 0,
             next_probe_at = now() + make_interval(secs => $4), probe_scope_key = $3, updated_at = now()
         where id = $1 and credentials_version = $2 and status = 'active'",
    )
    .bind(id)
    .bind(credentials_version)
    .bind(scope_key)
    .bind(first_probe_in.map(|wait| wait.as_secs_f64()))
    .execute(conn)
    .await
    .map(drop)
}

/// The status and credentials version of an installation as committed now (under the mint's lock, to
/// see what another replica recorded while this one waited).
pub async fn state(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<(String, i64)>> {
    sqlx::query_as("select status, credentials_version from installation where id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// A rejected installation whose probe is due, claimed for one prober.
#[derive(sqlx::FromRow)]
pub struct DueProbe {
    #[sqlx(flatten)]
    pub installation: Installation,
    pub probe_count: i32,
    pub probe_scope_key: Option<String>,
}

/// Claims up to `limit` rejected installations whose probe is due: their next probe moves `lease` ahead,
/// so no other replica probes them meanwhile, and a prober that dies leaves them due again after it.
pub async fn claim_due_probes(pool: &PgPool, limit: i64, lease: std::time::Duration) -> sqlx::Result<Vec<DueProbe>> {
    sqlx::query_as(&format!(
        "update installation set next_probe_at = now() + make_interval(secs => $2)
         where id in (select id from installation
                      where status = 'rejected' and next_probe_at <= now()
                      order by next_probe_at limit $1 for update skip locked)
         returning {COLUMNS}, probe_count, probe_scope_key"
    ))
    .bind(limit)
    .bind(lease.as_secs_f64())
    .fetch_all(pool)
    .await
}

/// Records a probe that was refused again: the next one is due `next_in` from now. Nothing happens if
/// the installation changed meanwhile (new credentials, uninstalled, reactivated).
pub async fn probe_refused(
    conn: &mut PgConnection,
    id: Uuid,
    credentials_version: i64,
    next_in: std::time::Duration,
) -> sqlx::Result<bool> {
    let result = sqlx::query(
        "update installation set probe_count = probe_count + 1, next_probe_at = now() + make_interval(secs => $3)
         where id = $1 and credentials_version = $2 and status = 'rejected'",
    )
    .bind(id)
    .bind(credentials_version)
    .bind(next_in.as_secs_f64())
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Makes a rejected installation active again (a probe succeeded, or an operator said so), unless its
/// credentials changed meanwhile (`credentials_version`, when given). Returns whether it changed.
pub async fn reactivate(conn: &mut PgConnection, id: Uuid, credentials_version: Option<i64>) -> sqlx::Result<bool> {
    let result = sqlx::query(
        "update installation set status = 'active', rejected_at = null, probe_count = 0, next_probe_at = null,
             probe_scope_key = null, updated_at = now()
         where id = $1 and status = 'rejected' and ($2::bigint is null or credentials_version = $2)",
    )
    .bind(id)
    .bind(credentials_version)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Every installation of an account, whatever its status.
pub async fn for_account(pool: &PgPool, account_id: &str) -> sqlx::Result<Vec<Installation>> {
    sqlx::query_as(&format!("select {COLUMNS} from installation where account_id = $1 order by provider, app_id"))
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

/// How many installations have each status.
pub async fn count_by_status(pool: &PgPool) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as("select status, count(*) from installation group by status").fetch_all(pool).await
}

pub async fn summary(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<Summary>> {
    sqlx::query_as(&format!("select {SUMMARY_COLUMNS} from installation where id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// Every installation, oldest first; only those of `provider` when given.
pub async fn list(pool: &PgPool, provider: Option<&str>) -> sqlx::Result<Vec<Summary>> {
    sqlx::query_as(&format!(
        "select {SUMMARY_COLUMNS} from installation where ($1::text is null or provider = $1) order by created_at, id"
    ))
    .bind(provider)
    .fetch_all(pool)
    .await
}

/// Locks and returns the credentials of `account_id` at a provider other than Trackunit, if any.
pub async fn lock_at_provider(
    conn: &mut PgConnection,
    provider: &str,
    account_id: &str,
) -> sqlx::Result<Option<Installation>> {
    sqlx::query_as(&format!(
        "select {COLUMNS} from installation where provider = $1 and account_id = $2 and app_id is null for update"
    ))
    .bind(provider)
    .bind(account_id)
    .fetch_optional(conn)
    .await
}

/// Registers credentials of `account_id` at a provider other than Trackunit, with id `id` at credentials
/// version 1; `None` when a concurrent registration won the race (lock that one instead).
pub async fn insert_at_provider(
    conn: &mut PgConnection,
    id: Uuid,
    provider: &str,
    account_id: &str,
    credentials: &SealedCredentials<'_>,
    grant_type: &str,
) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar(
        "insert into installation (id, provider, app_id, account_id, status, key_id, client_id_ciphertext,
             client_secret_ciphertext, credentials_version, aad_version, grant_type)
         values ($1, $2, null, $3, 'active', $4, $5, $6, 1, $7, $8)
         on conflict (provider, account_id) where app_id is null do nothing
         returning id",
    )
    .bind(id)
    .bind(provider)
    .bind(account_id)
    .bind(credentials.key_id)
    .bind(credentials.client_id)
    .bind(credentials.client_secret)
    .bind(credentials.aad_version)
    .bind(grant_type)
    .fetch_optional(conn)
    .await
}

/// Sets how a locked installation's tokens are minted (its credentials were just replaced).
pub async fn set_grant_type(conn: &mut PgConnection, id: Uuid, grant_type: &str) -> sqlx::Result<()> {
    sqlx::query("update installation set grant_type = $2 where id = $1")
        .bind(id)
        .bind(grant_type)
        .execute(conn)
        .await
        .map(drop)
}

/// Deletes an installation and, by cascade, its cached tokens, refresh token and recorded failures.
pub async fn delete(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("delete from installation where id = $1").bind(id).execute(conn).await.map(drop)
}

/// When an installation was created and last changed.
pub async fn timestamps(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<(DateTime<Utc>, DateTime<Utc>)> {
    sqlx::query_as("select created_at, updated_at from installation where id = $1").bind(id).fetch_one(conn).await
}

/// Locks up to `limit` installations sealed under a key other than `primary` or with associated data older
/// than `aad_version`, skipping `exclude` (rows that failed before). Rows another transaction holds are
/// waited for, so no concurrent install is lost.
pub async fn lock_needing_reseal(
    conn: &mut PgConnection,
    primary: &str,
    aad_version: i16,
    exclude: &[Uuid],
    limit: i64,
) -> sqlx::Result<Vec<Installation>> {
    sqlx::query_as(&format!(
        "select {COLUMNS} from installation
         where key_id is not null and (key_id <> $1 or aad_version < $4) and not (id = any($2))
         order by id limit $3 for update"
    ))
    .bind(primary)
    .bind(exclude)
    .bind(limit)
    .bind(aad_version)
    .fetch_all(conn)
    .await
}

/// Replaces the ciphertexts of a locked installation with the same credentials sealed again (another key,
/// a newer associated-data format). The credentials version is kept: nothing about the credentials changed.
pub async fn reseal(conn: &mut PgConnection, id: Uuid, credentials: &SealedCredentials<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "update installation set key_id = $2, client_id_ciphertext = $3, client_secret_ciphertext = $4,
             aad_version = $5
         where id = $1",
    )
    .bind(id)
    .bind(credentials.key_id)
    .bind(credentials.client_id)
    .bind(credentials.client_secret)
    .bind(credentials.aad_version)
    .execute(conn)
    .await
    .map(drop)
}

/// How many sealed values each key id protects, per table: `(key_id, table, rows)`.
pub async fn key_usage(pool: &PgPool) -> sqlx::Result<Vec<(String, String, i64)>> {
    sqlx::query_as(
        "select key_id, 'installation', count(*) from installation where key_id is not null group by key_id
         union all
         select key_id, 'refresh_token', count(*) from refresh_token group by key_id
         union all
         select key_id, 'token_cache', count(*) from token_cache
         where expires_at > now() or refresh_token_ciphertext is not null group by key_id
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
            provider: "trackunit".into(),
            app_id: Some("@o/a".into()),
            account_id: "acc".into(),
            status: "active".into(),
            key_id: Some("k1".into()),
            client_id_ciphertext: Some(b"CIPHERTEXT-ID".to_vec()),
            client_secret_ciphertext: Some(b"CIPHERTEXT-SECRET".to_vec()),
            identity_issued_at: None,
            credentials_version: 1,
            aad_version: 2,
            grant_type: "client_credentials".into(),
        };
        let debug = format!("{installation:?}");
        assert!(debug.contains("acc") && !debug.contains("67, 73, 80"), "{debug}");
        assert!(!debug.contains("CIPHERTEXT"), "{debug}");
    }
}
