//! Red-team cases: what an attacker on the internet (the callback) or a misbehaving internal service (the
//! token API) could try. Every refusal is checked three ways: the status, the problem `code`, and that
//! nothing moved (installations, audit events, cached tokens, upstream calls).

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

// ---------------------------------------------------------------------------------------------------
// Signing exactly the bytes we mean
// ---------------------------------------------------------------------------------------------------

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn encoding_key(key: &str, alg: Algorithm) -> EncodingKey {
    let pem = fixture(&format!("{key}.pem"));
    match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        _ => EncodingKey::from_rsa_pem(&pem),
    }
    .unwrap()
}

/// The base64url signature of `message` by the named fixture key.
fn signature(key: &str, alg: Algorithm, message: &[u8]) -> String {
    jsonwebtoken::crypto::sign(message, &encoding_key(key, alg), alg).unwrap()
}

/// A compact JWS over exactly these header and claim bytes: nothing is re-serialised, so duplicate keys
/// and odd number forms reach the service as written.
fn sign_bytes(key: &str, alg: Algorithm, header: &[u8], claims: &[u8]) -> String {
    let input = format!("{}.{}", b64(header), b64(claims));
    let signature = signature(key, alg, input.as_bytes());
    format!("{input}.{signature}")
}

fn sign_json(key: &str, alg: Algorithm, header: &Value, claims: &Value) -> String {
    sign_bytes(key, alg, &serde_json::to_vec(header).unwrap(), &serde_json::to_vec(claims).unwrap())
}

fn fresh_claims() -> Value {
    json!({ "iat": now(), "exp": now() + 300 })
}

/// What a refused request must leave exactly as it was.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint {
    installations: String,
    callback_events: i64,
    cached_tokens: i64,
    upstream_calls: usize,
}

async fn fingerprint(app: &TestApp) -> Fingerprint {
    let (callback_events, cached_tokens): (i64, i64) =
        sqlx::query_as("select (select count(*) from callback_event), (select count(*) from token_cache)")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    Fingerprint {
        installations: app.snapshot().await,
        callback_events,
        cached_tokens,
        upstream_calls: app.upstream.call_count(),
    }
}

/// Sends an INSTALLED for acc-1 authenticated by `token`; asserts 401 `invalid_identity` and that nothing
/// moved.
async fn identity_refused(app: &TestApp, token: &str, what: &str) {
    let before = fingerprint(app).await;
    // A token naming a kid the JWKS lacks is answered 503 until a refetch (rate-limited) confirms it.
    let response = app.callback_retrying(Some(token), &installed_body("acc-1", &credentials())).await;
    assert_eq!(response.status(), 401, "{what}");
    assert_problem(response, 401, "invalid_identity").await;
    assert_eq!(fingerprint(app).await, before, "{what}: nothing stored, no upstream call");
    assert_eq!(app.installation_count().await, 0, "{what}");
}

/// Sends `body` as a callback with a valid identity; asserts 400 `invalid_request` and that nothing moved.
async fn body_refused(app: &TestApp, body: Vec<u8>) {
    let what = String::from_utf8_lossy(&body).into_owned();
    let before = fingerprint(app).await;
    let response = app.callback_raw(Some(&identity()), "application/json", body).await;
    assert_eq!(response.status(), 400, "{what}");
    assert_problem(response, 400, "invalid_request").await;
    assert_eq!(fingerprint(app).await, before, "{what}");
    assert_eq!(app.installation_count().await, 0, "{what}");
}

/// How often the fake Trackunit served `path`.
async fn requests_to(app: &TestApp, wanted: &str) -> usize {
    let requests = app.trackunit.received_requests().await.unwrap_or_default();
    requests.iter().filter(|r| r.url.path() == wanted).count()
}

// ---------------------------------------------------------------------------------------------------
// The `kid` header
// ---------------------------------------------------------------------------------------------------

async fn kids_refused(kids: &[String]) {
    let app = spawn_app().await;
    for kid in kids {
        let token = sign_json("rsa-a", Algorithm::RS256, &json!({"alg": "RS256", "kid": kid}), &fresh_claims());
        let shown: String = kid.chars().take(40).collect();
        identity_refused(&app, &token, &format!("kid {shown:?}")).await;
    }
}

#[tokio::test]
async fn kid_holding_path_traversal_is_refused_and_stores_nothing() {
    kids_refused(&[
        "../../etc/passwd".into(),
        "../../../../../../dev/null".into(),
        "..\\..\\windows\\win.ini".into(),
        "file:///etc/passwd".into(),
        "/proc/self/environ".into(),
        "rsa-a/../rsa-a".into(),
    ])
    .await;
}

#[tokio::test]
async fn kid_holding_sql_is_refused_and_stores_nothing() {
    kids_refused(&[
        "' or 1=1 --".into(),
        "rsa-a' --".into(),
        "rsa-a'; drop table installation; --".into(),
        "\" or \"\"=\"".into(),
    ])
    .await;
}

#[tokio::test]
async fn a_10_kib_kid_or_one_over_256_characters_is_refused_and_stores_nothing() {
    // The 10 KiB one also takes the whole token over the 8 KiB limit; the 257-character one stays under it,
    // so the kid length check itself is exercised.
    kids_refused(&["k".repeat(10 * 1024), "k".repeat(257)]).await;
}

// ---------------------------------------------------------------------------------------------------
// Key-location headers: jku, x5u, jwk
// ---------------------------------------------------------------------------------------------------

/// rsa-b's public key renamed "attacker": a key the attacker holds the private half of.
fn attacker_jwk() -> Value {
    let mut key = jwk("rsa-b");
    key["kid"] = "attacker".into();
    key
}

/// Serves the attacker's key set at /attacker-jwks and its "certificate" at /attacker-cert.pem.
async fn mount_attacker_urls(app: &TestApp) -> (String, String) {
    Mock::given(method("GET"))
        .and(path("/attacker-jwks"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"keys": [attacker_jwk()]})))
        .mount(&app.trackunit)
        .await;
    Mock::given(method("GET"))
        .and(path("/attacker-cert.pem"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(fixture("rsa-b.pub.pem")))
        .mount(&app.trackunit)
        .await;
    (format!("{}/attacker-jwks", app.trackunit.uri()), format!("{}/attacker-cert.pem", app.trackunit.uri()))
}

async fn assert_attacker_urls_never_fetched(app: &TestApp) {
    // Anything fetched in the background after the answer would show up here too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(requests_to(app, "/attacker-jwks").await, 0, "jku fetched");
    assert_eq!(requests_to(app, "/attacker-cert.pem").await, 0, "x5u fetched");
}

#[tokio::test]
async fn a_jku_header_pointing_at_an_attacker_jwks_is_never_fetched_and_the_token_is_refused() {
    let app = spawn_app().await;
    let (jku, _) = mount_attacker_urls(&app).await;
    let token =
        sign_json("rsa-b", Algorithm::RS256, &json!({"alg": "RS256", "kid": "attacker", "jku": jku}), &fresh_claims());
    identity_refused(&app, &token, "jku").await;
    assert_attacker_urls_never_fetched(&app).await;
}

#[tokio::test]
async fn an_x5u_header_pointing_at_an_attacker_certificate_is_never_fetched_and_the_token_is_refused() {
    let app = spawn_app().await;
    let (_, x5u) = mount_attacker_urls(&app).await;
    let token =
        sign_json("rsa-b", Algorithm::RS256, &json!({"alg": "RS256", "kid": "attacker", "x5u": x5u}), &fresh_claims());
    identity_refused(&app, &token, "x5u").await;
    assert_attacker_urls_never_fetched(&app).await;
}

#[tokio::test]
async fn an_embedded_jwk_header_is_never_trusted_and_the_token_is_refused() {
    let app = spawn_app().await;
    let (jku, x5u) = mount_attacker_urls(&app).await;
    let with_kid = json!({"alg": "RS256", "kid": "attacker", "jwk": attacker_jwk()});
    let mut no_kid_jwk = attacker_jwk();
    no_kid_jwk.as_object_mut().unwrap().remove("kid");
    let without_kid = json!({"alg": "RS256", "jwk": no_kid_jwk});
    // The JWKS's own kid, but signed by the key embedded in the header (and pointed at by jku/x5u).
    let known_kid = json!({
        "alg": "RS256", "kid": "rsa-a", "jwk": attacker_jwk(), "jku": jku, "x5u": x5u,
    });
    for (what, header) in [
        ("jwk with an unknown kid", with_kid),
        ("jwk without a kid", without_kid),
        ("jwk under the JWKS's kid", known_kid),
    ] {
        let token = sign_json("rsa-b", Algorithm::RS256, &header, &fresh_claims());
        identity_refused(&app, &token, what).await;
    }
    assert_attacker_urls_never_fetched(&app).await;
}

#[tokio::test]
async fn a_valid_token_carrying_jku_x5u_and_jwk_headers_verifies_against_the_jwks_only() {
    let app = spawn_app().await;
    let (jku, x5u) = mount_attacker_urls(&app).await;
    // Signed by rsa-a under its own kid: were the embedded (rsa-b) jwk used, the signature would not verify.
    let token = sign_json(
        "rsa-a",
        Algorithm::RS256,
        &json!({"alg": "RS256", "kid": "rsa-a", "jku": jku, "x5u": x5u, "jwk": attacker_jwk()}),
        &fresh_claims(),
    );
    let response = app.callback(Some(&token), &installed_body("acc-1", &credentials())).await;
    assert_eq!(response.status(), 204);
    assert_eq!(app.installation_count().await, 1);
    assert_eq!(app.upstream.call_count(), 0);
    assert_attacker_urls_never_fetched(&app).await;
}

// ---------------------------------------------------------------------------------------------------
// JWS extensions and serialisations
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn crit_headers_are_refused_and_store_nothing() {
    let app = spawn_app().await;
    for crit in [json!(["exp"]), json!(["b64"])] {
        let token = sign_json(
            "rsa-a",
            Algorithm::RS256,
            &json!({"alg": "RS256", "kid": "rsa-a", "crit": crit}),
            &fresh_claims(),
        );
        identity_refused(&app, &token, &format!("crit {crit}")).await;
    }
}

#[tokio::test]
async fn an_unencoded_payload_b64_false_header_is_refused_and_stores_nothing() {
    let app = spawn_app().await;
    let claims = serde_json::to_string(&fresh_claims()).unwrap();
    for header in [
        json!({"alg": "RS256", "kid": "rsa-a", "b64": false}),
        json!({"alg": "RS256", "kid": "rsa-a", "b64": false, "crit": ["b64"]}),
    ] {
        let header_b64 = b64(serde_json::to_vec(&header).unwrap());
        // RFC 7797: the payload is signed and sent as is, not base64url-encoded.
        let raw_input = format!("{header_b64}.{claims}");
        let raw = format!("{raw_input}.{}", signature("rsa-a", Algorithm::RS256, raw_input.as_bytes()));
        identity_refused(&app, &raw, &format!("{header} with a raw payload")).await;
        // The same header over an ordinary base64url payload.
        let encoded = sign_bytes("rsa-a", Algorithm::RS256, &serde_json::to_vec(&header).unwrap(), claims.as_bytes());
        identity_refused(&app, &encoded, &format!("{header} with an encoded payload")).await;
    }
}

#[tokio::test]
async fn an_empty_payload_segment_is_refused_and_stores_nothing() {
    let app = spawn_app().await;
    let header = b64(br#"{"alg":"RS256","kid":"rsa-a"}"#);
    // A signature that really is over the empty payload.
    let signed_empty = format!("{header}..{}", signature("rsa-a", Algorithm::RS256, format!("{header}.").as_bytes()));
    identity_refused(&app, &signed_empty, "a signature over an empty payload").await;
    // A valid token's signature with its payload cut out.
    let good = identity();
    let parts: Vec<&str> = good.split('.').collect();
    identity_refused(&app, &format!("{}..{}", parts[0], parts[2]), "a valid token with its payload removed").await;
}

#[tokio::test]
async fn a_detached_payload_jws_is_refused_and_stores_nothing() {
    let app = spawn_app().await;
    let claims = serde_json::to_string(&fresh_claims()).unwrap();
    // RFC 7515 appendix F: signed over header.payload, sent as header..signature (payload elsewhere).
    let header = b64(br#"{"alg":"RS256","kid":"rsa-a"}"#);
    let input = format!("{header}.{}", b64(&claims));
    let detached = format!("{header}..{}", signature("rsa-a", Algorithm::RS256, input.as_bytes()));
    identity_refused(&app, &detached, "appendix F detached").await;
    // RFC 7797 detached and unencoded.
    let header = b64(br#"{"alg":"RS256","kid":"rsa-a","b64":false,"crit":["b64"]}"#);
    let input = format!("{header}.{claims}");
    let unencoded = format!("{header}..{}", signature("rsa-a", Algorithm::RS256, input.as_bytes()));
    identity_refused(&app, &unencoded, "RFC 7797 detached").await;
}

#[tokio::test]
async fn a_flattened_json_serialized_jws_is_refused_and_stores_nothing() {
    let app = spawn_app().await;
    let good = identity();
    let parts: Vec<&str> = good.split('.').collect();
    let flattened = json!({"payload": parts[1], "protected": parts[0], "signature": parts[2]});
    identity_refused(&app, &flattened.to_string(), "flattened JSON JWS").await;
}

#[tokio::test]
async fn a_general_json_serialized_jws_is_refused_and_stores_nothing() {
    let app = spawn_app().await;
    let good = identity();
    let parts: Vec<&str> = good.split('.').collect();
    let general = json!({
        "payload": parts[1],
        "signatures": [{"protected": parts[0], "signature": parts[2]}],
    });
    identity_refused(&app, &general.to_string(), "general JSON JWS").await;
}

#[tokio::test]
async fn a_jwe_shaped_token_is_refused_and_stores_nothing() {
    let app = spawn_app().await;
    let header = b64(br#"{"alg":"RSA-OAEP","enc":"A256GCM","kid":"rsa-a"}"#);
    let jwe = format!(
        "{header}.{}.{}.{}.{}",
        b64([7u8; 256]),
        b64([1u8; 12]),
        b64(serde_json::to_vec(&fresh_claims()).unwrap()),
        b64([9u8; 16]),
    );
    identity_refused(&app, &jwe, "five-segment JWE").await;
    // The JWE header squeezed into a signed three-segment token.
    let three = sign_bytes(
        "rsa-a",
        Algorithm::RS256,
        br#"{"alg":"RSA-OAEP","enc":"A256GCM","kid":"rsa-a"}"#,
        &serde_json::to_vec(&fresh_claims()).unwrap(),
    );
    identity_refused(&app, &three, "JWE header on a JWS").await;
}

// ---------------------------------------------------------------------------------------------------
// Duplicate JSON keys, signed over the exact bytes
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn duplicated_header_keys_are_refused_even_when_properly_signed() {
    let app = spawn_app().await;
    let claims = serde_json::to_vec(&fresh_claims()).unwrap();
    for header in [
        r#"{"alg":"RS256","kid":"rsa-a","kid":"ec-p256"}"#,
        r#"{"alg":"RS256","kid":"ec-p256","kid":"rsa-a"}"#,
        r#"{"alg":"ES256","alg":"RS256","kid":"rsa-a"}"#,
    ] {
        let token = sign_bytes("rsa-a", Algorithm::RS256, header.as_bytes(), &claims);
        identity_refused(&app, &token, header).await;
    }
}

#[tokio::test]
async fn duplicated_claim_keys_are_refused_even_when_properly_signed() {
    let app = spawn_app().await;
    let (past, future) = (now() - 3600, now() + 300);
    for claims in [
        format!(r#"{{"exp":{past},"exp":{future}}}"#),
        format!(r#"{{"exp":{future},"exp":{past}}}"#),
        format!(r#"{{"exp":{future},"accountId":"acc-other","accountId":"acc-1"}}"#),
    ] {
        let token = sign_bytes("rsa-a", Algorithm::RS256, br#"{"alg":"RS256","kid":"rsa-a"}"#, claims.as_bytes());
        identity_refused(&app, &token, &claims).await;
    }
}

// ---------------------------------------------------------------------------------------------------
// NumericDate claims of the wrong shape, each properly signed
// ---------------------------------------------------------------------------------------------------

async fn claims_refused(claim_texts: &[String]) {
    let app = spawn_app().await;
    for claims in claim_texts {
        let token = sign_bytes("rsa-a", Algorithm::RS256, br#"{"alg":"RS256","kid":"rsa-a"}"#, claims.as_bytes());
        identity_refused(&app, &token, claims).await;
    }
}

#[tokio::test]
async fn an_exp_given_as_a_string_is_refused_and_stores_nothing() {
    let exp = now() + 300;
    claims_refused(&[format!(r#"{{"iat":{},"exp":"{exp}"}}"#, now()), format!(r#"{{"exp":"{exp}"}}"#)]).await;
}

#[tokio::test]
async fn an_exp_given_as_a_float_is_refused_and_stores_nothing() {
    let exp = now() + 300;
    claims_refused(&[
        format!(r#"{{"iat":{},"exp":{exp}.5}}"#, now()),
        format!(r#"{{"exp":{exp}.0}}"#),
        format!(r#"{{"exp":{exp}e0}}"#),
    ])
    .await;
}

#[tokio::test]
async fn a_huge_exp_is_refused_and_stores_nothing() {
    claims_refused(&[
        r#"{"exp":1e300}"#.into(),
        r#"{"exp":18446744073709551615}"#.into(),
        r#"{"exp":9223372036854775807}"#.into(),
        r#"{"exp":253402300800}"#.into(),
        format!(r#"{{"exp":1{}}}"#, "0".repeat(400)),
    ])
    .await;
}

#[tokio::test]
async fn a_negative_exp_is_refused_and_stores_nothing() {
    claims_refused(&[r#"{"exp":-1}"#.into(), r#"{"exp":-9223372036854775808}"#.into(), r#"{"exp":-1e300}"#.into()])
        .await;
}

#[tokio::test]
async fn an_iat_given_as_a_string_is_refused_and_stores_nothing() {
    claims_refused(&[format!(r#"{{"iat":"{}","exp":{}}}"#, now(), now() + 300)]).await;
}

#[tokio::test]
async fn an_nbf_given_as_a_string_is_refused_and_stores_nothing() {
    claims_refused(&[format!(r#"{{"nbf":"{}","exp":{}}}"#, now() - 10, now() + 300)]).await;
}

// ---------------------------------------------------------------------------------------------------
// Weak keys and key/algorithm confusion
// ---------------------------------------------------------------------------------------------------

/// RSASSA-PKCS1-v1_5 with SHA-256 (RS256) done by hand, for the 1024-bit key that aws-lc refuses to sign
/// with. Deterministic, so [`hand_rs256_matches_the_library`] proves it against jsonwebtoken.
mod weak_rsa {
    use super::*;

    /// Reads one DER TLV at `*at`; returns (tag, contents) and advances past it.
    fn tlv<'a>(der: &'a [u8], at: &mut usize) -> (u8, &'a [u8]) {
        let tag = der[*at];
        let mut len = der[*at + 1] as usize;
        *at += 2;
        if len & 0x80 != 0 {
            let bytes = len & 0x7f;
            len = der[*at..*at + bytes].iter().fold(0, |acc, b| (acc << 8) | *b as usize);
            *at += bytes;
        }
        let contents = &der[*at..*at + len];
        *at += len;
        (tag, contents)
    }

    /// (n, d) of a PKCS#8 PEM RSA private key, big-endian.
    fn private_key(name: &str) -> (Vec<u8>, Vec<u8>) {
        let pem = String::from_utf8(fixture(&format!("{name}.pem"))).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = STANDARD.decode(body).unwrap();
        let (_, pkcs8) = tlv(&der, &mut 0);
        let mut at = 0;
        tlv(pkcs8, &mut at); // version
        tlv(pkcs8, &mut at); // algorithm identifier
        let (tag, octets) = tlv(pkcs8, &mut at);
        assert_eq!(tag, 0x04, "PKCS#8 private key octet string");
        let (_, rsa) = tlv(octets, &mut 0);
        let mut at = 0;
        tlv(rsa, &mut at); // version
        let (_, n) = tlv(rsa, &mut at);
        tlv(rsa, &mut at); // e
        let (_, d) = tlv(rsa, &mut at);
        (n.to_vec(), d.to_vec())
    }

    /// Big-endian bytes to `limbs` little-endian u64 limbs.
    fn limbs(bytes: &[u8], limbs: usize) -> Vec<u64> {
        let mut out = vec![0u64; limbs];
        for (i, byte) in bytes.iter().rev().enumerate() {
            if *byte != 0 {
                out[i / 8] |= u64::from(*byte) << (8 * (i % 8));
            }
        }
        out
    }

    fn at_least(a: &[u64], n: &[u64]) -> bool {
        for i in (0..n.len()).rev() {
            let ai = a[i];
            if ai != n[i] {
                return ai > n[i];
            }
        }
        true
    }

    fn subtract(a: &mut [u64], n: &[u64]) {
        let mut borrow = 0u64;
        for (i, limb) in a.iter_mut().enumerate() {
            let ni = n.get(i).copied().unwrap_or(0);
            let (d1, b1) = limb.overflowing_sub(ni);
            let (d2, b2) = d1.overflowing_sub(borrow);
            *limb = d2;
            borrow = u64::from(b1 || b2);
        }
    }

    /// Montgomery product a·b·R⁻¹ mod n (CIOS), for a, b < n and n odd.
    fn mont_mul(a: &[u64], b: &[u64], n: &[u64], n0: u64) -> Vec<u64> {
        let s = n.len();
        let mut t = vec![0u64; s + 2];
        for &bi in b {
            let mut carry = 0u128;
            for j in 0..s {
                let sum = u128::from(t[j]) + u128::from(a[j]) * u128::from(bi) + carry;
                t[j] = sum as u64;
                carry = sum >> 64;
            }
            let sum = u128::from(t[s]) + carry;
            t[s] = sum as u64;
            t[s + 1] = (sum >> 64) as u64;
            let m = t[0].wrapping_mul(n0);
            let mut carry = (u128::from(t[0]) + u128::from(m) * u128::from(n[0])) >> 64;
            for j in 1..s {
                let sum = u128::from(t[j]) + u128::from(m) * u128::from(n[j]) + carry;
                t[j - 1] = sum as u64;
                carry = sum >> 64;
            }
            let sum = u128::from(t[s]) + carry;
            t[s - 1] = sum as u64;
            t[s] = t[s + 1] + (sum >> 64) as u64;
            t[s + 1] = 0;
        }
        let mut r = t[..=s].to_vec();
        if r[s] != 0 || at_least(&r, n) {
            subtract(&mut r, n);
        }
        r.truncate(s);
        r
    }

    /// base^exp mod n.
    fn mod_pow(base: &[u64], exp: &[u8], n: &[u64]) -> Vec<u64> {
        let s = n.len();
        // -n⁻¹ mod 2⁶⁴ by Newton's iteration.
        let mut inverse = n[0];
        for _ in 0..6 {
            inverse = inverse.wrapping_mul(2u64.wrapping_sub(n[0].wrapping_mul(inverse)));
        }
        let n0 = inverse.wrapping_neg();
        // R² mod n by doubling 1 (2·64·s) times.
        let mut r2 = vec![0u64; s + 1];
        r2[0] = 1;
        for _ in 0..2 * 64 * s {
            let mut carry = 0;
            for limb in r2.iter_mut() {
                let next = *limb >> 63;
                *limb = (*limb << 1) | carry;
                carry = next;
            }
            if r2[s] != 0 || at_least(&r2, n) {
                subtract(&mut r2, n);
            }
        }
        r2.truncate(s);
        let mut one = vec![0u64; s];
        one[0] = 1;
        let base = mont_mul(base, &r2, n, n0);
        let mut acc = mont_mul(&one, &r2, n, n0);
        for byte in exp {
            for bit in (0..8).rev() {
                acc = mont_mul(&acc, &acc, n, n0);
                if (byte >> bit) & 1 == 1 {
                    acc = mont_mul(&acc, &base, n, n0);
                }
            }
        }
        mont_mul(&acc, &one, n, n0)
    }

    /// The base64url RS256 signature of `message` by the named fixture key.
    pub fn rs256(key: &str, message: &[u8]) -> String {
        let (n, d) = private_key(key);
        let n = &n[n.iter().position(|b| *b != 0).unwrap()..];
        let k = n.len();
        // EMSA-PKCS1-v1_5: 00 01 FF.. 00 DigestInfo(SHA-256) hash.
        let prefix = [
            0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04,
            0x20,
        ];
        let hash = sha2::Sha256::digest(message);
        let mut em = vec![0x00, 0x01];
        em.resize(k - prefix.len() - hash.len() - 1, 0xff);
        em.push(0x00);
        em.extend_from_slice(&prefix);
        em.extend_from_slice(&hash);
        let s = k.div_ceil(8);
        let signature = mod_pow(&limbs(&em, s), &d, &limbs(n, s));
        let mut bytes: Vec<u8> = signature.iter().flat_map(|l| l.to_le_bytes()).collect();
        bytes.truncate(k);
        bytes.reverse();
        b64(bytes)
    }
}

#[tokio::test]
async fn a_hand_built_token_with_nothing_wrong_is_accepted() {
    // The control for every refusal above: the hand-built signing input itself verifies.
    let app = spawn_app().await;
    let claims = format!(r#"{{"iat":{},"exp":{}}}"#, now(), now() + 300);
    let token = sign_bytes("rsa-a", Algorithm::RS256, br#"{"alg":"RS256","kid":"rsa-a"}"#, claims.as_bytes());
    let response = app.callback(Some(&token), &installed_body("acc-1", &credentials())).await;
    assert_eq!(response.status(), 204);
    assert_eq!(app.installation_count().await, 1);
}

#[test]
fn hand_rs256_matches_the_library() {
    let message = b"header.payload";
    assert_eq!(weak_rsa::rs256("rsa-a", message), signature("rsa-a", Algorithm::RS256, message));
}

fn weak_token() -> String {
    let input = format!(
        "{}.{}",
        b64(br#"{"alg":"RS256","kid":"rsa-weak"}"#),
        b64(serde_json::to_vec(&fresh_claims()).unwrap())
    );
    format!("{input}.{}", weak_rsa::rs256("rsa-weak", input.as_bytes()))
}

/// Serves `jwks` from now on and waits past the max-age=1 / 1 s minimum refresh for it to be fetched.
async fn serve_jwks(app: &TestApp, jwks: Value) {
    let fetches = app.jwks_fetches().await;
    *app.jwks.lock().unwrap() = jwks;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(app.jwks_fetches().await > fetches, "the JWKS was refetched");
}

#[tokio::test]
async fn a_jwks_holding_only_a_1024_bit_key_is_not_used_and_its_tokens_are_refused() {
    let app = spawn_app().await;
    serve_jwks(&app, json!({"keys": [jwk("rsa-weak")]})).await;
    identity_refused(&app, &weak_token(), "rsa-weak only").await;
}

#[tokio::test]
async fn a_1024_bit_key_next_to_a_strong_one_is_skipped_and_its_tokens_are_refused() {
    let app = spawn_app().await;
    serve_jwks(&app, json!({"keys": [jwk("rsa-weak"), jwk("rsa-a")]})).await;
    identity_refused(&app, &weak_token(), "rsa-weak beside rsa-a").await;
}

#[tokio::test]
async fn an_rs256_token_under_the_ec_keys_kid_is_refused() {
    let app = spawn_app().await;
    let token = sign_json("rsa-a", Algorithm::RS256, &json!({"alg": "RS256", "kid": "ec-p256"}), &fresh_claims());
    identity_refused(&app, &token, "RS256 under ec-p256").await;
}

#[tokio::test]
async fn an_es256_token_under_the_rsa_keys_kid_is_refused() {
    let app = spawn_app().await;
    for kid in ["rsa-a", "ed25519"] {
        let token = sign_json("ec-p256", Algorithm::ES256, &json!({"alg": "ES256", "kid": kid}), &fresh_claims());
        identity_refused(&app, &token, &format!("ES256 under {kid}")).await;
    }
}

#[tokio::test]
async fn a_ps256_token_under_the_rsa_kid_is_accepted() {
    let app = spawn_app().await;
    let token = sign_json("rsa-a", Algorithm::PS256, &json!({"alg": "PS256", "kid": "rsa-a"}), &fresh_claims());
    let response = app.callback(Some(&token), &installed_body("acc-1", &credentials())).await;
    assert_eq!(response.status(), 204);
    assert_eq!(app.installation_count().await, 1);
}

#[tokio::test]
async fn an_es384_token_under_the_p256_kid_is_refused() {
    let app = spawn_app().await;
    // aws-lc will not sign ES384 with a P-256 key, so the attacker labels a P-256 signature ES384.
    let header = b64(br#"{"alg":"ES384","kid":"ec-p256"}"#);
    let input = format!("{header}.{}", b64(serde_json::to_vec(&fresh_claims()).unwrap()));
    let token = format!("{input}.{}", signature("ec-p256", Algorithm::ES256, input.as_bytes()));
    identity_refused(&app, &token, "ES384 under ec-p256").await;
}

// ---------------------------------------------------------------------------------------------------
// Callback bodies
// ---------------------------------------------------------------------------------------------------

fn installed_with(field: &str, value: Value) -> Vec<u8> {
    let mut body = installed_body("acc-1", &credentials());
    body[field] = value;
    serde_json::to_vec(&body).unwrap()
}

#[tokio::test]
async fn a_client_secret_that_is_not_a_string_gets_400_and_stores_nothing() {
    let app = spawn_app().await;
    for secret in [json!(12345), json!({"value": "s"}), json!(["s"]), json!(null), json!(true)] {
        body_refused(&app, installed_with("clientSecret", secret)).await;
    }
}

#[tokio::test]
async fn control_characters_in_account_id_get_400_and_store_nothing() {
    let app = spawn_app().await;
    for account in ["acc\u{0001}1", "acc\u{001f}1", "acc\u{007f}1", "acc-1\u{0085}"] {
        // serde_json escapes \u0001 and \u001f and writes DEL and NEL raw: both spellings reach the service.
        body_refused(&app, installed_with("accountId", json!(account))).await;
    }
    for escaped in [r"acc\u00011", r"acc\u001f1", r"acc\u007f1"] {
        let body = format!(
            r#"{{"type":"INSTALLED","irisAppId":"{APP_ID}","accountId":"{escaped}","clientId":"a","clientSecret":"b"}}"#
        );
        body_refused(&app, body.into_bytes()).await;
    }
}

#[tokio::test]
async fn a_body_without_a_type_or_with_a_numeric_type_gets_400_and_stores_nothing() {
    let app = spawn_app().await;
    let mut missing = installed_body("acc-1", &credentials());
    missing.as_object_mut().unwrap().remove("type");
    body_refused(&app, serde_json::to_vec(&missing).unwrap()).await;
    for kind in [json!(1), json!(0), json!(null), json!(["INSTALLED"])] {
        body_refused(&app, installed_with("type", kind)).await;
    }
}

// ---------------------------------------------------------------------------------------------------
// Replay
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_same_signed_install_sent_five_times_at_once_stores_one_row_and_one_stored_event() {
    let app = spawn_app().await;
    let token = identity();
    let body = installed_body("acc-1", &credentials());
    let responses = futures_util::future::join_all((0..5).map(|_| app.callback(Some(&token), &body))).await;
    for response in responses {
        assert!(response.status().is_success(), "status {}", response.status());
    }
    assert_eq!(app.installation_count().await, 1);
    let outcomes: Vec<String> =
        sqlx::query_scalar("select outcome from callback_event order by outcome").fetch_all(&app.pool).await.unwrap();
    assert_eq!(outcomes, ["retried", "retried", "retried", "retried", "stored"], "one token, one message: retries");
    assert_eq!(app.upstream.call_count(), 0);
}

// ---------------------------------------------------------------------------------------------------
// Token API
// ---------------------------------------------------------------------------------------------------

async fn token_raw(app: &TestApp, key: Option<&str>, content_type: Option<&str>, body: Vec<u8>) -> reqwest::Response {
    let mut request = app.http.post(format!("{}/v1/tokens", app.internal)).body(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    request.send().await.unwrap()
}

/// An app with acc-1 installed and a key granted every account and scope.
async fn installed_app() -> (TestApp, String) {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    (app, key)
}

async fn token_refused(app: &TestApp, key: &str, body: &Value, status: u16, code: &str) {
    let before = fingerprint(app).await;
    let response = app.token(key, body).await;
    assert_eq!(response.status(), status, "{body}");
    assert_problem(response, status, code).await;
    assert_eq!(fingerprint(app).await, before, "{body}");
}

#[tokio::test]
async fn a_non_admin_key_can_neither_list_nor_revoke_installations() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let plain = app.client(&["*"], &["*"], false).await;
    let id: uuid::Uuid = sqlx::query_scalar("select id from installation").fetch_one(&app.pool).await.unwrap();
    let before = fingerprint(&app).await;
    let list = app.http.get(format!("{}/v1/installations", app.internal)).bearer_auth(&plain).send().await.unwrap();
    assert_problem(list, 403, "forbidden").await;
    // A real installation id: a non-admin key must not revoke it.
    let revoke =
        app.http.delete(format!("{}/v1/installations/{id}", app.internal)).bearer_auth(&plain).send().await.unwrap();
    assert_problem(revoke, 403, "forbidden").await;
    assert_eq!(fingerprint(&app).await, before);
    assert_eq!(app.status_of("acc-1").await, "active");
}

#[tokio::test]
async fn a_key_not_granted_an_account_gets_the_same_answer_whether_or_not_it_is_installed() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    app.install("acc-3").await;
    let uninstall = json!({"type": "UNINSTALLED", "irisAppId": APP_ID, "accountId": "acc-3"});
    assert_eq!(app.callback(Some(&identity()), &uninstall).await.status(), 204);
    let key = app.client(&["acc-2"], &["a"], false).await;
    let before = fingerprint(&app).await;

    let mut answers = Vec::new();
    for account in ["acc-1", "acc-3", "acc-never-installed"] {
        let response = app.token(&key, &json!({"account_id": account, "scopes": ["a"]})).await;
        let headers: Vec<(String, String)> = ["content-type", "cache-control", "www-authenticate"]
            .iter()
            .map(|h| {
                let value = response.headers().get(*h).map(|v| v.to_str().unwrap());
                (h.to_string(), value.unwrap_or_default().to_owned())
            })
            .collect();
        let mut body = assert_problem(response, 403, "forbidden").await;
        // Each answer names its own request; everything else must be the same.
        let instance = body.as_object_mut().unwrap().remove("instance").unwrap();
        assert!(instance.as_str().unwrap().starts_with("urn:tokenvault:request:"), "{instance}");
        answers.push((account, headers, body));
    }
    for (account, headers, body) in &answers[1..] {
        assert_eq!(
            (headers, body),
            (&answers[0].1, &answers[0].2),
            "{account} is answered like the installed acc-1: no tenant oracle"
        );
    }
    assert_eq!(fingerprint(&app).await, before);
}

#[tokio::test]
async fn a_scope_holding_a_comma_is_refused_with_400() {
    let (app, key) = installed_app().await;
    token_refused(&app, &key, &json!({"account_id": "acc-1", "scopes": ["a,b"]}), 400, "invalid_request").await;
}

#[tokio::test]
async fn scopes_holding_a_tab_a_nul_or_non_ascii_are_refused_with_400() {
    let (app, key) = installed_app().await;
    for scope in [
        "a\tb",
        "a\u{0000}b",
        "asset.vi\u{00e9}w",
        // Cyrillic "а": a homoglyph of an ASCII scope.
        "\u{0430}sset.view",
        "asset.view\u{200b}",
    ] {
        token_refused(&app, &key, &json!({"account_id": "acc-1", "scopes": [scope]}), 400, "invalid_request").await;
    }
}

#[tokio::test]
async fn min_ttl_seconds_as_a_string_or_in_exponent_form_is_refused_with_400() {
    let (app, key) = installed_app().await;
    token_refused(
        &app,
        &key,
        &json!({"account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": "60"}),
        400,
        "invalid_request",
    )
    .await;
    for raw in [
        r#"{"account_id":"acc-1","scopes":["a"],"min_ttl_seconds":1e3}"#,
        r#"{"account_id":"acc-1","scopes":["a"],"min_ttl_seconds":1E3}"#,
        r#"{"account_id":"acc-1","scopes":["a"],"min_ttl_seconds":60.0}"#,
    ] {
        let before = fingerprint(&app).await;
        let response = token_raw(&app, Some(&key), Some("application/json"), raw.as_bytes().to_vec()).await;
        assert_eq!(response.status(), 400, "{raw}");
        assert_problem(response, 400, "invalid_request").await;
        assert_eq!(fingerprint(&app).await, before, "{raw}");
    }
}

#[tokio::test]
async fn a_null_min_ttl_seconds_means_the_default_and_mints() {
    let (app, key) = installed_app().await;
    let before = app.snapshot().await;
    let response = app.token(&key, &json!({"account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": null})).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["access_token"], app.upstream.issued.lock().unwrap()[0].as_str());
    assert_eq!(app.upstream.call_count(), 1);
    assert_eq!(app.snapshot().await, before, "installations untouched");
}

#[tokio::test]
async fn a_token_request_body_of_64_kib_plus_one_byte_gets_413() {
    let (app, key) = installed_app().await;
    let mut big = br#"{"account_id":"acc-1","scopes":["a"]}"#.to_vec();
    big.resize(64 * 1024 + 1, b' ');
    let before = fingerprint(&app).await;
    let response = token_raw(&app, Some(&key), Some("application/json"), big.clone()).await;
    assert_problem(response, 413, "payload_too_large").await;

    // Chunked, with no Content-Length.
    let stream =
        futures_util::stream::iter(big.chunks(4096).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>());
    let response = app
        .http
        .post(format!("{}/v1/tokens", app.internal))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_problem(response, 413, "payload_too_large").await;
    assert_eq!(fingerprint(&app).await, before);
}

#[tokio::test]
async fn a_token_request_that_is_not_json_gets_415_with_a_key_and_401_without() {
    let (app, key) = installed_app().await;
    let body = br#"{"account_id":"acc-1","scopes":["a"]}"#.to_vec();
    let before = fingerprint(&app).await;
    for content_type in
        [Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("multipart/form-data; boundary=x"), None]
    {
        let response = token_raw(&app, Some(&key), content_type, body.clone()).await;
        assert_eq!(response.status(), 415, "{content_type:?}");
        assert_problem(response, 415, "unsupported_media_type").await;
        let response = token_raw(&app, None, content_type, body.clone()).await;
        assert_eq!(response.status(), 401, "{content_type:?} without a key");
        assert_problem(response, 401, "unauthenticated").await;
    }
    assert_eq!(fingerprint(&app).await, before);
}

// ---------------------------------------------------------------------------------------------------
// Slow and idle clients
// ---------------------------------------------------------------------------------------------------

fn socket_address(base: &str) -> &str {
    base.trim_start_matches("http://")
}

#[tokio::test]
async fn a_client_sending_its_headers_one_byte_every_500_ms_is_cut_off_within_8_s() {
    let app = spawn_app().await;
    let before = fingerprint(&app).await;
    let stream = TcpStream::connect(socket_address(&app.public)).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let request = format!(
        "POST /callbacks/trackunit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Trackunit-Identity: {}\r\nContent-Length: 2\r\n\r\n{{}}",
        identity()
    );
    let first_byte = Instant::now();
    let drip = tokio::spawn(async move {
        for byte in request.into_bytes() {
            if writer.write_all(&[byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        writer
    });

    let mut received = Vec::new();
    let mut buffer = [0u8; 1024];
    let ended = tokio::time::timeout_at((first_byte + Duration::from_secs(8)).into(), async {
        loop {
            match reader.read(&mut buffer).await {
                Ok(0) => return "closed",
                Err(_) => return "reset",
                Ok(n) => {
                    received.extend_from_slice(&buffer[..n]);
                    if received.starts_with(b"HTTP/1.1 408") {
                        return "408";
                    }
                }
            }
        }
    })
    .await;
    drip.abort();
    let elapsed = first_byte.elapsed();
    let ended = ended.unwrap_or_else(|_| {
        panic!(
            "the connection was still open {elapsed:?} after the first byte; received {:?}",
            String::from_utf8_lossy(&received)
        )
    });
    assert!(
        received.is_empty() || received.starts_with(b"HTTP/1.1 408"),
        "ended by {ended} with {:?}",
        String::from_utf8_lossy(&received)
    );
    assert!(elapsed < Duration::from_secs(8), "{elapsed:?}");
    assert_eq!(fingerprint(&app).await, before);
}

#[tokio::test]
async fn a_thousand_idle_connections_do_not_starve_health_or_token_requests() {
    let (app, key) = installed_app().await;
    let address = socket_address(&app.internal).to_owned();
    // Opened all at once: the server reaps a connection that sends nothing 5 s after accepting it, and the
    // requests below must be served while all 1000 are still held.
    let idle: Vec<TcpStream> = futures_util::future::join_all((0..1000).map(|_| TcpStream::connect(&address)))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    // Fresh clients: each request needs a new connection accepted past the idle ones.
    let fresh = || reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let started = Instant::now();
    let health = fresh().get(format!("{}/healthz", app.internal)).timeout(Duration::from_secs(5)).send().await.unwrap();
    let health_took = started.elapsed();
    assert_eq!(health.status(), 200);
    assert!(health_took < Duration::from_secs(2), "healthz took {health_took:?}");

    let before = app.snapshot().await;
    let started = Instant::now();
    let token = fresh()
        .post(format!("{}/v1/tokens", app.internal))
        .bearer_auth(&key)
        .json(&json!({"account_id": "acc-1", "scopes": ["a"]}))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    let token_took = started.elapsed();
    assert_eq!(token.status(), 200);
    assert!(token_took < Duration::from_secs(2), "token took {token_took:?}");
    assert_eq!(app.upstream.call_count(), 1);
    assert_eq!(app.snapshot().await, before);

    // The requests were served while every idle connection was still open (no EOF, no 408 yet).
    let mut buffer = [0u8; 64];
    let mut still_open = 0;
    for stream in &idle {
        if matches!(stream.try_read(&mut buffer), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            still_open += 1;
        }
    }
    assert_eq!(still_open, idle.len(), "idle connections already closed by the server at the check");
    drop(idle);
}
