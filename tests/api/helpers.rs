//! Spawns the real application on port 0 against a fresh database, with Trackunit played by a local
//! HTTP server (wiremock) that serves a JWKS of real keys and a token endpoint.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokenvault::domain::ServiceKey;
use tokenvault::settings::{Settings, Source};
use tokenvault::startup::Application;
use tokenvault::store::api_client;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

pub const APP_ID: &str = "@acme/fleet-insights";

/// Log lines of this test binary that held a secret, found by [`scan_logs`].
static LEAKS: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Encryption keys of the apps of this binary: random, so they are looked for by value.
static ENCRYPTION_KEYS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Which secret a log line holds, if any. The secrets the tests make have recognisable shapes: client ids
/// `cid-<32 hex>`, client secrets `csecret-…`, access tokens `at-<n>-<32 hex>`, service keys `tvk_…`.
fn leaked_secret(line: &str) -> Option<&'static str> {
    let hex_run = |rest: &str| rest.len() >= 32 && rest.as_bytes()[..32].iter().all(u8::is_ascii_hexdigit);
    if line.contains("csecret-") {
        return Some("client secret");
    }
    if line.contains("tvk_") {
        return Some("service key");
    }
    if line.match_indices("rt-").any(|(at, _)| hex_run(&line[at + 3..])) {
        return Some("refresh token");
    }
    if line.match_indices("cid-").any(|(at, _)| hex_run(&line[at + 4..])) {
        return Some("client id");
    }
    let token = line.match_indices("at-").any(|(at, _)| {
        let rest = &line[at + 3..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        digits > 0 && rest[digits..].starts_with('-') && hex_run(&rest[digits + 1..])
    });
    if token {
        return Some("access token");
    }
    let keys = ENCRYPTION_KEYS.lock().unwrap();
    keys.iter().any(|key| line.contains(key.as_str())).then_some("encryption key")
}

/// A log writer that keeps nothing but the lines that leak a secret.
struct LeakScanner;

impl std::io::Write for LeakScanner {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = String::from_utf8_lossy(buf);
        if let Some(what) = leaked_secret(&line) {
            LEAKS.lock().unwrap().push(format!("{what}: {}", line.chars().take(400).collect::<String>()));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Logs every event of every crate at TRACE (or `TOKENVAULT_TEST_LOG`) through [`LeakScanner`], so every
/// scenario of the suite is also a check that no secret reaches the logs. The fake Trackunit's own
/// server is not tokenvault and is left out.
pub fn scan_logs() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let filter = std::env::var("TOKENVAULT_TEST_LOG").unwrap_or_else(|_| "trace,wiremock=off".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_ansi(false)
            .with_writer(|| LeakScanner)
            .try_init();
    });
}

/// Fails the test if any log line so far held a secret.
pub fn assert_no_secret_logged() {
    let leaks = LEAKS.lock().unwrap();
    assert!(leaks.is_empty(), "secrets reached the logs:\n{}", leaks.join("\n"));
}

/// The PostgreSQL server the tests use: `DATABASE_URL` (set by `make test`), else a local default.
pub fn server_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn with_database(url: &str, database: &str) -> String {
    let mut url = url::Url::parse(url).expect("DATABASE_URL is a URL");
    url.set_path(database);
    url.to_string()
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

pub fn jwk(name: &str) -> Value {
    serde_json::from_slice(&fixture(&format!("{name}.jwk.json"))).unwrap()
}

/// Signs `claims` as Trackunit would, with the named fixture key and its kid, adding a random `jti` when
/// the claims have none: one identity token delivers one message, so two callbacks of one test must not
/// carry the same token by accident (two tokens signed in the same second would be identical).
pub fn sign(key: &str, alg: Algorithm, claims: &Value) -> String {
    let mut claims = claims.clone();
    if let Some(object) = claims.as_object_mut() {
        object.entry("jti").or_insert_with(|| json!(uuid::Uuid::new_v4().to_string()));
    }
    sign_exact(key, alg, &claims)
}

/// Signs exactly `claims` (see [`sign`]).
pub fn sign_exact(key: &str, alg: Algorithm, claims: &Value) -> String {
    let pem = fixture(&format!("{key}.pem"));
    let encoding = match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        _ => EncodingKey::from_rsa_pem(&pem),
    }
    .unwrap();
    let mut header = Header::new(alg);
    header.kid = Some(key.to_owned());
    jsonwebtoken::encode(&header, claims, &encoding).unwrap()
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A valid identity token, issued `age` seconds ago.
pub fn identity_issued(age: i64) -> String {
    sign("rsa-a", Algorithm::RS256, &json!({ "iat": now() - age, "exp": now() + 300 }))
}

pub fn identity() -> String {
    identity_issued(0)
}

/// Fresh random credentials, unique per call, so leaks are attributable.
pub struct Credentials {
    pub client_id: String,
    pub client_secret: String,
}

pub fn credentials() -> Credentials {
    Credentials {
        client_id: format!("cid-{}", uuid::Uuid::new_v4().simple()),
        client_secret: format!("csecret-{}", uuid::Uuid::new_v4().simple()),
    }
}

pub fn installed_body(account_id: &str, credentials: &Credentials) -> Value {
    json!({
        "type": "INSTALLED",
        "irisAppId": APP_ID,
        "accountId": account_id,
        "clientId": credentials.client_id,
        "clientSecret": credentials.client_secret,
    })
}

/// What the fake token endpoint does.
#[derive(Clone)]
pub enum Upstream {
    /// Mint a token valid for this many seconds.
    Mint { expires_in: i64 },
    /// Mint a token granting `scope`, whatever was asked.
    MintGranting { expires_in: i64, scope: &'static str },
    /// Answer with this status and JSON body.
    Fail { status: u16, body: Value },
    /// Answer with this status and a `Retry-After` header.
    FailWithRetryAfter { status: u16, retry_after_secs: u64 },
}

/// Plays Trackunit's token endpoint: records each call's form, mints unique tokens, or fails on demand.
#[derive(Clone)]
pub struct TokenEndpoint {
    pub calls: Arc<Mutex<Vec<HashMap<String, String>>>>,
    /// Answers to give, in order; the last one repeats.
    pub script: Arc<Mutex<Vec<Upstream>>>,
    pub delay: Arc<Mutex<Duration>>,
    counter: Arc<AtomicU64>,
    pub issued: Arc<Mutex<Vec<String>>>,
    /// When each call arrived (before its `delay`).
    pub arrivals: Arc<Mutex<Vec<std::time::Instant>>>,
}

impl Respond for TokenEndpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        self.arrivals.lock().unwrap().push(std::time::Instant::now());
        let form: HashMap<String, String> = url::form_urlencoded::parse(&request.body).into_owned().collect();
        self.calls.lock().unwrap().push(form.clone());
        let answer = {
            let mut script = self.script.lock().unwrap();
            if script.len() > 1 { script.remove(0) } else { script[0].clone() }
        };
        let delay = *self.delay.lock().unwrap();
        let template = match answer {
            Upstream::Mint { expires_in } => self.mint(expires_in, form.get("scope").cloned().unwrap_or_default()),
            Upstream::MintGranting { expires_in, scope } => self.mint(expires_in, scope.to_owned()),
            Upstream::Fail { status, body } => ResponseTemplate::new(status).set_body_json(body),
            Upstream::FailWithRetryAfter { status, retry_after_secs } => {
                ResponseTemplate::new(status).insert_header("retry-after", retry_after_secs.to_string().as_str())
            }
        };
        template.set_delay(delay)
    }
}

impl TokenEndpoint {
    fn mint(&self, expires_in: i64, scope: String) -> ResponseTemplate {
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        let token = format!("at-{n}-{}", uuid::Uuid::new_v4().simple());
        self.issued.lock().unwrap().push(token.clone());
        ResponseTemplate::new(200).set_body_json(json!({
            "token_type": "Bearer",
            "expires_in": expires_in,
            "access_token": token,
            "scope": scope,
        }))
    }

    pub fn call_count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    pub fn set(&self, answers: Vec<Upstream>) {
        *self.script.lock().unwrap() = answers;
    }
}

pub struct TestApp {
    pub public: String,
    pub internal: String,
    pub pool: PgPool,
    pub database_url: String,
    pub http: reqwest::Client,
    pub trackunit: MockServer,
    pub upstream: TokenEndpoint,
    pub encryption_keys: String,
    pub jwks: Arc<Mutex<Value>>,
    pub proxy: Option<Arc<DatabaseProxy>>,
    /// The settings file's text the app was started with (see [`Options::config_toml`]).
    pub config_toml: String,
    /// The test's own database, dropped when the app is (see [`drop_database`]).
    database: String,
    _stopper: Stopper,
}

/// Options for [`spawn_app_with`].
pub struct Options {
    pub vars: Vec<(&'static str, String)>,
    pub serve_jwks: bool,
    /// The JWKS's `Cache-Control: max-age`, in seconds.
    pub jwks_max_age: u64,
    /// Route the app's database connections through a [`DatabaseProxy`] the test can stop.
    pub proxy_database: bool,
    /// The settings file's text (its `[providers.NAME]` tables), for the app and its replicas;
    /// `{trackunit}` stands for the fake Trackunit's base URL.
    pub config_toml: String,
}

impl Default for Options {
    fn default() -> Self {
        Self { vars: Vec::new(), serve_jwks: true, jwks_max_age: 1, proxy_database: false, config_toml: String::new() }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

/// Serves the JWKS held in `jwks` (so tests can change it), with `Cache-Control: max-age=` the second field.
struct JwksResponder(Arc<Mutex<Value>>, Arc<AtomicU64>);

impl Respond for JwksResponder {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        ResponseTemplate::new(200)
            .insert_header("cache-control", format!("max-age={}", self.1.load(Ordering::SeqCst)))
            .set_body_json(self.0.lock().unwrap().clone())
    }
}

pub async fn spawn_app_with(options: Options) -> TestApp {
    scan_logs();
    let database = format!("tv_test_{}", uuid::Uuid::new_v4().simple());
    let server = server_url();
    let mut admin = PgConnection::connect(&server).await.expect("PostgreSQL is reachable (run `make test`)");
    admin.execute(format!(r#"create database "{database}""#).as_str()).await.unwrap();
    admin.close().await.ok();
    let database_url = with_database(&server, &database);
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(3).connect(&database_url).await.unwrap();
    tokenvault::store::migrate(&pool).await.unwrap();

    let trackunit = MockServer::start().await;
    let jwks = Arc::new(Mutex::new(json!({ "keys": [jwk("rsa-a"), jwk("rsa-b"), jwk("ec-p256"), jwk("ed25519")] })));
    if options.serve_jwks {
        Mock::given(method("GET"))
            .and(path("/jwks"))
            .respond_with(JwksResponder(Arc::clone(&jwks), Arc::new(AtomicU64::new(options.jwks_max_age))))
            .mount(&trackunit)
            .await;
    }
    let upstream = TokenEndpoint {
        calls: Arc::default(),
        script: Arc::new(Mutex::new(vec![Upstream::Mint { expires_in: 3600 }])),
        delay: Arc::new(Mutex::new(Duration::ZERO)),
        counter: Arc::default(),
        issued: Arc::default(),
        arrivals: Arc::default(),
    };
    Mock::given(method("POST")).and(path("/apptoken")).respond_with(upstream.clone()).mount(&trackunit).await;

    let (proxy, app_database_url) = if options.proxy_database {
        let (proxy, url) = proxied(&database_url).await;
        (Some(proxy), url)
    } else {
        (None, database_url.clone())
    };
    let encryption_keys = format!("test:{}", tokenvault::crypto::generate_key());
    let mut vars: HashMap<String, String> = HashMap::from([
        ("DATABASE_URL".into(), app_database_url),
        ("TOKENVAULT_PUBLIC_ADDR".into(), "127.0.0.1:0".into()),
        ("TOKENVAULT_INTERNAL_ADDR".into(), "127.0.0.1:0".into()),
        ("TOKENVAULT_ENCRYPTION_KEYS".into(), encryption_keys.clone()),
        ("TOKENVAULT_TRACKUNIT_JWKS_URL".into(), format!("{}/jwks", trackunit.uri())),
        ("TOKENVAULT_TRACKUNIT_TOKEN_URL".into(), format!("{}/apptoken", trackunit.uri())),
        ("TOKENVAULT_TRACKUNIT_JWKS_MIN_REFRESH_SECS".into(), "1".into()),
        ("TOKENVAULT_UPSTREAM_BACKOFF_MS".into(), "10".into()),
        ("TOKENVAULT_UPSTREAM_TIMEOUT_SECS".into(), "5".into()),
        ("TOKENVAULT_DATABASE_MAX_CONNECTIONS".into(), "6".into()),
    ]);
    for (name, value) in options.vars {
        vars.insert(name.into(), value);
    }
    let encryption_keys = vars["TOKENVAULT_ENCRYPTION_KEYS"].clone();
    ENCRYPTION_KEYS
        .lock()
        .unwrap()
        .extend(encryption_keys.split(',').filter_map(|k| Some(k.split_once(':')?.1.to_owned())));
    // `{trackunit}` in the config stands for the fake Trackunit's URL (known only now).
    let config_toml = options.config_toml.replace("{trackunit}", &trackunit.uri());
    let settings = Settings::load(&Source::from_map_and_file(vars, &config_toml).expect("the test config parses"))
        .expect("test settings are valid");
    let (public, internal, stopper) = start(settings).await.expect("the application starts");

    TestApp {
        public: format!("http://127.0.0.1:{public}"),
        internal: format!("http://127.0.0.1:{internal}"),
        pool,
        database_url,
        http: reqwest::Client::new(),
        trackunit,
        upstream,
        encryption_keys,
        jwks,
        proxy,
        config_toml,
        database,
        _stopper: stopper,
    }
}

/// Stops an app's servers when dropped, so a finished test releases its database connections.
pub struct Stopper(Vec<actix_web::dev::ServerHandle>);

impl Stopper {
    /// Sends the stop command at once; the returned futures only wait for completion.
    fn stop(&self) {
        for handle in &self.0 {
            drop(handle.stop(false));
        }
    }
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Drops a test's database, so test runs do not pile databases up on the server (each is a few MB, and a
/// run makes over a hundred). `with (force)` ends the connections of an app still stopping. Runs on a
/// thread of its own: a `Drop` cannot await, and it may run inside the test's runtime.
pub fn drop_database(database: &str) {
    let (server, database) = (server_url(), database.to_owned());
    let dropped = std::thread::spawn(move || -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let mut admin = PgConnection::connect(&server).await?;
            admin.execute(format!(r#"drop database if exists "{database}" with (force)"#).as_str()).await?;
            anyhow::Ok(())
        })
    })
    .join();
    if let Ok(Err(error)) | Err(error) = dropped.map_err(|_| anyhow::anyhow!("the drop panicked")) {
        eprintln!("warning: could not drop a test database: {error:#}");
    }
}

/// Builds and runs the app on a thread and runtime of its own, like a separate process: it outlives the
/// test's runtime, so the [`Stopper`] can stop it and its pool is closed. Returns its ports.
async fn start(settings: Settings) -> anyhow::Result<(u16, u16, Stopper)> {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async move {
            match Application::build(settings).await {
                Ok(app) => {
                    let started = (app.public_port(), app.internal_port(), Stopper(app.server_handles().to_vec()));
                    let _ = sender.send(Ok(started));
                    let _ = app.run_until_stopped().await;
                }
                Err(error) => {
                    let _ = sender.send(Err(error));
                }
            }
        });
    });
    receiver.await?
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self._stopper.stop();
        drop_database(&self.database);
        if !std::thread::panicking() {
            assert_no_secret_logged();
        }
    }
}

/// Another tokenvault process over the same database and fake Trackunit.
pub struct Replica {
    pub public: String,
    pub internal: String,
    _stopper: Stopper,
}

impl TestApp {
    /// Starts another instance over this app's database, with `overrides` on top of its settings.
    pub async fn replica(&self, overrides: &[(&str, &str)]) -> anyhow::Result<Replica> {
        let mut vars: HashMap<String, String> = [
            ("DATABASE_URL", self.database_url.as_str()),
            ("TOKENVAULT_PUBLIC_ADDR", "127.0.0.1:0"),
            ("TOKENVAULT_INTERNAL_ADDR", "127.0.0.1:0"),
            ("TOKENVAULT_ENCRYPTION_KEYS", self.encryption_keys.as_str()),
            ("TOKENVAULT_TRACKUNIT_JWKS_URL", &format!("{}/jwks", self.trackunit.uri())),
            ("TOKENVAULT_TRACKUNIT_TOKEN_URL", &format!("{}/apptoken", self.trackunit.uri())),
            ("TOKENVAULT_UPSTREAM_BACKOFF_MS", "10"),
            ("TOKENVAULT_DATABASE_MAX_CONNECTIONS", "6"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        for (name, value) in overrides {
            vars.insert((*name).to_owned(), (*value).to_owned());
        }
        let (public, internal, stopper) =
            start(Settings::load(&Source::from_map_and_file(vars, &self.config_toml)?)?).await?;
        Ok(Replica {
            public: format!("http://127.0.0.1:{public}"),
            internal: format!("http://127.0.0.1:{internal}"),
            _stopper: stopper,
        })
    }

    /// How often the fake Trackunit served the JWKS.
    pub async fn jwks_fetches(&self) -> usize {
        let requests = self.trackunit.received_requests().await.unwrap_or_default();
        requests.iter().filter(|r| r.url.path() == "/jwks").count()
    }

    /// Sends a callback with the given identity header value and JSON body.
    pub async fn callback(&self, identity: Option<&str>, body: &Value) -> reqwest::Response {
        self.callback_raw(identity, "application/json", serde_json::to_vec(body).unwrap()).await
    }

    /// [`TestApp::callback`], retried as a sender should while the answer is 503 `identity_keys_unavailable`
    /// (a token naming a key the loaded JWKS lacks: tokenvault refetches once its minimum interval allows),
    /// after the `Retry-After` it gives. Returns the first other answer.
    pub async fn callback_retrying(&self, identity: Option<&str>, body: &Value) -> reqwest::Response {
        for _ in 0..5 {
            let response = self.callback(identity, body).await;
            if response.status() != 503 {
                return response;
            }
            let wait: u64 = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .expect("a 503 says when to retry");
            assert!(wait <= 2, "the tests' minimum JWKS refresh interval is 1 s, so the wait is short: {wait}");
            tokio::time::sleep(Duration::from_secs(wait)).await;
        }
        panic!("still 503 after five retries");
    }

    pub async fn callback_raw(&self, identity: Option<&str>, content_type: &str, body: Vec<u8>) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}/callbacks/trackunit", self.public))
            .header("content-type", content_type)
            .body(body);
        if let Some(identity) = identity {
            request = request.header("Trackunit-Identity", identity);
        }
        request.send().await.unwrap()
    }

    /// Installs `account_id` with fresh credentials and checks it was acknowledged.
    pub async fn install(&self, account_id: &str) -> Credentials {
        let credentials = credentials();
        let response = self.callback(Some(&identity()), &installed_body(account_id, &credentials)).await;
        assert_eq!(response.status(), 204, "install acknowledged");
        credentials
    }

    /// Creates a service key directly in the store, as `tokenvault clients create` does.
    pub async fn client(&self, accounts: &[&str], scopes: &[&str], admin: bool) -> String {
        self.client_for_apps(accounts, scopes, &["*"], admin).await
    }

    /// [`TestApp::client`] granted only the apps `apps`.
    pub async fn client_for_apps(&self, accounts: &[&str], scopes: &[&str], apps: &[&str], admin: bool) -> String {
        let to_vec = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let grants = api_client::Grants {
            accounts: to_vec(accounts),
            scopes: to_vec(scopes),
            apps: to_vec(apps),
            providers: vec!["*".into()],
            admin,
        };
        self.client_named(&format!("client-{}", uuid::Uuid::new_v4().simple()), &grants).await
    }

    /// A service client named `name` with exactly `grants`; returns its key.
    pub async fn client_named(&self, name: &str, grants: &api_client::Grants) -> String {
        let key = ServiceKey::generate();
        api_client::create(&self.pool, name, &key.sha256(), grants).await.unwrap();
        key.expose().to_owned()
    }

    /// [`notifications_arrived`] for this app.
    pub async fn notifications_arrived(&self) {
        notifications_arrived(&self.http, &self.pool, &self.internal).await;
    }

    pub async fn token(&self, key: &str, body: &Value) -> reqwest::Response {
        self.token_at(&self.internal, key, body).await
    }

    /// [`TestApp::token`] from another replica (or process): `base` is its internal listener's URL.
    pub async fn token_at(&self, base: &str, key: &str, body: &Value) -> reqwest::Response {
        self.http.post(format!("{base}/v1/tokens")).bearer_auth(key).json(body).send().await.unwrap()
    }

    /// Every installation row as JSON text (ciphertext hex-encoded), to compare database states.
    pub async fn snapshot(&self) -> String {
        let rows: Vec<(String,)> = sqlx::query_as(
            "select coalesce(json_agg(i order by i.app_id, i.account_id)::text, '[]') from installation i",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        rows.into_iter().map(|r| r.0).collect()
    }

    /// Makes an installation's credentials undecryptable the way a bad copy would: its client id
    /// ciphertext moved into the secret column (right key, wrong associated data). Returns its id.
    pub async fn break_credentials(&self, account_id: &str) -> uuid::Uuid {
        sqlx::query_scalar(
            "update installation set client_secret_ciphertext = client_id_ciphertext where account_id = $1 returning id",
        )
        .bind(account_id)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    pub async fn installation_count(&self) -> i64 {
        sqlx::query_scalar("select count(*) from installation").fetch_one(&self.pool).await.unwrap()
    }

    pub async fn status_of(&self, account_id: &str) -> String {
        sqlx::query_scalar("select status from installation where account_id = $1")
            .bind(account_id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

/// Asserts a problem+json answer with `status` and `code`; returns the body.
pub async fn assert_problem(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status(), status, "status");
    let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status);
    assert!(body["title"].is_string() && body["detail"].is_string() && body["type"].is_string());
    body
}

/// A TCP forwarder in front of PostgreSQL, so a test can take "the database" away from the app and give
/// it back, as a stopped and restarted server would, without touching the shared server.
pub struct DatabaseProxy {
    pub port: u16,
    target: String,
    running: Mutex<Option<tokio::task::JoinHandle<()>>>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// Bumped by [`DatabaseProxy::freeze_existing`]: connections opened before stop forwarding.
    freezes: tokio::sync::watch::Sender<u64>,
}

impl DatabaseProxy {
    pub async fn start(target: String) -> Arc<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = Arc::new(Self {
            port,
            target,
            running: Mutex::new(None),
            connections: Arc::default(),
            freezes: tokio::sync::watch::Sender::new(0),
        });
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let target = self.target.clone();
        let connections = Arc::clone(&self.connections);
        let freezes = self.freezes.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let mut frozen = freezes.subscribe();
                frozen.mark_unchanged();
                connections.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = frozen.changed() => {
                                // Silently dropped, as by a NAT or firewall: no FIN, no RST, no data.
                                let _held = (inbound, outbound);
                                std::future::pending::<()>().await;
                            }
                        }
                    }
                }));
            }
        });
        *self.running.lock().unwrap() = Some(task);
    }

    /// Every connection open now goes silent in both directions without being closed; new connections
    /// are forwarded as before.
    pub fn freeze_existing(&self) {
        self.freezes.send_modify(|n| *n += 1);
    }

    /// The database "stops": the port refuses connections and open ones are cut.
    pub fn stop(&self) {
        if let Some(task) = self.running.lock().unwrap().take() {
            task.abort();
        }
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    /// The database "comes back" on the same port.
    pub async fn restart(&self) {
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.serve(listener);
    }
}

/// The app's DATABASE_URL routed through a [`DatabaseProxy`] to the test database.
pub async fn proxied(database_url: &str) -> (Arc<DatabaseProxy>, String) {
    let url = url::Url::parse(database_url).unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let proxy = DatabaseProxy::start(target).await;
    let mut through = url.clone();
    through.set_host(Some("127.0.0.1")).unwrap();
    through.set_port(Some(proxy.port)).unwrap();
    (proxy, through.to_string())
}

/// The grants of an admin key: every app and provider, no account or scope of its own.
pub fn admin_grants() -> api_client::Grants {
    api_client::Grants {
        accounts: vec![],
        scopes: vec![],
        apps: vec!["*".into()],
        providers: vec!["*".into()],
        admin: true,
    }
}

/// Waits until every change notification committed so far on `pool` has reached the app serving
/// `internal` (its internal listener's base URL). Notifications arrive in commit order, so once a sentinel
/// admin key revoked last is refused, every earlier one has been applied: a test that then warms the
/// caches knows no late notification will drop an entry (which matters when the database goes down next).
pub async fn notifications_arrived(http: &reqwest::Client, pool: &PgPool, internal: &str) {
    let name = format!("sentinel-{}", uuid::Uuid::new_v4().simple());
    let key = ServiceKey::generate();
    api_client::create(pool, &name, &key.sha256(), &admin_grants()).await.unwrap();
    let status = || async {
        let url = format!("{internal}/v1/installations");
        http.get(url).bearer_auth(key.expose()).send().await.map_or(0, |r| r.status().as_u16())
    };
    assert_eq!(eventually(status, |s| *s == 200).await, 200, "the sentinel key works");
    sqlx::query("update api_client set revoked_at = now() where name = $1").bind(&name).execute(pool).await.unwrap();
    assert_eq!(eventually(status, |s| *s == 401).await, 401, "the notifications committed so far have arrived");
}

/// Repeats `attempt` until `done` holds for its result, for at most 2 s (changes made outside the process
/// reach its caches by NOTIFY, within milliseconds); returns the last result.
pub async fn eventually<T, F: std::future::Future<Output = T>>(
    attempt: impl Fn() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let result = attempt().await;
        if done(&result) || std::time::Instant::now() > deadline {
            return result;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn the_leak_scanner_recognises_every_secret_shape() {
    assert_eq!(leaked_secret("x csecret-abc"), Some("client secret"));
    assert_eq!(leaked_secret(&format!("cid-{}", "a".repeat(32))), Some("client id"));
    assert_eq!(leaked_secret(&format!("\"at-12-{}\"", "f".repeat(32))), Some("access token"));
    assert_eq!(leaked_secret("Bearer tvk_abc"), Some("service key"));
    assert_eq!(leaked_secret(&format!("x rt-{}", "0".repeat(48))), Some("refresh token"));
    assert_eq!(leaked_secret("waiting at-least 5 s, cid-1"), None);
}

/// A real OAuth2 authorization server from a package registry (tests/conformance/), started on loopback
/// for this test and killed when dropped. `make test` sets up their packages (scripts/conformance-setup.sh).
pub struct ConformanceServer {
    child: std::process::Child,
    pub base: String,
    _config: std::path::PathBuf,
}

impl ConformanceServer {
    /// The authlib server (tests/conformance/authlib_server.py) with `config`.
    pub fn authlib(config: &Value) -> Self {
        let python = std::env::var("TOKENVAULT_CONFORMANCE_PYTHON")
            .expect("TOKENVAULT_CONFORMANCE_PYTHON is set by `make test` (scripts/with-env.sh test)");
        let script = format!("{}/tests/conformance/authlib_server.py", env!("CARGO_MANIFEST_DIR"));
        Self::start(std::process::Command::new(python).arg(script), config)
    }

    /// panva's oidc-provider (tests/conformance/oidc/server.mjs) with `config`.
    pub fn oidc_provider(config: &Value) -> Self {
        let dir = std::env::var("TOKENVAULT_CONFORMANCE_NODE_DIR")
            .expect("TOKENVAULT_CONFORMANCE_NODE_DIR is set by `make test` (scripts/with-env.sh test)");
        Self::start(std::process::Command::new("node").arg(format!("{dir}/server.mjs")), config)
    }

    fn start(command: &mut std::process::Command, config: &Value) -> Self {
        use std::io::BufRead;
        let path = std::env::temp_dir().join(format!("tv-conformance-{}.json", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, serde_json::to_vec(config).unwrap()).unwrap();
        let mut child = command
            .arg("--config")
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the conformance server starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("LISTENING ").unwrap_or_else(|| panic!("no LISTENING line: {line:?}"));
        Self { child, base: format!("http://127.0.0.1:{port}"), _config: path }
    }

    /// The server's own counters (`/stats`).
    pub async fn stats(&self) -> Value {
        reqwest::get(format!("{}/stats", self.base)).await.unwrap().json().await.unwrap()
    }

    /// Successful grants of `grant_type` so far.
    pub async fn grants(&self, grant_type: &str) -> u64 {
        self.stats().await["grants"][grant_type].as_u64().unwrap_or(0)
    }

    pub async fn post(&self, path: &str) {
        let response = reqwest::Client::new().post(format!("{}{path}", self.base)).send().await.unwrap();
        assert!(response.status().is_success(), "{path}");
    }
}

impl Drop for ConformanceServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self._config);
    }
}

impl TestApp {
    /// Registers credentials of `account` at `provider` through the admin API; returns the answer.
    pub async fn put_credentials(&self, admin: &str, provider: &str, account: &str, body: &Value) -> reqwest::Response {
        self.http
            .put(format!("{}/v1/providers/{provider}/accounts/{account}/credentials", self.internal))
            .bearer_auth(admin)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Every row of the tables that hold secrets, as JSON text: to search a "database dump" for plaintext.
    pub async fn dump(&self) -> String {
        let mut dump = String::new();
        for table in ["installation", "token_cache", "refresh_token", "callback_event", "mint_failure", "api_client"] {
            let rows: String = sqlx::query_scalar(&format!("select coalesce(json_agg(t)::text, '') from {table} t"))
                .fetch_one(&self.pool)
                .await
                .unwrap();
            dump.push_str(&rows);
        }
        dump
    }
}
