//! Managed networks on the host: a Linux bridge per network, a TAP per NIC
//! (made by QEMU, plugged into the bridge before the guest runs), dnsmasq
//! for DHCP and DNS (one per network, supervised), and one nftables table
//! per node for masquerading and isolation between networks.
//!
//! Everything here is idempotent: [`HostNetworks::ensure`] brings the host
//! to what the store says, whether the bridges are already there (a daemon
//! restart) or gone (a host reboot). Names start with the node's prefix
//! (`qz` and five hex digits, kept in `DATA/networks/prefix`), so several
//! nodes on one host, and [`teardown`], never touch each other's.

pub mod dnsmasq;
pub mod subnet;

use std::collections::HashMap;
use std::fmt::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};

pub use dnsmasq::Lease;
pub use subnet::Subnet;

/// Why the host could not be made to match the networks.
#[derive(Debug, thiserror::Error)]
pub enum HostNetError {
    /// This host cannot have managed networks (the reason).
    #[error("{0}")]
    Unavailable(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// A host tool answered with an error (what it printed).
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("cannot read `{command}`: {source}")]
    Unreadable {
        command: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot turn on IPv4 forwarding: {0}")]
    Forwarding(#[source] std::io::Error),
    #[error("cannot start dnsmasq: {0}")]
    DnsmasqSpawn(#[source] std::io::Error),
    #[error("dnsmasq for {bridge} exited at once ({status}): {log}")]
    DnsmasqExited {
        bridge: String,
        status: std::process::ExitStatus,
        log: String,
    },
}

impl HostNetError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HostNetError + '_ {
        move |source| HostNetError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// A network as the host side needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkSpec {
    pub name: String,
    pub id: i64,
    pub subnet: Subnet,
}

/// The node's networks on this host.
#[derive(Debug)]
pub struct HostNetworks {
    dir: PathBuf,
    prefix: String,
    /// Why this host cannot have managed networks, if it cannot.
    unavailable: Option<String>,
    dnsmasq: Mutex<HashMap<String, dnsmasq::Supervised>>,
}

impl HostNetworks {
    /// Reads (or makes) the node's name prefix and checks that the host
    /// can run bridges: root, and `ip`, `nft` and `dnsmasq` installed.
    pub fn open(data: &Path) -> std::io::Result<Self> {
        Self::open_with(data, host_support())
    }

    /// A node's networks that never touch the host: every VM uses
    /// user-mode networking (the node's unit tests).
    pub fn without_host(data: &Path) -> std::io::Result<Self> {
        Self::open_with(data, Some("managed networks are turned off".to_owned()))
    }

    fn open_with(data: &Path, unavailable: Option<String>) -> std::io::Result<Self> {
        let dir = data.join("networks");
        std::fs::create_dir_all(&dir)?;
        let prefix = node_prefix(&dir)?;
        if let Some(reason) = &unavailable {
            tracing::warn!(%reason, "managed networks unavailable; VMs use user-mode networking");
        }
        Ok(HostNetworks {
            dir,
            prefix,
            unavailable,
            dnsmasq: Mutex::default(),
        })
    }

    /// `Err` with the reason when this host cannot have managed networks.
    pub fn available(&self) -> Result<(), String> {
        match &self.unavailable {
            None => Ok(()),
            Some(reason) => Err(reason.clone()),
        }
    }

    pub fn bridge(&self, network: &NetworkSpec) -> String {
        format!("{}b{}", self.prefix, network.id)
    }

    /// The TAP device of the VM NIC numbered `nic` (at most 15 bytes, as
    /// Linux requires: six hex digits, so 16 million NICs a node).
    pub fn tap(&self, nic: u32) -> String {
        format!("{}t{:06x}", self.prefix, nic & 0x00ff_ffff)
    }

    fn network_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Routes the host has now, as (address, prefix length), except those
    /// of `own` bridges: what a new network must not overlap.
    pub async fn host_routes(&self) -> Result<Vec<(Ipv4Addr, u8, String)>, HostNetError> {
        let out = run("ip", &["-j", "-4", "route", "show", "table", "all"], None).await?;
        let routes: Vec<serde_json::Value> =
            serde_json::from_str(&out).map_err(|source| HostNetError::Unreadable {
                command: "ip -j route",
                source,
            })?;
        Ok(routes
            .iter()
            .filter(|route| route["type"].as_str().is_none_or(|t| t == "unicast"))
            .filter_map(|route| {
                let (address, prefix) = subnet::route_destination(route["dst"].as_str()?)?;
                let dev = route["dev"].as_str().unwrap_or("").to_owned();
                (!address.is_loopback()).then_some((address, prefix, dev))
            })
            .collect())
    }

    /// Holds a host-wide lock while a subnet is chosen and its bridge made,
    /// so that two nodes never pick the same one.
    pub fn subnet_lock() -> Result<Flock<std::fs::File>, HostNetError> {
        let path = Path::new("/run/quetzal-subnets.lock");
        let file = std::fs::File::create(path).map_err(HostNetError::io(path))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| HostNetError::io(path)(e.into()))
    }

    /// Makes the host match `networks`: bridges with their gateway
    /// address, forwarding on, the nftables table, a dnsmasq per network.
    /// Bridges of networks no longer listed are removed.
    pub async fn ensure(&self, networks: &[NetworkSpec]) -> Result<(), HostNetError> {
        self.available().map_err(HostNetError::Unavailable)?;
        for network in networks {
            self.ensure_bridge(network).await?;
        }
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(HostNetError::Forwarding)?;
        let rules = nft_ruleset(&self.table(), &self.bridged(networks));
        run("nft", &["-f", "-"], Some(&rules)).await?;
        for network in networks {
            self.ensure_dnsmasq(network).await?;
        }
        let wanted: Vec<String> = networks.iter().map(|n| self.bridge(n)).collect();
        for link in self.links().await? {
            if !wanted.contains(&link) && link.starts_with(&format!("{}b", self.prefix)) {
                run("ip", &["link", "delete", &link], None).await?;
            }
        }
        Ok(())
    }

    /// Stops a network's dnsmasq and removes its bridge and files; the
    /// caller then calls [`Self::ensure`] with the networks left.
    pub async fn remove(&self, network: &NetworkSpec) -> Result<(), HostNetError> {
        let supervised = self
            .dnsmasq
            .lock()
            .expect("never poisoned: no panics while held")
            .remove(&network.name);
        if let Some(supervised) = supervised {
            supervised.stop().await;
        }
        let bridge = self.bridge(network);
        if self.links().await?.contains(&bridge) {
            run("ip", &["link", "delete", &bridge], None).await?;
        }
        let _ = std::fs::remove_dir_all(self.network_dir(&network.name));
        Ok(())
    }

    /// Plugs a VM's TAP (made by its QEMU) into its network's bridge.
    pub async fn plug(&self, tap: &str, network: &NetworkSpec) -> Result<(), HostNetError> {
        let bridge = self.bridge(network);
        run("ip", &["link", "set", tap, "master", &bridge, "up"], None).await?;
        Ok(())
    }

    /// The leases dnsmasq handed out on `network`.
    pub fn leases(&self, network: &NetworkSpec) -> Vec<Lease> {
        let path = self.network_dir(&network.name).join("leases");
        std::fs::read_to_string(path)
            .map(|text| dnsmasq::parse_leases(&text))
            .unwrap_or_default()
    }

    fn table(&self) -> String {
        format!("quetzal_{}", self.prefix)
    }

    fn bridged(&self, networks: &[NetworkSpec]) -> Vec<(String, Subnet)> {
        networks
            .iter()
            .map(|n| (self.bridge(n), n.subnet))
            .collect()
    }

    async fn links(&self) -> Result<Vec<String>, HostNetError> {
        links_with_prefix(&self.prefix).await
    }

    async fn ensure_bridge(&self, network: &NetworkSpec) -> Result<(), HostNetError> {
        let bridge = self.bridge(network);
        if !self.links().await?.contains(&bridge) {
            run("ip", &["link", "add", &bridge, "type", "bridge"], None).await?;
        }
        let address = format!("{}/{}", network.subnet.gateway(), network.subnet.prefix());
        run("ip", &["addr", "replace", &address, "dev", &bridge], None).await?;
        run("ip", &["link", "set", &bridge, "up"], None).await?;
        Ok(())
    }

    async fn ensure_dnsmasq(&self, network: &NetworkSpec) -> Result<(), HostNetError> {
        if self
            .dnsmasq
            .lock()
            .expect("never poisoned: no panics while held")
            .contains_key(&network.name)
        {
            return Ok(());
        }
        let dir = self.network_dir(&network.name);
        std::fs::create_dir_all(&dir).map_err(HostNetError::io(&dir))?;
        let supervised =
            dnsmasq::Supervised::start(&dir, &self.bridge(network), network.subnet).await?;
        self.dnsmasq
            .lock()
            .expect("never poisoned: no panics while held")
            .insert(network.name.clone(), supervised);
        Ok(())
    }
}

/// The node's nftables table: masquerade what leaves each network for
/// elsewhere, and drop what a network's bridge would forward to another
/// Quetzal bridge (networks are isolated from each other).
pub fn nft_ruleset(table: &str, networks: &[(String, Subnet)]) -> String {
    // Declaring the table first makes the delete succeed when it is new:
    // the whole file is one transaction, so the rules are replaced, never
    // duplicated.
    let mut rules = format!("table ip {table}\ndelete table ip {table}\n");
    if networks.is_empty() {
        return rules;
    }
    let _ = writeln!(rules, "table ip {table} {{");
    rules.push_str(
        "    chain forward {\n        type filter hook forward priority filter; policy accept;\n",
    );
    for (bridge, _) in networks {
        let _ = writeln!(
            rules,
            "        iifname \"{bridge}\" oifname \"qz*\" oifname != \"{bridge}\" drop"
        );
    }
    rules.push_str("    }\n    chain postrouting {\n        type nat hook postrouting priority srcnat; policy accept;\n");
    for (_, subnet) in networks {
        let _ = writeln!(
            rules,
            "        ip saddr {subnet} ip daddr != {subnet} masquerade"
        );
    }
    rules.push_str("    }\n}\n");
    rules
}

/// Removes everything a node made on the host for its networks: its
/// dnsmasq processes, its bridges and its nftables table. For tests and
/// for uninstalling; a stopped daemon otherwise leaves its networks up so
/// that running VMs keep them.
pub async fn teardown(data: &Path) -> Result<(), HostNetError> {
    let dir = data.join("networks");
    let Ok(prefix) = std::fs::read_to_string(dir.join("prefix")) else {
        return Ok(());
    };
    let prefix = prefix.trim();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            dnsmasq::kill_stale(&entry.path());
        }
    }
    if host_support().is_some() {
        return Ok(());
    }
    // TAP devices go with their QEMU; bridges are the node's.
    let bridges = format!("{prefix}b");
    for link in links_with_prefix(&bridges).await? {
        run("ip", &["link", "delete", &link], None).await?;
    }
    let table = format!("quetzal_{prefix}");
    run("nft", &["-f", "-"], Some(&nft_ruleset(&table, &[]))).await?;
    Ok(())
}

/// A network device's counter from sysfs (`rx_bytes`, `tx_bytes`); zero
/// when the device does not exist.
pub fn tap_counter(device: &str, counter: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{device}/statistics/{counter}"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

async fn links_with_prefix(prefix: &str) -> Result<Vec<String>, HostNetError> {
    let out = run("ip", &["-j", "link", "show"], None).await?;
    let links: Vec<serde_json::Value> =
        serde_json::from_str(&out).map_err(|source| HostNetError::Unreadable {
            command: "ip -j link",
            source,
        })?;
    Ok(links
        .iter()
        .filter_map(|link| link["ifname"].as_str())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_owned)
        .collect())
}

/// `qz` and five hex digits, made once per node and kept.
fn node_prefix(dir: &Path) -> std::io::Result<String> {
    let path = dir.join("prefix");
    if let Ok(prefix) = std::fs::read_to_string(&path) {
        let prefix = prefix.trim();
        if prefix.len() == 7 && prefix.starts_with("qz") {
            return Ok(prefix.to_owned());
        }
    }
    let mut bytes = [0u8; 3];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    let [a, b, c] = bytes;
    let prefix = format!(
        "qz{:05x}",
        (u32::from(a) << 16 | u32::from(b) << 8 | u32::from(c)) & 0xf_ffff
    );
    let tmp = dir.join("prefix.tmp");
    std::fs::write(&tmp, &prefix)?;
    std::fs::rename(&tmp, &path)?;
    Ok(prefix)
}

/// `None` when this host can run managed networks, else why not.
fn host_support() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("managed networks need root (bridges, TAP devices, nftables)".to_owned());
    }
    ["ip", "nft", "dnsmasq"]
        .into_iter()
        .find(|tool| !on_path(tool))
        .map(|tool| format!("managed networks need `{tool}`, which is not installed"))
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .any(|dir| dir.join(program).is_file())
    })
}

/// Runs a host tool, feeding it `input`; its stdout, or an error with
/// what it printed.
async fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, HostNetError> {
    use tokio::io::AsyncWriteExt;
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let shown = format!("{program} {}", args.join(" "));
    let spawn_failed = |source| HostNetError::Spawn {
        command: shown.clone(),
        source,
    };
    let mut child = command.spawn().map_err(spawn_failed)?;
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        stdin
            .write_all(input.as_bytes())
            .await
            .map_err(spawn_failed)?;
    }
    let out = child.wait_with_output().await.map_err(spawn_failed)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(HostNetError::Failed {
            command: shown,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_replaces_the_table_and_isolates_each_bridge() {
        let nets = [
            ("qz12345b1".to_owned(), "10.80.0.0/24".parse().unwrap()),
            ("qz12345b2".to_owned(), "10.80.1.0/24".parse().unwrap()),
        ];
        let rules = nft_ruleset("quetzal_qz12345", &nets);
        assert!(rules.starts_with(
            "table ip quetzal_qz12345\ndelete table ip quetzal_qz12345\ntable ip quetzal_qz12345 {"
        ));
        assert!(
            rules.contains("iifname \"qz12345b2\" oifname \"qz*\" oifname != \"qz12345b2\" drop")
        );
        assert!(rules.contains("ip saddr 10.80.0.0/24 ip daddr != 10.80.0.0/24 masquerade"));
        assert_eq!(rules.matches("masquerade").count(), 2);
    }

    #[test]
    fn with_no_networks_the_ruleset_only_deletes() {
        let rules = nft_ruleset("quetzal_qz12345", &[]);
        assert_eq!(
            rules,
            "table ip quetzal_qz12345\ndelete table ip quetzal_qz12345\n"
        );
    }

    #[test]
    fn keeps_its_prefix_and_names_fit_linux() {
        let dir = tempfile::tempdir().unwrap();
        let first = node_prefix(dir.path()).unwrap();
        assert_eq!(first, node_prefix(dir.path()).unwrap());
        assert_eq!(first.len(), 7);
        let nets = HostNetworks {
            dir: dir.path().to_owned(),
            prefix: first,
            unavailable: None,
            dnsmasq: Mutex::default(),
        };
        assert!(nets.tap(u32::MAX).len() <= 15);
        let spec = NetworkSpec {
            name: "n".into(),
            id: 999_999,
            subnet: "10.80.0.0/24".parse().unwrap(),
        };
        assert!(nets.bridge(&spec).len() <= 15);
    }
}
