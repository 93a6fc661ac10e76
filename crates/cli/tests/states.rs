//! States the engine moves a VM into by itself, end to end: when the host
//! disk under a running VM fills up, QEMU pauses the VM (it stops on
//! ENOSPC rather than fail the guest's writes), and the VM shows as
//! `paused` with why — not `running` while nothing runs.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::Path;
use std::process::Command;

use quetzal_testkit::{Cli, Daemon, DataDir, Quetzal, wait_until};
use serde_json::Value;

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");

/// Unmounts a test's tmpfs, even when the test fails (lazily: a QEMU
/// of a failed test may still hold files there), before the data
/// directory under it is removed.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn state(cli: &Cli, name: &str) -> String {
    let vm: Value =
        serde_json::from_str(&cli.ok(&["vm", "show", name, "--output", "json"])).unwrap();
    vm["state"].as_str().unwrap().to_owned()
}

#[test]
fn a_vm_whose_host_disk_fills_up_is_paused_by_qemu_and_shows_why() {
    let data = DataDir::new();
    let vms = data.path().join("vms");
    std::fs::create_dir_all(&vms).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=72M", "tmpfs"])
        .arg(&vms)
        .status()
        .unwrap();
    assert!(mounted.success(), "this test mounts a tmpfs (needs root)");
    let unmount = Unmount(vms.clone());
    let daemon = Daemon::start_in(Path::new(QUETZALD), data, None);
    // Bound after the daemon, so dropped before its data directory.
    let unmount_first = unmount;
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
        .rfind(|line| line.contains("paused"))
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
    drop(unmount_first);
    drop(data);
}
