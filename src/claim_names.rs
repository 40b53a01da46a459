//! Which claim names (never values) verified identity tokens carry. Trackunit documents no claims, so
//! this is how an operator learns which ones could be required (TOKENVAULT_TRACKUNIT_REQUIRED_CLAIMS):
//! `tokenvault identity claims` lists them, and a new set is logged at INFO the first time it is seen.
//! Best effort and off the callback's path: a failure to record is logged at DEBUG and forgotten.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::store::identity_claim_set;

/// How often one replica writes a set it keeps seeing (to keep `last_seen_at` current).
const REWRITE_AFTER: Duration = Duration::from_secs(60);
/// Most distinct sets remembered; beyond it the memory starts over (sets are few in practice).
const CAPACITY: usize = 1024;

pub struct ClaimNames {
    pool: PgPool,
    written: Mutex<HashMap<String, Instant>>,
}

impl ClaimNames {
    pub fn new(pool: PgPool) -> Self {
        Self { pool, written: Mutex::new(HashMap::new()) }
    }

    /// Notes that a verified token carried `names` (sorted); writes it in the background when due.
    pub fn note(&self, names: &[String], runtime: &tokio::runtime::Handle) {
        let joined = names.join(",");
        {
            let mut written = self.written.lock().expect("claim names lock poisoned");
            if written.get(&joined).is_some_and(|at| at.elapsed() < REWRITE_AFTER) {
                return;
            }
            if written.len() >= CAPACITY {
                written.clear();
            }
            written.insert(joined.clone(), Instant::now());
        }
        let pool = self.pool.clone();
        runtime.spawn(async move {
            match identity_claim_set::record(&pool, &joined).await {
                Ok(true) => tracing::info!(
                    identity.claims = %joined,
                    "identity tokens carry a new set of claim names; see `tokenvault identity claims`"
                ),
                Ok(false) => {}
                Err(error) => tracing::debug!(error = %error, "recording identity claim names failed"),
            }
        });
    }
}
