//! A fake Trackunit for load tests (`make bench`): never point a real deployment at it.
//!
//! - `GET /jwks`: the public half of `tests/fixtures/rsa-a.pem` (kid `rsa-a`), `Cache-Control: max-age=3600`.
//! - `POST /apptoken`: the OAuth2 client credentials grant (form-encoded, secret in the body). Every call
//!   mints a new unique token valid for `--expires-in` seconds, after `--delay-ms` milliseconds. Tokens
//!   read `fake-at-e<epoch>-<n>-<random>`, where the epoch counts the resets below.
//! - `GET /stats`: `{"epoch": n, "mints_total": n, "mints_per_key": {"<client_id>|<scope>": n, ...}, "jwks_fetches": n,
//!   "distinct_keys": n, "per_key_min": n, "per_key_max": n, "duplicate_mints": n, "shortest_gap_ms": n,
//!   "mean_gap_ms": n}` (the last six summarise `mints_per_key`, so a shell script can read them without a
//!   JSON parser).
//!   `duplicate_mints` counts mints that came less than a second after the previous mint of the same key:
//!   two processes minting the same token instead of one. `shortest_gap_ms` is the shortest time between
//!   two mints of one key (-1 before any key was minted twice), `mean_gap_ms` the mean over all keys.
//! - `POST /reset`: sets every counter back to zero.
//!
//! `--print-identity` prints a `Trackunit-Identity` JWT (RS256, kid `rsa-a`, `iat` now, `exp` now + 3600,
//! no account or app claim, so one JWT authenticates callbacks for any account) and exits without serving.
//!
//! ```sh
//! cargo run --release --example fake_trackunit -- --addr 127.0.0.1:9900 --expires-in 10 --delay-ms 50
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix_web::http::header;
use actix_web::{App, HttpResponse, HttpServer, web};
use clap::Parser;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The fixture key pair that plays Trackunit's marketplace signing key (see tests/fixtures/README.md).
const PUBLIC_JWK: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rsa-a.jwk.json"));
const PRIVATE_PEM: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rsa-a.pem"));
const KID: &str = "rsa-a";

#[derive(Debug, Parser)]
#[command(name = "fake_trackunit", about = "A fake Trackunit (JWKS and token endpoint) for load tests.")]
struct Args {
    /// Where to listen. Keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:9900")]
    addr: SocketAddr,
    /// Lifetime of the minted tokens, in seconds (`expires_in` of the reply).
    #[arg(long, default_value_t = 3600)]
    expires_in: u64,
    /// Delay before answering each token request, in milliseconds (plays the upstream's latency).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Worker threads of the HTTP server.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Print a valid identity JWT on stdout and exit, instead of serving.
    #[arg(long)]
    print_identity: bool,
}

/// Mints closer together than this, for one key, are duplicates: a refresh never follows a mint that soon.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Stats {
    /// How many times the counters were reset: part of every token, so a load generator can tell the
    /// tokens minted since the last reset from older ones.
    epoch: AtomicU64,
    mints_total: AtomicU64,
    jwks_fetches: AtomicU64,
    mints_per_key: Mutex<HashMap<String, KeyMints>>,
}

#[derive(Default)]
struct KeyMints {
    count: u64,
    last: Option<std::time::Instant>,
    shortest_gap: Option<Duration>,
    /// Sum and number of the gaps between consecutive mints: their mean is how often the key is renewed,
    /// free of how a measurement window happens to cut its mints.
    gaps_total: Duration,
    gaps: u64,
    duplicates: u64,
}

impl KeyMints {
    fn record(&mut self, at: std::time::Instant) {
        if let Some(last) = self.last {
            let gap = at.saturating_duration_since(last);
            self.shortest_gap = Some(self.shortest_gap.map_or(gap, |shortest| shortest.min(gap)));
            self.gaps_total += gap;
            self.gaps += 1;
            if gap < DUPLICATE_WINDOW {
                self.duplicates += 1;
            }
        }
        self.count += 1;
        self.last = Some(at);
    }
}

struct State {
    jwks: Value,
    expires_in: u64,
    delay: Duration,
    stats: Stats,
}

/// An RS256 identity JWT signed with the fixture key, valid for an hour from now.
fn identity_jwt() -> anyhow::Result<String> {
    let now = chrono::Utc::now().timestamp();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(KID.to_owned());
    let key = EncodingKey::from_rsa_pem(PRIVATE_PEM)?;
    Ok(jsonwebtoken::encode(&header, &json!({ "iat": now, "exp": now + 3600 }), &key)?)
}

async fn jwks(state: web::Data<State>) -> HttpResponse {
    state.stats.jwks_fetches.fetch_add(1, Ordering::Relaxed);
    HttpResponse::Ok().insert_header((header::CACHE_CONTROL, "max-age=3600")).json(&state.jwks)
}

fn oauth_error(status: actix_web::http::StatusCode, error: &str) -> HttpResponse {
    HttpResponse::build(status).insert_header((header::CACHE_CONTROL, "no-store")).json(json!({ "error": error }))
}

async fn apptoken(state: web::Data<State>, form: web::Form<HashMap<String, String>>) -> HttpResponse {
    use actix_web::http::StatusCode;
    let arrived = std::time::Instant::now();
    if !state.delay.is_zero() {
        tokio::time::sleep(state.delay).await;
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    let (Some(client_id), Some(_secret)) = (form.get("client_id"), form.get("client_secret")) else {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    };
    let scope = form.get("scope").cloned().unwrap_or_default();
    let n = state.stats.mints_total.fetch_add(1, Ordering::Relaxed) + 1;
    let epoch = state.stats.epoch.load(Ordering::Relaxed);
    state.stats.mints_per_key.lock().unwrap().entry(format!("{client_id}|{scope}")).or_default().record(arrived);
    HttpResponse::Ok().insert_header((header::CACHE_CONTROL, "no-store")).json(json!({
        "access_token": format!("fake-at-e{epoch}-{n}-{}", uuid::Uuid::new_v4().simple()),
        "token_type": "Bearer",
        "expires_in": state.expires_in,
        "scope": scope,
    }))
}

async fn stats(state: web::Data<State>) -> HttpResponse {
    let keys = state.stats.mints_per_key.lock().unwrap();
    let per_key: BTreeMap<String, u64> = keys.iter().map(|(k, v)| (k.clone(), v.count)).collect();
    let duplicates: u64 = keys.values().map(|k| k.duplicates).sum();
    let shortest_gap_ms = keys.values().filter_map(|k| k.shortest_gap).min().map_or(-1, |gap| gap.as_millis() as i64);
    let gaps: u64 = keys.values().map(|k| k.gaps).sum();
    let gaps_total: Duration = keys.values().map(|k| k.gaps_total).sum();
    let mean_gap_ms = if gaps == 0 { -1 } else { (gaps_total / gaps as u32).as_millis() as i64 };
    drop(keys);
    HttpResponse::Ok().json(json!({
        "epoch": state.stats.epoch.load(Ordering::Relaxed),
        "duplicate_mints": duplicates,
        "shortest_gap_ms": shortest_gap_ms,
        "mean_gap_ms": mean_gap_ms,
        "mints_total": state.stats.mints_total.load(Ordering::Relaxed),
        "jwks_fetches": state.stats.jwks_fetches.load(Ordering::Relaxed),
        "distinct_keys": per_key.len(),
        "per_key_min": per_key.values().min().copied().unwrap_or(0),
        "per_key_max": per_key.values().max().copied().unwrap_or(0),
        "mints_per_key": per_key,
    }))
}

async fn reset(state: web::Data<State>) -> HttpResponse {
    state.stats.epoch.fetch_add(1, Ordering::Relaxed);
    state.stats.mints_total.store(0, Ordering::Relaxed);
    state.stats.jwks_fetches.store(0, Ordering::Relaxed);
    state.stats.mints_per_key.lock().unwrap().clear();
    HttpResponse::NoContent().finish()
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_identity {
        println!("{}", identity_jwt()?);
        return Ok(());
    }
    let jwk: Value = serde_json::from_str(PUBLIC_JWK)?;
    let state = web::Data::new(State {
        jwks: json!({ "keys": [jwk] }),
        expires_in: args.expires_in,
        delay: Duration::from_millis(args.delay_ms),
        stats: Stats::default(),
    });
    eprintln!(
        "fake_trackunit listening on http://{} (expires_in {} s, delay {} ms)",
        args.addr, args.expires_in, args.delay_ms
    );
    HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/jwks", web::get().to(jwks))
            .route("/apptoken", web::post().to(apptoken))
            .route("/stats", web::get().to(stats))
            .route("/reset", web::post().to(reset))
    })
    .workers(args.workers.max(1))
    .bind(args.addr)?
    .run()
    .await?;
    Ok(())
}
