use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn an_install_is_stored_encrypted_and_acknowledged_with_204() {
    let app = spawn_app().await;
    let credentials = app.install("acc-1").await;

    let row: (String, String, Option<String>, Vec<u8>, Vec<u8>) = sqlx::query_as(
        "select app_id, status, key_id, client_id_ciphertext, client_secret_ciphertext from installation where account_id = 'acc-1'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((row.0.as_str(), row.1.as_str(), row.2.as_deref()), (APP_ID, "active", Some("test")));
    let sealed = [row.3, row.4].concat();
    for secret in [&credentials.client_id, &credentials.client_secret] {
        assert!(!String::from_utf8_lossy(&sealed).contains(secret.as_str()));
    }
}

#[tokio::test]
async fn a_replayed_install_is_idempotent_and_changes_nothing() {
    let app = spawn_app().await;
    let credentials = credentials();
    let token = identity();
    let body = installed_body("acc-1", &credentials);
    assert_eq!(app.callback(Some(&token), &body).await.status(), 204);
    let before = app.snapshot().await;
    assert_eq!(app.callback(Some(&token), &body).await.status(), 204);
    assert_eq!(app.snapshot().await, before, "the replay must not re-seal or bump the version");
}

#[tokio::test]
async fn an_older_install_arriving_late_never_rolls_credentials_back() {
    let app = spawn_app().await;
    let newer = credentials();
    let older = credentials();
    let response = app.callback(Some(&identity_issued(10)), &installed_body("acc-1", &newer)).await;
    assert_eq!(response.status(), 204);
    let before = app.snapshot().await;

    let response = app.callback(Some(&identity_issued(100)), &installed_body("acc-1", &older)).await;
    assert_eq!(response.status(), 204, "a stale install is acknowledged so it is not retried");
    assert_eq!(app.snapshot().await, before);
    let outcome: String = sqlx::query_scalar("select outcome from callback_event order by id desc limit 1")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(outcome, "stale");

    // The newer credentials are the ones minted with.
    let key = app.client(&["*"], &["*"], false).await;
    assert_eq!(app.token(&key, &json!({"account_id": "acc-1", "scopes": ["a"]})).await.status(), 200);
    assert_eq!(app.upstream.calls.lock().unwrap()[0]["client_secret"], newer.client_secret);
}

#[tokio::test]
async fn a_newer_install_replaces_credentials_and_drops_cached_tokens() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let request = json!({"account_id": "acc-1", "scopes": ["a"]});
    let first: serde_json::Value = app.token(&key, &request).await.json().await.unwrap();

    let replacement = app.install("acc-1").await;
    let cached: i64 = sqlx::query_scalar("select count(*) from token_cache").fetch_one(&app.pool).await.unwrap();
    assert_eq!(cached, 0, "tokens of the old credentials are dropped");
    let second: serde_json::Value = app.token(&key, &request).await.json().await.unwrap();
    assert_ne!(first["access_token"], second["access_token"]);
    assert_eq!(app.upstream.call_count(), 2);
    assert_eq!(app.upstream.calls.lock().unwrap()[1]["client_secret"], replacement.client_secret);
}

#[tokio::test]
async fn uninstalled_erases_the_secret_and_later_token_requests_get_404_without_upstream_calls() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let request = json!({"account_id": "acc-1", "scopes": ["a"]});
    assert_eq!(app.token(&key, &request).await.status(), 200);

    let body = json!({"type": "UNINSTALLED", "irisAppId": APP_ID, "accountId": "acc-1"});
    assert_eq!(app.callback(Some(&identity()), &body).await.status(), 204);

    let row: (String, Option<Vec<u8>>, Option<Vec<u8>>) = sqlx::query_as(
        "select status, client_id_ciphertext, client_secret_ciphertext from installation where account_id = 'acc-1'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(row, ("uninstalled".to_owned(), None, None));
    let cached: i64 = sqlx::query_scalar("select count(*) from token_cache").fetch_one(&app.pool).await.unwrap();
    assert_eq!(cached, 0);

    let calls = app.upstream.call_count();
    assert_problem(app.token(&key, &request).await, 404, "not_installed").await;
    assert_eq!(app.upstream.call_count(), calls, "no upstream call for an uninstalled account");
}

#[tokio::test]
async fn an_unknown_message_type_is_accepted_with_202_and_stores_nothing() {
    let app = spawn_app().await;
    let response = app.callback(Some(&identity()), &json!({"type": "APP_UPDATED", "irisAppId": APP_ID})).await;
    assert_eq!(response.status(), 202);
    assert_eq!(app.installation_count().await, 0);
}

#[tokio::test]
async fn an_app_outside_tokenvault_apps_gets_403_and_stores_nothing() {
    let app =
        spawn_app_with(Options { vars: vec![("TOKENVAULT_APPS", "@acme/other".into())], ..Options::default() }).await;
    let response = app.callback(Some(&identity()), &installed_body("acc-1", &credentials())).await;
    assert_problem(response, 403, "app_not_allowed").await;
    assert_eq!(app.installation_count().await, 0);
}

#[tokio::test]
async fn malformed_bodies_get_400_and_store_nothing() {
    let app = spawn_app().await;
    let cases: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"not json".to_vec(),
        b"\xff\xfe\xfd".to_vec(),
        br#"{"type":"INSTALLED","irisAppId":"@acme/fleet-insights","accountId":42,"clientId":"a","clientSecret":"b"}"#.to_vec(),
        br#"{"type":"INSTALLED","irisAppId":"@acme/fleet-insights","accountId":"a","clientId":"a"}"#.to_vec(),
        br#"{"type":"INSTALLED","irisAppId":"@acme/fleet-insights","accountId":"a","accountId":"b","clientId":"a","clientSecret":"b"}"#.to_vec(),
        br#"{"type":"INSTALLED","irisAppId":"@acme/fleet-insights","accountId":"a\u0000","clientId":"a","clientSecret":"b"}"#.to_vec(),
        format!(r#"{{"type":"INSTALLED","irisAppId":"@acme/fleet-insights","accountId":"{}","clientId":"a","clientSecret":"b"}}"#, "x".repeat(257)).into_bytes(),
        ("[".repeat(10_000) + &"]".repeat(10_000)).into_bytes(),
        br#"["INSTALLED"]"#.to_vec(),
    ];
    for body in cases {
        let response = app.callback_raw(Some(&identity()), "application/json", body.clone()).await;
        assert_problem(response, 400, "invalid_request").await;
    }
    assert_eq!(app.installation_count().await, 0);
}

#[tokio::test]
async fn oversized_bodies_get_413_with_or_without_a_length() {
    let app = spawn_app().await;
    let big = vec![b' '; 64 * 1024 + 1];
    let response = app.callback_raw(Some(&identity()), "application/json", big.clone()).await;
    assert_problem(response, 413, "payload_too_large").await;

    // Chunked, with no Content-Length.
    let stream =
        futures_util::stream::iter(big.chunks(4096).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>());
    let response = app
        .http
        .post(format!("{}/callbacks/trackunit", app.public))
        .header("content-type", "application/json")
        .header("Trackunit-Identity", identity())
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_problem(response, 413, "payload_too_large").await;
    assert_eq!(app.installation_count().await, 0);
}

#[tokio::test]
async fn a_body_that_is_not_json_by_content_type_gets_415() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&installed_body("acc-1", &credentials())).unwrap();
    for content_type in ["text/plain", "application/x-www-form-urlencoded", "application/jsonx"] {
        let response = app.callback_raw(Some(&identity()), content_type, body.clone()).await;
        assert_problem(response, 415, "unsupported_media_type").await;
    }
    let response = app.http.post(format!("{}/callbacks/trackunit", app.public)).body(body).send().await.unwrap();
    assert_problem(response, 415, "unsupported_media_type").await;
    assert_eq!(app.installation_count().await, 0);
}

#[tokio::test]
async fn with_no_jwks_ever_loaded_a_callback_gets_503_with_retry_after() {
    let app = spawn_app_with(Options { serve_jwks: false, ..Options::default() }).await;
    let response = app.callback(Some(&identity()), &installed_body("acc-1", &credentials())).await;
    assert!(response.headers().contains_key("retry-after"));
    assert_problem(response, 503, "identity_keys_unavailable").await;
    assert_eq!(app.installation_count().await, 0);
}

#[tokio::test]
async fn with_the_database_down_a_callback_gets_503_within_5_s_and_succeeds_once_it_is_back() {
    let app = spawn_app_with(Options { proxy_database: true, ..Options::default() }).await;
    let proxy = app.proxy.clone().unwrap();
    proxy.stop();

    let started = std::time::Instant::now();
    let response = app.callback(Some(&identity()), &installed_body("acc-1", &credentials())).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "answered in {:?}", started.elapsed());
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=5).contains(&retry_after));
    assert_problem(response, 503, "database_unavailable").await;
    assert_eq!(app.installation_count().await, 0);

    proxy.restart().await;
    app.install("acc-1").await;
    assert_eq!(app.installation_count().await, 1, "recovers without a restart");
}

#[tokio::test]
async fn the_bearer_prefix_on_the_identity_header_is_accepted() {
    let app = spawn_app().await;
    let response =
        app.callback(Some(&format!("Bearer {}", identity())), &installed_body("acc-1", &credentials())).await;
    assert_eq!(response.status(), 204);
}
