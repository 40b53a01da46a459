//! Upgrading (issue 11): migrations only add and rename, so a database written before providers existed
//! keeps its credentials, cached tokens and service keys working after `migrate`, with no operator step.
//! The old database is built here by applying only the migrations of that time and writing rows the way
//! the code of that time wrote them; then the current migrations run and the current app serves it.

use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection};
use tokenvault::crypto::{Aad, AadVersion, CredentialRow, KeyRing, SecretField, TokenRow};
use tokenvault::domain::ServiceKey;
use tokenvault::store::{MIGRATOR, api_client};

use crate::helpers::*;

/// The first migration of providers as configuration: everything before it is the old schema.
const PROVIDERS_MIGRATION: i64 = 20261204000007;

/// A database of this test's own, dropped (like the helpers' per-test databases) when this is.
struct OldDatabase {
    name: String,
    url: String,
}

impl OldDatabase {
    async fn create() -> Self {
        let name = format!("tv_test_{}", uuid::Uuid::new_v4().simple());
        let server = server_url();
        let mut admin = PgConnection::connect(&server).await.expect("PostgreSQL is reachable (run `make test`)");
        admin.execute(format!(r#"create database "{name}""#).as_str()).await.unwrap();
        admin.close().await.ok();
        let mut url = url::Url::parse(&server).expect("DATABASE_URL is a URL");
        url.set_path(&name);
        Self { name, url: url.to_string() }
    }
}

impl Drop for OldDatabase {
    fn drop(&mut self) {
        drop_database(&self.name);
    }
}

/// The migrator of a release from before providers: the same embedded migrations (same checksums, as
/// sqlx records them in `_sqlx_migrations`), only those older than [`PROVIDERS_MIGRATION`].
fn migrator_before_providers() -> sqlx::migrate::Migrator {
    let old: Vec<_> = MIGRATOR.migrations.iter().filter(|m| m.version < PROVIDERS_MIGRATION).cloned().collect();
    assert_eq!(
        old.len(),
        11,
        "migrations 1 to 6 of both dates: {:?}",
        old.iter().map(|m| m.version).collect::<Vec<_>>()
    );
    sqlx::migrate::Migrator { migrations: std::borrow::Cow::Owned(old), ..MIGRATOR }
}

fn ask(account: &str, scopes: &[&str]) -> Value {
    json!({ "account_id": account, "scopes": scopes })
}

#[tokio::test]
async fn a_database_from_before_providers_keeps_its_credentials_cached_tokens_and_keys_after_migrating() {
    // The app whose fake Trackunit (and settings, with one other provider) the upgraded database is served
    // with; its own database is not used.
    let config_toml = "[providers.other]\ntoken_url = \"{trackunit}/apptoken\"\n".to_owned();
    let app = spawn_app_with(Options { config_toml, ..Options::default() }).await;
    let ring = KeyRing::parse(&app.encryption_keys).unwrap();

    // 1-2. A database migrated by the release before providers.
    let old = OldDatabase::create().await;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&old.url).await.unwrap();
    migrator_before_providers().run(&pool).await.unwrap();
    let provider_column: bool = sqlx::query_scalar(
        "select exists (select from information_schema.columns
         where table_name = 'installation' and column_name = 'provider')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(!provider_column, "the old schema has no providers yet");

    // 3. Rows as that release wrote them. acc-v2: sealed with the second associated data (which names the
    // provider, then implicitly Trackunit) and marked so; acc-v1: sealed with the first and left at the
    // column's default, as every row written before migration 6 is.
    let v2 = (uuid::Uuid::new_v4(), credentials(), 2_i64);
    let v1 = (uuid::Uuid::new_v4(), credentials(), 1_i64);
    for (account, (id, creds, version), aad) in [("acc-v2", &v2, AadVersion::V2), ("acc-v1", &v1, AadVersion::V1)] {
        let row = CredentialRow {
            provider: "trackunit",
            app_id: APP_ID,
            account_id: account,
            installation_id: *id,
            credentials_version: *version,
        };
        let seal = |value: &str, field| ring.seal(value.as_bytes(), &Aad::credential(aad, &row, field));
        let (client_id, client_secret) =
            (seal(&creds.client_id, SecretField::ClientId), seal(&creds.client_secret, SecretField::ClientSecret));
        let insert = if aad == AadVersion::V1 {
            "insert into installation (id, app_id, account_id, status, key_id, client_id_ciphertext,
                 client_secret_ciphertext, identity_issued_at, credentials_version)
             values ($1, $2, $3, 'active', $4, $5, $6, now(), $7)"
        } else {
            "insert into installation (id, app_id, account_id, status, key_id, client_id_ciphertext,
                 client_secret_ciphertext, identity_issued_at, credentials_version, aad_version)
             values ($1, $2, $3, 'active', $4, $5, $6, now(), $7, 2)"
        };
        sqlx::query(insert)
            .bind(id)
            .bind(APP_ID)
            .bind(account)
            .bind(client_id.key_id.as_str())
            .bind(&client_id.bytes)
            .bind(&client_secret.bytes)
            .bind(version)
            .execute(&pool)
            .await
            .unwrap();
    }
    // A token cached for acc-v1's scope set "cached", sealed with the first associated data (as the token
    // cache of migration 3 held it, aad_version left at its default).
    let cached_token = format!("at-900-{}", uuid::Uuid::new_v4().simple());
    let issued_at = chrono::Utc::now();
    let expires_at = issued_at + chrono::Duration::hours(1);
    let bound = TokenRow {
        installation_id: v1.0,
        credentials_version: v1.2,
        scope_key: "cached",
        token_type: "Bearer",
        granted_scope: "cached",
        expires_at_ms: expires_at.timestamp_millis(),
    };
    let sealed = ring.seal(cached_token.as_bytes(), &Aad::cached_token(AadVersion::V1, &bound, None));
    sqlx::query(
        "insert into token_cache (installation_id, scope_key, credentials_version, key_id,
             access_token_ciphertext, token_type, granted_scope, issued_at, expires_at)
         values ($1, 'cached', $2, $3, $4, 'Bearer', 'cached', $5, $6)",
    )
    .bind(v1.0)
    .bind(v1.2)
    .bind(sealed.key_id.as_str())
    .bind(&sealed.bytes)
    .bind(issued_at)
    .bind(expires_at)
    .execute(&pool)
    .await
    .unwrap();
    // A service key as `clients create` of that release made it: its digest, every account and scope, and
    // (migration 5's default) every app.
    let old_key = ServiceKey::generate();
    sqlx::query("insert into api_client (name, key_sha256, accounts, scopes) values ('old-service', $1, '{*}', '{*}')")
        .bind(&old_key.sha256()[..])
        .execute(&pool)
        .await
        .unwrap();

    // 4. The current release's migrations, as `tokenvault migrate` runs them.
    tokenvault::store::migrate(&pool).await.expect("the old database migrates");
    let admin = ServiceKey::generate();
    api_client::create(&pool, "admin", &admin.sha256(), &admin_grants()).await.unwrap();

    // 5. The current app over the upgraded database, with the same encryption keys and fake Trackunit.
    let upgraded = app.replica(&[("DATABASE_URL", old.url.as_str())]).await.expect("the app starts on it");

    // 6. The old key gets Trackunit tokens minted with the stored credentials, for both rows.
    let key = old_key.expose();
    for (account, (_, creds, _)) in [("acc-v2", &v2), ("acc-v1", &v1)] {
        let response = app.token_at(&upgraded.internal, key, &ask(account, &["a"])).await;
        assert_eq!(response.status(), 200, "{account}: {}", response.text().await.unwrap());
        let form = app.upstream.calls.lock().unwrap().last().cloned().unwrap();
        assert_eq!(
            (form["client_id"].as_str(), form["client_secret"].as_str()),
            (creds.client_id.as_str(), creds.client_secret.as_str()),
            "{account}: minted with the credentials stored before the upgrade"
        );
    }
    assert_eq!(app.upstream.call_count(), 2);

    // The token cached before the upgrade is served as it is, without an upstream call.
    let response = app.token_at(&upgraded.internal, key, &ask("acc-v1", &["cached"])).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["access_token"], cached_token.as_str(), "{answer}");
    assert_eq!(app.upstream.call_count(), 2, "the cached token needed no upstream call");

    // Keys made before providers keep Trackunit only.
    let other = json!({ "provider": "other", "account_id": "acc-v2", "scopes": ["a"] });
    let problem = assert_problem(app.token_at(&upgraded.internal, key, &other).await, 403, "forbidden").await;
    assert!(problem["detail"].as_str().unwrap().contains("provider"), "{problem}");
    let providers: Vec<String> =
        sqlx::query_scalar("select unnest(providers) from api_client where name = 'old-service'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(providers, ["trackunit"]);

    // Both installations are listed, as Trackunit's.
    let listed = app
        .http
        .get(format!("{}/v1/installations", upgraded.internal))
        .bearer_auth(admin.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    let listed: Value = listed.json().await.unwrap();
    let mut rows: Vec<(&str, &str, &str, &str)> = listed["installations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let field = |name: &str| i[name].as_str().unwrap_or_default();
            (field("account_id"), field("provider"), field("app_id"), field("status"))
        })
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        [("acc-v1", "trackunit", APP_ID, "active"), ("acc-v2", "trackunit", APP_ID, "active")],
        "{listed}"
    );

    drop(upgraded);
    pool.close().await;
}
