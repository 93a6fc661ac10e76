//! The debian image end to end: a real Debian 12 guest booted by GRUB
//! from its own disk under QEMU, its cloud-init fed by the node's NoCloud
//! seed, reached with real `ssh` over its managed network; then a clone
//! of it, which cloud-init makes a new machine (name, host keys), and
//! which quetzal-agent's clone hook (`vm reidentify`) makes new again.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use quetzal_testkit::{
    Cli, DEBIAN_TIMEOUT, Daemon, DataDir, Quetzal, assert_no_process_mentions, debian,
    guest_memory_matches, wait_until_for,
};
use serde_json::Value;

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");

fn show(cli: &Cli, name: &str) -> Value {
    serde_json::from_str(&cli.ok(&["vm", "show", name, "--output", "json"])).unwrap()
}

/// A fresh ed25519 key pair in `dir`: the private key's path.
fn key_pair(dir: &Path, name: &str) -> PathBuf {
    let key = dir.join(name);
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success());
    key
}

fn ssh_with(options: &[&str], address: &str, command: &str) -> Output {
    // A connection caught by an address change (the clone hook renews the
    // lease) is never answered again: `timeout` ends what ConnectTimeout
    // and the keep-alives do not cover (the key exchange).
    Command::new("timeout")
        .args(["--kill-after=5", "60", "ssh"])
        .args([
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
        ])
        .args(options)
        .arg(format!("debian@{address}"))
        .arg(command)
        .output()
        .unwrap()
}

fn ssh(key: &Path, address: &str, command: &str) -> String {
    let key = key.display().to_string();
    let output = ssh_with(&["-i", &key], address, command);
    assert!(
        output.status.success(),
        "ssh {command}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Waits until VM `name` has an address, accepts `key` over SSH and its
/// cloud-init is done (as a user would before using it); returns the
/// address.
fn ssh_ready(cli: &Cli, name: &str, key: &Path) -> String {
    let mut address = String::new();
    let key_arg = key.display().to_string();
    wait_until_for("the guest to accept SSH", DEBIAN_TIMEOUT, || {
        let vm = show(cli, name);
        match vm["addresses"][0].as_str() {
            Some(found) => {
                address = found.to_owned();
                ssh_with(&["-i", &key_arg], &address, "true")
                    .status
                    .success()
            }
            None => false,
        }
    });
    address
}

/// `quetzal vm exec`'s output; on failure, what the daemon logged about
/// the agent says why.
fn exec(daemon: &Daemon, cli: &Cli, name: &str, command: &[&str]) -> String {
    let mut args = vec!["vm", "exec", name, "--"];
    args.extend_from_slice(command);
    let output = cli.output(&args);
    if !output.status.success() {
        let log = daemon.stderr.text();
        let agent: Vec<&str> = log.lines().filter(|l| l.contains("agent")).collect();
        panic!(
            "vm exec {command:?}: {}\ndaemon, on the agent:\n{}",
            String::from_utf8_lossy(&output.stderr),
            agent.join("\n")
        );
    }
    String::from_utf8(output.stdout).unwrap()
}

/// Run in the guest with its agent stopped: floods both agent channels.
const FLOOD: &str = "systemctl stop quetzal-agent
for port in org.qemu.guest_agent.0 org.quetzal.agent.0; do
  (head -c 16M /dev/urandom
   printf '{\"return\": \"'; head -c 8M /dev/zero | tr '\\0' a; printf '\"}\\n'
   yes '{\"telemetry\":{\"memory_total_bytes\":1,\"memory_used_bytes\":1,\"load\":[0,0,0],\"uptime_secs\":1}}' | head -n 50000
   yes '{\"service\":{\"name\":\"spam\",\"what\":\"restarted\",\"detail\":\"x\",\"restarts\":1}}' | head -n 5000
  ) > /dev/virtio-ports/$port &
done
wait
echo done > /run/flood-done
systemctl start quetzal-agent";

#[test]
fn a_debian_vm_takes_its_key_name_and_user_data_and_a_clone_becomes_a_new_machine() {
    debian();
    let daemon = Daemon::start(Path::new(QUETZALD));
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    let key = key_pair(daemon.data.path(), "alice");
    let user_data = daemon.data.path().join("user-data");
    std::fs::write(
        &user_data,
        "#cloud-config\nwrite_files:\n  - path: /etc/quetzal-test\n    content: from user-data\n\
         \x20 - path: /etc/systemd/system/demo.service\n    content: |\n\
         \x20     [Service]\n      ExecStart=/bin/sleep infinity\n",
    )
    .unwrap();

    cli.ok(&[
        "vm",
        "create",
        "deb-1",
        "--image",
        "debian",
        "--cpus",
        "2",
        "--memory",
        "1024",
        "--ssh-key",
        &format!("{}.pub", key.display()),
        "--user-data",
        user_data.to_str().unwrap(),
        "--watch-unit",
        "demo.service",
        "--start",
    ]);
    let address = ssh_ready(&cli, "deb-1", &key);

    // The key is the image's default user's, with sudo; the guest is
    // named after the VM; the user-data ran.
    assert_eq!(ssh(&key, &address, "hostname").trim(), "deb-1");
    assert_eq!(ssh(&key, &address, "sudo -n id -u").trim(), "0");
    assert_eq!(
        ssh(&key, &address, "cat /etc/quetzal-test").trim(),
        "from user-data"
    );
    // GRUB booted it from its disk (no -kernel: the command line is
    // GRUB's, with the image's kernel).
    assert!(
        ssh(&key, &address, "cat /proc/cmdline").contains("BOOT_IMAGE=/vmlinuz"),
        "not booted by GRUB"
    );
    // No password login, and another key is refused.
    let password = ssh_with(
        &["-o", "PreferredAuthentications=password"],
        &address,
        "true",
    );
    assert!(!password.status.success());
    assert!(
        String::from_utf8_lossy(&password.stderr).contains("Permission denied (publickey)"),
        "{}",
        String::from_utf8_lossy(&password.stderr)
    );
    let stranger = key_pair(daemon.data.path(), "mallory");
    let stranger = stranger.display().to_string();
    assert!(
        !ssh_with(&["-i", &stranger], &address, "true")
            .status
            .success()
    );
    // What the node says matches: the key's fingerprint, the host name,
    // the address (from the agent in the guest, which also runs commands).
    let vm = show(&cli, "deb-1");
    let fingerprint = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(format!("{}.pub", key.display()))
        .output()
        .unwrap();
    let fingerprint = String::from_utf8(fingerprint.stdout).unwrap();
    assert_eq!(
        vm["cloud_init"]["ssh_keys"][0].as_str().unwrap(),
        fingerprint.split_whitespace().nth(1).unwrap()
    );
    assert_eq!(vm["cloud_init"]["user"], "debian");
    assert_eq!(vm["cloud_init"]["hostname"], "deb-1");
    assert_eq!(vm["agent"]["hostname"], "deb-1", "{vm}");
    assert!(exec(&daemon, &cli, "deb-1", &["cat", "/etc/os-release"]).contains("bookworm"));
    // The root filesystem's use as the agent says it, within 5% of what
    // the guest's own df says.
    wait_until_for("the guest's filesystems", DEBIAN_TIMEOUT, || {
        show(&cli, "deb-1")["agent"]["filesystems"]
            .as_array()
            .is_some_and(|list| list.iter().any(|fs| fs["mountpoint"] == "/"))
    });
    let df = exec(
        &daemon,
        &cli,
        "deb-1",
        &["df", "-B1", "--output=used,size", "/"],
    );
    let figures: Vec<f64> = df
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let vm = show(&cli, "deb-1");
    let root = vm["agent"]["filesystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|fs| fs["mountpoint"] == "/")
        .unwrap()
        .clone();
    let near = |ours: &Value, theirs: f64| (ours.as_f64().unwrap() - theirs).abs() <= theirs * 0.05;
    assert!(
        near(&root["used_bytes"], figures[0]),
        "{root} against df {figures:?}"
    );
    assert!(
        near(&root["total_bytes"], figures[1]),
        "{root} against df {figures:?}"
    );
    let (_, metrics) = daemon.request("GET", "/metrics", None);
    assert!(
        metrics.contains(r#"quetzal_vm_guest_filesystem_used_bytes{vm="deb-1",mountpoint="/"}"#),
        "{metrics}"
    );
    // Memory as the guest counts it (quetzal-agent's telemetry), within
    // 5% of its own /proc/meminfo.
    wait_until_for(
        "guest memory that matches the guest's",
        DEBIAN_TIMEOUT,
        || {
            let ours = show(&cli, "deb-1")["guest_memory"].clone();
            let own = exec(&daemon, &cli, "deb-1", &["cat", "/proc/meminfo"]);
            guest_memory_matches(&ours, "agent", &own)
        },
    );

    // The declared unit (which has no Restart= of its own) is started by
    // the agent's watchdog; killed, it is back, and the host is told.
    let main_pid = || {
        exec(
            &daemon,
            &cli,
            "deb-1",
            &["systemctl", "show", "-P", "MainPID", "demo"],
        )
    };
    wait_until_for("the watched unit running", DEBIAN_TIMEOUT, || {
        main_pid().trim().parse::<u32>().is_ok_and(|pid| pid > 0)
    });
    let first = main_pid();
    exec(
        &daemon,
        &cli,
        "deb-1",
        &["systemctl", "kill", "-s", "KILL", "demo"],
    );
    let killed_at = std::time::Instant::now();
    let restarted =
        |events: &str| events.contains("service demo restarted: it was failed (signal)");
    wait_until_for("the watchdog's event", DEBIAN_TIMEOUT, || {
        restarted(&cli.ok(&["events"]))
    });
    eprintln!(
        "the killed unit's restart was reported {:?} after the kill",
        killed_at.elapsed()
    );
    let second = main_pid();
    assert!(
        second.trim().parse::<u32>().unwrap() > 0 && second != first,
        "{first} then {second}"
    );

    let failing = cli.output(&[
        "vm",
        "exec",
        "deb-1",
        "--",
        "sh",
        "-c",
        "echo no >&2; exit 7",
    ]);
    assert_eq!(failing.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&failing.stderr), "no\n");
    // A 1 MiB file through quetzal-agent, in and out, unchanged.
    let original = daemon.data.path().join("random.bin");
    let random: Vec<u8> = (0..1u32 << 20)
        .map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[2])
        .collect();
    std::fs::write(&original, &random).unwrap();
    cli.ok(&[
        "vm",
        "cp",
        original.to_str().unwrap(),
        "deb-1:/tmp/random.bin",
    ]);
    let back = daemon.data.path().join("back.bin");
    cli.ok(&["vm", "cp", "deb-1:/tmp/random.bin", back.to_str().unwrap()]);
    assert_eq!(std::fs::read(&back).unwrap(), random);
    let sha = quetzal_image::sha256_bytes(&random);
    assert!(exec(&daemon, &cli, "deb-1", &["sha256sum", "/tmp/random.bin"]).starts_with(&sha));
    let host_key = exec(
        &daemon,
        &cli,
        "deb-1",
        &["cat", "/etc/ssh/ssh_host_ed25519_key.pub"],
    );

    // A hostile guest: with its agent stopped, something else floods both
    // channels with random bytes, an endless string, and thousands of
    // well-formed messages (telemetry, service events). The daemon keeps
    // answering, its memory stays bounded, the events are rate-limited,
    // and the agent is back once it runs again.
    let resident = || {
        let (_, metrics) = daemon.request("GET", "/metrics", None);
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("quetzal_daemon_resident_bytes "))
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    let before = resident();
    // The flood stops the agent that runs this very command: its answer
    // may never come, so only the flood's own marker below says it ran.
    let _ = cli.output(&[
        "vm",
        "exec",
        "deb-1",
        "--",
        "systemd-run",
        "--unit=flood",
        "sh",
        "-c",
        FLOOD,
    ]);
    let mut peak = before;
    wait_until_for("the flood's end", DEBIAN_TIMEOUT, || {
        // The API answers all along.
        peak = peak.max(resident());
        cli.output(&["vm", "exec", "deb-1", "--", "cat", "/run/flood-done"])
            .stdout
            .starts_with(b"done")
    });
    assert!(
        peak - before < 64.0 * 1024.0 * 1024.0,
        "quetzald grew from {before} to {peak} bytes"
    );
    let log = cli.ok(&["events"]);
    assert!(
        log.contains("guest agent lost"),
        "the flood never reached the host: {log}"
    );
    let spam = log.matches("service spam").count();
    assert!(spam <= 25, "{spam} spam events logged");
    assert!(exec(&daemon, &cli, "deb-1", &["echo", "back"]).contains("back"));

    // A quiesced snapshot while a process keeps writing to an SQLite
    // database; after going back to it the database is whole. (Readers
    // and the writer wait for each other's locks: `.timeout`.)
    let sql =
        |statement: &str| format!("sqlite3 -cmd '.timeout 5000' /var/tmp/app.db '{statement}'");
    ssh(&key, &address, &sql("CREATE TABLE t (n INTEGER, pad TEXT)"));
    ssh(
        &key,
        &address,
        "(nohup sh -c 'i=0; while :; do sqlite3 -cmd \".timeout 5000\" /var/tmp/app.db \
           \"INSERT INTO t VALUES ($i, hex(randomblob(512)))\"; i=$((i+1)); done' \
           >/dev/null 2>&1 &)",
    );
    let key_arg = key.display().to_string();
    wait_until_for("rows in the database", DEBIAN_TIMEOUT, || {
        let count = ssh_with(&["-i", &key_arg], &address, &sql("SELECT count(*) FROM t"));
        String::from_utf8_lossy(&count.stdout)
            .trim()
            .parse::<u64>()
            .is_ok_and(|n| n > 20)
    });
    cli.ok(&["vm", "snapshot", "create", "deb-1", "writing"]);
    let list: Value =
        serde_json::from_str(&cli.ok(&["vm", "snapshot", "list", "deb-1", "--output", "json"]))
            .unwrap();
    assert_eq!(list["snapshots"][0]["quiesced"], true, "{list}");
    cli.ok(&["vm", "snapshot", "revert", "deb-1", "writing"]);
    let address = ssh_ready(&cli, "deb-1", &key);
    assert_eq!(
        ssh(&key, &address, &sql("PRAGMA integrity_check")).trim(),
        "ok"
    );
    // (The bracket keeps pkill from matching this very command's shell.)
    ssh(&key, &address, "pkill -f '[I]NSERT INTO'");

    // A clone of it is a new instance to cloud-init: its own name and
    // host keys; the key still works.
    cli.ok(&["vm", "stop", "deb-1"]);
    cli.ok(&["template", "create", "deb-base", "--from", "deb-1"]);
    cli.ok(&[
        "vm",
        "create",
        "deb-2",
        "--template",
        "deb-base",
        "--cpus",
        "2",
        "--memory",
        "1024",
        "--start",
    ]);
    let address = ssh_ready(&cli, "deb-2", &key);
    assert_eq!(ssh(&key, &address, "hostname").trim(), "deb-2");
    let clone_key = exec(
        &daemon,
        &cli,
        "deb-2",
        &["cat", "/etc/ssh/ssh_host_ed25519_key.pub"],
    );
    assert_ne!(
        clone_key, host_key,
        "the clone kept its template's host key"
    );

    // Made a new machine once more, by quetzal-agent's clone hook (what an
    // instant clone, which cloud-init does not see, gets): every step
    // reported, a new machine-id and host key, its name kept, and the
    // user's key still lets them in.
    let machine_id = exec(&daemon, &cli, "deb-2", &["cat", "/etc/machine-id"]);
    let told = cli.ok(&["vm", "reidentify", "deb-2"]);
    assert_eq!(
        told.lines().collect::<Vec<_>>(),
        [
            "entropy: ok",
            "clock: ok",
            "machine-id: ok",
            "hostname: ok",
            "ssh-host-keys: ok",
            "mac: ok",
            "dhcp: ok"
        ],
        "{told}"
    );
    assert_ne!(
        exec(&daemon, &cli, "deb-2", &["cat", "/etc/machine-id"]),
        machine_id
    );
    let new_key = exec(
        &daemon,
        &cli,
        "deb-2",
        &["cat", "/etc/ssh/ssh_host_ed25519_key.pub"],
    );
    assert!(new_key.starts_with("ssh-ed25519 "), "{new_key}");
    assert_ne!(new_key, clone_key);
    let address = ssh_ready(&cli, "deb-2", &key);
    assert_eq!(ssh(&key, &address, "hostname").trim(), "deb-2");
    cli.ok(&["vm", "stop", "deb-2"]);
    // Stopped, it has no agent to ask: one clear line.
    cli.fails(&["vm", "reidentify", "deb-2"], "agent");
}

#[test]
fn keys_and_user_data_that_cloud_init_cannot_use_are_refused() {
    debian();
    let daemon = Daemon::start_in(Path::new(QUETZALD), DataDir::new(), None);
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    let key = key_pair(daemon.data.path(), "bob");
    let dir = daemon.data.path();
    let public = format!("{}.pub", key.display());
    let not_a_key = dir.join("notes.txt");
    std::fs::write(&not_a_key, "hello\n").unwrap();
    let yaml_without_header = dir.join("plain.yaml");
    std::fs::write(&yaml_without_header, "packages: [sqlite3]\n").unwrap();
    let broken_yaml = dir.join("broken.yaml");
    std::fs::write(&broken_yaml, "#cloud-config\nruncmd: [unclosed\n").unwrap();
    let create = |extra: &[&str]| {
        let mut args = vec!["vm", "create", "bad", "--image", "debian"];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let fails = |extra: &[&str], says: &str| {
        let args = create(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli.fails(&args, says);
    };

    fails(&["--ssh-key", key.to_str().unwrap()], "pass the .pub file");
    fails(
        &["--ssh-key", not_a_key.to_str().unwrap()],
        "not an SSH public key",
    );
    fails(
        &["--ssh-key", "/nonexistent/key.pub"],
        "cannot read --ssh-key",
    );
    fails(
        &["--user-data", yaml_without_header.to_str().unwrap()],
        "#cloud-config",
    );
    fails(
        &["--user-data", broken_yaml.to_str().unwrap()],
        "not valid YAML",
    );
    cli.fails(
        &[
            "vm",
            "create",
            "bad",
            "--image",
            "tiny",
            "--ssh-key",
            &public,
        ],
        "image tiny has no cloud-init",
    );
    // The API says the same to any client, with a stable code.
    let (status, body) = daemon.request(
        "POST",
        "/api/v1/vms",
        Some(r#"{"name":"bad","image":"debian","ssh_keys":["ssh-ed25519 AAAA"]}"#),
    );
    assert_eq!(status, 400, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    // Nothing was made.
    assert_eq!(cli.ok(&["vm", "list", "--output", "json"]).trim(), "[]");
}

#[test]
fn quetzal_run_boots_the_debian_image_by_its_kernel_to_a_login_prompt() {
    debian();
    let data = DataDir::new();
    let vm = Quetzal::spawn(
        Path::new(QUETZAL),
        data.path(),
        &[
            "run", "--image", "debian", "--cpus", "2", "--memory", "1024",
        ],
    );

    let login = vm.stdout.wait_for_after(0, "login: ", DEBIAN_TIMEOUT);

    // The image's kernel and command line, handed to QEMU: GRUB, which
    // would add BOOT_IMAGE=, did not run.
    let console = vm.stdout.text();
    assert!(
        console.contains("Command line: root=LABEL=debian-root ro"),
        "{}",
        &console[..login.min(console.len())]
    );
    assert!(!console.contains("BOOT_IMAGE="));
    vm.signal(nix::sys::signal::Signal::SIGTERM);
    let mut vm = vm;
    assert_eq!(vm.wait(), 128 + 15);
    assert_no_process_mentions(&data.path().display().to_string());
}
