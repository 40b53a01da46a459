//! Token brokering: finds the installation a caller asks for, and hands out a token for it from the
//! in-process cache, else the shared `token_cache` table, else one fresh upstream mint.
//!
//! - Single flight, twice over: within the process a per-key mutex makes concurrent requests share one
//!   mint; across processes `pg_advisory_xact_lock` on the same key makes other replicas wait and then
//!   read the token this one stored.
//! - Refresh ahead: a token still in demand is replaced in the background before its remaining life
//!   falls under the largest `min_ttl` asked of it (plus a jittered margin), so in steady state no request
//!   waits for the upstream. A token nobody asks for is never refreshed.
//! - Degrade gracefully: when the upstream fails, a token that is still valid keeps being served, and
//!   the failing key backs off exponentially instead of hammering the upstream.
//!
//! Client secrets are decrypted only for the upstream call and never leave this module.

mod backoff;
mod entry;
mod mint;
pub mod probe;
mod token;

pub use crate::provider::UpstreamError;
pub use token::Token;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use moka::sync::Cache;
use sqlx::PgPool;
use uuid::Uuid;

use self::backoff::Backoff;
use self::entry::Entry;
use crate::crypto::{KeyRing, TokenRow};
use crate::directory::Directory;
use crate::domain::ScopeSet;
use crate::provider::{Endpoint, Providers};
use crate::store::installation::{Installation, Status};
use crate::store::token_cache;

/// Why no token could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no active installation")]
    NotInstalled,
    #[error("several active installations; app_id is required")]
    AmbiguousApp,
    /// The account's only usable installations are of apps the caller is not granted.
    #[error("the installation is of an app this key is not granted")]
    AppNotGranted,
    #[error("the upstream rejected this installation's credentials earlier; waiting for a new install")]
    PreviouslyRejected,
    #[error("the stored credentials of installation {0} cannot be decrypted")]
    CredentialsUnreadable(Uuid),
    /// The installation's provider is no longer configured.
    #[error("the installation's provider is not configured")]
    UnknownProvider,
    /// The installation's credentials changed, or it stopped being active, while the request waited:
    /// look it up again.
    #[error("the installation changed while the request waited")]
    Changed,
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

impl BrokerError {
    /// A passing failure, worth serving a still-valid token through.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            BrokerError::Upstream(UpstreamError::Unavailable { .. } | UpstreamError::Failed { .. })
                | BrokerError::Database(_)
        )
    }
}

/// What a token must satisfy to be taken from the shared table instead of minting.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Valid for this long (see [`Token::fresh_for`]): a request.
    FreshFor(Duration),
    /// Expiring later than this: a refresh, which needs a newer token than the one it replaces.
    NewerThan(chrono::DateTime<Utc>),
}

/// What [`Broker::shared_or_mint`] obtained.
struct Obtained {
    token: Token,
    /// Minted upstream just now, rather than read from the shared table.
    minted: bool,
    /// In the shared table (not when the installation changed meanwhile).
    stored: bool,
}

/// A token request answered after waiting, because memory held no token fresh enough: `on` the shared
/// table, a `mint` of its own, or `queued` behind another request's lookup or mint of the same key (or a
/// refresh under way). With refresh ahead keeping up, only a replica's first request for a key waits, on
/// the shared table; a steady count of `mint` or `queued` means requests are waiting for the upstream.
fn count_wait(on: &'static str) {
    metrics::counter!("tokenvault_token_waits_total", "on" => on).increment(1);
}

/// Registered once: counted on every cache hit, the hot path (see `routes::tokens::SERVED`).
static MEMORY_HITS: std::sync::LazyLock<metrics::Counter> =
    std::sync::LazyLock::new(|| metrics::counter!("tokenvault_token_cache_total", "tier" => "memory"));

/// The hasher of the hot-path caches: foldhash, seeded per process, in place of std's SipHash, which costs
/// several times more on these short keys. Flooding is not a worry: entries are only ever made for rows
/// that exist in the database, and the per-process seed keeps collisions unpredictable.
pub(crate) type FastHash = foldhash::fast::RandomState;

#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    installation_id: Uuid,
    credentials_version: i64,
    scope_key: Arc<str>,
}

impl CacheKey {
    /// What a cached token of this key is bound to in the shared table.
    fn token_row<'a>(
        &'a self,
        token_type: &'a str,
        granted_scope: &'a str,
        expires_at: chrono::DateTime<Utc>,
    ) -> TokenRow<'a> {
        TokenRow {
            installation_id: self.installation_id,
            credentials_version: self.credentials_version,
            scope_key: &self.scope_key,
            token_type,
            granted_scope,
            expires_at_ms: expires_at.timestamp_millis(),
        }
    }
}

pub struct Broker {
    pool: PgPool,
    keys: Arc<KeyRing>,
    endpoint: Endpoint,
    providers: Arc<Providers>,
    directory: Arc<Directory>,
    memory: Cache<CacheKey, Arc<Entry>, FastHash>,
    /// Installations with tokens in `memory`, so `forget` registers an invalidation only when there is
    /// something to drop (moka keeps each predicate until the cache is next used: one per callback would
    /// pile up on a replica that stores installs but serves no tokens).
    holders: Cache<Uuid, ()>,
    /// One mutex per key being minted, so concurrent requests in this process share one mint.
    flights: Cache<CacheKey, Arc<tokio::sync::Mutex<()>>>,
    /// Keys whose last upstream attempt failed, what failed, and when they may try again.
    backoff: Backoff<CacheKey>,
    /// Installations with keys in `backoff`, so `forget` clears them only when there is something to clear.
    failing: Cache<Uuid, ()>,
    /// When a rejected installation is first probed again (see `probe`): the first wait of the schedule.
    probe_schedule: Vec<Duration>,
    /// Bounds concurrent mints: each holds a pooled connection for the whole upstream call, and the
    /// callbacks must always find a connection free.
    mints: tokio::sync::Semaphore,
    /// The main runtime, where background refreshes run (not the runtime of whichever actix worker
    /// served the request that started them; see `routes::offload`).
    runtime: tokio::runtime::Handle,
}

/// How much a broker may hold and do at once.
pub struct Limits {
    /// Mints at once (each holds a pooled connection for its whole upstream call).
    pub max_concurrent_mints: usize,
    /// Most tokens kept in memory; beyond it the least useful are evicted (TinyLFU).
    pub capacity: u64,
    /// When rejected installations are probed again (see `probe`).
    pub probe_schedule: Vec<Duration>,
}

impl Broker {
    pub fn new(
        pool: PgPool,
        keys: Arc<KeyRing>,
        endpoint: Endpoint,
        providers: Arc<Providers>,
        directory: Arc<Directory>,
        limits: Limits,
    ) -> Self {
        let Limits { max_concurrent_mints, capacity, probe_schedule } = limits;
        Self {
            pool,
            keys,
            endpoint,
            providers,
            directory,
            memory: Cache::builder()
                .max_capacity(capacity)
                .expire_after(entry::UntilExpiry)
                .support_invalidation_closures()
                .build_with_hasher(FastHash::default()),
            holders: Cache::builder().max_capacity(capacity).time_to_idle(Duration::from_secs(24 * 3600)).build(),
            // Bounded like every per-key map: a key's mutex outlives its mints by a minute at most.
            flights: Cache::builder().max_capacity(capacity).time_to_idle(Duration::from_secs(60)).build(),
            backoff: Backoff::new(),
            failing: Cache::builder().max_capacity(capacity).time_to_idle(Duration::from_secs(3600)).build(),
            probe_schedule,
            mints: tokio::sync::Semaphore::new(max_concurrent_mints.max(1)),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// The installation a token request is for: the account's credentials at `provider`; for Trackunit,
    /// the installation of `app_id`, or the account's only usable one among the apps the caller
    /// `may_use_app`.
    pub async fn resolve(
        &self,
        provider: &str,
        account_id: &str,
        app_id: Option<&str>,
        may_use_app: impl Fn(&str) -> bool,
    ) -> Result<Installation, BrokerError> {
        let installations = self.directory.installations(account_id).await?;
        pick(&installations, provider, app_id, may_use_app).cloned()
    }

    /// The hot path, all in memory and without waiting: a token for an account whose installations, and a
    /// token fresh for `min_ttl`, are already cached. `None` means "take the full path".
    pub fn cached(
        self: &Arc<Self>,
        provider: &str,
        account_id: &str,
        app_id: Option<&str>,
        scopes: &ScopeSet,
        min_ttl: Duration,
        may_use_app: impl Fn(&str) -> bool,
    ) -> Option<(Arc<Token>, Lease)> {
        let installations = self.directory.cached_installations(account_id)?;
        // Borrowed, not cloned: an installation holds half a dozen heap fields and this runs per request.
        let index = pick_index(&installations, provider, app_id, may_use_app)
            .ok()
            .filter(|&i| installations[i].status() == Status::Active)?;
        let installation = &installations[index];
        let key = CacheKey {
            installation_id: installation.id,
            credentials_version: installation.credentials_version,
            scope_key: Arc::clone(scopes.key()),
        };
        let entry = self.memory.get(&key)?;
        let token = self.serve_entry(&key, &entry, installation, scopes, min_ttl)?;
        let lease = Lease { key, entry: Arc::downgrade(&entry), installations, index, scopes: scopes.clone(), min_ttl };
        Some((token, lease))
    }

    /// The lease's token again, if it is still the current one and fresh for the lease's `min_ttl`; with
    /// the same bookkeeping as a cache hit (demand, refresh ahead). The caller vouches that the client and
    /// the installation behind the lease are unchanged (see `routes::repeat`).
    pub fn serve_again(self: &Arc<Self>, lease: &Lease) -> Option<Arc<Token>> {
        // Gone once the cache dropped it (expired, evicted, or its installation forgotten).
        let entry = lease.entry.upgrade()?;
        if entry.is_superseded() {
            return None;
        }
        self.serve_entry(&lease.key, &entry, lease.installation(), &lease.scopes, lease.min_ttl)
    }
}

/// What it takes to serve a token found in memory again without looking anything up: the cache entry and
/// the installation it was found for. All shared, so a lease costs no copying. The entry is held weakly: a
/// lease never keeps a token in memory that the cache has let go of (expired, evicted, or forgotten when
/// its installation changed).
pub struct Lease {
    key: CacheKey,
    entry: std::sync::Weak<Entry>,
    installations: Arc<Vec<Installation>>,
    index: usize,
    scopes: ScopeSet,
    min_ttl: Duration,
}

impl Lease {
    pub fn installation(&self) -> &Installation {
        &self.installations[self.index]
    }
}

/// The installation a request is for among an account's: the one of `app_id`, or the only usable one of
/// an app the caller `may_use_app`.
fn pick<'a>(
    installations: &'a [Installation],
    provider: &str,
    app_id: Option<&str>,
    may_use_app: impl Fn(&str) -> bool,
) -> Result<&'a Installation, BrokerError> {
    pick_index(installations, provider, app_id, may_use_app).map(|index| &installations[index])
}

/// [`pick`], as a position in `installations`. Apps are Trackunit's: at another provider an account has
/// one set of credentials, and app grants do not apply.
fn pick_index(
    installations: &[Installation],
    provider: &str,
    app_id: Option<&str>,
    may_use_app: impl Fn(&str) -> bool,
) -> Result<usize, BrokerError> {
    let usable = |i: &Installation| {
        i.provider == provider
            && matches!(i.status(), Status::Active | Status::Rejected)
            && app_id.is_none_or(|app| i.app_id.as_deref() == Some(app))
    };
    let granted_app = |i: &Installation| i.app_id.as_deref().is_none_or(&may_use_app);
    let mut granted = installations.iter().enumerate().filter(|(_, i)| usable(i) && granted_app(i)).map(|(at, _)| at);
    match (granted.next(), granted.next()) {
        (Some(only), None) => Ok(only),
        (Some(_), Some(_)) => Err(BrokerError::AmbiguousApp),
        (None, _) if installations.iter().any(usable) => Err(BrokerError::AppNotGranted),
        (None, _) => Err(BrokerError::NotInstalled),
    }
}

impl Broker {
    /// A token for `installation` and `scopes` valid for at least `min_ttl` (see [`Token::fresh_for`]).
    ///
    /// Requests for one key share one mint, and its outcome: those that waited for a mint that failed are
    /// answered with its failure, and so are the requests that come while the key backs off, here or on
    /// any replica (the failure is recorded in `mint_failure`). Only then does the upstream see the key again.
    pub async fn token(
        self: &Arc<Self>,
        installation: &Installation,
        scopes: &ScopeSet,
        min_ttl: Duration,
    ) -> Result<Arc<Token>, BrokerError> {
        if installation.status() == Status::Rejected {
            return Err(BrokerError::PreviouslyRejected);
        }
        let key = CacheKey {
            installation_id: installation.id,
            credentials_version: installation.credentials_version,
            scope_key: Arc::clone(scopes.key()),
        };
        if let Some(token) = self.fresh_from_memory(&key, installation, scopes, min_ttl) {
            return Ok(token);
        }
        self.trace_wait(&key, min_ttl);
        let arrived = std::time::Instant::now();
        let flight = self.flights.get_with(key.clone(), Default::default);
        let _turn = flight.lock().await;
        // Whoever held the mutex before us may have just stored what we need, or failed to.
        if let Some(token) = self.fresh_from_memory(&key, installation, scopes, min_ttl) {
            count_wait("queued");
            return Ok(token);
        }
        if let Some(waiting) = self.backoff.remaining(&key) {
            return self.answer_backing_off(&key, waiting.answer(arrived), waiting.remaining).await;
        }
        match self.shared_or_mint(installation, &key, scopes, Want::FreshFor(min_ttl)).await {
            Ok(Obtained { token, minted, stored }) => {
                count_wait(if minted { "mint" } else { "shared_table" });
                let token = Arc::new(token);
                if stored {
                    self.remember(key, Arc::clone(&token), min_ttl);
                }
                Ok(token)
            }
            Err(error) if error.is_transient() => match self.still_valid(&key).await {
                Some(token) => Ok(token),
                None => Err(error),
            },
            Err(error) => Err(error),
        }
    }

    /// The answer while `key` backs off: `error` (see [`backoff::Waiting::answer`]), or without one a
    /// token that is still valid, else 503 with the `remaining` wait. A passing failure is answered with a
    /// still-valid token when there is one, a refusal never.
    async fn answer_backing_off(
        &self,
        key: &CacheKey,
        error: Option<UpstreamError>,
        remaining: Duration,
    ) -> Result<Arc<Token>, BrokerError> {
        let error = match error {
            Some(refusal) if backoff::refusal(&refusal).is_some() => return Err(refusal.into()),
            Some(passing) => passing,
            None => UpstreamError::Unavailable {
                retry_after: remaining,
                reason: "backing off after upstream failures".into(),
            },
        };
        self.still_valid(key).await.ok_or(BrokerError::Upstream(error))
    }

    /// The in-memory token if it satisfies `min_ttl`; notes the demand and starts a refresh when due.
    fn fresh_from_memory(
        self: &Arc<Self>,
        key: &CacheKey,
        installation: &Installation,
        scopes: &ScopeSet,
        min_ttl: Duration,
    ) -> Option<Arc<Token>> {
        let entry = self.memory.get(key)?;
        self.serve_entry(key, &entry, installation, scopes, min_ttl)
    }

    /// `entry`'s token if it satisfies `min_ttl`; notes the demand and starts a refresh when due.
    fn serve_entry(
        self: &Arc<Self>,
        key: &CacheKey,
        entry: &Arc<Entry>,
        installation: &Installation,
        scopes: &ScopeSet,
        min_ttl: Duration,
    ) -> Option<Arc<Token>> {
        let now = Utc::now();
        if !entry.token.fresh_for(min_ttl, now) {
            return None;
        }
        MEMORY_HITS.increment(1);
        entry.note_demand(min_ttl);
        if entry.refresh_due(now) && entry.claim_refresh() {
            self.spawn_refresh(key.clone(), installation.clone(), scopes.clone(), Arc::clone(entry));
        }
        Some(Arc::clone(&entry.token))
    }

    /// Caches `token` for a request that asked `min_ttl` of it (zero for a refresh). It inherits what was
    /// asked of the token it replaces, so that its refresh time follows the demand from the start.
    fn remember(&self, key: CacheKey, token: Arc<Token>, min_ttl: Duration) {
        let old = self.memory.get(&key);
        let entry = Entry::new(token, old.as_ref().map_or(Duration::ZERO, |old| old.asked()));
        entry.note_demand(min_ttl);
        if let Some(old) = old {
            old.supersede();
        }
        self.holders.insert(key.installation_id, ());
        self.memory.insert(key, Arc::new(entry));
    }

    /// Replaces `entry`'s token, still in demand, before it runs short, off the request path.
    fn spawn_refresh(self: &Arc<Self>, key: CacheKey, installation: Installation, scopes: ScopeSet, entry: Arc<Entry>) {
        let broker = Arc::clone(self);
        let claimed_at = std::time::Instant::now();
        self.runtime.spawn(async move {
            let flight = broker.flights.get_with(key.clone(), Default::default);
            let _turn = flight.lock().await;
            let turn_ms = claimed_at.elapsed().as_millis() as u64;
            let replaced = broker.memory.get(&key).is_some_and(|current| !Arc::ptr_eq(&current, &entry));
            if replaced || broker.backoff.remaining(&key).is_some() {
                // Someone refreshed it meanwhile, or the upstream is failing: a later request may try again.
                tracing::debug!(installation.id = %installation.id, replaced, turn_ms, "refresh ahead not needed");
                entry.release_refresh();
                return;
            }
            metrics::counter!("tokenvault_token_refresh_ahead_total").increment(1);
            let outcome = broker.shared_or_mint(&installation, &key, &scopes, Want::NewerThan(entry.token.expires_at)).await;
            // Why a refresh lands late, if it does: the wait for its turn, or the lookup and mint after it.
            tracing::debug!(
                installation.id = %installation.id,
                scopes = %key.scope_key,
                turn_ms,
                total_ms = claimed_at.elapsed().as_millis() as u64,
                minted = outcome.as_ref().is_ok_and(|o| o.minted),
                old_left_ms = entry.token.left(Utc::now()).map_or(0, |left| left.as_millis() as u64),
                "refresh ahead finished"
            );
            match outcome {
                Ok(Obtained { token, stored: true, .. }) => {
                    broker.remember(key, Arc::new(token), Duration::ZERO);
                    // Also when the cache had already evicted it, so `remember` could not mark it.
                    entry.supersede();
                }
                // The installation changed or stopped being active meanwhile, and its tokens are being
                // forgotten: the claim stays, since no refresh of this key could be stored any more.
                Ok(Obtained { stored: false, .. }) => {}
                Err(error) => {
                    tracing::warn!(installation.id = %installation.id, error = %error, "refresh ahead failed; the current token keeps serving");
                    entry.release_refresh();
                }
            }
        });
    }

    /// Logs, at debug, what memory held for a request about to wait: whether a refresh was under way and
    /// how much life the token there had left, to tell a refresh that came late from one never started.
    fn trace_wait(&self, key: &CacheKey, min_ttl: Duration) {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        let entry = self.memory.get(key);
        tracing::debug!(
            installation.id = %key.installation_id,
            scopes = %key.scope_key,
            min_ttl_ms = min_ttl.as_millis() as u64,
            in_memory = entry.is_some(),
            refreshing = entry.as_ref().is_some_and(|e| e.is_refreshing()),
            left_ms = entry.as_ref().and_then(|e| e.token.left(Utc::now())).map_or(0, |left| left.as_millis() as u64),
            threshold_ms = entry.as_ref().map_or(0, |e| e.refresh_threshold().as_millis() as u64),
            "token request waits: no token fresh enough in memory"
        );
    }

    /// A token that is still valid at all (memory first, then the shared table), for when the upstream
    /// cannot mint a better one.
    async fn still_valid(&self, key: &CacheKey) -> Option<Arc<Token>> {
        let now = Utc::now();
        // Valid for any time at all, to the millisecond: through an outage, half a second is worth serving.
        let token = match self.memory.get(key).filter(|e| e.token.left(now).is_some_and(|left| !left.is_zero())) {
            Some(entry) => Arc::clone(&entry.token),
            None => {
                let mut conn = self.pool.acquire().await.ok()?;
                let row = token_cache::get(&mut conn, key.installation_id, &key.scope_key, key.credentials_version)
                    .await
                    .ok()??;
                let token = Arc::new(self.open_cached(key, &row).ok()?);
                if token.left(now).is_none_or(|left| left.is_zero()) {
                    return None;
                }
                token
            }
        };
        tracing::warn!(installation.id = %key.installation_id, seconds_left = token.seconds_left(now), "serving a still-valid token while the upstream fails");
        metrics::counter!("tokenvault_token_served_degraded_total").increment(1);
        Some(token)
    }

    /// How many tokens this replica holds in memory (`tokenvault_tokens_in_memory`, readiness).
    pub fn tokens_in_memory(&self) -> u64 {
        // moka counts lazily: settle its pending bookkeeping first (never on a request's path).
        self.memory.run_pending_tasks();
        self.memory.entry_count()
    }

    /// Drops every in-memory token of an installation (its credentials changed or were erased), and what
    /// this replica remembers of its failed mints (it may have been reactivated).
    pub fn forget(&self, installation_id: Uuid) {
        if self.failing.remove(&installation_id).is_some() {
            self.backoff.forget_where(move |key: &CacheKey| key.installation_id == installation_id);
        }
        if self.holders.remove(&installation_id).is_none() {
            return;
        }
        // Only fails when invalidation closures are not enabled, and they are.
        let _ = self.memory.invalidate_entries_if(move |key, _| key.installation_id == installation_id);
    }
}
