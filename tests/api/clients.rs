//! The admin API over service keys, and the audit trail.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

async fn admin_app() -> (TestApp, String) {
    let app = spawn_app().await;
    let admin = app.client(&[], &[], true).await;
    (app, admin)
}

fn url(app: &TestApp, path: &str) -> String {
    format!("{}{path}", app.internal)
}

async fn create(app: &TestApp, admin: &str, body: &Value) -> reqwest::Response {
    app.http.post(url(app, "/v1/clients")).bearer_auth(admin).json(body).send().await.unwrap()
}

fn ask() -> Value {
    json!({"account_id": "acc-1", "scopes": ["a"]})
}

#[tokio::test]
async fn a_client_is_created_listed_shown_and_revoked_and_its_name_can_be_used_again() {
    let (app, admin) = admin_app().await;
    app.install("acc-1").await;
    let response = create(&app, &admin, &json!({"name": "billing", "accounts": ["acc-1"], "scopes": ["a"]})).await;
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let created: Value = response.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("tvk_"));
    assert_eq!((created["status"].as_str(), created["providers"][0].as_str()), (Some("active"), Some("trackunit")));
    assert_eq!(app.token(&key, &ask()).await.status(), 200, "the new key works at once");

    let listed = app.http.get(url(&app, "/v1/clients")).bearer_auth(&admin).send().await.unwrap().text().await.unwrap();
    assert!(listed.contains("billing") && !listed.contains(&key) && !listed.contains("key_sha256"), "{listed}");
    let shown: Value =
        app.http.get(url(&app, "/v1/clients/billing")).bearer_auth(&admin).send().await.unwrap().json().await.unwrap();
    assert_eq!(shown["accounts"], json!(["acc-1"]));
    assert!(shown.get("key").is_none());

    let again = create(&app, &admin, &json!({"name": "billing", "accounts": ["*"], "scopes": ["*"]})).await;
    assert_problem(again, 409, "name_taken").await;
    let revoked = app.http.delete(url(&app, "/v1/clients/billing")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(revoked.status(), 204);
    let body = ask();
    let refused = eventually(|| app.token(&key, &body), |r| r.status() == 401).await;
    assert_problem(refused, 401, "unauthenticated").await;
    let gone = app.http.delete(url(&app, "/v1/clients/billing")).bearer_auth(&admin).send().await.unwrap();
    assert_problem(gone, 404, "not_found").await;
    let reused = create(&app, &admin, &json!({"name": "billing", "accounts": ["*"], "scopes": ["*"]})).await;
    assert_eq!(reused.status(), 201, "a revoked client's name can be used again");
}

#[tokio::test]
async fn client_routes_refuse_missing_and_non_admin_keys_and_bad_input() {
    let (app, admin) = admin_app().await;
    let plain = app.client(&["*"], &["*"], false).await;
    for (method, path) in [
        ("POST", "/v1/clients"),
        ("GET", "/v1/clients"),
        ("GET", "/v1/clients/x"),
        ("DELETE", "/v1/clients/x"),
        ("POST", "/v1/clients/x/rotate"),
        ("GET", "/v1/audit"),
    ] {
        let request = || app.http.request(method.parse().unwrap(), url(&app, path)).json(&json!({"name": "x"}));
        assert_problem(request().send().await.unwrap(), 401, "unauthenticated").await;
        assert_problem(request().bearer_auth(&plain).send().await.unwrap(), 403, "forbidden").await;
    }
    for bad in [
        json!({"accounts": ["*"], "scopes": ["*"]}),
        json!({"name": "n", "accounts": ["*"]}),
        json!({"name": "n", "accounts": ["*"], "scopes": ["a b"]}),
        json!({"name": "n", "accounts": ["*"], "scopes": ["*"], "providers": ["Bad"]}),
        json!({"name": "n", "accounts": ["*"], "scopes": ["*"], "expires_at": "2001-01-01T00:00:00Z"}),
        json!({"name": "n", "accounts": ["*"], "scopes": ["*"], "role": "owner"}),
        json!({"name": 5}),
    ] {
        assert_problem(create(&app, &admin, &bad).await, 400, "invalid_request").await;
    }
    let rotate = app.http.post(url(&app, "/v1/clients/nobody/rotate")).bearer_auth(&admin).send().await.unwrap();
    assert_problem(rotate, 404, "not_found").await;
    let audit = app.http.get(url(&app, "/v1/audit?limit=0")).bearer_auth(&admin).send().await.unwrap();
    assert_problem(audit, 400, "invalid_request").await;
    let unknown = app.http.get(url(&app, "/v1/audit?colour=red")).bearer_auth(&admin).send().await.unwrap();
    assert_problem(unknown, 400, "invalid_request").await;
}

#[tokio::test]
async fn a_rotated_key_keeps_working_for_its_grace_period_and_the_new_one_at_once() {
    let (app, admin) = admin_app().await;
    app.install("acc-1").await;
    let created: Value =
        create(&app, &admin, &json!({"name": "svc", "accounts": ["*"], "scopes": ["*"]})).await.json().await.unwrap();
    let old = created["key"].as_str().unwrap().to_owned();
    assert_eq!(app.token(&old, &ask()).await.status(), 200);

    let rotated = app
        .http
        .post(url(&app, "/v1/clients/svc/rotate"))
        .bearer_auth(&admin)
        .json(&json!({"grace_seconds": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(rotated.status(), 200);
    let rotated: Value = rotated.json().await.unwrap();
    let new = rotated["key"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert!(rotated["previous_key_expires_at"].is_string());
    assert_eq!(app.token(&new, &ask()).await.status(), 200, "the new key at once");
    assert_eq!(app.token(&old, &ask()).await.status(), 200, "the old key during the grace period");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_problem(app.token(&old, &ask()).await, 401, "unauthenticated").await;
    assert_eq!(app.token(&new, &ask()).await.status(), 200);
}

#[tokio::test]
async fn a_rotation_needs_no_body_as_the_document_says_and_keeps_the_old_key_a_day() {
    let (app, admin) = admin_app().await;
    create(&app, &admin, &json!({"name": "svc", "accounts": ["*"], "scopes": ["*"]})).await;
    let rotated = app.http.post(url(&app, "/v1/clients/svc/rotate")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(rotated.status(), 200);
    let rotated: Value = rotated.json().await.unwrap();
    let grace_end = chrono::DateTime::parse_from_rfc3339(rotated["previous_key_expires_at"].as_str().unwrap()).unwrap();
    let grace = grace_end.with_timezone(&chrono::Utc) - chrono::Utc::now();
    assert!((grace - chrono::Duration::hours(24)).num_seconds().abs() < 60, "the default grace is 24 h: {grace}");

    let document: Value = app.http.get(url(&app, "/openapi.json")).send().await.unwrap().json().await.unwrap();
    let body = &document["paths"]["/v1/clients/{name}/rotate"]["post"]["requestBody"];
    assert!(body.is_object() && body["required"] != json!(true), "the document marks the body optional: {body}");
}

#[tokio::test]
async fn a_keys_use_is_written_down_at_most_once_a_minute_whatever_the_replicas() {
    let app = spawn_app().await;
    app.client(&["*"], &["*"], false).await;
    let id: uuid::Uuid = sqlx::query_scalar("select id from api_client").fetch_one(&app.pool).await.unwrap();
    let last_used = || async {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
            "select last_used_at from api_client_usage where client_id = $1",
        )
        .bind(id)
        .fetch_optional(&app.pool)
        .await
        .unwrap()
    };
    assert_eq!(last_used().await, None, "never used");
    // Each replica writes the keys it saw used every minute; here, two replicas one after the other.
    tokenvault::store::api_client::record_usage(&app.pool, &[id]).await.unwrap();
    let first = last_used().await.expect("written down");
    tokenvault::store::api_client::record_usage(&app.pool, &[id]).await.unwrap();
    assert_eq!(last_used().await, Some(first), "within a minute of the last write, the row is left alone");
    sqlx::query("update api_client_usage set last_used_at = last_used_at - interval '61 seconds'")
        .execute(&app.pool)
        .await
        .unwrap();
    tokenvault::store::api_client::record_usage(&app.pool, &[id]).await.unwrap();
    assert!(last_used().await.unwrap() > first - chrono::Duration::seconds(61), "a minute on, it is written again");
}

#[tokio::test]
async fn a_key_change_whose_audit_entry_cannot_be_written_does_not_happen() {
    let (app, admin) = admin_app().await;
    let created: Value =
        create(&app, &admin, &json!({"name": "svc", "accounts": ["*"], "scopes": ["*"]})).await.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    app.install("acc-1").await;
    // From now on the audit trail refuses every entry.
    for statement in [
        "create function refuse_audit() returns trigger language plpgsql as $$ begin raise exception 'no'; end $$",
        "create trigger refuse_audit before insert on audit_event for each row execute function refuse_audit()",
    ] {
        sqlx::query(statement).execute(&app.pool).await.unwrap();
    }
    let revoked = app.http.delete(url(&app, "/v1/clients/svc")).bearer_auth(&admin).send().await.unwrap();
    let rotated = app.http.post(url(&app, "/v1/clients/svc/rotate")).bearer_auth(&admin).send().await.unwrap();
    let other = create(&app, &admin, &json!({"name": "other", "accounts": ["*"], "scopes": ["*"]})).await;
    for response in [revoked, rotated, other] {
        assert!(response.status().is_server_error(), "{}", response.status());
    }
    let shown: Value =
        app.http.get(url(&app, "/v1/clients/svc")).bearer_auth(&admin).send().await.unwrap().json().await.unwrap();
    assert_eq!((&shown["status"], &shown["previous_key_expires_at"]), (&json!("active"), &Value::Null), "{shown}");
    assert_eq!(app.token(&key, &ask()).await.status(), 200, "neither revoked nor rotated");
    let other = app.http.get(url(&app, "/v1/clients/other")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(other.status(), 404, "not created");
}

#[tokio::test]
async fn every_change_of_who_can_get_what_leaves_one_audit_entry_without_a_secret() {
    let config_toml = "[providers.acme]\ntoken_url = \"{trackunit}/apptoken\"\n".to_owned();
    let app = spawn_app_with(Options { config_toml, ..Options::default() }).await;
    let admin = app.client(&[], &[], true).await;
    let credentials_url = url(&app, "/v1/providers/acme/accounts/acc-2/credentials");
    let secrets: Vec<String> = (0..2).map(|_| credentials().client_secret).collect();
    for secret in &secrets {
        let body = json!({"client_id": "acme-client", "client_secret": secret});
        let put = app.http.put(&credentials_url).bearer_auth(&admin).json(&body).send().await.unwrap();
        assert!(put.status().is_success(), "{}", put.status());
    }
    assert_eq!(app.http.delete(&credentials_url).bearer_auth(&admin).send().await.unwrap().status(), 204);
    create(&app, &admin, &json!({"name": "svc", "accounts": ["*"], "scopes": ["*"]})).await;
    let rotate = app.http.post(url(&app, "/v1/clients/svc/rotate")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(rotate.status(), 200);
    assert_eq!(app.http.delete(url(&app, "/v1/clients/svc")).bearer_auth(&admin).send().await.unwrap().status(), 204);
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(1)).to_rfc3339();
    create(&app, &admin, &json!({"name": "temp", "accounts": ["*"], "scopes": ["*"], "expires_at": soon})).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // What every replica's minute task does; twice, as two replicas would: the expiry is audited once.
    let directory = tokenvault::directory::Directory::new(app.pool.clone());
    directory.audit_expired_keys().await.unwrap();
    directory.audit_expired_keys().await.unwrap();
    let ring = tokenvault::crypto::KeyRing::parse(&format!(
        "next:{},{}",
        tokenvault::crypto::generate_key(),
        app.encryption_keys
    ))
    .unwrap();
    tokenvault::rotation::rotate(&app.pool, &ring, 10, |_, _| {}).await.unwrap();

    let audit = app.http.get(url(&app, "/v1/audit?limit=100")).bearer_auth(&admin).send().await.unwrap();
    let audit: Value = audit.json().await.unwrap();
    let mut actions: Vec<(String, String)> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let target = e["client_name"].as_str().or(e["account_id"].as_str()).unwrap_or("-");
            (e["action"].as_str().unwrap().to_owned(), target.to_owned())
        })
        .collect();
    actions.reverse();
    let expected = [
        ("CREDENTIALS_REGISTERED", "acc-2"),
        ("CREDENTIALS_REPLACED", "acc-2"),
        ("CREDENTIALS_DELETED", "acc-2"),
        ("CLIENT_CREATED", "svc"),
        ("CLIENT_ROTATED", "svc"),
        ("CLIENT_REVOKED", "svc"),
        ("CLIENT_CREATED", "temp"),
        ("CLIENT_KEY_EXPIRED", "temp"),
        ("ENCRYPTION_KEYS_ROTATED", "-"),
    ]
    .map(|(action, target)| (action.to_owned(), target.to_owned()));
    assert_eq!(actions, expected, "oldest first here");
    let text = audit.to_string();
    assert!(secrets.iter().all(|secret| !text.contains(secret.as_str())), "no secret in the trail");
}

#[tokio::test]
async fn a_key_with_an_expiry_stops_working_then() {
    let (app, admin) = admin_app().await;
    app.install("acc-1").await;
    let expires_at = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    let created =
        create(&app, &admin, &json!({"name": "temp", "accounts": ["*"], "scopes": ["*"], "expires_at": expires_at}))
            .await;
    let key = created.json::<Value>().await.unwrap()["key"].as_str().unwrap().to_owned();
    assert_eq!(app.token(&key, &ask()).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_problem(app.token(&key, &ask()).await, 401, "unauthenticated").await;
    let shown: Value =
        app.http.get(url(&app, "/v1/clients/temp")).bearer_auth(&admin).send().await.unwrap().json().await.unwrap();
    assert_eq!(shown["status"], "expired");
}

#[tokio::test]
async fn the_audit_trail_names_actor_action_target_outcome_and_request_newest_first_in_pages() {
    let config_toml = "[providers.acme]\ntoken_url = \"{trackunit}/apptoken\"\n".to_owned();
    let app = spawn_app_with(Options { config_toml, ..Options::default() }).await;
    let admin_name = "ops";
    let admin = app.client_named(admin_name, &admin_grants()).await;
    app.install("acc-1").await;
    let credentials = credentials();
    let put = app
        .http
        .put(url(&app, "/v1/providers/acme/accounts/acc-2/credentials"))
        .bearer_auth(&admin)
        .header("x-request-id", "put-creds-1")
        .json(&json!({"client_id": credentials.client_id, "client_secret": credentials.client_secret}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    create(&app, &admin, &json!({"name": "svc", "accounts": ["*"], "scopes": ["*"]})).await;

    let page = |query: &str| {
        let (app, admin, query) = (&app, &admin, query.to_owned());
        async move {
            let response =
                app.http.get(url(app, &format!("/v1/audit{query}"))).bearer_auth(admin).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }
    };
    let all = page("").await;
    let actions: Vec<&str> = all["events"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["CLIENT_CREATED", "CREDENTIALS_REGISTERED", "INSTALLED"], "newest first");
    let registered = &all["events"][1];
    assert_eq!(registered["actor"], format!("client:{admin_name}"));
    assert_eq!((registered["provider"].as_str(), registered["account_id"].as_str()), (Some("acme"), Some("acc-2")));
    assert_eq!(registered["request_id"], "put-creds-1");
    assert_eq!(all["events"][2]["actor"], "callback");
    assert_eq!(all["events"][0]["client_name"], "svc");
    let text = all.to_string();
    assert!(!text.contains(&credentials.client_secret) && !text.contains(&credentials.client_id));

    let first = page("?limit=2").await;
    assert_eq!(first["events"].as_array().unwrap().len(), 2);
    let next = first["next"].as_i64().expect("a cursor while more remain");
    let second = page(&format!("?limit=2&before={next}")).await;
    assert_eq!(second["events"][0]["action"], "INSTALLED");
    assert!(second["next"].is_null(), "the last page");
    assert_eq!(page("?account_id=acc-1").await["events"].as_array().unwrap().len(), 1);
    assert_eq!(page("?provider=acme").await["events"][0]["action"], "CREDENTIALS_REGISTERED");
    assert_eq!(page("?action=CLIENT_CREATED").await["events"].as_array().unwrap().len(), 1);
    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339().replace('+', "%2B");
    assert_eq!(page(&format!("?since={future}")).await["events"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn audit_records_past_retention_are_pruned() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    sqlx::query("update audit_event set at = now() - interval '100 days'").execute(&app.pool).await.unwrap();
    app.install("acc-2").await;
    let mut conn = app.pool.acquire().await.unwrap();
    assert_eq!(tokenvault::store::audit::prune(&mut conn, 90).await.unwrap(), 1);
    let left: i64 = sqlx::query_scalar("select count(*) from audit_event").fetch_one(&app.pool).await.unwrap();
    assert_eq!(left, 1);
}
