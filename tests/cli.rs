//! The real binary: exit codes, what it prints, and graceful shutdown of `serve` on SIGTERM.

#[path = "api/helpers.rs"]
#[allow(dead_code, reason = "shared helpers; this binary uses a subset")]
mod helpers;
#[path = "support/process.rs"]
#[allow(dead_code, reason = "shared with the client crate's tests")]
mod process;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use helpers::*;
use process::*;
use serde_json::json;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(command: &mut Command) -> Output {
    command.output().expect("the binary runs")
}

#[test]
fn every_subcommand_has_help() {
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["migrate", "--help"],
        &["keys", "generate", "--help"],
        &["clients", "create", "--help"],
        &["clients", "list", "--help"],
        &["clients", "revoke", "--help"],
        &["installations", "list", "--help"],
        &["installations", "reactivate", "--help"],
        &["identity", "claims", "--help"],
        &["credentials", "put", "--help"],
        &["credentials", "delete", "--help"],
        &["credentials", "list", "--help"],
        &["providers", "list", "--help"],
        &["clients", "rotate", "--help"],
        &["audit", "list", "--help"],
        &["healthcheck", "--help"],
        &["openapi", "--help"],
        &["sandbox", "--help"],
        &["sandbox", "install", "--help"],
    ] {
        let output = run(tokenvault().args(args));
        assert!(output.status.success(), "{args:?}");
        assert!(text(&output.stdout).contains("Usage:"), "{args:?}");
    }
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(run(tokenvault().arg("frobnicate")).status.code(), Some(2));
    assert_eq!(run(tokenvault().args(["clients", "create"])).status.code(), Some(2), "--name is required");
}

#[test]
fn a_missing_or_malformed_setting_exits_1_with_one_line_naming_it() {
    let output = run(tokenvault().arg("serve"));
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");

    let output = run(tokenvault()
        .args(["clients", "list"])
        .env("DATABASE_URL", "postgres://x")
        .env("TOKENVAULT_ENCRYPTION_KEYS", "k:short"));
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("TOKENVAULT_ENCRYPTION_KEYS"), "{}", text(&output.stderr));
}

#[test]
fn keys_generate_prints_a_usable_key_and_needs_no_settings() {
    let output = run(tokenvault().args(["keys", "generate", "--id", "k2027"]));
    assert!(output.status.success());
    let line = text(&output.stdout).trim().to_owned();
    assert!(line.starts_with("k2027:"));
    assert!(tokenvault::crypto::KeyRing::parse(&line).is_ok());
    let again = text(&run(tokenvault().args(["keys", "generate"])).stdout);
    assert_ne!(line, again.trim());
}

#[tokio::test]
async fn clients_create_prints_the_key_once_and_stores_only_its_hash() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let output = run(tokenvault_for(&app).args([
        "clients",
        "create",
        "--name",
        "billing",
        "--account",
        "*",
        "--scope",
        "asset.view",
    ]));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let key = stdout.trim().lines().last().unwrap().to_owned();
    assert!(key.starts_with("tvk_") && !key.contains(' '), "{key}");

    let stored: Vec<u8> = sqlx::query_scalar("select key_sha256 from api_client where name = 'billing'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, tokenvault::domain::ServiceKey::digest(&key).to_vec());
    assert_eq!(app.token(&key, &json!({"account_id": "acc-1", "scopes": ["asset.view"]})).await.status(), 200);

    let listing = text(&run(tokenvault_for(&app).args(["clients", "list"])).stdout);
    assert!(listing.contains("billing") && !listing.contains(&key[4..]), "{listing}");

    let useless = run(tokenvault_for(&app).args(["clients", "create", "--name", "nothing"]));
    assert_eq!(useless.status.code(), Some(1), "a client with no grants is refused");
    let duplicate = run(tokenvault_for(&app).args(["clients", "create", "--name", "billing", "--admin"]));
    assert_eq!(duplicate.status.code(), Some(1));
    assert!(text(&duplicate.stderr).contains("already exists"));

    assert!(run(tokenvault_for(&app).args(["clients", "revoke", "billing"])).status.success());
    let body = json!({"account_id": "acc-1", "scopes": ["asset.view"]});
    let response = eventually(|| app.token(&key, &body), |r| r.status() == 401).await;
    assert_eq!(response.status(), 401, "the revocation reached the running server");
    assert_eq!(run(tokenvault_for(&app).args(["clients", "revoke", "billing"])).status.code(), Some(1));
}

#[tokio::test]
async fn installations_list_shows_accounts_but_no_credentials() {
    let app = spawn_app().await;
    let credentials = app.install("acc-listed").await;
    let output = run(tokenvault_for(&app).args(["installations", "list"]));
    assert!(output.status.success());
    let stdout = text(&output.stdout);
    assert!(stdout.contains("acc-listed") && stdout.contains(APP_ID) && stdout.contains("active"), "{stdout}");
    assert!(!stdout.contains(&credentials.client_id) && !stdout.contains(&credentials.client_secret));
}

#[tokio::test]
async fn migrate_applies_the_embedded_migrations_to_an_empty_database() {
    let app = spawn_app().await;
    let database = format!("tv_migrate_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!(r#"create database "{database}""#)).execute(&app.pool).await.unwrap();
    let mut url = url::Url::parse(&app.database_url).unwrap();
    url.set_path(&database);
    let output = run(tokenvault_for(&app).args(["migrate"]).env("DATABASE_URL", url.as_str()));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let pool = sqlx::PgPool::connect(url.as_str()).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "select count(*) from information_schema.tables where table_name in ('installation', 'api_client', 'token_cache', 'callback_event')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 4);
    assert!(
        run(tokenvault_for(&app).args(["migrate"]).env("DATABASE_URL", url.as_str())).status.success(),
        "idempotent"
    );
    pool.close().await;
    drop_database(&database);
}

#[tokio::test]
async fn serve_finishes_in_flight_requests_on_sigterm_then_exits_0() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let (mut child, _, internal) = serve(&app).await;
    let base = format!("http://127.0.0.1:{internal}");

    *app.upstream.delay.lock().unwrap() = Duration::from_millis(1500);
    let in_flight = {
        let (http, key) = (app.http.clone(), key.clone());
        tokio::spawn(async move {
            http.post(format!("{base}/v1/tokens"))
                .bearer_auth(key)
                .json(&json!({"account_id": "acc-1", "scopes": ["a"]}))
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());

    let response = in_flight.await.unwrap().expect("the in-flight request was answered");
    assert_eq!(response.status(), 200);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn the_keys_used_since_the_last_minutes_write_are_written_down_when_serve_stops() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let used = app.client(&["*"], &["*"], false).await;
    app.client(&["*"], &["*"], false).await;
    let (mut child, _, internal) = serve(&app).await;
    let (base, body) = (format!("http://127.0.0.1:{internal}"), json!({"account_id": "acc-1", "scopes": ["a"]}));
    assert_eq!(app.token_at(&base, &used, &body).await.status(), 200);
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "{status:?}");

    let listed = text(&run(tokenvault_for(&app).args(["clients", "list", "--output", "json"])).stdout);
    let clients = listed.lines().map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap());
    let mut last_used: Vec<bool> = clients.map(|client| client["last_used_at"].is_string()).collect();
    last_used.sort();
    assert_eq!(last_used, [false, true], "the used key only, well before a minute passed: {listed}");
}

#[tokio::test]
async fn keys_status_and_rotate_report_per_key_counts_and_name_unreadable_rows() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    app.install("acc-2").await;
    let next = format!("next:{}", tokenvault::crypto::generate_key());
    let ring = format!("{next},{}", app.encryption_keys);

    let status =
        text(&run(tokenvault_for(&app).args(["keys", "status"]).env("TOKENVAULT_ENCRYPTION_KEYS", &ring)).stdout);
    let line = status.lines().find(|l| l.starts_with("test ")).unwrap_or_default();
    assert!(line.contains("yes") && line.split_whitespace().nth(2) == Some("2"), "{status}");
    let status =
        run(tokenvault_for(&app).args(["keys", "status", "--output", "json"]).env("TOKENVAULT_ENCRYPTION_KEYS", &ring));
    let lines: Vec<serde_json::Value> =
        text(&status.stdout).lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(
        lines,
        [
            json!({"key_id": "next", "in_ring": "primary", "installations": 0, "cached_tokens": 0, "refresh_tokens": 0}),
            json!({"key_id": "test", "in_ring": "yes", "installations": 2, "cached_tokens": 0, "refresh_tokens": 0}),
        ]
    );

    let broken = app.break_credentials("acc-2").await;
    let before = app.snapshot().await;
    let dry = run(tokenvault_for(&app).args(["keys", "rotate", "--dry-run"]).env("TOKENVAULT_ENCRYPTION_KEYS", &ring));
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    assert!(text(&dry.stdout).contains("would re-encrypt 2 installation(s)"), "{}", text(&dry.stdout));
    assert_eq!(app.snapshot().await, before, "a dry run changes nothing");
    let output = run(tokenvault_for(&app)
        .args(["keys", "rotate", "--batch-size", "1"])
        .env("TOKENVAULT_ENCRYPTION_KEYS", &ring));
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stdout).contains("re-encrypted 1 installation"), "{}", text(&output.stdout));
    assert!(
        text(&output.stderr).contains("re-encrypted 1 installations so far"),
        "progress per batch: {}",
        text(&output.stderr)
    );
    assert!(text(&output.stderr).contains(&broken.to_string()), "{}", text(&output.stderr));

    let status =
        text(&run(tokenvault_for(&app).args(["keys", "status"]).env("TOKENVAULT_ENCRYPTION_KEYS", &ring)).stdout);
    let next_line = status.lines().find(|l| l.starts_with("next ")).unwrap_or_default();
    assert!(next_line.contains("primary") && next_line.split_whitespace().nth(2) == Some("1"), "{status}");
}

/// Starts `tokenvault serve` for `app` on free ports and waits until it answers; returns it and its ports.
async fn serve(app: &TestApp) -> (Served, u16, u16) {
    serve_on(app, &app.database_url).await
}

/// [`serve`] against another database.
async fn serve_on(app: &TestApp, database_url: &str) -> (Served, u16, u16) {
    serve_logging_to(app, database_url, Stdio::null()).await
}

/// [`serve_on`], its log (at `info`) going to `log`.
async fn serve_logging_to(app: &TestApp, database_url: &str, log: impl Into<Stdio>) -> (Served, u16, u16) {
    serve_with(app, database_url, log, &[]).await
}

#[tokio::test]
async fn after_kill_9_during_a_burst_of_callbacks_every_acknowledged_install_is_stored_and_decrypts() {
    let app = spawn_app().await;
    let (mut child, public, _) = serve(&app).await;
    let url = format!("http://127.0.0.1:{public}/callbacks/trackunit");
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let burst: Vec<_> = (0..400)
        .map(|i| {
            // One identity token per message, as Trackunit sends them.
            let token = identity();
            let (http, url, acked) = (app.http.clone(), url.clone(), acked.clone());
            tokio::spawn(async move {
                let account = format!("crash-{i}");
                let credentials = credentials();
                let response = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("Trackunit-Identity", &token)
                    .json(&installed_body(&account, &credentials))
                    .send()
                    .await;
                let status = response.map(|r| r.status().as_u16());
                if matches!(status, Ok(204)) {
                    acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                (account, credentials, status)
            })
        })
        .collect();
    // Kill mid-burst: once 50 callbacks were acknowledged, with the rest in flight or queued.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while acked.load(std::sync::atomic::Ordering::SeqCst) < 50 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(Command::new("kill").args(["-KILL", &child.id().to_string()]).status().unwrap().success());
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;

    let mut acknowledged = Vec::new();
    let mut lost = 0;
    for task in burst {
        match task.await.unwrap() {
            (account, credentials, Ok(204)) => acknowledged.push((account, credentials)),
            (_, _, Ok(status)) => panic!("unexpected status {status}"),
            (_, _, Err(_)) => lost += 1,
        }
    }
    assert!(acknowledged.len() >= 50, "the kill came mid-burst");
    assert!(lost > 0, "some callbacks were in flight when the process died");

    // After a restart, every acknowledged install is there and decrypts to what was sent.
    let (_restarted, _, _) = serve(&app).await;
    let ring = tokenvault::crypto::KeyRing::parse(&app.encryption_keys).unwrap();
    for (account, credentials) in &acknowledged {
        let (key_id, sealed, id, version): (String, Vec<u8>, uuid::Uuid, i64) = sqlx::query_as(
            "select key_id, client_secret_ciphertext, id, credentials_version from installation
             where app_id = $1 and account_id = $2",
        )
        .bind(APP_ID)
        .bind(account)
        .fetch_one(&app.pool)
        .await
        .unwrap_or_else(|_| panic!("{account} was acknowledged but is not stored"));
        let row = tokenvault::crypto::CredentialRow {
            provider: "trackunit",
            app_id: APP_ID,
            account_id: account,
            installation_id: id,
            credentials_version: version,
        };
        let aad = tokenvault::crypto::Aad::credential(
            tokenvault::crypto::AadVersion::CURRENT,
            &row,
            tokenvault::crypto::SecretField::ClientSecret,
        );
        let secret = ring.open_string(&key_id, &sealed, &aad).unwrap();
        assert_eq!(secrecy::ExposeSecret::expose_secret(&secret), credentials.client_secret);
    }
    eprintln!("{} acknowledged and stored, {lost} cut off by the kill", acknowledged.len());
}

/// Where a cluster of a test's own can live: the temporary directory, unless we are root and the
/// `postgres` user (who runs the server) cannot reach it, as with a private TMPDIR under a 0700 parent;
/// then a directory of /tmp made for the purpose, as scripts/with-env.sh does.
fn cluster_parent() -> std::path::PathBuf {
    let temp = std::env::temp_dir();
    let as_root = Command::new("id").arg("-u").output().map(|o| text(&o.stdout).trim() == "0").unwrap_or(false);
    let reachable = || {
        Command::new("runuser")
            .args(["-u", "postgres", "--", "test", "-x"])
            .arg(&temp)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !as_root || reachable() {
        return temp;
    }
    let shared = std::path::PathBuf::from("/tmp/tokenvault-test-clusters");
    std::fs::create_dir_all(&shared).unwrap();
    let _ = Command::new("chmod").args(["0711", shared.to_str().unwrap()]).status();
    shared
}

/// A PostgreSQL cluster of this test's own, so it can really be restarted without disturbing others.
struct PrivateCluster {
    bin: std::path::PathBuf,
    data: std::path::PathBuf,
    port: u16,
}

impl PrivateCluster {
    fn pg(&self, tool: &str) -> Command {
        let as_root = Command::new("id").arg("-u").output().map(|o| text(&o.stdout).trim() == "0").unwrap_or(false);
        let mut command = if as_root {
            let mut runuser = Command::new("runuser");
            runuser.args(["-u", "postgres", "--"]).arg(self.bin.join(tool));
            runuser
        } else {
            Command::new(self.bin.join(tool))
        };
        command.stdout(Stdio::null()).stderr(Stdio::null());
        command
    }

    fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries (make test installs them)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("an initdb under /usr/lib/postgresql");
        let data = cluster_parent().join(format!("tv-restart-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&data).unwrap();
        let _ = Command::new("chown").args(["postgres", data.to_str().unwrap()]).status();
        let cluster = Self { bin, data, port: free_port() };
        assert!(
            cluster
                .pg("initdb")
                .args(["-D", cluster.data.to_str().unwrap(), "-U", "postgres", "--auth=trust"])
                .status()
                .unwrap()
                .success()
        );
        cluster.pg_ctl("start");
        cluster
    }

    fn pg_ctl(&self, action: &str) {
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.data.display());
        let status = self
            .pg("pg_ctl")
            .args(["-D", self.data.to_str().unwrap(), "-w", "-m", "fast", "-o", &options, action])
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl {action}");
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = self.pg("pg_ctl").args(["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"]).status();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

#[tokio::test]
async fn postgres_restarted_under_load_cached_tokens_keep_flowing_and_callbacks_recover_without_restarting_tokenvault()
{
    let app = spawn_app().await; // the fake Trackunit and a key ring
    let cluster = PrivateCluster::start();
    let mut command = tokenvault_for(&app);
    command.env("DATABASE_URL", cluster.url());
    assert!(run(command.arg("migrate")).status.success());

    let (mut child, public, internal) = serve_on(&app, &cluster.url()).await;
    let callback = |account: &str| {
        app.http
            .post(format!("http://127.0.0.1:{public}/callbacks/trackunit"))
            .header("content-type", "application/json")
            .header("Trackunit-Identity", identity())
            .json(&installed_body(account, &credentials()))
            .send()
    };
    assert_eq!(callback("acc-1").await.unwrap().status(), 204, "the first install is stored");
    let pool = sqlx::PgPool::connect(&cluster.url()).await.unwrap();
    let key = tokenvault::domain::ServiceKey::generate();
    let grants = tokenvault::store::api_client::Grants {
        accounts: vec!["*".into()],
        scopes: vec!["*".into()],
        apps: vec!["*".into()],
        providers: vec!["*".into()],
        admin: false,
    };
    tokenvault::store::api_client::create(&pool, "load", &key.sha256(), &grants).await.unwrap();
    let token_url = format!("http://127.0.0.1:{internal}/v1/tokens");
    let body = json!({"account_id": "acc-1", "scopes": ["a"]});
    let ask_with = |key: String| app.http.post(&token_url).bearer_auth(key).json(&body).send();
    // Every NOTIFY of the set-up must have reached tokenvault before the outage: one arriving late would
    // drop a cached entry that the outage then cannot reload.
    notifications_arrived(&app.http, &pool, &format!("http://127.0.0.1:{internal}")).await;
    pool.close().await;
    let is = |status: u16| move |r: &reqwest::Result<reqwest::Response>| r.as_ref().is_ok_and(|r| r.status() == status);
    let first = eventually(|| ask_with(key.expose().to_owned()), is(200)).await.unwrap();
    assert_eq!(first.status(), 200);

    // Load: cached token requests, non-stop, while PostgreSQL restarts.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (http, url, key, body, stop) =
            (app.http.clone(), token_url.clone(), key.expose().to_owned(), body.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut served, mut failed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match http.post(&url).bearer_auth(&key).json(&body).send().await {
                    Ok(r) if r.status() == 200 => served += 1,
                    _ => failed += 1,
                }
            }
            (served, failed)
        })
    };
    cluster.pg_ctl("stop");
    let during = callback("acc-2").await.unwrap();
    assert_eq!(during.status(), 503, "a callback during the outage is refused, so Trackunit retries");
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.pg_ctl("start");

    // Callbacks succeed again, without restarting tokenvault.
    let after = eventually(|| callback("acc-2"), |r| r.as_ref().is_ok_and(|r| r.status() == 204)).await;
    let recovered = match after {
        Ok(response) if response.status() == 204 => true,
        _ => {
            // The pool may take a few seconds to notice; give it the acquire timeout twice more.
            let mut ok = false;
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if callback("acc-2").await.is_ok_and(|r| r.status() == 204) {
                    ok = true;
                    break;
                }
            }
            ok
        }
    };
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (served, failed) = load.await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(recovered, "callbacks succeed after the restart without restarting tokenvault");
    assert!(served > 50, "cached tokens kept flowing: {served} served, {failed} failed");
    assert_eq!(failed, 0, "no cached token request failed during the restart ({served} served)");
}

/// A counter of the `/metrics` of a process started by [`serve`]: its own, shared with no other test.
async fn counter(app: &TestApp, internal: u16, series: &str) -> u64 {
    let text = app.http.get(format!("http://127.0.0.1:{internal}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0)
}

/// `tokenvault_token_waits_total` of a process started by [`serve`], by `on`: shared_table, mint, queued.
async fn token_waits(app: &TestApp, internal: u16) -> Vec<u64> {
    let mut counts = Vec::new();
    for on in ["shared_table", "mint", "queued"] {
        counts.push(counter(app, internal, &format!("tokenvault_token_waits_total{{on=\"{on}\"}}")).await);
    }
    counts
}

#[tokio::test]
async fn token_waits_count_the_requests_that_waited_by_what_they_waited_on_and_never_a_memory_hit() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let (_served, _, internal) = serve(&app).await;
    let ask = |scope: &'static str| {
        app.http
            .post(format!("http://127.0.0.1:{internal}/v1/tokens"))
            .bearer_auth(&key)
            .json(&json!({"account_id": "acc-1", "scopes": [scope]}))
            .send()
    };
    let waits = || token_waits(&app, internal);

    // Another replica (the test's own app) mints scope a into the shared table; the process reads it.
    assert_eq!(app.token(&key, &json!({"account_id": "acc-1", "scopes": ["a"]})).await.status(), 200);
    assert_eq!(ask("a").await.unwrap().status(), 200);
    assert_eq!(waits().await, [1, 0, 0], "the first request read the shared table");
    for _ in 0..5 {
        assert_eq!(ask("a").await.unwrap().status(), 200);
    }
    assert_eq!(waits().await, [1, 0, 0], "memory hits never count as waits");

    assert_eq!(ask("b").await.unwrap().status(), 200);
    assert_eq!(waits().await, [1, 1, 0], "a key nobody holds is minted while the request waits");

    // Two requests at once for a new key, against a slow upstream: one mints, the other queues behind it.
    *app.upstream.delay.lock().unwrap() = Duration::from_millis(300);
    let (first, second) = tokio::join!(ask("c"), ask("c"));
    assert_eq!((first.unwrap().status().as_u16(), second.unwrap().status().as_u16()), (200, 200));
    assert_eq!(waits().await, [1, 2, 1], "the second request waited for the first one's mint");
    assert_eq!(app.upstream.call_count(), 3, "scope a once, b once, c once");
}

#[tokio::test]
async fn a_token_in_steady_use_rolls_over_without_any_request_waiting() {
    let app = spawn_app().await;
    app.upstream.set(vec![Upstream::Mint { expires_in: 3 }]);
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let (mut child, _, internal) = serve(&app).await;
    let mut served = std::collections::BTreeSet::new();
    // 3 s tokens are refreshed ahead 0.3 to 0.6 s before they expire; 4 s of steady requests span the
    // first token's expiry and end before its successor is due for renewal. Every other request is the
    // same (answered as a repeat); the others differ in their spacing, so each one looks the token up.
    let end = std::time::Instant::now() + Duration::from_secs(4);
    for n in 0.. {
        if std::time::Instant::now() >= end {
            break;
        }
        let padding = if n % 2 == 0 { String::new() } else { " ".repeat(n) };
        let response = app
            .http
            .post(format!("http://127.0.0.1:{internal}/v1/tokens"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(format!(r#"{{"account_id":"acc-1","scopes":["a"],{padding}"min_ttl_seconds":0}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        served.insert(response.json::<serde_json::Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned());
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let waits = token_waits(&app, internal).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(app.upstream.call_count(), 2, "the first mint and one refresh ahead");
    assert_eq!(served.len(), 2, "both tokens were handed out");
    assert_eq!(waits, [0, 1, 0], "only the very first request waited (for its mint); none at the rollover");
}

#[tokio::test]
async fn a_token_served_while_the_upstream_fails_is_counted_and_logged() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    app.upstream.set(vec![Upstream::Mint { expires_in: 6 }]);
    let log = LogFile::new("degraded");
    let json = [("TOKENVAULT_LOG_FORMAT", "json")];
    let (mut child, _, internal) = serve_with(&app, &app.database_url, log.writer(), &json).await;
    let base = format!("http://127.0.0.1:{internal}");
    let ask = |min_ttl: u64| {
        let body = json!({"account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": min_ttl});
        let (app, base, key) = (&app, &base, &key);
        async move { app.token_at(base, key, &body).await }
    };
    let degraded = || counter(&app, internal, "tokenvault_token_served_degraded_total");
    let first: serde_json::Value = ask(0).await.json().await.unwrap();
    assert_eq!(degraded().await, 0);

    // 2.5 s left is short of the 3 s asked (min(4 s, half of 6 s)): a mint is due, and it fails.
    app.upstream.set(vec![Upstream::Fail { status: 503, body: json!({}) }]);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let body = json!({"account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": 4});
    let request = app.http.post(format!("{base}/v1/tokens")).bearer_auth(&key).header("X-Request-Id", "degraded-1");
    let response = request.json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let served: serde_json::Value = response.json().await.unwrap();
    assert_eq!(served["access_token"], first["access_token"], "the still-valid token");
    assert_eq!(degraded().await, 1);
    let _ = child.kill();
    let _ = child.wait();
    let warning = log.json_line("serving a still-valid token while the upstream fails");
    assert_eq!(warning["level"], "WARN");
    // On the internal listener too (no request span there at INFO), the line names its request.
    assert_eq!(warning["request_id"], "degraded-1", "{warning}");
}

#[tokio::test]
async fn installations_reactivate_makes_a_rejected_installation_active_and_refuses_one_without_credentials() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let id: uuid::Uuid = sqlx::query_scalar("select id from installation").fetch_one(&app.pool).await.unwrap();
    sqlx::query("update installation set status = 'rejected', next_probe_at = now() + interval '1 hour'")
        .execute(&app.pool)
        .await
        .unwrap();
    let output = run(tokenvault_for(&app).args(["installations", "reactivate", &id.to_string()]));
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("reactivated"), "{}", text(&output.stdout));
    assert_eq!(app.status_of("acc-1").await, "active");
    let audited: i64 = sqlx::query_scalar("select count(*) from callback_event where event_type = 'ADMIN_REACTIVATED'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(audited, 1);

    sqlx::query("update installation set status = 'revoked', key_id = null, client_id_ciphertext = null, client_secret_ciphertext = null")
        .execute(&app.pool)
        .await
        .unwrap();
    let output = run(tokenvault_for(&app).args(["installations", "reactivate", &id.to_string()]));
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("no credentials"), "{}", text(&output.stderr));
    let unknown = run(tokenvault_for(&app).args(["installations", "reactivate", &uuid::Uuid::new_v4().to_string()]));
    assert_eq!(unknown.status.code(), Some(1));
}

#[tokio::test]
async fn identity_claims_lists_the_claim_names_identity_tokens_carried() {
    let app = spawn_app().await;
    let token = sign(
        "rsa-a",
        jsonwebtoken::Algorithm::RS256,
        &json!({"iat": now(), "exp": now() + 300, "irisAppId": APP_ID, "accountId": "acc-1", "x-trace": "v4lue"}),
    );
    assert_eq!(app.callback(Some(&token), &installed_body("acc-1", &credentials())).await.status(), 204);
    let listing = eventually(
        || async { text(&run(tokenvault_for(&app).args(["identity", "claims"])).stdout) },
        |listing| listing.contains("irisAppId"),
    )
    .await;
    assert!(listing.contains("accountId,exp,iat,irisAppId,jti,x-trace"), "{listing}");
    assert!(!listing.contains("v4lue"), "names only, never values: {listing}");
}

#[test]
fn an_unknown_key_in_the_config_file_stops_serve_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("tv-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tokenvault.toml");
    std::fs::write(&config, "tokenvault_app = \"@acme/typo\"\n").unwrap();
    let output = run(tokenvault()
        .args(["serve", "--config"])
        .arg(&config)
        .env("DATABASE_URL", "postgres://x")
        .env("TOKENVAULT_ENCRYPTION_KEYS", format!("k:{}", tokenvault::crypto::generate_key())));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("tokenvault_app"), "{}", text(&output.stderr));
}

#[tokio::test]
async fn refused_callbacks_log_a_few_lines_a_second_and_count_the_rest() {
    let app = spawn_app().await;
    let log_file = LogFile::new("refused");
    let (mut child, public, internal) = serve_logging_to(&app, &app.database_url, log_file.writer()).await;
    let url = format!("http://127.0.0.1:{public}/callbacks/trackunit");
    let started = chrono::Utc::now().timestamp();
    for _ in 0..60 {
        let response = app.http.post(&url).json(&installed_body("acc-1", &credentials())).send().await.unwrap();
        assert_eq!(response.status(), 401);
    }
    // The wall-clock seconds the burst touched: the limit counts per second of the clock.
    let seconds = (chrono::Utc::now().timestamp() - started + 1) as u64;
    let suppressed = counter(&app, internal, "tokenvault_log_lines_suppressed_total{event=\"callback_refused\"}").await;
    let _ = child.kill();
    let _ = child.wait();
    let log = log_file.text();
    let lines = log.lines().filter(|line| line.contains("callback refused")).count() as u64;
    assert!(lines <= 5 * seconds, "at most 5 lines a second: {lines} in {seconds} s");
    assert_eq!(lines + suppressed, 60, "every refusal logged or counted");
    assert!(log.contains("identity tokens are bound to nothing but Trackunit's signature"), "the start-up warning");
    assert!(!log.contains("INSECURE_ALLOW_HTTP_UPSTREAMS is on"), "no plain-http warning while it is off");
}

#[tokio::test]
async fn serve_warns_at_start_while_plain_http_upstreams_are_allowed() {
    let app = spawn_app().await;
    let log = LogFile::new("insecure");
    let allow = [("TOKENVAULT_INSECURE_ALLOW_HTTP_UPSTREAMS", "true"), ("TOKENVAULT_LOG_FORMAT", "json")];
    let (mut child, _, _) = serve_with(&app, &app.database_url, log.writer(), &allow).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(log.json_line("TOKENVAULT_INSECURE_ALLOW_HTTP_UPSTREAMS is on")["level"], "WARN");
}

#[tokio::test]
async fn credentials_put_list_delete_and_providers_list_read_secrets_from_files_and_stdin_only() {
    let config = "[providers.acme]\ntoken_url = \"{trackunit}/apptoken\"\n";
    let app = spawn_app_with(Options { config_toml: config.into(), ..Options::default() }).await;
    let dir = std::env::temp_dir().join(format!("tv-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_file = dir.join("tokenvault.toml");
    std::fs::write(&config_file, &app.config_toml).unwrap();
    let secret_file = dir.join("secret");
    let credentials = credentials();
    std::fs::write(&secret_file, format!("{}\n", credentials.client_secret)).unwrap();
    let cli = || {
        let mut command = tokenvault_for(&app);
        command.env("TOKENVAULT_CONFIG", &config_file);
        command
    };

    let providers = text(&run(cli().args(["providers", "list"])).stdout);
    let names: Vec<String> = providers
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["acme", "trackunit"]);

    let put =
        |args: &[&str]| run(cli().args(["credentials", "put", "--provider", "acme", "--account", "acc-1"]).args(args));
    let output = put(&["--client-id", &credentials.client_id, "--client-secret-file", secret_file.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("registered"));
    let mut stdin_put = cli()
        .args(["credentials", "put", "--provider", "acme", "--account", "acc-1", "--client-id", &credentials.client_id])
        .arg("--client-secret-stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    stdin_put.stdin.take().unwrap().write_all(credentials.client_secret.as_bytes()).unwrap();
    let output = stdin_put.wait_with_output().unwrap();
    assert!(output.status.success());
    assert!(text(&output.stdout).contains("replaced"));
    let key = app.client(&["*"], &["*"], false).await;
    let ask = json!({"provider": "acme", "account_id": "acc-1", "scopes": ["a"]});
    assert_eq!(app.token(&key, &ask).await.status(), 200);
    assert_eq!(app.upstream.calls.lock().unwrap()[0]["client_secret"], credentials.client_secret, "newline removed");

    let listing = text(&run(cli().args(["credentials", "list"])).stdout);
    assert!(listing.contains("acme") && listing.contains("acc-1"), "{listing}");
    assert!(!listing.contains(&credentials.client_secret) && !listing.contains(&credentials.client_id));
    let no_secret = put(&["--client-id", &credentials.client_id]);
    assert_eq!(no_secret.status.code(), Some(1), "a secret or a refresh token is required");
    let trackunit =
        run(cli().args(["credentials", "put", "--provider", "trackunit", "--account", "a", "--client-id", "x"]));
    assert_eq!(trackunit.status.code(), Some(1));
    assert!(text(&trackunit.stderr).contains("callback"), "{}", text(&trackunit.stderr));

    assert!(run(cli().args(["credentials", "delete", "--provider", "acme", "--account", "acc-1"])).status.success());
    let again = run(cli().args(["credentials", "delete", "--provider", "acme", "--account", "acc-1"]));
    assert_eq!(again.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_demo_fetches_a_token_from_the_sandbox_with_curl_in_under_a_minute() {
    let app = spawn_app().await;
    let started = std::time::Instant::now();
    let mut demo = Command::new(format!("{}/scripts/demo.sh", env!("CARGO_MANIFEST_DIR")));
    for (name, _) in std::env::vars() {
        if name.starts_with("TOKENVAULT_") {
            demo.env_remove(name);
        }
    }
    let output = tokio::task::spawn_blocking(move || {
        demo.arg(env!("CARGO_BIN_EXE_tokenvault"))
            .env("DATABASE_URL", &app.database_url)
            .env("TOKENVAULT_ENCRYPTION_KEYS", &app.encryption_keys)
            .env("DEMO_EXIT", "1")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", text(&output.stderr));
    for step in ["== 1.", "== 4.", "== 6.", "\"access_token\"", "\"token_type\":\"Bearer\"", "Repeat it"] {
        assert!(stdout.contains(step), "{step} missing:\n{stdout}");
    }
    assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
}

#[tokio::test]
async fn healthcheck_exits_0_for_a_ready_listener_and_1_otherwise() {
    let app = spawn_app().await;
    let (_served, public, internal) = serve(&app).await;
    let check = |addr: String, internal: bool| {
        let mut command = tokenvault();
        command.arg("healthcheck").env("TOKENVAULT_PUBLIC_ADDR", &addr).env("TOKENVAULT_INTERNAL_ADDR", &addr);
        if internal {
            command.arg("--internal");
        }
        run(&mut command).status.code()
    };
    assert_eq!(check(format!("127.0.0.1:{public}"), false), Some(0), "needs no database or key settings");
    assert_eq!(check(format!("127.0.0.1:{internal}"), true), Some(0));
    assert_eq!(check(format!("127.0.0.1:{}", free_port()), false), Some(1));
}

#[tokio::test]
async fn migrate_needs_no_encryption_key() {
    let app = spawn_app().await;
    let output = run(tokenvault().arg("migrate").env("DATABASE_URL", &app.database_url));
    assert!(output.status.success(), "{}", text(&output.stderr));
}

#[tokio::test]
async fn the_sandbox_refuses_unknown_clients_and_fails_on_demand() {
    let port = free_port();
    let mut sandbox = Served(
        tokenvault().args(["sandbox", "--listen", &format!("127.0.0.1:{port}")]).stdout(Stdio::null()).spawn().unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let up =
        eventually(|| http.get(format!("{base}/jwks")).send(), |r| r.as_ref().is_ok_and(|r| r.status() == 200)).await;
    let jwks: serde_json::Value = up.unwrap().json().await.unwrap();
    assert_eq!(jwks["keys"][0]["kty"], "OKP", "its own freshly generated signing key");
    let token = |form: &'static [(&'static str, &'static str)]| http.post(format!("{base}/apptoken")).form(form).send();
    let refused =
        token(&[("grant_type", "client_credentials"), ("client_id", "x"), ("client_secret", "y")]).await.unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.json::<serde_json::Value>().await.unwrap()["error"], "invalid_client");
    for (mode, status) in
        [(json!({"mode": "server_error"}), 503), (json!({"mode": "rate_limited", "retry_after_secs": 7}), 429)]
    {
        http.post(format!("{base}/sandbox/mode")).json(&mode).send().await.unwrap();
        let answer = token(&[("grant_type", "client_credentials")]).await.unwrap();
        assert_eq!(answer.status(), status, "{mode}");
        if status == 429 {
            assert_eq!(answer.headers()["retry-after"], "7");
        }
    }
    let _ = sandbox.0.kill();
}

#[tokio::test]
async fn sandbox_install_and_uninstall_deliver_signed_callbacks_that_serve_accepts() {
    let app = spawn_app().await;
    let port = free_port();
    let _sandbox = Served(
        tokenvault().args(["sandbox", "--listen", &format!("127.0.0.1:{port}")]).stdout(Stdio::null()).spawn().unwrap(),
    );
    let sandbox = format!("http://127.0.0.1:{port}");
    let up =
        eventually(|| app.http.get(format!("{sandbox}/jwks")).send(), |r| r.as_ref().is_ok_and(|r| r.status() == 200));
    assert_eq!(up.await.unwrap().status(), 200, "the sandbox is up");
    let (jwks, token_url) = (format!("{sandbox}/jwks"), format!("{sandbox}/apptoken"));
    let at_sandbox =
        [("TOKENVAULT_TRACKUNIT_JWKS_URL", jwks.as_str()), ("TOKENVAULT_TRACKUNIT_TOKEN_URL", token_url.as_str())];
    let (_served, public, _) = serve_with(&app, &app.database_url, Stdio::null(), &at_sandbox).await;
    let deliver = |action: &str| {
        let url = format!("http://127.0.0.1:{public}");
        run(tokenvault().args(["sandbox", action, "--url", &url, "--account", "acc-9", "--sandbox", &sandbox]))
    };
    let installed = deliver("install");
    assert!(installed.status.success(), "{}", text(&installed.stderr));
    assert_eq!(app.status_of("acc-9").await, "active");
    let uninstalled = deliver("uninstall");
    assert!(uninstalled.status.success(), "{}", text(&uninstalled.stderr));
    assert_eq!(app.status_of("acc-9").await, "uninstalled");
}

#[tokio::test]
async fn metrics_are_real_histograms_with_help_texts_build_info_and_gauges() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let (_served, _, internal) = serve(&app).await;
    let base = format!("http://127.0.0.1:{internal}");
    for _ in 0..3 {
        assert_eq!(app.token_at(&base, &key, &json!({"account_id": "acc-1", "scopes": ["a"]})).await.status(), 200);
    }
    let text = app.http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let bucket = "tokenvault_http_request_duration_seconds_bucket{listener=\"internal\",route=\"/v1/tokens\",status_class=\"2xx\",le=\"+Inf\"} 3";
    assert!(text.contains(bucket), "a histogram with buckets, not a summary:\n{text}");
    assert!(text.contains("tokenvault_upstream_duration_seconds_bucket"), "{text}");
    assert!(text.contains(&format!("tokenvault_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))), "{text}");
    assert!(text.contains("tokenvault_tokens_in_memory 1"), "{text}");
    assert!(text.contains("tokenvault_database_connections{state=\"in_use\"}"), "{text}");
    for line in text.lines().filter(|line| line.starts_with("# TYPE")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(text.contains(&format!("# HELP {name} ")), "no HELP for {name}");
    }
}

#[tokio::test]
async fn clients_rotate_prints_a_new_key_and_lists_and_the_audit_print_as_json_lines() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let created = run(tokenvault_for(&app).args([
        "clients",
        "create",
        "--name",
        "svc",
        "--account",
        "*",
        "--scope",
        "*",
        "--expires-in",
        "7d",
    ]));
    assert!(created.status.success(), "{}", text(&created.stderr));
    let old = text(&created.stdout).trim().lines().last().unwrap().to_owned();
    let rotated = run(tokenvault_for(&app).args(["clients", "rotate", "svc", "--grace", "90s"]));
    assert!(rotated.status.success(), "{}", text(&rotated.stderr));
    let new = text(&rotated.stdout).trim().lines().last().unwrap().to_owned();
    assert!(new.starts_with("tvk_") && new != old);
    let ask = json!({"account_id": "acc-1", "scopes": ["a"]});
    assert_eq!(app.token(&new, &ask).await.status(), 200);
    assert_eq!(app.token(&old, &ask).await.status(), 200, "within the grace");
    assert_eq!(run(tokenvault_for(&app).args(["clients", "rotate", "nobody"])).status.code(), Some(1));

    let listed = text(&run(tokenvault_for(&app).args(["clients", "list", "--output", "json"])).stdout);
    let client: serde_json::Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    assert_eq!((client["name"].as_str(), client["status"].as_str()), (Some("svc"), Some("active")));
    assert!(client["expires_at"].is_string() && client["previous_key_expires_at"].is_string());
    assert!(!listed.contains(&new) && !listed.contains(&old));

    let audit = text(&run(tokenvault_for(&app).args(["audit", "list", "--output", "json", "--limit", "2"])).stdout);
    let actions: Vec<(String, String)> = audit
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .map(|e| (e["action"].as_str().unwrap().to_owned(), e["actor"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(actions, [("CLIENT_ROTATED".into(), "cli".into()), ("CLIENT_CREATED".into(), "cli".into())]);
    let table = text(&run(tokenvault_for(&app).args(["audit", "list", "--action", "INSTALLED"])).stdout);
    assert!(table.contains("INSTALLED") && table.contains("callback") && !table.contains("CLIENT_"), "{table}");
}

#[tokio::test]
async fn with_an_otlp_endpoint_request_spans_are_exported_in_the_callers_trace_and_hold_no_secret() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let app = spawn_app().await;
    let credentials = app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    // The collector: the outside world, at its HTTP boundary.
    let collector = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/traces"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&collector)
        .await;
    let vars = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.uri()),
        // JSON, so the test can read what was sent.
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        // The log level must not decide which requests are traced.
        ("RUST_LOG", "warn".to_owned()),
    ];
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (_served, _, internal) = serve_with(&app, &app.database_url, Stdio::null(), &vars).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = app
        .http
        .post(format!("http://127.0.0.1:{internal}/v1/tokens"))
        .bearer_auth(&key)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"account_id": "acc-1", "scopes": ["a"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let token = response.json::<serde_json::Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned();

    // Spans are exported in batches as they end: the upstream call's may come before the request's.
    let exported_batches = || async {
        let requests = collector.received_requests().await.unwrap_or_default();
        requests.iter().map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()).collect::<Vec<_>>()
    };
    let spans_of = |batches: &[serde_json::Value]| -> Vec<serde_json::Value> {
        batches
            .iter()
            .flat_map(|batch| batch["resourceSpans"].as_array().cloned().unwrap_or_default())
            .flat_map(|resource| resource["scopeSpans"].as_array().cloned().unwrap_or_default())
            .flat_map(|scope| scope["spans"].as_array().cloned().unwrap_or_default())
            .collect()
    };
    // The request's root span is the child of the caller's span.
    let is_root = |span: &serde_json::Value| span["traceId"] == trace_id && span["parentSpanId"] == "00f067aa0ba902b7";
    let mut batches = Vec::new();
    for _ in 0..100 {
        batches = exported_batches().await;
        if spans_of(&batches).iter().any(is_root) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exported: String = batches.iter().map(|batch| batch.to_string()).collect();
    let spans = spans_of(&batches);
    let span = spans
        .iter()
        .find(|span| is_root(span))
        .unwrap_or_else(|| panic!("no span is the child of the caller's: {exported}"));
    let resource = &batches[0]["resourceSpans"][0]["resource"]["attributes"];
    assert!(
        resource
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["key"] == "service.name" && a["value"]["stringValue"] == "tokenvault"),
        "{resource}"
    );
    assert_eq!(span["name"], "POST /v1/tokens", "{span}");
    // The upstream call is in the caller's trace too; it ended, and was exported, before the request's span.
    let mint = spans.iter().find(|s| s["name"] == "mint").unwrap_or_else(|| panic!("no upstream call: {exported}"));
    assert_eq!(mint["traceId"], trace_id, "{mint}");
    for secret in [&key, &token, &credentials.client_secret] {
        assert!(!exported.contains(secret), "an exported span holds a secret");
    }
}

#[test]
fn an_otlp_protocol_that_is_not_built_in_stops_serve_naming_the_variable() {
    let output = run(tokenvault()
        .arg("serve")
        .env("DATABASE_URL", "postgres://x")
        .env("TOKENVAULT_ENCRYPTION_KEYS", format!("k:{}", tokenvault::crypto::generate_key()))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"));
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc"), "{}", text(&output.stderr));
}
