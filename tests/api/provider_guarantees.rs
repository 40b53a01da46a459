//! The guarantees of the Trackunit path, proven for a provider defined in the settings file (issue 11): the
//! order of checks, degraded serving, per-key backoff, rejected delegated credentials, one upstream call
//! for concurrent requests, and default scopes. The provider's token endpoint is the fake of helpers.rs
//! (it records each call's form and fails on demand); no Trackunit token is asked for in these tests, so
//! every call it records is the provider's.

use std::time::Duration;

use serde_json::{Value, json};
use tokenvault::store::api_client;

use crate::helpers::*;

/// `acme`: a plain client_credentials provider without default scopes; `dflt`: one with default scopes.
const PROVIDERS: &str = "[providers.acme]\ntoken_url = \"{trackunit}/apptoken\"\n\
                         [providers.dflt]\ntoken_url = \"{trackunit}/apptoken\"\n\
                         default_scopes = [\"d.read\", \"d.write\"]\n";

/// An app with the providers of [`PROVIDERS`], an admin key and a key granted every provider, account and
/// scope.
async fn app() -> (TestApp, String, String) {
    let app = spawn_app_with(Options { config_toml: PROVIDERS.to_owned(), ..Options::default() }).await;
    let admin = app.client(&[], &[], true).await;
    let key = app.client(&["*"], &["*"], false).await;
    (app, admin, key)
}

/// A service key granted exactly these providers, accounts and scopes.
async fn key_granted(app: &TestApp, providers: &[&str], accounts: &[&str], scopes: &[&str]) -> String {
    let to_vec = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let grants = api_client::Grants {
        accounts: to_vec(accounts),
        scopes: to_vec(scopes),
        apps: vec!["*".into()],
        providers: to_vec(providers),
        admin: false,
    };
    app.client_named(&format!("client-{}", uuid::Uuid::new_v4().simple()), &grants).await
}

fn body(credentials: &Credentials) -> Value {
    json!({"client_id": credentials.client_id, "client_secret": credentials.client_secret})
}

fn ask(account: &str, scopes: &[&str]) -> Value {
    json!({"provider": "acme", "account_id": account, "scopes": scopes})
}

/// A refresh token of the shape the log scanner recognises.
fn refresh_token() -> String {
    format!("rt-{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

async fn json_of(response: reqwest::Response) -> Value {
    let status = response.status();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{answer}");
    answer
}

/// 403 `forbidden` whose detail names the grant that failed (`provider`, `account` or `scope`).
async fn refused_for(response: reqwest::Response, grant: &str) {
    let problem = assert_problem(response, 403, "forbidden").await;
    let detail = problem["detail"].as_str().unwrap();
    let expected =
        if grant == "scope" { "not granted the scope".to_owned() } else { format!("not granted this {grant}") };
    assert!(detail.contains(&expected), "{detail}");
}

#[tokio::test]
async fn token_requests_for_a_provider_are_checked_401_400_403_404_unknown_provider_404_not_installed_then_upstream() {
    let (app, admin, every) = app().await;
    assert_eq!(app.put_credentials(&admin, "acme", "acc-1", &body(&credentials())).await.status(), 201);
    // acc-2 is installed at Trackunit only, under two apps (a Trackunit request would be 409 ambiguous_app).
    app.install("acc-2").await;
    let mut second_app = installed_body("acc-2", &credentials());
    second_app["irisAppId"] = "@acme/second-app".into();
    assert_eq!(app.callback(Some(&identity()), &second_app).await.status(), 204);
    let url = format!("{}/v1/tokens", app.internal);
    let raw = |key: Option<&str>, body: &'static str| {
        let mut request = app.http.post(&url).header("content-type", "application/json").body(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };

    // 401 before 400: no key, or a key nobody created, with a body that is wrong in every way.
    let everything_wrong = r#"{"provider":"nope","account_id":7,"scopes":"x","min_ttl_seconds":-1}"#;
    let unknown = tokenvault::domain::ServiceKey::generate().expose().to_owned();
    for key in [None, Some(unknown.as_str())] {
        assert_problem(raw(key, everything_wrong).await.unwrap(), 401, "unauthenticated").await;
        assert_problem(raw(key, "not json").await.unwrap(), 401, "unauthenticated").await;
    }

    // 400 before 403: a key granted nothing this request names, with a malformed body.
    let other_only = key_granted(&app, &["trackunit"], &["acc-9"], &["z"]).await;
    for bad in [
        json!({"provider": "nope", "account_id": "acc-1", "scopes": ["b"], "min_ttl_seconds": -1}),
        json!({"provider": "acme", "account_id": "acc-1", "scopes": ["a"], "app_id": APP_ID}),
        json!({"provider": "acme", "account_id": "acc-1"}),
        json!({"provider": "Not A Name", "account_id": "acc-1", "scopes": ["a"]}),
    ] {
        assert_problem(app.token(&other_only, &bad).await, 400, "invalid_request").await;
    }

    // 403, provider then account then scope, before any 404 (unknown provider or no credentials).
    refused_for(app.token(&other_only, &ask("acc-1", &["a"])).await, "provider").await;
    refused_for(
        app.token(&other_only, &json!({"provider": "nope", "account_id": "acc-404", "scopes": ["b"]})).await,
        "provider",
    )
    .await;
    let acme_acc_1_a = key_granted(&app, &["acme"], &["acc-1"], &["a"]).await;
    refused_for(
        app.token(&acme_acc_1_a, &json!({"provider": "nope", "account_id": "acc-1", "scopes": ["a"]})).await,
        "provider",
    )
    .await;
    refused_for(app.token(&acme_acc_1_a, &ask("acc-404", &["b"])).await, "account").await;
    refused_for(app.token(&acme_acc_1_a, &ask("acc-1", &["b"])).await, "scope").await;
    // A key granted every provider: account then scope, before unknown_provider and before not_installed.
    let any_provider = key_granted(&app, &["*"], &["acc-1", "acc-404"], &["a"]).await;
    let nope = |account: &str, scope: &str| json!({"provider": "nope", "account_id": account, "scopes": [scope]});
    refused_for(app.token(&any_provider, &nope("acc-9", "b")).await, "account").await;
    refused_for(app.token(&any_provider, &nope("acc-404", "b")).await, "scope").await;
    refused_for(app.token(&any_provider, &ask("acc-9", &["b"])).await, "account").await;
    refused_for(app.token(&any_provider, &ask("acc-404", &["b"])).await, "scope").await;

    // 404 unknown_provider before not_installed: the account is installed nowhere, or at other providers.
    assert_problem(app.token(&any_provider, &nope("acc-404", "a")).await, 404, "unknown_provider").await;
    assert_problem(app.token(&any_provider, &nope("acc-1", "a")).await, 404, "unknown_provider").await;
    assert_problem(app.token(&every, &nope("acc-2", "a")).await, 404, "unknown_provider").await;
    // not_installed: no credentials at this provider, though the account may have some at Trackunit.
    assert_problem(app.token(&any_provider, &ask("acc-404", &["a"])).await, 404, "not_installed").await;
    assert_problem(app.token(&every, &ask("acc-2", &["a"])).await, 404, "not_installed").await;
    // 409 ambiguous_app is Trackunit's (several apps per account); here it is 404 not_installed above.
    let trackunit = json!({"account_id": "acc-2", "scopes": ["a"]});
    assert_problem(app.token(&every, &trackunit).await, 409, "ambiguous_app").await;
    assert_eq!(app.upstream.call_count(), 0, "no check above reached the upstream");

    // Only a request that passes every check reaches the upstream.
    json_of(app.token(&acme_acc_1_a, &ask("acc-1", &["a"])).await).await;
    assert_eq!(app.upstream.call_count(), 1);
    // With credentials at this provider, the account's two Trackunit apps make no ambiguity: no 409.
    app.put_credentials(&admin, "acme", "acc-2", &body(&credentials())).await;
    json_of(app.token(&every, &ask("acc-2", &["a"])).await).await;
    assert_eq!(app.upstream.call_count(), 2);
}

#[tokio::test]
async fn a_providers_still_valid_token_keeps_being_served_while_its_token_endpoint_fails() {
    let (app, admin, key) = app().await;
    app.put_credentials(&admin, "acme", "acc-1", &body(&credentials())).await;
    app.upstream.set(vec![Upstream::Mint { expires_in: 4 }]);
    let relaxed = json!({"provider": "acme", "account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": 0});
    let first = json_of(app.token(&key, &relaxed).await).await;
    assert_eq!(app.upstream.call_count(), 1);
    app.upstream.set(vec![Upstream::Fail { status: 503, body: json!({}) }]);

    // 1.5 s left of 4 s: inside the window of a request asking 4 s (capped at half the lifetime, 2 s), so
    // it must mint; the endpoint fails every attempt, and the still-valid token is served.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let demanding = json!({"provider": "acme", "account_id": "acc-1", "scopes": ["a"], "min_ttl_seconds": 4});
    let served = json_of(app.token(&key, &demanding).await).await;
    assert_eq!(served["access_token"], first["access_token"]);
    let calls = app.upstream.call_count();
    assert_eq!(calls, 1 + 3, "one mint, then three failed attempts");
    // And again while the key backs off, without calling.
    let again = json_of(app.token(&key, &demanding).await).await;
    assert_eq!(again["access_token"], first["access_token"]);
    assert_eq!(app.upstream.call_count(), calls);
}

#[tokio::test]
async fn a_providers_failing_key_backs_off_with_503_and_retry_after_without_calling_again() {
    let (app, admin, key) = app().await;
    app.put_credentials(&admin, "acme", "acc-1", &body(&credentials())).await;
    app.upstream.set(vec![Upstream::Fail { status: 500, body: json!({}) }]);
    assert_problem(app.token(&key, &ask("acc-1", &["a"])).await, 502, "upstream_error").await;
    let calls = app.upstream.call_count();
    assert_eq!(calls, 3, "one mint of three attempts");
    for _ in 0..3 {
        let response = app.token(&key, &ask("acc-1", &["a"])).await;
        let wait: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(wait >= 1, "{wait}");
        assert_problem(response, 503, "upstream_unavailable").await;
    }
    assert_eq!(app.upstream.call_count(), calls, "no upstream call while the key backs off");
    // Per key: another scope set of the same credentials is not held back.
    app.upstream.set(vec![Upstream::Mint { expires_in: 3600 }]);
    json_of(app.token(&key, &ask("acc-1", &["b"])).await).await;
    assert_eq!(app.upstream.call_count(), calls + 1);
}

#[tokio::test]
async fn twenty_concurrent_requests_for_a_cold_key_of_a_provider_make_one_upstream_call() {
    let (app, admin, key) = app().await;
    app.put_credentials(&admin, "acme", "acc-1", &body(&credentials())).await;
    *app.upstream.delay.lock().unwrap() = Duration::from_millis(300);
    let cold = ask("acc-1", &["a"]);
    let requests = (0..20).map(|_| app.token(&key, &cold));
    let responses = futures_util::future::join_all(requests).await;
    let mut tokens = std::collections::HashSet::new();
    for response in responses {
        tokens.insert(json_of(response).await["access_token"].as_str().unwrap().to_owned());
    }
    assert_eq!(tokens.len(), 1, "everyone got the same token");
    assert_eq!(app.upstream.call_count(), 1);
}

#[tokio::test]
async fn a_delegated_credential_refused_with_invalid_grant_stays_rejected_until_new_credentials() {
    let (app, admin, key) = app().await;
    let refused = refresh_token();
    let registered = json!({"client_id": credentials().client_id, "refresh_token": refused});
    assert_eq!(app.put_credentials(&admin, "acme", "user-1", &registered).await.status(), 201);
    app.upstream.set(vec![Upstream::Fail { status: 400, body: json!({"error": "invalid_grant"}) }]);
    assert_problem(app.token(&key, &ask("user-1", &["a"])).await, 502, "upstream_rejected").await;
    assert_eq!(app.upstream.call_count(), 1);
    let form = app.upstream.calls.lock().unwrap()[0].clone();
    assert_eq!((form["grant_type"].as_str(), form["refresh_token"].as_str()), ("refresh_token", refused.as_str()));
    assert_eq!(app.status_of("user-1").await, "rejected");

    // The credential is rejected, not just the key: another scope set gets the same answer, uncalled.
    app.upstream.set(vec![Upstream::Mint { expires_in: 3600 }]);
    assert_problem(app.token(&key, &ask("user-1", &["b"])).await, 502, "upstream_rejected").await;
    assert_problem(app.token(&key, &ask("user-1", &["a"])).await, 502, "upstream_rejected").await;
    assert_eq!(app.upstream.call_count(), 1, "no upstream call for rejected credentials");

    let renewed = refresh_token();
    let replaced = json!({"client_id": credentials().client_id, "refresh_token": renewed});
    assert_eq!(app.put_credentials(&admin, "acme", "user-1", &replaced).await.status(), 200);
    assert_eq!(app.status_of("user-1").await, "active");
    let first_scope = ask("user-1", &["a"]);
    let answer = eventually(|| app.token(&key, &first_scope), |r| r.status() == 200).await;
    json_of(answer).await;
    let form = app.upstream.calls.lock().unwrap().last().unwrap().clone();
    assert_eq!((form["grant_type"].as_str(), form["refresh_token"].as_str()), ("refresh_token", renewed.as_str()));
    assert_eq!(app.upstream.call_count(), 2);
}

#[tokio::test]
async fn scopes_may_be_omitted_or_empty_only_when_the_provider_has_default_scopes() {
    let (app, admin, key) = app().await;
    app.put_credentials(&admin, "dflt", "acc-1", &body(&credentials())).await;
    app.put_credentials(&admin, "acme", "acc-1", &body(&credentials())).await;

    let omitted = json!({"provider": "dflt", "account_id": "acc-1"});
    let first = json_of(app.token(&key, &omitted).await).await;
    assert_eq!(app.upstream.call_count(), 1);
    let form = app.upstream.calls.lock().unwrap()[0].clone();
    assert_eq!(form.get("scope").map(String::as_str), Some("d.read d.write"), "the default scopes are sent: {form:?}");
    let empty = json!({"provider": "dflt", "account_id": "acc-1", "scopes": []});
    let again = json_of(app.token(&key, &empty).await).await;
    assert_eq!(again["access_token"], first["access_token"], "empty is omitted: the same token, from cache");
    assert_eq!(app.upstream.call_count(), 1);
    // The caller must still be granted the default scopes.
    let only_read = key_granted(&app, &["*"], &["*"], &["d.read"]).await;
    refused_for(app.token(&only_read, &omitted).await, "scope").await;

    // Without default scopes, a request must name one.
    for bad in [json!({"provider": "acme", "account_id": "acc-1"}), ask("acc-1", &[])] {
        let problem = assert_problem(app.token(&key, &bad).await, 400, "invalid_request").await;
        assert!(problem["detail"].as_str().unwrap().contains("`scopes`"), "{problem}");
    }
    assert_eq!(app.upstream.call_count(), 1);
}
