//! Snapshots end to end: a running guest goes back exactly where it was
//! (files and the shell's own state), a stopped VM's disk goes back, the
//! tree survives a daemon restart, and bad requests fail cleanly.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::Path;
use std::process::Command;

use quetzal_testkit::{Cli, Daemon};
use serde_json::Value;

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");

fn cli(daemon: &Daemon) -> Cli {
    Cli::new(Path::new(QUETZAL), daemon.data.path())
}

fn ok(daemon: &Daemon, args: &[&str]) -> String {
    cli(daemon).ok(args)
}

fn fails(daemon: &Daemon, args: &[&str], expected: &str) {
    cli(daemon).fails(args, expected);
}

fn in_guest(daemon: &Daemon, vm: &str, command: &str) -> String {
    cli(daemon).in_guest(vm, command)
}

fn snapshots(daemon: &Daemon, vm: &str) -> Value {
    serde_json::from_str(&ok(
        daemon,
        &["vm", "snapshot", "list", vm, "--output", "json"],
    ))
    .unwrap()
}

#[test]
fn reverting_a_running_guest_brings_back_its_files_and_its_shell_state() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    ok(&daemon, &["vm", "create", "live", "--start"]);
    in_guest(&daemon, "live", "echo one > /root/f && sync && MARK=alpha");

    let taken = ok(&daemon, &["vm", "snapshot", "create", "live", "before"]);
    in_guest(&daemon, "live", "echo two > /root/f && sync && MARK=beta");
    assert_eq!(
        in_guest(&daemon, "live", "cat /root/f; echo $MARK"),
        "two\nbeta"
    );
    ok(&daemon, &["vm", "snapshot", "revert", "live", "before"]);

    assert!(taken.contains("disks and memory"), "{taken}");
    assert_eq!(
        in_guest(&daemon, "live", "cat /root/f; echo $MARK"),
        "one\nalpha"
    );
    let (_, vm) = daemon.request("GET", "/api/v1/vms/live", None);
    assert!(vm.contains("\"state\":\"running\""), "{vm}");
}

#[test]
fn a_stopped_vm_gets_its_disk_back_and_the_tree_survives_a_daemon_restart() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    ok(&daemon, &["vm", "create", "cold", "--start"]);
    in_guest(&daemon, "cold", "echo one > /root/f && sync");
    ok(&daemon, &["vm", "stop", "cold"]);
    let taken = ok(&daemon, &["vm", "snapshot", "create", "cold", "base"]);
    ok(&daemon, &["vm", "start", "cold"]);
    in_guest(&daemon, "cold", "echo two > /root/f && sync");
    ok(&daemon, &["vm", "snapshot", "create", "cold", "later"]);
    ok(&daemon, &["vm", "stop", "cold"]);

    let daemon = daemon.restart(Path::new(QUETZALD));
    ok(&daemon, &["vm", "snapshot", "revert", "cold", "base"]);
    ok(&daemon, &["vm", "snapshot", "create", "cold", "branch"]);
    ok(&daemon, &["vm", "start", "cold"]);

    assert!(taken.contains("disks only"), "{taken}");
    assert_eq!(in_guest(&daemon, "cold", "cat /root/f"), "one");
    let list = snapshots(&daemon, "cold");
    let parents: Vec<(String, Value)> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_owned(), s["parent"].clone()))
        .collect();
    assert_eq!(
        parents,
        vec![
            ("base".to_owned(), Value::Null),
            ("later".to_owned(), Value::from("base")),
            ("branch".to_owned(), Value::from("base")),
        ]
    );
    assert_eq!(list["current"], "branch");
}

#[test]
fn deleting_a_snapshot_removes_it_from_the_disk_and_reparents_its_children() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    ok(&daemon, &["vm", "create", "tidy"]);
    for name in ["a", "b", "c"] {
        ok(&daemon, &["vm", "snapshot", "create", "tidy", name]);
    }

    ok(&daemon, &["vm", "snapshot", "rm", "tidy", "b"]);

    let list = snapshots(&daemon, "tidy");
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "c"]);
    assert_eq!(list["snapshots"][1]["parent"], "a");
    let on_disk = Command::new("qemu-img")
        .args(["snapshot", "-U", "-l"])
        .arg(daemon.data.path().join("vms/tidy/root.qcow2"))
        .output()
        .unwrap();
    let on_disk = String::from_utf8(on_disk.stdout).unwrap();
    let tags: Vec<&str> = on_disk
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(tags, ["a", "c"]);
}

#[test]
fn bad_snapshot_requests_fail_cleanly() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    ok(&daemon, &["vm", "create", "vm1"]);
    ok(&daemon, &["vm", "snapshot", "create", "vm1", "cold"]);
    ok(&daemon, &["vm", "start", "vm1"]);

    fails(
        &daemon,
        &["vm", "snapshot", "revert", "vm1", "nope"],
        "VM vm1 has no snapshot named nope",
    );
    fails(
        &daemon,
        &["vm", "snapshot", "create", "vm1", "cold"],
        "VM vm1 already has a snapshot named cold",
    );
    fails(
        &daemon,
        &["vm", "snapshot", "revert", "vm1", "cold"],
        "stop the VM to revert to it",
    );
    fails(
        &daemon,
        &["vm", "snapshot", "create", "vm1", "a/b"],
        "invalid snapshot name 'a/b'",
    );
    fails(
        &daemon,
        &["vm", "snapshot", "create", "ghost", "x"],
        "no VM named ghost",
    );
    fails(
        &daemon,
        &["vm", "snapshot", "rm", "vm1", "nope"],
        "VM vm1 has no snapshot named nope",
    );

    let list = snapshots(&daemon, "vm1");
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 1);
}
