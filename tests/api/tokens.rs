use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

fn request(account: &str, scopes: &[&str]) -> Value {
    json!({ "account_id": account, "scopes": scopes })
}

#[tokio::test]
async fn install_then_token_round_trip_mints_with_the_stored_credentials() {
    let app = spawn_app().await;
    let credentials = app.install("acc-1").await;
    let key = app.client(&["acc-1"], &["asset.view", "asset.edit"], false).await;

    let response = app
        .token(&key, &json!({"account_id": "acc-1", "scopes": ["asset.view", "asset.edit"], "app_id": APP_ID}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["access_token"], app.upstream.issued.lock().unwrap()[0].as_str());
    assert_eq!(body["token_type"], "Bearer");
    let expires_in = body["expires_in"].as_i64().unwrap();
    assert!((3590..=3600).contains(&expires_in), "{expires_in}");
    let expires_at = chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().unwrap()).unwrap();
    assert!((expires_at.timestamp() - now() - expires_in).abs() <= 1);
    assert_eq!(body["scope"], "asset.edit asset.view");

    let calls = app.upstream.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["grant_type"], "client_credentials");
    assert_eq!(calls[0]["client_id"], credentials.client_id);
    assert_eq!(calls[0]["client_secret"], credentials.client_secret);
    assert_eq!(calls[0]["scope"], "asset.edit asset.view");
}

#[tokio::test]
async fn a_second_request_is_served_from_the_cache_without_an_upstream_call() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let first: Value = app.token(&key, &request("acc-1", &["a", "b"])).await.json().await.unwrap();
    // Same scopes in another order and repeated: the same cache entry.
    let second: Value = app.token(&key, &request("acc-1", &["b", "a", "b"])).await.json().await.unwrap();
    assert_eq!(first["access_token"], second["access_token"]);
    assert_eq!(app.upstream.call_count(), 1);

    // Another scope set is another token.
    let third: Value = app.token(&key, &request("acc-1", &["a"])).await.json().await.unwrap();
    assert_ne!(first["access_token"], third["access_token"]);
    assert_eq!(app.upstream.call_count(), 2);
}

#[tokio::test]
async fn fifty_concurrent_requests_for_a_cold_key_make_exactly_one_upstream_call() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    *app.upstream.delay.lock().unwrap() = Duration::from_millis(200);
    let body = request("acc-1", &["asset.view"]);
    let requests = (0..50).map(|_| app.token(&key, &body));
    let responses = futures_util::future::join_all(requests).await;
    let mut tokens = std::collections::HashSet::new();
    for response in responses {
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        tokens.insert(body["access_token"].as_str().unwrap().to_owned());
    }
    assert_eq!(tokens.len(), 1, "everyone got the same token");
    assert_eq!(app.upstream.call_count(), 1);
}

#[tokio::test]
async fn a_token_is_minted_again_once_less_than_min_ttl_is_left() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::Mint { expires_in: 4 }]);
    let ask = json!({"account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": 1});
    assert_eq!(app.token(&key, &ask).await.status(), 200);
    assert_eq!(app.token(&key, &ask).await.status(), 200);
    assert_eq!(app.upstream.call_count(), 1, "4 s left covers 1 s");
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(app.token(&key, &ask).await.status(), 200);
    assert_eq!(app.upstream.call_count(), 2, "under 1 s left: minted again");
}

#[tokio::test]
async fn a_min_ttl_longer_than_tokens_live_does_not_mint_on_every_request() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::Mint { expires_in: 120 }]);
    let ask = json!({"account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": 86_400});
    for _ in 0..5 {
        assert_eq!(app.token(&key, &ask).await.status(), 200);
    }
    assert_eq!(app.upstream.call_count(), 1, "served while at least half its life is left");
}

#[tokio::test]
async fn a_short_lived_token_is_replaced_once_it_runs_out() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::Mint { expires_in: 2 }]);
    let ask = json!({"account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": 0});
    let first: Value = app.token(&key, &ask).await.json().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let second: Value = app.token(&key, &ask).await.json().await.unwrap();
    assert_ne!(first["access_token"], second["access_token"]);
    assert_eq!(app.upstream.call_count(), 2);
}

#[tokio::test]
async fn a_missing_or_wrong_service_key_gets_401() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let response =
        app.http.post(format!("{}/v1/tokens", app.internal)).json(&request("acc-1", &["a"])).send().await.unwrap();
    assert!(response.headers().contains_key("www-authenticate"));
    assert_problem(response, 401, "unauthenticated").await;
    let mut off_by_one = key.clone().into_bytes();
    let last = off_by_one.len() - 1;
    off_by_one[last] = if off_by_one[last] == b'A' { b'B' } else { b'A' };
    for wrong in [String::from_utf8(off_by_one).unwrap(), "tvk_nope".into(), key[4..].to_owned(), format!("{key}x")] {
        assert_problem(app.token(&wrong, &request("acc-1", &["a"])).await, 401, "unauthenticated").await;
    }
    // 401 comes before 400: an unauthenticated caller learns nothing about the body.
    let response = app
        .http
        .post(format!("{}/v1/tokens", app.internal))
        .bearer_auth("tvk_x")
        .body("nonsense")
        .send()
        .await
        .unwrap();
    assert_problem(response, 401, "unauthenticated").await;
    assert_eq!(app.upstream.call_count(), 0);
}

#[tokio::test]
async fn a_revoked_key_gets_401() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    assert_eq!(app.token(&key, &request("acc-1", &["a"])).await.status(), 200);
    // Revoked behind tokenvault's back (psql, another process): the row's NOTIFY reaches every replica.
    sqlx::query("update api_client set revoked_at = now()").execute(&app.pool).await.unwrap();
    let body = request("acc-1", &["a"]);
    let response = eventually(|| app.token(&key, &body), |r| r.status() == 401).await;
    assert_problem(response, 401, "unauthenticated").await;
}

#[tokio::test]
async fn a_key_without_the_account_or_a_scope_gets_403_whether_or_not_the_account_is_installed() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["acc-2"], &["asset.view"], false).await;
    assert_problem(app.token(&key, &request("acc-1", &["asset.view"])).await, 403, "forbidden").await;
    assert_problem(app.token(&key, &request("acc-9", &["asset.view"])).await, 403, "forbidden").await;
    let key = app.client(&["acc-1"], &["asset.view"], false).await;
    assert_problem(app.token(&key, &request("acc-1", &["asset.view", "asset.edit"])).await, 403, "forbidden").await;
    assert_eq!(app.upstream.call_count(), 0);
}

#[tokio::test]
async fn malformed_token_requests_get_400() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let many: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
    for body in [
        json!({"scopes": ["a"]}),
        json!({"account_id": "acc-1"}),
        json!({"account_id": "acc-1", "scopes": []}),
        json!({"account_id": "acc-1", "scopes": ["a b"]}),
        json!({"account_id": "acc-1", "scopes": ["a\nb"]}),
        json!({"account_id": "acc-1", "scopes": [1]}),
        json!({"account_id": "acc-1", "scopes": many}),
        json!({"account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": -1}),
        json!({"account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": 10_000_000}),
        json!({"account_id": "", "scopes": ["a"]}),
        json!(["acc-1"]),
    ] {
        assert_problem(app.token(&key, &body).await, 400, "invalid_request").await;
    }
    assert_eq!(app.upstream.call_count(), 0);
}

#[tokio::test]
async fn an_account_with_two_apps_needs_app_id_else_409() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let other = credentials();
    let mut body = installed_body("acc-1", &other);
    body["irisAppId"] = "@acme/second-app".into();
    assert_eq!(app.callback(Some(&identity()), &body).await.status(), 204);
    let key = app.client(&["*"], &["*"], false).await;
    assert_problem(app.token(&key, &request("acc-1", &["a"])).await, 409, "ambiguous_app").await;
    let response =
        app.token(&key, &json!({"account_id": "acc-1", "scopes": ["a"], "app_id": "@acme/second-app"})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(app.upstream.calls.lock().unwrap()[0]["client_secret"], other.client_secret);
}

#[tokio::test]
async fn an_account_never_installed_gets_404() {
    let app = spawn_app().await;
    let key = app.client(&["*"], &["*"], false).await;
    assert_problem(app.token(&key, &request("acc-404", &["a"])).await, 404, "not_installed").await;
}

#[tokio::test]
async fn upstream_500_then_200_is_retried_and_succeeds() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![
        Upstream::Fail { status: 500, body: json!({}) },
        Upstream::Fail { status: 503, body: json!({}) },
        Upstream::Mint { expires_in: 3600 },
    ]);
    assert_eq!(app.token(&key, &request("acc-1", &["a"])).await.status(), 200);
    assert_eq!(app.upstream.call_count(), 3);
}

#[tokio::test]
async fn upstream_429_is_retried() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::Fail { status: 429, body: json!({}) }, Upstream::Mint { expires_in: 3600 }]);
    assert_eq!(app.token(&key, &request("acc-1", &["a"])).await.status(), 200);
    assert_eq!(app.upstream.call_count(), 2);
}

#[tokio::test]
async fn upstream_5xx_three_times_gives_502_upstream_error() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::Fail { status: 502, body: json!({}) }]);
    assert_problem(app.token(&key, &request("acc-1", &["a"])).await, 502, "upstream_error").await;
    assert_eq!(app.upstream.call_count(), 3);
}

#[tokio::test]
async fn upstream_invalid_client_gives_502_and_marks_the_installation_rejected_until_a_new_install() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::Fail { status: 401, body: json!({"error": "invalid_client"}) }]);
    assert_problem(app.token(&key, &request("acc-1", &["a"])).await, 502, "upstream_rejected").await;
    assert_eq!(app.status_of("acc-1").await, "rejected");
    assert_eq!(app.upstream.call_count(), 1);

    assert_problem(app.token(&key, &request("acc-1", &["b"])).await, 502, "upstream_rejected").await;
    assert_eq!(app.upstream.call_count(), 1, "no upstream call is wasted on rejected credentials");

    app.upstream.set(vec![Upstream::Mint { expires_in: 3600 }]);
    app.install("acc-1").await;
    assert_eq!(app.status_of("acc-1").await, "active");
    assert_eq!(app.token(&key, &request("acc-1", &["a"])).await.status(), 200);
}

#[tokio::test]
async fn upstream_invalid_scope_gives_422_and_other_4xx_give_502() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::Fail { status: 400, body: json!({"error": "invalid_scope"}) }]);
    assert_problem(app.token(&key, &request("acc-1", &["a"])).await, 422, "invalid_scope").await;
    app.upstream.set(vec![Upstream::Fail { status: 403, body: json!({"error": "access_denied"}) }]);
    // Another scope set: the first backs off, answering its refusal without calling again.
    assert_problem(app.token(&key, &request("acc-1", &["b"])).await, 502, "upstream_rejected").await;
    assert_problem(app.token(&key, &request("acc-1", &["a"])).await, 422, "invalid_scope").await;
    assert_eq!(app.upstream.call_count(), 2, "a refused key backs off: its refusal is answered again");
    assert_eq!(app.status_of("acc-1").await, "active", "only invalid_client rejects the installation");
}

#[tokio::test]
async fn an_unreachable_upstream_gives_503_with_retry_after() {
    let app = spawn_app_with(Options {
        vars: vec![("TOKENVAULT_TRACKUNIT_TOKEN_URL", "http://127.0.0.1:9/apptoken".into())],
        ..Options::default()
    })
    .await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let response = app.token(&key, &request("acc-1", &["a"])).await;
    assert!(response.headers().contains_key("retry-after"));
    assert_problem(response, 503, "upstream_unavailable").await;
}

#[tokio::test]
async fn an_upstream_slower_than_the_timeout_gives_503() {
    let app =
        spawn_app_with(Options { vars: vec![("TOKENVAULT_UPSTREAM_TIMEOUT_SECS", "1".into())], ..Options::default() })
            .await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    *app.upstream.delay.lock().unwrap() = Duration::from_secs(3);
    assert_problem(app.token(&key, &request("acc-1", &["a"])).await, 503, "upstream_unavailable").await;
}

#[tokio::test]
async fn an_upstream_asking_for_a_long_wait_gives_503_passing_its_retry_after_on() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::FailWithRetryAfter { status: 503, retry_after_secs: 120 }]);
    let response = app.token(&key, &request("acc-1", &["a"])).await;
    assert_eq!(response.headers()["retry-after"], "120");
    assert_problem(response, 503, "upstream_unavailable").await;
    assert_eq!(app.upstream.call_count(), 1, "no retry inside the request when told to wait two minutes");
}

#[tokio::test]
async fn the_in_memory_token_cache_keeps_at_most_its_capacity() {
    // Ten keys on two replicas, one holding at most 2 tokens in memory and one the default. The shared
    // rows are then made unreadable, so a key no longer in a replica's memory costs a mint: the mints
    // count what each replica had let go of.
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let small = app.replica(&[("TOKENVAULT_TOKEN_CACHE_CAPACITY", "2")]).await.unwrap();
    let large = app.replica(&[]).await.unwrap();
    let scopes: Vec<String> = (0..10).map(|i| format!("scope.{i}")).collect();
    let ask_all = |url: String| {
        let (app, key, scopes) = (&app, &key, &scopes);
        async move {
            for scope in scopes {
                assert_eq!(app.token_at(&url, key, &request("acc-1", &[scope.as_str()])).await.status(), 200);
            }
        }
    };
    // Twice: the second asking is a memory hit, which the replica also remembers as a repeated request
    // (`routes::repeat`). Those hold their token weakly, so they must not keep it in memory either.
    for _ in 0..2 {
        ask_all(small.internal.clone()).await;
        ask_all(large.internal.clone()).await;
    }
    assert_eq!(app.upstream.call_count(), 10);
    sqlx::query("update token_cache set access_token_ciphertext = 'garbled'::bytea").execute(&app.pool).await.unwrap();
    // moka evicts in its housekeeping, which the next cache operation runs once 300 ms have passed. A
    // repeated request makes none (it reaches its entry through its lease), so a new key makes one first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for replica in [&small, &large] {
        assert_eq!(app.token_at(&replica.internal, &key, &request("acc-1", &["another.scope"])).await.status(), 200);
    }
    let before = app.upstream.call_count();

    ask_all(large.internal.clone()).await;
    assert_eq!(app.upstream.call_count(), before, "the default capacity keeps all ten in memory");
    ask_all(small.internal.clone()).await;
    let minted = app.upstream.call_count() - before;
    assert!(minted >= 8, "a replica with capacity 2 kept {} of 10 tokens in memory", 10 - minted);
}
