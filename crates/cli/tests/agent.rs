//! The guest agent end to end: `quetzal-agent` in a real tiny guest under
//! QEMU, reached over its virtio-serial port by a real quetzald; commands
//! run with `quetzal vm exec`, their output and exit codes, and what a
//! VM without an agent answers.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use quetzal_testkit::{Cli, Daemon, guest_memory_matches, wait_until, wait_until_for};
use serde_json::Value;

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");

fn show(cli: &Cli, name: &str) -> Value {
    serde_json::from_str(&cli.ok(&["vm", "show", name, "--output", "json"])).unwrap()
}

/// Starts a VM and waits until its agent is connected.
fn running_with_agent(daemon: &Daemon, name: &str) -> Cli {
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    cli.ok(&["vm", "create", name, "--start"]);
    wait_until("the guest agent", || {
        show(&cli, name)["agent"]["connected"] == true
    });
    cli
}

fn exec(daemon: &Daemon, name: &str, command: &[&str]) -> std::process::Output {
    Command::new(QUETZAL)
        .args(["vm", "exec", name, "--"])
        .args(command)
        .env("QUETZAL_DATA_DIR", daemon.data.path())
        .output()
        .unwrap()
}

#[test]
fn the_agent_connects_and_runs_commands_with_their_output_and_exit_code() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    let cli = running_with_agent(&daemon, "helper");

    let agent = &show(&cli, "helper")["agent"];
    assert!(
        agent["version"]
            .as_str()
            .unwrap()
            .starts_with("quetzal-agent "),
        "{agent}"
    );
    assert!(agent["last_contact_at"].is_i64(), "{agent}");
    assert_eq!(agent["hostname"], "tiny", "{agent}");
    assert_eq!(agent["os"], "Linux", "{agent}");
    // Its address as the guest tells it: the one its network's DHCP
    // server leased (tiny has no other).
    let leased = || {
        let (_, network) = daemon.request("GET", "/api/v1/networks/default", None);
        let network: Value = serde_json::from_str(&network).unwrap();
        network["leases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|lease| lease["vm"] == "helper")
            .map(|lease| lease["address"].as_str().unwrap().to_owned())
    };
    wait_until("a lease and the agent's address", || {
        leased()
            .is_some_and(|lease| show(&cli, "helper")["addresses"] == serde_json::json!([lease]))
    });
    let human = cli.ok(&["vm", "show", "helper"]);
    assert!(
        human.contains("Agent     connected: quetzal-agent"),
        "{human}"
    );
    let (_, events) = daemon.request("GET", "/api/v1/events?vm=helper", None);
    assert!(
        events.contains("guest agent connected: quetzal-agent"),
        "{events}"
    );

    let ran = exec(
        &daemon,
        "helper",
        &["/bin/sh", "-c", "echo out-$((6 * 7)); echo err >&2; exit 7"],
    );
    assert_eq!(ran.status.code(), Some(7));
    assert_eq!(String::from_utf8(ran.stdout).unwrap(), "out-42\n");
    assert_eq!(String::from_utf8(ran.stderr).unwrap(), "err\n");

    // In the guest, really: its own hostname and kernel.
    let ran = exec(&daemon, "helper", &["/bin/cat", "/etc/hostname"]);
    assert_eq!(String::from_utf8(ran.stdout).unwrap(), "tiny\n");

    // Input through the API, and output past the bound cut to 1 MiB.
    let (status, body) = daemon.request(
        "POST",
        "/api/v1/vms/helper/exec",
        Some(r#"{"command": "/bin/cat", "stdin_b64": "aGVsbG8K"}"#),
    );
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["stdout_b64"], "aGVsbG8K");
    assert_eq!(answer["exit_code"], 0);
    let big = exec(
        &daemon,
        "helper",
        &["/bin/sh", "-c", "head -c 1500000 /dev/zero"],
    );
    assert_eq!(big.status.code(), Some(0));
    assert_eq!(big.stdout.len(), 1 << 20);
    assert!(
        String::from_utf8_lossy(&big.stderr).contains("longer than 1 MiB"),
        "{}",
        String::from_utf8_lossy(&big.stderr)
    );

    // A program that is not there: the agent's reason, one line.
    let missing = exec(&daemon, "helper", &["/no/such/program"]);
    let stderr = String::from_utf8(missing.stderr).unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot run /no/such/program"), "{stderr}");

    // tiny has no desktop: its clipboard is refused, in one line; text
    // past 1 MiB is refused before the guest is asked.
    let clipboard = Command::new(QUETZAL)
        .args(["vm", "clipboard", "helper"])
        .env("QUETZAL_DATA_DIR", daemon.data.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8(clipboard.stderr).unwrap();
    assert_eq!(clipboard.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("VM helper has no clipboard to share: its guest has no quetzal-clipboard"),
        "{stderr}"
    );
    let (status, body) = daemon.request("GET", "/api/v1/vms/helper/clipboard", None);
    assert_eq!(status, 409, "{body}");
    let huge = serde_json::json!({ "text": "x".repeat((1 << 20) + 1) }).to_string();
    let (status, body) = daemon.request("PUT", "/api/v1/vms/helper/clipboard", Some(&huge));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("at most 1048576"), "{body}");
}

#[test]
fn a_vm_without_an_agent_to_talk_to_gets_one_clear_error() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    cli.ok(&["vm", "create", "quiet"]);

    let stopped = exec(&daemon, "quiet", &["/bin/true"]);
    let stderr = String::from_utf8(stopped.stderr).unwrap();
    assert_eq!(stopped.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("VM quiet: the VM's guest agent is not connected"),
        "{stderr}"
    );
    let (status, body) = daemon.request(
        "POST",
        "/api/v1/vms/quiet/exec",
        Some(r#"{"command": "/bin/true"}"#),
    );
    assert_eq!(status, 409, "{body}");
    assert!(body.contains(r#""code":"agent_unavailable""#), "{body}");
    assert!(
        show(&cli, "quiet").get("agent").is_none(),
        "a stopped VM has no agent"
    );

    let (status, body) = daemon.request(
        "POST",
        "/api/v1/vms/nobody/exec",
        Some(r#"{"command": "/bin/true"}"#),
    );
    assert_eq!(status, 404, "{body}");
    for bad in [
        r#"{"command": ""}"#,
        r#"{"command": "/bin/true", "timeout_secs": 0}"#,
        r#"{"command": "/bin/true", "stdin_b64": "!!"}"#,
        r#"{"command": "/bin/true", "extra": 1}"#,
    ] {
        let (status, body) = daemon.request("POST", "/api/v1/vms/quiet/exec", Some(bad));
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let usage = Command::new(QUETZAL)
        .args(["vm", "exec", "quiet"])
        .env("QUETZAL_DATA_DIR", daemon.data.path())
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
}

#[test]
fn a_file_goes_into_a_guest_and_comes_out_the_same() {
    use sha2::{Digest, Sha256};
    let daemon = Daemon::start(Path::new(QUETZALD));
    let cli = running_with_agent(&daemon, "filer");
    let local = quetzal_testkit::DataDir::empty();
    let original = local.path().join("original.bin");
    let back = local.path().join("back.bin");
    // 1 MiB that does not compress: a simple xorshift stream.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let bytes: Vec<u8> = (0..1 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect();
    std::fs::write(&original, &bytes).unwrap();
    let original_arg = original.display().to_string();
    let back_arg = back.display().to_string();

    cli.ok(&["vm", "cp", &original_arg, "filer:/tmp/copied.bin"]);
    // In the guest, the same bytes.
    let listed = exec(
        &daemon,
        "filer",
        &["/bin/sh", "-c", "wc -c < /tmp/copied.bin"],
    );
    assert_eq!(String::from_utf8(listed.stdout).unwrap().trim(), "1048576");
    cli.ok(&["vm", "cp", "filer:/tmp/copied.bin", &back_arg]);

    let sha = |path: &Path| format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()));
    assert_eq!(sha(&back), sha(&original));

    for (args, says) in [
        (
            vec!["vm", "cp", "a", "b"],
            "one side of vm cp is a guest file",
        ),
        (
            vec!["vm", "cp", "filer:/no/such/file", &back_arg],
            "cannot open /no/such/file",
        ),
        (
            vec!["vm", "cp", "/no/such/local", "filer:/tmp/x"],
            "cannot read /no/such/local",
        ),
        (
            vec!["vm", "cp", &original_arg, "filer:relative"],
            "one side of vm cp is a guest file",
        ),
    ] {
        let out = Command::new(QUETZAL)
            .args(&args)
            .env("QUETZAL_DATA_DIR", daemon.data.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// The events of VM `name` as `(kind, cause)`.
fn events(daemon: &Daemon, name: &str) -> Vec<(String, String)> {
    let (_, page) = daemon.request("GET", &format!("/api/v1/events?vm={name}&limit=500"), None);
    let page: Value = serde_json::from_str(&page).unwrap();
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["cause"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_guest_whose_agent_falls_silent_is_hung_and_restarted_per_its_policy() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    for (name, policy) in [("mended", "on-failure"), ("left", "never")] {
        cli.ok(&["vm", "create", name, "--restart", policy, "--start"]);
    }
    for name in ["mended", "left"] {
        wait_until("the guest agent", || {
            show(&cli, name)["agent"]["connected"] == true
        });
        // Alive, but it answers nothing from here on.
        cli.in_guest(name, "kill -STOP $(pidof quetzal-agent)");
    }

    let hung = |name: &str| {
        events(&daemon, name)
            .into_iter()
            .find(|(kind, _)| kind == "hung")
            .map(|(_, cause)| cause)
    };
    wait_until_for("the hung guest's restart", Duration::from_secs(180), || {
        events(&daemon, "mended")
            .iter()
            .any(|(kind, _)| kind == "restarted")
    });
    let cause = hung("mended").unwrap();
    assert!(
        cause.contains("has not answered for") && cause.contains("restart policy"),
        "{cause}"
    );
    // Restarted: a new boot whose agent answers again.
    wait_until("the restarted guest's agent", || {
        show(&cli, "mended")["agent"]["connected"] == true
    });
    // The one whose policy is never is told about and left running.
    wait_until_for("the other's hung event", Duration::from_secs(180), || {
        hung("left").is_some()
    });
    assert!(hung("left").unwrap().contains("left running"));
    assert_eq!(show(&cli, "left")["state"], "running");
    for name in ["mended", "left"] {
        cli.ok(&["vm", "stop", name, "--force"]);
    }
}

#[test]
fn a_snapshot_of_a_running_guest_with_an_agent_is_quiesced_and_the_guest_thawed() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    let cli = running_with_agent(&daemon, "calm");

    cli.ok(&["vm", "snapshot", "create", "calm", "steady"]);

    let list: Value =
        serde_json::from_str(&cli.ok(&["vm", "snapshot", "list", "calm", "--output", "json"]))
            .unwrap();
    let snapshot = &list["snapshots"][0];
    assert_eq!(snapshot["name"], "steady");
    assert_eq!(snapshot["quiesced"], true, "{list}");
    assert!(
        events(&daemon, "calm")
            .iter()
            .any(|(kind, cause)| kind == "snapshot-taken" && cause.contains("quiesced"))
    );
    // Thawed: the root filesystem takes writes at once.
    let wrote = exec(
        &daemon,
        "calm",
        &["sh", "-c", "echo after > /root/after && sync"],
    );
    assert!(wrote.status.success(), "{wrote:?}");
    let status = exec(&daemon, "calm", &["cat", "/root/after"]);
    assert_eq!(String::from_utf8_lossy(&status.stdout), "after\n");
    // Asked not to: crash-consistent, and said so.
    let told = cli.ok(&["vm", "snapshot", "create", "calm", "rough", "--no-quiesce"]);
    assert_eq!(
        told.trim(),
        "snapshot rough of calm taken (disks and memory)",
        "{told}"
    );
    let list: Value =
        serde_json::from_str(&cli.ok(&["vm", "snapshot", "list", "calm", "--output", "json"]))
            .unwrap();
    let rough = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "rough")
        .unwrap();
    assert_eq!(rough["quiesced"], false, "{list}");
    cli.ok(&["vm", "stop", "calm", "--force"]);
}

#[test]
fn a_guest_reverted_to_a_snapshot_gets_the_hosts_time() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    let cli = running_with_agent(&daemon, "timely");
    // Its clock in 2001 when the snapshot is taken, as if taken long ago.
    let set = exec(&daemon, "timely", &["date", "-s", "@1000000000"]);
    assert!(set.status.success(), "{set:?}");
    cli.ok(&["vm", "snapshot", "create", "timely", "past"]);

    cli.ok(&["vm", "snapshot", "revert", "timely", "past"]);

    let date = exec(&daemon, "timely", &["date", "+%s"]);
    let guest: i64 = String::from_utf8_lossy(&date.stdout)
        .trim()
        .parse()
        .unwrap();
    let host = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    assert!(
        (host - guest).abs() < 30,
        "the guest says {guest}, the host {host}"
    );
    cli.ok(&["vm", "stop", "timely", "--force"]);
}

#[test]
fn a_guest_frozen_by_a_daemon_that_died_mid_snapshot_is_thawed_by_its_agent() {
    let mut daemon = Daemon::start_armed(
        Path::new(QUETZALD),
        quetzal_testkit::DataDir::new(),
        "snapshot-frozen=return",
    );
    let cli = running_with_agent(&daemon, "stranded");

    // The daemon freezes the guest's filesystems and dies before it can
    // thaw them; the guest runs on, frozen.
    let taken = cli.output(&["vm", "snapshot", "create", "stranded", "never"]);
    assert!(!taken.status.success(), "{taken:?}");
    assert!(!daemon.wait_for_death().success());

    // Nothing on the host thaws it (a restarted daemon re-attaches, it
    // does not thaw): a write to the frozen disk returns only once the
    // agent's own timer (10 s) has thawed it, well inside exec's timeout.
    let daemon = daemon.restart(Path::new(QUETZALD));
    wait_until("the guest agent", || {
        show(&cli, "stranded")["agent"]["connected"] == true
    });
    let wrote = Command::new(QUETZAL)
        .args(["vm", "exec", "stranded", "--timeout", "60", "--"])
        .args([
            "sh",
            "-c",
            "echo thawed > /root/after && sync && cat /root/after",
        ])
        .env("QUETZAL_DATA_DIR", daemon.data.path())
        .output()
        .unwrap();
    assert!(wrote.status.success(), "{wrote:?}");
    assert_eq!(String::from_utf8_lossy(&wrote.stdout), "thawed\n");
    cli.ok(&["vm", "stop", "stranded", "--force"]);
}

#[test]
fn the_agent_reports_memory_and_load_and_keeps_a_declared_command_running() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    cli.ok(&[
        "vm",
        "create",
        "kept",
        "--watch-command",
        "ticker=echo $$ > /run/ticker.pid; exec sleep 100000",
        "--start",
    ]);
    wait_until("the agent's telemetry", || {
        show(&cli, "kept")["guest_memory"]["source"] == "agent"
    });

    // Memory as the guest counts it, within 5% of its own /proc/meminfo
    // (telemetry is at most 5 s old; an idle tiny guest hardly moves).
    wait_until("guest memory figures that match the guest's", || {
        let ours = show(&cli, "kept")["guest_memory"].clone();
        let own = exec(&daemon, "kept", &["cat", "/proc/meminfo"]);
        guest_memory_matches(&ours, "agent", &String::from_utf8_lossy(&own.stdout))
    });
    let vm = show(&cli, "kept");
    assert_eq!(vm["agent"]["port_connected"], true, "{vm}");
    assert_eq!(
        vm["agent"]["load"].as_array().map(Vec::len),
        Some(3),
        "{vm}"
    );
    assert_eq!(vm["services"][0]["name"], "ticker", "{vm}");
    let (_, metrics) = daemon.request("GET", "/metrics", None);
    assert!(
        metrics.contains(r#"quetzal_vm_guest_memory_used_bytes{vm="kept",source="agent"}"#),
        "{metrics}"
    );
    let (_, stats) = daemon.request("GET", "/api/v1/vms/kept/stats", None);
    let stats: Value = serde_json::from_str(&stats).unwrap();
    assert!(
        stats["guest_memory_used_bytes"].as_u64().unwrap() > 0,
        "{stats}"
    );

    // The declared command runs; killed, it is started again and the
    // host hears why.
    let pid = || {
        let out = exec(&daemon, "kept", &["cat", "/run/ticker.pid"]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    wait_until("the watched command", || !pid().is_empty());
    let first = pid();
    let killed = exec(&daemon, "kept", &["kill", "-9", &first]);
    assert!(killed.status.success(), "{killed:?}");
    wait_until("the service event", || {
        events(&daemon, "kept")
            .iter()
            .any(|(kind, _)| kind == "service")
    });
    let (_, cause) = events(&daemon, "kept")
        .into_iter()
        .find(|(kind, _)| kind == "service")
        .unwrap();
    assert_eq!(
        cause,
        "service ticker restarted: it was killed by signal 9 (restarts: 1)"
    );
    wait_until("the restarted command's pid", || {
        let now = pid();
        !now.is_empty() && now != first
    });
    cli.ok(&["vm", "stop", "kept"]);
}
