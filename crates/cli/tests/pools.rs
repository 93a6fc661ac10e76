//! Desktop pools end to end, with instant clones of a warm tiny template:
//! spares kept ready and refilled, assigns handing out different running
//! desktops, a release that resets (what the user wrote is gone), a new
//! template replacing the spares, and all of it across a daemon restart.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use quetzal_testkit::{Cli, Daemon, DataDir, browser_script, tiny, wait_until_for};
use serde_json::Value;

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");
/// Making a spare is an instant clone plus its clone hook: seconds, but
/// TCG on a busy 2-core host can be slow.
const REFILL: Duration = Duration::from_secs(180);

fn show(cli: &Cli, vm: &str) -> Value {
    serde_json::from_str(&cli.ok(&["vm", "show", vm, "--output", "json"])).unwrap()
}

fn pool(cli: &Cli) -> Value {
    serde_json::from_str(&cli.ok(&["pool", "show", "lab", "--output", "json"])).unwrap()
}

/// The pool's spares that are running, with the template each came from.
fn ready_spares(cli: &Cli) -> Vec<(String, String)> {
    pool(cli)["desktops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["state"] == "spare" && d["vm_state"] == "running")
        .map(|d| {
            (
                d["vm"].as_str().unwrap().to_owned(),
                d["template"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn assign(cli: &Cli, user: &str) -> String {
    let out = cli.ok(&["pool", "assign", "lab", "--user", user, "--output", "json"]);
    let assigned: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(assigned["user"], user);
    let vm = assigned["vm"].as_str().unwrap().to_owned();
    assert_eq!(assigned["path"], format!("/#/desktop/{vm}"));
    vm
}

/// Runs `command` in a desktop's guest, once its agent is connected (a
/// desktop made for its user in the assign may have just restored).
fn exec(cli: &Cli, vm: &str, command: &str) -> String {
    wait_until_for("its agent", REFILL, || {
        show(cli, vm)["agent"]["connected"] == true
    });
    cli.ok(&["vm", "exec", vm, "--", "sh", "-c", command])
        .trim()
        .to_owned()
}

/// A running tiny VM made into warm template `name`.
fn warm_template(cli: &Cli, name: &str) {
    let source = format!("{name}-source");
    cli.ok(&["vm", "create", &source, "--image", "tiny", "--ram-file"]);
    cli.ok(&["vm", "start", &source]);
    cli.ok(&["template", "create", name, "--from", &source, "--warm"]);
}

#[test]
fn a_pool_hands_out_ready_desktops_resets_them_and_takes_a_new_template() {
    tiny();
    let daemon = Daemon::start(Path::new(QUETZALD));
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    warm_template(&cli, "v1");
    // A VM whose RAM is anonymous (the default) cannot become warm.
    cli.ok(&["vm", "create", "plain", "--image", "tiny", "--start"]);
    cli.fails(
        &["template", "create", "no", "--from", "plain", "--warm"],
        "created with --ram-file",
    );
    cli.ok(&["vm", "stop", "plain", "--force"]);
    cli.ok(&["vm", "rm", "plain"]);

    cli.fails(
        &[
            "pool",
            "create",
            "lab",
            "--template",
            "v1",
            "--spare",
            "3",
            "--max",
            "2",
        ],
        "spare (3) cannot be more than max (2)",
    );
    // More desktops than 4× the host's memory can promise (1000 of the
    // template's memory), refused with the figures, nothing made.
    let template: serde_json::Value =
        serde_json::from_str(&cli.ok(&["template", "show", "v1", "--output", "json"])).unwrap();
    let promise = 1000 * template["memory_mib"].as_u64().unwrap();
    cli.fails(
        &[
            "pool",
            "create",
            "huge",
            "--template",
            "v1",
            "--max",
            "1000",
        ],
        &format!(
            "pool huge is too large for this host: 1000 desktops of {} MiB promise {promise} MiB",
            template["memory_mib"]
        ),
    );
    assert!(!cli.ok(&["pool", "list"]).contains("huge"));
    cli.fails(
        &[
            "pool",
            "create",
            "lab",
            "--template",
            "absent",
            "--max",
            "2",
        ],
        "no template named absent",
    );
    cli.ok(&[
        "pool",
        "create",
        "lab",
        "--template",
        "v1",
        "--spare",
        "2",
        "--max",
        "5",
    ]);
    wait_until_for("two spares", REFILL, || ready_spares(&cli).len() == 2);

    // Three assigns: three different desktops, each running, each a
    // machine its user can use at once.
    let users = ["ana", "ben", "cy"];
    let desktops: Vec<String> = users.iter().map(|user| assign(&cli, user)).collect();
    let distinct: HashSet<&String> = desktops.iter().collect();
    assert_eq!(distinct.len(), 3, "{desktops:?}");
    for vm in &desktops {
        assert_eq!(exec(&cli, vm, "hostname"), *vm);
    }
    // The spares are refilled, up to the pool's max (3 assigned + 2).
    wait_until_for("the spares refilled", REFILL, || {
        ready_spares(&cli).len() == 2
    });
    let shown = pool(&cli);
    assert_eq!(shown["desktops"].as_array().unwrap().len(), 5, "{shown}");
    cli.fails(&["template", "rm", "v1"], "makes the desktops of pool lab");

    // A release resets: ana's desktop (and what she wrote) is gone, and
    // her next desktop is a fresh clone.
    let ana = &desktops[0];
    exec(&cli, ana, "echo mine > /root/notes");
    cli.ok(&["pool", "release", "lab", ana]);
    cli.fails(&["vm", "show", ana], &format!("no VM named {ana}"));
    cli.fails(&["pool", "release", "lab", ana], "has no desktop");
    // Its room in the pool is back: the next assign takes a spare, and
    // the pool makes a fresh one.
    let again = assign(&cli, "ana");
    assert!(!desktops.contains(&again), "{again} is new");
    assert_eq!(
        exec(&cli, &again, "cat /root/notes 2>/dev/null || echo none"),
        "none"
    );

    // A new template replaces the spares at once; assigned ones stay.
    warm_template(&cli, "v2");
    cli.ok(&["pool", "update", "lab", "--template", "v2"]);
    wait_until_for("spares of v2 only", REFILL, || {
        let spares = ready_spares(&cli);
        let desktops = pool(&cli)["desktops"].as_array().unwrap().len();
        spares.len() == 2 && desktops == 5 && spares.iter().all(|(_, t)| t == "v2")
    });
    let v2_spares: Vec<String> = ready_spares(&cli).into_iter().map(|(vm, _)| vm).collect();

    // Everything survives a daemon restart: pools, desktops, who holds
    // which, and the VMs themselves.
    let before = pool(&cli);
    let daemon = daemon.restart(Path::new(QUETZALD));
    let after = pool(&cli);
    assert_eq!(after["template"], "v2");
    assert_eq!(after["desktops"], before["desktops"]);
    assert_eq!(exec(&cli, &again, "hostname"), again);
    let dee = assign(&cli, "dee");
    assert!(v2_spares.contains(&dee), "{dee} is one of {v2_spares:?}");
    let shown: Value =
        serde_json::from_str(&cli.ok(&["vm", "show", &dee, "--output", "json"])).unwrap();
    assert_eq!(shown["linked_to"], "v2");

    // A pool whose users hold desktops is not deleted; released, it is.
    cli.fails(&["pool", "rm", "lab"], "release them first");
    let held: Vec<String> = pool(&cli)["desktops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["state"] == "assigned")
        .map(|d| d["vm"].as_str().unwrap().to_owned())
        .collect();
    for vm in &held {
        cli.ok(&["pool", "release", "lab", vm]);
    }
    cli.ok(&["pool", "rm", "lab"]);
    let left: Vec<Value> =
        serde_json::from_str(&cli.ok(&["vm", "list", "--output", "json"])).unwrap();
    assert!(left.is_empty(), "{left:?}");
    cli.ok(&["template", "rm", "v1"]);
    cli.ok(&["template", "rm", "v2"]);
    drop(daemon);
}

#[test]
fn the_pools_page_follows_a_pool_live_and_opens_a_desktop_full_window() {
    tiny();
    let daemon = Daemon::start_in(Path::new(QUETZALD), DataDir::new(), Some("127.0.0.1:0"));
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    warm_template(&cli, "web");
    cli.ok(&[
        "pool",
        "create",
        "lab",
        "--template",
        "web",
        "--spare",
        "2",
        "--max",
        "4",
    ]);

    // The desktop the browser types into last, while nobody else does.
    let typist = assign(&cli, "typist");
    let weight = |cli: &Cli| show(cli, &typist)["cpu_weight"].as_u64();
    assert_eq!(weight(&cli), Some(100));

    let stdout = browser_script(
        &daemon,
        "pools.mjs",
        &[("QUETZAL_POOL", "lab"), ("QUETZAL_TYPE_VM", &typist)],
    );
    println!("{stdout}");

    // The desktop its user is at gets four times the CPU weight, in its
    // cgroup, and back when its user has been idle for 30 s: one event
    // each way.
    assert_eq!(weight(&cli), Some(400));
    let cgroup = quetzal_engine::qemu::sandbox::cgroup::cpu_file(
        &daemon.data.path().join("vms").join(&typist),
    );
    let shares = std::fs::read_to_string(&cgroup).unwrap();
    assert!(["4096", "400"].contains(&shares.trim()), "{shares}");
    wait_until_for("the boost to end", Duration::from_secs(90), || {
        weight(&cli) == Some(100)
    });
    let events = cli.ok(&["events", "--vm", &typist]);
    let boosts: Vec<&str> = events.lines().filter(|l| l.contains("boost")).collect();
    assert_eq!(boosts.len(), 2, "{events}");
    assert!(
        boosts[0].contains("CPU weight 400") && boosts[1].contains("CPU weight 100"),
        "{boosts:?}"
    );

    // What the page did, the API saw: web-user's desktop came and went.
    let vm = stdout
        .lines()
        .find_map(|line| line.strip_prefix("pools: released "))
        .unwrap();
    cli.fails(&["vm", "show", vm], &format!("no VM named {vm}"));
    let users: Vec<Value> = pool(&cli)["desktops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["user"].clone())
        .collect();
    assert!(!users.contains(&Value::from("web-user")), "{users:?}");
}
