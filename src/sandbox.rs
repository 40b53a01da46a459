//! `tokenvault sandbox`: a local stand-in for Trackunit, so tokenvault can be seen working without a live
//! Trackunit account. One port serves:
//! - `GET /jwks`: the sandbox's own Ed25519 signing key, generated at start (never written anywhere);
//! - `POST /apptoken`: the client credentials grant as Trackunit answers it, minting real signed JWTs that
//!   expire, for credentials the sandbox handed out, and `invalid_client` for any other;
//! - `POST /sandbox/install` and `/sandbox/uninstall`: send a correctly signed INSTALLED (with fresh
//!   credentials) or UNINSTALLED callback to a tokenvault (what `tokenvault sandbox install` calls);
//! - `POST /sandbox/mode`: switches that make `/apptoken` fail: 5xx, 429 with `Retry-After`, slowness.
//!
//! For development and demos only: it holds everything in memory and trusts whoever reaches its port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use anyhow::Context;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

/// How `/apptoken` answers: normally, or failing on purpose.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Ok,
    /// 503 to every token request.
    ServerError,
    /// 429 with `Retry-After: retry_after_secs`.
    RateLimited { retry_after_secs: u64 },
    /// Answers normally after `delay_ms`.
    Slow { delay_ms: u64 },
}

struct Sandbox {
    key: Ed25519KeyPair,
    kid: String,
    /// Client id → secret, of every credential handed out by an install.
    clients: Mutex<HashMap<String, String>>,
    mode: Mutex<Mode>,
    token_lifetime: Duration,
    issued: std::sync::atomic::AtomicU64,
    http: reqwest::Client,
}

impl Sandbox {
    /// A compact JWS (EdDSA) of `claims`, signed by the sandbox's key.
    fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "EdDSA", "typ": "JWT", "kid": self.kid});
        let encode = |value: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("JSON values serialize"));
        let input = format!("{}.{}", encode(&header), encode(claims));
        let signature = self.key.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }

    fn jwks(&self) -> Value {
        json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(self.key.public_key().as_ref()),
        }]})
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The URL tokenvault reaches the sandbox at, listening on `address` (its `port` picked): loopback for an
/// unspecified address, and an IPv6 address in brackets.
fn advertised_base(address: SocketAddr, port: u16) -> String {
    let ip = if address.ip().is_unspecified() { std::net::Ipv4Addr::LOCALHOST.into() } else { address.ip() };
    format!("http://{}", SocketAddr::new(ip, port))
}

/// Serves the sandbox on `address` until the process ends; prints the settings that point tokenvault at it.
pub async fn serve(address: SocketAddr, token_lifetime: Duration) -> anyhow::Result<()> {
    let key = Ed25519KeyPair::generate().map_err(|_| anyhow::anyhow!("cannot generate the sandbox's signing key"))?;
    let sandbox = web::Data::new(Sandbox {
        key,
        kid: format!("sandbox-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        clients: Mutex::new(HashMap::new()),
        mode: Mutex::new(Mode::Ok),
        token_lifetime,
        issued: std::sync::atomic::AtomicU64::new(0),
        http: crate::outbound::client(Duration::from_secs(10)),
    });
    let listener = std::net::TcpListener::bind(address).with_context(|| format!("cannot listen on {address}"))?;
    let port = listener.local_addr()?.port();
    let base = advertised_base(address, port);
    println!("tokenvault sandbox: a local stand-in for Trackunit on {base}");
    println!("Point tokenvault at it with:");
    println!("  export TOKENVAULT_TRACKUNIT_JWKS_URL={base}/jwks");
    println!("  export TOKENVAULT_TRACKUNIT_TOKEN_URL={base}/apptoken");
    if !address.ip().is_loopback() && !address.ip().is_unspecified() {
        println!("  export TOKENVAULT_INSECURE_ALLOW_HTTP_UPSTREAMS=true   # development only");
    }
    println!("Then send an install:  tokenvault sandbox install --url http://127.0.0.1:8080 --account demo-account");
    let server = HttpServer::new(move || {
        App::new()
            .app_data(sandbox.clone())
            .route("/jwks", web::get().to(jwks))
            .route("/apptoken", web::post().to(apptoken))
            .route("/sandbox/install", web::post().to(install))
            .route("/sandbox/uninstall", web::post().to(uninstall))
            .route("/sandbox/mode", web::post().to(set_mode))
            .route("/healthz", web::get().to(|| async { HttpResponse::Ok().json(json!({"status": "ok"})) }))
    })
    .workers(1)
    .listen(listener)?
    .run();
    server.await.context("the sandbox server failed")
}

async fn jwks(sandbox: web::Data<Sandbox>) -> HttpResponse {
    HttpResponse::Ok().insert_header(("Cache-Control", "max-age=300")).json(sandbox.jwks())
}

fn oauth_error(status: u16, error: &str) -> HttpResponse {
    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).expect("a valid status"))
        .json(json!({"error": error}))
}

/// The client of a token request: `client_secret_post`, or HTTP Basic.
fn presented_client(request: &HttpRequest, form: &HashMap<String, String>) -> Option<(String, String)> {
    if let (Some(id), Some(secret)) = (form.get("client_id"), form.get("client_secret")) {
        return Some((id.clone(), secret.clone()));
    }
    let header = request.headers().get("authorization")?.to_str().ok()?;
    let decoded = STANDARD.decode(header.strip_prefix("Basic ")?).ok()?;
    let (id, secret) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    let decode = |v: &str| url::form_urlencoded::parse(format!("v={v}").as_bytes()).next().map(|(_, v)| v.into_owned());
    Some((decode(id)?, decode(secret)?))
}

async fn apptoken(request: HttpRequest, body: web::Bytes, sandbox: web::Data<Sandbox>) -> HttpResponse {
    let mode = sandbox.mode.lock().expect("sandbox lock poisoned").clone();
    match mode {
        Mode::Ok => {}
        Mode::ServerError => return oauth_error(503, "temporarily_unavailable"),
        Mode::RateLimited { retry_after_secs } => {
            return HttpResponse::TooManyRequests()
                .insert_header(("Retry-After", retry_after_secs.to_string()))
                .json(json!({"error": "slow_down"}));
        }
        Mode::Slow { delay_ms } => tokio::time::sleep(Duration::from_millis(delay_ms)).await,
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return oauth_error(400, "unsupported_grant_type");
    }
    let Some((client_id, secret)) = presented_client(&request, &form) else {
        return oauth_error(401, "invalid_client");
    };
    let known = sandbox.clients.lock().expect("sandbox lock poisoned").get(&client_id).cloned();
    if known.is_none_or(|expected| expected != secret) {
        return oauth_error(401, "invalid_client");
    }
    let scope = form.get("scope").cloned().unwrap_or_default();
    let lifetime = sandbox.token_lifetime.as_secs() as i64;
    let n = sandbox.issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let claims = json!({"iss": "tokenvault-sandbox", "sub": client_id, "scope": scope, "iat": now(),
                        "exp": now() + lifetime, "jti": format!("sandbox-token-{n}")});
    HttpResponse::Ok().insert_header(("Cache-Control", "no-store")).json(json!({
        "access_token": sandbox.sign(&claims), "token_type": "Bearer", "expires_in": lifetime, "scope": scope,
    }))
}

/// `{"url": tokenvault's public base URL, "app": irisAppId, "account": account id}`.
#[derive(serde::Deserialize)]
struct Delivery {
    url: String,
    app: String,
    account: String,
}

/// Sends a callback signed by the sandbox's key to `delivery.url`; answers what tokenvault answered.
async fn deliver(sandbox: &Sandbox, delivery: &Delivery, message: Value) -> HttpResponse {
    let claims = json!({"iat": now(), "exp": now() + 300, "jti": uuid::Uuid::new_v4().to_string(),
                        "irisAppId": delivery.app, "accountId": delivery.account});
    let url = format!("{}/callbacks/trackunit", delivery.url.trim_end_matches('/'));
    let sent = sandbox.http.post(&url).header("Trackunit-Identity", sandbox.sign(&claims)).json(&message).send().await;
    match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            HttpResponse::Ok().json(json!({"callback_url": url, "tokenvault_status": status, "tokenvault_body": body}))
        }
        Err(error) => HttpResponse::BadGateway().json(json!({"error": format!("cannot reach {url}: {error}")})),
    }
}

async fn install(delivery: web::Json<Delivery>, sandbox: web::Data<Sandbox>) -> HttpResponse {
    // Fresh credentials the sandbox's /apptoken accepts; they are shown only to tokenvault.
    let client_id = format!("sandbox-client-{}", uuid::Uuid::new_v4().simple());
    let secret = format!("sandbox-secret-{}", uuid::Uuid::new_v4().simple());
    sandbox.clients.lock().expect("sandbox lock poisoned").insert(client_id.clone(), secret.clone());
    let message = json!({"type": "INSTALLED", "irisAppId": delivery.app, "accountId": delivery.account,
                         "clientId": client_id, "clientSecret": secret});
    deliver(&sandbox, &delivery, message).await
}

async fn uninstall(delivery: web::Json<Delivery>, sandbox: web::Data<Sandbox>) -> HttpResponse {
    let message = json!({"type": "UNINSTALLED", "irisAppId": delivery.app, "accountId": delivery.account});
    deliver(&sandbox, &delivery, message).await
}

async fn set_mode(mode: web::Json<Mode>, sandbox: web::Data<Sandbox>) -> HttpResponse {
    *sandbox.mode.lock().expect("sandbox lock poisoned") = mode.into_inner();
    HttpResponse::Ok().json(&*sandbox.mode.lock().expect("sandbox lock poisoned"))
}

/// `tokenvault sandbox install|uninstall`: asks the sandbox at `sandbox_url` to deliver the callback.
pub async fn send(sandbox_url: &str, action: &str, url: &str, app: &str, account: &str) -> anyhow::Result<()> {
    let endpoint = format!("{}/sandbox/{action}", sandbox_url.trim_end_matches('/'));
    let response = crate::outbound::client(Duration::from_secs(30))
        .post(&endpoint)
        .json(&json!({"url": url, "app": app, "account": account}))
        .send()
        .await
        .with_context(|| format!("cannot reach the sandbox at {sandbox_url} (is `tokenvault sandbox` running?)"))?;
    let answer: Value = response.json().await.context("the sandbox answered something unreadable")?;
    if let Some(error) = answer.get("error").and_then(Value::as_str) {
        anyhow::bail!("{error}");
    }
    let status = answer["tokenvault_status"].as_u64().unwrap_or(0);
    let message = if action == "install" { "INSTALLED" } else { "UNINSTALLED" };
    let callback_url = answer["callback_url"].as_str().unwrap_or(url);
    println!("sent a signed {message} callback for {app} / {account} to {callback_url}: tokenvault answered {status}");
    anyhow::ensure!((200..300).contains(&status), "tokenvault refused the callback: {}", answer["tokenvault_body"]);
    Ok(())
}

/// Why a signature is what it is: the JWKS's key verifies the sandbox's tokens, the way tokenvault checks.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Policy, parse_jwks, verify_with};

    #[test]
    fn the_printed_url_is_loopback_for_an_unspecified_address_and_brackets_ipv6() {
        let base = |address: &str| advertised_base(address.parse().unwrap(), 8090);
        assert_eq!(base("0.0.0.0:0"), "http://127.0.0.1:8090");
        assert_eq!(base("[::]:0"), "http://127.0.0.1:8090");
        assert_eq!(base("[::1]:8090"), "http://[::1]:8090");
        assert_eq!(base("10.1.2.3:8090"), "http://10.1.2.3:8090");
    }

    #[test]
    fn tokens_the_sandbox_signs_verify_against_its_jwks() {
        let sandbox = Sandbox {
            key: Ed25519KeyPair::generate().unwrap(),
            kid: "sandbox-test".into(),
            clients: Mutex::new(HashMap::new()),
            mode: Mutex::new(Mode::Ok),
            token_lifetime: Duration::from_secs(300),
            issued: Default::default(),
            http: reqwest::Client::new(),
        };
        let keys = parse_jwks(&serde_json::to_vec(&sandbox.jwks()).unwrap()).unwrap();
        let policy = Policy {
            algorithms: crate::settings::ASYMMETRIC_ALGORITHMS.to_vec(),
            issuer: None,
            audience: None,
            token_type: Some("JWT".into()),
            leeway_secs: 60,
            max_lifetime_secs: 3600,
            required_claims: vec!["irisAppId".into(), "accountId".into()],
        };
        let token = sandbox.sign(&json!({"iat": now(), "exp": now() + 300, "irisAppId": "@a/b", "accountId": "c"}));
        assert!(verify_with(&token, &keys, &policy, now()).is_ok());
        let forged = format!("{}x", &token[..token.len() - 1]);
        assert!(verify_with(&forged, &keys, &policy, now()).is_err());
    }
}
