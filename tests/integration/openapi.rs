//! `openapi.yaml` matches the routes the server has and what it serves.

use std::collections::BTreeSet;

use axum::http::StatusCode;
use ferrotune::http::ROUTES;

use crate::helpers::{request, Backend, TestApp};

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn documented_routes() -> (serde_yaml::Value, BTreeSet<(String, String)>) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("openapi.yaml is valid YAML");
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_mapping().expect("paths").iter() {
        for method in METHODS {
            if item.get(method).is_some() {
                routes.insert((method.to_uppercase(), path.as_str().unwrap().to_string()));
            }
        }
    }
    (doc, routes)
}

#[test]
fn every_route_is_documented_and_every_documented_route_exists() {
    let (_, documented) = documented_routes();
    let served: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let phantom: Vec<_> = documented.difference(&served).collect();
    assert!(undocumented.is_empty(), "routes missing from openapi.yaml: {undocumented:?}");
    assert!(phantom.is_empty(), "openapi.yaml documents routes the server lacks: {phantom:?}");
}

#[test]
fn every_operation_has_an_id_responses_and_resolvable_schema_references() {
    let (doc, _) = documented_routes();
    let text = serde_yaml::to_string(&doc).unwrap();
    for (path, item) in doc["paths"].as_mapping().unwrap() {
        for method in METHODS {
            if let Some(op) = item.get(method) {
                assert!(op.get("operationId").is_some(), "{method} {path:?} has no operationId");
                assert!(op.get("responses").is_some(), "{method} {path:?} has no responses");
            }
        }
    }
    for reference in text.split("$ref: ").skip(1) {
        let target = reference.split_whitespace().next().unwrap().trim_matches(['\'', '"']);
        let parts: Vec<&str> = target.trim_start_matches("#/").split('/').collect();
        let resolved = parts.iter().try_fold(&doc, |node, part| node.get(*part));
        assert!(parts[0] == "components" && resolved.is_some(), "dangling $ref {target}");
    }
}

#[tokio::test]
async fn the_server_serves_the_committed_document_and_answers_every_documented_route() {
    let app = TestApp::spawn(Backend::SqliteLocal).await;
    let served = app.get("/openapi.yaml", None).await;
    assert_eq!(served.status, StatusCode::OK);
    let on_disk = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    assert_eq!(served.text(), on_disk);

    let (_, documented) = documented_routes();
    for (method, path) in documented {
        let concrete = path.replace("{file_id}", "file-missing");
        let response = app.send(request(&method, &concrete, None).body(axum::body::Body::empty()).unwrap()).await;
        if response.status.is_client_error() {
            let code = response.json()["error"]["code"].clone();
            assert!(
                code != "route_not_found" && code != "method_not_allowed",
                "{method} {path} is documented but not routed"
            );
        }
    }
}

#[test]
fn the_document_is_valid_openapi() {
    let Some(python) = crate::helpers::env_or_skip("FERROTUNE_TEST_PYTHON") else {
        eprintln!("skipping: set FERROTUNE_TEST_PYTHON to a Python with openapi-spec-validator");
        return;
    };
    let output = std::process::Command::new(python)
        .args(["-m", "openapi_spec_validator", concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "openapi.yaml is not valid OpenAPI:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
