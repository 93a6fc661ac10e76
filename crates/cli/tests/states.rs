//! States the engine moves a VM into by itself, end to end: when the host
//! disk under a running VM fills up, QEMU pauses the VM (it stops on
//! ENOSPC rather than fail the guest's writes), and the VM shows as
//! `paused` with why — not `running` while nothing runs.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::Path;

use quetzal_testkit::{Cli, Daemon, DataDir, Quetzal, Tmpfs, wait_until};
use serde_json::Value;

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");

fn state(cli: &Cli, name: &str) -> String {
    let vm: Value =
        serde_json::from_str(&cli.ok(&["vm", "show", name, "--output", "json"])).unwrap();
    vm["state"].as_str().unwrap().to_owned()
}

#[test]
fn a_vm_whose_host_disk_fills_up_is_paused_by_qemu_and_shows_why() {
    let data = DataDir::new();
    let tmpfs = Tmpfs::mount(&data.path().join("vms"), "72M");
    let daemon = Daemon::start_in(Path::new(QUETZALD), data, None);
    // Bound after the daemon, so dropped before its data directory.
    let tmpfs = tmpfs;
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    cli.ok(&["vm", "create", "full", "--start"]);
    assert_eq!(cli.in_guest("full", "echo ready"), "ready");

    // More than the host has room for; the guest blocks in its write.
    let mut console = Quetzal::spawn(
        Path::new(QUETZAL),
        daemon.data.path(),
        &["vm", "console", "full"],
    );
    console.send_line("dd if=/dev/urandom of=/root/fill bs=1M count=96 conv=fsync");

    wait_until("full to be paused", || state(&cli, "full") == "paused");
    let events = cli.ok(&["events", "--vm", "full"]);
    let paused = events
        .lines()
        .rfind(|line| line.split_whitespace().nth(2) == Some("paused"))
        .unwrap();
    assert!(paused.contains("no space left for its disk"), "{events}");
    // Resumed while the disk is still full, it is paused again.
    cli.ok(&["vm", "resume", "full"]);
    wait_until("full to be paused again", || {
        state(&cli, "full") == "paused"
    });

    drop(console);
    cli.ok(&["vm", "stop", "full", "--force"]);
    let data = daemon.stop();
    drop(tmpfs);
    drop(data);
}
