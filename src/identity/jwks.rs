//! The marketplace JWKS: fetched at start, cached, refreshed in the background (honouring
//! `Cache-Control: max-age`), refetched when a token names an unknown `kid` (at most once per
//! `jwks_min_refresh`), and kept when a refresh fails: a JWKS outage must not stop installs.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use url::Url;

use crate::outbound;
use crate::settings::ASYMMETRIC_ALGORITHMS;

/// Smallest RSA modulus accepted: RFC 7518 §3.3 requires 2048 bits or more for RS*/PS* signatures.
pub const MIN_RSA_BITS: usize = 2048;
const MAX_JWKS_BYTES: usize = 256 * 1024;
const MAX_KEYS: usize = 64;
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(3600);
const LONGEST_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// The longest a request for an unknown `kid` waits for the next allowed fetch rather than being told to
/// retry (503): with a refresher fetching about as often as allowed, telling it to come back could repeat.
const LONGEST_INLINE_WAIT: Duration = Duration::from_secs(1);
/// Retry delay while no key set has ever loaded: short, because callbacks answer 503 until then.
const RETRY_WHILE_EMPTY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyType {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

/// One usable verification key from the JWKS.
pub struct VerificationKey {
    pub(super) kid: Option<String>,
    key_type: KeyType,
    declared_alg: Option<Algorithm>,
    pub(super) key: DecodingKey,
}

impl VerificationKey {
    /// Whether `alg` may be verified with this key: the key's type decides (RFC 8725 §3.1), and a key that
    /// declares an `alg` accepts only that one.
    pub(super) fn accepts(&self, alg: Algorithm) -> bool {
        let fits_type = match self.key_type {
            KeyType::Rsa => matches!(
                alg,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ),
            KeyType::EcP256 => alg == Algorithm::ES256,
            KeyType::EcP384 => alg == Algorithm::ES384,
            KeyType::Ed25519 => alg == Algorithm::EdDSA,
        };
        fits_type && self.declared_alg.is_none_or(|declared| declared == alg)
    }
}

/// The usable keys of one JWKS document.
pub struct KeySet {
    keys: Vec<VerificationKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<_> = self.keys.iter().map(|k| (&k.kid, k.key_type)).collect();
        f.debug_struct("KeySet").field("keys", &kids).finish()
    }
}

/// Outcome of looking a token's `kid` up.
pub(super) enum Lookup<'a> {
    Found(&'a VerificationKey),
    Unknown,
    Ambiguous,
}

impl KeySet {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key named `kid`; a token without `kid` may only use a set of exactly one key.
    pub(super) fn find(&self, kid: Option<&str>) -> Lookup<'_> {
        match kid {
            Some(kid) => {
                self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)).map_or(Lookup::Unknown, Lookup::Found)
            }
            None => match self.keys.as_slice() {
                [only] => Lookup::Found(only),
                [] => Lookup::Unknown,
                _ => Lookup::Ambiguous,
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("the JWKS request failed")]
    Transport(#[source] reqwest::Error),
    #[error("the JWKS endpoint answered HTTP {0}")]
    Status(u16),
    #[error(transparent)]
    Body(#[from] outbound::BodyError),
    #[error("the JWKS document is not valid: {0}")]
    Invalid(String),
    #[error("the JWKS holds no usable key")]
    NoUsableKey,
}

/// Parses a JWKS document (RFC 7517 §5), keeping only keys we can use safely. Unusable keys (unknown `kty`,
/// `use` other than `sig`, RSA under 2048 bits, curves we do not support) are skipped with a warning.
pub fn parse_jwks(bytes: &[u8]) -> Result<KeySet, JwksError> {
    let document = crate::strict_json::from_slice(bytes).map_err(|e| JwksError::Invalid(e.to_string()))?;
    let entries =
        document.get("keys").and_then(Value::as_array).ok_or_else(|| JwksError::Invalid("no `keys` array".into()))?;
    let mut keys: Vec<VerificationKey> = Vec::new();
    for (index, entry) in entries.iter().take(MAX_KEYS).enumerate() {
        match parse_key(entry) {
            Ok(key) if key.kid.is_some() && keys.iter().any(|k| k.kid == key.kid) => {
                tracing::warn!(jwks.key_index = index, "JWKS key skipped: duplicate kid");
            }
            Ok(key) => keys.push(key),
            Err(reason) => tracing::warn!(jwks.key_index = index, reason, "JWKS key skipped"),
        }
    }
    if keys.is_empty() {
        return Err(JwksError::NoUsableKey);
    }
    Ok(KeySet { keys })
}

fn parse_key(entry: &Value) -> Result<VerificationKey, &'static str> {
    let text = |name: &str| entry.get(name).and_then(Value::as_str);
    if entry.get("use").is_some() && text("use") != Some("sig") {
        return Err("`use` is not \"sig\"");
    }
    if let Some(ops) = entry.get("key_ops") {
        let verifies = ops.as_array().is_some_and(|ops| ops.iter().any(|op| op.as_str() == Some("verify")));
        if !verifies {
            return Err("`key_ops` does not include \"verify\"");
        }
    }
    let declared_alg = match entry.get("alg") {
        None => None,
        Some(alg) => Some(
            alg.as_str()
                .and_then(|a| a.parse::<Algorithm>().ok())
                .filter(|a| ASYMMETRIC_ALGORITHMS.contains(a))
                .ok_or("`alg` is not an accepted asymmetric algorithm")?,
        ),
    };
    let kid = match entry.get("kid") {
        None => None,
        Some(kid) => Some(kid.as_str().ok_or("`kid` is not a string")?.to_owned()),
    };
    let component = |name: &str| -> Result<Vec<u8>, &'static str> {
        let value = text(name).ok_or("a key component is missing")?;
        URL_SAFE_NO_PAD.decode(value).map_err(|_| "a key component is not base64url")
    };
    let (key_type, key) = match (text("kty"), text("crv")) {
        (Some("RSA"), _) => {
            let modulus = component("n")?;
            let exponent = component("e")?;
            if rsa_bits(&modulus) < MIN_RSA_BITS {
                return Err("RSA key under 2048 bits refused");
            }
            (KeyType::Rsa, DecodingKey::from_rsa_raw_components(&modulus, &exponent))
        }
        (Some("EC"), Some(curve @ ("P-256" | "P-384"))) => {
            let (key_type, len) = if curve == "P-256" { (KeyType::EcP256, 32) } else { (KeyType::EcP384, 48) };
            let (x, y) = (component("x")?, component("y")?);
            if x.len() != len || y.len() != len {
                return Err("EC coordinates have the wrong length for the curve");
            }
            let point = [&[0x04][..], &x, &y].concat();
            (key_type, DecodingKey::from_ec_der(&point))
        }
        (Some("OKP"), Some("Ed25519")) => {
            let x = component("x")?;
            if x.len() != 32 {
                return Err("Ed25519 key has the wrong length");
            }
            (KeyType::Ed25519, DecodingKey::from_ed_der(&x))
        }
        _ => return Err("unsupported kty or crv"),
    };
    let key = VerificationKey { kid, key_type, declared_alg, key };
    if let Some(alg) = declared_alg
        && !key.accepts(alg)
    {
        return Err("`alg` does not fit the key type");
    }
    Ok(key)
}

fn rsa_bits(modulus: &[u8]) -> usize {
    let significant = match modulus.iter().position(|&b| b != 0) {
        Some(start) => &modulus[start..],
        None => return 0,
    };
    significant.len() * 8 - significant[0].leading_zeros() as usize
}

struct Loaded {
    keys: Arc<KeySet>,
    /// When the fetch that loaded `keys` started: a request that arrived before it may be answered from
    /// this set, one that arrived after it may need another.
    fetch_started: Instant,
}

/// When the last fetch started and what it found; kept under the lock that serializes fetches.
#[derive(Default)]
struct LastFetch {
    started: Option<Instant>,
    /// It read a valid JWKS without a usable key (all too weak, say): the endpoint answered, and a kid
    /// it does not hold as a usable key is absent, not merely unknown yet.
    no_usable_key: bool,
}

impl LastFetch {
    async fn fetch(&mut self, cache: &JwksCache) -> Result<Duration, JwksError> {
        let started = Instant::now();
        self.started = Some(started);
        let result = cache.fetch_and_store(started).await;
        self.no_usable_key = matches!(result, Err(JwksError::NoUsableKey));
        result
    }
}

/// Whether a fetch newer than a request has run, for a token whose `kid` the set it saw lacked.
#[derive(Debug, PartialEq, Eq)]
pub enum Refetch {
    /// A newer set than the one the token was checked against is loaded: check it again.
    Loaded,
    /// A fetch that started after the request arrived failed: the kid may yet exist.
    Failed { retry_after: Duration },
    /// A fetch that started after the request arrived read the JWKS, and it holds no usable key at all:
    /// the kid is not one (the old set keeps serving the kids it holds).
    Absent,
    /// The last fetch started before the request arrived, too recently to fetch again: the kid may be a
    /// key published since. Ask the sender to retry when the next fetch is allowed.
    NotAllowed { retry_after: Duration },
}

/// The cached key set and the means to refresh it.
pub struct JwksCache {
    url: Url,
    http: reqwest::Client,
    min_refresh: Duration,
    current: RwLock<Option<Loaded>>,
    /// The last fetch; held across a fetch so concurrent callers queue behind it and then see what it
    /// loaded.
    last_fetch: tokio::sync::Mutex<LastFetch>,
}

impl JwksCache {
    pub fn new(url: Url, min_refresh: Duration) -> Self {
        Self {
            url,
            http: outbound::client(Duration::from_secs(10)),
            min_refresh,
            current: RwLock::new(None),
            last_fetch: tokio::sync::Mutex::new(LastFetch::default()),
        }
    }

    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.current.read().expect("JWKS lock poisoned").as_ref().map(|l| Arc::clone(&l.keys))
    }

    /// The current set and when the fetch that loaded it started.
    pub fn current_with_age(&self) -> Option<(Arc<KeySet>, Instant)> {
        self.current.read().expect("JWKS lock poisoned").as_ref().map(|l| (Arc::clone(&l.keys), l.fetch_started))
    }

    pub fn is_loaded(&self) -> bool {
        self.current().is_some()
    }

    /// The cached set, or, when none was ever loaded, one rate-limited fetch attempt.
    pub async fn current_or_fetch(&self) -> Option<Arc<KeySet>> {
        if let Some(keys) = self.current() {
            return Some(keys);
        }
        self.refresh_if_stale().await;
        self.current()
    }

    /// Fetches again unless a fetch started less than `min_refresh` ago. Returns whether a fetch ran and
    /// succeeded (the set may be the same as before).
    pub async fn refresh_if_stale(&self) -> bool {
        let mut last = self.last_fetch.lock().await;
        if last.started.is_some_and(|at| at.elapsed() < self.min_refresh) {
            return false;
        }
        last.fetch(self).await.is_ok()
    }

    /// For a request that arrived at `arrived` and checked its token against `seen` (which lacked its
    /// `kid`): makes sure a set at least as new as a fetch started after `arrived` is loaded, fetching if
    /// the rate limit allows. Callers queue behind a fetch in progress, so every one of them sees what it
    /// loaded; a flood of unknown kids still causes at most one fetch per `min_refresh`.
    pub async fn refetch_after(&self, arrived: Instant, seen: &Arc<KeySet>) -> Refetch {
        let mut last = self.last_fetch.lock().await;
        if let Some((keys, fetch_started)) = self.current_with_age()
            && (!Arc::ptr_eq(&keys, seen) || fetch_started >= arrived)
        {
            return Refetch::Loaded;
        }
        if let Some(at) = last.started {
            let allowed_in = self.min_refresh.saturating_sub(at.elapsed());
            if at >= arrived && last.no_usable_key {
                return Refetch::Absent;
            }
            if at >= arrived {
                return Refetch::Failed { retry_after: allowed_in.max(Duration::from_secs(1)) };
            }
            if allowed_in > LONGEST_INLINE_WAIT {
                return Refetch::NotAllowed { retry_after: allowed_in };
            }
            // Allowed within a moment: wait for it here, holding the lock, so the callers queued behind
            // are answered by that one fetch rather than told to come back.
            tokio::time::sleep(allowed_in).await;
        }
        match last.fetch(self).await {
            Ok(_) => Refetch::Loaded,
            Err(JwksError::NoUsableKey) => Refetch::Absent,
            Err(_) => Refetch::Failed { retry_after: self.min_refresh.max(Duration::from_secs(1)) },
        }
    }

    /// Fetches now, whatever the rate limit; on success returns how long the answer may be cached.
    pub async fn refresh(&self) -> Result<Duration, JwksError> {
        self.last_fetch.lock().await.fetch(self).await
    }

    async fn fetch_and_store(&self, started: Instant) -> Result<Duration, JwksError> {
        let result = self.fetch().await;
        match &result {
            Ok((keys, max_age)) => {
                tracing::info!(jwks.keys = keys.len(), jwks.max_age_s = max_age.as_secs(), "JWKS loaded");
                metrics::counter!("tokenvault_jwks_refresh_total", "result" => "ok").increment(1);
                *self.current.write().expect("JWKS lock poisoned") =
                    Some(Loaded { keys: Arc::clone(keys), fetch_started: started });
            }
            Err(error) => {
                tracing::warn!(error = %error, kept_previous = self.is_loaded(), "JWKS refresh failed");
                metrics::counter!("tokenvault_jwks_refresh_total", "result" => "error").increment(1);
            }
        }
        result.map(|(_, max_age)| max_age)
    }

    async fn fetch(&self) -> Result<(Arc<KeySet>, Duration), JwksError> {
        let response = self
            .http
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(JwksError::Transport)?;
        if !response.status().is_success() {
            return Err(JwksError::Status(response.status().as_u16()));
        }
        let max_age = response
            .headers()
            .get(reqwest::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(max_age)
            .unwrap_or(DEFAULT_MAX_AGE);
        let body = outbound::read_limited(response, MAX_JWKS_BYTES).await?;
        Ok((Arc::new(parse_jwks(&body)?), max_age))
    }

    /// How long to wait before the next refresh after `result`: `max-age` (clamped between `min_refresh`
    /// and a day) after a success, sooner after a failure, soonest while nothing was ever loaded.
    pub fn next_refresh(&self, result: &Result<Duration, JwksError>) -> Duration {
        let wait = match result {
            Ok(max_age) => (*max_age).clamp(self.min_refresh, LONGEST_MAX_AGE.max(self.min_refresh)),
            Err(_) if !self.is_loaded() => RETRY_WHILE_EMPTY.min(self.min_refresh),
            Err(_) => self.min_refresh,
        };
        wait.max(Duration::from_millis(200))
    }

    /// Keeps the set fresh until the process ends, starting `first_wait` from now.
    pub fn spawn_refresher(self: Arc<Self>, first_wait: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut wait = first_wait;
            loop {
                tokio::time::sleep(wait).await;
                let result = self.refresh().await;
                wait = self.next_refresh(&result);
            }
        })
    }
}

/// `max-age` from a `Cache-Control` header value, if any.
fn max_age(header: &str) -> Option<Duration> {
    header
        .split(',')
        .find_map(|directive| {
            let (name, value) = directive.trim().split_once('=')?;
            name.trim().eq_ignore_ascii_case("max-age").then(|| value.trim().trim_matches('"').parse().ok())?
        })
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!("{}/tests/fixtures/{name}.jwk.json", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn jwks(keys: &[Value]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap()
    }

    #[test]
    fn parses_rsa_ec_and_ed25519_keys() {
        let set = parse_jwks(&jwks(&[fixture("rsa-a"), fixture("ec-p256"), fixture("ed25519")])).unwrap();
        assert_eq!(set.len(), 3);
        let Lookup::Found(ec) = set.find(Some("ec-p256")) else { panic!("ec key not found") };
        assert!(ec.accepts(Algorithm::ES256) && !ec.accepts(Algorithm::ES384) && !ec.accepts(Algorithm::RS256));
    }

    #[test]
    fn refuses_weak_rsa_keys_and_non_signing_keys() {
        assert!(matches!(parse_jwks(&jwks(&[fixture("rsa-weak")])), Err(JwksError::NoUsableKey)));
        let mut enc = fixture("rsa-a");
        enc["use"] = "enc".into();
        assert!(matches!(parse_jwks(&jwks(&[enc])), Err(JwksError::NoUsableKey)));
        let mut hmac = fixture("rsa-a");
        hmac["alg"] = "HS256".into();
        assert!(matches!(parse_jwks(&jwks(&[hmac])), Err(JwksError::NoUsableKey)));
        let oct = serde_json::json!({"kty": "oct", "k": "c2VjcmV0", "kid": "x"});
        assert!(matches!(parse_jwks(&jwks(&[oct])), Err(JwksError::NoUsableKey)));
    }

    #[test]
    fn a_declared_alg_restricts_the_key() {
        let mut rsa = fixture("rsa-a");
        rsa["alg"] = "PS256".into();
        let set = parse_jwks(&jwks(&[rsa])).unwrap();
        let Lookup::Found(key) = set.find(None) else { panic!() };
        assert!(key.accepts(Algorithm::PS256) && !key.accepts(Algorithm::RS256));
    }

    #[test]
    fn a_token_without_kid_needs_a_single_key_set() {
        let set = parse_jwks(&jwks(&[fixture("rsa-a"), fixture("rsa-b")])).unwrap();
        assert!(matches!(set.find(None), Lookup::Ambiguous));
        assert!(matches!(set.find(Some("nope")), Lookup::Unknown));
    }

    #[test]
    fn reads_max_age() {
        assert_eq!(max_age("public, max-age=600"), Some(Duration::from_secs(600)));
        assert_eq!(max_age("no-cache"), None);
        assert_eq!(max_age("max-age=abc"), None);
    }
}
