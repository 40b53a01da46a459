//! Who may ask, and what is installed: service clients by key digest and installations by account,
//! read from PostgreSQL once and then served from memory, so the token path makes no query.
//!
//! Entries are dropped on every replica when their row changes: table triggers `NOTIFY tokenvault_change`
//! (see migrations), and [`Directory::spawn_listener`] applies each notification. The process that made a
//! change also drops the entry itself at once, so it never serves its own stale entry. While the database
//! is unreachable the cached entries keep serving; once it is back every entry is dropped, because
//! notifications sent meanwhile may have been missed. A time-to-live bounds staleness should anything
//! else go wrong.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moka::sync::Cache;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use uuid::Uuid;

use crate::broker::FastHash;
use crate::store::api_client::{self, ApiClient};
use crate::store::installation::{self, Installation};

/// The channel the triggers notify on. Changing it breaks running replicas until they restart.
pub const CHANNEL: &str = "tokenvault_change";
const CAPACITY: u64 = 200_000;
/// Upper bound on how long an entry can outlive its row if a notification is lost.
pub const TIME_TO_LIVE: Duration = Duration::from_secs(300);

pub struct Directory {
    pool: PgPool,
    clients: Cache<[u8; 32], Arc<ApiClient>, FastHash>,
    installations: Cache<String, Arc<Vec<Installation>>, FastHash>,
    /// Bumped by every invalidation. A read that an invalidation overtook (the row changed between our
    /// query and our insert) is not cached: it may be the old row, and its NOTIFY has already been spent.
    generation: AtomicU64,
}

/// A change notification, parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Client([u8; 32]),
    Installation { id: Uuid, account_id: String },
}

impl Change {
    pub fn parse(payload: &str) -> Option<Self> {
        if let Some(hex_digest) = payload.strip_prefix("api_client:") {
            let digest: [u8; 32] = hex::decode(hex_digest).ok()?.try_into().ok()?;
            return Some(Change::Client(digest));
        }
        let rest = payload.strip_prefix("installation:")?;
        let (id, account_id) = rest.split_at_checked(36)?;
        Some(Change::Installation {
            id: Uuid::parse_str(id).ok()?,
            account_id: account_id.strip_prefix(':')?.to_owned(),
        })
    }
}

impl Directory {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            clients: Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(TIME_TO_LIVE)
                .build_with_hasher(FastHash::default()),
            installations: Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(TIME_TO_LIVE)
                .build_with_hasher(FastHash::default()),
            generation: AtomicU64::new(0),
        }
    }

    /// The unrevoked client whose key hashes to `digest`. Unknown digests are not cached, so a key
    /// created a moment ago works at once.
    pub async fn client(&self, digest: &[u8; 32]) -> sqlx::Result<Option<Arc<ApiClient>>> {
        if let Some(client) = self.clients.get(digest) {
            return Ok(Some(client));
        }
        let load = async { Ok(api_client::find_active(&self.pool, digest).await?.map(Arc::new)) };
        self.unless_overtaken(load, |found| {
            if let Some(client) = found {
                self.clients.insert(*digest, Arc::clone(client));
            }
        })
        .await
    }

    /// The cached client for `digest`, without touching the database (the hot path).
    pub fn cached_client(&self, digest: &[u8; 32]) -> Option<Arc<ApiClient>> {
        self.clients.get(digest)
    }

    /// The cached installations of `account_id`, without touching the database (the hot path).
    pub fn cached_installations(&self, account_id: &str) -> Option<Arc<Vec<Installation>>> {
        self.installations.get(account_id)
    }

    /// Every installation of `account_id`, whatever its status.
    pub async fn installations(&self, account_id: &str) -> sqlx::Result<Arc<Vec<Installation>>> {
        if let Some(found) = self.installations.get(account_id) {
            return Ok(found);
        }
        let load = async { Ok(Arc::new(installation::for_account(&self.pool, account_id).await?)) };
        self.unless_overtaken(load, |found| self.installations.insert(account_id.to_owned(), Arc::clone(found))).await
    }

    /// Runs `load` and hands what it found to `keep` (which caches it), unless an invalidation overtook
    /// the load: the row may have changed between the query and now, and its NOTIFY has already been
    /// spent on a cache that did not hold it yet. The generation is read before `load` starts.
    async fn unless_overtaken<T, E>(
        &self,
        load: impl std::future::Future<Output = Result<T, E>>,
        keep: impl FnOnce(&T),
    ) -> Result<T, E> {
        let generation = self.generation.load(Ordering::Acquire);
        let found = load.await?;
        if self.generation.load(Ordering::Acquire) == generation {
            keep(&found);
        }
        Ok(found)
    }

    /// A counter that every invalidation moves on. Whatever was read from the directory while it held
    /// one value is still current while it holds it (until [`TIME_TO_LIVE`], should a NOTIFY be lost).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn apply(&self, change: &Change) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        match change {
            Change::Client(digest) => self.clients.invalidate(digest),
            Change::Installation { account_id, .. } => self.installations.invalidate(account_id),
        }
    }

    pub fn forget_account(&self, account_id: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.installations.invalidate(account_id);
    }

    pub fn flush(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.clients.invalidate_all();
        self.installations.invalidate_all();
    }

    /// Listens for changes until the process ends; `on_change` also sees each one (the broker drops the
    /// in-memory tokens of a changed installation).
    pub fn spawn_listener(
        self: Arc<Self>,
        on_change: impl Fn(&Change) + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                match PgListener::connect_with(&self.pool).await {
                    Ok(mut listener) => match listener.listen(CHANNEL).await {
                        Ok(()) => {
                            // Anything may have changed while we were not listening.
                            self.flush();
                            self.listen(&mut listener, &on_change).await;
                        }
                        Err(error) => tracing::warn!(error = %error, "cannot LISTEN for cache invalidations"),
                    },
                    Err(error) => tracing::debug!(error = %error, "cache invalidation listener cannot connect"),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }

    /// Applies notifications until the connection is lost.
    async fn listen(&self, listener: &mut PgListener, on_change: &impl Fn(&Change)) {
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) => match Change::parse(notification.payload()) {
                    Some(change) => {
                        self.apply(&change);
                        on_change(&change);
                    }
                    None => tracing::warn!("unparseable cache invalidation ignored"),
                },
                Ok(None) | Err(_) => {
                    tracing::warn!("cache invalidation listener lost its connection; cached entries keep serving");
                    metrics::counter!("tokenvault_invalidation_listener_lost_total").increment(1);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory whose pool never connects: these tests only exercise the caching rules.
    fn offline_directory() -> Directory {
        Directory::new(PgPool::connect_lazy("postgres://nobody@127.0.0.1:1/none").expect("a lazy pool"))
    }

    #[tokio::test]
    async fn a_load_that_an_invalidation_overtook_is_not_kept() {
        let directory = offline_directory();
        let invalidations: [&dyn Fn(&Directory); 4] = [
            &|d| d.apply(&Change::Client([1; 32])),
            &|d| d.apply(&Change::Installation { id: Uuid::nil(), account_id: "a".into() }),
            &|d| d.forget_account("a"),
            &|d| d.flush(),
        ];
        let mut kept = Vec::new();
        for invalidate in invalidations {
            // The invalidation arrives while the query runs: what it read may be the old row.
            let load = async {
                invalidate(&directory);
                Ok::<_, ()>("maybe stale")
            };
            assert_eq!(directory.unless_overtaken(load, |found| kept.push(*found)).await, Ok("maybe stale"));
        }
        assert!(kept.is_empty(), "nothing read across an invalidation is cached: {kept:?}");

        let load = async { Ok::<_, ()>("current") };
        assert_eq!(directory.unless_overtaken(load, |found| kept.push(*found)).await, Ok("current"));
        assert_eq!(kept, ["current"], "an undisturbed load is cached");
        let failed = directory.unless_overtaken(async { Err::<&str, _>("query failed") }, |found| kept.push(*found));
        assert_eq!(failed.await, Err("query failed"));
        assert_eq!(kept, ["current"], "a failed load caches nothing");
    }

    #[test]
    fn parses_both_payload_kinds_and_refuses_garbage() {
        let digest = [7_u8; 32];
        assert_eq!(Change::parse(&format!("api_client:{}", hex::encode(digest))), Some(Change::Client(digest)));
        let id = Uuid::new_v4();
        assert_eq!(
            Change::parse(&format!("installation:{id}:acc:with:colons")),
            Some(Change::Installation { id, account_id: "acc:with:colons".into() })
        );
        for garbage in ["", "api_client:zz", "installation:nope", "other:1"] {
            assert_eq!(Change::parse(garbage), None, "{garbage}");
        }
    }
}
