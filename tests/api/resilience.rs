//! The token path under faults: refresh ahead, a failing or slow upstream, a database that goes away.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::*;

async fn timed(app: &TestApp, key: &str, body: &Value) -> (u16, Duration, Value) {
    let started = Instant::now();
    let response = app.token(key, body).await;
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, started.elapsed(), body)
}

#[tokio::test]
async fn a_token_in_demand_is_refreshed_in_the_background_so_no_request_waits_for_the_upstream() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::Mint { expires_in: 4 }]);
    let body = json!({"account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": 1});
    let (status, _, first) = timed(&app, &key, &body).await;
    assert_eq!(status, 200);
    // From now on every mint takes 600 ms: a request that waited for one would show it.
    *app.upstream.delay.lock().unwrap() = Duration::from_millis(600);

    let mut tokens = std::collections::HashSet::new();
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        let (status, elapsed, body) = timed(&app, &key, &body).await;
        assert_eq!(status, 200);
        assert!(elapsed < Duration::from_millis(400), "a request waited {elapsed:?}");
        assert!(body["expires_in"].as_i64().unwrap() >= 1, "always at least min_ttl left: {body}");
        tokens.insert(body["access_token"].as_str().unwrap().to_owned());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(tokens.len() >= 2, "the token was replaced ahead of expiry");
    assert!(!tokens.contains(first["access_token"].as_str().unwrap()) || tokens.len() >= 2);
    let calls = app.upstream.call_count();
    assert!((2..=5).contains(&calls), "about one mint per 2-3 s of a 4 s token, not more: {calls}");
}

#[tokio::test]
async fn a_min_ttl_asked_once_renews_early_for_one_more_token_then_no_longer() {
    // 6 s tokens, asked for all the time with min_ttl 0, and once with 3 s (half the lifetime) at the
    // start. Refresh ahead renews a token once demand + margin (0.6 s) + jitter (0 to 0.6 s) is left:
    // - the first token, asked 3 s, at 1.8 to 2.4 s of age; the second, which inherits the 3 s, as early;
    // - the third, whose predecessor nobody asked more than 0, only at 4.8 to 5.4 s of age.
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::Mint { expires_in: 6 }]);
    let ask = |min_ttl: u64| json!({"account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": min_ttl});
    assert_eq!(timed(&app, &key, &ask(0)).await.0, 200);
    assert_eq!(timed(&app, &key, &ask(3)).await.0, 200);
    let first_mint = app.upstream.arrivals.lock().unwrap()[0];
    while first_mint.elapsed() < Duration::from_millis(7800) {
        assert_eq!(timed(&app, &key, &ask(0)).await.0, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ages: Vec<Duration> = {
        let arrivals = app.upstream.arrivals.lock().unwrap();
        arrivals.windows(2).map(|pair| pair[1] - pair[0]).collect()
    };
    assert!(ages.len() >= 2, "the first two tokens were renewed: {ages:?}");
    assert!(ages[0] < Duration::from_millis(3000), "the 3 s asked renews the first token early: {ages:?}");
    assert!(ages[1] < Duration::from_millis(3000), "and the second, which inherits it: {ages:?}");
    // The third token, minted by 4.8 s, is renewed only after 4.8 s of age: none by 7.8 s, where it would
    // have been by 7.2 s if the 3 s were still inherited.
    assert_eq!(ages.len(), 2, "the third token was renewed early, the demand did not fade: {ages:?}");
}

#[tokio::test]
async fn a_token_nobody_asks_for_is_not_refreshed() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::Mint { expires_in: 2 }]);
    assert_eq!(
        app.token(&key, &json!({"account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": 0})).await.status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(app.upstream.call_count(), 1);
}

#[tokio::test]
async fn with_the_upstream_down_a_still_valid_token_keeps_being_served_and_the_key_backs_off() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::Mint { expires_in: 6 }]);
    let relaxed = json!({"account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": 0});
    let (_, _, first) = timed(&app, &key, &relaxed).await;
    app.upstream.set(vec![Upstream::Fail { status: 503, body: json!({}) }]);

    // Asking for more life than is left (2.5 s left < min(4 s, half of 6 s)) forces a mint, which fails:
    // the valid token is served anyway.
    let demanding = json!({"account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": 4});
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (status, _, body) = timed(&app, &key, &demanding).await;
    assert_eq!(status, 200);
    assert_eq!(body["access_token"], first["access_token"]);
    let calls = app.upstream.call_count();
    assert_eq!(calls, 1 + 3, "one mint, then three failed attempts");

    // Backing off: the next request makes no upstream call and still gets the valid token.
    let (status, _, body) = timed(&app, &key, &demanding).await;
    assert_eq!((status, &body["access_token"]), (200, &first["access_token"]));
    assert_eq!(app.upstream.call_count(), calls);

    // Once no valid token is left, the failure shows: the backoff has passed, so the upstream is tried
    // again (three attempts) and its 5xx answers 502.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_problem(app.token(&key, &relaxed).await, 502, "upstream_error").await;
    // And straight after, inside the new backoff window: 503 with Retry-After, no upstream call.
    let calls = app.upstream.call_count();
    let response = app.token(&key, &relaxed).await;
    assert!(response.headers().contains_key("retry-after"));
    assert_problem(response, 503, "upstream_unavailable").await;
    assert_eq!(app.upstream.call_count(), calls);
}

#[tokio::test]
async fn a_failing_key_backs_off_instead_of_hammering_the_upstream() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::Fail { status: 500, body: json!({}) }]);
    let body = json!({"account_id": "acc-1", "scopes": ["a"]});
    assert_problem(app.token(&key, &body).await, 502, "upstream_error").await;
    assert_eq!(app.upstream.call_count(), 3);
    for _ in 0..10 {
        let response = app.token(&key, &body).await;
        assert!(response.headers().contains_key("retry-after"));
        assert_problem(response, 503, "upstream_unavailable").await;
    }
    assert_eq!(app.upstream.call_count(), 3, "no upstream call while backing off");
    // Another key of the same installation is not held back.
    app.upstream.set(vec![Upstream::Mint { expires_in: 3600 }]);
    assert_eq!(app.token(&key, &json!({"account_id": "acc-1", "scopes": ["b"]})).await.status(), 200);
}

#[tokio::test]
async fn a_slow_upstream_does_not_slow_requests_for_cached_tokens() {
    let app =
        spawn_app_with(Options { vars: vec![("TOKENVAULT_UPSTREAM_TIMEOUT_SECS", "10".into())], ..Options::default() })
            .await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let cached = json!({"account_id": "acc-1", "scopes": ["cached"]});
    assert_eq!(app.token(&key, &cached).await.status(), 200);

    *app.upstream.delay.lock().unwrap() = Duration::from_secs(5);
    let slow = {
        let (http, url, key) = (app.http.clone(), format!("{}/v1/tokens", app.internal), key.clone());
        tokio::spawn(async move {
            http.post(url).bearer_auth(key).json(&json!({"account_id": "acc-1", "scopes": ["cold"]})).send().await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..20 {
        let (status, elapsed, _) = timed(&app, &key, &cached).await;
        assert_eq!(status, 200);
        assert!(elapsed < Duration::from_millis(200), "a cached token took {elapsed:?}");
    }
    assert!(!slow.is_finished(), "the cold request is still waiting for the slow upstream");
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
}

#[tokio::test]
async fn with_the_database_down_cached_tokens_keep_being_served_and_callbacks_recover_after_it() {
    let app = spawn_app_with(Options { proxy_database: true, ..Options::default() }).await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let body = json!({"account_id": "acc-1", "scopes": ["a"]});
    let (_, _, before) = timed(&app, &key, &body).await;
    // The NOTIFYs of the install and the key creation may land after that first request warmed the
    // caches, and evict them: wait for them, then warm again.
    app.notifications_arrived().await;
    assert_eq!(timed(&app, &key, &body).await.0, 200);

    let proxy = app.proxy.clone().unwrap();
    proxy.stop();
    for _ in 0..20 {
        let (status, _, during) = timed(&app, &key, &body).await;
        assert_eq!(status, 200, "{during}");
        assert_eq!(during["access_token"], before["access_token"]);
    }
    // A scope not in memory needs the shared table: it is refused, and nothing is minted that could
    // not be stored for the other replicas.
    let cold = json!({"account_id": "acc-1", "scopes": ["b"]});
    assert_eq!(timed(&app, &key, &cold).await.0, 503);
    assert_eq!(app.upstream.call_count(), 1, "a mint while the shared table cannot be read");
    let response = app.callback(Some(&identity()), &installed_body("acc-2", &credentials())).await;
    assert_problem(response, 503, "database_unavailable").await;

    proxy.restart().await;
    app.install("acc-2").await;
    let (status, _, after) = timed(&app, &key, &body).await;
    assert_eq!((status, &after["access_token"]), (200, &before["access_token"]));
    assert_eq!(app.upstream.call_count(), 1);
}

#[tokio::test]
async fn refresh_ahead_also_works_for_short_tokens_at_the_default_min_ttl() {
    // 6 s tokens asked with the default min_ttl of 60 s: the demand is capped at half the lifetime,
    // and the refresh must still fetch a newer token rather than take the current one back.
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::Mint { expires_in: 6 }]);
    let body = json!({"account_id": "acc-1", "scopes": ["a"]});
    assert_eq!(timed(&app, &key, &body).await.0, 200);
    *app.upstream.delay.lock().unwrap() = Duration::from_millis(300);
    let until = Instant::now() + Duration::from_secs(8);
    let mut tokens = std::collections::HashSet::new();
    while Instant::now() < until {
        let (status, elapsed, body) = timed(&app, &key, &body).await;
        assert_eq!(status, 200);
        assert!(elapsed < Duration::from_millis(250), "a request waited {elapsed:?}");
        tokens.insert(body["access_token"].as_str().unwrap().to_owned());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(tokens.len() >= 3, "replaced ahead of time, more than once: {}", tokens.len());
}

#[tokio::test]
async fn a_retry_after_from_the_upstream_holds_the_key_back_that_long() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::FailWithRetryAfter { status: 429, retry_after_secs: 30 }]);
    let body = json!({"account_id": "acc-1", "scopes": ["a"]});
    assert_problem(app.token(&key, &body).await, 503, "upstream_unavailable").await;
    assert_eq!(app.upstream.call_count(), 1);
    // Well past the 1 s first backoff step, still inside the 30 s the upstream asked for.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let response = app.token(&key, &body).await;
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((20..=30).contains(&retry_after), "{retry_after}");
    assert_problem(response, 503, "upstream_unavailable").await;
    assert_eq!(app.upstream.call_count(), 1, "the upstream asked for 30 s and got them");
}

#[tokio::test]
async fn concurrent_mints_are_bounded_so_a_callback_still_finds_a_connection() {
    // The tests' pool has 6 connections: (6 - 1) / 2 = 2 mints at once, 1 for LISTEN, 3 for the rest.
    let app = spawn_app().await;
    let accounts: Vec<String> = (0..12).map(|i| format!("acc-{i}")).collect();
    for account in &accounts {
        app.install(account).await;
    }
    let key = app.client(&["*"], &["*"], false).await;
    let delay = Duration::from_millis(600);
    *app.upstream.delay.lock().unwrap() = delay;

    let started = Instant::now();
    let tokens = futures_util::future::join_all(accounts.iter().map(|account| {
        let body = json!({"account_id": account, "scopes": ["a"]});
        let (app, key) = (&app, &key);
        async move { app.token(key, &body).await.status().as_u16() }
    }));
    let callback = async {
        // While the mints hold their connections and wait on the upstream.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let sent = Instant::now();
        let status = app.callback(Some(&identity()), &installed_body("acc-new", &credentials())).await.status();
        (status.as_u16(), sent.elapsed())
    };
    let (statuses, (callback_status, callback_took)) = tokio::join!(tokens, callback);
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(callback_status, 204);
    assert!(callback_took < Duration::from_millis(500), "the callback waited {callback_took:?} for a connection");

    let arrivals = app.upstream.arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), accounts.len(), "one mint per key");
    for first in &arrivals {
        let at_once = arrivals.iter().filter(|&at| *at >= *first && at.duration_since(*first) < delay / 2).count();
        assert!(at_once <= 2, "{at_once} mints reached the upstream together; the bound is 2");
    }
    assert!(started.elapsed() >= delay * 6 - Duration::from_millis(50), "12 mints, 2 at a time: 6 rounds");
}

#[tokio::test]
async fn a_token_another_replica_stored_is_read_without_waiting_for_a_mint_permit() {
    // The tests' pool has 6 connections: 2 mint permits per replica.
    let app = spawn_app().await;
    for account in ["acc-0", "acc-1", "acc-2"] {
        app.install(account).await;
    }
    let key = app.client(&["*"], &["*"], false).await;
    let other = app.replica(&[]).await.unwrap();
    let ask = |internal: String, account: &'static str| {
        let (http, key) = (app.http.clone(), key.clone());
        async move {
            let body = json!({"account_id": account, "scopes": ["a"]});
            let sent = Instant::now();
            let response = http.post(format!("{internal}/v1/tokens")).bearer_auth(&key).json(&body).send().await;
            (response.unwrap().status().as_u16(), sent.elapsed())
        }
    };
    assert_eq!(ask(other.internal.clone(), "acc-0").await.0, 200, "the other replica mints and stores acc-0's token");

    // Both of this replica's permits held by slow mints of cold keys, then acc-0, which only needs a read.
    let delay = Duration::from_millis(800);
    *app.upstream.delay.lock().unwrap() = delay;
    let mints = futures_util::future::join(ask(app.internal.clone(), "acc-1"), ask(app.internal.clone(), "acc-2"));
    let read = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        ask(app.internal.clone(), "acc-0").await
    };
    let (((first, _), (second, _)), (read_status, read_took)) = tokio::join!(mints, read);
    assert_eq!((first, second, read_status), (200, 200, 200));
    assert!(read_took < delay / 2, "reading the shared table waited {read_took:?} behind the mints' permits");
    assert_eq!(app.upstream.call_count(), 3, "acc-0 was read, not minted again");
}
