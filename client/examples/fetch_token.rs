//! Asks tokenvault for a token and prints its expiry (never the token), and the `curl` line that sends
//! the same request.
//!
//! ```sh
//! TOKENVAULT_URL=http://127.0.0.1:8081 TOKENVAULT_KEY=tvk_… \
//!   cargo run -p tokenvault-client --example fetch_token -- ACCOUNT_ID [SCOPE...]
//! ```
//!
//! `TOKENVAULT_URL` defaults to `http://127.0.0.1:8081` (the internal listener of `make run`).
//! `TOKENVAULT_PROVIDER` and `TOKENVAULT_APP_ID`, when set, name the provider and the app;
//! `TOKENVAULT_MIN_TTL` the least seconds the token must have left (default 60).

use std::process::ExitCode;
use std::time::Duration;

use tokenvault_client::{SecretString, TokenRequest, TokenvaultClient};

#[tokio::main]
async fn main() -> ExitCode {
    let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let url = var("TOKENVAULT_URL").unwrap_or_else(|| "http://127.0.0.1:8081".into());
    let Some(key) = var("TOKENVAULT_KEY").map(SecretString::from) else {
        eprintln!("set TOKENVAULT_KEY to a service key (tokenvault clients create)");
        return ExitCode::from(2);
    };
    let mut args = std::env::args().skip(1);
    let Some(account_id) = args.next() else {
        eprintln!("usage: fetch_token ACCOUNT_ID [SCOPE...]");
        return ExitCode::from(2);
    };
    let min_ttl = match var("TOKENVAULT_MIN_TTL").map(|secs| secs.parse::<u64>()) {
        None => 60,
        Some(Ok(secs)) => secs,
        Some(Err(_)) => {
            eprintln!("TOKENVAULT_MIN_TTL must be a whole number of seconds");
            return ExitCode::from(2);
        }
    };
    let mut request = TokenRequest::new(account_id).with_scopes(args).with_min_ttl(Duration::from_secs(min_ttl));
    request.provider = var("TOKENVAULT_PROVIDER");
    request.app_id = var("TOKENVAULT_APP_ID");

    let client = match TokenvaultClient::builder(&url).service_key(key).build() {
        Ok(client) => client,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    println!("The same request with curl:");
    println!("{}", curl_line(&url, &request));
    println!();

    match client.token(&request).await {
        Ok(token) => {
            let expires_at = chrono::DateTime::<chrono::Utc>::from(token.expires_at());
            println!(
                "Got a {} token for the scope {:?}: it expires in {} s, at {}.",
                token.token_type(),
                token.scope(),
                token.expires_in().as_secs(),
                expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
            // A second call within min_ttl is served from memory: no HTTP call.
            if let Ok(again) = client.token(&request).await
                && again.expires_at() == token.expires_at()
            {
                println!("Asked again: the same token, from memory (no second HTTP call).");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("no token: {error}");
            if let Some(code) = error.code() {
                eprintln!("problem code: {code}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The `curl` command that sends `request`, the key left as `$TOKENVAULT_KEY`.
fn curl_line(url: &str, request: &TokenRequest) -> String {
    let mut body = serde_json::json!({
        "account_id": request.account_id,
        "scopes": request.scopes,
        "min_ttl_seconds": request.min_ttl.as_secs(),
    });
    if let Some(provider) = &request.provider {
        body["provider"] = provider.as_str().into();
    }
    if let Some(app_id) = &request.app_id {
        body["app_id"] = app_id.as_str().into();
    }
    let quoted = body.to_string().replace('\'', r"'\''");
    format!(
        "curl -sS {}/v1/tokens \\\n  -H \"Authorization: Bearer $TOKENVAULT_KEY\" \\\n  -H 'Content-Type: application/json' \\\n  -d '{quoted}'",
        url.trim_end_matches('/')
    )
}
