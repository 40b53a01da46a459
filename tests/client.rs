//! The client crate (`client/`, `tokenvault-client`) against a real `tokenvault serve` process, with the
//! database and fake Trackunit of `api/helpers.rs`. What reaches tokenvault is counted by the process's
//! own `/metrics` (`tokenvault_token_requests_total`), what reaches Trackunit by the fake's call count.

#[path = "api/helpers.rs"]
#[allow(dead_code, reason = "shared helpers; this binary uses a subset")]
mod helpers;
#[path = "support/process.rs"]
#[allow(dead_code, reason = "shared with the binary's tests")]
mod process;

use std::process::Stdio;
use std::time::{Duration, Instant};

use helpers::*;
use process::*;
use tokenvault_client::{Error, TokenRequest, TokenvaultClient};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// A `tokenvault serve` process (killed when dropped) and its listeners' base URLs.
struct Running {
    _process: Served,
    internal: String,
    public: String,
}

/// Starts `tokenvault serve` with the settings of `app` and `vars` on top, and waits until it is ready.
async fn serve(app: &TestApp, vars: &[(&str, &str)]) -> Running {
    let (process, public, internal) = serve_with(app, &app.database_url, Stdio::null(), vars).await;
    Running {
        _process: process,
        internal: format!("http://127.0.0.1:{internal}"),
        public: format!("http://127.0.0.1:{public}"),
    }
}

/// The process's `tokenvault_token_requests_total{outcome="…"}`: token requests it answered so.
async fn answered(app: &TestApp, served: &Running, outcome: &str) -> u64 {
    let series = format!("tokenvault_token_requests_total{{outcome=\"{outcome}\"}}");
    let text = app.http.get(format!("{}/metrics", served.internal)).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|line| line.strip_prefix(&series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0)
}

fn client(served: &Running, key: &str) -> TokenvaultClient {
    TokenvaultClient::builder(&served.internal).service_key(key).build().unwrap()
}

fn request(account: &str) -> TokenRequest {
    TokenRequest::new(account).with_scopes(["asset.view"])
}

#[tokio::test]
async fn a_token_is_fetched_once_then_served_from_memory_while_min_ttl_is_left() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let served = serve(&app, &[]).await;
    let tokens = client(&served, &key);

    let token = tokens.token(&request("acc-1").with_min_ttl(Duration::from_secs(120))).await.unwrap();
    assert_eq!(app.upstream.issued.lock().unwrap().as_slice(), [token.expose_secret()]);
    assert_eq!((token.token_type(), token.scope()), ("Bearer", "asset.view"));
    let left = token.expires_in();
    assert!(left > Duration::from_secs(3590) && left <= Duration::from_secs(3600), "{left:?}");
    let at = token.expires_at().duration_since(std::time::SystemTime::now()).unwrap();
    assert!(at > Duration::from_secs(3590) && at <= Duration::from_secs(3601), "{at:?}");
    assert_eq!(answered(&app, &served, "ok").await, 1);

    // Within min_ttl: from memory, whatever the order of the scopes; no HTTP call at all.
    for _ in 0..5 {
        let again = tokens.token(&request("acc-1")).await.unwrap();
        assert_eq!(again.expose_secret(), token.expose_secret());
    }
    let reordered = TokenRequest::new("acc-1").with_scopes(["asset.view", "asset.view"]);
    assert_eq!(tokens.token(&reordered).await.unwrap().expose_secret(), token.expose_secret());
    assert_eq!(answered(&app, &served, "ok").await, 1, "tokenvault was asked once");
    assert_eq!(app.upstream.call_count(), 1);

    // Neither Debug nor Display shows the token or the key.
    for shown in [format!("{token:?}"), format!("{tokens:?}"), format!("{:?}", tokens.clone())] {
        assert!(!shown.contains(token.expose_secret()) && !shown.contains(&key), "{shown}");
        assert!(!shown.contains("tvk_") && !shown.contains("at-"), "{shown}");
    }
}

#[tokio::test]
async fn twenty_concurrent_identical_requests_make_one_request_to_tokenvault_and_share_a_failure_too() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let served = serve(&app, &[]).await;
    let tokens = client(&served, &key);
    *app.upstream.delay.lock().unwrap() = Duration::from_millis(300);

    let calls: Vec<_> = (0..20)
        .map(|_| {
            let tokens = tokens.clone();
            tokio::spawn(async move { tokens.token(&request("acc-1")).await })
        })
        .collect();
    let mut secrets = Vec::new();
    for call in calls {
        secrets.push(call.await.unwrap().unwrap().expose_secret().to_owned());
    }
    secrets.dedup();
    assert_eq!(secrets.len(), 1, "all twenty got the one token");
    assert_eq!(answered(&app, &served, "ok").await, 1, "one request reached tokenvault");
    assert_eq!(app.upstream.call_count(), 1);

    // A failure is shared by those that waited for it rather than repeated twenty times.
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let tokens = tokens.clone();
            tokio::spawn(async move { tokens.token(&request("never-installed")).await })
        })
        .collect();
    for call in calls {
        assert!(matches!(call.await.unwrap(), Err(Error::NotInstalled(_))));
    }
    let refused = answered(&app, &served, "not_installed").await;
    assert!(refused <= 2, "{refused} requests reached tokenvault for twenty concurrent callers");
}

#[tokio::test]
async fn a_min_ttl_larger_than_what_is_left_asks_tokenvault_again() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let served = serve(&app, &[]).await;
    let tokens = client(&served, &key);

    tokens.token(&request("acc-1")).await.unwrap();
    assert_eq!(answered(&app, &served, "ok").await, 1);
    // The token lives 3600 s, so less than 3700 s is left: the client asks tokenvault again.
    let longer = request("acc-1").with_min_ttl(Duration::from_secs(3700));
    let answer = tokens.token(&longer).await.unwrap();
    assert_eq!(answered(&app, &served, "ok").await, 2);
    // tokenvault answers its token as it is (see its min_ttl rules), and the client hands it out.
    assert!(answer.expires_in() < Duration::from_secs(3700));
    tokens.token(&longer).await.unwrap();
    assert_eq!(answered(&app, &served, "ok").await, 3, "never fresh enough for 3700 s: asked each time");
    // A smaller min_ttl is served from memory again.
    tokens.token(&request("acc-1").with_min_ttl(Duration::from_secs(600))).await.unwrap();
    assert_eq!(answered(&app, &served, "ok").await, 3);

    // With a token that lives less than the min_ttl asked, it is fetched again each time.
    app.upstream.set(vec![Upstream::Mint { expires_in: 30 }]);
    let short = TokenRequest::new("acc-1").with_scopes(["asset.edit"]).with_min_ttl(Duration::ZERO);
    let first = tokens.token(&short).await.unwrap();
    assert!(first.expires_in() <= Duration::from_secs(30));
    assert_eq!(answered(&app, &served, "ok").await, 4);
    tokens.token(&short.clone().with_min_ttl(Duration::from_secs(31))).await.unwrap();
    assert_eq!(answered(&app, &served, "ok").await, 5);
    tokens.token(&short).await.unwrap();
    assert_eq!(answered(&app, &served, "ok").await, 5, "min_ttl 0: from memory");
}

#[tokio::test]
async fn a_503_is_retried_after_its_retry_after_and_then_succeeds() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    // One attempt per mint: Trackunit's 429 with `Retry-After: 1` becomes tokenvault's 503
    // `upstream_unavailable` with `Retry-After: 1` (a 5xx on the last attempt would be a 502
    // `upstream_error`, which is not retried), and the key backs off for that second.
    let served = serve(&app, &[("TOKENVAULT_UPSTREAM_MAX_ATTEMPTS", "1")]).await;
    app.upstream.set(vec![
        Upstream::FailWithRetryAfter { status: 429, retry_after_secs: 1 },
        Upstream::Mint { expires_in: 3600 },
    ]);
    let tokens = TokenvaultClient::builder(&served.internal).service_key(key.as_str()).max_retries(3).build().unwrap();

    let started = Instant::now();
    let token = tokens.token(&request("acc-1")).await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1), "waited for the Retry-After: {:?}", started.elapsed());
    assert!(app.upstream.issued.lock().unwrap().contains(&token.expose_secret().to_owned()));
    assert_eq!(answered(&app, &served, "upstream_unavailable").await, 1);
    assert_eq!(answered(&app, &served, "ok").await, 1);
}

#[tokio::test]
async fn the_retry_of_503s_is_bounded_and_gives_up_with_the_typed_error() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    let key = app.client(&["*"], &["*"], false).await;
    let served = serve(&app, &[("TOKENVAULT_UPSTREAM_MAX_ATTEMPTS", "1")]).await;
    app.upstream.set(vec![Upstream::FailWithRetryAfter { status: 429, retry_after_secs: 1 }]);

    // At most one retry.
    let tokens = TokenvaultClient::builder(&served.internal).service_key(key.as_str()).max_retries(1).build().unwrap();
    let error = tokens.token(&request("acc-1")).await.unwrap_err();
    let Error::UpstreamUnavailable(problem) = &error else { panic!("{error:?}") };
    assert_eq!((problem.status, problem.code.as_str()), (503, "upstream_unavailable"));
    assert!(problem.retry_after.is_some_and(|wait| wait >= Duration::from_secs(1)), "{problem:?}");
    assert!(error.is_transient() && error.retry_after().is_some());
    assert_eq!(answered(&app, &served, "upstream_unavailable").await, 2, "asked once, then retried once");

    // A Retry-After longer than the wait allowed is not waited for.
    let impatient = TokenvaultClient::builder(&served.internal)
        .service_key(key.as_str())
        .max_retries(5)
        .max_retry_wait(Duration::from_millis(500))
        .build()
        .unwrap();
    let started = Instant::now();
    assert!(matches!(impatient.token(&request("acc-1")).await, Err(Error::UpstreamUnavailable(_))));
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(answered(&app, &served, "upstream_unavailable").await, 3);

    // No retry at all.
    let once = TokenvaultClient::builder(&served.internal).service_key(key.as_str()).max_retries(0).build().unwrap();
    assert!(matches!(once.token(&request("acc-1")).await, Err(Error::UpstreamUnavailable(_))));
    assert_eq!(answered(&app, &served, "upstream_unavailable").await, 4);
}

#[tokio::test]
async fn refusals_are_typed_errors_with_status_and_detail_and_never_show_the_key() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    app.install("acc-2").await;
    let narrow = app.client(&["acc-1"], &["asset.view"], false).await;
    let served = serve(&app, &[]).await;

    let unknown_key = format!("tvk_{}", "A".repeat(43));
    let error = client(&served, &unknown_key).token(&request("acc-1")).await.unwrap_err();
    let Error::Unauthenticated(problem) = &error else { panic!("{error:?}") };
    assert_eq!((problem.status, error.status(), error.code()), (401, Some(401), Some("unauthenticated")));
    assert!(!problem.detail.is_empty());
    for shown in [error.to_string(), format!("{error:?}")] {
        assert!(!shown.contains(&unknown_key) && !shown.contains("tvk_A"), "{shown}");
    }

    let tokens = client(&served, &narrow);
    let error = tokens.token(&request("acc-2")).await.unwrap_err();
    assert!(matches!(&error, Error::Forbidden(p) if p.status == 403 && p.detail.contains("account")), "{error:?}");
    let error = tokens.token(&TokenRequest::new("acc-1").with_scopes(["asset.edit"])).await.unwrap_err();
    assert!(matches!(error, Error::Forbidden(_)), "{error:?}");

    let everything = app.client(&["*"], &["*"], false).await;
    let tokens = client(&served, &everything);
    let error = tokens.token(&request("acc-3")).await.unwrap_err();
    let Error::NotInstalled(problem) = &error else { panic!("{error:?}") };
    assert_eq!((problem.status, problem.code.as_str(), problem.retry_after), (404, "not_installed", None));
    assert!(problem.instance.as_deref().is_some_and(|id| id.starts_with("urn:tokenvault:request:")), "{problem:?}");
    assert!(!error.is_transient());
    let error = tokens.token(&request("acc-1").with_provider("nope")).await.unwrap_err();
    assert!(matches!(error, Error::UnknownProvider(ref p) if p.status == 404), "{error:?}");
    let error = tokens.token(&request("acc-1").with_min_ttl(Duration::from_secs(2 * 86_400))).await.unwrap_err();
    assert!(matches!(error, Error::InvalidRequest(ref p) if p.status == 400), "{error:?}");
    let error = tokens.token(&TokenRequest::new("acc-1")).await.unwrap_err();
    assert!(matches!(error, Error::InvalidRequest(_)), "no scopes for Trackunit: {error:?}");
    // Refusals are not retried, nor cached: asked again, tokenvault is asked again.
    assert_eq!(answered(&app, &served, "not_installed").await, 1);
    assert!(tokens.token(&request("acc-3")).await.is_err());
    assert_eq!(answered(&app, &served, "not_installed").await, 2);

    // The public listener has no token route; nothing listens on a free port.
    let error = TokenvaultClient::builder(&served.public)
        .service_key(everything.as_str())
        .build()
        .unwrap()
        .token(&request("acc-1"))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::NotFound(ref p) if p.status == 404), "{error:?}");
    let error = TokenvaultClient::builder(format!("http://127.0.0.1:{}", free_port()))
        .service_key(everything.as_str())
        .build()
        .unwrap()
        .token(&request("acc-1"))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Transport(_)) && error.is_transient(), "{error:?}");
    assert!(!format!("{error} {error:?}").contains(&everything));
}

#[tokio::test]
async fn authorize_and_the_middleware_add_the_bearer_header() {
    let app = spawn_app().await;
    app.install("acc-1").await;
    app.install("acc-2").await;
    let key = app.client(&["*"], &["*"], false).await;
    let served = serve(&app, &[]).await;
    let tokens = client(&served, &key);
    let api = MockServer::start().await;
    Mock::given(method("GET")).respond_with(ResponseTemplate::new(200)).mount(&api).await;
    let authorizations = || async {
        let requests = api.received_requests().await.unwrap_or_default();
        requests
            .iter()
            .map(|r| r.headers.get("authorization").map(|v| v.to_str().unwrap().to_owned()))
            .collect::<Vec<_>>()
    };

    let http = reqwest::Client::new();
    let response =
        tokens.authorize(http.get(format!("{}/assets", api.uri())), &request("acc-1")).await.unwrap().send().await;
    assert_eq!(response.unwrap().status(), 200);
    let acc1 = tokens.token(&request("acc-1")).await.unwrap();
    let acc2 = tokens.token(&request("acc-2")).await.unwrap();
    assert_eq!(authorizations().await, [Some(format!("Bearer {}", acc1.expose_secret()))]);

    let with_tokens = tokenvault_client::reqwest_middleware::ClientBuilder::new(http.clone())
        .with(tokens.middleware(request("acc-1")))
        .build();
    assert_eq!(with_tokens.get(format!("{}/assets", api.uri())).send().await.unwrap().status(), 200);
    // Another account for one request, through the request's extensions.
    let response = with_tokens.get(format!("{}/assets", api.uri())).with_extension(request("acc-2")).send().await;
    assert_eq!(response.unwrap().status(), 200);
    assert_eq!(
        authorizations().await[1..],
        [Some(format!("Bearer {}", acc1.expose_secret())), Some(format!("Bearer {}", acc2.expose_secret())),]
    );
    assert_eq!(answered(&app, &served, "ok").await, 2, "every token came from the client's memory");

    // No token, no request: the middleware's error carries the client's typed error.
    let refused = with_tokens.get(format!("{}/assets", api.uri())).with_extension(request("acc-3")).send().await;
    let Err(tokenvault_client::reqwest_middleware::Error::Middleware(cause)) = refused else { panic!("{refused:?}") };
    assert!(matches!(cause.downcast_ref::<Error>(), Some(Error::NotInstalled(_))), "{cause:?}");
    assert_eq!(authorizations().await.len(), 3);
    let error = tokens.authorize(http.get(api.uri()), &request("acc-3")).await.unwrap_err();
    assert!(matches!(error, Error::NotInstalled(_)));
}
