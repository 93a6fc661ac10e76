//! dnsmasq, one per network: its configuration, a task that keeps it
//! running, and the leases it writes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::oneshot;

use super::{HostNetError, Subnet};

/// A DHCP lease as dnsmasq records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub mac: String,
    pub address: String,
    pub hostname: Option<String>,
    /// Unix seconds; `None` for a lease that never expires.
    pub expires: Option<i64>,
}

/// dnsmasq's configuration for one network: DHCP over the subnet after
/// the gateway, DNS on the gateway, nothing on any other interface.
pub fn config(dir: &Path, bridge: &str, subnet: Subnet) -> String {
    let (first, last) = subnet.dhcp_range();
    format!(
        "# Written by quetzald; rewritten at each start.
strict-order
bind-dynamic
interface={bridge}
except-interface=lo
listen-address={gateway}
dhcp-range={first},{last},{netmask},1h
dhcp-option=option:router,{gateway}
dhcp-authoritative
dhcp-no-override
dhcp-leasefile={leases}
pid-file={pid}
log-facility=-
",
        gateway = subnet.gateway(),
        netmask = subnet.netmask(),
        leases = dir.join("leases").display(),
        pid = dir.join("dnsmasq.pid").display(),
    )
}

/// Reads dnsmasq's lease file: `expiry mac address hostname client-id`
/// per line; lines that do not parse are skipped.
pub fn parse_leases(text: &str) -> Vec<Lease> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let expiry: i64 = fields.next()?.parse().ok()?;
            let mac = fields.next()?.to_ascii_lowercase();
            let address = fields
                .next()?
                .parse::<std::net::Ipv4Addr>()
                .ok()?
                .to_string();
            let hostname = fields.next().filter(|h| *h != "*").map(str::to_owned);
            Some(Lease {
                mac,
                address,
                hostname,
                expires: (expiry != 0).then_some(expiry),
            })
        })
        .collect()
}

/// A dnsmasq kept running by a task: restarted (after a pause) whenever
/// it ends until [`Supervised::stop`].
#[derive(Debug)]
pub struct Supervised {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Supervised {
    /// Writes the configuration, ends a dnsmasq left by an earlier daemon
    /// (its pid file names it), and starts a new one; fails if it does not
    /// come up.
    pub async fn start(dir: &Path, bridge: &str, subnet: Subnet) -> Result<Self, HostNetError> {
        let conf = dir.join("dnsmasq.conf");
        std::fs::write(&conf, config(dir, bridge, subnet)).map_err(HostNetError::io(&conf))?;
        kill_stale(dir);
        let mut child = spawn(dir, &conf)?;
        // dnsmasq writes its pid file once it listens; if it exits first,
        // it could not (a bad option, or an address still held by the
        // dnsmasq it replaces while that one lets go: tried again).
        let mut attempts = 0;
        for _ in 0..100 {
            if let Ok(Some(status)) = child.try_wait() {
                let log = log_tail(dir);
                attempts += 1;
                if log.contains("Address already in use") && attempts < 10 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    child = spawn(dir, &conf)?;
                    continue;
                }
                return Err(HostNetError::DnsmasqExited {
                    bridge: bridge.to_owned(),
                    status,
                    log,
                });
            }
            if dir.join("dnsmasq.pid").exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (stop, mut stopped) = oneshot::channel();
        let dir = dir.to_owned();
        let bridge = bridge.to_owned();
        let task = tokio::spawn(async move {
            let mut pause = Duration::from_secs(1);
            loop {
                tokio::select! {
                    status = child.wait() => {
                        tracing::warn!(%bridge, ?status, log = %log_tail(&dir), "dnsmasq ended; restarting it");
                        tokio::select! {
                            () = tokio::time::sleep(pause) => {}
                            _ = &mut stopped => return,
                        }
                        pause = (pause * 2).min(Duration::from_secs(30));
                        match spawn(&dir, &dir.join("dnsmasq.conf")) {
                            Ok(next) => child = next,
                            Err(err) => tracing::warn!(%bridge, %err, "cannot restart dnsmasq"),
                        }
                    }
                    _ = &mut stopped => {
                        let _ = child.kill().await;
                        let _ = std::fs::remove_file(dir.join("dnsmasq.pid"));
                        return;
                    }
                }
            }
        });
        Ok(Supervised { stop, task })
    }

    /// Ends dnsmasq and its supervision.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

fn spawn(dir: &Path, conf: &Path) -> Result<tokio::process::Child, HostNetError> {
    let _ = std::fs::remove_file(dir.join("dnsmasq.pid"));
    let log_path = dir.join("dnsmasq.log");
    let log = std::fs::File::create(&log_path).map_err(HostNetError::io(&log_path))?;
    tokio::process::Command::new("dnsmasq")
        .arg("--keep-in-foreground")
        .arg(format!("--conf-file={}", conf.display()))
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        // Its own process group: a Ctrl-C to a foreground quetzald does not
        // take the network's DHCP down with it.
        .process_group(0)
        .spawn()
        .map_err(HostNetError::DnsmasqSpawn)
}

/// Ends the dnsmasq whose pid file is in `dir`, if it is still that
/// network's (its command line names the configuration in `dir`).
pub fn kill_stale(dir: &Path) {
    let Some(pid) = std::fs::read_to_string(dir.join("dnsmasq.pid"))
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok())
    else {
        return;
    };
    let conf: PathBuf = dir.join("dnsmasq.conf");
    let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&*conf.to_string_lossy()));
    if !ours {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    for _ in 0..100 {
        if !running(pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(dir.join("dnsmasq.pid"));
}

/// Whether `pid` runs (an ended process not yet reaped by its new
/// parent has ended).
fn running(pid: nix::unistd::Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
    })
}

fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("dnsmasq.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_the_subnet_after_the_gateway_on_the_bridge_only() {
        let conf = config(
            Path::new("/d"),
            "qz12345b1",
            "10.80.3.0/24".parse().unwrap(),
        );
        assert!(conf.contains("interface=qz12345b1\n"));
        assert!(conf.contains("listen-address=10.80.3.1\n"));
        assert!(conf.contains("dhcp-range=10.80.3.2,10.80.3.254,255.255.255.0,1h\n"));
        assert!(conf.contains("dhcp-leasefile=/d/leases\n"));
        assert!(conf.contains("except-interface=lo\n"));
    }

    #[test]
    fn reads_leases_and_skips_junk() {
        let text = "1764000000 52:54:00:AA:bb:cc 10.80.3.17 tiny 01:52:54:00:aa:bb:cc\n\
                    0 52:54:00:00:00:01 10.80.3.18 * *\n\
                    garbage\n\
                    1 52:54:00:00:00:02 not-an-ip x *\n";
        let leases = parse_leases(text);
        assert_eq!(
            leases,
            vec![
                Lease {
                    mac: "52:54:00:aa:bb:cc".into(),
                    address: "10.80.3.17".into(),
                    hostname: Some("tiny".into()),
                    expires: Some(1_764_000_000),
                },
                Lease {
                    mac: "52:54:00:00:00:01".into(),
                    address: "10.80.3.18".into(),
                    hostname: None,
                    expires: None,
                },
            ]
        );
    }
}
