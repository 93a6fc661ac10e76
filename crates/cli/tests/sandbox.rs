//! Each VM's QEMU is confined, end to end: its own non-root uid, QEMU's
//! seccomp filter on, its own cgroup with a memory limit, its TAP handed
//! over as an fd, its files closed to the other VMs — and a daemon that
//! restarts still re-attaches to it.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use quetzal_engine::Accel;
use quetzal_engine::spec::overhead_mib;
use quetzal_testkit::{Cli, Daemon};
use serde_json::Value;

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");

/// A field of `/proc/PID/status` (its first value).
fn status_field(pid: u64, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// The memory cgroup a process is in, as a directory.
fn memory_cgroup(pid: u64) -> PathBuf {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (
            fields.next(),
            fields.next().unwrap(),
            fields.next().unwrap(),
        );
        if controllers.split(',').any(|c| c == "memory") {
            return Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
        }
        if controllers.is_empty() && Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            return Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        }
    }
    panic!("no memory cgroup in {cgroups}");
}

fn memory_limit(cgroup: &Path) -> u64 {
    let file = ["memory.limit_in_bytes", "memory.max"]
        .iter()
        .map(|name| cgroup.join(name))
        .find(|file| file.exists())
        .unwrap();
    std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn pid_of(cli: &Cli, name: &str) -> u64 {
    let shown: Value =
        serde_json::from_str(&cli.ok(&["vm", "show", name, "--output", "json"])).unwrap();
    assert_eq!(shown["state"], "running", "{shown}");
    shown["pid"].as_u64().unwrap()
}

/// Reads the first bytes of `file` as `uid`/`gid`: what it got, or why not.
fn read_as(uid: u32, gid: u32, file: &Path) -> Result<Vec<u8>, String> {
    let out = Command::new("head")
        .args(["-c", "4"])
        .arg(file)
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn every_qemu_runs_as_its_own_user_under_seccomp_in_a_cgroup_with_a_memory_limit() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    let (_, host) = daemon.request("GET", "/api/v1/host", None);
    let accel = match serde_json::from_str::<Value>(&host).unwrap()["accel"].as_str() {
        Some("kvm") => Accel::Kvm,
        _ => Accel::Tcg,
    };
    for name in ["sealed-a", "sealed-b"] {
        cli.ok(&["vm", "create", name, "--memory", "256", "--start"]);
    }
    let pids = [pid_of(&cli, "sealed-a"), pid_of(&cli, "sealed-b")];
    let uids: Vec<u32> = pids
        .iter()
        .map(|pid| status_field(*pid, "Uid").parse().unwrap())
        .collect();
    let gids: Vec<u32> = pids
        .iter()
        .map(|pid| status_field(*pid, "Gid").parse().unwrap())
        .collect();

    for (index, pid) in pids.iter().enumerate() {
        assert_ne!(uids[index], 0, "QEMU {pid} runs as root");
        assert_eq!(
            status_field(*pid, "Seccomp"),
            "2",
            "QEMU {pid} has no seccomp filter"
        );
        let cgroup = memory_cgroup(*pid);
        assert!(
            cgroup.to_string_lossy().contains("/quetzal/sealed-"),
            "{}",
            cgroup.display()
        );
        // 256 MiB of RAM, plus 256 MiB for the process beside it, plus
        // the translation cache under the accelerator this node uses.
        assert_eq!(
            memory_limit(&cgroup),
            (256 + overhead_mib(256, accel)) << 20,
            "{}",
            cgroup.display()
        );
        // Its TAP came from the daemon, as an fd.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(cmdline.contains("-netdev tap,id=net0,fd=3"), "{cmdline}");
        assert!(!cmdline.contains("ifname="), "{cmdline}");
    }
    assert_ne!(uids[0], uids[1], "two VMs share a uid");

    // A VM's disk opens for its own user, not for another VM's.
    let disk_a = daemon.data.path().join("vms/sealed-a/root.qcow2");
    assert_eq!(read_as(uids[0], gids[0], &disk_a).unwrap(), b"QFI\xfb");
    let refused = read_as(uids[1], gids[1], &disk_a).unwrap_err();
    assert!(refused.contains("Permission denied"), "{refused}");

    // A daemon killed and started again takes the confined QEMUs over.
    let cgroup_a = memory_cgroup(pids[0]);
    let daemon = daemon.restart(Path::new(QUETZALD));
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    assert_eq!(pid_of(&cli, "sealed-a"), pids[0]);
    cli.ok(&["vm", "stop", "sealed-a", "--force"]);
    assert!(!cgroup_a.exists(), "the stopped VM's cgroup is gone");
}
