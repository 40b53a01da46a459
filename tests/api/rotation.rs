//! Key rotation without downtime and without losing a credential.

use std::collections::HashMap;

use serde_json::json;
use tokenvault::crypto::{KeyRing, generate_key};
use tokenvault::rotation;

use crate::helpers::*;

fn token_request(account: &str) -> serde_json::Value {
    json!({"account_id": account, "scopes": ["asset.view"]})
}

#[tokio::test]
async fn rotating_while_installs_and_token_requests_run_then_dropping_the_old_key_loses_nothing() {
    let app = spawn_app().await; // sealing under the key "test"
    let old = app.encryption_keys.clone();
    let new = format!("next:{}", generate_key());
    let both = format!("{new},{old}");
    let key = app.client(&["*"], &["*"], false).await;

    let mut secrets: HashMap<String, String> = HashMap::new();
    for i in 0..30 {
        let account = format!("acc-{i}");
        secrets.insert(account.clone(), app.install(&account).await.client_secret);
        if i % 3 == 0 {
            assert_eq!(app.token(&key, &token_request(&account)).await.status(), 200);
        }
    }

    // The serving processes get the new ring first (new key first, old key kept) ...
    let serving = app.replica(&[("TOKENVAULT_ENCRYPTION_KEYS", &both)]).await.unwrap();
    let ring = KeyRing::parse(&both).unwrap();
    // ... then rotation runs while they take installs, re-installs and token requests.
    let traffic = async {
        let mut installed = Vec::new();
        for i in 0..40 {
            let account = format!("acc-{}", if i % 2 == 0 { i } else { 100 + i });
            let credentials = credentials();
            let response = app
                .http
                .post(format!("{}/callbacks/trackunit", serving.public))
                .header("content-type", "application/json")
                .header("Trackunit-Identity", identity())
                .json(&installed_body(&account, &credentials))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 204);
            installed.push((account.clone(), credentials.client_secret));
            let response = app
                .http
                .post(format!("{}/v1/tokens", serving.internal))
                .bearer_auth(&key)
                .json(&token_request(&format!("acc-{}", i % 30)))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
        installed
    };
    let (report, installed) = tokio::join!(rotation::rotate(&app.pool, &ring, 4, |_, _| {}), traffic);
    let report = report.unwrap();
    assert!(report.unreadable_installations.is_empty() && report.unreadable_tokens.is_empty());
    assert!(report.installations > 0);
    secrets.extend(installed);

    // Whatever the serving replica wrote meanwhile is under the new key already; nothing is left on the old.
    let usage = tokenvault::store::installation::key_usage(&app.pool).await.unwrap();
    assert!(usage.iter().all(|(key_id, _, _)| key_id == "next"), "{usage:?}");

    // Drop the old key: start-up accepts the ring, and every installation mints with its latest secret.
    let only_new = app.replica(&[("TOKENVAULT_ENCRYPTION_KEYS", &new)]).await.unwrap();
    app.upstream.set(vec![Upstream::Mint { expires_in: 3600 }]);
    for (account, secret) in &secrets {
        let response = app
            .http
            .post(format!("{}/v1/tokens", only_new.internal))
            .bearer_auth(&key)
            .json(&json!({"account_id": account, "scopes": ["fresh"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{account}");
        let calls = app.upstream.calls.lock().unwrap();
        assert_eq!(&calls.last().unwrap()["client_secret"], secret, "{account} minted with its latest secret");
    }
}

#[tokio::test]
async fn start_up_refuses_a_ring_missing_a_key_that_sealed_stored_credentials() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let error =
        app.replica(&[("TOKENVAULT_ENCRYPTION_KEYS", &format!("other:{}", generate_key()))]).await.err().unwrap();
    assert!(error.to_string().contains("test"), "names the missing key id: {error}");
}

#[tokio::test]
async fn rotation_names_rows_it_cannot_decrypt_and_leaves_them_untouched() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    app.install("acc-2").await;
    let broken = app.break_credentials("acc-2").await;
    let before: Vec<u8> = sqlx::query_scalar("select client_id_ciphertext from installation where id = $1")
        .bind(broken)
        .fetch_one(&app.pool)
        .await
        .unwrap();

    let ring = KeyRing::parse(&format!("next:{},{}", generate_key(), app.encryption_keys)).unwrap();
    let report = rotation::rotate(&app.pool, &ring, 1, |_, _| {}).await.unwrap();
    assert_eq!(report.installations, 1);
    assert_eq!(report.unreadable_installations, vec![broken]);
    let (key_id, after): (String, Vec<u8>) =
        sqlx::query_as("select key_id, client_id_ciphertext from installation where id = $1")
            .bind(broken)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((key_id.as_str(), after), ("test", before));

    // Resumable: a second run has nothing left to do but the broken row, which it names again.
    let again = rotation::rotate(&app.pool, &ring, 1, |_, _| {}).await.unwrap();
    assert_eq!((again.installations, again.unreadable_installations), (0, vec![broken]));
}

#[tokio::test]
async fn a_dry_run_plans_exactly_what_the_rotation_then_does() {
    let app = spawn_app().await; // sealing under the key "test"
    let key = app.client(&["*"], &["*"], false).await;
    for account in ["acc-0", "acc-1", "acc-2"] {
        app.install(account).await;
        assert_eq!(app.token(&key, &token_request(account)).await.status(), 200);
    }
    // acc-1's token expired with nothing to renew it; acc-2's too, and its refresh token expired as well.
    let expire = "update token_cache set expires_at = now() - interval '1 hour', issued_at = now() - interval '2 hours'
                  from installation i where i.id = token_cache.installation_id and i.account_id = $1";
    sqlx::query(expire).bind("acc-1").execute(&app.pool).await.unwrap();
    sqlx::query(expire).bind("acc-2").execute(&app.pool).await.unwrap();
    sqlx::query(
        "update token_cache set refresh_token_ciphertext = '\\x00', refresh_expires_at = now() - interval '1 minute'
         from installation i where i.id = token_cache.installation_id and i.account_id = 'acc-2'",
    )
    .execute(&app.pool)
    .await
    .unwrap();

    let ring = KeyRing::parse(&format!("next:{},{}", generate_key(), app.encryption_keys)).unwrap();
    let plan = rotation::plan(&app.pool, &ring).await.unwrap();
    let report = rotation::rotate(&app.pool, &ring, 10, |_, _| {}).await.unwrap();
    assert!(report.unreadable_tokens.is_empty(), "{report:?}");
    let done = (report.installations, report.cached_tokens, report.expired_tokens_deleted);
    let planned = (plan.installations as u64, plan.cached_tokens as u64, plan.expired_tokens as u64);
    assert_eq!(planned, done, "the dry run says what the rotation does: {plan:?}");
    assert_eq!(done, (3, 1, 2));
}
