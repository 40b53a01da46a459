//! A bound on how often something may happen per second, for work an attacker can cause at will: log lines
//! of refused callbacks (beyond the bound they are counted, not written, so a flood cannot fill the disk or
//! drown the lines that matter), and database lookups of unknown service keys.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Allows `per_second` events in each wall-clock second.
pub struct PerSecond {
    per_second: u64,
    /// `second << 20 | events` of the current second: one atomic word, so no lock on the path.
    window: AtomicU64,
    /// Events refused since one was last allowed.
    suppressed: AtomicU64,
}

const COUNT_BITS: u32 = 20;

impl PerSecond {
    pub const fn new(per_second: u64) -> Self {
        Self { per_second, window: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(n)` when the event may happen now, `n` being how many were refused since the last one (a log
    /// line says so); `None` when it must not. `now_secs` is the current second.
    pub fn allow_at(&self, now_secs: u64) -> Option<u64> {
        let allowed = self
            .window
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |window| {
                let (second, lines) = (window >> COUNT_BITS, window & ((1 << COUNT_BITS) - 1));
                if second != now_secs {
                    Some((now_secs << COUNT_BITS) | 1)
                } else if lines < self.per_second {
                    Some(window + 1)
                } else {
                    None
                }
            })
            .is_ok();
        if allowed {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            None
        }
    }

    /// [`allow_at`](Self::allow_at) the current second.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.allow_at(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_few_lines_a_second_and_counts_the_rest() {
        let limit = PerSecond::new(3);
        let first_second: Vec<Option<u64>> = (0..10).map(|_| limit.allow_at(100)).collect();
        assert_eq!(first_second[..3], [Some(0), Some(0), Some(0)]);
        assert!(first_second[3..].iter().all(Option::is_none));
        assert_eq!(limit.allow_at(101), Some(7), "the next second's first line says how many were dropped");
        assert_eq!(limit.allow_at(101), Some(0));
    }
}
