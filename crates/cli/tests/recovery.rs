//! No orphan, no double run: quetzald is killed (as by `kill -9`, from an
//! armed fail point) at each step of a start and a stop, then started
//! again. Afterwards the VM is `running` with exactly one QEMU, or not
//! running with none — what `vm show` says and what runs agree.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::Path;

use quetzal_testkit::{Cli, Daemon, DataDir, processes_mentioning};
use serde_json::Value;

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");

fn cli(daemon: &Daemon) -> Cli {
    Cli::new(Path::new(QUETZAL), daemon.data.path())
}

/// The QEMU processes serving VM `name` of this daemon.
fn qemus(daemon: &Daemon, name: &str) -> usize {
    let socket = daemon.data.path().join("vms").join(name).join("qmp.sock");
    processes_mentioning(&socket.display().to_string()).len()
}

fn shown_state(daemon: &Daemon, name: &str) -> String {
    let vm: Value =
        serde_json::from_str(&cli(daemon).ok(&["vm", "show", name, "--output", "json"])).unwrap();
    vm["state"].as_str().unwrap().to_owned()
}

/// The interface's promise after a restart: running with one QEMU, or
/// not running with none.
fn assert_consistent(daemon: &Daemon, name: &str) -> String {
    let state = shown_state(daemon, name);
    let expected = usize::from(state == "running");
    quetzal_testkit::wait_until(&format!("{expected} QEMU for {name} ({state})"), || {
        qemus(daemon, name) == expected
    });
    state
}

/// Arms `failpoint`, runs `quetzal args` (which the daemon's death cuts
/// short) and starts a new daemon on the same data directory.
fn die_during(setup: &[&[&str]], failpoint: &str, args: &[&str]) -> Daemon {
    let data = DataDir::new();
    let mut daemon = Daemon::start_armed(Path::new(QUETZALD), data, &format!("{failpoint}=return"));
    for step in setup {
        cli(&daemon).ok(step);
    }
    let answer = cli(&daemon).output(args);
    assert!(
        !answer.status.success(),
        "{args:?} succeeded past {failpoint}"
    );
    assert!(!daemon.wait_for_death().success());
    daemon.restart(Path::new(QUETZALD))
}

const CREATE: &[&str] = &["vm", "create", "web"];
const START: &[&str] = &["vm", "start", "web"];

#[test]
fn killed_after_recording_starting_the_vm_is_crashed_with_no_qemu() {
    let daemon = die_during(&[CREATE], "start-before-spawn", START);

    assert_eq!(assert_consistent(&daemon, "web"), "crashed");
    cli(&daemon).ok(START);
    assert_eq!(assert_consistent(&daemon, "web"), "running");
}

#[test]
fn killed_right_after_spawning_qemu_leaves_no_orphan() {
    let daemon = die_during(&[CREATE], "qemu-spawned", START);

    assert_eq!(assert_consistent(&daemon, "web"), "crashed");
    let events = cli(&daemon).ok(&["events", "--vm", "web"]);
    assert!(events.contains("during its start"), "{events}");
}

#[test]
fn killed_before_the_vcpus_ran_the_half_started_qemu_is_ended() {
    let daemon = die_during(&[CREATE], "start-before-cont", START);

    assert_eq!(assert_consistent(&daemon, "web"), "crashed");
}

#[test]
fn killed_after_the_vcpus_ran_the_vm_is_kept_running_with_one_qemu() {
    let daemon = die_during(&[CREATE], "start-after-cont", START);

    assert_eq!(assert_consistent(&daemon, "web"), "running");
    cli(&daemon).in_guest("web", "echo alive");
}

#[test]
fn a_restart_policy_retries_a_start_cut_short() {
    let create = &["vm", "create", "web", "--restart", "on-failure"];
    let daemon = die_during(&[create], "start-before-cont", START);

    quetzal_testkit::wait_until("the policy restarted web", || {
        shown_state(&daemon, "web") == "running"
    });
    assert_eq!(assert_consistent(&daemon, "web"), "running");
}

#[test]
fn killed_during_a_stop_the_stop_is_finished_after_the_restart() {
    let daemon = die_during(
        &[CREATE, START],
        "stop-powerdown-sent",
        &["vm", "stop", "web"],
    );

    assert_eq!(assert_consistent(&daemon, "web"), "stopped");
}

#[test]
fn killed_before_a_taken_snapshot_was_recorded_the_disk_and_the_store_agree() {
    let daemon = die_during(
        &[CREATE, START],
        "snapshot-taken",
        &["vm", "snapshot", "create", "web", "s1"],
    );

    let list: Value = serde_json::from_str(
        &cli(&daemon).ok(&["vm", "snapshot", "list", "web", "--output", "json"]),
    )
    .unwrap();
    assert_eq!(list["snapshots"], serde_json::json!([]));
    let disk = daemon.data.path().join("vms/web/root.qcow2");
    let on_disk = std::process::Command::new("qemu-img")
        .args(["snapshot", "-l", "-U"])
        .arg(&disk)
        .output()
        .unwrap();
    let on_disk = String::from_utf8_lossy(&on_disk.stdout);
    assert!(!on_disk.contains("s1"), "{on_disk}");
    assert_eq!(assert_consistent(&daemon, "web"), "running");
    // The name is free again.
    cli(&daemon).ok(&["vm", "snapshot", "create", "web", "s1"]);
}
