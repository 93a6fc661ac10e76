//! Long work as operations, end to end: a real daemon copying real qcow2
//! files. A full clone answers 202 with an operation that ends
//! `succeeded`; a cancelled copy leaves nothing; bad operation requests
//! get clean 404/409s; an operation cut short by the daemon's death is
//! failed (never left running) after a restart, and what it made is gone.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::Path;

use quetzal_testkit::{Cli, Daemon, DataDir};
use serde_json::Value;

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");

fn cli(daemon: &Daemon) -> Cli {
    Cli::new(Path::new(QUETZAL), daemon.data.path())
}

fn json(daemon: &Daemon, args: &[&str]) -> Value {
    serde_json::from_str(&cli(daemon).ok(args)).unwrap()
}

/// A template `base` made from a stopped VM that never booted.
fn template(daemon: &Daemon) {
    cli(daemon).ok(&["vm", "create", "golden"]);
    cli(daemon).ok(&["template", "create", "base", "--from", "golden"]);
}

/// Asks for a full clone `name` of `base` over the API; the operation's id.
fn start_full_clone(daemon: &Daemon, name: &str) -> String {
    let body = format!(r#"{{"name": "{name}", "template": "base", "full_clone": true}}"#);
    let (status, head, body) = daemon.request_with_head("POST", "/api/v1/vms", Some(&body));
    assert_eq!(status, 202, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    let op = &answer["operation"];
    let id = op["id"].as_str().unwrap().to_owned();
    assert_eq!(op["kind"], "full-clone");
    assert_eq!(op["target"], format!("/api/v1/vms/{name}"));
    assert!(op["started_at"].as_i64().unwrap() > 0, "{answer}");
    let location = format!("location: /api/v1/operations/{id}");
    assert!(head.to_ascii_lowercase().contains(&location), "{head}");
    id
}

fn vm_names(daemon: &Daemon) -> Vec<String> {
    json(daemon, &["vm", "list", "--output", "json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_full_clone_answers_202_and_its_operation_ends_succeeded() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    template(&daemon);

    let id = start_full_clone(&daemon, "c1");
    cli(&daemon).ok(&["operation", "wait", &id]);

    let (status, body) = daemon.request("GET", &format!("/api/v1/operations/{id}"), None);
    assert_eq!(status, 200, "{body}");
    let op: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(op["operation"]["state"], "succeeded", "{op}");
    assert_eq!(op["operation"]["progress"], 100);
    assert!(op["operation"]["finished_at"].as_i64().is_some(), "{op}");
    let vm = json(&daemon, &["vm", "show", "c1", "--output", "json"]);
    assert_eq!(vm["state"], "stopped");
    assert_eq!(vm["linked_to"], Value::Null);
    let (_, list) = daemon.request("GET", "/api/v1/operations", None);
    assert!(list.contains(&id), "{list}");
}

#[test]
fn a_cancelled_copy_ends_cancelled_and_leaves_nothing() {
    let data = DataDir::new();
    // The copy holds after its first progress report until cancelled.
    let daemon = Daemon::start_armed(Path::new(QUETZALD), data, "copy-stall=return");
    template(&daemon);
    let id = start_full_clone(&daemon, "c1");
    // While it runs, the VM shows as `creating`, and a wait that ends
    // before the operation answers it still running.
    let vm = json(&daemon, &["vm", "show", "c1", "--output", "json"]);
    assert_eq!(vm["state"], "creating");
    let wait = format!("/api/v1/operations/{id}/wait");
    let (status, body) = daemon.request("GET", &format!("{wait}?timeout_secs=0"), None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""state":"running""#), "{body}");

    let (status, body) = daemon.request("DELETE", &format!("/api/v1/operations/{id}"), None);
    assert_eq!(status, 202, "{body}");
    // A wait with the default timeout answers once the copy has stopped.
    let (status, body) = daemon.request("GET", &wait, None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""state":"cancelled""#), "{body}");
    cli(&daemon).fails(&["operation", "wait", &id], "cancelled");

    let op = json(&daemon, &["operation", "show", &id, "--output", "json"]);
    assert_eq!(op["state"], "cancelled", "{op}");
    assert_eq!(op["error"]["code"], "cancelled", "{op}");
    assert_eq!(vm_names(&daemon), Vec::<String>::new());
    assert!(!daemon.data.path().join("vms/c1").exists());
    // A finished operation cannot be cancelled again.
    let (status, body) = daemon.request("DELETE", &format!("/api/v1/operations/{id}"), None);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains(r#""code":"conflict""#), "{body}");
}

#[test]
fn unknown_operations_are_404_and_finished_ones_cannot_be_cancelled() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    template(&daemon);
    let ops = json(&daemon, &["operation", "list", "--output", "json"]);
    let made_template = ops.as_array().unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let (status, body) = daemon.request("GET", "/api/v1/operations/0123456789abcdef", None);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains(r#""code":"not_found""#), "{body}");
    let (status, _) = daemon.request("DELETE", "/api/v1/operations/nope", None);
    assert_eq!(status, 404);
    let (status, body) = daemon.request(
        "DELETE",
        &format!("/api/v1/operations/{made_template}"),
        None,
    );
    assert_eq!(status, 409, "{body}");
    cli(&daemon).fails(&["operation", "show", "nope"], "no operation with id nope");
    let (status, _) = daemon.request("GET", "/api/v1/operations/nope/wait", None);
    assert_eq!(status, 404);
    // A finished operation is answered at once; a wait past a minute is
    // refused.
    let done = format!("/api/v1/operations/{made_template}/wait");
    let (status, body) = daemon.request("GET", &done, None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""state":"succeeded""#), "{body}");
    let (status, body) = daemon.request("GET", &format!("{done}?timeout_secs=61"), None);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("timeout_secs must be at most 60"), "{body}");
    let (status, body) = daemon.request(
        "POST",
        "/api/v1/vms",
        Some(r#"{"name": "x", "template": "base", "full_clone": "yes"}"#),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(vm_names(&daemon), Vec::<String>::new());
}

#[test]
fn a_copy_cut_short_by_the_daemons_death_fails_and_leaves_nothing() {
    let data = DataDir::new();
    let daemon = Daemon::start_armed(Path::new(QUETZALD), data, "copy-stall=return");
    template(&daemon);
    let id = start_full_clone(&daemon, "c1");
    assert!(daemon.data.path().join("vms/c1").exists());

    let daemon = daemon.restart(Path::new(QUETZALD));

    let op = json(&daemon, &["operation", "show", &id, "--output", "json"]);
    assert_eq!(op["state"], "failed", "{op}");
    assert_eq!(op["error"]["code"], "interrupted", "{op}");
    assert_eq!(vm_names(&daemon), Vec::<String>::new());
    assert!(!daemon.data.path().join("vms/c1").exists());
    // The name is free again, and a copy now runs to the end.
    let id = start_full_clone(&daemon, "c1");
    cli(&daemon).ok(&["operation", "wait", &id]);
    assert_eq!(vm_names(&daemon), ["c1"]);
}

#[test]
fn a_template_cut_short_after_hashing_leaves_the_vm_as_it_was() {
    let data = DataDir::new();
    let mut daemon = Daemon::start_armed(Path::new(QUETZALD), data, "template-hashed=return");
    cli(&daemon).ok(&["vm", "create", "golden"]);
    let answer = cli(&daemon).output(&["template", "create", "base", "--from", "golden"]);
    assert!(!answer.status.success());
    assert!(!daemon.wait_for_death().success());

    let daemon = daemon.restart(Path::new(QUETZALD));

    assert_eq!(vm_names(&daemon), ["golden"]);
    assert!(!daemon.data.path().join("templates/base").exists());
    let templates = json(&daemon, &["template", "list", "--output", "json"]);
    assert_eq!(templates, serde_json::json!([]));
    cli(&daemon).ok(&["template", "create", "base", "--from", "golden"]);
    assert_eq!(vm_names(&daemon), Vec::<String>::new());
}

#[test]
fn a_template_cut_short_after_recording_is_whole_after_a_restart() {
    let data = DataDir::new();
    let mut daemon = Daemon::start_armed(Path::new(QUETZALD), data, "template-recorded=return");
    cli(&daemon).ok(&["vm", "create", "golden"]);
    let _ = cli(&daemon).output(&["template", "create", "base", "--from", "golden"]);
    assert!(!daemon.wait_for_death().success());

    let daemon = daemon.restart(Path::new(QUETZALD));

    assert_eq!(vm_names(&daemon), Vec::<String>::new());
    assert!(!daemon.data.path().join("vms/golden").exists());
    let disk = daemon.data.path().join("templates/base/disk.qcow2");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&disk).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o444);
    cli(&daemon).ok(&["vm", "create", "c1", "--template", "base"]);
}

#[test]
fn on_a_fresh_node_the_first_vm_of_an_image_builds_it_in_an_operation() {
    let daemon = Daemon::start_in(Path::new(QUETZALD), DataDir::empty(), None);
    assert!(!daemon.data.path().join("images/tiny/current").exists());

    let (status, body) = daemon.request("POST", "/api/v1/vms", Some(r#"{"name": "first"}"#));
    assert_eq!(status, 202, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["operation"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    cli(&daemon).ok(&["operation", "wait", &id]);

    let op = json(&daemon, &["operation", "show", &id, "--output", "json"]);
    assert_eq!(op["kind"], "build-image");
    assert_eq!(
        (op["state"].as_str(), op["progress"].as_u64()),
        (Some("succeeded"), Some(100))
    );
    assert_eq!(
        json(&daemon, &["vm", "show", "first", "--output", "json"])["state"],
        "stopped"
    );
    assert!(
        daemon
            .data
            .path()
            .join("images/tiny/current/manifest.json")
            .exists()
    );
    // Built once: the next VM is made at once, and the CLI waits either way.
    let (status, _) = daemon.request("POST", "/api/v1/vms", Some(r#"{"name": "second"}"#));
    assert_eq!(status, 201);
    cli(&daemon).ok(&["vm", "start", "first"]);
    assert_eq!(cli(&daemon).in_guest("first", "echo built"), "built");
}

#[test]
fn a_vms_console_stats_and_state_answer_while_an_operation_holds_it() {
    let data = DataDir::new();
    let daemon = Daemon::start_armed(Path::new(QUETZALD), data, "snapshot-hold=return");
    cli(&daemon).ok(&["vm", "create", "busy", "--start"]);
    assert_eq!(cli(&daemon).in_guest("busy", "echo ready"), "ready");

    let id = cli(&daemon)
        .ok(&["vm", "snapshot", "create", "busy", "s1", "--no-wait"])
        .trim()
        .to_owned();

    let (status, stats) = daemon.request("GET", "/api/v1/vms/busy/stats", None);
    assert_eq!(status, 200, "{stats}");
    assert_eq!(
        cli(&daemon).in_guest("busy", "echo still typing"),
        "still typing"
    );
    assert_eq!(
        json(&daemon, &["vm", "show", "busy", "--output", "json"])["state"],
        "running"
    );
    let op = json(&daemon, &["operation", "show", &id, "--output", "json"]);
    assert_eq!(
        op["state"], "running",
        "the operation was still holding the VM"
    );
    std::fs::write(daemon.data.path().join("vms/busy/failpoint-release"), b"").unwrap();
    cli(&daemon).ok(&["operation", "wait", &id]);
    let list = json(
        &daemon,
        &["vm", "snapshot", "list", "busy", "--output", "json"],
    );
    assert_eq!(list["snapshots"][0]["name"], "s1");
}
