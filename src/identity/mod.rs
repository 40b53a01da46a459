//! Verification of the `Trackunit-Identity` JWT that authenticates every callback.
//!
//! Trackunit promises nothing about this token beyond "signed by a key in the marketplace JWKS", so the
//! checks follow RFC 8725 (JWT best current practice) and refuse anything unexpected: the algorithm must be
//! asymmetric, allowed by settings and match the key's type; `none`, HMAC, `crit`, JWE, detached payloads,
//! duplicate JSON keys and non-integer dates are refused; `jku`/`x5u`/`jwk`/`x5c` headers are never read
//! or fetched. Keys come only from the configured JWKS (RFC 7517).

mod error;
mod jwks;
mod token;

pub use error::IdentityError;
pub use jwks::{JwksCache, KeySet, Refetch, parse_jwks};
pub use token::{Policy, VerifiedIdentity, verify_with};

use std::sync::Arc;

use crate::settings::IdentitySettings;

/// Why a callback's identity could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Invalid(#[from] IdentityError),
    /// No JWKS was ever loaded: the sender must retry later rather than give up.
    #[error("no signing keys are loaded yet")]
    KeysUnavailable,
    /// The token names a key the loaded set lacks, and no set fetched since the request arrived could be
    /// had yet: the key may have been published a moment ago. The sender must retry, not give up.
    #[error("the token's signing key is not known yet; retry in {} s", retry_after.as_secs())]
    KeyNotYetKnown { retry_after: std::time::Duration },
}

/// Checks identity tokens against the cached JWKS and the configured policy.
pub struct IdentityVerifier {
    keys: Arc<JwksCache>,
    policy: Policy,
}

impl IdentityVerifier {
    pub fn new(settings: &IdentitySettings, keys: Arc<JwksCache>) -> Self {
        Self { keys, policy: Policy::from_settings(settings) }
    }

    pub fn keys(&self) -> &Arc<JwksCache> {
        &self.keys
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Verifies a `Trackunit-Identity` header value (an optional `Bearer ` prefix is allowed).
    ///
    /// A token whose `kid` the loaded set lacks is refused (401) only once a set fetched after the
    /// request arrived lacks it too; until such a fetch is allowed, or when it failed, the answer is
    /// [`VerifyError::KeyNotYetKnown`] (503), so a callback signed by a newly published key is retried
    /// rather than lost.
    pub async fn verify(&self, header_value: &str) -> Result<VerifiedIdentity, VerifyError> {
        let arrived = std::time::Instant::now();
        let now = chrono::Utc::now().timestamp();
        let token = strip_bearer(header_value);
        if self.keys.current_or_fetch().await.is_none() {
            return Err(VerifyError::KeysUnavailable);
        }
        // Each turn either verifies, refuses for good, or finds a newer set; a newer set comes only from a
        // fetch, and once one started after `arrived` the next turn decides. Three turns always suffice.
        for _ in 0..3 {
            let (keys, fetch_started) = self.keys.current_with_age().ok_or(VerifyError::KeysUnavailable)?;
            match verify_with(token, &keys, &self.policy, now) {
                Err(IdentityError::UnknownKey) if fetch_started < arrived => {}
                other => return Ok(other?),
            }
            match self.keys.refetch_after(arrived, &keys).await {
                Refetch::Loaded => {}
                Refetch::Absent => return Err(IdentityError::UnknownKey.into()),
                Refetch::Failed { retry_after } | Refetch::NotAllowed { retry_after } => {
                    return Err(VerifyError::KeyNotYetKnown { retry_after });
                }
            }
        }
        Err(VerifyError::KeyNotYetKnown { retry_after: std::time::Duration::from_secs(1) })
    }
}

/// The token of a `Trackunit-Identity` header value: an optional `Bearer ` prefix removed.
pub fn strip_bearer(value: &str) -> &str {
    let value = value.trim();
    match value.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("bearer ") => value[7..].trim_start(),
        _ => value,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bearer_prefix_is_optional_and_case_insensitive() {
        assert_eq!(super::strip_bearer("Bearer a.b.c"), "a.b.c");
        assert_eq!(super::strip_bearer("bearer  a.b.c"), "a.b.c");
        assert_eq!(super::strip_bearer("a.b.c"), "a.b.c");
    }
}
