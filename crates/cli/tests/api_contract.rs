//! The API contract, checked by standard tools: the OpenAPI document a
//! real quetzald serves passes a standard OpenAPI 3.1 validator
//! (`openapi-spec-validator`, from PyPI, installed by `scripts/setup`),
//! declares its parameters where they are, the bearer scheme, and one
//! operation per VM action.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::{Path, PathBuf};
use std::process::Command;

use quetzal_testkit::Daemon;
use serde_json::Value;

const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");

/// A Python tool `scripts/setup` installed.
fn tool(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/tools/py/bin")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run ./scripts/setup",
        path.display()
    );
    path
}

fn served_document(daemon: &Daemon) -> (String, Value) {
    let (status, text) = daemon.request("GET", "/api/v1/openapi.json", None);
    assert_eq!(status, 200);
    let doc = serde_json::from_str(&text).unwrap();
    (text, doc)
}

#[test]
fn the_served_document_passes_a_standard_openapi_validator() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    let (text, doc) = served_document(&daemon);
    let file = daemon.data.path().join("openapi.json");
    std::fs::write(&file, text).unwrap();

    let checked = Command::new(tool("openapi-spec-validator"))
        .arg(&file)
        .output()
        .unwrap();

    assert!(
        checked.status.success(),
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
}

#[test]
fn parameters_security_and_errors_are_declared_where_they_are() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    let (_, doc) = served_document(&daemon);

    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(
        (scheme["type"].as_str(), scheme["scheme"].as_str()),
        (Some("http"), Some("bearer"))
    );
    assert_eq!(doc["security"][0]["bearer"], serde_json::json!([]));
    let login = &doc["paths"]["/api/v1/session"]["post"];
    assert_eq!(
        login["security"],
        serde_json::json!([]),
        "logging in needs no token"
    );

    let events = doc["paths"]["/api/v1/events"]["get"]["parameters"]
        .as_array()
        .unwrap();
    assert!(events.iter().all(|p| p["in"] == "query"), "{events:?}");
    let revert = &doc["paths"]["/api/v1/vms/{name}/snapshots/{snapshot}/revert"]["post"];
    let path_params: Vec<&str> = revert["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["in"] == "path")
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(path_params, ["name", "snapshot"]);

    let mut ids = std::collections::BTreeSet::new();
    for action in ["start", "stop", "force-stop", "restart", "pause", "resume"] {
        let op = &doc["paths"][format!("/api/v1/vms/{{name}}/{action}")]["post"];
        assert!(
            ids.insert(op["operationId"].as_str().unwrap().to_owned()),
            "{action}"
        );
        for status in ["200", "400", "401", "404", "409", "500"] {
            let schema = &op["responses"][status]["content"]["application/json"]["schema"];
            assert!(schema.is_object(), "{action} does not document {status}");
        }
    }
    let create = &doc["components"]["schemas"]["CreateVm"]["properties"];
    assert_eq!(
        create["name"]["pattern"],
        "^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
    );
    assert_eq!(create["cpus"]["minimum"], 1);
    assert_eq!(create["cpus"]["maximum"], 255);
    let full_clone = &doc["paths"]["/api/v1/vms"]["post"]["responses"]["202"];
    assert!(full_clone.is_object(), "a full clone's 202 is documented");
}

#[test]
fn a_schema_driven_fuzzer_finds_no_server_error_and_no_undocumented_answer() {
    let data = quetzal_testkit::DataDir::new();
    let daemon = Daemon::start_in(Path::new(QUETZALD), data, Some("127.0.0.1:0"));
    let addr = daemon.tcp_addr().unwrap().to_owned();
    let token = std::fs::read_to_string(daemon.data.path().join("token")).unwrap();
    let (_, doc) = served_document(&daemon);
    let operations: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis.toml");

    let run = Command::new(tool("st"))
        .arg("--config-file")
        .arg(&config)
        .args(["run", &format!("https://{addr}/api/v1/openapi.json")])
        .arg("--tls-verify")
        .arg(daemon.data.path().join("tls/node.crt"))
        .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance",
            "--seed",
            "1",
            "--max-examples",
            "10",
            "--no-color",
        ])
        .env("SCHEMATHESIS_HOOKS", "")
        .current_dir(daemon.data.path())
        .output()
        .unwrap();

    let report = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{report}{}\nquetzald's log:\n{}",
        String::from_utf8_lossy(&run.stderr),
        daemon.stderr.text()
    );
    let tested = format!("Tested: {operations}");
    assert!(
        report.contains(&tested),
        "not every operation was tested ({tested}): {report}"
    );
}
