//! Providers as configuration: the credentials admin API, provider grants, the order of checks, and the
//! example provider files. The token endpoint is the fake of helpers.rs (it records forms and fails on
//! demand); conformance with real authorization servers is in conformance.rs.

use serde_json::{Value, json};

use crate::helpers::*;

/// An app with a provider `acme` at the fake token endpoint, an admin key and a key granted every
/// provider, account and scope.
async fn app() -> (TestApp, String, String) {
    let config_toml = "[providers.acme]\ntoken_url = \"{trackunit}/apptoken\"\n".to_owned();
    let app = spawn_app_with(Options { config_toml, ..Options::default() }).await;
    let admin = app.client(&[], &[], true).await;
    let key = app.client(&["*"], &["*"], false).await;
    (app, admin, key)
}

fn body(credentials: &Credentials) -> Value {
    json!({"client_id": credentials.client_id, "client_secret": credentials.client_secret})
}

fn ask(account: &str) -> Value {
    json!({"provider": "acme", "account_id": account, "scopes": ["a"]})
}

#[tokio::test]
async fn credentials_are_registered_replaced_and_deleted_with_answers_that_hold_no_secret() {
    let (app, admin, key) = app().await;
    let first = credentials();
    let response = app.put_credentials(&admin, "acme", "acc-1", &body(&first)).await;
    assert_eq!(response.status(), 201);
    let answer: Value = response.json().await.unwrap();
    let mut members: Vec<&str> = answer.as_object().unwrap().keys().map(String::as_str).collect();
    members.sort();
    assert_eq!(members, ["account_id", "created_at", "provider", "status", "updated_at"]);
    assert_eq!(
        (answer["provider"].as_str(), answer["account_id"].as_str(), answer["status"].as_str()),
        (Some("acme"), Some("acc-1"), Some("active"))
    );

    assert_eq!(app.token(&key, &ask("acc-1")).await.status(), 200);
    let form = app.upstream.calls.lock().unwrap()[0].clone();
    assert_eq!(
        (form["client_id"].as_str(), form["client_secret"].as_str()),
        (first.client_id.as_str(), first.client_secret.as_str())
    );

    let second = credentials();
    assert_eq!(app.put_credentials(&admin, "acme", "acc-1", &body(&second)).await.status(), 200, "replaced");
    assert_eq!(app.token(&key, &ask("acc-1")).await.status(), 200);
    assert_eq!(app.upstream.calls.lock().unwrap()[1]["client_secret"], second.client_secret, "the new ones at once");

    let url = format!("{}/v1/providers/acme/accounts/acc-1/credentials", app.internal);
    assert_eq!(app.http.delete(&url).bearer_auth(&admin).send().await.unwrap().status(), 204);
    assert_problem(app.http.delete(&url).bearer_auth(&admin).send().await.unwrap(), 404, "not_found").await;
    assert_problem(app.token(&key, &ask("acc-1")).await, 404, "not_installed").await;
    assert_eq!(app.upstream.call_count(), 2, "no upstream call after the delete");
    let left: i64 = sqlx::query_scalar("select count(*) from installation where provider = 'acme'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "erased, with its cached tokens (by cascade)");
    let dump = app.dump().await;
    for secret in [&first.client_secret, &second.client_secret, &first.client_id, &second.client_id] {
        assert!(!dump.contains(secret.as_str()));
    }
}

#[tokio::test]
async fn bad_credential_requests_are_refused_precisely_and_store_nothing() {
    let (app, admin, key) = app().await;
    let good = body(&credentials());
    let url = |provider: &str| format!("{}/v1/providers/{provider}/accounts/acc-1/credentials", app.internal);
    assert_problem(app.http.put(url("acme")).json(&good).send().await.unwrap(), 401, "unauthenticated").await;
    assert_problem(app.put_credentials(&key, "acme", "acc-1", &good).await, 403, "forbidden").await;
    assert_problem(app.put_credentials(&admin, "nope", "acc-1", &good).await, 404, "unknown_provider").await;
    assert_problem(app.put_credentials(&admin, "trackunit", "acc-1", &good).await, 409, "credentials_from_callback")
        .await;
    let big = "x".repeat(8 * 1024 + 1);
    for bad in [
        json!({"client_secret": "csecret-1"}),
        json!({"client_id": "cid-1"}),
        json!({"client_id": "cid-1", "client_secret": "a\u{7}b"}),
        json!({"client_id": "cid-1", "client_secret": big}),
        json!({"client_id": "cid-1", "client_secret": 5}),
        json!({"client_id": "cid-1", "client_secret": "s", "admin": true}),
        json!(["cid-1"]),
    ] {
        let problem =
            assert_problem(app.put_credentials(&admin, "acme", "acc-1", &bad).await, 400, "invalid_request").await;
        assert!(!problem["detail"].as_str().unwrap().contains("xxxx"), "{problem}");
    }
    let wrong_type = app.http.put(url("acme")).bearer_auth(&admin).header("content-type", "text/plain").body("x");
    assert_problem(wrong_type.send().await.unwrap(), 415, "unsupported_media_type").await;
    let delete = app.http.delete(url("trackunit")).bearer_auth(&admin).send().await.unwrap();
    assert_problem(delete, 409, "credentials_from_callback").await;
    assert_eq!(app.installation_count().await, 0);
}

#[tokio::test]
async fn replaced_credentials_are_never_served_a_token_of_the_old_ones_by_another_replica() {
    let (app, admin, key) = app().await;
    let replica = app.replica(&[]).await.unwrap();
    app.put_credentials(&admin, "acme", "acc-1", &body(&credentials())).await;
    let old: Value = app.token_at(&replica.internal, &key, &ask("acc-1")).await.json().await.unwrap();
    let new = credentials();
    assert_eq!(app.put_credentials(&admin, "acme", "acc-1", &body(&new)).await.status(), 200);
    let served = eventually(
        || async { app.token_at(&replica.internal, &key, &ask("acc-1")).await.json::<Value>().await.unwrap() },
        |answer| answer["access_token"] != old["access_token"],
    )
    .await;
    assert_ne!(served["access_token"], old["access_token"], "the replica dropped the old credentials' token");
    assert_eq!(app.upstream.calls.lock().unwrap().last().unwrap()["client_secret"], new.client_secret);
}

#[tokio::test]
async fn keys_are_granted_providers_and_keys_made_before_keep_trackunit_only() {
    let (app, admin, _) = app().await;
    app.install("acc-1").await;
    app.put_credentials(&admin, "acme", "acc-1", &body(&credentials())).await;
    // A key as `clients create` made it before providers existed: no providers column written.
    let old_key = tokenvault::domain::ServiceKey::generate();
    sqlx::query("insert into api_client (name, key_sha256, accounts, scopes) values ('old', $1, '{*}', '{*}')")
        .bind(&old_key.sha256()[..])
        .execute(&app.pool)
        .await
        .unwrap();
    let old_key = old_key.expose();
    assert_eq!(app.token(old_key, &json!({"account_id": "acc-1", "scopes": ["a"]})).await.status(), 200);
    let problem = assert_problem(app.token(old_key, &ask("acc-1")).await, 403, "forbidden").await;
    assert!(problem["detail"].as_str().unwrap().contains("provider"), "{problem}");
    // The order of checks: a provider the key is not granted is 403 before an unknown one is 404.
    let unknown = json!({"provider": "nope", "account_id": "acc-1", "scopes": ["a"]});
    assert_problem(app.token(old_key, &unknown).await, 403, "forbidden").await;
    let every = app.client(&["*"], &["*"], false).await;
    assert_problem(app.token(&every, &unknown).await, 404, "unknown_provider").await;
    let with_app = json!({"provider": "acme", "account_id": "acc-1", "scopes": ["a"], "app_id": APP_ID});
    assert_problem(app.token(&every, &with_app).await, 400, "invalid_request").await;
    assert_problem(app.token(&every, &ask("acc-2")).await, 404, "not_installed").await;
}

#[tokio::test]
async fn providers_and_installations_are_listed_for_admins_without_secrets() {
    let (app, admin, key) = app().await;
    app.install("acc-1").await;
    let secret = credentials();
    app.put_credentials(&admin, "acme", "acc-2", &body(&secret)).await;

    let providers = app.http.get(format!("{}/v1/providers", app.internal)).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(providers.status(), 200);
    let providers: Value = providers.json().await.unwrap();
    let names: Vec<&str> =
        providers["providers"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["acme", "trackunit"]);
    let acme = &providers["providers"][0];
    assert_eq!(
        (acme["client_auth"].as_str(), acme["default_lifetime_secs"].as_u64()),
        (Some("client_secret_post"), Some(300))
    );
    assert_eq!(acme["reply"]["access_token"], "access_token");
    let listed = app.http.get(format!("{}/v1/providers", app.internal)).bearer_auth(&key).send().await.unwrap();
    assert_problem(listed, 403, "forbidden").await;

    let list = |query: &'static str| {
        let (app, admin) = (&app, &admin);
        async move {
            let url = format!("{}/v1/installations{query}", app.internal);
            app.http.get(url).bearer_auth(admin).send().await.unwrap()
        }
    };
    let all: Value = list("").await.json().await.unwrap();
    assert_eq!(all["installations"].as_array().unwrap().len(), 2);
    let only: Value = list("?provider=acme").await.json().await.unwrap();
    let rows = only["installations"].as_array().unwrap();
    assert_eq!((rows.len(), rows[0]["provider"].as_str(), rows[0]["app_id"].is_null()), (1, Some("acme"), true));
    assert!(!only.to_string().contains(&secret.client_secret) && !only.to_string().contains(&secret.client_id));
    assert_problem(list("?provder=acme").await, 400, "invalid_request").await;
}

#[tokio::test]
async fn a_reply_lacking_the_configured_member_is_a_502_naming_the_member_never_its_value() {
    let config_toml =
        "[providers.acme]\ntoken_url = \"{trackunit}/apptoken\"\n[providers.acme.reply]\naccess_token = \"data.Token\"\n"
            .to_owned();
    let app = spawn_app_with(Options {
        config_toml,
        vars: vec![("TOKENVAULT_UPSTREAM_MAX_ATTEMPTS", "1".into())],
        ..Options::default()
    })
    .await;
    let (admin, key) = (app.client(&[], &[], true).await, app.client(&["*"], &["*"], false).await);
    app.put_credentials(&admin, "acme", "acc-1", &body(&credentials())).await;
    let problem = assert_problem(app.token(&key, &ask("acc-1")).await, 502, "upstream_error").await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("`data.Token`"), "{detail}");
    let issued = app.upstream.issued.lock().unwrap().clone();
    assert!(issued.iter().all(|token| !detail.contains(token.as_str())), "{detail}");
}

/// The example files cannot rot: each loads, and says what its comments say.
#[test]
fn every_example_provider_file_loads() {
    let dir = format!("{}/examples/providers", env!("CARGO_MANIFEST_DIR"));
    let mut loaded = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let vars = std::collections::HashMap::from([
            ("DATABASE_URL".to_owned(), "postgres://x/y".to_owned()),
            ("TOKENVAULT_ENCRYPTION_KEYS".to_owned(), format!("k:{}", tokenvault::crypto::generate_key())),
        ]);
        let source = tokenvault::settings::Source::from_map_and_file(vars, &text).unwrap();
        let settings = tokenvault::settings::Settings::load(&source).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        for provider in settings.providers.iter().filter(|p| !p.is_trackunit()) {
            loaded.push(provider.as_ref().clone());
        }
    }
    loaded.sort_by(|a, b| a.name.cmp(&b.name));
    let names: Vec<&str> = loaded.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["calendar", "triumph", "trulioo", "truphone"]);
    let [calendar, triumph, trulioo, truphone] = &loaded[..] else { unreachable!() };
    assert!(!calendar.default_scopes.is_empty());
    assert!(!triumph.send_scope);
    assert_eq!(trulioo.reply.access_token, "Token");
    assert_eq!(&**trulioo.default_scopes.key(), "workflow.studio.api");
    assert_eq!(trulioo.expiry_from_jwt, tokenvault::provider::ExpiryFromJwt::Earliest);
    assert!(trulioo.expiry_margin.as_secs() > 0);
    assert!(truphone.use_refresh_tokens && truphone.token_url.path().ends_with("/protocol/openid-connect/token"));
}

#[tokio::test]
async fn rotation_reseals_delegated_refresh_tokens_and_they_still_refresh() {
    let (app, admin, key) = app().await;
    let refresh = format!("rt-{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let registered =
        json!({"client_id": "cid-delegated", "client_secret": "csecret-delegated", "refresh_token": refresh});
    assert_eq!(app.put_credentials(&admin, "acme", "user-1", &registered).await.status(), 201);
    let next = format!("next:{}", tokenvault::crypto::generate_key());
    let ring = tokenvault::crypto::KeyRing::parse(&format!("{next},{}", app.encryption_keys)).unwrap();
    let report = tokenvault::rotation::rotate(&app.pool, &ring, 10, |_, _| {}).await.unwrap();
    assert_eq!((report.installations, report.refresh_tokens), (1, 1));
    let key_ids: Vec<String> =
        sqlx::query_scalar("select key_id from refresh_token").fetch_all(&app.pool).await.unwrap();
    assert_eq!(key_ids, ["next"]);

    let rotated =
        app.replica(&[("TOKENVAULT_ENCRYPTION_KEYS", &format!("{next},{}", app.encryption_keys))]).await.unwrap();
    let response = app.token_at(&rotated.internal, &key, &ask("user-1")).await;
    assert_eq!(response.status(), 200, "the re-sealed refresh token opens and is spent");
    let form = app.upstream.calls.lock().unwrap()[0].clone();
    assert_eq!((form["grant_type"].as_str(), form["refresh_token"].as_str()), ("refresh_token", refresh.as_str()));
}

#[tokio::test]
async fn a_secret_moved_from_another_providers_row_of_the_same_account_does_not_open() {
    let (app, admin, key) = app().await;
    app.install("acc-1").await;
    assert_eq!(app.put_credentials(&admin, "acme", "acc-1", &body(&credentials())).await.status(), 201);
    // Same account, same key ring: only the provider in the associated data tells the rows apart.
    sqlx::query(
        "update installation set client_secret_ciphertext =
            (select client_secret_ciphertext from installation where provider = 'trackunit' and account_id = 'acc-1')
         where provider = 'acme' and account_id = 'acc-1'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    assert_problem(app.token(&key, &ask("acc-1")).await, 500, "credentials_unreadable").await;
    assert_eq!(app.upstream.call_count(), 0);
    // The row it was taken from still works.
    let trackunit = json!({"account_id": "acc-1", "scopes": ["a"]});
    assert_eq!(app.token(&key, &trackunit).await.status(), 200);
}
