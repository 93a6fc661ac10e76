//! Bad requests to quetzald get a 4xx JSON error and leave nothing behind;
//! the TCP listener needs the token; the OpenAPI document matches what the
//! daemon really answers.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use quetzal_testkit::{Daemon, DataDir, http};
use serde_json::{Value, json};

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");

fn daemon() -> Daemon {
    Daemon::start(Path::new(QUETZALD))
}

fn api(daemon: &Daemon, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let (status, text) = daemon.request(method, path, body);
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Asserts a JSON error with this status and code, and returns its message.
fn assert_error(answer: &(u16, Value), status: u16, code: &str) -> String {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["error"]["code"], code, "{}", answer.1);
    let object = answer.1.as_object().unwrap();
    assert_eq!(object.len(), 1, "only `error`: {}", answer.1);
    answer.1["error"]["message"].as_str().unwrap().to_owned()
}

fn assert_nothing_created(daemon: &Daemon) {
    assert_eq!(api(daemon, "GET", "/api/v1/vms", None).1, json!([]));
    let leftovers: Vec<_> = std::fs::read_dir(daemon.data.path().join("vms"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn rejects_invalid_create_requests_and_creates_nothing() {
    let daemon = daemon();
    let cases = [
        (
            r#"{"name": "a", "colour": "red"}"#,
            "unknown field `colour`",
        ),
        (r#"{"name": ""}"#, "invalid VM name ''"),
        (
            &format!(r#"{{"name": "{}"}}"#, "x".repeat(64)),
            "invalid VM name",
        ),
        (r#"{"name": "../etc"}"#, "invalid VM name '../etc'"),
        (r#"{"name": "a/b"}"#, "invalid VM name 'a/b'"),
        (
            r#"{"name": "a", "cpus": 0}"#,
            "cpus must be between 1 and 255, not 0",
        ),
        (
            r#"{"name": "a", "cpus": 1000}"#,
            "cpus must be between 1 and 255, not 1000",
        ),
        (
            r#"{"name": "a", "memory_mib": 0}"#,
            "memory_mib must be at least 32 MiB",
        ),
        (
            r#"{"name": "a", "memory_mib": 100000000}"#,
            "is more than this host has",
        ),
        (
            r#"{"name": "a", "disk_mib": 1}"#,
            "disk_mib must be between",
        ),
        (
            r#"{"name": "a", "disk_mib": 99999999999}"#,
            "disk_mib must be between",
        ),
        (
            r#"{"name": "a", "image": "windows-95"}"#,
            "unknown image 'windows-95'",
        ),
        (
            r#"{"name": "a", "restart_policy": "sometimes"}"#,
            "unknown variant `sometimes`",
        ),
        (r#"{"name": "a", "cpus": -1}"#, "invalid value"),
        (r#"{"name": "a""#, "EOF"),
        ("[]", "invalid length 0"),
        ("42", "invalid type"),
    ];

    for (body, expected) in cases {
        let answer = api(&daemon, "POST", "/api/v1/vms", Some(body));
        let message = assert_error(&answer, 400, "invalid_request");
        assert!(message.contains(expected), "{body}: {message}");
    }
    assert_nothing_created(&daemon);
}

#[test]
fn a_body_past_the_limit_is_413_and_creates_nothing() {
    let daemon = daemon();
    let labels = "x".repeat(300 * 1024);
    let body = format!(r#"{{"name": "big", "labels": {{"a": "{labels}"}}}}"#);

    let answer = api(&daemon, "POST", "/api/v1/vms", Some(&body));

    let message = assert_error(&answer, 413, "payload_too_large");
    assert!(message.contains("256 KiB"), "{message}");
    assert_nothing_created(&daemon);
}

#[test]
fn answers_404_for_what_does_not_exist() {
    let daemon = daemon();

    for (method, path) in [
        ("GET", "/api/v1/vms/ghost"),
        ("POST", "/api/v1/vms/ghost/start"),
        ("POST", "/api/v1/vms/ghost/stop"),
        ("DELETE", "/api/v1/vms/ghost"),
        ("GET", "/api/v1/nothing-here"),
    ] {
        assert_error(&api(&daemon, method, path, None), 404, "not_found");
    }
}

#[test]
fn refuses_a_taken_name_and_impossible_transitions_with_409() {
    let daemon = daemon();
    assert_eq!(
        api(&daemon, "POST", "/api/v1/vms", Some(r#"{"name": "one"}"#)).0,
        201
    );

    let taken = assert_error(
        &api(&daemon, "POST", "/api/v1/vms", Some(r#"{"name": "one"}"#)),
        409,
        "conflict",
    );
    let stop = assert_error(
        &api(&daemon, "POST", "/api/v1/vms/one/stop", None),
        409,
        "conflict",
    );
    let resume = assert_error(
        &api(&daemon, "POST", "/api/v1/vms/one/resume", None),
        409,
        "conflict",
    );

    assert_eq!(taken, "a VM named one already exists");
    assert_eq!(stop, "cannot stop a VM that is stopped");
    assert_eq!(resume, "cannot resume a VM that is stopped");
}

#[test]
fn refuses_to_delete_a_running_vm() {
    let daemon = daemon();
    api(&daemon, "POST", "/api/v1/vms", Some(r#"{"name": "live"}"#));
    api(&daemon, "POST", "/api/v1/vms/live/start", None);

    let message = assert_error(
        &api(&daemon, "DELETE", "/api/v1/vms/live", None),
        409,
        "conflict",
    );

    assert_eq!(message, "cannot delete a VM that is running; stop it first");
    assert!(daemon.data.path().join("vms/live/root.qcow2").exists());
}

#[test]
fn rejects_bad_queries() {
    let daemon = daemon();

    assert_error(
        &api(&daemon, "GET", "/api/v1/vms?state=sleeping", None),
        400,
        "invalid_request",
    );
    assert_error(
        &api(&daemon, "GET", "/api/v1/vms?label=nokey", None),
        400,
        "invalid_request",
    );
    assert_error(
        &api(&daemon, "GET", "/api/v1/vms?colour=red", None),
        400,
        "invalid_request",
    );
    assert_error(
        &api(&daemon, "GET", "/api/v1/events?limit=0", None),
        400,
        "invalid_request",
    );
    assert_error(
        &api(&daemon, "GET", "/api/v1/events?after=1&before=9", None),
        400,
        "invalid_request",
    );
    assert_error(
        &api(&daemon, "POST", "/api/v1/vms/x/dance", None),
        404,
        "not_found",
    );
}

#[test]
fn says_507_when_the_disk_is_full_and_creates_nothing() {
    let data = DataDir::new();
    let tmpfs = quetzal_testkit::Tmpfs::mount(&data.path().join("vms"), "16M");
    let daemon = Daemon::start_in(Path::new(QUETZALD), data, None);
    // Bound after the daemon, so dropped before its data directory.
    let tmpfs = tmpfs;

    let message = assert_error(
        &api(&daemon, "POST", "/api/v1/vms", Some(r#"{"name": "big"}"#)),
        507,
        "insufficient_storage",
    );

    assert!(message.contains("MiB free"), "{message}");
    assert_nothing_created(&daemon);
    let data = daemon.stop();
    drop(tmpfs);
    drop(data);
}

#[test]
fn a_stuck_client_does_not_block_others() {
    let daemon = daemon();
    let mut stuck = std::os::unix::net::UnixStream::connect(daemon.socket()).unwrap();
    stuck
        .write_all(b"POST /api/v1/vms HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"na")
        .unwrap();

    let answer = api(&daemon, "GET", "/api/v1/vms", None);

    assert_eq!(answer, (200, json!([])));
    drop(stuck);
}

#[test]
fn the_cli_prints_api_errors_as_one_line() {
    let daemon = daemon();

    let output = Command::new(QUETZAL)
        .args(["vm", "start", "ghost"])
        .env("QUETZAL_DATA_DIR", daemon.data.path())
        .output()
        .unwrap();

    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "quetzal: no VM named ghost\n"
    );
}

#[test]
fn the_cli_says_when_quetzald_is_not_running() {
    let data = DataDir::new();

    let output = Command::new(QUETZAL)
        .args(["vm", "list"])
        .env("QUETZAL_DATA_DIR", data.path())
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1);
    assert!(
        stderr.starts_with("quetzal: quetzald is not running"),
        "{stderr}"
    );
}

#[test]
fn the_tcp_listener_needs_the_token() {
    let daemon = Daemon::start_in(Path::new(QUETZALD), DataDir::new(), Some("127.0.0.1:0"));
    let token = Command::new(QUETZAL)
        .arg("token")
        .env("QUETZAL_DATA_DIR", daemon.data.path())
        .output()
        .unwrap();
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    let tcp = || daemon.https();

    let missing = http(tcp(), "GET", "/api/v1/vms", None, &[]);
    let wrong = http(
        tcp(),
        "GET",
        "/api/v1/vms",
        None,
        &[("Authorization", "Bearer nope")],
    );
    let metrics = http(tcp(), "GET", "/metrics", None, &[]);
    let right = http(
        tcp(),
        "GET",
        "/api/v1/vms",
        None,
        &[("Authorization", &format!("Bearer {token}"))],
    );

    assert_eq!(token.len(), 64);
    assert_eq!(missing.0, 401);
    assert!(
        missing.1.contains("\"code\":\"unauthorized\""),
        "{}",
        missing.1
    );
    assert_eq!(wrong.0, 401);
    assert_eq!(metrics.0, 401);
    assert_eq!(right, (200, "[]".to_owned()));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(daemon.data.path().join("token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let socket_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(daemon.socket()).unwrap().permissions(),
    );
    assert_eq!(socket_mode & 0o777, 0o660);
}

#[test]
fn logins_from_one_address_are_limited_to_30_a_minute() {
    let daemon = Daemon::start_in(Path::new(QUETZALD), DataDir::new(), Some("127.0.0.1:0"));
    let token = std::fs::read_to_string(daemon.data.path().join("token")).unwrap();
    let tcp = || daemon.https();
    let login = |token: &str| {
        let body = format!(r#"{{"token": "{}"}}"#, token.trim());
        http(tcp(), "POST", "/api/v1/session", Some(&body), &[]).0
    };

    let guesses: Vec<u16> = (0..30).map(|_| login("nope")).collect();
    let right_after = http(
        tcp(),
        "POST",
        "/api/v1/session",
        Some(&format!(r#"{{"token": "{}"}}"#, token.trim())),
        &[],
    );

    assert!(guesses.iter().all(|status| *status == 401), "{guesses:?}");
    assert_eq!(right_after.0, 429, "{}", right_after.1);
    assert!(
        right_after.1.contains(r#""code":"too_many_requests""#),
        "{}",
        right_after.1
    );
    assert!(
        right_after.1.contains("at most 30 a minute"),
        "{}",
        right_after.1
    );
    // The API itself, with the token, is not held up.
    let bearer = format!("Bearer {}", token.trim());
    let vms = http(
        tcp(),
        "GET",
        "/api/v1/vms",
        None,
        &[("Authorization", &bearer)],
    );
    assert_eq!(vms, (200, "[]".to_owned()));
}

#[test]
fn the_cli_works_over_tcp_with_the_token() {
    let daemon = Daemon::start_in(Path::new(QUETZALD), DataDir::new(), Some("127.0.0.1:0"));
    let addr = daemon.tcp_addr().unwrap().to_owned();

    let output = Command::new(QUETZAL)
        .args(["vm", "create", "remote", "--output", "json"])
        .env("QUETZAL_DATA_DIR", daemon.data.path())
        .env("QUETZAL_URL", format!("https://{addr}"))
        .env("QUETZAL_FINGERPRINT", daemon.fingerprint())
        .output()
        .unwrap();

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let vm: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(vm["name"], "remote");
}

/// Checks `value` against a schema of the OpenAPI document: types,
/// required properties, no properties the schema does not name.
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) {
    let schema = match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = reference.trim_start_matches("#/components/schemas/");
            &doc["components"]["schemas"][name]
        }
        None => schema,
    };
    if let Some(options) = schema
        .get("oneOf")
        .or_else(|| schema.get("anyOf"))
        .and_then(Value::as_array)
    {
        if value.is_null() && options.iter().any(|o| o["type"] == "null") {
            return;
        }
        let concrete = options.iter().find(|o| o["type"] != "null").unwrap();
        return conforms(doc, concrete, value, at);
    }
    if let Some(choices) = schema.get("enum").and_then(Value::as_array) {
        assert!(choices.contains(value), "{at}: {value} not in {choices:?}");
        return;
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if value.is_null() {
        assert!(types.contains(&"null"), "{at}: null where {types:?}");
        return;
    }
    match value {
        Value::Object(object) => {
            assert!(types.contains(&"object"), "{at}: object where {types:?}");
            let properties = schema["properties"].as_object();
            if let Some(required) = schema["required"].as_array() {
                for key in required {
                    assert!(
                        object.contains_key(key.as_str().unwrap()),
                        "{at}: missing {key}"
                    );
                }
            }
            for (key, item) in object {
                match properties.and_then(|p| p.get(key)) {
                    Some(property) => conforms(doc, property, item, &format!("{at}.{key}")),
                    None => {
                        let extra = &schema["additionalProperties"];
                        assert!(extra.is_object(), "{at}: {key} is not in the schema");
                        conforms(doc, extra, item, &format!("{at}.{key}"));
                    }
                }
            }
        }
        Value::Array(items) => {
            assert!(types.contains(&"array"), "{at}: array where {types:?}");
            for (i, item) in items.iter().enumerate() {
                conforms(doc, &schema["items"], item, &format!("{at}[{i}]"));
            }
        }
        Value::String(_) => assert!(types.contains(&"string"), "{at}: string where {types:?}"),
        Value::Bool(_) => assert!(types.contains(&"boolean"), "{at}: bool where {types:?}"),
        Value::Number(_) => assert!(
            types.contains(&"integer") || types.contains(&"number"),
            "{at}: number where {types:?}"
        ),
        Value::Null => {}
    }
}

/// The schema of `path`'s `method` answer with `status`.
fn response_schema<'a>(doc: &'a Value, path: &str, method: &str, status: u16) -> &'a Value {
    &doc["paths"][path][method]["responses"][status.to_string()]["content"]["application/json"]["schema"]
}

#[test]
fn the_openapi_document_matches_real_answers() {
    let daemon = daemon();
    let (status, doc) = api(&daemon, "GET", "/api/v1/openapi.json", None);
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with('3'));

    let created = api(
        &daemon,
        "POST",
        "/api/v1/vms",
        Some(r#"{"name": "doc", "labels": {"a": "b"}}"#),
    );
    conforms(
        &doc,
        response_schema(&doc, "/api/v1/vms", "post", 201),
        &created.1,
        "create",
    );
    let started = api(&daemon, "POST", "/api/v1/vms/doc/start", None);
    conforms(
        &doc,
        response_schema(&doc, "/api/v1/vms/{name}/start", "post", 200),
        &started.1,
        "start",
    );
    let listed = api(&daemon, "GET", "/api/v1/vms", None);
    conforms(
        &doc,
        response_schema(&doc, "/api/v1/vms", "get", 200),
        &listed.1,
        "list",
    );
    let shown = api(&daemon, "GET", "/api/v1/vms/doc", None);
    conforms(
        &doc,
        response_schema(&doc, "/api/v1/vms/{name}", "get", 200),
        &shown.1,
        "get",
    );
    let missing = api(&daemon, "GET", "/api/v1/vms/none", None);
    conforms(
        &doc,
        response_schema(&doc, "/api/v1/vms/{name}", "get", 404),
        &missing.1,
        "404",
    );
    let conflict = api(&daemon, "POST", "/api/v1/vms", Some(r#"{"name": "doc"}"#));
    conforms(
        &doc,
        response_schema(&doc, "/api/v1/vms", "post", 409),
        &conflict.1,
        "409",
    );
    let events = api(&daemon, "GET", "/api/v1/events", None);
    conforms(
        &doc,
        response_schema(&doc, "/api/v1/events", "get", 200),
        &events.1,
        "events",
    );
    let host = api(&daemon, "GET", "/api/v1/host", None);
    conforms(
        &doc,
        response_schema(&doc, "/api/v1/host", "get", 200),
        &host.1,
        "host",
    );

    assert_eq!(started.1["state"], "running");
    assert_eq!(host.1["vms_by_state"]["running"], 1);
}

#[test]
fn a_name_too_long_for_the_data_directorys_sockets_is_refused() {
    let daemon = daemon();
    let name = "n".repeat(63);

    let answer = api(
        &daemon,
        "POST",
        "/api/v1/vms",
        Some(&format!(r#"{{"name": "{name}"}}"#)),
    );

    let message = assert_error(&answer, 400, "invalid_request");
    assert!(
        message.contains("too long for this node's data directory"),
        "{message}"
    );
    assert_nothing_created(&daemon);
    let (status, _) = daemon.request("POST", "/api/v1/vms/web/stop?timeout_secs=3601", None);
    assert_eq!(status, 400);
}

#[test]
fn a_console_message_past_the_limit_closes_the_websocket_with_why() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let daemon = daemon();
    let (status, body) = daemon.request("POST", "/api/v1/vms", Some(r#"{"name":"typist"}"#));
    assert_eq!(status, 201, "{body}");
    let (status, body) = daemon.request("POST", "/api/v1/vms/typist/start", None);
    assert_eq!(status, 200, "{body}");
    let socket = daemon.socket();

    let closed = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
            let (mut ws, _) =
                tokio_tungstenite::client_async("ws://localhost/api/v1/vms/typist/console", stream)
                    .await
                    .unwrap();
            // 100 KiB of typing in one message: the limit is 64 KiB.
            ws.send(Message::Text("x".repeat(100 * 1024).into()))
                .await
                .unwrap();
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(frame))) => return frame,
                    Some(Ok(_)) => {}
                    other => panic!("no close frame: {other:?}"),
                }
            }
        })
        .expect("a close frame with a code");

    assert_eq!(closed.code, CloseCode::Size);
    assert!(closed.reason.contains("too long"), "{}", closed.reason);
}
