//! Each of the four provider styles of issue 11 end to end, against real authorization-server software
//! nobody here wrote (authlib and oidc-provider, started on loopback): credentials registered through the
//! admin API, a token, the same token again from cache, a renewal the provider's way (counted by the
//! server), and no secret or refresh token in any answer, the database or the logs (the TRACE scanner).

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

fn secret() -> String {
    format!("csecret-{}", uuid::Uuid::new_v4().simple())
}

fn client_id() -> String {
    format!("cid-{}", uuid::Uuid::new_v4().simple())
}

/// A refresh token of the shape the leak scanner knows.
fn refresh_token() -> String {
    format!("rt-{}{}", uuid::Uuid::new_v4().simple(), &uuid::Uuid::new_v4().simple().to_string()[..16])
}

/// An app whose settings file defines `providers` (TOML), with an admin key and a key granted every
/// provider, account and scope.
async fn app_with(providers: &str) -> (TestApp, String, String) {
    let app = spawn_app_with(Options { config_toml: providers.to_owned(), ..Options::default() }).await;
    let admin = app.client(&[], &[], true).await;
    let key = app.client(&["*"], &["*"], false).await;
    (app, admin, key)
}

async fn token_of(app: &TestApp, base: &str, key: &str, body: &Value) -> Value {
    let response = app.token_at(base, key, body).await;
    let status = response.status();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{answer}");
    answer
}

/// None of `secrets` in the database (any table, as JSON) nor in `answers`.
async fn assert_nowhere(app: &TestApp, secrets: &[&str], answers: &[String]) {
    let dump = app.dump().await;
    for secret in secrets {
        assert!(!dump.contains(secret), "a secret is in the database in clear");
        for answer in answers {
            assert!(!answer.contains(secret), "a secret is in an answer: {answer}");
        }
    }
}

async fn admin_views(app: &TestApp, admin: &str) -> Vec<String> {
    let mut views = Vec::new();
    for path in ["/v1/installations", "/v1/providers"] {
        views.push(
            app.http
                .get(format!("{}{path}", app.internal))
                .bearer_auth(admin)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
    }
    views
}

#[tokio::test]
async fn triumph_style_client_credentials_without_a_scope_parameter() {
    let (id, secret) = (client_id(), secret());
    let server = ConformanceServer::authlib(&json!({
        "clients": [{"client_id": id, "client_secret": secret, "auth_methods": ["client_secret_post"],
                     "grant_types": ["client_credentials"], "scope": "fleet"}],
        "access_token_lifetime_secs": 2,
        "refuse_scope_parameter": true,
    }));
    let toml = format!("[providers.triumph]\ntoken_url = \"{}/token\"\nsend_scope = false\n", server.base);
    let (app, admin, key) = app_with(&toml).await;
    let put = app.put_credentials(&admin, "triumph", "acme", &json!({"client_id": id, "client_secret": secret})).await;
    assert_eq!(put.status(), 201);
    let put = put.text().await.unwrap();

    let ask = json!({"provider": "triumph", "account_id": "acme"});
    let first = token_of(&app, &app.internal, &key, &ask).await;
    let again = token_of(&app, &app.internal, &key, &ask).await;
    assert_eq!(first["access_token"], again["access_token"], "from cache");
    assert_eq!(server.grants("client_credentials").await, 1);

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let renewed = token_of(&app, &app.internal, &key, &ask).await;
    assert_ne!(renewed["access_token"], first["access_token"]);
    assert_eq!(server.grants("client_credentials").await, 2, "renewed with client_credentials");
    assert_eq!(server.stats().await["invalid_client"], 0);

    let mut answers = admin_views(&app, &admin).await;
    answers.push(put);
    answers.extend([first, again, renewed].map(|answer| answer.to_string()));
    assert_nowhere(&app, &[&secret, &id], &answers).await;
}

#[tokio::test]
async fn keycloak_style_refresh_tokens_renew_and_fall_back_to_client_credentials_when_refused() {
    let (id, secret) = (client_id(), secret());
    let server = ConformanceServer::authlib(&json!({
        "clients": [{"client_id": id, "client_secret": secret, "auth_methods": ["client_secret_basic"],
                     "grant_types": ["client_credentials", "refresh_token"], "scope": "sims"}],
        "access_token_lifetime_secs": 2,
        "refresh_token_lifetime_secs": 30,
        "client_credentials_refresh_tokens": true,
        "rotate_refresh_tokens": true,
    }));
    let toml = format!(
        "[providers.truphone]\ntoken_url = \"{}/realms/test/protocol/openid-connect/token\"\nclient_auth = \"client_secret_basic\"\n",
        server.base
    );
    let (app, admin, key) = app_with(&toml).await;
    assert_eq!(
        app.put_credentials(&admin, "truphone", "acme", &json!({"client_id": id, "client_secret": secret}))
            .await
            .status(),
        201
    );

    let ask = json!({"provider": "truphone", "account_id": "acme", "scopes": ["sims"], "min_ttl_seconds": 0});
    let first = token_of(&app, &app.internal, &key, &ask).await;
    assert!(first.get("refresh_token").is_none(), "the refresh token is never handed out");
    assert_eq!(token_of(&app, &app.internal, &key, &ask).await["access_token"], first["access_token"]);
    assert_eq!((server.grants("client_credentials").await, server.grants("refresh_token").await), (1, 0));
    let sealed: i64 = sqlx::query_scalar("select count(*) from token_cache where refresh_token_ciphertext is not null")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(sealed, 1, "the refresh token is kept, sealed");

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let renewed = token_of(&app, &app.internal, &key, &ask).await;
    assert_ne!(renewed["access_token"], first["access_token"]);
    assert_eq!(
        (server.grants("client_credentials").await, server.grants("refresh_token").await),
        (1, 1),
        "renewed with the refresh token"
    );

    // The realm forgets its refresh tokens (a restart, a revoked session): refused, then client credentials.
    server.post("/admin/expire-refresh-tokens").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let fallback = token_of(&app, &app.internal, &key, &ask).await;
    assert_ne!(fallback["access_token"], renewed["access_token"]);
    assert_eq!((server.grants("client_credentials").await, server.grants("refresh_token").await), (2, 1));
    assert_eq!(app.status_of("acme").await, "active", "invalid_grant on a client's refresh token rejects nothing");
    assert_eq!(server.stats().await["refresh_reuse"], 0, "no refresh token was presented twice");

    let answers: Vec<String> = [first, renewed, fallback].iter().map(Value::to_string).collect();
    assert_nowhere(&app, &[&secret, &id], &answers).await;
}

#[tokio::test]
async fn a_refresh_token_the_provider_says_has_expired_is_not_presented() {
    let (id, secret) = (client_id(), secret());
    // The refresh token lives 3 s, under tokenvault's 5 s margin: it counts as expired at once.
    let server = ConformanceServer::authlib(&json!({
        "clients": [{"client_id": id, "client_secret": secret, "auth_methods": ["client_secret_post"],
                     "grant_types": ["client_credentials", "refresh_token"], "scope": "sims"}],
        "access_token_lifetime_secs": 2,
        "refresh_token_lifetime_secs": 3,
        "client_credentials_refresh_tokens": true,
    }));
    let toml = format!("[providers.truphone]\ntoken_url = \"{}/token\"\n", server.base);
    let (app, admin, key) = app_with(&toml).await;
    app.put_credentials(&admin, "truphone", "acme", &json!({"client_id": id, "client_secret": secret})).await;
    let ask = json!({"provider": "truphone", "account_id": "acme", "scopes": ["sims"], "min_ttl_seconds": 0});
    token_of(&app, &app.internal, &key, &ask).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    token_of(&app, &app.internal, &key, &ask).await;
    let stats = server.stats().await;
    assert_eq!(
        (stats["grants"]["client_credentials"].as_u64(), stats["grants"]["refresh_token"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(stats["requests"], 2, "no refresh attempt was made");
}

#[tokio::test]
async fn trulioo_style_replies_default_scopes_jwt_expiry_and_a_margin() {
    let (id, secret) = (client_id(), secret());
    let server = ConformanceServer::authlib(&json!({
        "clients": [{"client_id": id, "client_secret": secret, "auth_methods": ["client_secret_post"],
                     "grant_types": ["client_credentials"], "scope": "workflow.studio.api"}],
        "access_token_lifetime_secs": 33,
        "reply_style": "trulioo",
        "jwt_access_tokens": true,
    }));
    let toml = format!(
        "[providers.trulioo]\ntoken_url = \"{}/token\"\ndefault_scopes = [\"workflow.studio.api\"]\n\
         expiry_from_jwt = \"earliest\"\nexpiry_margin_secs = 30\n\
         [providers.trulioo.reply]\naccess_token = \"Token\"\ntoken_type = \"TokenType\"\nexpires_in = \"ExpiresIn\"\n",
        server.base
    );
    let (app, admin, key) = app_with(&toml).await;
    app.put_credentials(&admin, "trulioo", "acme", &json!({"client_id": id, "client_secret": secret})).await;

    let ask = json!({"provider": "trulioo", "account_id": "acme", "min_ttl_seconds": 0});
    let first = token_of(&app, &app.internal, &key, &ask).await;
    assert_eq!(first["scope"], "workflow.studio.api", "the default scope was asked and granted");
    assert_eq!(first["token_type"], "Bearer");
    let expires_in = first["expires_in"].as_i64().unwrap();
    assert!((1..=3).contains(&expires_in), "33 s less the 30 s margin: {first}");
    // The token is a JWT whose exp is the provider's expiry; tokenvault's is 30 s earlier.
    let claims = first["access_token"].as_str().unwrap().split('.').nth(1).unwrap();
    use base64::Engine;
    let claims: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    let expires_at = chrono::DateTime::parse_from_rfc3339(first["expires_at"].as_str().unwrap()).unwrap().timestamp();
    assert!((claims["exp"].as_i64().unwrap() - expires_at - 30).abs() <= 1, "{claims} vs {first}");
    assert_eq!(token_of(&app, &app.internal, &key, &ask).await["access_token"], first["access_token"]);
    assert_eq!(server.grants("client_credentials").await, 1);

    tokio::time::sleep(Duration::from_secs(expires_in as u64 + 1)).await;
    let renewed = token_of(&app, &app.internal, &key, &ask).await;
    assert_ne!(renewed["access_token"], first["access_token"]);
    assert_eq!(server.grants("client_credentials").await, 2, "renewed within the margin, before the provider's expiry");
    assert_nowhere(&app, &[&secret, &id, first["access_token"].as_str().unwrap()], &admin_views(&app, &admin).await)
        .await;
}

fn delegated_server(id: &str, refresh: &str) -> ConformanceServer {
    ConformanceServer::authlib(&json!({
        "clients": [{"client_id": id, "client_secret": null, "auth_methods": ["none"],
                     "grant_types": ["refresh_token"], "scope": "calendar.read calendar.write"}],
        "access_token_lifetime_secs": 2,
        "rotate_refresh_tokens": true,
        "delegated_refresh_tokens": [{"refresh_token": refresh, "client_id": id,
                                      "scope": "calendar.read calendar.write", "user": "alice"}],
    }))
}

#[tokio::test]
async fn authress_style_user_delegated_refresh_tokens_are_rotated_and_never_revealed() {
    let (id, refresh) = (client_id(), refresh_token());
    let server = delegated_server(&id, &refresh);
    let toml =
        format!("[providers.vault]\ntoken_url = \"{}/token\"\ndefault_scopes = [\"calendar.read\"]\n", server.base);
    let (app, admin, key) = app_with(&toml).await;
    // A public client: a refresh token and no secret.
    let put = app.put_credentials(&admin, "vault", "alice", &json!({"client_id": id, "refresh_token": refresh})).await;
    assert_eq!(put.status(), 201);
    let put = put.text().await.unwrap();

    let ask = |min_ttl: u64| json!({"provider": "vault", "account_id": "alice", "min_ttl_seconds": min_ttl});
    let first = token_of(&app, &app.internal, &key, &ask(0)).await;
    assert_eq!(token_of(&app, &app.internal, &key, &ask(1)).await["access_token"], first["access_token"]);
    assert_eq!((server.grants("refresh_token").await, server.grants("client_credentials").await), (1, 0));

    // A request that needs more life than is left gets a renewed token, with the rotated refresh token.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let renewed = token_of(&app, &app.internal, &key, &ask(1)).await;
    assert_ne!(renewed["access_token"], first["access_token"]);
    assert_eq!(server.grants("refresh_token").await, 2);
    assert_eq!(server.stats().await["refresh_reuse"], 0, "each refresh token was spent once");
    let generation: i64 =
        sqlx::query_scalar("select generation from refresh_token").fetch_one(&app.pool).await.unwrap();
    assert_eq!(generation, 3, "registered, then rotated twice");

    let mut answers = admin_views(&app, &admin).await;
    answers.push(put);
    answers.extend([first, renewed].map(|answer| answer.to_string()));
    assert_nowhere(&app, &[&refresh, &id], &answers).await;
}

#[tokio::test]
async fn three_replicas_racing_to_renew_one_delegated_credential_spend_its_refresh_token_once() {
    let (id, refresh) = (client_id(), refresh_token());
    let server = delegated_server(&id, &refresh);
    let toml =
        format!("[providers.vault]\ntoken_url = \"{}/token\"\ndefault_scopes = [\"calendar.read\"]\n", server.base);
    let (app, admin, key) = app_with(&toml).await;
    let (second, third) = (app.replica(&[]).await.unwrap(), app.replica(&[]).await.unwrap());
    app.put_credentials(&admin, "vault", "alice", &json!({"client_id": id, "refresh_token": refresh})).await;
    // Three scope sets (three tokens, one refresh token between them), each asked on every replica.
    let scope_sets = [&["calendar.read"][..], &["calendar.write"], &["calendar.read", "calendar.write"]];
    for round in 1..=2u64 {
        let racers = [&app.internal, &second.internal, &third.internal].into_iter().flat_map(|base| {
            scope_sets.iter().map(move |scopes| {
                let ask = json!({"provider": "vault", "account_id": "alice", "scopes": scopes, "min_ttl_seconds": 1});
                (base, ask)
            })
        });
        let answers = futures_util::future::join_all(racers.map(|(base, ask)| {
            let (app, key) = (&app, &key);
            async move { (ask["scopes"].to_string(), token_of(app, base, key, &ask).await) }
        }))
        .await;
        for (scopes, answer) in &answers {
            let same = answers.iter().filter(|(other, _)| other == scopes);
            assert!(same.clone().all(|(_, a)| a["access_token"] == answer["access_token"]), "one token per scope set");
        }
        assert_eq!(server.grants("refresh_token").await, 3 * round, "one refresh per scope set and round");
        assert_eq!(server.stats().await["refresh_reuse"], 0, "no refresh token was presented twice");
        tokio::time::sleep(Duration::from_millis(2100)).await;
    }
    assert_eq!(app.status_of("alice").await, "active");
}

#[tokio::test]
async fn standard_client_credentials_at_oidc_provider_give_jwts_its_own_jwks_verifies() {
    let (id, secret) = (client_id(), secret());
    let server = ConformanceServer::oidc_provider(&json!({
        "clients": [{"client_id": id, "client_secret": secret, "auth_method": "client_secret_basic",
                     "scope": "api.read api.write"}],
        "access_token_lifetime_secs": 3,
        "resource": "urn:tokenvault:test-api",
    }));
    let toml =
        format!("[providers.standard]\ntoken_url = \"{}/token\"\nclient_auth = \"client_secret_basic\"\n", server.base);
    let (app, admin, key) = app_with(&toml).await;
    app.put_credentials(&admin, "standard", "acme", &json!({"client_id": id, "client_secret": secret})).await;

    let ask = json!({"provider": "standard", "account_id": "acme", "scopes": ["api.read"], "min_ttl_seconds": 0});
    let first = token_of(&app, &app.internal, &key, &ask).await;
    let token = first["access_token"].as_str().unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    let jwks: jsonwebtoken::jwk::JwkSet =
        reqwest::get(format!("{}/jwks", server.base)).await.unwrap().json().await.unwrap();
    let jwk = jwks.find(header.kid.as_deref().unwrap()).expect("the signing key is in the server's JWKS");
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_audience(&["urn:tokenvault:test-api"]);
    let verified =
        jsonwebtoken::decode::<Value>(token, &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(), &validation)
            .expect("the signature verifies against the server's own JWKS");
    let expires_at = chrono::DateTime::parse_from_rfc3339(first["expires_at"].as_str().unwrap()).unwrap().timestamp();
    assert_eq!(verified.claims["exp"].as_i64().unwrap(), expires_at, "expiry as the server says");
    assert_eq!(first["scope"], "api.read");
    assert_eq!(token_of(&app, &app.internal, &key, &ask).await["access_token"], first["access_token"]);
    assert_eq!(server.grants("client_credentials").await, 1);

    tokio::time::sleep(Duration::from_millis(3100)).await;
    let renewed = token_of(&app, &app.internal, &key, &ask).await;
    assert_ne!(renewed["access_token"], first["access_token"]);
    assert_eq!(server.grants("client_credentials").await, 2);
    assert_eq!(server.stats().await["invalid_client"], 0);
    assert_nowhere(&app, &[&secret, &id, token], &admin_views(&app, &admin).await).await;
}

#[tokio::test]
async fn a_wrong_secret_at_a_real_server_rejects_the_credentials_until_new_ones_are_registered() {
    let (id, secret) = (client_id(), secret());
    let server = ConformanceServer::authlib(&json!({
        "clients": [{"client_id": id, "client_secret": secret, "auth_methods": ["client_secret_post"],
                     "grant_types": ["client_credentials"], "scope": "a"}],
    }));
    let toml = format!("[providers.p]\ntoken_url = \"{}/token\"\n", server.base);
    let (app, admin, key) = app_with(&toml).await;
    app.put_credentials(&admin, "p", "acme", &json!({"client_id": id, "client_secret": "csecret-wrong"})).await;
    let ask = json!({"provider": "p", "account_id": "acme", "scopes": ["a"]});
    assert_problem(app.token(&key, &ask).await, 502, "upstream_rejected").await;
    assert_problem(app.token(&key, &ask).await, 502, "upstream_rejected").await;
    assert_eq!(server.stats().await["invalid_client"], 1, "one call: rejected, not retried");
    assert_eq!(app.status_of("acme").await, "rejected");

    let replaced = app.put_credentials(&admin, "p", "acme", &json!({"client_id": id, "client_secret": secret})).await;
    assert_eq!(replaced.status(), 200);
    let answer = eventually(|| app.token(&key, &ask), |r| r.status() == 200).await;
    assert_eq!(answer.status(), 200, "new credentials work at once");
}
