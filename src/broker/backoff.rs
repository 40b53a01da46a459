//! Backoff per key after a failed mint, remembering what failed: requests that waited for the failing mint,
//! and those that come while the key backs off, are answered with that failure instead of calling the
//! upstream again (which disables clients that fail too often).

use std::hash::Hash;
use std::time::{Duration, Instant};

use moka::sync::Cache;

use super::UpstreamError;

const FIRST: Duration = Duration::from_secs(1);
const LONGEST: Duration = Duration::from_secs(60);
/// The longest `Retry-After` we honour; a larger one is likely a mistake upstream.
const LONGEST_ASKED: Duration = Duration::from_secs(600);
/// Most keys remembered; beyond it the least recently failed are forgotten (they may then call once more).
const CAPACITY: u64 = 100_000;

#[derive(Clone)]
struct Failures {
    count: u32,
    until: Instant,
    /// The failure itself, for the requests that waited for the mint that failed.
    error: UpstreamError,
    /// When it was recorded here: requests that arrived before it waited for that mint.
    recorded_at: Instant,
}

/// A key that is backing off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Waiting {
    pub remaining: Duration,
    pub count: u32,
    pub error: UpstreamError,
    pub recorded_at: Instant,
}

impl Waiting {
    /// The answer for a request that arrived at `arrived`: one that waited for the failing mint shares
    /// its error; a later one gets the refusal again, or for a passing failure `None` (a still-valid
    /// token, else 503 with the rest of the wait).
    pub fn answer(&self, arrived: Instant) -> Option<UpstreamError> {
        if arrived <= self.recorded_at { Some(self.error.clone()) } else { refusal(&self.error) }
    }
}

pub(super) struct Backoff<K: Hash + Eq + Send + Sync + 'static> {
    failures: Cache<K, Failures>,
}

/// Whether `error` is a refusal (answered as it is while backing off) rather than a passing failure.
pub(super) fn refusal(error: &UpstreamError) -> Option<UpstreamError> {
    match error {
        UpstreamError::Unavailable { .. } | UpstreamError::Failed { .. } => None,
        refused => Some(refused.clone()),
    }
}

/// The wait after the `count`th consecutive failure: 1 s, 2 s, 4 s, ... up to 60 s, or longer if the
/// upstream asked for longer (`Retry-After`), up to 10 minutes.
pub(super) fn wait_after(count: u32, error: &UpstreamError) -> Duration {
    let exponential = FIRST.saturating_mul(1 << count.saturating_sub(1).min(6)).min(LONGEST);
    let asked = match error {
        UpstreamError::Unavailable { retry_after, .. } => (*retry_after).min(LONGEST_ASKED),
        _ => Duration::ZERO,
    };
    exponential.max(asked)
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Backoff<K> {
    pub fn new() -> Self {
        Self {
            failures: Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(LONGEST_ASKED + LONGEST)
                .support_invalidation_closures()
                .build(),
        }
    }

    /// Whether `key` is backing off, for how long still and from what.
    pub fn remaining(&self, key: &K) -> Option<Waiting> {
        let failures = self.failures.get(key)?;
        let remaining = failures.until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())?;
        Some(Waiting { remaining, count: failures.count, error: failures.error, recorded_at: failures.recorded_at })
    }

    /// Records a failure; returns how many there were in a row and how long the key now waits.
    pub fn failed(&self, key: &K, error: &UpstreamError) -> (u32, Duration) {
        let count = self.failures.get(key).map_or(1, |f| f.count.saturating_add(1));
        let wait = wait_after(count, error);
        self.adopt(key, count, wait, error.clone());
        (count, wait)
    }

    /// Backs off as another replica recorded: `count` failures, `wait` left.
    pub fn adopt(&self, key: &K, count: u32, wait: Duration, error: UpstreamError) {
        let now = Instant::now();
        self.failures.insert(key.clone(), Failures { count, until: now + wait, error, recorded_at: now });
    }

    pub fn succeeded(&self, key: &K) {
        self.failures.invalidate(key);
    }

    /// Forgets every key `matches` selects (an installation changed: its failures no longer apply).
    pub fn forget_where(&self, matches: impl Fn(&K) -> bool + Send + Sync + 'static) {
        // Only fails when invalidation closures are not enabled, and they are.
        let _ = self.failures.invalidate_entries_if(move |key, _| matches(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unavailable(retry_after: u64) -> UpstreamError {
        UpstreamError::Unavailable { retry_after: Duration::from_secs(retry_after), reason: "x".into() }
    }

    #[test]
    fn a_flood_of_failing_keys_is_remembered_up_to_the_capacity_only() {
        let backoff = Backoff::<u64>::new();
        for key in 0..CAPACITY + 5_000 {
            backoff.failed(&key, &unavailable(1));
        }
        backoff.failures.run_pending_tasks();
        assert!(backoff.failures.entry_count() <= CAPACITY, "{} keys held", backoff.failures.entry_count());
    }

    #[test]
    fn waits_double_up_to_a_minute_and_reset_on_success() {
        let backoff = Backoff::new();
        let failed = UpstreamError::Failed { attempts: 1, reason: "HTTP 500".into() };
        let waits: Vec<u64> = (0..8).map(|_| backoff.failed(&"k", &failed).1.as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        let waiting = backoff.remaining(&"k").unwrap();
        assert_eq!(waiting.count, 8);
        assert_eq!(waiting.answer(Instant::now()), None, "a later request: a passing failure is no refusal");
        assert_eq!(waiting.answer(waiting.recorded_at), Some(failed), "a request that waited for the mint shares it");
        backoff.succeeded(&"k");
        assert!(backoff.remaining(&"k").is_none());
    }

    #[test]
    fn a_retry_after_from_upstream_lengthens_the_wait() {
        let backoff = Backoff::new();
        assert_eq!(backoff.failed(&"k", &unavailable(30)).1.as_secs(), 30);
        assert_eq!(backoff.failed(&"k", &unavailable(86_400)).1.as_secs(), 600);
    }

    #[test]
    fn a_refusal_is_remembered_to_answer_with_it() {
        let backoff = Backoff::new();
        let refused = UpstreamError::Rejected { status: 400, error: "unauthorized_client".into() };
        backoff.failed(&"k", &refused);
        assert_eq!(backoff.remaining(&"k").unwrap().answer(Instant::now()), Some(refused));
    }
}
