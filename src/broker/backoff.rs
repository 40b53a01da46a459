//! Exponential backoff per key after upstream failures, so one broken installation cannot make us
//! hammer the upstream (which disables clients that fail too often).

use std::hash::Hash;
use std::time::{Duration, Instant};

use moka::sync::Cache;

const FIRST: Duration = Duration::from_secs(1);
const LONGEST: Duration = Duration::from_secs(60);
/// The longest `Retry-After` we honour; a larger one is likely a mistake upstream.
const LONGEST_ASKED: Duration = Duration::from_secs(600);

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    until: Instant,
}

pub(super) struct Backoff<K: Hash + Eq + Send + Sync + 'static> {
    failures: Cache<K, Failures>,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Backoff<K> {
    pub fn new() -> Self {
        Self { failures: Cache::builder().max_capacity(100_000).time_to_idle(LONGEST * 2).build() }
    }

    /// How long `key` must still wait, if it is backing off.
    pub fn remaining(&self, key: &K) -> Option<Duration> {
        let failures = self.failures.get(key)?;
        failures.until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
    }

    /// Records a failure; returns how long the key now waits: 1 s, 2 s, 4 s, ... up to 60 s, or longer if
    /// the upstream asked for longer (`Retry-After`), up to 10 minutes.
    pub fn failed(&self, key: &K, asked: Option<Duration>) -> Duration {
        let count = self.failures.get(key).map_or(1, |f| f.count.saturating_add(1));
        let exponential = FIRST.saturating_mul(1 << (count - 1).min(6)).min(LONGEST);
        let wait = exponential.max(asked.unwrap_or_default().min(LONGEST_ASKED));
        self.failures.insert(key.clone(), Failures { count, until: Instant::now() + wait });
        wait
    }

    pub fn succeeded(&self, key: &K) {
        self.failures.invalidate(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_a_minute_and_reset_on_success() {
        let backoff = Backoff::new();
        let waits: Vec<u64> = (0..8).map(|_| backoff.failed(&"k", None).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert!(backoff.remaining(&"k").is_some());
        backoff.succeeded(&"k");
        assert!(backoff.remaining(&"k").is_none());
    }

    #[test]
    fn a_retry_after_from_upstream_lengthens_the_wait() {
        let backoff = Backoff::new();
        assert_eq!(backoff.failed(&"k", Some(Duration::from_secs(30))).as_secs(), 30);
        assert_eq!(backoff.failed(&"k", Some(Duration::from_secs(86_400))).as_secs(), 600);
    }
}
