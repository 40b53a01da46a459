//! What is at rest: no plaintext secret anywhere in the database; ciphertext bound to its row.

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn the_database_holds_no_plaintext_client_id_secret_or_access_token() {
    let app = spawn_app().await;
    let credentials = app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let body: serde_json::Value =
        app.token(&key, &json!({"account_id": "acc-1", "scopes": ["a"]})).await.json().await.unwrap();
    let access_token = body["access_token"].as_str().unwrap().to_owned();

    // Every byte of every table we own, as text and as hex.
    let dump: String = sqlx::query_scalar(
        "select string_agg(t::text, ' ') from (
            select row_to_json(i)::text as t from installation i
            union all select row_to_json(c)::text from token_cache c
            union all select row_to_json(e)::text from callback_event e
            union all select row_to_json(a)::text from api_client a) rows",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let blobs: Vec<Vec<u8>> = sqlx::query_scalar(
        "select client_id_ciphertext from installation union all select client_secret_ciphertext from installation
         union all select access_token_ciphertext from token_cache",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let raw: Vec<u8> = blobs.concat();
    for secret in [&credentials.client_id, &credentials.client_secret, &access_token, &key] {
        assert!(!dump.contains(secret.as_str()), "{secret} found in the database");
        assert!(!dump.contains(&hex::encode(secret)), "{secret} found hex-encoded");
        assert!(!raw.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret} found in a ciphertext");
    }
}

#[tokio::test]
async fn ciphertext_swapped_between_rows_fails_to_decrypt_and_no_upstream_call_is_made() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    app.install("acc-2").await;
    sqlx::query(
        "update installation set client_secret_ciphertext =
            (select client_secret_ciphertext from installation where account_id = 'acc-2')
         where account_id = 'acc-1'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let key = app.client(&["*"], &["*"], false).await;
    let response = app.token(&key, &json!({"account_id": "acc-1", "scopes": ["a"]})).await;
    assert_problem(response, 500, "credentials_unreadable").await;
    assert_eq!(app.upstream.call_count(), 0);
    // The row it was taken from still works.
    assert_eq!(app.token(&key, &json!({"account_id": "acc-2", "scopes": ["a"]})).await.status(), 200);
}

#[tokio::test]
async fn a_client_id_moved_into_the_secret_column_of_its_own_row_fails_to_decrypt() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    app.break_credentials("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let response = app.token(&key, &json!({"account_id": "acc-1", "scopes": ["a"]})).await;
    assert_problem(response, 500, "credentials_unreadable").await;
    assert_eq!(app.upstream.call_count(), 0);
}

#[tokio::test]
async fn a_cached_token_is_shared_through_the_database_by_another_process() {
    // Two app instances over one database: the second finds the first one's token in token_cache.
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let first: serde_json::Value =
        app.token(&key, &json!({"account_id": "acc-1", "scopes": ["a"]})).await.json().await.unwrap();

    let replica = app.replica(&[]).await.unwrap();
    let second: serde_json::Value = app
        .token_at(&replica.internal, &key, &json!({"account_id": "acc-1", "scopes": ["a"]}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["access_token"], second["access_token"]);
    assert_eq!(app.upstream.call_count(), 1, "one mint for both replicas");
}

#[tokio::test]
async fn three_replicas_asked_at_once_for_a_cold_key_mint_exactly_once() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    *app.upstream.delay.lock().unwrap() = std::time::Duration::from_millis(300);
    let (second, third) = (app.replica(&[]).await.unwrap(), app.replica(&[]).await.unwrap());
    let urls = [app.internal.clone(), second.internal.clone(), third.internal.clone()];
    let body = json!({"account_id": "acc-1", "scopes": ["asset.view"]});
    let requests =
        (0..60).map(|i| app.http.post(format!("{}/v1/tokens", urls[i % 3])).bearer_auth(&key).json(&body).send());
    let mut tokens = std::collections::HashSet::new();
    for response in futures_util::future::join_all(requests).await {
        let response = response.unwrap();
        assert_eq!(response.status(), 200);
        tokens.insert(response.json::<serde_json::Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned());
    }
    assert_eq!(tokens.len(), 1, "every replica handed out the same token");
    assert_eq!(app.upstream.call_count(), 1, "one mint across three replicas");
}

#[tokio::test]
async fn a_cached_token_moved_into_another_keys_row_does_not_decrypt_and_is_never_handed_out() {
    // token_cache rows are sealed with their key (installation, credentials version, scope set) as
    // associated data, as credentials are: a ciphertext copied from another row must not open.
    let app = spawn_app().await;
    app.install("acc-1").await;
    app.install("acc-2").await;
    let key = app.client(&["*"], &["*"], false).await;
    let token_for = |response: serde_json::Value| response["access_token"].as_str().unwrap().to_owned();
    let body_1 = json!({"account_id": "acc-1", "scopes": ["a"]});
    let first = token_for(app.token(&key, &body_1).await.json().await.unwrap());
    let other =
        token_for(app.token(&key, &json!({"account_id": "acc-2", "scopes": ["a"]})).await.json().await.unwrap());
    let moved = sqlx::query(
        "update token_cache set access_token_ciphertext =
            (select t.access_token_ciphertext from token_cache t join installation i on i.id = t.installation_id
             where i.account_id = 'acc-2')
         where installation_id = (select id from installation where account_id = 'acc-1')",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    assert_eq!(moved.rows_affected(), 1);

    // A replica with nothing in memory has to read acc-1's row.
    let replica = app.replica(&[]).await.unwrap();
    let response = app.token_at(&replica.internal, &key, &body_1).await;
    assert_eq!(response.status(), 200);
    let served = token_for(response.json().await.unwrap());
    assert_ne!(served, other, "acc-2's token was handed out for acc-1");
    assert_ne!(served, first);
    assert_eq!(app.upstream.call_count(), 3, "the unreadable row is replaced by a mint");
}
