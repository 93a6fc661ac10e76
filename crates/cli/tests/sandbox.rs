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

/// The cgroup v1 directory (or v2's, with `controller` ignored) of a
/// process for `controller`.
fn cgroup_of(pid: u64, controller: &str) -> PathBuf {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        let path = cgroups.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        return Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    }
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (
            fields.next(),
            fields.next().unwrap(),
            fields.next().unwrap(),
        );
        if controllers.split(',').any(|c| c == controller) {
            return Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(path.trim_start_matches('/'));
        }
    }
    panic!("no {controller} cgroup in {cgroups}");
}

/// The host CPUs a thread may run on, as `/proc` lists them.
fn allowed_cpus(pid: u64, tid: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn a_pinned_vms_vcpu_runs_on_its_cpu_in_a_cgroup_with_cpu_and_cpuset() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    let last = std::thread::available_parallelism().unwrap().get() - 1;
    let last_cpu = last.to_string();

    cli.fails(
        &["vm", "create", "far", "--cpu-pin", &(last + 1).to_string()],
        "invalid CPU list",
    );
    cli.fails(
        &["vm", "create", "odd", "--cpu-pin", "1-0"],
        "invalid CPU list",
    );
    cli.fails(
        &["vm", "create", "word", "--cpu-pin", "all"],
        "invalid CPU list",
    );
    cli.ok(&["vm", "create", "pinned", "--cpu-pin", &last_cpu, "--start"]);
    let pid = pid_of(&cli, "pinned");

    // QEMU names its vCPU threads `CPU N/TCG` (or `/KVM`).
    let vcpus: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| {
            let tid = task.unwrap().file_name().to_string_lossy().into_owned();
            let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            comm.starts_with("CPU ").then_some(tid)
        })
        .collect();
    assert_eq!(vcpus.len(), 1, "one vCPU thread");
    assert_eq!(allowed_cpus(pid, &vcpus[0]), last_cpu);
    let cpuset = cgroup_of(pid, "cpuset");
    assert!(
        cpuset.to_string_lossy().contains("/quetzal/pinned-"),
        "{}",
        cpuset.display()
    );
    let cpus = std::fs::read_to_string(cpuset.join("cpuset.cpus")).unwrap();
    assert_eq!(cpus.trim(), last_cpu);
    let cpu = cgroup_of(pid, "cpu");
    let weight = ["cpu.shares", "cpu.weight"]
        .iter()
        .find_map(|file| std::fs::read_to_string(cpu.join(file)).ok())
        .unwrap();
    assert!(["1024", "100"].contains(&weight.trim()), "{weight}");
    // The VMs' group weighs at least this VM against the host's other
    // processes (it is the sum of every running VM's weight).
    let group = ["cpu.shares", "cpu.weight"]
        .iter()
        .find_map(|file| std::fs::read_to_string(cpu.parent().unwrap().join(file)).ok())
        .unwrap();
    let group: u64 = group.trim().parse().unwrap();
    let own: u64 = weight.trim().parse().unwrap();
    assert!(group >= own, "the VMs' group weighs {group}, one VM {own}");
    let shown: Value =
        serde_json::from_str(&cli.ok(&["vm", "show", "pinned", "--output", "json"])).unwrap();
    assert_eq!(shown["cpu_pin"], last_cpu.as_str());
    assert_eq!(shown["cpu_weight"], 100);

    cli.ok(&["vm", "stop", "pinned", "--force"]);
    assert!(
        !cpuset.exists() && !cpu.exists(),
        "the stopped VM's cgroups are gone"
    );
    cli.ok(&["vm", "rm", "pinned"]);
}
