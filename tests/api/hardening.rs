//! The defects of the outside review (issue 10), one behaviour per test: each fails on the code before
//! the fix.

use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

use crate::helpers::*;

fn request(account: &str, scopes: &[&str]) -> Value {
    json!({ "account_id": account, "scopes": scopes })
}

fn invalid_client() -> Upstream {
    Upstream::Fail { status: 401, body: json!({"error": "invalid_client"}) }
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pool).await.unwrap()
}

// ---------------------------------------------------------------------------------------------------
// 1. Requests waiting on a mint share its outcome, failure included
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn twenty_requests_for_a_cold_key_whose_client_is_refused_make_one_upstream_call() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![invalid_client()]);
    *app.upstream.delay.lock().unwrap() = Duration::from_millis(500);

    let body = request("acc-1", &["a"]);
    let burst = (0..20).map(|_| app.token(&key, &body));
    for response in futures_util::future::join_all(burst).await {
        assert_problem(response, 502, "upstream_rejected").await;
    }
    assert_eq!(app.upstream.call_count(), 1, "one call for the whole burst");
    assert_eq!(app.status_of("acc-1").await, "rejected");
    assert_problem(app.token(&key, &request("acc-1", &["b"])).await, 502, "upstream_rejected").await;
    assert_eq!(app.upstream.call_count(), 1, "later requests, other scopes too, are governed by the rejection");
}

#[tokio::test]
async fn replicas_waiting_on_a_failing_mint_read_its_failure_instead_of_calling_again() {
    let app =
        spawn_app_with(Options { vars: vec![("TOKENVAULT_UPSTREAM_MAX_ATTEMPTS", "1".into())], ..Options::default() })
            .await;
    let replica = app.replica(&[("TOKENVAULT_UPSTREAM_MAX_ATTEMPTS", "1")]).await.unwrap();
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::Fail { status: 500, body: json!({}) }]);
    *app.upstream.delay.lock().unwrap() = Duration::from_millis(500);

    let body = request("acc-1", &["a"]);
    let here = (0..5).map(|_| app.token(&key, &body));
    let there = (0..5).map(|_| app.token_at(&replica.internal, &key, &body));
    let (here, there) = tokio::join!(futures_util::future::join_all(here), futures_util::future::join_all(there));
    for response in here.into_iter().chain(there) {
        assert_eq!(response.status(), 502, "the mint's own failure or the recorded one");
    }
    assert_eq!(app.upstream.call_count(), 1, "one call across both replicas");
    let recorded = count(&app, "select count(*) from mint_failure where kind = 'failed' and retry_at > now()").await;
    assert_eq!(recorded, 1, "the failure is recorded for every replica");

    // While the key backs off, neither replica calls again; a success later clears the record.
    let response = app.token_at(&replica.internal, &key, &request("acc-1", &["a"])).await;
    assert!(response.headers().contains_key("retry-after"));
    assert_problem(response, 503, "upstream_unavailable").await;
    assert_eq!(app.upstream.call_count(), 1);
    app.upstream.set(vec![Upstream::Mint { expires_in: 3600 }]);
    *app.upstream.delay.lock().unwrap() = Duration::ZERO;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(app.token_at(&replica.internal, &key, &request("acc-1", &["a"])).await.status(), 200);
    assert_eq!(count(&app, "select count(*) from mint_failure").await, 0);
}

// ---------------------------------------------------------------------------------------------------
// 2. A rejected installation recovers by itself, or at an operator's word
// ---------------------------------------------------------------------------------------------------

async fn rejected_app(schedule: &str) -> (TestApp, String) {
    let app = spawn_app_with(Options {
        vars: vec![("TOKENVAULT_REJECTED_PROBE_SCHEDULE_SECS", schedule.into())],
        ..Options::default()
    })
    .await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![invalid_client()]);
    assert_problem(app.token(&key, &request("acc-1", &["a"])).await, 502, "upstream_rejected").await;
    assert_eq!(app.status_of("acc-1").await, "rejected");
    (app, key)
}

#[tokio::test]
async fn a_rejected_installation_is_probed_once_and_becomes_active_when_the_probe_mints() {
    let (app, key) = rejected_app("1").await;
    app.upstream.set(vec![Upstream::Mint { expires_in: 3600 }]);
    let status = eventually(|| app.status_of("acc-1"), |status| status == "active").await;
    assert_eq!(status, "active", "the probe made it active again");
    assert_eq!(app.upstream.call_count(), 2, "the refused mint and one probe");
    let probes: Vec<(String, String)> =
        sqlx::query_as("select event_type, outcome from callback_event where event_type = 'REJECTION_PROBE'")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(probes, [("REJECTION_PROBE".to_owned(), "reactivated".to_owned())]);

    let body = request("acc-1", &["a"]);
    let response = eventually(|| app.token(&key, &body), |r| r.status() == 200).await;
    assert_eq!(response.status(), 200);
    assert_eq!(app.upstream.call_count(), 2, "the probe's token is stored and served: no further call");
}

#[tokio::test]
async fn a_probe_refused_again_waits_for_the_next_step_of_the_schedule_making_one_call_each() {
    let (app, _key) = rejected_app("1,3600").await;
    let probes =
        eventually(|| count(&app, "select probe_count::bigint from installation"), |probes| *probes == 1).await;
    assert_eq!(probes, 1);
    assert_eq!(app.status_of("acc-1").await, "rejected");
    let next_in: f64 = sqlx::query_scalar("select extract(epoch from next_probe_at - now())::float8 from installation")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(next_in > 3000.0, "the next probe is the schedule's next step away: {next_in}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(app.upstream.call_count(), 2, "the refused mint and one probe, no more");
    let outcome: String = sqlx::query_scalar("select outcome from callback_event where event_type = 'REJECTION_PROBE'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(outcome, "still_rejected");
}

#[tokio::test]
async fn an_admin_reactivates_a_rejected_installation_and_its_tokens_flow_again() {
    let (app, key) = rejected_app("3600").await;
    let admin = app.client(&[], &[], true).await;
    let id: uuid::Uuid = sqlx::query_scalar("select id from installation").fetch_one(&app.pool).await.unwrap();
    let url = format!("{}/v1/installations/{id}/reactivate", app.internal);

    assert_problem(app.http.post(&url).send().await.unwrap(), 401, "unauthenticated").await;
    assert_problem(app.http.post(&url).bearer_auth(&key).send().await.unwrap(), 403, "forbidden").await;
    let bad = format!("{}/v1/installations/not-a-uuid/reactivate", app.internal);
    assert_problem(app.http.post(&bad).bearer_auth(&admin).send().await.unwrap(), 404, "not_found").await;
    assert_eq!(app.status_of("acc-1").await, "rejected", "refusals change nothing");

    let response = app.http.post(&url).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "active");
    assert!(body.get("client_id").is_none());
    let audited: i64 = count(&app, "select count(*) from callback_event where event_type = 'ADMIN_REACTIVATED'").await;
    assert_eq!(audited, 1);

    app.upstream.set(vec![Upstream::Mint { expires_in: 3600 }]);
    let body = request("acc-1", &["a"]);
    let response = eventually(|| app.token(&key, &body), |r| r.status() == 200).await;
    assert_eq!(response.status(), 200, "minting again");
    let again = app.http.post(&url).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(again.status(), 200, "an active installation is answered as it is");

    let revoke = app.http.delete(format!("{}/v1/installations/{id}", app.internal)).bearer_auth(&admin);
    assert_eq!(revoke.send().await.unwrap().status(), 204);
    assert_problem(app.http.post(&url).bearer_auth(&admin).send().await.unwrap(), 409, "no_credentials").await;
}

// ---------------------------------------------------------------------------------------------------
// 4. The watermark moves on every accepted message
// ---------------------------------------------------------------------------------------------------

fn issued_at(iat: i64) -> String {
    sign("rsa-a", Algorithm::RS256, &json!({ "iat": iat, "exp": now() + 300 }))
}

#[tokio::test]
async fn a_delayed_older_uninstall_after_an_unchanged_newer_install_is_stale() {
    let app = spawn_app().await;
    let credentials = credentials();
    let t = now() - 300;
    let installed = installed_body("acc-1", &credentials);
    assert_eq!(app.callback(Some(&issued_at(t)), &installed).await.status(), 204);
    assert_eq!(app.callback(Some(&issued_at(t + 200)), &installed).await.status(), 204);
    let uninstall = json!({"type": "UNINSTALLED", "irisAppId": APP_ID, "accountId": "acc-1"});
    assert_eq!(app.callback(Some(&issued_at(t + 100)), &uninstall).await.status(), 204);

    assert_eq!(app.status_of("acc-1").await, "active", "the older UNINSTALLED did not erase the newer install");
    let outcomes: Vec<String> =
        sqlx::query_scalar("select outcome from callback_event order by id").fetch_all(&app.pool).await.unwrap();
    assert_eq!(outcomes, ["stored", "unchanged", "stale"]);
}

// ---------------------------------------------------------------------------------------------------
// 5. One identity JWT, one message
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_same_identity_token_with_another_body_is_refused_on_every_replica_and_audited() {
    let app = spawn_app().await;
    let replica = app.replica(&[]).await.unwrap();
    let token = identity();
    let first = installed_body("victim", &credentials());
    assert_eq!(app.callback(Some(&token), &first).await.status(), 204);
    assert_eq!(app.callback(Some(&token), &first).await.status(), 204, "the same body again is a retry");
    let before = app.snapshot().await;

    // A captured token used for credential substitution, and for an uninstall, on another replica.
    let substituted = installed_body("victim", &credentials());
    let uninstall = json!({"type": "UNINSTALLED", "irisAppId": APP_ID, "accountId": "victim"});
    for body in [&substituted, &uninstall] {
        let response = app
            .http
            .post(format!("{}/callbacks/trackunit", replica.public))
            .header("Trackunit-Identity", &token)
            .json(body)
            .send()
            .await
            .unwrap();
        assert_problem(response, 401, "invalid_identity").await;
    }
    assert_eq!(app.snapshot().await, before, "nothing changed");
    let outcomes: Vec<String> =
        sqlx::query_scalar("select outcome from callback_event order by id").fetch_all(&app.pool).await.unwrap();
    assert_eq!(outcomes, ["stored", "retried", "replay_refused", "replay_refused"]);
}

#[tokio::test]
async fn a_token_without_jti_is_remembered_by_its_digest() {
    let app = spawn_app().await;
    let token = sign_exact("rsa-a", Algorithm::RS256, &json!({ "iat": now(), "exp": now() + 300 }));
    assert_eq!(app.callback(Some(&token), &installed_body("acc-1", &credentials())).await.status(), 204);
    let response = app.callback(Some(&token), &installed_body("acc-2", &credentials())).await;
    assert_problem(response, 401, "invalid_identity").await;
    assert_eq!(app.installation_count().await, 1);
    let remembered: i64 = count(&app, "select count(*) from identity_replay where expires_at > now()").await;
    assert_eq!(remembered, 1);
}

#[tokio::test]
async fn identity_tokens_living_longer_than_the_bound_are_refused() {
    let app = spawn_app_with(Options {
        vars: vec![("TOKENVAULT_TRACKUNIT_MAX_TOKEN_LIFETIME_SECS", "600".into())],
        ..Options::default()
    })
    .await;
    let long = sign("rsa-a", Algorithm::RS256, &json!({ "iat": now(), "exp": now() + 601 }));
    assert_problem(app.callback(Some(&long), &installed_body("a", &credentials())).await, 401, "invalid_identity")
        .await;
    let no_iat = sign("rsa-a", Algorithm::RS256, &json!({ "exp": now() + 700 }));
    assert_problem(app.callback(Some(&no_iat), &installed_body("a", &credentials())).await, 401, "invalid_identity")
        .await;
    let fine = sign("rsa-a", Algorithm::RS256, &json!({ "iat": now(), "exp": now() + 600 }));
    assert_eq!(app.callback(Some(&fine), &installed_body("a", &credentials())).await.status(), 204);
}

#[tokio::test]
async fn required_claims_are_enforced_and_claim_names_are_recorded_without_values() {
    let app = spawn_app_with(Options {
        vars: vec![("TOKENVAULT_TRACKUNIT_REQUIRED_CLAIMS", "irisAppId,accountId".into())],
        ..Options::default()
    })
    .await;
    let lacking = sign("rsa-a", Algorithm::RS256, &json!({ "iat": now(), "exp": now() + 300, "irisAppId": APP_ID }));
    let response = app.callback(Some(&lacking), &installed_body("acc-1", &credentials())).await;
    let problem = assert_problem(response, 401, "invalid_identity").await;
    assert!(problem["detail"].as_str().unwrap().contains("accountId"), "{problem}");

    let claims = json!({ "iat": now(), "exp": now() + 300, "irisAppId": APP_ID, "accountId": "acc-1",
                         "secretish": "value-never-recorded" });
    let bound = sign("rsa-a", Algorithm::RS256, &claims);
    assert_eq!(app.callback(Some(&bound), &installed_body("acc-1", &credentials())).await.status(), 204);
    let names = eventually(
        || async {
            sqlx::query_scalar::<_, String>("select names from identity_claim_set").fetch_all(&app.pool).await.unwrap()
        },
        |names| !names.is_empty(),
    )
    .await;
    assert_eq!(names, ["accountId,exp,iat,irisAppId,jti,secretish"]);
    let dump: String =
        sqlx::query_scalar("select string_agg(names, ';') from identity_claim_set").fetch_one(&app.pool).await.unwrap();
    assert!(!dump.contains("value-never-recorded"));
}

// ---------------------------------------------------------------------------------------------------
// 6. A reachable panic
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_alg_with_a_multibyte_character_at_byte_two_is_refused_not_a_500() {
    let app = spawn_app().await;
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    for alg in ["aé", "Hé", "é", "H"] {
        let token = format!("{}.{}.c2ln", b64(&json!({"alg": alg, "kid": "rsa-a"})), b64(&json!({"exp": now() + 60})));
        let response = app.callback(Some(&token), &installed_body("acc-1", &credentials())).await;
        assert_problem(response, 401, "invalid_identity").await;
    }
}

// ---------------------------------------------------------------------------------------------------
// 7. A token granted beyond the request goes only to keys granted all of it
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_token_granted_more_scopes_than_asked_is_withheld_from_keys_not_granted_them() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let narrow = app.client(&["*"], &["a"], false).await;
    let wide = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::MintGranting { expires_in: 3600, scope: "a b c" }]);

    let problem = assert_problem(app.token(&narrow, &request("acc-1", &["a"])).await, 403, "forbidden").await;
    assert!(problem["detail"].as_str().unwrap().contains("b c"), "names the extra scopes: {problem}");
    let response = app.token(&wide, &request("acc-1", &["a"])).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["scope"], "a b c");
    // Now cached in memory: the hot path withholds it too.
    for _ in 0..3 {
        assert_problem(app.token(&narrow, &request("acc-1", &["a"])).await, 403, "forbidden").await;
    }
    assert_eq!(app.upstream.call_count(), 1);
}

// ---------------------------------------------------------------------------------------------------
// 8. Keys are granted apps
// ---------------------------------------------------------------------------------------------------

async fn install_app(app: &TestApp, app_id: &str, account: &str) {
    let mut body = installed_body(account, &credentials());
    body["irisAppId"] = json!(app_id);
    assert_eq!(app.callback(Some(&identity()), &body).await.status(), 204);
}

#[tokio::test]
async fn a_key_granted_one_app_gets_only_that_apps_tokens() {
    let app = spawn_app().await;
    install_app(&app, "@acme/x", "acc-1").await;
    install_app(&app, "@acme/y", "acc-1").await;
    install_app(&app, "@acme/y", "acc-2").await;
    let only_x = app.client_for_apps(&["*"], &["*"], &["@acme/x"], false).await;

    let response = app.token(&only_x, &request("acc-1", &["a"])).await;
    assert_eq!(response.status(), 200, "without app_id, the one installation of a granted app");
    let mut with_y = request("acc-1", &["a"]);
    with_y["app_id"] = json!("@acme/y");
    assert_problem(app.token(&only_x, &with_y).await, 403, "forbidden").await;
    assert_problem(app.token(&only_x, &request("acc-2", &["a"])).await, 403, "forbidden").await;
    assert_eq!(app.upstream.call_count(), 1);

    let every_app = app.client(&["*"], &["*"], false).await;
    assert_problem(app.token(&every_app, &request("acc-1", &["a"])).await, 409, "ambiguous_app").await;
    let keys_before: i64 = count(&app, "select count(*) from api_client where apps = '{*}'").await;
    assert_eq!(keys_before, 1, "keys made without app grants keep every app");
}

// ---------------------------------------------------------------------------------------------------
// 10. Unknown keys cost no query each
// ---------------------------------------------------------------------------------------------------

// The client's own NOTIFY may arrive while the first unknown key loads the set (often, on a busy machine):
// that set is kept, marked stale, so the flood is still refused from memory rather than each request
// waiting for a connection in turn.
#[tokio::test]
async fn a_flood_of_random_keys_is_refused_from_memory_with_the_database_down() {
    let app = spawn_app_with(Options { proxy_database: true, ..Options::default() }).await;
    let proxy = app.proxy.clone().unwrap();
    let known = app.client(&["*"], &["*"], false).await;
    // One unknown key loads the set of known digests.
    let random = || format!("tvk_{}", uuid::Uuid::new_v4().simple());
    assert_problem(app.token(&random(), &request("acc-1", &["a"])).await, 401, "unauthenticated").await;
    proxy.stop();
    let flood = (0..200).map(|_| {
        let key = random();
        let app = &app;
        async move { app.token(&key, &request("acc-1", &["a"])).await.status().as_u16() }
    });
    let statuses = futures_util::future::join_all(flood).await;
    let from_memory = statuses.iter().filter(|s| **s == 401).count();
    assert!(from_memory >= 170, "refused from memory, a few lookups a second aside: {from_memory} of 200");
    assert!(statuses.iter().all(|s| *s == 401 || *s == 503), "{statuses:?}");
    proxy.restart().await;
    drop(known);
}

// ---------------------------------------------------------------------------------------------------
// 11. Connections are bounded per listener
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_listener_holds_at_most_its_connection_limit() {
    let app = spawn_app_with(Options {
        vars: vec![("TOKENVAULT_PUBLIC_MAX_CONNECTIONS", "16".into())],
        ..Options::default()
    })
    .await;
    let address = app.public.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for _ in 0..24 {
        idle.push(tokio::net::TcpStream::connect(&address).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let health = format!("{}/healthz", app.public);
    let waited = tokio::time::timeout(Duration::from_millis(1500), fresh.get(&health).send()).await;
    assert!(waited.is_err(), "over the limit, a new connection is not served");
    drop(idle);
    let served = tokio::time::timeout(Duration::from_secs(5), fresh.get(&health).send()).await;
    assert_eq!(served.expect("served once connections close").unwrap().status(), 200);
}

// ---------------------------------------------------------------------------------------------------
// 12. A silently dropped LISTEN connection is noticed
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_revocation_arrives_within_seconds_although_the_listen_connection_died_silently() {
    let app = spawn_app_with(Options {
        proxy_database: true,
        vars: vec![("TOKENVAULT_LISTENER_HEARTBEAT_SECS", "1".into())],
        ..Options::default()
    })
    .await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    assert_eq!(app.token(&key, &request("acc-1", &["a"])).await.status(), 200);
    // The LISTEN connection (and every pooled one) now goes silent without closing, as behind a NAT
    // that dropped it; the revocation is made beside the app, so its NOTIFY is lost with the connection.
    app.proxy.as_ref().unwrap().freeze_existing();
    sqlx::query("update api_client set revoked_at = now()").execute(&app.pool).await.unwrap();

    let started = std::time::Instant::now();
    let status = loop {
        let status = app.token(&key, &request("acc-1", &["a"])).await.status().as_u16();
        if status == 401 || started.elapsed() > Duration::from_secs(20) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 401, "the revoked key was refused {:?} after the revocation", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(15), "well within the cache's 300 s: {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------------
// 13. Associated data binds the credentials version and a cached token's expiry
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn credentials_rolled_back_to_an_older_version_do_not_decrypt() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let old: (Vec<u8>, Vec<u8>) =
        sqlx::query_as("select client_id_ciphertext, client_secret_ciphertext from installation")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    app.install("acc-1").await;
    // Someone with write access restores the first credentials' ciphertexts in the current row.
    sqlx::query("update installation set client_id_ciphertext = $1, client_secret_ciphertext = $2")
        .bind(&old.0)
        .bind(&old.1)
        .execute(&app.pool)
        .await
        .unwrap();
    let key = app.client(&["*"], &["*"], false).await;
    assert_problem(app.token(&key, &request("acc-1", &["a"])).await, 500, "credentials_unreadable").await;
    assert_eq!(app.upstream.call_count(), 0, "the rolled-back credentials were never sent");
}

#[tokio::test]
async fn a_cached_token_whose_expiry_was_extended_in_the_table_is_not_served() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::Mint { expires_in: 60 }]);
    let first: Value = app.token(&key, &request("acc-1", &["a"])).await.json().await.unwrap();
    sqlx::query("update token_cache set expires_at = expires_at + interval '1 day'").execute(&app.pool).await.unwrap();
    let replica = app.replica(&[]).await.unwrap();
    let response = app
        .token_at(&replica.internal, &key, &json!({"account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": 120}))
        .await;
    let second: Value = response.json().await.unwrap();
    assert_ne!(second["access_token"], first["access_token"], "the extended row did not open: a new mint");
    assert_eq!(app.upstream.call_count(), 2);
}

#[tokio::test]
async fn rows_sealed_with_the_first_associated_data_still_open_and_rotation_reseals_them() {
    use tokenvault::crypto::{Aad, AadVersion, CredentialRow, KeyRing, SecretField};
    let app = spawn_app().await;
    let credentials = app.install("acc-1").await;
    // Seal the row as the first format did, and say so, as a database from before the upgrade holds it.
    let (id, version): (uuid::Uuid, i64) =
        sqlx::query_as("select id, credentials_version from installation").fetch_one(&app.pool).await.unwrap();
    let ring = KeyRing::parse(&app.encryption_keys).unwrap();
    let row = CredentialRow {
        provider: "trackunit",
        app_id: APP_ID,
        account_id: "acc-1",
        installation_id: id,
        credentials_version: version,
    };
    let seal = |value: &str, field| ring.seal(value.as_bytes(), &Aad::credential(AadVersion::V1, &row, field)).bytes;
    sqlx::query("update installation set client_id_ciphertext = $1, client_secret_ciphertext = $2, aad_version = 1")
        .bind(seal(&credentials.client_id, SecretField::ClientId))
        .bind(seal(&credentials.client_secret, SecretField::ClientSecret))
        .execute(&app.pool)
        .await
        .unwrap();
    let key = app.client(&["*"], &["*"], false).await;
    assert_eq!(app.token(&key, &request("acc-1", &["a"])).await.status(), 200, "a v1 row opens");
    assert_eq!(app.upstream.calls.lock().unwrap()[0]["client_secret"], credentials.client_secret);

    let report = tokenvault::rotation::rotate(&app.pool, &ring, 10, |_, _| {}).await.unwrap();
    assert_eq!(report.installations, 1, "re-sealed with the current associated data");
    assert_eq!(count(&app, "select count(*) from installation where aad_version = 2").await, 1);
    assert_eq!(count(&app, "select count(*) from token_cache where aad_version = 2").await, 1);
}
