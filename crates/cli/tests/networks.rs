//! Managed networks end to end: a real daemon makes real bridges, TAP
//! devices, dnsmasq and nftables rules; real guests get DHCP leases and
//! ping each other. Every test checks that nothing stays on the host.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use quetzal_testkit::{Cli, Daemon, processes_mentioning};
use serde_json::Value;

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");

fn cli(daemon: &Daemon) -> Cli {
    Cli::new(Path::new(QUETZAL), daemon.data.path())
}

fn json(daemon: &Daemon, args: &[&str]) -> Value {
    serde_json::from_str(&cli(daemon).ok(args)).unwrap()
}

fn network(daemon: &Daemon, name: &str) -> Value {
    json(daemon, &["network", "show", name, "--output", "json"])
}

/// The VM's leased address, once DHCP gave it one.
fn address(daemon: &Daemon, vm: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let shown = json(daemon, &["vm", "show", vm, "--output", "json"]);
        if let Some(address) = shown["addresses"][0].as_str() {
            return address.to_owned();
        }
        assert!(Instant::now() < deadline, "{vm} got no address: {shown}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Whether `from` gets an answer to a ping of `to`.
fn pings(daemon: &Daemon, from: &str, to: &str) -> bool {
    let answer = cli(daemon).in_guest(
        from,
        &format!("ping -c 2 -W 2 {to} >/dev/null 2>&1 && echo reached || echo unreachable"),
    );
    match answer.as_str() {
        "reached" => true,
        "unreachable" => false,
        other => panic!("ping from {from} printed {other:?}"),
    }
}

fn host_links(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["-br", "link"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

fn masquerade_rules(prefix: &str) -> usize {
    let out = Command::new("nft")
        .args(["list", "table", "ip", &format!("quetzal_{prefix}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .matches("masquerade")
        .count()
}

fn dnsmasqs(daemon: &Daemon) -> usize {
    processes_mentioning(&format!("{}/networks/", daemon.data.path().display())).len()
}

fn prefix(daemon: &Daemon) -> String {
    std::fs::read_to_string(daemon.data.path().join("networks/prefix")).unwrap()
}

fn metric(text: &str, name: &str, vm: &str) -> f64 {
    let key = format!("{name}{{vm=\"{vm}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&key))
        .unwrap_or_else(|| panic!("no {key} in metrics"))
        .parse()
        .unwrap()
}

/// Stops the daemon the way the suite does and checks that its bridges,
/// rules and dnsmasq are gone.
fn stop_and_check_clean(daemon: Daemon, prefix: &str) {
    let data = daemon.stop();
    assert!(host_links(prefix).is_empty(), "{:?}", host_links(prefix));
    assert_eq!(masquerade_rules(prefix), 0);
    assert!(processes_mentioning(&data.path().display().to_string()).is_empty());
}

#[test]
fn vms_on_a_network_get_leases_reach_each_other_and_the_host_and_other_networks_are_isolated() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    let prefix = prefix(&daemon);
    let default = network(&daemon, "default");
    let gateway = default["gateway"].as_str().unwrap().to_owned();
    cli(&daemon).ok(&["vm", "create", "a", "--start"]);
    cli(&daemon).ok(&["vm", "create", "b", "--start"]);
    cli(&daemon).ok(&["network", "create", "iso"]);
    cli(&daemon).ok(&["vm", "create", "c", "--network", "iso", "--start"]);

    let a = address(&daemon, "a");
    let b = address(&daemon, "b");
    let c = address(&daemon, "c");
    let default_leases = network(&daemon, "default")["leases"].clone();
    for (vm, address) in [("a", &a), ("b", &b)] {
        assert!(
            default_leases
                .as_array()
                .unwrap()
                .iter()
                .any(|lease| { lease["vm"] == vm && lease["address"] == address.as_str() }),
            "{vm} {address} not among {default_leases}"
        );
    }
    let iso = network(&daemon, "iso");
    assert_ne!(iso["subnet"], default["subnet"]);
    assert_eq!(iso["vms"], serde_json::json!(["c"]));
    let listed = cli(&daemon).ok(&["vm", "list"]);
    assert!(listed.contains(&a) && listed.contains(&c), "{listed}");

    assert!(
        pings(&daemon, "a", &b),
        "a cannot reach b on the same network"
    );
    assert!(pings(&daemon, "b", &gateway), "b cannot reach the host");
    let iso_gateway = iso["gateway"].as_str().unwrap();
    assert!(
        pings(&daemon, "c", iso_gateway),
        "c cannot reach its own gateway"
    );
    assert!(!pings(&daemon, "c", &a), "c on iso reached a on default");

    let events = cli(&daemon).ok(&["events", "--vm", "a"]);
    assert!(events.contains(&format!("gave it {a}")), "{events}");
    let (_, metrics) = daemon.request("GET", "/metrics", None);
    assert!(metric(&metrics, "quetzal_vm_network_receive_bytes_total", "a") > 0.0);
    assert!(metric(&metrics, "quetzal_vm_network_transmit_bytes_total", "a") > 0.0);

    // A daemon restart reuses what is there: same bridges, one rule and
    // one dnsmasq per network, leases known at once, traffic flowing.
    let links = host_links(&prefix);
    let daemon = daemon.restart(Path::new(QUETZALD));
    assert_eq!(host_links(&prefix), links);
    assert_eq!(masquerade_rules(&prefix), 2);
    assert_eq!(dnsmasqs(&daemon), 2);
    let shown = json(&daemon, &["vm", "show", "a", "--output", "json"]);
    assert_eq!(shown["addresses"], serde_json::json!([a]));
    assert!(pings(&daemon, "a", &b), "a cannot reach b after a restart");

    cli(&daemon).fails(&["network", "rm", "iso"], "network iso is in use by c");
    cli(&daemon).ok(&["vm", "stop", "c", "--force"]);
    cli(&daemon).ok(&["vm", "rm", "c"]);
    cli(&daemon).ok(&["network", "rm", "iso"]);
    assert!(!host_links(&prefix).contains(&iso["bridge"].as_str().unwrap().to_owned()));
    assert_eq!(masquerade_rules(&prefix), 1);
    assert_eq!(dnsmasqs(&daemon), 1);

    stop_and_check_clean(daemon, &prefix);
}

#[test]
fn bad_network_requests_get_one_clear_error_and_leave_nothing() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    let prefix = prefix(&daemon);
    let cli = cli(&daemon);
    let subnet = network(&daemon, "default")["subnet"]
        .as_str()
        .unwrap()
        .to_owned();
    let (network_address, _) = subnet.split_once('/').unwrap();
    let nested = format!("{network_address}/25");

    cli.fails(
        &["network", "create", "x", "--subnet", "nope"],
        "is not an IPv4 subnet",
    );
    cli.fails(
        &["network", "create", "x", "--subnet", "10.200.0.9/24"],
        "did you mean 10.200.0.0/24",
    );
    cli.fails(
        &["network", "create", "x", "--subnet", "10.0.0.0/8"],
        "between /16 and /29",
    );
    cli.fails(
        &["network", "create", "x", "--subnet", &nested],
        "overlaps network default",
    );
    cli.fails(&["network", "create", "user"], "names user-mode networking");
    cli.fails(&["network", "create", "bad name"], "network name");
    cli.fails(&["network", "create", "default"], "already exists");
    cli.fails(&["network", "rm", "nope"], "no network named nope");
    cli.fails(&["network", "rm", "default"], "cannot be deleted");
    cli.fails(
        &["vm", "create", "v", "--network", "nope"],
        "no network named nope",
    );
    let (status, body) =
        daemon.request("POST", "/api/v1/networks", Some(r#"{"name":"x","vlan":3}"#));
    assert_eq!(status, 400, "{body}");

    let networks = json(&daemon, &["network", "list", "--output", "json"]);
    assert_eq!(networks.as_array().unwrap().len(), 1, "{networks}");
    assert_eq!(
        json(&daemon, &["vm", "list", "--output", "json"]),
        serde_json::json!([])
    );
    assert_eq!(host_links(&prefix).len(), 1);
    assert_eq!(masquerade_rules(&prefix), 1);
    stop_and_check_clean(daemon, &prefix);
}

#[test]
fn user_mode_networking_stays_available_per_vm() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    let prefix = prefix(&daemon);
    cli(&daemon).ok(&["vm", "create", "u", "--network", "user", "--start"]);
    let shown = json(&daemon, &["vm", "show", "u", "--output", "json"]);
    assert_eq!(shown["network"], "user");
    // QEMU's built-in DHCP gives the guest 10.0.2.15 and is its router.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pings(&daemon, "u", "10.0.2.2") {
        assert!(
            Instant::now() < deadline,
            "u never reached its user-mode router"
        );
    }
    assert_eq!(
        json(&daemon, &["vm", "show", "u", "--output", "json"])["addresses"],
        serde_json::json!([])
    );
    assert!(host_links(&prefix).iter().all(|link| !link.contains('t')));
    stop_and_check_clean(daemon, &prefix);
}

#[test]
fn after_a_host_reboot_the_daemon_remakes_its_networks() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    let prefix = prefix(&daemon);
    cli(&daemon).ok(&["network", "create", "lab"]);
    let lab = network(&daemon, "lab");
    let mut daemon = daemon;
    daemon.kill();

    // What a reboot leaves: no bridges, no rules, no dnsmasq.
    for pid in processes_mentioning(&format!("{}/networks/", daemon.data.path().display())) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    for link in host_links(&prefix) {
        assert!(
            Command::new("ip")
                .args(["link", "delete", &link])
                .status()
                .unwrap()
                .success()
        );
    }
    let table = format!("quetzal_{prefix}");
    assert!(
        Command::new("nft")
            .args(["delete", "table", "ip", &table])
            .status()
            .unwrap()
            .success()
    );

    let daemon = daemon.restart(Path::new(QUETZALD));
    assert_eq!(host_links(&prefix).len(), 2, "{:?}", host_links(&prefix));
    assert_eq!(masquerade_rules(&prefix), 2);
    assert_eq!(dnsmasqs(&daemon), 2);
    assert_eq!(network(&daemon, "lab")["subnet"], lab["subnet"]);
    // And the network works: a VM on it gets a lease.
    cli(&daemon).ok(&["vm", "create", "v", "--network", "lab", "--start"]);
    let address = address(&daemon, "v");
    let subnet_start = lab["gateway"].as_str().unwrap().rsplit_once('.').unwrap().0;
    assert!(
        address.starts_with(subnet_start),
        "{address} not in {}",
        lab["subnet"]
    );
    stop_and_check_clean(daemon, &prefix);
}
