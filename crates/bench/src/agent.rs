//! `quetzal-bench agent`: the guest agent's round trip and readiness, on
//! the tiny guest under TCG. For each run a VM is started and timed to its
//! shell prompt on the serial console and to its agent being connected
//! (`vm show`'s `agent.connected`); then `POST /api/v1/vms/{name}/exec` of
//! `/bin/true` is timed repeatedly (the API call, the agent's
//! `guest-exec`, and `guest-exec-status` polls until it ended).
//!
//! The issue's reference, stock `qemu-guest-agent`, needs a glibc guest
//! (the Debian image); tiny is busybox only, so it is not in this run.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::node::{Daemon, PREFIX, scratch_data, wait_for};
use crate::stats::{millis, percentile, summary};

const EXECS: usize = 50;
const TIMEOUT: Duration = Duration::from_secs(120);

pub fn run(runs: usize, bin: &Path) -> anyhow::Result<()> {
    let (_scratch, data) = scratch_data()?;
    let daemon = Daemon::start(&bin.join("quetzald"), &data)?;
    let mut prompt = Vec::new();
    let mut ready = Vec::new();
    let mut execs = Vec::new();
    for run in 0..runs {
        let name = format!("{PREFIX}-agent{run}");
        let body = format!(r#"{{"name": "{name}"}}"#);
        let (status, answer) = daemon.request("POST", "/api/v1/vms", Some(&body))?;
        if status != 201 {
            bail!("create {name}: {status} {answer}");
        }
        let start = Instant::now();
        let (status, answer) =
            daemon.request("POST", &format!("/api/v1/vms/{name}/start"), None)?;
        if status != 200 {
            bail!("start {name}: {status} {answer}");
        }
        wait_for(
            &data.join("vms").join(&name).join("console.log"),
            b"tiny:/# ",
        )?;
        prompt.push(start.elapsed());
        loop {
            let (_, shown) = daemon.request("GET", &format!("/api/v1/vms/{name}"), None)?;
            if shown.contains(r#""connected":true"#) {
                break;
            }
            if start.elapsed() > TIMEOUT {
                bail!("{name}'s agent did not connect");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        ready.push(start.elapsed());
        execs.extend(time_execs(&daemon, &name, EXECS)?);
        daemon.request("POST", &format!("/api/v1/vms/{name}/force-stop"), None)?;
    }
    drop(daemon);

    println!("| tiny under TCG ({runs} runs) | median (min–max) |");
    println!("|---|---|");
    println!("| start to shell prompt | {} |", summary(&prompt));
    println!("| start to agent connected | {} |", summary(&ready));
    println!(
        "| `exec /bin/true` through the API, {} calls: p50 / p99 | {:.1} / {:.1} ms |",
        execs.len(),
        millis(percentile(&execs, 50)),
        millis(percentile(&execs, 99))
    );
    Ok(())
}

/// Times `count` runs of `/bin/true` in VM `name` through the API (the
/// call, the agent's `guest-exec` and its status polls), each checked.
pub(crate) fn time_execs(
    daemon: &Daemon,
    name: &str,
    count: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut execs = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        let (status, answer) = daemon.request(
            "POST",
            &format!("/api/v1/vms/{name}/exec"),
            Some(r#"{"command": "/bin/true"}"#),
        )?;
        execs.push(start.elapsed());
        if status != 200 || !answer.contains(r#""exit_code":0"#) {
            bail!("exec: {status} {answer}");
        }
    }
    Ok(execs)
}
