use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::domain::ScopeSet;
use crate::provider::MintedToken;
use crate::store::token_cache::CachedTokenRow;

/// An access token we may hand out. `Debug` never shows the token itself. Built only by [`Token::new`]
/// (the answer field is private) and never changed afterwards, so its answer always matches its fields.
pub struct Token {
    pub access_token: SecretString,
    pub token_type: String,
    pub scope: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// `expires_at` in Unix milliseconds and the lifetime, worked out once: calendar arithmetic on every
    /// check of a cached token adds up on the hot path.
    expires_at_ms: i64,
    lifetime: Duration,
    answer: Answer,
    /// Scopes the upstream granted beyond those requested: the token goes only to callers granted these
    /// too (see [`Token::extra_scopes`]). Empty almost always.
    extra_scopes: Box<[Box<str>]>,
}

/// The JSON answer to a token request for this token, serialized once when the token is made rather than
/// on every request (the hot path): all of it but `expires_in`, which changes by the second. The head holds
/// the access token, so it is zeroized on drop.
struct Answer {
    head: Zeroizing<Vec<u8>>,
    tail: Vec<u8>,
}

impl Answer {
    /// `{"access_token":…,"token_type":…,"expires_in":` and `,"expires_at":"…","scope":…}`: RFC 6749
    /// §5.1 names, plus `expires_at` (RFC 3339, UTC, whole seconds).
    fn new(access_token: &SecretString, token_type: &str, expires_at: DateTime<Utc>, scope: &str) -> Self {
        let expires_at = expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let mut head = Zeroizing::new(Vec::with_capacity(access_token.expose_secret().len() + 64));
        head.extend_from_slice(br#"{"access_token":"#);
        push_json_string(&mut head, access_token.expose_secret());
        head.extend_from_slice(br#","token_type":"#);
        push_json_string(&mut head, token_type);
        head.extend_from_slice(br#","expires_in":"#);
        let mut tail = Vec::with_capacity(scope.len() + expires_at.len() + 32);
        tail.extend_from_slice(br#","expires_at":"#);
        push_json_string(&mut tail, &expires_at);
        tail.extend_from_slice(br#","scope":"#);
        push_json_string(&mut tail, scope);
        tail.push(b'}');
        Self { head, tail }
    }
}

/// The scopes in `granted` (space- or comma-separated, as providers answer) that `requested` (a scope key)
/// lacks.
fn extra_scopes(granted: &str, requested: &str) -> Box<[Box<str>]> {
    if granted == requested {
        return Box::default();
    }
    let asked: Vec<&str> = requested.split(' ').collect();
    let mut extra: Vec<Box<str>> = granted
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|scope| !scope.is_empty() && !asked.contains(scope))
        .map(Box::from)
        .collect();
    extra.sort_unstable();
    extra.dedup();
    extra.into_boxed_slice()
}

/// Appends `value` as a JSON string, quoted and escaped by serde_json.
fn push_json_string(out: &mut Vec<u8>, value: &str) {
    serde_json::to_writer(out, value).expect("serializing a str into a Vec cannot fail");
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
    pub fn new(
        access_token: SecretString,
        token_type: String,
        scope: String,
        issued_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Self {
        let answer = Answer::new(&access_token, &token_type, expires_at, &scope);
        let expires_at_ms = expires_at.timestamp_millis();
        let lifetime = (expires_at - issued_at).to_std().unwrap_or_default();
        Self {
            access_token,
            token_type,
            scope,
            issued_at,
            expires_at,
            expires_at_ms,
            lifetime,
            answer,
            extra_scopes: Box::default(),
        }
    }

    /// Notes which granted scopes go beyond `requested` (a scope key: space-joined).
    fn requested(mut self, requested: &str) -> Self {
        self.extra_scopes = extra_scopes(&self.scope, requested);
        self
    }

    pub(super) fn from_minted(minted: MintedToken, requested: &ScopeSet) -> Self {
        let scope = minted.scope.unwrap_or_else(|| requested.key().to_string());
        Self::new(minted.access_token, minted.token_type, scope, minted.issued_at, minted.expires_at)
            .requested(requested.key())
    }

    pub(super) fn from_row(access_token: SecretString, row: &CachedTokenRow, requested: &str) -> Self {
        Self::new(access_token, row.token_type.clone(), row.granted_scope.clone(), row.issued_at, row.expires_at)
            .requested(requested)
    }

    /// The scopes the upstream granted beyond those requested. A provider that grants more than it was
    /// asked must not turn a key granted `a` into a holder of a token for `a b c`.
    pub fn extra_scopes(&self) -> &[Box<str>] {
        &self.extra_scopes
    }

    /// The JSON body answering a token request at `now`: `access_token`, `token_type`, `expires_in`
    /// (whole seconds left), `expires_at` and `scope`. Holds the access token: hand it only to its caller.
    pub fn answer_json(&self, now: DateTime<Utc>) -> Vec<u8> {
        let Answer { head, tail } = &self.answer;
        let mut seconds = itoa::Buffer::new();
        let seconds = seconds.format(self.seconds_left(now));
        let mut body = Vec::with_capacity(head.len() + seconds.len() + tail.len());
        body.extend_from_slice(head);
        body.extend_from_slice(seconds.as_bytes());
        body.extend_from_slice(tail);
        body
    }

    /// Whether the token stays valid for `min_ttl` from `now`. A caller asking for more than half the
    /// token's whole lifetime gets it while at least half its life is left: otherwise a `min_ttl` longer
    /// than the upstream's tokens live would mint on every request.
    pub fn fresh_for(&self, min_ttl: Duration, now: DateTime<Utc>) -> bool {
        let needed = min_ttl.min(self.lifetime / 2);
        self.left(now).is_some_and(|left| left >= needed && left > Duration::ZERO)
    }

    /// From minting to expiry.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Time left at `now`, to the millisecond; `None` once expired.
    pub fn left(&self, now: DateTime<Utc>) -> Option<Duration> {
        let left_ms = self.expires_at_ms.saturating_sub(now.timestamp_millis());
        u64::try_from(left_ms).ok().map(Duration::from_millis)
    }

    /// Whole seconds left at `now` (0 once expired).
    pub fn seconds_left(&self, now: DateTime<Utc>) -> i64 {
        self.left(now).map_or(0, |left| left.as_secs() as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(lifetime_secs: i64) -> Token {
        token_with("t", "Bearer", "a", lifetime_secs)
    }

    fn token_with(access_token: &str, token_type: &str, scope: &str, lifetime_secs: i64) -> Token {
        let issued_at = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let expires_at = issued_at + chrono::Duration::seconds(lifetime_secs);
        Token::new(SecretString::from(access_token), token_type.into(), scope.into(), issued_at, expires_at)
    }

    #[test]
    fn the_answer_is_the_json_of_the_token_at_that_moment() {
        let t = token_with("at-\"quoted\"\\ \u{1}é", "Bearer", "asset.view fleet.read", 3600);
        let now = t.issued_at + chrono::Duration::milliseconds(1500);
        let answer: serde_json::Value = serde_json::from_slice(&t.answer_json(now)).unwrap();
        assert_eq!(
            answer,
            serde_json::json!({
                "access_token": "at-\"quoted\"\\ \u{1}é",
                "token_type": "Bearer",
                "expires_in": 3598,
                "expires_at": "2027-01-15T09:00:00Z",
                "scope": "asset.view fleet.read",
            })
        );
        let after_expiry = t.expires_at + chrono::Duration::seconds(5);
        let answer: serde_json::Value = serde_json::from_slice(&t.answer_json(after_expiry)).unwrap();
        assert_eq!(answer["expires_in"], 0);
    }

    proptest::proptest! {
        #[test]
        fn the_answer_is_valid_json_for_any_strings(access in ".*", token_type in ".*", scope in ".*", secs in 0i64..100_000) {
            let t = token_with(&access, &token_type, &scope, secs);
            let answer: serde_json::Value = serde_json::from_slice(&t.answer_json(t.issued_at)).unwrap();
            proptest::prop_assert_eq!(answer["access_token"].as_str(), Some(access.as_str()));
            proptest::prop_assert_eq!(answer["token_type"].as_str(), Some(token_type.as_str()));
            proptest::prop_assert_eq!(answer["scope"].as_str(), Some(scope.as_str()));
            proptest::prop_assert_eq!(answer["expires_in"].as_i64(), Some(secs));
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
    fn scopes_granted_beyond_the_request_are_noted() {
        assert!(extra_scopes("a b", "a b").is_empty());
        assert!(extra_scopes("b a", "a b").is_empty(), "order does not matter");
        assert!(extra_scopes("a", "a b").is_empty(), "narrower is fine");
        assert_eq!(&*extra_scopes("a b  c", "a"), [Box::from("b"), Box::from("c")]);
        assert_eq!(&*extra_scopes("a,x", "a"), [Box::from("x")]);
        let t = token_with("t", "Bearer", "a admin", 60).requested("a");
        assert_eq!(t.extra_scopes(), [Box::from("admin")]);
    }

    #[test]
    fn debug_hides_the_access_token() {
        let t = token_with("tok-s3cret", "Bearer", "a", 60);
        assert!(!format!("{t:?}").contains("s3cret"));
    }
}
