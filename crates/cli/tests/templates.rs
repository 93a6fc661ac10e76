//! Templates and clones end to end: a real daemon, real QEMU, real guests,
//! and the template's disk checked by sha256.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

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

fn json(daemon: &Daemon, args: &[&str]) -> Value {
    serde_json::from_str(&ok(daemon, args)).unwrap()
}

fn in_guest(daemon: &Daemon, vm: &str, command: &str) -> String {
    cli(daemon).in_guest(vm, command)
}

/// A stopped VM named `name` whose disk holds /root/golden.
fn golden_vm(daemon: &Daemon, name: &str) {
    ok(daemon, &["vm", "create", name, "--start"]);
    assert_eq!(
        in_guest(
            daemon,
            name,
            "echo gold > /root/golden && sync && cat /root/golden"
        ),
        "gold"
    );
    ok(daemon, &["vm", "stop", name]);
}

fn sha256(path: &Path) -> String {
    quetzal_image::sha256_file(path).unwrap().0
}

#[test]
fn linked_clones_boot_keep_their_own_files_and_never_change_the_template() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    golden_vm(&daemon, "golden");

    let template = json(
        &daemon,
        &[
            "template", "create", "base", "--from", "golden", "--output", "json",
        ],
    );
    let disk = daemon.data.path().join("templates/base/disk.qcow2");
    assert_eq!(template["disk_sha256"].as_str().unwrap(), sha256(&disk));
    assert_eq!(
        json(&daemon, &["vm", "list", "--output", "json"]),
        Value::Array(vec![])
    );

    for clone in ["c1", "c2"] {
        let started = Instant::now();
        ok(&daemon, &["vm", "create", clone, "--template", "base"]);
        eprintln!("linked clone {clone} created in {:?}", started.elapsed());
        ok(&daemon, &["vm", "start", clone]);
    }
    let mut machine_ids = Vec::new();
    let mut macs = Vec::new();
    for clone in ["c1", "c2"] {
        let seen = in_guest(
            &daemon,
            clone,
            &format!(
                "cat /root/golden && echo {clone} > /root/mine && sync && cat /etc/machine-id"
            ),
        );
        let (golden, machine_id) = seen.split_once('\n').unwrap();
        assert_eq!(golden, "gold");
        let vm = json(&daemon, &["vm", "show", clone, "--output", "json"]);
        // Its NIC has the VM's MAC address, random and locally administered.
        let mac = vm["mac"].as_str().unwrap();
        let seen_mac = in_guest(&daemon, clone, "cat /sys/class/net/eth0/address");
        assert_eq!(seen_mac, mac);
        let first = u8::from_str_radix(&mac[..2], 16).unwrap();
        assert_eq!(first & 0x03, 0x02, "{mac} is local and unicast");
        macs.push(mac.to_owned());
        assert_eq!(
            vm["machine_id"], machine_id,
            "the guest got its VM's identity"
        );
        machine_ids.push(machine_id.to_owned());
    }
    assert_ne!(
        machine_ids[0], machine_ids[1],
        "each clone its own identity"
    );
    assert_ne!(macs[0], macs[1], "each clone its own MAC");
    for clone in ["c1", "c2"] {
        ok(&daemon, &["vm", "stop", clone]);
    }
    ok(&daemon, &["vm", "start", "c1"]);
    let mine = in_guest(&daemon, "c1", "cat /root/mine");
    ok(&daemon, &["vm", "stop", "c1"]);

    assert_eq!(mine, "c1");
    assert_eq!(sha256(&disk), template["disk_sha256"].as_str().unwrap());
    let info = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(daemon.data.path().join("vms/c1/root.qcow2"))
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["full-backing-filename"], disk.display().to_string());
    let shown = json(&daemon, &["template", "show", "base", "--output", "json"]);
    assert_eq!(shown["linked_clones"], serde_json::json!(["c1", "c2"]));
}

#[test]
fn a_full_clone_survives_deleting_its_template_and_linked_clones_block_it() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    golden_vm(&daemon, "golden");
    ok(&daemon, &["template", "create", "base", "--from", "golden"]);
    ok(
        &daemon,
        &["vm", "create", "solo", "--template", "base", "--full"],
    );
    ok(&daemon, &["vm", "create", "tied", "--template", "base"]);

    fails(
        &daemon,
        &["template", "rm", "base"],
        "template base has linked clones: tied",
    );
    ok(&daemon, &["vm", "rm", "tied"]);
    ok(&daemon, &["template", "rm", "base"]);

    assert!(!daemon.data.path().join("templates/base").exists());
    let solo = json(&daemon, &["vm", "show", "solo", "--output", "json"]);
    assert_eq!(solo["linked_to"], Value::Null);
    ok(&daemon, &["vm", "start", "solo"]);
    assert_eq!(in_guest(&daemon, "solo", "cat /root/golden"), "gold");
}

#[test]
fn a_stopped_vm_clones_into_an_independent_vm() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    golden_vm(&daemon, "golden");

    ok(&daemon, &["vm", "clone", "golden", "copy"]);
    // The copy ran as an operation that reached 100%; the VM was
    // `creating` until then.
    let ops = json(&daemon, &["operation", "list", "--output", "json"]);
    let op = &ops.as_array().unwrap()[0];
    assert_eq!(op["kind"], "clone-vm", "{ops}");
    assert_eq!(op["target"], "/api/v1/vms/copy");
    assert_eq!(
        (op["state"].as_str(), op["progress"].as_u64()),
        (Some("succeeded"), Some(100))
    );
    let events = ok(&daemon, &["events", "--vm", "copy"]);
    let creating = events.find("creating").expect("a creating event");
    assert!(events[creating..].contains("created"), "{events}");
    ok(&daemon, &["vm", "rm", "golden"]);
    ok(&daemon, &["vm", "start", "copy"]);

    assert_eq!(in_guest(&daemon, "copy", "cat /root/golden"), "gold");
    let copy = json(&daemon, &["vm", "show", "copy", "--output", "json"]);
    assert_eq!(copy["cpus"], 1);
}

#[test]
fn bad_template_and_clone_requests_fail_cleanly_and_leave_nothing() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    ok(&daemon, &["vm", "create", "busy", "--start"]);
    ok(&daemon, &["vm", "create", "idle"]);
    ok(&daemon, &["template", "create", "base", "--from", "idle"]);

    fails(
        &daemon,
        &["vm", "clone", "busy", "other"],
        "cannot clone a VM that is running; stop it first",
    );
    fails(
        &daemon,
        &["template", "create", "t2", "--from", "busy"],
        "cannot make a template of a VM that is running",
    );
    fails(
        &daemon,
        &["template", "create", "base", "--from", "busy"],
        "",
    );
    fails(
        &daemon,
        &["template", "create", "t3", "--from", "ghost"],
        "no VM named ghost",
    );
    fails(
        &daemon,
        &["template", "create", "../x", "--from", "busy"],
        "invalid template name '../x'",
    );
    fails(
        &daemon,
        &["vm", "create", "x", "--template", "nope"],
        "no template named nope",
    );
    fails(
        &daemon,
        &[
            "vm",
            "create",
            "x",
            "--template",
            "base",
            "--full",
            "--disk",
            "9999",
        ],
        "disk_mib cannot be changed on a full clone",
    );
    fails(&daemon, &["vm", "create", "x", "--full"], "--template");
    fails(
        &daemon,
        &["vm", "create", "x", "--image", "tiny", "--template", "base"],
        "cannot be used with",
    );
    fails(&daemon, &["vm", "clone", "idle", "y"], "no VM named idle");
    fails(
        &daemon,
        &["template", "rm", "nope"],
        "no template named nope",
    );

    let vms: Vec<String> = std::fs::read_dir(daemon.data.path().join("vms"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(vms, vec!["busy".to_owned()]);
    let templates: Vec<String> = std::fs::read_dir(daemon.data.path().join("templates"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(templates, vec!["base".to_owned()]);
}

#[test]
fn running_out_of_space_mid_copy_fails_the_operation_and_leaves_nothing_half_made() {
    let data = quetzal_testkit::DataDir::new();
    let vms = data.path().join("vms");
    // Room for the source VM's data and its copy's first half only.
    let tmpfs = quetzal_testkit::Tmpfs::mount(&vms, "192M");
    let daemon = Daemon::start_in(Path::new(QUETZALD), data, None);
    // Bound after the daemon, so dropped before its data directory.
    let tmpfs = tmpfs;

    ok(&daemon, &["vm", "create", "big", "--start"]);
    assert_eq!(
        in_guest(
            &daemon,
            "big",
            "dd if=/dev/urandom of=/root/fill bs=1M count=110 2>/dev/null && sync && echo filled"
        ),
        "filled"
    );
    ok(&daemon, &["vm", "stop", "big"]);
    let disk = vms.join("big/root.qcow2");
    let before = sha256(&disk);

    fails(&daemon, &["vm", "clone", "big", "copy"], "No space left");

    assert!(!vms.join("copy").exists(), "a half-made clone was left");
    let listed = json(&daemon, &["vm", "list", "--output", "json"]);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["big"]);
    assert_eq!(sha256(&disk), before, "the source disk changed");
    // The copy's operation got part of the way, then failed saying why.
    let ops = json(&daemon, &["operation", "list", "--output", "json"]);
    let op = &ops.as_array().unwrap()[0];
    assert_eq!(op["state"], "failed", "{ops}");
    assert_eq!(op["error"]["code"], "insufficient_storage", "{ops}");
    assert!(op["progress"].as_u64().unwrap() > 0, "{ops}");
    let events = ok(&daemon, &["events", "--vm", "copy"]);
    assert!(events.contains("create-failed"), "{events}");
    let check = Command::new("qemu-img")
        .arg("check")
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // Through the API: accepted, then the operation fails the same way.
    let (status, body) = daemon.request(
        "POST",
        "/api/v1/vms/big/clone",
        Some(r#"{"name": "copy2"}"#),
    );
    assert_eq!(status, 202, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["operation"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    fails(&daemon, &["operation", "wait", &id], "No space left");
    assert!(!vms.join("copy2").exists(), "a half-made clone was left");

    let data = daemon.stop();
    drop(tmpfs);
    drop(data);
}
