//! One cached token and what we know of its demand: the largest `min_ttl` asked of it recently, and
//! whether a background refresh is under way.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;

use super::token::Token;

pub(super) struct Entry {
    pub token: Arc<Token>,
    /// Largest `min_ttl` (seconds) asked of this token.
    asked_secs: AtomicU64,
    /// Largest `min_ttl` (seconds) asked of the token this one replaced, which holds until this token's
    /// own callers say more. One generation only: a `min_ttl` that nobody asks again stops setting the
    /// refresh time after one lifetime, instead of renewing every later token early.
    inherited_secs: u64,
    refreshing: AtomicBool,
    /// Set once a newer token replaced this one, so a holder of this entry outside the cache (a remembered
    /// request, see `routes::repeat`) stops serving it.
    superseded: AtomicBool,
    /// Per-token random share of the margin, so tokens minted together are not refreshed together.
    jitter: Duration,
}

/// Longest margin kept, beyond the demand, for a refresh to complete: a minute covers the token endpoint's
/// timeouts and retries. Without the cap, hour-long tokens were renewed 6 to 12 minutes before the demand
/// ran out, 11 to 25 % more mints than token lifetimes; with it, 1 to 2 minutes, 3.5 to 5.5 %.
const LONGEST_MARGIN: Duration = Duration::from_secs(60);

/// A tenth of the lifetime, at most [`LONGEST_MARGIN`].
fn margin(lifetime: Duration) -> Duration {
    (lifetime / 10).min(LONGEST_MARGIN)
}

impl Entry {
    /// `inherited`: what was asked of the token this one replaces (see [`Entry::asked`]).
    pub fn new(token: Arc<Token>, inherited: Duration) -> Self {
        let margin = margin(token.lifetime());
        let jitter_ms = rand::rng().random_range(0..=margin.as_millis().max(1) as u64);
        Self {
            token,
            asked_secs: AtomicU64::new(0),
            inherited_secs: inherited.as_secs(),
            refreshing: AtomicBool::new(false),
            superseded: AtomicBool::new(false),
            jitter: Duration::from_millis(jitter_ms),
        }
    }

    pub fn supersede(&self) {
        self.superseded.store(true, Ordering::Release);
    }

    pub fn is_superseded(&self) -> bool {
        self.superseded.load(Ordering::Acquire)
    }

    pub fn note_demand(&self, min_ttl: Duration) {
        self.asked_secs.fetch_max(min_ttl.as_secs(), Ordering::Relaxed);
    }

    /// The largest `min_ttl` asked of this token itself: what its successor inherits.
    pub fn asked(&self) -> Duration {
        Duration::from_secs(self.asked_secs.load(Ordering::Relaxed))
    }

    /// The largest `min_ttl` asked recently: of this token, or of the one it replaced.
    pub fn demand(&self) -> Duration {
        Duration::from_secs(self.asked_secs.load(Ordering::Relaxed).max(self.inherited_secs))
    }

    /// Remaining life under which a refresh starts: the demand (capped at half the lifetime, as
    /// [`Token::fresh_for`] does), plus a margin (a tenth of the lifetime, at most a minute), plus this
    /// entry's jitter (up to one more margin).
    pub fn refresh_threshold(&self) -> Duration {
        let lifetime = self.token.lifetime();
        self.demand().min(lifetime / 2) + margin(lifetime) + self.jitter
    }

    pub fn refresh_due(&self, now: DateTime<Utc>) -> bool {
        self.token.left(now).is_some_and(|left| left < self.refresh_threshold())
    }

    /// True for the one caller that gets to start the refresh.
    pub fn claim_refresh(&self) -> bool {
        !self.refreshing.swap(true, Ordering::AcqRel)
    }

    pub fn is_refreshing(&self) -> bool {
        self.refreshing.load(Ordering::Acquire)
    }

    pub fn release_refresh(&self) {
        self.refreshing.store(false, Ordering::Release);
    }
}

/// Evicts a cached token from memory when it expires: the token in the entry now, also after a refresh
/// replaced the one before it under the same key.
pub(super) struct UntilExpiry;

impl UntilExpiry {
    fn time_left(entry: &Entry) -> Option<Duration> {
        Some((entry.token.expires_at - Utc::now()).to_std().unwrap_or_default())
    }
}

impl<K> moka::Expiry<K, Arc<Entry>> for UntilExpiry {
    fn expire_after_create(&self, _key: &K, entry: &Arc<Entry>, _created_at: std::time::Instant) -> Option<Duration> {
        Self::time_left(entry)
    }

    /// moka's default keeps the expiry of the value replaced: the refreshed token would be evicted when
    /// the token it replaced expires, and every request for it would then wait for the shared table.
    fn expire_after_update(
        &self,
        _key: &K,
        entry: &Arc<Entry>,
        _updated_at: std::time::Instant,
        _until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Self::time_left(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn entry(lifetime_secs: i64, demand_secs: u64) -> Entry {
        let entry = successor(lifetime_secs, Duration::ZERO);
        entry.note_demand(Duration::from_secs(demand_secs));
        entry
    }

    fn successor(lifetime_secs: i64, inherited: Duration) -> Entry {
        let issued_at = Utc::now();
        let expires_at = issued_at + chrono::Duration::seconds(lifetime_secs);
        let token = Token::new(SecretString::from("t"), "Bearer".into(), "a".into(), issued_at, expires_at);
        Entry::new(Arc::new(token), inherited)
    }

    #[test]
    fn a_min_ttl_nobody_asks_again_sets_the_refresh_time_for_one_more_token_only() {
        let first = entry(3600, 1500);
        let second = successor(3600, first.asked());
        assert!(second.refresh_threshold() >= Duration::from_secs(1500), "inherited for one token");
        second.note_demand(Duration::from_secs(60));
        let third = successor(3600, second.asked());
        assert!(third.refresh_threshold() <= Duration::from_secs(180), "{:?}", third.refresh_threshold());
        third.note_demand(Duration::from_secs(1500));
        assert!(third.refresh_threshold() >= Duration::from_secs(1500), "asked again, it counts again");
    }

    #[test]
    fn refresh_is_due_when_the_demand_plus_margin_is_no_longer_left() {
        let e = entry(300, 60);
        let threshold = e.refresh_threshold();
        assert!(threshold >= Duration::from_secs(90) && threshold <= Duration::from_secs(120), "{threshold:?}");
        let at = |left: i64| e.token.expires_at - chrono::Duration::seconds(left);
        assert!(!e.refresh_due(at(121)));
        assert!(e.refresh_due(at(89)));
    }

    #[test]
    fn long_lived_tokens_keep_at_most_a_minute_of_margin_and_a_minute_of_jitter() {
        for _ in 0..20 {
            let e = entry(3600, 60);
            let threshold = e.refresh_threshold();
            assert!(threshold >= Duration::from_secs(120) && threshold <= Duration::from_secs(180), "{threshold:?}");
        }
    }

    #[test]
    fn tokens_minted_together_are_refreshed_at_spread_times() {
        // 50 tokens minted at once (a restart, an install storm), each with a jitter of 0 to 60 s: all
        // of them within 30 s of each other would take a chance of about 1e-13.
        let thresholds: Vec<Duration> = (0..50).map(|_| entry(3600, 60).refresh_threshold()).collect();
        let spread = *thresholds.iter().max().unwrap() - *thresholds.iter().min().unwrap();
        assert!(spread >= Duration::from_secs(30), "refreshes would fall together: spread {spread:?}");
    }

    #[test]
    fn a_demand_beyond_the_lifetime_does_not_refresh_continuously() {
        let e = entry(300, 86_400);
        assert!(e.refresh_threshold() < Duration::from_secs(300));
        assert!(!e.refresh_due(e.token.issued_at + chrono::Duration::seconds(10)));
    }

    #[test]
    fn a_replaced_token_stays_in_memory_until_its_own_expiry_not_that_of_the_token_before() {
        let memory: moka::sync::Cache<u8, Arc<Entry>> = moka::sync::Cache::builder().expire_after(UntilExpiry).build();
        let short = |millis: i64| {
            let issued_at = Utc::now();
            let expires_at = issued_at + chrono::Duration::milliseconds(millis);
            let token = Token::new(SecretString::from("t"), "Bearer".into(), "a".into(), issued_at, expires_at);
            Arc::new(Entry::new(Arc::new(token), Duration::ZERO))
        };
        memory.insert(1, short(150));
        memory.insert(1, short(60_000)); // the refresh
        memory.insert(2, short(150));
        std::thread::sleep(Duration::from_millis(300));
        assert!(memory.get(&2).is_none(), "an expired token is evicted");
        let kept = memory.get(&1).expect("the refreshed token outlives the one it replaced");
        assert!(kept.token.left(Utc::now()).is_some_and(|left| left > Duration::from_secs(50)));
    }

    #[test]
    fn only_one_caller_claims_the_refresh() {
        let e = entry(100, 0);
        assert!(e.claim_refresh());
        assert!(!e.claim_refresh());
        e.release_refresh();
        assert!(e.claim_refresh());
    }
}
