//! quetzald end to end: a real daemon on a temp data dir, real QEMU, real
//! guests, driven through the `quetzal` CLI and the HTTP API.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use quetzal_testkit::{Cli, Daemon, GUEST_TIMEOUT, Quetzal};
use serde_json::{Value, json};

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");

fn daemon() -> Daemon {
    Daemon::start(Path::new(QUETZALD))
}

/// Runs the CLI and expects success; returns stdout.
fn ok(daemon: &Daemon, args: &[&str]) -> String {
    Cli::new(Path::new(QUETZAL), daemon.data.path()).ok(args)
}

fn api(daemon: &Daemon, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (status, text) = daemon.request(method, path, body.as_deref());
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, value)
}

fn state(daemon: &Daemon, name: &str) -> String {
    let (_, vm) = api(daemon, "GET", &format!("/api/v1/vms/{name}"), None);
    vm["state"].as_str().unwrap_or("missing").to_owned()
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the VM's console log shows `boots` shell prompts after
/// boot (the log is appended across runs).
fn wait_for_boots(daemon: &Daemon, name: &str, boots: usize) {
    let log = daemon.data.path().join(format!("vms/{name}/console.log"));
    wait_until("the guest's shell", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.matches("tiny: up").count() >= boots && text.matches("tiny:/# ").count() >= boots
    });
}

/// The kinds of a VM's lifecycle events, in order (`address` and `agent`
/// events come whenever DHCP answers or the guest agent connects, so they
/// are left out).
fn event_kinds(daemon: &Daemon, vm: &str) -> Vec<String> {
    let (_, page) = api(
        daemon,
        "GET",
        &format!("/api/v1/events?vm={vm}&limit=1000"),
        None,
    );
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .filter(|kind| kind != "address" && kind != "agent")
        .collect()
}

/// The kinds of a VM's last `n` lifecycle events.
fn last_kinds(daemon: &Daemon, vm: &str, n: usize) -> Vec<String> {
    let kinds = event_kinds(daemon, vm);
    kinds[kinds.len().saturating_sub(n)..].to_vec()
}

#[test]
fn the_whole_lifecycle_through_the_cli() {
    let daemon = daemon();

    ok(
        &daemon,
        &[
            "vm",
            "create",
            "web",
            "--image",
            "tiny",
            "--cpus",
            "2",
            "--memory",
            "192",
            "--label",
            "team=blue",
        ],
    );
    let listed: Value =
        serde_json::from_str(&ok(&daemon, &["vm", "list", "--output", "json"])).unwrap();
    assert_eq!(listed[0]["name"], "web");
    assert_eq!(listed[0]["state"], "stopped");
    assert_eq!(listed[0]["cpus"], 2);
    assert_eq!(listed[0]["memory_mib"], 192);

    ok(&daemon, &["vm", "start", "web"]);
    let running: Value =
        serde_json::from_str(&ok(&daemon, &["vm", "list", "--output", "json"])).unwrap();
    assert_eq!(running[0]["state"], "running");
    let filtered: Value = serde_json::from_str(&ok(
        &daemon,
        &["vm", "list", "--label", "team=red", "--output", "json"],
    ))
    .unwrap();
    assert_eq!(filtered, json!([]));

    wait_for_boots(&daemon, "web", 1);
    ok(&daemon, &["vm", "pause", "web"]);
    assert_eq!(state(&daemon, "web"), "paused");
    ok(&daemon, &["vm", "resume", "web"]);
    assert_eq!(state(&daemon, "web"), "running");
    ok(&daemon, &["vm", "restart", "web"]);
    assert_eq!(state(&daemon, "web"), "running");
    wait_for_boots(&daemon, "web", 2);
    ok(&daemon, &["vm", "stop", "web"]);
    assert_eq!(state(&daemon, "web"), "stopped");
    ok(&daemon, &["vm", "rm", "web"]);

    assert_eq!(
        ok(&daemon, &["vm", "list", "--output", "json"]).trim(),
        "[]"
    );
    assert!(!daemon.data.path().join("vms/web").exists());
    let kinds = event_kinds(&daemon, "web");
    let expected = [
        "created", "starting", "started", "paused", "resumed", "stopping", "stopped", "starting",
        "started", "stopping", "stopped", "deleted",
    ];
    assert_eq!(kinds, expected);
}

#[test]
fn a_graceful_stop_lets_the_guest_power_off() {
    let daemon = daemon();
    ok(&daemon, &["vm", "create", "calm", "--start"]);
    let log = daemon.data.path().join("vms/calm/console.log");
    wait_for_boots(&daemon, "calm", 1);

    ok(&daemon, &["vm", "stop", "calm", "--timeout", "60"]);

    let (_, page) = api(&daemon, "GET", "/api/v1/events?vm=calm", None);
    let last = page["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["cause"], "stopped by request");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("reboot: Power down")
    );
}

#[test]
fn ten_vms_created_and_started_concurrently_all_run() {
    let daemon = daemon();
    let names: Vec<String> = (0..10).map(|i| format!("vm{i}")).collect();

    std::thread::scope(|scope| {
        for name in &names {
            let daemon = &daemon;
            scope.spawn(move || {
                let (status, body) = api(
                    daemon,
                    "POST",
                    "/api/v1/vms",
                    Some(json!({ "name": name, "memory_mib": 128 })),
                );
                assert_eq!(status, 201, "{body}");
                let (status, body) =
                    api(daemon, "POST", &format!("/api/v1/vms/{name}/start"), None);
                assert_eq!(status, 200, "{body}");
            });
        }
    });

    let (_, vms) = api(&daemon, "GET", "/api/v1/vms", None);
    let states: Vec<&str> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["running"; 10]);
    let pids: std::collections::BTreeSet<u64> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 10, "ten QEMU processes");
    for name in &names {
        wait_for_boots(&daemon, name, 1);
    }
}

#[test]
fn conflicting_concurrent_requests_get_one_success_and_clean_conflicts() {
    let daemon = daemon();
    ok(&daemon, &["vm", "create", "busy", "--start"]);

    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|_| scope.spawn(|| api(&daemon, "POST", "/api/v1/vms/busy/pause", None)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .map(|(status, body)| {
                if status == 409 {
                    assert_eq!(body["error"]["code"], "conflict");
                }
                status
            })
            .collect()
    });

    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(state(&daemon, "busy"), "paused");
}

#[test]
fn restart_policy_brings_back_a_killed_qemu() {
    let daemon = daemon();
    ok(
        &daemon,
        &[
            "vm",
            "create",
            "phoenix",
            "--restart",
            "on-failure",
            "--start",
        ],
    );
    let (_, before) = api(&daemon, "GET", "/api/v1/vms/phoenix", None);
    let pid = before["pid"].as_u64().unwrap();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    wait_until("the restart", || {
        let (_, vm) = api(&daemon, "GET", "/api/v1/vms/phoenix", None);
        vm["state"] == "running" && vm["pid"].as_u64() != Some(pid)
    });
    let (_, after) = api(&daemon, "GET", "/api/v1/vms/phoenix", None);
    assert_eq!(after["restarts"], 1);
    assert_eq!(
        last_kinds(&daemon, "phoenix", 4),
        ["crashed", "restarting", "starting", "restarted"]
    );
}

#[test]
fn a_guest_kernel_panic_is_a_crash_and_the_restart_policy_brings_it_back() {
    let daemon = daemon();
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    ok(
        &daemon,
        &[
            "vm",
            "create",
            "brittle",
            "--restart",
            "on-failure",
            "--start",
        ],
    );
    let (_, before) = api(&daemon, "GET", "/api/v1/vms/brittle", None);
    let pid = before["pid"].as_u64().unwrap();
    // At a prompt (the shell answers), then a panic typed at it: the
    // kernel reports it through pvpanic and QEMU stays alive, so only the
    // node's handling of GUEST_PANICKED brings the guest back.
    cli.in_guest("brittle", "true");
    let mut console = Quetzal::spawn(
        Path::new(QUETZAL),
        daemon.data.path(),
        &["vm", "console", "brittle"],
    );
    console.send_line("echo c > /proc/sysrq-trigger");

    wait_until("the restart", || {
        let (_, vm) = api(&daemon, "GET", "/api/v1/vms/brittle", None);
        vm["state"] == "running" && vm["pid"].as_u64() != Some(pid)
    });
    drop(console);
    assert_eq!(
        last_kinds(&daemon, "brittle", 4),
        ["crashed", "restarting", "starting", "restarted"]
    );
    let (_, page) = api(&daemon, "GET", "/api/v1/events?vm=brittle&limit=100", None);
    let crashed = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "crashed")
        .unwrap()
        .clone();
    assert!(
        crashed["cause"]
            .as_str()
            .unwrap()
            .contains("the guest kernel panicked"),
        "{crashed}"
    );
    // A new boot: its shell answers again.
    assert_eq!(cli.in_guest("brittle", "echo back").trim(), "back");
    ok(&daemon, &["vm", "stop", "brittle", "--force"]);
}

#[test]
fn a_vm_with_policy_never_stays_crashed() {
    let daemon = daemon();
    ok(&daemon, &["vm", "create", "fragile", "--start"]);
    let (_, vm) = api(&daemon, "GET", "/api/v1/vms/fragile", None);

    let pid = i32::try_from(vm["pid"].as_u64().unwrap()).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    wait_until("the crash to be recorded", || {
        state(&daemon, "fragile") == "crashed"
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(state(&daemon, "fragile"), "crashed");
}

#[test]
fn daemon_kill_9_and_restart_keeps_vms_running_with_their_console_history() {
    let daemon = daemon();
    ok(&daemon, &["vm", "create", "steady", "--start"]);
    wait_for_boots(&daemon, "steady", 1);
    let (_, before) = api(&daemon, "GET", "/api/v1/vms/steady", None);

    let daemon = daemon.restart(Path::new(QUETZALD));

    let (_, after) = api(&daemon, "GET", "/api/v1/vms/steady", None);
    assert_eq!(after["state"], "running");
    assert_eq!(after["pid"], before["pid"], "the same QEMU");
    assert_eq!(event_kinds(&daemon, "steady").last().unwrap(), "reattached");
    let mut console = Quetzal::spawn(
        Path::new(QUETZAL),
        daemon.data.path(),
        &["vm", "console", "steady"],
    );
    console.stdout.wait_for("tiny: up, root on /dev/vda");
    let output = console.command("echo still-$((20 + 1))-here");
    assert_eq!(output, "still-21-here");
}

#[test]
fn a_guest_flooding_its_console_cannot_grow_the_log_without_bound() {
    let daemon = daemon();
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    ok(&daemon, &["vm", "create", "loud", "--start"]);

    // 1.25 MiB of output, more than the 1 MiB past which the daemon cuts
    // a log (a serial console under TCG prints some 55 KB/s: a test of
    // more would take minutes).
    let flood = "yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c 1310720; echo; echo flooded";
    let printed = cli.in_guest("loud", flood);

    assert!(
        printed.ends_with("flooded"),
        "{}",
        &printed[printed.len() - 200..]
    );
    let log = daemon.data.path().join("vms/loud/console.log");
    let size = std::fs::metadata(&log).unwrap().len();
    // Cut once past 1 MiB to its last 256 KiB, then grown by the rest:
    // less than what the guest printed.
    assert!(size < 1 << 20, "the console log is {size} bytes");
    // What a new viewer gets still ends with the latest output, and the
    // shell still answers.
    assert_eq!(cli.in_guest("loud", "echo calm"), "calm");
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    assert!(
        text.contains("flooded") && text.contains("calm"),
        "{}",
        &text[text.len() - 300..]
    );
}

#[test]
fn a_vm_takes_eight_console_viewers_and_refuses_the_ninth_clearly() {
    let daemon = daemon();
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    ok(&daemon, &["vm", "create", "watched", "--start"]);
    wait_for_boots(&daemon, "watched", 1);

    let viewers: Vec<Quetzal> = (0..8)
        .map(|_| {
            let viewer = Quetzal::spawn(
                Path::new(QUETZAL),
                daemon.data.path(),
                &["vm", "console", "watched"],
            );
            // Connected once the history arrives.
            viewer.stdout.wait_for("tiny: up");
            viewer
        })
        .collect();

    cli.fails(
        &["vm", "console", "watched"],
        "VM watched has 8 console and screen viewers already; close one first",
    );
    drop(viewers);
}

#[test]
fn a_vm_that_died_while_the_daemon_was_down_is_marked_and_restarted_per_policy() {
    let mut daemon = daemon();
    ok(
        &daemon,
        &[
            "vm",
            "create",
            "orphan",
            "--restart",
            "on-failure",
            "--start",
        ],
    );
    let (_, before) = api(&daemon, "GET", "/api/v1/vms/orphan", None);
    daemon.kill();
    let pid = i32::try_from(before["pid"].as_u64().unwrap()).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    quetzal_testkit::assert_no_process_mentions(&format!(
        "{}/vms/orphan/qmp.sock",
        daemon.data.path().display()
    ));

    let daemon = daemon.restart(Path::new(QUETZALD));

    wait_until("the policy restart", || {
        state(&daemon, "orphan") == "running"
    });
    let kinds = event_kinds(&daemon, "orphan");
    assert!(kinds.contains(&"crashed".to_owned()), "{kinds:?}");
    assert_eq!(kinds.last().unwrap(), "restarted");
}

#[test]
fn the_event_stream_shows_each_change_as_it_happens() {
    let daemon = daemon();
    let mut stream = std::os::unix::net::UnixStream::connect(daemon.socket()).unwrap();
    std::io::Write::write_all(
        &mut stream,
        b"GET /api/v1/events/stream HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    let transcript = quetzal_testkit::Transcript::read_from(stream);
    transcript.wait_for("200 OK");

    ok(&daemon, &["vm", "create", "watched", "--start"]);
    ok(&daemon, &["vm", "pause", "watched"]);

    for kind in ["created", "starting", "started", "paused"] {
        transcript.wait_for(&format!("\"kind\":\"{kind}\""));
    }
}

#[test]
fn metrics_are_prometheus_text_with_per_vm_figures() {
    let daemon = daemon();
    ok(&daemon, &["vm", "create", "measured", "--start"]);
    ok(&daemon, &["vm", "create", "idle"]);

    let (status, text) = daemon.request("GET", "/metrics", None);

    assert_eq!(status, 200);
    let mut declared = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            declared.insert(parts.next().unwrap().to_owned());
            assert!(matches!(parts.next(), Some("gauge" | "counter")), "{line}");
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let name = series.split('{').next().unwrap();
        assert!(declared.contains(name), "{name} has no TYPE line");
        assert!(value.parse::<f64>().is_ok(), "{line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            for pair in labels[1..labels.len() - 1].split(',') {
                let (key, quoted) = pair.split_once('=').unwrap();
                assert!(
                    key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                assert!(quoted.starts_with('"') && quoted.ends_with('"'), "{line}");
            }
        }
    }
    assert!(text.contains("quetzal_vms{state=\"running\"} 1\n"));
    assert!(text.contains("quetzal_vms{state=\"stopped\"} 1\n"));
    assert!(text.contains("quetzal_vm_state{vm=\"measured\",state=\"running\"} 1\n"));
    assert!(text.contains("quetzal_vm_resident_bytes{vm=\"measured\"} "));
    assert!(text.contains("quetzal_daemon_up 1\n"));
}

#[test]
fn a_guest_that_ignores_the_power_button_is_forced_off_after_the_timeout() {
    let daemon = daemon();
    ok(&daemon, &["vm", "create", "stubborn", "--start"]);
    let mut console = Quetzal::spawn(
        Path::new(QUETZAL),
        daemon.data.path(),
        &["vm", "console", "stubborn"],
    );
    console.stdout.wait_for("tiny:/# ");
    assert_eq!(console.command("killall acpid && echo deaf"), "deaf");

    let started = Instant::now();
    ok(&daemon, &["vm", "stop", "stubborn", "--timeout", "2"]);

    assert!(started.elapsed() < GUEST_TIMEOUT);
    assert_eq!(state(&daemon, "stubborn"), "stopped");
    let (_, page) = api(&daemon, "GET", "/api/v1/events?vm=stubborn", None);
    let last = page["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        last["cause"],
        "forced off: the guest did not shut down within 2s"
    );
}

#[test]
fn quetzal_up_starts_the_daemon_and_a_demo_vm() {
    let data = quetzal_testkit::DataDir::new();
    let marker = data.path().display().to_string();
    // The dashboard's listener: a port free right now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let up = Quetzal::spawn_with_env(
        Path::new(QUETZAL),
        data.path(),
        &["up"],
        &[("QUETZAL_LISTEN", &listen)],
    );
    up.stderr.wait_for("the node is up");
    up.stderr
        .wait_for(&format!("dashboard: https://127.0.0.1:{port}/#token="));
    let fingerprint =
        quetzal_node::tls::fingerprint_of_file(&data.path().join("tls/node.crt")).unwrap();
    up.stderr
        .wait_for(&format!("SHA-256 fingerprint {fingerprint}"));

    let listed = Command::new(QUETZAL)
        .args(["vm", "list", "--output", "json"])
        .env("QUETZAL_DATA_DIR", data.path())
        .output()
        .unwrap();
    let vms: Value = serde_json::from_slice(&listed.stdout).unwrap();

    assert_eq!(vms[0]["name"], "demo");
    assert_eq!(vms[0]["state"], "running");
    up.signal(nix::sys::signal::Signal::SIGINT);
    up.stderr.wait_for("quetzald stopped; VMs keep running");
    let mut up = up;
    assert_eq!(up.wait(), 0);
    for pid in quetzal_testkit::processes_mentioning(&marker) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    quetzal_testkit::assert_no_process_mentions(&marker);
    quetzal_testkit::remove_cgroups(data.path());
    let removed = Command::new(QUETZALD)
        .arg("--data-dir")
        .arg(data.path())
        .arg("--remove-networks")
        .status()
        .unwrap();
    assert!(removed.success());
}

#[test]
fn restart_policy_always_brings_back_a_guest_that_powered_itself_off() {
    let daemon = daemon();
    ok(
        &daemon,
        &["vm", "create", "eternal", "--restart", "always", "--start"],
    );
    wait_for_boots(&daemon, "eternal", 1);
    let mut console = Quetzal::spawn(
        Path::new(QUETZAL),
        daemon.data.path(),
        &["vm", "console", "eternal"],
    );
    console.stdout.wait_for("tiny:/# ");

    console.send_line("poweroff");

    wait_for_boots(&daemon, "eternal", 2);
    assert_eq!(
        last_kinds(&daemon, "eternal", 4),
        ["stopped", "restarting", "starting", "restarted"]
    );
    assert_eq!(state(&daemon, "eternal"), "running");
    let (_, vm) = api(&daemon, "GET", "/api/v1/vms/eternal", None);
    assert_eq!(vm["restarts"], 1);
}
