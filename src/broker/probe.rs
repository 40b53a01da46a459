//! Probing rejected installations. One `invalid_client` stops minting for an installation at once (no
//! storm against an upstream that disables failing clients), but an upstream incident that refuses every
//! client, or credentials not yet propagated right after an install, must not strand the account until
//! Trackunit happens to send a new INSTALLED. So a rejected installation is probed with one upstream call
//! on a schedule (by default 1 min after the rejection, then 10 min and 1 h after each probe, then every
//! 6 h), and becomes
//! active again when the probe mints. Every replica runs the prober; a probe is claimed in the database
//! first, so each is made once. Probes are audited (`REJECTION_PROBE`) and counted
//! (`tokenvault_rejection_probes_total`).

use std::sync::Arc;
use std::time::Duration;

use super::{Broker, CacheKey, Token, UpstreamError};
use crate::domain::ScopeSet;
use crate::provider::Grant;
use crate::store::audit::{self, AuditEvent};
use crate::store::installation::{self, DueProbe};
use crate::store::{mint_failure, token_cache};

/// Probes claimed per round.
const BATCH: i64 = 10;
/// How long a claimed probe is held: a prober that dies mid-probe leaves it due again after this.
const CLAIM: Duration = Duration::from_secs(300);

/// The wait before the probe that follows `probes_done` probes (0: the first after the rejection).
pub fn next_wait(schedule: &[Duration], probes_done: usize) -> Duration {
    schedule.get(probes_done).or(schedule.last()).copied().unwrap_or(Duration::from_secs(6 * 3600))
}

/// How often the prober looks for due probes: a quarter of the first wait, between 250 ms and 15 s.
pub fn poll_interval(schedule: &[Duration]) -> Duration {
    (next_wait(schedule, 0) / 4).clamp(Duration::from_millis(250), Duration::from_secs(15))
}

impl Broker {
    /// Probes due rejected installations until the process ends.
    pub fn spawn_prober(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        let every = poll_interval(&self.probe_schedule);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(error) = self.probe_due().await {
                    tracing::debug!(error = %error, "probing rejected installations failed; will retry");
                }
            }
        })
    }

    async fn probe_due(&self) -> sqlx::Result<()> {
        for due in installation::claim_due_probes(&self.pool, BATCH, CLAIM).await? {
            self.probe(due).await?;
        }
        Ok(())
    }

    /// One upstream call for a rejected installation: active again if it mints, else the next probe is
    /// scheduled. Nothing changes if the installation changed meanwhile (new credentials, uninstalled).
    #[tracing::instrument(skip_all, fields(installation.id = %due.installation.id))]
    async fn probe(&self, due: DueProbe) -> sqlx::Result<()> {
        let installation = &due.installation;
        let scopes = due.probe_scope_key.as_deref().and_then(|key| match key {
            // A provider asked for no scope (send_scope = false).
            "" => Some(ScopeSet::empty()),
            key => ScopeSet::parse(key.split(' ')).ok(),
        });
        let outcome = match (&scopes, self.open_credentials(installation), self.provider_of(installation)) {
            (Some(scopes), Ok(credentials), Ok(provider)) => {
                let provider = Arc::clone(provider);
                match self.mint(&provider, &credentials, Grant::ClientCredentials, scopes).await {
                    Ok(minted) => Ok(Token::from_minted(minted, scopes)),
                    Err(error) => Err(Some(error)),
                }
            }
            // Nothing to probe with: counted as failed, and tried again on the schedule.
            _ => Err(None),
        };
        let mut tx = self.pool.begin().await?;
        let label = match outcome {
            Ok(token) => {
                if installation::reactivate(&mut tx, installation.id, Some(installation.credentials_version)).await? {
                    let scopes = scopes.as_ref().expect("a probe that minted had scopes");
                    let key = CacheKey {
                        installation_id: installation.id,
                        credentials_version: installation.credentials_version,
                        scope_key: Arc::clone(scopes.key()),
                    };
                    let row = self.seal_token(&key, &token);
                    token_cache::put(&mut tx, installation.id, &key.scope_key, key.credentials_version, &row).await?;
                    mint_failure::delete_for_installation(&mut tx, installation.id).await?;
                    "reactivated"
                } else {
                    "changed"
                }
            }
            Err(error) => {
                let wait = next_wait(&self.probe_schedule, usize::try_from(due.probe_count).unwrap_or(0) + 1);
                installation::probe_refused(&mut tx, installation.id, installation.credentials_version, wait).await?;
                let label = if error == Some(UpstreamError::InvalidClient) { "still_rejected" } else { "failed" };
                tracing::info!(outcome = label, next_probe_in_s = wait.as_secs(), error = ?error, "rejected installation probed");
                label
            }
        };
        let event = AuditEvent {
            actor: Some("prober"),
            provider: Some(&installation.provider),
            app_id: installation.app_id.as_deref(),
            account_id: Some(&installation.account_id),
            installation_id: Some(installation.id),
            ..AuditEvent::new("REJECTION_PROBE", label)
        };
        audit::record(&mut tx, &event).await?;
        tx.commit().await?;
        metrics::counter!("tokenvault_rejection_probes_total", "outcome" => label).increment(1);
        if label == "reactivated" {
            metrics::counter!("tokenvault_installations_reactivated_total", "by" => "probe").increment(1);
            tracing::info!("rejected installation minted again on a probe; active again");
            self.directory.forget_account(&installation.account_id);
            self.forget(installation.id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_schedule_is_one_minute_ten_minutes_an_hour_then_every_six_hours() {
        let schedule: Vec<Duration> =
            crate::settings::DEFAULT_PROBE_SCHEDULE_SECS.iter().copied().map(Duration::from_secs).collect();
        let waits: Vec<u64> = (0..6).map(|done| next_wait(&schedule, done).as_secs()).collect();
        assert_eq!(waits, [60, 600, 3600, 21_600, 21_600, 21_600]);
        assert_eq!(poll_interval(&schedule), Duration::from_secs(15));
        assert_eq!(poll_interval(&[Duration::from_secs(1)]), Duration::from_millis(250));
    }
}
