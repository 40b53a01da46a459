use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::SecretString;

use super::upstream::MintedToken;
use crate::domain::ScopeSet;
use crate::store::token_cache::CachedTokenRow;

/// An access token we may hand out. `Debug` never shows the token itself.
pub struct Token {
    pub access_token: SecretString,
    pub token_type: String,
    pub scope: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("token_type", &self.token_type)
            .field("scope", &self.scope)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Token {
    pub(super) fn from_minted(minted: MintedToken, requested: &ScopeSet) -> Self {
        Self {
            access_token: minted.access_token,
            token_type: minted.token_type,
            scope: minted.scope.unwrap_or_else(|| requested.key()),
            issued_at: minted.issued_at,
            expires_at: minted.expires_at,
        }
    }

    pub(super) fn from_row(access_token: SecretString, row: &CachedTokenRow) -> Self {
        Self {
            access_token,
            token_type: row.token_type.clone(),
            scope: row.granted_scope.clone(),
            issued_at: row.issued_at,
            expires_at: row.expires_at,
        }
    }

    /// Whether the token stays valid for `min_ttl` from `now`. A caller asking for more than half the
    /// token's whole lifetime gets it while at least half its life is left: otherwise a `min_ttl` longer
    /// than the upstream's tokens live would mint on every request.
    pub fn fresh_for(&self, min_ttl: Duration, now: DateTime<Utc>) -> bool {
        let lifetime = (self.expires_at - self.issued_at).to_std().unwrap_or_default();
        let needed = min_ttl.min(lifetime / 2);
        (self.expires_at - now).to_std().is_ok_and(|left| left >= needed && left > Duration::ZERO)
    }

    /// From minting to expiry.
    pub fn lifetime(&self) -> Duration {
        (self.expires_at - self.issued_at).to_std().unwrap_or_default()
    }

    /// Whole seconds left at `now` (0 once expired).
    pub fn seconds_left(&self, now: DateTime<Utc>) -> i64 {
        (self.expires_at - now).num_seconds().max(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(lifetime_secs: i64) -> Token {
        let issued_at = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        Token {
            access_token: SecretString::from("t"),
            token_type: "Bearer".into(),
            scope: "a".into(),
            issued_at,
            expires_at: issued_at + chrono::Duration::seconds(lifetime_secs),
        }
    }

    #[test]
    fn fresh_while_min_ttl_is_left() {
        let t = token(3600);
        let at = |secs| t.issued_at + chrono::Duration::seconds(secs);
        assert!(t.fresh_for(Duration::from_secs(60), at(3540)));
        assert!(!t.fresh_for(Duration::from_secs(60), at(3541)));
        assert!(!t.fresh_for(Duration::ZERO, at(3600)), "an expired token is never fresh");
    }

    #[test]
    fn a_min_ttl_beyond_the_lifetime_asks_for_half_of_it() {
        let t = token(300);
        let at = |secs| t.issued_at + chrono::Duration::seconds(secs);
        assert!(t.fresh_for(Duration::from_secs(86_400), at(150)));
        assert!(!t.fresh_for(Duration::from_secs(86_400), at(151)));
    }

    #[test]
    fn debug_hides_the_access_token() {
        let t = Token { access_token: SecretString::from("tok-s3cret"), ..token(60) };
        assert!(!format!("{t:?}").contains("s3cret"));
    }
}
