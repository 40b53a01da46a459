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
pub use jwks::{JwksCache, KeySet, parse_jwks};
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

    /// Verifies a `Trackunit-Identity` header value (an optional `Bearer ` prefix is allowed).
    pub async fn verify(&self, header_value: &str) -> Result<VerifiedIdentity, VerifyError> {
        let now = chrono::Utc::now().timestamp();
        let token = strip_bearer(header_value);
        let Some(keys) = self.keys.current_or_fetch().await else {
            return Err(VerifyError::KeysUnavailable);
        };
        match verify_with(token, &keys, &self.policy, now) {
            Err(IdentityError::UnknownKey) if self.keys.refresh_if_stale().await => {
                let keys = self.keys.current().ok_or(VerifyError::KeysUnavailable)?;
                Ok(verify_with(token, &keys, &self.policy, now)?)
            }
            other => Ok(other?),
        }
    }
}

fn strip_bearer(value: &str) -> &str {
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
