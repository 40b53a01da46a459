//! Counts HTTP requests being handled, so a graceful stop can wait for exactly those.
//!
//! actix-server drains connections per worker on a graceful stop, but idle workers stop at once, and we
//! have seen a request in flight cut off during that (the process then exited 0). So `run_until_stopped`
//! does not rely on it: it stops accepting, waits until this count is zero (bounded), and only then stops
//! the servers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

#[derive(Clone, Default)]
pub struct InFlight(Arc<Inner>);

#[derive(Default)]
struct Inner {
    count: AtomicUsize,
    idle: Notify,
}

/// Held while a request is handled; counts it.
pub struct Guard(InFlight);

impl InFlight {
    pub fn enter(&self) -> Guard {
        self.0.count.fetch_add(1, Ordering::AcqRel);
        Guard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.0.count.load(Ordering::Acquire)
    }

    /// Resolves once no request is in flight.
    pub async fn drained(&self) {
        loop {
            let idle = self.0.idle.notified();
            tokio::pin!(idle);
            // Register before checking, so a request finishing in between cannot be missed.
            idle.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drained_waits_for_the_last_guard() {
        let in_flight = InFlight::default();
        let (first, second) = (in_flight.enter(), in_flight.enter());
        let waiter = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.drained().await }
        });
        drop(first);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(second);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter).await.unwrap().unwrap();
        in_flight.drained().await;
    }
}
