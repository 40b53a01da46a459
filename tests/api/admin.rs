use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn admins_list_installations_without_secrets_or_client_ids() {
    let app = spawn_app().await;
    let credentials = app.install("acc-1").await;
    let admin = app.client(&[], &[], true).await;
    let response = app.http.get(format!("{}/v1/installations", app.internal)).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(!text.contains(&credentials.client_id) && !text.contains(&credentials.client_secret));
    let body: Value = serde_json::from_str(&text).unwrap();
    let rows = body["installations"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    let mut keys: Vec<&str> = rows[0].as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["account_id", "app_id", "created_at", "id", "provider", "status", "updated_at"]);
    assert_eq!(rows[0]["status"], "active");
}

#[tokio::test]
async fn admin_routes_refuse_non_admin_and_missing_keys() {
    let app = spawn_app_with(Options {
        config_toml: "[providers.acme]\ntoken_url = \"{trackunit}/apptoken\"\n".to_owned(),
        ..Options::default()
    })
    .await;
    app.install("acc-1").await;
    let id: uuid::Uuid = sqlx::query_scalar("select id from installation").fetch_one(&app.pool).await.unwrap();
    let plain = app.client(&["*"], &["*"], false).await;
    let credentials = "/v1/providers/acme/accounts/acc-1/credentials";
    let (installation, reactivate) = (format!("/v1/installations/{id}"), format!("/v1/installations/{id}/reactivate"));
    let routes = [
        ("GET", "/v1/installations"),
        ("DELETE", installation.as_str()),
        ("POST", reactivate.as_str()),
        ("GET", "/v1/providers"),
        ("PUT", credentials),
        ("DELETE", credentials),
    ];
    for (method, path) in routes {
        let request = || {
            let body = serde_json::json!({"client_id": "id", "client_secret": "secret"});
            app.http.request(method.parse().unwrap(), format!("{}{path}", app.internal)).json(&body)
        };
        assert_problem(request().send().await.unwrap(), 401, "unauthenticated").await;
        assert_problem(request().bearer_auth(&plain).send().await.unwrap(), 403, "forbidden").await;
    }
    // Refused before anything was done: the installation is untouched and nothing was registered.
    assert_eq!(app.status_of("acc-1").await, "active");
    let registered: i64 = sqlx::query_scalar("select count(*) from installation where provider = 'acme'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(registered, 0);
}

#[tokio::test]
async fn delete_revokes_erases_the_secret_and_later_token_requests_get_404() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let admin = app.client(&["*"], &["*"], true).await;
    let request = serde_json::json!({"account_id": "acc-1", "scopes": ["a"]});
    assert_eq!(app.token(&admin, &request).await.status(), 200);
    let id: uuid::Uuid = sqlx::query_scalar("select id from installation").fetch_one(&app.pool).await.unwrap();

    let response =
        app.http.delete(format!("{}/v1/installations/{id}", app.internal)).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(response.status(), 204);
    let row: (String, Option<Vec<u8>>, Option<Vec<u8>>) =
        sqlx::query_as("select status, client_id_ciphertext, client_secret_ciphertext from installation")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(row, ("revoked".to_owned(), None, None));
    let cached: i64 = sqlx::query_scalar("select count(*) from token_cache").fetch_one(&app.pool).await.unwrap();
    assert_eq!(cached, 0);
    assert_problem(app.token(&admin, &request).await, 404, "not_installed").await;
    assert_eq!(app.upstream.call_count(), 1);

    let missing = format!("{}/v1/installations/{}", app.internal, uuid::Uuid::new_v4());
    assert_problem(app.http.delete(&missing).bearer_auth(&admin).send().await.unwrap(), 404, "not_found").await;
    let garbage = format!("{}/v1/installations/not-a-uuid", app.internal);
    assert_problem(app.http.delete(&garbage).bearer_auth(&admin).send().await.unwrap(), 404, "not_found").await;
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_problem_json() {
    let app = spawn_app().await;
    assert_problem(app.http.get(format!("{}/nope", app.public)).send().await.unwrap(), 404, "not_found").await;
    assert_problem(
        app.http.get(format!("{}/callbacks/trackunit", app.public)).send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    assert_problem(
        app.http.get(format!("{}/v1/tokens", app.internal)).send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    // The token API is not on the public listener.
    assert_problem(app.http.post(format!("{}/v1/tokens", app.public)).send().await.unwrap(), 404, "not_found").await;
}

#[tokio::test]
async fn health_and_readiness_and_metrics_answer() {
    let app = spawn_app().await;
    // The internal readiness also says how many tokens the replica could serve without the database; the
    // public one does not tell the internet how busy the replica is.
    let expected = [
        (&app.public, serde_json::json!({"database": true, "jwks": true})),
        (&app.internal, serde_json::json!({"database": true, "jwks": true, "tokens_in_memory": 0})),
    ];
    for (base, expected) in expected {
        assert_eq!(app.http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);
        let ready: Value = app.http.get(format!("{base}/readyz")).send().await.unwrap().json().await.unwrap();
        assert_eq!(ready, expected, "{base}");
    }
    app.install("acc-1").await;
    let metrics = app.http.get(format!("{}/metrics", app.internal)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tokenvault_callbacks_total"), "{metrics}");
}

#[tokio::test]
async fn readiness_fails_without_a_jwks() {
    let app = spawn_app_with(Options { serve_jwks: false, ..Options::default() }).await;
    let response = app.http.get(format!("{}/readyz", app.public)).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["jwks"], false);
}

#[tokio::test]
async fn wrong_methods_on_health_and_metrics_answer_405_problem_json() {
    let app = spawn_app().await;
    for url in
        [format!("{}/healthz", app.public), format!("{}/readyz", app.internal), format!("{}/metrics", app.internal)]
    {
        assert_problem(app.http.post(&url).send().await.unwrap(), 405, "method_not_allowed").await;
    }
}

#[tokio::test]
async fn a_revocation_is_audited_and_a_replayed_earlier_install_cannot_undo_it() {
    let app = spawn_app().await;
    let credentials = credentials();
    let earlier = identity_issued(5);
    let body = installed_body("acc-1", &credentials);
    assert_eq!(app.callback(Some(&earlier), &body).await.status(), 204);
    let admin = app.client(&[], &[], true).await;
    let id: uuid::Uuid = sqlx::query_scalar("select id from installation").fetch_one(&app.pool).await.unwrap();
    let response =
        app.http.delete(format!("{}/v1/installations/{id}", app.internal)).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(response.status(), 204);
    let audit: (String, String) =
        sqlx::query_as("select event_type, outcome from callback_event order by id desc limit 1")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(audit, ("ADMIN_REVOKED".to_owned(), "revoked".to_owned()));

    // The very same signed callback, replayed: stale, the installation stays revoked.
    assert_eq!(app.callback(Some(&earlier), &body).await.status(), 204);
    assert_eq!(app.status_of("acc-1").await, "revoked");
    // A genuinely new install (issued after the revocation) brings it back.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    app.install("acc-1").await;
    assert_eq!(app.status_of("acc-1").await, "active");
}
