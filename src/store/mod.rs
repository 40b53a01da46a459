//! PostgreSQL access: one module per table, each a handful of small query functions over a pool,
//! connection or transaction. Knows nothing of HTTP and nothing of cryptography: it stores and returns
//! ciphertext as opaque bytes.

pub mod api_client;
pub mod audit;
pub mod identity_claim_set;
pub mod identity_replay;
pub mod installation;
pub mod mint_failure;
pub mod refresh_token;
pub mod token_cache;

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The migrations in `migrations/`, embedded: `tokenvault migrate` and sqlx-cli apply the same files.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long a request waits for a pooled connection before answering 503: short enough that a callback
/// learns of a database outage well within Trackunit's patience, and retries.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// A pool that connects on first use and reconnects by itself after a database restart. (`serve` still
/// queries the database once at start, to check the key ids in use, so it does not start without one.)
pub fn pool(database_url: &SecretString, max_connections: u32) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(database_url.expose_secret())
        .context("DATABASE_URL is not a valid PostgreSQL connection string")?
        .application_name("tokenvault");
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        // A connection that outlived a database restart is found dead by this check, not by a request.
        .test_before_acquire(true)
        .connect_lazy_with(options))
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("applying database migrations failed")
}

/// Whether the database answers.
pub async fn ping(pool: &PgPool) -> bool {
    sqlx::query("select 1").execute(pool).await.is_ok()
}
