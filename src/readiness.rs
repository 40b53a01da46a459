//! Whether the database answers, as `/readyz` reports it: from a probe cached for at most a second and made
//! by one request at a time. `/readyz` is public (load balancers ask it), so a flood of it must not take
//! the pool's connections from the callbacks, nor learn more than once a second whether the database is up.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a probe's answer is reused.
pub const PROBE_TTL: Duration = Duration::from_secs(1);

type Probe = Box<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

pub struct DatabaseProbe {
    probe: Probe,
    last: Mutex<Option<(Instant, bool)>>,
    /// Held while a probe runs, so concurrent askers share it.
    probing: tokio::sync::Mutex<()>,
}

impl DatabaseProbe {
    pub fn new(probe: Probe) -> Self {
        Self { probe, last: Mutex::new(None), probing: tokio::sync::Mutex::new(()) }
    }

    /// Pings `pool`.
    pub fn of_pool(pool: sqlx::PgPool) -> Self {
        Self::new(Box::new(move || {
            let pool = pool.clone();
            Box::pin(async move { crate::store::ping(&pool).await })
        }))
    }

    fn recent(&self) -> Option<bool> {
        let last = *self.last.lock().expect("readiness lock poisoned");
        last.filter(|(at, _)| at.elapsed() < PROBE_TTL).map(|(_, up)| up)
    }

    /// Whether the database answered a probe made less than [`PROBE_TTL`] ago, probing if none was.
    pub async fn is_up(&self) -> bool {
        if let Some(up) = self.recent() {
            return up;
        }
        let _turn = self.probing.lock().await;
        if let Some(up) = self.recent() {
            return up;
        }
        let up = (self.probe)().await;
        *self.last.lock().expect("readiness lock poisoned") = Some((Instant::now(), up));
        up
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn counting(probes: &Arc<AtomicUsize>) -> DatabaseProbe {
        let probes = Arc::clone(probes);
        DatabaseProbe::new(Box::new(move || {
            let probes = Arc::clone(&probes);
            Box::pin(async move {
                probes.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                true
            })
        }))
    }

    #[tokio::test]
    async fn a_flood_of_askers_shares_one_probe_a_second() {
        let probes = Arc::new(AtomicUsize::new(0));
        let readiness = Arc::new(counting(&probes));
        let askers: Vec<_> = (0..200)
            .map(|_| {
                let readiness = Arc::clone(&readiness);
                tokio::spawn(async move { readiness.is_up().await })
            })
            .collect();
        for asker in askers {
            assert!(asker.await.unwrap());
        }
        assert_eq!(probes.load(Ordering::SeqCst), 1, "200 concurrent askers, one probe");
        tokio::time::sleep(PROBE_TTL).await;
        assert!(readiness.is_up().await);
        assert_eq!(probes.load(Ordering::SeqCst), 2, "probed again once the answer is a second old");
    }
}
