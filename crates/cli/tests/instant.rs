//! Warm templates and instant clones end to end: a running Debian guest
//! becomes a warm template (its RAM file, device state and disk), and ten
//! VMs created from it run at once without a boot — each its own machine
//! (MAC, machine-id, generation id, name, address), its memory private
//! only where it wrote, the template's RAM file never written.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::collections::HashSet;
use std::path::Path;

use quetzal_testkit::{Cli, DEBIAN_TIMEOUT, Daemon, debian, wait_until_for};
use serde_json::Value;

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");
const CLONES: usize = 10;

fn show(cli: &Cli, name: &str) -> Value {
    serde_json::from_str(&cli.ok(&["vm", "show", name, "--output", "json"])).unwrap()
}

fn exec(cli: &Cli, name: &str, command: &[&str]) -> String {
    let mut args = vec!["vm", "exec", name, "--"];
    args.extend_from_slice(command);
    cli.ok(&args).trim().to_owned()
}

/// Seconds since the guest booted, as its kernel counts them.
fn uptime(cli: &Cli, name: &str) -> f64 {
    let text = exec(cli, name, &["cat", "/proc/uptime"]);
    text.split_whitespace().next().unwrap().parse().unwrap()
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// What a process's mapping of `file` holds privately (`Private_Clean +
/// Private_Dirty`: pages it copied on write), in KiB.
fn private_kib_of(pid: u64, file: &Path) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let file = file.display().to_string();
    let mut inside = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: its address range, ..., its path.
            inside = line.ends_with(&file);
        } else if inside && first.starts_with("Private_") {
            kib += words.next().unwrap().parse::<u64>().unwrap();
        }
    }
    kib
}

#[test]
fn ten_instant_clones_of_a_warm_template_run_at_once_each_a_machine_of_its_own() {
    debian();
    // Where the time goes, printed when the test fails or times out.
    let started = std::time::Instant::now();
    let phase = |what: &str| eprintln!("instant: {what} after {:.0?}", started.elapsed());
    let daemon = Daemon::start(Path::new(QUETZALD));
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    let memory_mib: u64 = 512;
    cli.ok(&[
        "vm",
        "create",
        "source",
        "--image",
        "debian",
        "--memory",
        &memory_mib.to_string(),
        "--network",
        "default",
        "--ram-file",
    ]);

    // Warm needs a running VM: a stopped one gets one clear line.
    cli.fails(
        &["template", "create", "early", "--from", "source", "--warm"],
        "start it first",
    );
    cli.ok(&["vm", "start", "source"]);
    wait_until_for("the guest's agent", DEBIAN_TIMEOUT, || {
        let agent = &show(&cli, "source")["agent"];
        agent["connected"] == true && agent["port_connected"] == true
    });
    phase("the source booted");
    let source_uptime = uptime(&cli, "source");
    let source_machine_id = exec(&cli, "source", &["cat", "/etc/machine-id"]);

    cli.ok(&["template", "create", "desk", "--from", "source", "--warm"]);
    let template: Value =
        serde_json::from_str(&cli.ok(&["template", "show", "desk", "--output", "json"])).unwrap();
    let ram = daemon.data.path().join("templates/desk/ram");
    let ram_sha256 = template["warm"]["ram_sha256"].as_str().unwrap().to_owned();
    assert_eq!(sha256(&ram), ram_sha256);
    // The VM became the template.
    cli.fails(&["vm", "show", "source"], "no VM named source");

    // An instant clone has its template's size: other figures are refused.
    cli.fails(
        &[
            "vm",
            "create",
            "big",
            "--template",
            "desk",
            "--memory",
            "1024",
        ],
        "an instant clone has its warm template's 1 CPUs and 512 MiB",
    );

    phase("the warm template was made");
    let names: Vec<String> = (0..CLONES).map(|i| format!("clone-{i}")).collect();
    for name in &names {
        let made: Value = serde_json::from_str(&cli.ok(&[
            "vm",
            "create",
            name,
            "--template",
            "desk",
            "--network",
            "default",
            "--output",
            "json",
        ]))
        .unwrap();
        // Running as soon as it is made: no boot.
        assert_eq!(made["state"], "running", "{made}");
        assert_eq!(made["linked_to"], "desk");
    }

    phase("the clones were made");
    let mut macs = HashSet::new();
    let mut machine_ids = HashSet::new();
    let mut generations = HashSet::new();
    for name in &names {
        // Its kernel's clock continues the template's: it never booted.
        let up = uptime(&cli, name);
        assert!(
            up >= source_uptime,
            "{name} has been up {up} s, its template was at {source_uptime} s"
        );
        let vm = show(&cli, name);
        let mac = vm["mac"].as_str().unwrap().to_owned();
        // The guest's NIC has the clone's own MAC, not the template's.
        let guest_mac = exec(&cli, name, &["sh", "-c", "cat /sys/class/net/e*/address"]);
        assert_eq!(guest_mac, mac, "{name}");
        let machine_id = exec(&cli, name, &["cat", "/etc/machine-id"]);
        assert_ne!(machine_id, source_machine_id, "{name}");
        assert_eq!(exec(&cli, name, &["hostname"]), *name);
        macs.insert(mac);
        machine_ids.insert(machine_id);
        generations.insert(vm["generation_id"].as_str().unwrap().to_owned());
        // Each writes to its memory (a file in its RAM-backed /dev/shm).
        exec(
            &cli,
            name,
            &["sh", "-c", "head -c 32M /dev/urandom > /dev/shm/mine"],
        );
    }
    phase("each clone was checked");
    assert_eq!(macs.len(), CLONES);
    assert_eq!(machine_ids.len(), CLONES);
    assert_eq!(generations.len(), CLONES);
    // Each gets an address of its own (its new identity asks DHCP anew).
    wait_until_for("an address for each clone", DEBIAN_TIMEOUT, || {
        let addresses: HashSet<String> = names
            .iter()
            .filter_map(|name| show(&cli, name)["addresses"][0].as_str().map(str::to_owned))
            .collect();
        addresses.len() == CLONES
    });

    phase("each clone had an address");
    // What the clones wrote is theirs: the template's RAM file is as it
    // was, and each clone holds privately only what it wrote (at least
    // the 32 MiB file), far below its RAM size.
    assert_eq!(sha256(&ram), ram_sha256);
    for name in &names {
        let pid = show(&cli, name)["pid"].as_u64().unwrap();
        let private_mib = private_kib_of(pid, &ram) / 1024;
        assert!(
            (32..memory_mib / 2).contains(&private_mib),
            "{name}: {private_mib} MiB of its {memory_mib} MiB RAM private"
        );
        // `vm show` says so too: what of its RAM is still the template's.
        let memory = &show(&cli, name)["host_memory"];
        let shared = memory["template_shared_bytes"].as_u64().unwrap_or(0) >> 20;
        assert!(shared > 0, "{name}: {memory}");
        assert!(
            memory["pss_bytes"].as_u64().unwrap() >> 20 < memory_mib,
            "{name}: {memory}"
        );
    }

    // The template stays while clones use it; a clone is an ordinary VM.
    cli.fails(&["template", "rm", "desk"], "has linked clones");
    cli.fails(
        &["template", "create", "again", "--from", "clone-0", "--warm"],
        "linked clone",
    );
    let ram_dir = quetzal_engine::spec::ram_dir(daemon.data.path());
    for name in &names {
        cli.ok(&["vm", "stop", name, "--force"]);
        cli.ok(&["vm", "rm", name]);
    }
    cli.ok(&["template", "rm", "desk"]);
    phase("the clones and the template were removed");
    assert!(!ram.exists());
    let left: Vec<_> = std::fs::read_dir(&ram_dir)
        .map(|dir| dir.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "RAM files left: {left:?}");
}
