//! Every way the Trackunit-Identity JWT can be wrong answers 401 and stores nothing.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::helpers::*;

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

fn fresh_claims() -> Value {
    json!({ "iat": now(), "exp": now() + 300 })
}

/// Sends an INSTALLED with `identity` and asserts 401 `code`, nothing stored.
async fn refused(app: &TestApp, identity: Option<&str>, code: &str) {
    let response = app.callback(identity, &installed_body("acc-1", &credentials())).await;
    assert_problem(response, 401, code).await;
    assert_eq!(app.installation_count().await, 0, "nothing stored for {identity:?}");
}

#[tokio::test]
async fn a_missing_or_empty_identity_header_gets_401() {
    let app = spawn_app().await;
    refused(&app, None, "missing_identity").await;
    refused(&app, Some(""), "missing_identity").await;
}

#[tokio::test]
async fn garbage_tokens_get_401() {
    let app = spawn_app().await;
    for garbage in ["garbage", "a.b", "a.b.c", "....", "Bearer ", &"x".repeat(9000)] {
        refused(&app, Some(garbage), "invalid_identity").await;
    }
}

#[tokio::test]
async fn a_bad_signature_gets_401() {
    let app = spawn_app().await;
    // Signed by rsa-b but claiming to be rsa-a.
    let pem = fixture("rsa-b.pem");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-a".into());
    let forged = jsonwebtoken::encode(&header, &fresh_claims(), &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap();
    refused(&app, Some(&forged), "invalid_identity").await;

    // A valid token with its claims swapped.
    let good = identity();
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], b64(&json!({"iat": now(), "exp": now() + 99_999})), parts[2]);
    refused(&app, Some(&tampered), "invalid_identity").await;
}

#[tokio::test]
async fn an_unknown_kid_gets_401_once_a_jwks_fetched_after_the_request_lacks_it() {
    let app = spawn_app_with(Options { jwks_max_age: 3600, ..Options::default() }).await;
    let pem = fixture("rsa-a.pem");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("not-in-the-jwks".into());
    let token = jsonwebtoken::encode(&header, &fresh_claims(), &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap();
    // Past the tests' 1 s minimum refresh interval: the request's own refetch decides.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let fetches = app.jwks_fetches().await;
    refused(&app, Some(&token), "invalid_identity").await;
    assert_eq!(app.jwks_fetches().await, fetches + 1, "refused after a fetch that started after it arrived");
}

#[tokio::test]
async fn an_unknown_kid_right_after_a_fetch_gets_503_with_retry_after_and_then_the_new_key_is_accepted() {
    // Trackunit rotates its keys: a callback signed by a key published a moment after our last fetch must
    // be retried by the sender, not refused for good.
    let app = spawn_app_with(Options {
        jwks_max_age: 3600,
        vars: vec![("TOKENVAULT_TRACKUNIT_JWKS_MIN_REFRESH_SECS", "2".into())],
        ..Options::default()
    })
    .await;
    let pem = fixture("rsa-a.pem");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rotated-in".into());
    let token = jsonwebtoken::encode(&header, &fresh_claims(), &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap();
    let mut rotated = jwk("rsa-a");
    rotated["kid"] = "rotated-in".into();
    *app.jwks.lock().unwrap() = json!({ "keys": [jwk("rsa-a"), rotated] });
    let body = installed_body("acc-1", &credentials());

    // The start-up fetch was a moment ago: no refetch is allowed yet.
    let response = app.callback(Some(&token), &body).await;
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "the seconds until a refetch is allowed: {retry_after}");
    assert_problem(response, 503, "identity_keys_unavailable").await;
    assert_eq!(app.installation_count().await, 0);

    tokio::time::sleep(std::time::Duration::from_secs(retry_after)).await;
    assert_eq!(app.callback(Some(&token), &body).await.status(), 204, "the retry finds the new key");
    assert_eq!(app.installation_count().await, 1);
}

#[tokio::test]
async fn every_callback_that_queued_behind_the_refetch_that_loaded_a_new_key_is_accepted() {
    let app = spawn_app_with(Options { jwks_max_age: 3600, ..Options::default() }).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let mut rotated = jwk("rsa-b");
    rotated["kid"] = "rotated-b".into();
    *app.jwks.lock().unwrap() = json!({ "keys": [jwk("rsa-a"), rotated] });
    let pem = fixture("rsa-b.pem");
    let fetches = app.jwks_fetches().await;
    let sends = (0..10).map(|i| {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("rotated-b".into());
        let claims = json!({ "iat": now(), "exp": now() + 300, "jti": format!("queued-{i}") });
        let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap();
        let body = installed_body(&format!("acc-{i}"), &credentials());
        let app = &app;
        async move { app.callback(Some(&token), &body).await.status().as_u16() }
    });
    let statuses = futures_util::future::join_all(sends).await;
    assert_eq!(statuses, [204; 10], "every waiter verified against the freshest set");
    assert_eq!(app.installation_count().await, 10);
    assert_eq!(app.jwks_fetches().await, fetches + 1, "one fetch for all of them");
}

#[tokio::test]
async fn alg_none_gets_401() {
    let app = spawn_app().await;
    for alg in ["none", "None", "NONE"] {
        let token = format!("{}.{}.", b64(&json!({"alg": alg, "kid": "rsa-a"})), b64(&fresh_claims()));
        refused(&app, Some(&token), "invalid_identity").await;
    }
}

#[tokio::test]
async fn hs256_signed_with_the_public_key_gets_401() {
    let app = spawn_app().await;
    let public_pem = fixture("rsa-a.pub.pem");
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-a".into());
    let token = jsonwebtoken::encode(&header, &fresh_claims(), &EncodingKey::from_secret(&public_pem)).unwrap();
    refused(&app, Some(&token), "invalid_identity").await;
}

#[tokio::test]
async fn expired_and_not_yet_valid_tokens_get_401() {
    let app = spawn_app().await;
    let expired = sign("rsa-a", Algorithm::RS256, &json!({"iat": now() - 600, "exp": now() - 61}));
    refused(&app, Some(&expired), "invalid_identity").await;
    let future_nbf = sign("rsa-a", Algorithm::RS256, &json!({"exp": now() + 600, "nbf": now() + 120}));
    refused(&app, Some(&future_nbf), "invalid_identity").await;
    let future_iat = sign("rsa-a", Algorithm::RS256, &json!({"exp": now() + 600, "iat": now() + 120}));
    refused(&app, Some(&future_iat), "invalid_identity").await;
    let no_exp = sign("rsa-a", Algorithm::RS256, &json!({"iat": now()}));
    refused(&app, Some(&no_exp), "invalid_identity").await;
}

#[tokio::test]
async fn expiry_within_the_60_s_leeway_is_accepted() {
    let app = spawn_app().await;
    let token = sign("rsa-a", Algorithm::RS256, &json!({"exp": now() - 30}));
    let response = app.callback(Some(&token), &installed_body("acc-1", &credentials())).await;
    assert_eq!(response.status(), 204);
}

#[tokio::test]
async fn wrong_issuer_or_audience_gets_401_when_configured() {
    let app = spawn_app_with(Options {
        vars: vec![
            ("TOKENVAULT_TRACKUNIT_ISSUER", "https://iris.trackunit.com".into()),
            ("TOKENVAULT_TRACKUNIT_AUDIENCE", APP_ID.into()),
        ],
        ..Options::default()
    })
    .await;
    let claims = |iss: &str, aud: &str| json!({"exp": now() + 300, "iss": iss, "aud": aud});
    refused(&app, Some(&sign("rsa-a", Algorithm::RS256, &claims("https://evil.example", APP_ID))), "invalid_identity")
        .await;
    refused(
        &app,
        Some(&sign("rsa-a", Algorithm::RS256, &claims("https://iris.trackunit.com", "@other/app"))),
        "invalid_identity",
    )
    .await;
    refused(&app, Some(&sign("rsa-a", Algorithm::RS256, &fresh_claims())), "invalid_identity").await;

    let good = sign("rsa-a", Algorithm::RS256, &claims("https://iris.trackunit.com", APP_ID));
    assert_eq!(app.callback(Some(&good), &installed_body("acc-1", &credentials())).await.status(), 204);
}

#[tokio::test]
async fn a_token_of_another_type_gets_401_when_a_type_is_configured() {
    let app =
        spawn_app_with(Options { vars: vec![("TOKENVAULT_TRACKUNIT_TYPE", "JWT".into())], ..Options::default() }).await;
    let typed = |typ: Option<&str>| {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("rsa-a".into());
        header.typ = typ.map(str::to_owned);
        jsonwebtoken::encode(&header, &fresh_claims(), &EncodingKey::from_rsa_pem(&fixture("rsa-a.pem")).unwrap())
            .unwrap()
    };
    // Validly signed by Trackunit's key, but an access token (RFC 9068) or untyped: not an identity token.
    refused(&app, Some(&typed(Some("at+jwt"))), "invalid_identity").await;
    refused(&app, Some(&typed(None)), "invalid_identity").await;
    let response = app.callback(Some(&typed(Some("application/jwt"))), &installed_body("acc-1", &credentials())).await;
    assert_eq!(response.status(), 204, "the configured type, spelt as a full media type");
}

#[tokio::test]
async fn claims_naming_another_account_or_app_get_401() {
    let app = spawn_app().await;
    let other_account = sign("rsa-a", Algorithm::RS256, &json!({"exp": now() + 300, "accountId": "acc-2"}));
    refused(&app, Some(&other_account), "invalid_identity").await;
    let other_app = sign("rsa-a", Algorithm::RS256, &json!({"exp": now() + 300, "irisAppId": "@evil/app"}));
    refused(&app, Some(&other_app), "invalid_identity").await;

    let matching =
        sign("rsa-a", Algorithm::RS256, &json!({"exp": now() + 300, "accountId": "acc-1", "irisAppId": APP_ID}));
    assert_eq!(app.callback(Some(&matching), &installed_body("acc-1", &credentials())).await.status(), 204);
}

#[tokio::test]
async fn ec_and_eddsa_keys_from_the_jwks_are_accepted() {
    let app = spawn_app().await;
    for (key, alg, account) in [("ec-p256", Algorithm::ES256, "acc-ec"), ("ed25519", Algorithm::EdDSA, "acc-ed")] {
        let token = sign(key, alg, &fresh_claims());
        assert_eq!(app.callback(Some(&token), &installed_body(account, &credentials())).await.status(), 204, "{key}");
    }
}

#[tokio::test]
async fn a_key_removed_from_the_jwks_stops_working_after_the_refresh() {
    let app = spawn_app().await;
    let by_b = || sign("rsa-b", Algorithm::RS256, &fresh_claims());
    assert_eq!(app.callback(Some(&by_b()), &installed_body("acc-1", &credentials())).await.status(), 204);

    *app.jwks.lock().unwrap() = json!({ "keys": [jwk("rsa-a")] });
    // The fake JWKS says max-age=1 and the test minimum refresh interval is 1 s.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let before = app.snapshot().await;
    let response = app.callback_retrying(Some(&by_b()), &installed_body("acc-1", &credentials())).await;
    assert_problem(response, 401, "invalid_identity").await;
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn a_key_added_to_the_jwks_is_found_by_refetching_on_an_unknown_kid() {
    // A long max-age: only the unknown kid can make tokenvault fetch again.
    let app = spawn_app_with(Options { jwks_max_age: 3600, ..Options::default() }).await;
    // Past the 1 s minimum refresh interval of the tests.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let fetches = app.jwks_fetches().await;
    let token = sign("ec-p256", Algorithm::ES256, &fresh_claims());
    assert_eq!(app.callback(Some(&token), &installed_body("acc-1", &credentials())).await.status(), 204);
    assert_eq!(app.jwks_fetches().await, fetches, "a known kid causes no fetch");

    let pem = fixture("rsa-a.pem");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rotated-in".into());
    let token = jsonwebtoken::encode(&header, &fresh_claims(), &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap();
    let mut rotated = jwk("rsa-a");
    rotated["kid"] = "rotated-in".into();
    *app.jwks.lock().unwrap() = json!({ "keys": [jwk("rsa-a"), rotated] });
    assert_eq!(app.callback(Some(&token), &installed_body("acc-2", &credentials())).await.status(), 204);
    assert_eq!(app.jwks_fetches().await, fetches + 1, "the unknown kid caused exactly one fetch");
}

#[tokio::test]
async fn unknown_kids_refetch_the_jwks_at_most_once_per_min_refresh_interval() {
    let app = spawn_app_with(Options {
        jwks_max_age: 3600,
        vars: vec![("TOKENVAULT_TRACKUNIT_JWKS_MIN_REFRESH_SECS", "30".into())],
        ..Options::default()
    })
    .await;
    let fetches = app.jwks_fetches().await;
    for i in 0..10 {
        let pem = fixture("rsa-a.pem");
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(format!("unknown-{i}"));
        let token = jsonwebtoken::encode(&header, &fresh_claims(), &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap();
        let response = app.callback(Some(&token), &installed_body("acc-1", &credentials())).await;
        let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=30).contains(&retry_after), "until the next fetch is allowed: {retry_after}");
        assert_problem(response, 503, "identity_keys_unavailable").await;
    }
    assert_eq!(app.jwks_fetches().await, fetches, "the start-up fetch was under 30 s ago: no refetch");
    assert_eq!(app.installation_count().await, 0);
}

#[tokio::test]
async fn when_the_jwks_endpoint_fails_the_last_good_key_set_keeps_serving() {
    let app = spawn_app().await;
    *app.jwks.lock().unwrap() = json!({ "keys": "not a list" });
    let fetches = app.jwks_fetches().await;
    // The fake says max-age=1: the refreshes after this one all fail.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert!(app.jwks_fetches().await > fetches, "refreshes were attempted");
    assert_eq!(app.callback(Some(&identity()), &installed_body("acc-1", &credentials())).await.status(), 204);
    let ready = app.http.get(format!("{}/readyz", app.public)).send().await.unwrap();
    assert_eq!(ready.status(), 200, "still ready with the last good set");
}
