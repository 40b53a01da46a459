//! Compact JWS parsing and claim checks. Pure functions: the key set and the clock are passed in.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use super::IdentityError;
use super::jwks::{KeySet, Lookup};
use crate::settings::IdentitySettings;

/// Longest identity token accepted, in bytes. Real ones are under 2 KiB.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
const MAX_KID_CHARS: usize = 256;
/// 9999-12-31T23:59:59Z: any later NumericDate is nonsense, and bounding it keeps arithmetic safe.
const LATEST_NUMERIC_DATE: i64 = 253_402_300_799;

/// What the claims must satisfy beyond the signature.
#[derive(Debug, Clone)]
pub struct Policy {
    pub algorithms: Vec<Algorithm>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The `typ` header required, when set.
    pub token_type: Option<String>,
    pub leeway_secs: i64,
    /// Longest lifetime accepted: `exp − iat`, or `exp − now` when there is no `iat`. Bounds how long a
    /// captured token stays usable.
    pub max_lifetime_secs: i64,
    /// Claims the token must carry (names from settings, never from the token).
    pub required_claims: Vec<String>,
}

impl Policy {
    pub fn from_settings(settings: &IdentitySettings) -> Self {
        Self {
            algorithms: settings.algorithms.clone(),
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            token_type: settings.token_type.clone(),
            leeway_secs: i64::try_from(settings.leeway.as_secs()).unwrap_or(i64::MAX / 2),
            max_lifetime_secs: i64::try_from(settings.max_token_lifetime.as_secs()).unwrap_or(i64::MAX / 2),
            required_claims: settings.required_claims.clone(),
        }
    }
}

/// What a verified token tells us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedIdentity {
    /// `iat`, in seconds since the epoch, when present.
    pub issued_at: Option<i64>,
    /// `exp`, in seconds since the epoch.
    pub expires_at: i64,
    /// `jti`, when present: what the replay memory knows the token by.
    pub jti: Option<String>,
    pub account_id: Option<String>,
    pub iris_app_id: Option<String>,
    /// The names (never the values) of the claims the token carries, sorted, at most [`MAX_CLAIM_NAMES`]
    /// of at most [`MAX_CLAIM_NAME_CHARS`] characters each: what operators need to decide which claims to
    /// require, since Trackunit documents none.
    pub claim_names: Vec<String>,
}

/// Most claim names recorded of one token.
pub const MAX_CLAIM_NAMES: usize = 32;
/// Longest claim name recorded, in characters; longer ones are cut.
pub const MAX_CLAIM_NAME_CHARS: usize = 64;
const MAX_JTI_CHARS: usize = 256;

impl VerifiedIdentity {
    /// If the token names an account or app, it must be the one the body names: a token signed for one
    /// install cannot authenticate another.
    pub fn check_subject(&self, app_id: Option<&str>, account_id: Option<&str>) -> Result<(), IdentityError> {
        if self.iris_app_id.as_deref().is_some_and(|claimed| Some(claimed) != app_id) {
            return Err(IdentityError::ClaimMismatch("irisAppId"));
        }
        if self.account_id.as_deref().is_some_and(|claimed| Some(claimed) != account_id) {
            return Err(IdentityError::ClaimMismatch("accountId"));
        }
        Ok(())
    }
}

/// Verifies a compact JWS against `keys` and `policy` at time `now` (seconds since the epoch).
pub fn verify_with(token: &str, keys: &KeySet, policy: &Policy, now: i64) -> Result<VerifiedIdentity, IdentityError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(IdentityError::Malformed("the token is too long"));
    }
    let segments: Vec<&str> = token.split('.').collect();
    let (header_b64, payload_b64, signature_b64) = match segments.as_slice() {
        [h, p, s] => (*h, *p, *s),
        [_, _, _, _, _] => return Err(IdentityError::Encrypted),
        _ => {
            return Err(IdentityError::Malformed("not a compact JWS of three segments"));
        }
    };
    let header = decode_object(header_b64, "the header is not base64url JSON without duplicate keys")?;
    let alg = check_header(&header, policy)?;
    if payload_b64.is_empty() {
        return Err(IdentityError::Malformed("the payload is empty (detached payloads are refused)"));
    }
    if signature_b64.is_empty() {
        return Err(IdentityError::BadSignature);
    }

    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) if !kid.is_empty() && kid.chars().count() <= MAX_KID_CHARS => Some(kid.as_str()),
        Some(_) => {
            return Err(IdentityError::Malformed("kid must be a short non-empty string"));
        }
    };
    let key = match keys.find(kid) {
        Lookup::Found(key) => key,
        Lookup::Unknown => return Err(IdentityError::UnknownKey),
        Lookup::Ambiguous => return Err(IdentityError::AmbiguousKey),
    };
    if !key.accepts(alg) {
        return Err(IdentityError::KeyAlgorithmMismatch);
    }
    let signing_input = &token[..header_b64.len() + 1 + payload_b64.len()];
    let verified = jsonwebtoken::crypto::verify(signature_b64, signing_input.as_bytes(), &key.key, alg)
        .map_err(|_| IdentityError::BadSignature)?;
    if !verified {
        return Err(IdentityError::BadSignature);
    }

    let claims = decode_object(payload_b64, "the claims are not base64url JSON without duplicate keys")?;
    check_claims(&claims, policy, now)
}

fn decode_object(segment: &str, what: &'static str) -> Result<Map<String, Value>, IdentityError> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).map_err(|_| IdentityError::Malformed(what))?;
    match crate::strict_json::from_slice(&bytes) {
        Ok(Value::Object(object)) => Ok(object),
        _ => Err(IdentityError::Malformed(what)),
    }
}

fn check_header(header: &Map<String, Value>, policy: &Policy) -> Result<Algorithm, IdentityError> {
    // RFC 7515 §4.1.11: a recipient must refuse `crit` extensions it does not understand, and we
    // understand none. `b64` (RFC 7797) changes what is signed; it is refused even without `crit`.
    if header.contains_key("crit") || header.contains_key("b64") {
        return Err(IdentityError::CriticalHeader);
    }
    if header.contains_key("enc") || header.contains_key("zip") {
        return Err(IdentityError::Encrypted);
    }
    // RFC 8725 §3.11: explicit typing keeps a JWT of another kind, signed by the same key, from passing
    // for an identity token. Trackunit documents no `typ`, so it is checked only when configured.
    if let Some(expected) = &policy.token_type
        && !header.get("typ").and_then(Value::as_str).is_some_and(|typ| same_media_type(typ, expected))
    {
        return Err(IdentityError::WrongType);
    }
    let alg = header.get("alg").and_then(Value::as_str).ok_or(IdentityError::Malformed("alg is missing"))?;
    if alg.eq_ignore_ascii_case("none") {
        return Err(IdentityError::AlgorithmNone);
    }
    // `get`, not slicing: an attacker-chosen `alg` such as "aé" has no character boundary at byte 2.
    if alg.get(..2).is_some_and(|prefix| prefix.eq_ignore_ascii_case("HS")) {
        return Err(IdentityError::SymmetricAlgorithm);
    }
    // `jku`, `x5u`, `jwk` and `x5c` are deliberately never read: keys come only from the configured JWKS.
    alg.parse::<Algorithm>()
        .ok()
        .filter(|alg| policy.algorithms.contains(alg))
        .ok_or(IdentityError::AlgorithmNotAllowed)
}

/// `typ` values name media types (RFC 7515 §4.1.9): compared without regard to case, with `application/`
/// understood when no `/` is given, so `JWT`, `jwt` and `application/jwt` are one type.
fn same_media_type(a: &str, b: &str) -> bool {
    let full = |t: &str| {
        if t.contains('/') { t.to_ascii_lowercase() } else { format!("application/{}", t.to_ascii_lowercase()) }
    };
    full(a) == full(b)
}

fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, IdentityError> {
    match claims.get(name) {
        None => Ok(None),
        Some(value) => value
            .as_i64()
            .filter(|t| (0..=LATEST_NUMERIC_DATE).contains(t))
            .map(Some)
            .ok_or(IdentityError::BadDate(name)),
    }
}

fn optional_string(claims: &Map<String, Value>, name: &'static str) -> Result<Option<String>, IdentityError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(IdentityError::ClaimMismatch(name)),
    }
}

fn check_claims(claims: &Map<String, Value>, policy: &Policy, now: i64) -> Result<VerifiedIdentity, IdentityError> {
    let leeway = policy.leeway_secs;
    let exp = numeric_date(claims, "exp")?.ok_or(IdentityError::MissingExpiry)?;
    if now > exp.saturating_add(leeway) {
        return Err(IdentityError::Expired);
    }
    if numeric_date(claims, "nbf")?.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
        return Err(IdentityError::NotYetValid);
    }
    let issued_at = numeric_date(claims, "iat")?;
    if issued_at.is_some_and(|iat| iat > now.saturating_add(leeway)) {
        return Err(IdentityError::IssuedInFuture);
    }
    if let Some(expected) = &policy.issuer
        && claims.get("iss").and_then(Value::as_str) != Some(expected.as_str())
    {
        return Err(IdentityError::WrongIssuer);
    }
    // A captured token is usable until it expires: refuse tokens that would stay usable for long.
    if exp.saturating_sub(issued_at.unwrap_or(now)) > policy.max_lifetime_secs {
        return Err(IdentityError::LifetimeTooLong);
    }
    if let Some(expected) = &policy.audience {
        let matches = match claims.get("aud") {
            Some(Value::String(aud)) => aud == expected,
            Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(expected.as_str())),
            _ => false,
        };
        if !matches {
            return Err(IdentityError::WrongAudience);
        }
    }
    if let Some(missing) = policy.required_claims.iter().find(|name| !claims.contains_key(name.as_str())) {
        return Err(IdentityError::MissingClaim(missing.clone()));
    }
    let jti = match claims.get("jti") {
        None => None,
        Some(Value::String(jti)) if !jti.is_empty() && jti.chars().count() <= MAX_JTI_CHARS => Some(jti.clone()),
        Some(_) => return Err(IdentityError::Malformed("jti must be a short non-empty string")),
    };
    Ok(VerifiedIdentity {
        issued_at,
        expires_at: exp,
        jti,
        account_id: optional_string(claims, "accountId")?,
        iris_app_id: optional_string(claims, "irisAppId")?,
        claim_names: claim_names(claims),
    })
}

/// The sorted names of `claims`, bounded in number and length (see [`VerifiedIdentity::claim_names`]).
fn claim_names(claims: &Map<String, Value>) -> Vec<String> {
    let mut names: Vec<String> =
        claims.keys().map(|name| name.chars().take(MAX_CLAIM_NAME_CHARS).collect::<String>()).collect();
    names.sort_unstable();
    names.dedup();
    names.truncate(MAX_CLAIM_NAMES);
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::parse_jwks;
    use crate::settings::ASYMMETRIC_ALGORITHMS;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const NOW: i64 = 1_800_000_000;

    fn fixture(name: &str, ext: &str) -> Vec<u8> {
        std::fs::read(format!("{}/tests/fixtures/{name}.{ext}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn keys() -> KeySet {
        let rsa: Value = serde_json::from_slice(&fixture("rsa-a", "jwk.json")).unwrap();
        let ec: Value = serde_json::from_slice(&fixture("ec-p256", "jwk.json")).unwrap();
        let ed: Value = serde_json::from_slice(&fixture("ed25519", "jwk.json")).unwrap();
        parse_jwks(&serde_json::to_vec(&json!({ "keys": [rsa, ec, ed] })).unwrap()).unwrap()
    }

    fn policy() -> Policy {
        Policy {
            algorithms: ASYMMETRIC_ALGORITHMS.to_vec(),
            issuer: None,
            audience: None,
            token_type: None,
            leeway_secs: 60,
            max_lifetime_secs: 3600,
            required_claims: Vec::new(),
        }
    }

    fn sign(alg: Algorithm, kid: &str, key: &str, claims: &Value) -> String {
        let pem = fixture(key, "pem");
        let encoding = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .unwrap();
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, claims, &encoding).unwrap()
    }

    fn fresh() -> Value {
        json!({ "exp": NOW + 300, "iat": NOW })
    }

    #[test]
    fn accepts_rsa_pss_ec_and_eddsa_signatures() {
        for (alg, kid, key) in [
            (Algorithm::RS256, "rsa-a", "rsa-a"),
            (Algorithm::PS512, "rsa-a", "rsa-a"),
            (Algorithm::ES256, "ec-p256", "ec-p256"),
            (Algorithm::EdDSA, "ed25519", "ed25519"),
        ] {
            let token = sign(alg, kid, key, &fresh());
            assert_eq!(verify_with(&token, &keys(), &policy(), NOW).unwrap().issued_at, Some(NOW), "{alg:?}");
        }
    }

    #[test]
    fn refuses_a_key_of_the_wrong_type_for_the_algorithm() {
        // An RSA signature presented under the EC key's kid.
        let token = sign(Algorithm::RS256, "ec-p256", "rsa-a", &fresh());
        assert_eq!(verify_with(&token, &keys(), &policy(), NOW), Err(IdentityError::KeyAlgorithmMismatch));
    }

    #[test]
    fn checks_dates_with_leeway() {
        let check =
            |claims: Value| verify_with(&sign(Algorithm::RS256, "rsa-a", "rsa-a", &claims), &keys(), &policy(), NOW);
        assert!(check(json!({ "exp": NOW - 30 })).is_ok(), "within leeway");
        assert_eq!(check(json!({ "exp": NOW - 61 })), Err(IdentityError::Expired));
        assert_eq!(check(json!({ "iat": NOW })), Err(IdentityError::MissingExpiry));
        assert_eq!(check(json!({ "exp": NOW + 300, "nbf": NOW + 120 })), Err(IdentityError::NotYetValid));
        assert_eq!(check(json!({ "exp": NOW + 300, "iat": NOW + 120 })), Err(IdentityError::IssuedInFuture));
        assert_eq!(check(json!({ "exp": (NOW + 300).to_string() })), Err(IdentityError::BadDate("exp")));
        assert_eq!(check(json!({ "exp": NOW as f64 + 300.5 })), Err(IdentityError::BadDate("exp")));
        assert_eq!(check(json!({ "exp": 1e300 })), Err(IdentityError::BadDate("exp")));
        assert_eq!(check(json!({ "exp": u64::MAX })), Err(IdentityError::BadDate("exp")));
    }

    #[test]
    fn checks_issuer_and_audience_when_configured() {
        let policy = Policy { issuer: Some("trackunit".into()), audience: Some("@org/app".into()), ..policy() };
        let check =
            |claims: Value| verify_with(&sign(Algorithm::RS256, "rsa-a", "rsa-a", &claims), &keys(), &policy, NOW);
        assert!(check(json!({ "exp": NOW + 60, "iss": "trackunit", "aud": ["x", "@org/app"] })).is_ok());
        assert_eq!(
            check(json!({ "exp": NOW + 60, "iss": "evil", "aud": "@org/app" })),
            Err(IdentityError::WrongIssuer)
        );
        assert_eq!(
            check(json!({ "exp": NOW + 60, "iss": "trackunit", "aud": "other" })),
            Err(IdentityError::WrongAudience)
        );
        assert_eq!(check(json!({ "exp": NOW + 60, "iss": "trackunit" })), Err(IdentityError::WrongAudience));
    }

    #[test]
    fn checks_the_type_when_configured_as_a_media_type() {
        let good = sign(Algorithm::RS256, "rsa-a", "rsa-a", &fresh());
        let parts: Vec<&str> = good.split('.').collect();
        // A changed header breaks the signature, but the type is checked first: a refusal for the type
        // shows as WrongType, anything else as BadSignature.
        let with_typ = |typ: Option<&str>| {
            let mut header = json!({"alg": "RS256", "kid": "rsa-a"});
            if let Some(typ) = typ {
                header["typ"] = json!(typ);
            }
            format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap()), parts[1], parts[2])
        };
        let expecting = |typ: &str| Policy { token_type: Some(typ.into()), ..policy() };
        for (expected, sent) in [("JWT", "JWT"), ("jwt", "JWT"), ("JWT", "application/jwt"), ("application/JWT", "jwt")]
        {
            let result = verify_with(&with_typ(Some(sent)), &keys(), &expecting(expected), NOW);
            assert_ne!(result, Err(IdentityError::WrongType), "{expected} against {sent}");
        }
        assert!(verify_with(&good, &keys(), &expecting("JWT"), NOW).is_ok(), "signed with typ JWT");
        for sent in [Some("at+jwt"), Some("application/at+jwt"), Some("JWS"), None] {
            assert_eq!(
                verify_with(&with_typ(sent), &keys(), &expecting("JWT"), NOW),
                Err(IdentityError::WrongType),
                "{sent:?}"
            );
        }
        assert!(
            verify_with(&with_typ(Some("anything")), &keys(), &policy(), NOW)
                .is_err_and(|e| e != IdentityError::WrongType)
        );
    }

    #[test]
    fn refuses_structural_attacks() {
        let good = sign(Algorithm::RS256, "rsa-a", "rsa-a", &fresh());
        let parts: Vec<&str> = good.split('.').collect();
        let header = |h: Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(&h).unwrap());
        let with_header = |h: Value| format!("{}.{}.{}", header(h), parts[1], parts[2]);
        let check = |t: &str| verify_with(t, &keys(), &policy(), NOW);

        assert_eq!(check(&with_header(json!({"alg": "none", "kid": "rsa-a"}))), Err(IdentityError::AlgorithmNone));
        assert_eq!(
            check(&with_header(json!({"alg": "HS256", "kid": "rsa-a"}))),
            Err(IdentityError::SymmetricAlgorithm)
        );
        assert_eq!(
            check(&with_header(json!({"alg": "RS256", "kid": "rsa-a", "crit": ["exp"]}))),
            Err(IdentityError::CriticalHeader)
        );
        assert_eq!(
            check(&with_header(json!({"alg": "RS256", "kid": 7}))),
            Err(IdentityError::Malformed("kid must be a short non-empty string"))
        );
        assert_eq!(
            check(&with_header(json!({"alg": "RS256", "kid": "../../etc/passwd"}))),
            Err(IdentityError::UnknownKey)
        );
        assert_eq!(
            check(&format!("{}..{}", parts[0], parts[2])).unwrap_err(),
            IdentityError::Malformed("the payload is empty (detached payloads are refused)")
        );
        assert_eq!(check("a.b.c.d.e"), Err(IdentityError::Encrypted));
        assert!(matches!(check("garbage"), Err(IdentityError::Malformed(_))));
        assert!(matches!(check(&format!("{}.{}.{}", parts[0], parts[1], "AAAA")), Err(IdentityError::BadSignature)));
        let dup = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","kid":"rsa-a","kid":"ec-p256"}"#);
        assert!(matches!(check(&format!("{dup}.{}.{}", parts[1], parts[2])), Err(IdentityError::Malformed(_))));
        // A header signed as-is but with the payload swapped fails the signature.
        let other = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&json!({"exp": NOW + 9999})).unwrap());
        assert_eq!(check(&format!("{}.{other}.{}", parts[0], parts[2])), Err(IdentityError::BadSignature));
    }

    #[test]
    fn refuses_tokens_that_live_longer_than_the_bound() {
        let check =
            |claims: Value| verify_with(&sign(Algorithm::RS256, "rsa-a", "rsa-a", &claims), &keys(), &policy(), NOW);
        assert!(check(json!({ "iat": NOW - 100, "exp": NOW + 3500 })).is_ok(), "exactly an hour");
        assert_eq!(check(json!({ "iat": NOW - 100, "exp": NOW + 3501 })), Err(IdentityError::LifetimeTooLong));
        assert_eq!(check(json!({ "iat": NOW - 86_400, "exp": NOW + 30 })), Err(IdentityError::LifetimeTooLong));
        assert!(check(json!({ "exp": NOW + 3600 })).is_ok(), "without iat, exp at most the bound ahead");
        assert_eq!(check(json!({ "exp": NOW + 3601 })), Err(IdentityError::LifetimeTooLong));
    }

    #[test]
    fn required_claims_must_be_present_and_names_are_recorded_without_values() {
        let policy = Policy { required_claims: vec!["irisAppId".into(), "accountId".into()], ..policy() };
        let check =
            |claims: Value| verify_with(&sign(Algorithm::RS256, "rsa-a", "rsa-a", &claims), &keys(), &policy, NOW);
        assert_eq!(
            check(json!({ "exp": NOW + 60, "irisAppId": "@o/a" })),
            Err(IdentityError::MissingClaim("accountId".into()))
        );
        let identity =
            check(json!({ "exp": NOW + 60, "irisAppId": "@o/a", "accountId": "acc", "jti": "j-1" })).unwrap();
        assert_eq!(identity.claim_names, ["accountId", "exp", "irisAppId", "jti"]);
        assert_eq!(identity.jti.as_deref(), Some("j-1"));
        assert_eq!(identity.expires_at, NOW + 60);
    }

    /// Hostile header and token texts found by review or fuzzing, replayed on every run (see
    /// `fuzz/corpus/identity/`): none may panic, none may verify.
    #[test]
    fn the_identity_fuzz_corpus_never_panics_or_verifies() {
        let (keys, _) = shared();
        let dir = format!("{}/fuzz/corpus/identity", env!("CARGO_MANIFEST_DIR"));
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let input = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            let input = input.trim_end_matches('\n');
            // A file holds either a whole token, or a JSON header to put in front of a valid payload.
            let token = if input.starts_with('{') {
                let (_, good) = shared();
                let rest = good.split_once('.').unwrap().1;
                format!("{}.{rest}", URL_SAFE_NO_PAD.encode(input.as_bytes()))
            } else {
                input.to_owned()
            };
            assert!(verify_with(&token, keys, &policy(), NOW).is_err(), "{input:?}");
            seen += 1;
        }
        assert!(seen >= 2, "the corpus is read");
    }

    /// The fixtures parsed once: the fuzz cases run thousands of times.
    fn shared() -> &'static (KeySet, String) {
        static SHARED: std::sync::OnceLock<(KeySet, String)> = std::sync::OnceLock::new();
        SHARED
            .get_or_init(|| (keys(), sign(Algorithm::RS256, "rsa-a", "rsa-a", &json!({"exp": NOW + 300, "iat": NOW}))))
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            prop_oneof![
                Just("RS256".to_owned()),
                Just("none".to_owned()),
                Just("rsa-a".to_owned()),
                "[ -~]{0,12}",
                // Any Unicode: byte-wise slicing of a multi-byte character once panicked.
                "\\PC{0,6}",
                "[hH][sS]\\PC{0,3}",
            ]
            .prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("alg"),
                        Just("kid"),
                        Just("exp"),
                        Just("crit"),
                        Just("jku"),
                        Just("iat"),
                        Just("x")
                    ]
                    .prop_map(str::to_owned),
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    use proptest::prelude::*;

    // The `fuzz_` properties run with PROPTEST_CASES (CI runs them with many cases for a bounded time);
    // failing inputs are kept in proptest-regressions/ and replayed first on every run.
    proptest! {
        /// Any byte changed, inserted or cut anywhere in a valid token: no panic, and if it still verifies
        /// (base64 has spare bits) it says exactly what the original said.
        #[test]
        fn fuzz_mutated_tokens_never_panic_or_verify_as_something_else(
            position in any::<usize>(), byte in any::<u8>(), operation in 0..3_u8,
        ) {
            let (keys, good) = shared();
            let mut bytes = good.clone().into_bytes();
            let at = position % bytes.len();
            match operation {
                0 => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                _ => bytes.truncate(at),
            }
            let mutated = String::from_utf8_lossy(&bytes);
            if let Ok(identity) = verify_with(&mutated, keys, &policy(), NOW) {
                prop_assert_eq!(identity, verify_with(good, keys, &policy(), NOW).unwrap());
            }
        }

        /// Arbitrary JSON as header and claims under a random signature: no panic, never accepted.
        #[test]
        fn fuzz_arbitrary_headers_and_claims_never_panic_or_verify(
            header in arb_json(), claims in arb_json(), signature in "[A-Za-z0-9_-]{0,400}",
        ) {
            let (keys, _) = shared();
            let encode = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
            let token = format!("{}.{}.{signature}", encode(&header), encode(&claims));
            prop_assert!(verify_with(&token, keys, &policy(), NOW).is_err());
        }

        /// A header of arbitrary Unicode text in `alg`, `kid` and `typ`: no panic, never accepted.
        #[test]
        fn fuzz_unicode_header_values_never_panic_or_verify(alg in "\\PC{0,8}", kid in "\\PC{0,8}", typ in "\\PC{0,8}") {
            let (keys, good) = shared();
            let header = json!({"alg": alg, "kid": kid, "typ": typ});
            let rest = good.split_once('.').unwrap().1;
            let token = format!("{}.{rest}", URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap()));
            let typed = Policy { token_type: Some("JWT".into()), ..policy() };
            prop_assert!(verify_with(&token, keys, &typed, NOW).is_err());
            // Without a type policy, only the genuine header may verify.
            if alg != "RS256" || kid != "rsa-a" {
                prop_assert!(verify_with(&token, keys, &policy(), NOW).is_err());
            }
        }

        /// Arbitrary text: no panic, never accepted.
        #[test]
        fn fuzz_arbitrary_text_never_panics_or_verifies(text in "[ -~]{0,600}") {
            let (keys, _) = shared();
            prop_assert!(verify_with(&text, keys, &policy(), NOW).is_err());
        }
    }

    #[test]
    fn claims_naming_another_install_do_not_match() {
        let identity = VerifiedIdentity {
            issued_at: None,
            expires_at: NOW,
            jti: None,
            account_id: Some("a1".into()),
            iris_app_id: None,
            claim_names: Vec::new(),
        };
        assert!(identity.check_subject(Some("@o/x"), Some("a1")).is_ok());
        assert_eq!(identity.check_subject(Some("@o/x"), Some("a2")), Err(IdentityError::ClaimMismatch("accountId")));
    }
}
