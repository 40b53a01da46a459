//! Runs the main scenarios with logging at TRACE for every crate and asserts that no client id, client
//! secret, service key, access token or encryption key reaches the logs. A binary of its own, because
//! the subscriber is process-wide.

#[path = "api/helpers.rs"]
#[allow(dead_code, reason = "shared helpers; this binary uses a subset")]
mod helpers;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine;
use helpers::*;
use serde_json::json;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture() -> Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            // Everything, except the fake Trackunit's own server, which is not tokenvault.
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace,wiremock=off"))
            .with_writer(move || writer.clone())
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init();
        captured
    })
    .clone()
}

#[tokio::test]
async fn no_secret_reaches_the_logs_at_trace_level() {
    let logs = capture();
    let app = spawn_app().await;
    let credentials = app.install("acc-1").await;
    let replay = installed_body("acc-1", &credentials);
    assert_eq!(app.callback(Some(&identity()), &replay).await.status(), 204);
    let key = app.client(&["*"], &["*"], true).await;
    let request = json!({"account_id": "acc-1", "scopes": ["asset.view"]});
    let minted: serde_json::Value = app.token(&key, &request).await.json().await.unwrap();
    let cached: serde_json::Value = app.token(&key, &request).await.json().await.unwrap();
    assert_eq!(minted["access_token"], cached["access_token"]);

    // Failures log too: bad identity, bad key, malformed bodies quoting a secret, upstream refusals.
    let refused = app.callback(Some("garbage"), &installed_body("acc-2", &credentials)).await;
    assert_eq!(refused.status(), 401);
    let quoting = format!(r#"{{"type":"INSTALLED","clientSecret":"{}" nonsense"#, credentials.client_secret);
    assert_eq!(app.callback_raw(Some(&identity()), "application/json", quoting.into_bytes()).await.status(), 400);
    assert_eq!(app.token(&format!("{key}x"), &request).await.status(), 401);
    let other = app.install("acc-3").await;
    app.upstream.set(vec![Upstream::Fail {
        status: 401,
        body: json!({"error": "invalid_client", "error_description": other.client_secret}),
    }]);
    assert_eq!(app.token(&key, &json!({"account_id": "acc-3", "scopes": ["a"]})).await.status(), 502);
    let listing = app.http.get(format!("{}/v1/installations", app.internal)).bearer_auth(&key).send().await.unwrap();
    assert_eq!(listing.status(), 200);
    let uninstall = json!({"type": "UNINSTALLED", "irisAppId": APP_ID, "accountId": "acc-1"});
    assert_eq!(app.callback(Some(&identity()), &uninstall).await.status(), 204);

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("callback handled"), "the scenario was logged at all");
    assert!(text.contains("\"account.id\":\"acc-1\""), "fields are captured, so a leaked field would be too");
    let encryption_key = app.encryption_keys.split_once(':').unwrap().1;
    let key_bytes = base64::engine::general_purpose::STANDARD.decode(encryption_key).unwrap();
    let secrets = [
        ("client id", credentials.client_id.as_str()),
        ("client secret", credentials.client_secret.as_str()),
        ("other client secret", other.client_secret.as_str()),
        ("service key", key.as_str()),
        ("access token", minted["access_token"].as_str().unwrap()),
        ("encryption key", encryption_key),
        ("encryption key (hex)", &hex::encode(&key_bytes)),
    ];
    for (what, secret) in secrets {
        assert!(!text.contains(secret), "the {what} reached the logs");
    }
}
