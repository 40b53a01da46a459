//! What every request gets: a request id (taken or made, echoed, in problem bodies), and readiness that
//! serves its listener's purpose.

use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn a_callers_request_id_is_echoed_and_named_in_problem_bodies_and_one_is_made_otherwise() {
    let app = spawn_app().await;
    let response = app
        .http
        .post(format!("{}/v1/tokens", app.internal))
        .header("x-request-id", "caller-id-42")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "caller-id-42");
    let problem = assert_problem(response, 401, "unauthenticated").await;
    assert_eq!(problem["instance"], "urn:tokenvault:request:caller-id-42");

    let traced = app
        .http
        .get(format!("{}/healthz", app.public))
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .send()
        .await
        .unwrap();
    assert_eq!(traced.headers()["x-request-id"], "4bf92f3577b34da6a3ce929d0e0e4736");

    let made = app.http.get(format!("{}/nowhere", app.public)).header("x-request-id", "not ok!").send().await.unwrap();
    let id = made.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 32, "an unacceptable id is replaced: {id}");
    let problem: Value = made.json().await.unwrap();
    assert_eq!(problem["instance"], format!("urn:tokenvault:request:{id}"));
}

#[tokio::test]
async fn with_the_database_down_the_internal_listener_stays_ready_while_it_holds_tokens_and_the_public_one_does_not() {
    let app = spawn_app_with(Options { proxy_database: true, ..Options::default() }).await;
    let ready = |base: String| {
        let http = app.http.clone();
        async move {
            let response = http.get(format!("{base}/readyz")).send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(ready(app.public.clone()).await.0, 200);
    let (status, body) = ready(app.internal.clone()).await;
    assert_eq!((status, body["tokens_in_memory"].as_u64()), (200, Some(0)));

    app.proxy.as_ref().unwrap().stop();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(ready(app.public.clone()).await.0, 503, "callbacks need the database");
    assert_eq!(ready(app.internal.clone()).await.0, 503, "nothing to serve from memory");
    app.proxy.as_ref().unwrap().restart().await;

    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    assert_eq!(app.token(&key, &json!({"account_id": "acc-1", "scopes": ["a"]})).await.status(), 200);
    app.proxy.as_ref().unwrap().stop();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (status, body) = ready(app.internal.clone()).await;
    assert_eq!((status, body["database"].as_bool(), body["tokens_in_memory"].as_u64()), (200, Some(false), Some(1)));
    assert_eq!(ready(app.public.clone()).await.0, 503);
    app.proxy.as_ref().unwrap().restart().await;
}
