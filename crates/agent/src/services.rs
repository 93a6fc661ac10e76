//! The service watchdog: services the VM's spec declares (sent by the
//! host) and those in the guest's own [`CONFIG`] are kept running. A
//! command is run by the agent itself (`/bin/sh -c`, its own process
//! group, output appended to `/var/log/quetzal/NAME.log`) and started
//! again when it exits; a systemd unit is checked with `systemctl
//! is-active` and restarted when it is inactive or failed. Each restart is
//! reported to the host. Something that keeps dying is restarted after a
//! back-off that doubles up to a minute.

use std::collections::BTreeMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quetzal_qga::port::{MAX_SERVICES, Run, Service, ServiceEvent};

/// The guest's own declarations: `{"services": [{"name": …, "unit": …}
/// or {"name": …, "command": …}]}`.
pub const CONFIG: &str = "/etc/quetzal/agent.json";

/// How often services are checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// A service that ran this long before it died is restarted at once.
const RAN_LONG_ENOUGH: Duration = Duration::from_secs(10);
const MAX_DELAY: Duration = Duration::from_secs(60);
const MAX_COMMAND: usize = 4096;

#[derive(serde::Deserialize)]
struct Config {
    #[serde(default)]
    services: Vec<Service>,
}

/// The services the host declared, shared with the port that hears them.
pub type Declared = Arc<Mutex<Vec<Service>>>;

/// Starts the watchdog; it reports on `events`.
pub fn start(events: SyncSender<ServiceEvent>) -> Declared {
    let declared = Declared::default();
    let host = Arc::clone(&declared);
    std::thread::spawn(move || {
        let mut watched: BTreeMap<String, Watched> = BTreeMap::new();
        loop {
            let config = std::fs::read(CONFIG).unwrap_or_default();
            let wanted = merge(&host.lock().expect("never poisoned").clone(), &config);
            // Services no longer declared (or declared differently) stop.
            watched.retain(|name, service| {
                let keep = wanted
                    .iter()
                    .any(|s| &s.name == name && s.run == service.run);
                if !keep {
                    service.stop();
                }
                keep
            });
            for service in wanted {
                let entry = watched
                    .entry(service.name.clone())
                    .or_insert_with(|| Watched::new(service));
                if let Some(event) = entry.check(Instant::now()) {
                    eprintln!(
                        "quetzal-agent: service {} {}: {}",
                        event.name, event.what, event.detail
                    );
                    // A full queue (no host for a while) drops the report;
                    // the log line above keeps it.
                    let _ = events.try_send(event);
                }
            }
            std::thread::sleep(CHECK_EVERY);
        }
    });
    declared
}

/// The host's services and then the config file's, valid ones only, each
/// name once (the host's win), at most [`MAX_SERVICES`].
fn merge(host: &[Service], config: &[u8]) -> Vec<Service> {
    let from_config = serde_json::from_slice::<Config>(config)
        .map(|config| config.services)
        .unwrap_or_default();
    let mut wanted: Vec<Service> = Vec::new();
    for service in host.iter().chain(&from_config) {
        if valid(service) && !wanted.iter().any(|s| s.name == service.name) {
            wanted.push(service.clone());
        }
    }
    wanted.truncate(MAX_SERVICES);
    wanted
}

fn valid(service: &Service) -> bool {
    let name_ok = |name: &str| {
        (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.@:".contains(&b))
    };
    name_ok(&service.name)
        && match &service.run {
            Run::Unit(unit) => name_ok(unit),
            Run::Command(command) => {
                !command.trim().is_empty()
                    && command.len() <= MAX_COMMAND
                    && !command.contains('\0')
            }
        }
}

struct Watched {
    name: String,
    run: Run,
    child: Option<(Child, Instant)>,
    /// How the last run ended, told when it is restarted.
    ended: Option<String>,
    started_once: bool,
    /// A unit that was not found, already reported.
    missing: bool,
    restarts: u64,
    not_before: Instant,
    delay: Duration,
}

impl Watched {
    fn new(service: Service) -> Self {
        Watched {
            name: service.name,
            run: service.run,
            child: None,
            ended: None,
            started_once: false,
            missing: false,
            restarts: 0,
            not_before: Instant::now(),
            delay: CHECK_EVERY,
        }
    }

    fn event(&self, what: &str, detail: String) -> ServiceEvent {
        ServiceEvent {
            name: self.name.clone(),
            what: what.to_owned(),
            detail,
            restarts: self.restarts,
        }
    }

    /// Backs off after a failure; a run that lasted resets the back-off.
    fn failed(&mut self, now: Instant, ran: Option<Duration>) {
        if ran.is_some_and(|ran| ran >= RAN_LONG_ENOUGH) {
            self.delay = CHECK_EVERY;
            self.not_before = now;
        } else {
            self.not_before = now + self.delay;
            self.delay = (self.delay * 2).min(MAX_DELAY);
        }
    }

    fn check(&mut self, now: Instant) -> Option<ServiceEvent> {
        if now < self.not_before {
            return None;
        }
        match self.run.clone() {
            Run::Command(command) => self.check_command(now, &command),
            Run::Unit(unit) => self.check_unit(now, &unit),
        }
    }

    fn check_command(&mut self, now: Instant, command: &str) -> Option<ServiceEvent> {
        if let Some((child, since)) = &mut self.child {
            let status = child.try_wait().ok()??;
            let ran = now.duration_since(*since);
            self.child = None;
            self.ended = Some(describe(status));
            self.failed(now, Some(ran));
            if now < self.not_before {
                return None;
            }
        }
        match spawn(&self.name, command) {
            Ok(child) => {
                self.child = Some((child, now));
                if !std::mem::replace(&mut self.started_once, true) {
                    return None;
                }
                self.restarts += 1;
                let ended = self.ended.take().unwrap_or_else(|| "it ended".into());
                Some(self.event("restarted", ended))
            }
            Err(err) => {
                self.failed(now, None);
                Some(self.event("restart-failed", format!("cannot run it: {err}")))
            }
        }
    }

    fn check_unit(&mut self, now: Instant, unit: &str) -> Option<ServiceEvent> {
        let state = match systemctl(&["is-active", unit]) {
            Ok((_, state)) => state,
            Err(err) => {
                self.failed(now, None);
                self.delay = MAX_DELAY;
                return Some(self.event("restart-failed", format!("no systemctl: {err}")));
            }
        };
        if state != "inactive" && state != "failed" {
            return None;
        }
        let shown = systemctl(&["show", "--property=LoadState,Result", unit])
            .map(|(_, shown)| shown)
            .unwrap_or_default();
        let property = |name: &str| {
            shown
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or("")
                .to_owned()
        };
        // A unit not there (yet: cloud-init may write it later in the
        // boot) is said once and looked for again at every check.
        if property("LoadState") == "not-found" {
            if std::mem::replace(&mut self.missing, true) {
                return None;
            }
            return Some(self.event("restart-failed", format!("there is no unit {unit}")));
        }
        self.missing = false;
        let result = property("Result");
        let was = if result.is_empty() || result == "success" {
            format!("it was {state}")
        } else {
            format!("it was {state} ({result})")
        };
        match systemctl(&["restart", unit]) {
            Ok((true, _)) => {
                self.restarts += 1;
                self.delay = CHECK_EVERY;
                Some(self.event("restarted", was))
            }
            Ok((false, _)) | Err(_) => {
                self.failed(now, None);
                Some(self.event("restart-failed", format!("{was}; systemctl restart failed")))
            }
        }
    }

    fn stop(&mut self) {
        if let Some((mut child, _)) = self.child.take() {
            let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }
}

fn spawn(name: &str, command: &str) -> std::io::Result<Child> {
    let log = || -> Stdio {
        let _ = std::fs::create_dir_all("/var/log/quetzal");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("/var/log/quetzal/{name}.log"))
            .map_or_else(|_| Stdio::null(), Stdio::from)
    };
    Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(log())
        .stderr(log())
        .process_group(0)
        .spawn()
}

/// Whether `systemctl ARGS` succeeded, and its output.
fn systemctl(args: &[&str]) -> std::io::Result<(bool, String)> {
    let output = Command::new("systemctl")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()?;
    let said = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    Ok((output.status.success(), said))
}

fn describe(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("it exited with status {code}"),
        (None, Some(signal)) => format!("it was killed by signal {signal}"),
        _ => "it ended".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(name: &str, command: &str) -> Service {
        Service {
            name: name.into(),
            run: Run::Command(command.into()),
        }
    }

    #[test]
    fn the_hosts_services_come_first_and_bad_or_repeated_ones_are_left_out() {
        let host = vec![command("web", "httpd -f"), command("bad name", "x")];
        let config = br#"{"services": [
            {"name": "web", "command": "other"},
            {"name": "db", "unit": "postgresql.service"},
            {"name": "empty", "command": "  "}
        ]}"#;

        let wanted = merge(&host, config);

        assert_eq!(
            wanted,
            vec![
                command("web", "httpd -f"),
                Service {
                    name: "db".into(),
                    run: Run::Unit("postgresql.service".into())
                }
            ]
        );
        assert_eq!(merge(&host, b"not json").len(), 1);
        let many: Vec<Service> = (0..40).map(|i| command(&format!("s{i}"), "true")).collect();
        assert_eq!(merge(&many, b"").len(), MAX_SERVICES);
    }

    #[test]
    fn a_command_that_dies_is_restarted_and_reported_and_one_that_keeps_dying_backs_off() {
        let mut watched = Watched::new(command("quick", "exit 3"));
        let start = Instant::now();

        // The first start is no event.
        assert_eq!(watched.check(start), None);
        let (child, _) = watched.child.as_mut().unwrap();
        child.wait().unwrap();

        // It died at once: it is restarted only after the back-off.
        assert_eq!(watched.check(start), None);
        let event = watched.check(start + Duration::from_secs(1)).unwrap();
        assert_eq!(event.what, "restarted");
        assert_eq!(event.detail, "it exited with status 3");
        assert_eq!(event.restarts, 1);
        watched.child.as_mut().unwrap().0.wait().unwrap();
        // Again at once: the back-off doubles.
        assert_eq!(watched.check(start + Duration::from_secs(2)), None);
        assert_eq!(watched.check(start + Duration::from_secs(3)), None);
        assert!(watched.check(start + Duration::from_secs(4)).is_some());
        watched.stop();
    }

    #[test]
    fn a_command_that_ran_long_enough_is_restarted_at_once() {
        let mut watched = Watched::new(command("long", "sleep 30"));
        let start = Instant::now();
        assert_eq!(watched.check(start), None);
        let pid = watched.child.as_ref().unwrap().0.id() as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        // Reaped only once it is gone: wait for that without polling.
        let _ = nix::sys::wait::waitid(
            nix::sys::wait::Id::Pid(nix::unistd::Pid::from_raw(pid)),
            nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT,
        );

        let event = watched.check(start + RAN_LONG_ENOUGH).unwrap();

        assert_eq!(event.detail, "it was killed by signal 9");
        watched.stop();
    }
}
