//! Repeated token requests are answered from what the first one found (src/routes/repeat.rs), on each
//! worker thread: these tests prove that nothing changed behind such an answer is ever served again.
//! Requests go out on new connections, so they reach every worker rather than the one a kept-alive
//! connection sticks to.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::*;

/// Sends the same request on `count` new connections; the statuses, in order.
async fn statuses_on_new_connections(app: &TestApp, key: &str, body: &Value, count: usize) -> Vec<u16> {
    let mut statuses = Vec::with_capacity(count);
    for _ in 0..count {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/tokens", app.internal))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    statuses
}

#[tokio::test]
async fn a_revoked_key_is_refused_on_every_worker_even_for_a_request_each_has_answered_before() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let body = json!({"account_id": "acc-1", "scopes": ["a"]});
    assert!(statuses_on_new_connections(&app, &key, &body, 12).await.iter().all(|&s| s == 200));

    sqlx::query("update api_client set revoked_at = now()").execute(&app.pool).await.unwrap();
    eventually(|| app.token(&key, &body), |r| r.status() == 401).await;
    let after = statuses_on_new_connections(&app, &key, &body, 12).await;
    assert!(after.iter().all(|&s| s == 401), "a worker served a revoked key: {after:?}");
    assert_eq!(app.upstream.call_count(), 1);
}

#[tokio::test]
async fn an_uninstalled_account_gets_404_on_every_worker_even_for_a_repeated_request() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let body = json!({"account_id": "acc-1", "scopes": ["a"]});
    assert!(statuses_on_new_connections(&app, &key, &body, 12).await.iter().all(|&s| s == 200));

    let uninstall = json!({"type": "UNINSTALLED", "irisAppId": APP_ID, "accountId": "acc-1"});
    assert_eq!(app.callback(Some(&identity()), &uninstall).await.status(), 204);
    let after = statuses_on_new_connections(&app, &key, &body, 12).await;
    assert!(after.iter().all(|&s| s == 404), "a worker served an uninstalled account: {after:?}");
}

#[tokio::test]
async fn the_same_body_under_another_key_is_judged_by_that_key() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let granted = app.client(&["acc-1"], &["a"], false).await;
    let other = app.client(&["acc-2"], &["a"], false).await;
    let body = json!({"account_id": "acc-1", "scopes": ["a"]});
    assert!(statuses_on_new_connections(&app, &granted, &body, 6).await.iter().all(|&s| s == 200));
    assert_problem(app.token(&other, &body).await, 403, "forbidden").await;
    let other_statuses = statuses_on_new_connections(&app, &other, &body, 6).await;
    assert!(other_statuses.iter().all(|&s| s == 403), "{other_statuses:?}");
}

#[tokio::test]
async fn a_token_refreshed_ahead_is_served_at_once_instead_of_the_repeated_one() {
    // 4 s tokens asked with min_ttl 0: refreshed ahead with 0.4 to 0.8 s left. From the moment the
    // refresh is stored, requests get the new token, although the old one is still valid.
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::Mint { expires_in: 4 }]);
    let body = json!({"account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": 0});
    let first = app.token(&key, &body).await.json::<Value>().await.unwrap()["access_token"].clone();

    let until = Instant::now() + Duration::from_millis(3900);
    let mut refreshed_at = None;
    while Instant::now() < until {
        let answer = app.token(&key, &body).await.json::<Value>().await.unwrap();
        let is_old = answer["access_token"] == first;
        match refreshed_at {
            None if app.upstream.call_count() >= 2 => refreshed_at = Some(Instant::now()),
            Some(at) if at.elapsed() > Duration::from_millis(200) => {
                assert!(!is_old, "the old token was still served {:?} after its refresh", at.elapsed())
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refreshed_at.is_some(), "the token was refreshed ahead of its expiry");
}
