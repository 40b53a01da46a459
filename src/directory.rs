//! Who may ask, and what is installed: service clients by key digest and installations by account,
//! read from PostgreSQL once and then served from memory, so the token path makes no query.
//!
//! Entries are dropped on every replica when their row changes: table triggers `NOTIFY tokenvault_change`
//! (see migrations), and [`Directory::spawn_listener`] applies each notification. The process that made a
//! change also drops the entry itself at once, so it never serves its own stale entry. While the database
//! is unreachable the cached entries keep serving; once it is back every entry is dropped, because
//! notifications sent meanwhile may have been missed. A time-to-live bounds staleness should anything
//! else go wrong.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use uuid::Uuid;

use crate::broker::FastHash;
use crate::rate_limit::PerSecond;
use crate::store::api_client::{self, ApiClient};
use crate::store::audit::{self, AuditEvent};
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
    /// The digests of every unrevoked client, loaded whole, so a key that matches none is refused from
    /// memory: a flood of random keys must not cost a query each. Loaded by the first unknown key; a client
    /// change adds its digest, and it, a flush (the change listener was lost) or a change that overtook the
    /// load marks the set stale, to be reloaded: see [`Directory::known_digests`]. Clients are few, so the
    /// set is small.
    known_digests: RwLock<Option<KnownSet>>,
    /// Held while the set loads, so concurrent unknown keys share one load.
    loading_known: tokio::sync::Mutex<()>,
    /// Finished attempts to load the set, so a request that queued behind a failed load does not repeat it.
    known_loads_finished: AtomicU64,
    /// Reloads a second of a stale set: with the database down, each attempt waits for a connection, so
    /// only one request a second pays that while the others are refused from the stale set.
    stale_reloads: PerSecond,
    /// Database lookups a second of digests the known set lacks: a key created a moment ago on another
    /// replica, whose NOTIFY has not arrived yet, still works at once; a flood of random keys stays at this.
    unknown_lookups: PerSecond,
}

/// The key digests of every unrevoked client.
type KnownDigests = HashSet<[u8; 32], FastHash>;

/// The known set as held: `stale` once a change or a flush means it may hold more than is active or miss a key.
#[derive(Clone)]
struct KnownSet {
    digests: Arc<KnownDigests>,
    stale: bool,
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
            known_digests: RwLock::new(None),
            loading_known: tokio::sync::Mutex::new(()),
            known_loads_finished: AtomicU64::new(0),
            stale_reloads: PerSecond::new(1),
            unknown_lookups: PerSecond::new(10),
        }
    }

    /// The unrevoked client whose key hashes to `digest`. A digest that no unrevoked client has is refused
    /// from the set of known digests, beyond a few database lookups a second (`unknown_lookups`) that let
    /// a key created a moment ago on another replica work before its NOTIFY arrives.
    pub async fn client(&self, digest: &[u8; 32]) -> sqlx::Result<Option<Arc<ApiClient>>> {
        if let Some(client) = self.clients.get(digest) {
            return Ok(client.key_works(digest).then_some(client));
        }
        if self.known_digests().await?.is_some_and(|known| !known.contains(digest))
            && self.unknown_lookups.allow().is_none()
        {
            return Ok(None);
        }
        let load = async { Ok(api_client::find_active(&self.pool, digest).await?.map(Arc::new)) };
        self.unless_overtaken(load, |found| {
            if let Some(client) = found {
                self.clients.insert(*digest, Arc::clone(client));
            }
        })
        .await
    }

    /// The set of every unrevoked client's digest, loading it when it is not held. `None` when no set
    /// could be loaded: the caller then asks the database about its one digest.
    ///
    /// A stale set (a change may have been missed: the change listener was lost, or a change overtook
    /// the load) is still used to refuse, which it can only do wrongly for a key created in the gap, and
    /// that key gets the per-second lookups. It is reloaded at most once a second by one request; while
    /// the database cannot answer, the others are refused from it, so a flood of random keys during a
    /// database outage costs no query each.
    async fn known_digests(&self) -> sqlx::Result<Option<Arc<KnownDigests>>> {
        let held = self.known_digests.read().expect("directory lock poisoned").clone();
        match held {
            Some(KnownSet { digests, stale: false }) => Ok(Some(digests)),
            Some(KnownSet { digests: stale, stale: true }) => {
                let Ok(_loading) = self.loading_known.try_lock() else { return Ok(Some(stale)) };
                if self.stale_reloads.allow().is_none() {
                    return Ok(Some(stale));
                }
                match self.load_known_digests().await {
                    Ok(reloaded) => Ok(Some(reloaded)),
                    Err(error) => {
                        tracing::debug!(error = %error, "reloading the known key digests failed; refusing from the last set");
                        Ok(Some(stale))
                    }
                }
            }
            None => {
                let finished = self.known_loads_finished.load(Ordering::Acquire);
                let _loading = self.loading_known.lock().await;
                if let Some(KnownSet { digests, .. }) =
                    self.known_digests.read().expect("directory lock poisoned").clone()
                {
                    return Ok(Some(digests));
                }
                // A load failed while this request queued: repeating it one request after another would
                // make each wait for a connection in turn while the database is down.
                if self.known_loads_finished.load(Ordering::Acquire) != finished {
                    return Ok(None);
                }
                self.load_known_digests().await.map(Some)
            }
        }
    }

    /// Loads the known set and keeps it, marked stale when a change overtook the load (it may lack a key
    /// created meanwhile, whose NOTIFY found no set to join).
    async fn load_known_digests(&self) -> sqlx::Result<Arc<KnownDigests>> {
        let generation = self.generation();
        let loaded = api_client::active_digests(&self.pool).await;
        self.known_loads_finished.fetch_add(1, Ordering::AcqRel);
        Ok(self.keep_known_digests(loaded?, generation))
    }

    fn keep_known_digests(&self, loaded: Vec<[u8; 32]>, generation_before_load: u64) -> Arc<KnownDigests> {
        let digests = Arc::new(loaded.into_iter().collect::<KnownDigests>());
        let stale = self.generation() != generation_before_load;
        *self.known_digests.write().expect("directory lock poisoned") =
            Some(KnownSet { digests: Arc::clone(&digests), stale });
        digests
    }

    /// A client changed: its digest joins the known set (a key just created works at once) and the set is
    /// marked stale, so it is reloaded without the digests of revoked keys. A set holding more digests than
    /// are active only sends those keys to the database, which decides; it never admits one.
    fn note_known_digest(&self, digest: &[u8; 32]) {
        if let Some(known) = self.known_digests.write().expect("directory lock poisoned").as_mut() {
            let mut digests = KnownDigests::clone(&known.digests);
            digests.insert(*digest);
            known.digests = Arc::new(digests);
            known.stale = true;
        }
    }

    fn mark_known_digests_stale(&self) {
        if let Some(known) = self.known_digests.write().expect("directory lock poisoned").as_mut() {
            known.stale = true;
        }
    }

    /// The cached client for `digest`, without touching the database (the hot path).
    pub fn cached_client(&self, digest: &[u8; 32]) -> Option<Arc<ApiClient>> {
        self.clients.get(digest).filter(|client| client.key_works(digest))
    }

    /// Writes down, every minute, which clients used their keys (`last_used_at`), and audits keys that
    /// expired. Off every request's path: a request only marks its client (see `UsageMark`).
    pub fn spawn_usage_recorder(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                self.record_usage().await;
                if let Err(error) = self.audit_expired_keys().await {
                    tracing::debug!(error = %error, "auditing expired keys failed");
                }
            }
        })
    }

    /// Writes down that the clients marked since the last time used their keys (every minute, and when
    /// `serve` stops).
    pub async fn record_usage(&self) {
        let used: Vec<uuid::Uuid> =
            self.clients.iter().filter(|(_, client)| client.usage.take()).map(|(_, client)| client.id).collect();
        if !used.is_empty()
            && let Err(error) = api_client::record_usage(&self.pool, &used).await
        {
            tracing::debug!(error = %error, "recording key usage failed");
        }
    }

    /// Audits each key that expired since the last time (every minute): an expiry is not a write, so it
    /// is noticed here. Each is marked audited in the transaction that writes its entry.
    pub async fn audit_expired_keys(&self) -> sqlx::Result<()> {
        let mut tx = self.pool.begin().await?;
        for (_, name) in api_client::newly_expired(&mut *tx).await? {
            let event = AuditEvent { client_name: Some(&name), ..AuditEvent::new("CLIENT_KEY_EXPIRED", "expired") };
            audit::record(&mut tx, &event).await?;
        }
        tx.commit().await
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
            Change::Client(digest) => {
                self.note_known_digest(digest);
                self.clients.invalidate(digest);
            }
            Change::Installation { account_id, .. } => self.installations.invalidate(account_id),
        }
    }

    pub fn forget_account(&self, account_id: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.installations.invalidate(account_id);
    }

    pub fn flush(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.mark_known_digests_stale();
        self.clients.invalidate_all();
        self.installations.invalidate_all();
    }

    /// Listens for changes until the process ends; `on_change` also sees each one (the broker drops the
    /// in-memory tokens of a changed installation).
    ///
    /// A connection that dies silently (no FIN, no RST: a NAT or firewall dropped it) would never say so,
    /// and changes would then reach this replica only through the time to live. So the listener proves
    /// its connection alive every `heartbeat` with a NOTIFY round trip of its own; when one does not come
    /// back within two heartbeats, it reconnects and drops every cached entry (a dead connection is noticed
    /// within three heartbeats).
    pub fn spawn_listener(
        self: Arc<Self>,
        heartbeat: Duration,
        on_change: impl Fn(&Change) + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let connected = tokio::time::timeout(heartbeat.max(Duration::from_secs(5)), async {
                    let mut listener = PgListener::connect_with(&self.pool).await?;
                    listener.listen(CHANNEL).await?;
                    Ok::<_, sqlx::Error>(listener)
                })
                .await;
                match connected {
                    Ok(Ok(listener)) => {
                        // Anything may have changed while we were not listening.
                        self.flush();
                        self.listen(listener, heartbeat, &on_change).await;
                        metrics::counter!("tokenvault_invalidation_listener_lost_total").increment(1);
                    }
                    Ok(Err(error)) => tracing::debug!(error = %error, "cache invalidation listener cannot connect"),
                    Err(_) => tracing::debug!("cache invalidation listener timed out connecting"),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }

    /// Applies notifications until the connection is lost or a heartbeat goes unanswered.
    async fn listen(&self, mut listener: PgListener, heartbeat: Duration, on_change: &impl Fn(&Change)) {
        // The listener receives on a task of its own: `select!` would cancel a read half-way through a
        // message. The task ends, and the channel closes, when the connection is lost.
        let (sender, mut received) = tokio::sync::mpsc::channel::<String>(1024);
        let receiver = tokio::spawn(async move {
            while let Ok(Some(notification)) = listener.try_recv().await {
                if sender.send(notification.payload().to_owned()).await.is_err() {
                    return;
                }
            }
        });
        let mut ticker = tokio::time::interval(heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut awaited: Option<(String, Instant)> = None;
        loop {
            tokio::select! {
                payload = received.recv() => {
                    let Some(payload) = payload else {
                        tracing::warn!("cache invalidation listener lost its connection; cached entries keep serving");
                        break;
                    };
                    if let Some(beat) = payload.strip_prefix(HEARTBEAT_PREFIX) {
                        if awaited.as_ref().is_some_and(|(nonce, _)| nonce == beat) {
                            awaited = None;
                        }
                        continue;
                    }
                    match Change::parse(&payload) {
                        Some(change) => {
                            self.apply(&change);
                            on_change(&change);
                        }
                        None => tracing::warn!("unparseable cache invalidation ignored"),
                    }
                }
                _ = ticker.tick() => {
                    if let Some((_, sent)) = &awaited {
                        if sent.elapsed() >= heartbeat * 2 {
                            tracing::warn!(
                                heartbeat_ms = heartbeat.as_millis() as u64,
                                "cache invalidation listener heard no heartbeat back; reconnecting"
                            );
                            break;
                        }
                        continue;
                    }
                    let nonce = uuid::Uuid::new_v4().simple().to_string();
                    self.send_heartbeat(&nonce, heartbeat);
                    awaited = Some((nonce, Instant::now()));
                }
            }
        }
        receiver.abort();
    }

    /// Sends a heartbeat through the pool, off the listener's loop (the pool may be as dead as the listener).
    fn send_heartbeat(&self, nonce: &str, within: Duration) {
        let (pool, payload) = (self.pool.clone(), format!("{HEARTBEAT_PREFIX}{nonce}"));
        tokio::spawn(async move {
            let sent = sqlx::query("select pg_notify($1, $2)").bind(CHANNEL).bind(payload).execute(&pool);
            if let Ok(Err(error)) = tokio::time::timeout(within, sent).await {
                tracing::debug!(error = %error, "cannot send a listener heartbeat");
            }
        });
    }
}

/// Payload of a listener's heartbeat (`heartbeat:<nonce>`); every replica hears every heartbeat and
/// ignores all but its own.
const HEARTBEAT_PREFIX: &str = "heartbeat:";

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

    #[tokio::test]
    async fn after_a_flush_unknown_keys_are_refused_from_the_stale_set_while_the_database_is_down() {
        let directory = unreachable_database_directory();
        let known = [9_u8; 32];
        *directory.known_digests.write().unwrap() =
            Some(KnownSet { digests: Arc::new([known].into_iter().collect()), stale: false });
        // The change listener was lost: changes may have been missed, and the database does not answer.
        directory.flush();
        let flood = (0..40_u8).map(|n| {
            let directory = &directory;
            async move { directory.client(&[n; 32]).await }
        });
        let answers = futures_util::future::join_all(flood).await;
        assert!(!answers.iter().any(|a| matches!(a, Ok(Some(_)))), "an unknown key was admitted");
        // At most one reload and ten lookups a second reach the database (and fail); before, every key did.
        let refused = answers.iter().filter(|a| matches!(a, Ok(None))).count();
        assert!(refused >= 25, "refused from the stale set: {refused} of 40");
        // A known digest is never refused from the set: the database decides (and is down).
        assert!(directory.client(&known).await.is_err());
        // A client created elsewhere is never refused from the set: the database decides (and is down).
        directory.apply(&Change::Client([1; 32]));
        assert!(directory.client(&[1; 32]).await.is_err());
    }

    /// A database that refuses at once, so each attempt to reach it costs milliseconds.
    fn unreachable_database_directory() -> Directory {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(100))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("a lazy pool");
        Directory::new(pool)
    }

    #[tokio::test]
    async fn a_known_set_that_a_change_overtook_is_kept_stale_and_still_refuses_while_the_database_is_down() {
        let directory = unreachable_database_directory();
        let known = [9_u8; 32];
        let generation = directory.generation();
        // A client change arrives while the set's query runs; the set is then the database's answer.
        directory.apply(&Change::Client([1; 32]));
        directory.keep_known_digests(vec![known], generation);
        let held = directory.known_digests.read().unwrap().clone().expect("the set is kept");
        assert!(held.stale, "a change overtook the load: the set may lack a key");

        let flood = (0..40_u8).map(|n| {
            let directory = &directory;
            async move { directory.client(&[n + 100; 32]).await }
        });
        let answers = futures_util::future::join_all(flood).await;
        let refused = answers.iter().filter(|a| matches!(a, Ok(None))).count();
        assert!(refused >= 25, "refused from the kept set: {refused} of 40");
    }

    #[tokio::test]
    async fn requests_queued_behind_a_failed_first_load_of_the_set_do_not_each_repeat_it() {
        let directory = unreachable_database_directory();
        let queued = (0..20).map(|_| directory.known_digests());
        let answers = futures_util::future::join_all(queued).await;
        assert_eq!(
            directory.known_loads_finished.load(Ordering::Acquire),
            1,
            "one load for the whole queue; one after another, each would wait for a connection"
        );
        assert!(answers[0].is_err(), "the load failed");
        assert!(answers[1..].iter().all(|a| matches!(a, Ok(None))), "the others ask the database about their key");
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
