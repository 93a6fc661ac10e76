//! Memory density end to end: with `--ksm on`, the host's KSM merges the
//! pages two identical VMs hold (anonymous RAM, marked mergeable), each
//! VM's share shows in `vm show` and `/metrics`; RAM that is anonymous has
//! the balloon's free-page reporting, RAM in a file does not.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::Path;
use std::time::Duration;

use quetzal_testkit::{Cli, Daemon, GUEST_TIMEOUT, tiny, wait_until_for};
use serde_json::Value;

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");
const KSM: &str = "/sys/kernel/mm/ksm";
/// KSM paced as ksmtuned paces it scans some 40 MiB a second here, and
/// merges a page on its second look: minutes on a host full of VMs.
const MERGE_TIMEOUT: Duration = Duration::from_secs(300);

/// Puts the host's KSM knobs back as they were when it was made (KSM is
/// the host's, not the test's).
struct KsmAsItWas(Vec<(&'static str, String)>);

impl KsmAsItWas {
    fn save() -> Self {
        KsmAsItWas(
            ["pages_to_scan", "sleep_millisecs", "run"]
                .into_iter()
                .map(|knob| {
                    (
                        knob,
                        std::fs::read_to_string(format!("{KSM}/{knob}")).unwrap(),
                    )
                })
                .collect(),
        )
    }
}

impl Drop for KsmAsItWas {
    fn drop(&mut self) {
        for (knob, value) in &self.0 {
            let _ = std::fs::write(format!("{KSM}/{knob}"), value.trim());
        }
    }
}

fn show(cli: &Cli, vm: &str) -> Value {
    serde_json::from_str(&cli.ok(&["vm", "show", vm, "--output", "json"])).unwrap()
}

fn exec(cli: &Cli, vm: &str, command: &str) -> String {
    cli.ok(&["vm", "exec", vm, "--", "sh", "-c", command])
        .trim()
        .to_owned()
}

/// Whether the guest's balloon driver negotiated free-page reporting
/// (virtio feature bit 5, VIRTIO_BALLOON_F_REPORTING).
fn reports_free_pages(cli: &Cli, vm: &str) -> bool {
    let features = exec(
        cli,
        vm,
        "cat /sys/bus/virtio/drivers/virtio_balloon/virtio*/features",
    );
    features.as_bytes()[5] == b'1'
}

fn metric(daemon: &Daemon, line_start: &str) -> Option<u64> {
    let (_, text) = daemon.request("GET", "/metrics", None);
    text.lines()
        .find_map(|line| line.strip_prefix(line_start))
        .and_then(|value| value.trim().parse().ok())
}

#[test]
fn ksm_on_merges_what_two_identical_vms_hold_and_each_vm_shows_its_share() {
    tiny();
    let _ksm = KsmAsItWas::save();
    let daemon = Daemon::start_args(Path::new(QUETZALD), &["--ksm", "on"]);
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    for vm in ["twin-a", "twin-b"] {
        cli.ok(&["vm", "create", vm, "--image", "tiny", "--start"]);
    }
    cli.ok(&[
        "vm",
        "create",
        "filed",
        "--image",
        "tiny",
        "--ram-file",
        "--start",
    ]);
    // The same 16 MiB in both: each page differs from the others of its
    // VM, so what KSM merges of it, it merges across the two.
    for vm in ["twin-a", "twin-b", "filed"] {
        wait_until_for("its agent", GUEST_TIMEOUT, || {
            show(&cli, vm)["agent"]["connected"] == true
        });
    }
    for vm in ["twin-a", "twin-b"] {
        exec(&cli, vm, "seq 1 2000000 > /root/same && sync");
    }

    wait_until_for("KSM merging the twins' pages", MERGE_TIMEOUT, || {
        ["twin-a", "twin-b"].iter().all(|vm| {
            show(&cli, vm)["host_memory"]["ksm_merged_bytes"]
                .as_u64()
                .is_some_and(|bytes| bytes >= 8 << 20)
        })
    });

    let (_, host) = daemon.request("GET", "/api/v1/host", None);
    let host: Value = serde_json::from_str(&host).unwrap();
    assert_eq!(host["ksm"]["mode"], "on", "{host}");
    assert_eq!(host["ksm"]["running"], true, "{host}");
    assert!(host["ksm"]["pages_sharing"].as_u64().unwrap() > 0, "{host}");
    assert!(metric(&daemon, "quetzal_ksm_pages_sharing ").unwrap() > 0);
    assert!(metric(&daemon, "quetzal_memory_saved_bytes{by=\"ksm\"} ").unwrap() > 0);
    let merged = metric(
        &daemon,
        "quetzal_vm_memory_ksm_merged_bytes{vm=\"twin-a\"} ",
    )
    .unwrap();
    assert!(merged >= 8 << 20, "{merged}");
    let twin = show(&cli, "twin-a")["host_memory"].clone();
    assert!(twin["pss_bytes"].as_u64().unwrap() > 0, "{twin}");
    assert!(twin["template_shared_bytes"].is_null(), "{twin}");
    let human = cli.ok(&["vm", "show", "twin-a"]);
    assert!(human.contains("merged by KSM"), "{human}");

    // Anonymous RAM goes back to the host when the guest frees it; RAM
    // in a file does not (QEMU 7.2 would punch holes in the file).
    assert!(reports_free_pages(&cli, "twin-a"));
    assert!(!reports_free_pages(&cli, "filed"));
    assert_eq!(show(&cli, "filed")["ram_file"], true);

    for vm in ["twin-a", "twin-b", "filed"] {
        cli.ok(&["vm", "stop", vm, "--force"]);
        cli.ok(&["vm", "rm", vm]);
    }
}
