//! The OpenAPI document at `GET /openapi.json`, checked against the app that serves it: it lists exactly
//! the routes served, each on the listener its tags name, and its request schemas and examples are what
//! the handlers accept.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;

/// Every route the two listeners serve, as (method, path). A new route belongs here and in the document.
const SERVED: &[(&str, &str)] = &[
    ("POST", "/callbacks/trackunit"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("POST", "/v1/tokens"),
    ("GET", "/v1/installations"),
    ("DELETE", "/v1/installations/{id}"),
    ("POST", "/v1/installations/{id}/reactivate"),
    ("GET", "/v1/providers"),
    ("PUT", "/v1/providers/{provider}/accounts/{account_id}/credentials"),
    ("DELETE", "/v1/providers/{provider}/accounts/{account_id}/credentials"),
    ("POST", "/v1/clients"),
    ("GET", "/v1/clients"),
    ("GET", "/v1/clients/{name}"),
    ("DELETE", "/v1/clients/{name}"),
    ("POST", "/v1/clients/{name}/rotate"),
    ("GET", "/v1/audit"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
];

async fn fetch_document(app: &TestApp) -> Value {
    let response = app.http.get(format!("{}/openapi.json", app.internal)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    serde_json::from_str(&response.text().await.unwrap()).expect("the document is JSON")
}

/// Every documented operation as (METHOD, path, operation object).
fn operations(document: &Value) -> Vec<(String, String, &Value)> {
    let paths = document["paths"].as_object().expect("the document has paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            let item = item.as_object().expect("a path item is an object");
            item.iter().map(move |(method, operation)| (method.to_uppercase(), path.clone(), operation))
        })
        .collect()
}

/// A schema of `components.schemas`, following one `$ref`.
fn schema<'a>(document: &'a Value, reference: &Value) -> &'a Value {
    let name = reference["$ref"].as_str().expect("a $ref").trim_start_matches("#/components/schemas/");
    &document["components"]["schemas"][name]
}

fn required_fields(schema: &Value) -> BTreeSet<String> {
    schema["required"].as_array().into_iter().flatten().map(|f| f.as_str().unwrap().to_owned()).collect()
}

fn without(body: &Value, field: &str) -> Value {
    let mut body = body.clone();
    body.as_object_mut().unwrap().remove(field);
    body
}

#[tokio::test]
async fn openapi_document_is_3_1_and_lists_exactly_the_served_routes() {
    let app = spawn_app().await;
    let document = fetch_document(&app).await;
    let version = document["openapi"].as_str().expect("an openapi version");
    assert!(version.starts_with("3.1."), "{version}");

    let documented: BTreeSet<(String, String)> =
        operations(&document).into_iter().map(|(method, path, _)| (method, path)).collect();
    let served: BTreeSet<(String, String)> = SERVED.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(documented, served);
}

/// Proves the document names nothing that does not exist, on the listener it says: each operation is
/// called without credentials or body on each listener. Where its tags say it is served, the answer is
/// neither 404 nor 405 and is one the operation documents (401 for an operation that needs a key);
/// elsewhere it is 404.
#[tokio::test]
async fn openapi_operations_exist_on_the_listeners_their_tags_name() {
    let app = spawn_app().await;
    let document = fetch_document(&app).await;
    for (method, path, operation) in operations(&document) {
        let tags: BTreeSet<&str> = operation["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        assert!(
            !tags.is_empty() && tags.is_subset(&BTreeSet::from(["public", "internal"])),
            "{method} {path}: {tags:?}"
        );
        let target = path
            .replace("{id}", &uuid::Uuid::new_v4().to_string())
            .replace("{provider}", "trackunit")
            .replace("{account_id}", "acc-1")
            .replace("{name}", "some-client");
        for (listener, base) in [("public", &app.public), ("internal", &app.internal)] {
            let verb = Method::from_bytes(method.as_bytes()).unwrap();
            let response = app.http.request(verb, format!("{base}{target}")).send().await.unwrap();
            let status = response.status().as_u16();
            if !tags.contains(listener) {
                assert_eq!(status, 404, "{method} {path} is not documented on the {listener} listener");
                continue;
            }
            assert!(status != 404 && status != 405, "{method} {path} on the {listener} listener: {status}");
            assert!(
                operation["responses"].get(status.to_string()).is_some(),
                "{method} {path} answered {status}, which it does not document"
            );
            if operation.get("security").is_some() {
                assert_problem(response, 401, "unauthenticated").await;
            } else {
                assert_ne!(status, 401, "{method} {path} needs credentials it does not document");
            }
        }
    }
}

#[tokio::test]
async fn openapi_token_request_example_is_accepted_and_its_required_fields_are_required() {
    let app = spawn_app().await;
    let document = fetch_document(&app).await;
    let operation = &document["paths"]["/v1/tokens"]["post"];
    let content = &operation["requestBody"]["content"]["application/json"];
    let example = &content["example"];
    let request = schema(&document, &content["schema"]);
    let properties: BTreeSet<String> = request["properties"].as_object().unwrap().keys().cloned().collect();
    let required = required_fields(request);
    assert!(example.as_object().unwrap().keys().all(|k| properties.contains(k)), "{example}");

    app.install(example["account_id"].as_str().unwrap()).await;
    let key = app.client(&["*"], &["*"], false).await;
    let response = app.token(&key, example).await;
    assert_eq!(response.status(), 200, "the documented example is accepted");
    let answer: Value = response.json().await.unwrap();
    let answer_schema = schema(&document, &operation["responses"]["200"]["content"]["application/json"]["schema"]);
    let answered: BTreeSet<String> = answer.as_object().unwrap().keys().cloned().collect();
    assert_eq!(answered, required_fields(answer_schema), "the answer has the documented fields");

    for field in &properties {
        let response = app.token(&key, &without(example, field)).await;
        if field == "scopes" {
            // Optional only at a provider with default scopes, as documented; the example is Trackunit's.
            assert_problem(response, 400, "invalid_request").await;
        } else if required.contains(field) {
            assert_problem(response, 400, "invalid_request").await;
        } else {
            assert_eq!(response.status(), 200, "`{field}` is documented as optional");
        }
    }

    // The documented bounds are the handler's.
    let ttl = &request["properties"]["min_ttl_seconds"];
    let (least, most) = (ttl["minimum"].as_i64().unwrap(), ttl["maximum"].as_i64().unwrap());
    let with_ttl = |seconds: i64| {
        let mut body = example.clone();
        body["min_ttl_seconds"] = json!(seconds);
        body
    };
    assert_eq!(app.token(&key, &with_ttl(least)).await.status(), 200);
    assert_eq!(app.token(&key, &with_ttl(most)).await.status(), 200);
    assert_problem(app.token(&key, &with_ttl(least - 1)).await, 400, "invalid_request").await;
    assert_problem(app.token(&key, &with_ttl(most + 1)).await, 400, "invalid_request").await;
    let scopes = &request["properties"]["scopes"];
    let with_scopes = |count: u64| {
        let mut body = example.clone();
        body["scopes"] = json!((0..count).map(|n| format!("scope.{n}")).collect::<Vec<_>>());
        body
    };
    assert_eq!(app.token(&key, &with_scopes(scopes["maxItems"].as_u64().unwrap())).await.status(), 200);
    assert_problem(
        app.token(&key, &with_scopes(scopes["maxItems"].as_u64().unwrap() + 1)).await,
        400,
        "invalid_request",
    )
    .await;
    // Empty is as omitted: refused at Trackunit, which has no default scopes.
    assert_problem(app.token(&key, &with_scopes(0)).await, 400, "invalid_request").await;
}

#[tokio::test]
async fn openapi_callback_examples_are_accepted_and_their_required_fields_are_required() {
    let app = spawn_app().await;
    let document = fetch_document(&app).await;
    let operation = &document["paths"]["/callbacks/trackunit"]["post"];
    let header = &operation["parameters"][0];
    assert_eq!(
        (header["name"].as_str(), header["in"].as_str(), header["required"].as_bool()),
        (Some("Trackunit-Identity"), Some("header"), Some(true))
    );
    let content = &operation["requestBody"]["content"]["application/json"];
    let examples = &content["examples"];
    let variants = schema(&document, &content["schema"])["anyOf"].as_array().unwrap();

    // Each message schema, with its example: required fields are required, and the example is accepted.
    for (variant, example_name, accepted) in [(0, "INSTALLED", 204), (1, "UNINSTALLED", 204), (2, "another type", 202)]
    {
        let message = schema(&document, &variants[variant]);
        let example = &examples[example_name]["value"];
        for field in required_fields(message) {
            let response = app.callback(Some(&identity()), &without(example, &field)).await;
            assert_problem(response, 400, "invalid_request").await;
        }
        let response = app.callback(Some(&identity()), example).await;
        assert_eq!(response.status(), accepted, "the {example_name} example");
    }
    let account = examples["INSTALLED"]["value"]["accountId"].as_str().unwrap();
    assert_eq!(app.status_of(account).await, "uninstalled", "INSTALLED then UNINSTALLED were applied");
}

/// docs/openapi.json is what the code serves, so a change of the API shows in review and CI fails when
/// the file is stale. Regenerate it with `cargo run -q -- openapi > docs/openapi.json`.
#[tokio::test]
async fn the_committed_openapi_document_is_the_one_served() {
    let app = spawn_app().await;
    let served = fetch_document(&app).await;
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{}/docs/openapi.json", env!("CARGO_MANIFEST_DIR"))).unwrap(),
    )
    .unwrap();
    assert!(
        committed == served,
        "docs/openapi.json is stale: run `cargo run -q -- openapi > docs/openapi.json` and commit it"
    );
}
