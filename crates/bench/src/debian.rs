//! `quetzal-bench debian`: the debian image under TCG, with its own agent
//! and, in the same run, with Debian's stock `qemu-guest-agent` (a copy of
//! its disk with Quetzal's agent taken out, imported as `bench-stock`).
//! Each run starts one VM of each, one after the other (2 vCPUs, 1 GiB),
//! and times from the start request to: the login prompt on the serial
//! console, the agent connected (`vm show`), SSH answering with the VM's
//! key (real `ssh`); then `POST /api/v1/vms/{name}/exec` of `/bin/true`
//! through each agent, and snapshots with and without quiescing. Then,
//! per run, each disk in plain QEMU for `guest-ping` straight on the
//! agent's port (`ping.rs`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use quetzal_image::ImageStore;

use quetzal_engine::spec::DiskFormat;

use crate::agent::time_execs;
use crate::clones::api_op;
use crate::node::{Daemon, PREFIX, scratch_data};
use crate::stats::{millis, percentile, summary};

const EXECS: usize = 30;
const PINGS: usize = 200;
/// Snapshots of each kind per boot, taken alternately.
const SNAPSHOTS: usize = 2;
const TIMEOUT: Duration = Duration::from_secs(400);
const STOCK: &str = "bench-stock";

/// What one boot measured.
struct Boot {
    login: Duration,
    agent: Duration,
    ssh: Duration,
    execs: Vec<Duration>,
    quiesced: Vec<Duration>,
    unquiesced: Vec<Duration>,
}

pub fn run(runs: usize, bin: &Path) -> anyhow::Result<()> {
    let store = ImageStore::new(&quetzal_image::data_dir());
    let debian = store
        .get("debian")
        .context("build it first: quetzal image build debian")?;
    let (scratch, data) = scratch_data()?;
    let key = scratch.path().join("key");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()?;
    if !made.success() {
        bail!("ssh-keygen failed");
    }
    let public = std::fs::read_to_string(key.with_extension("pub"))?;
    let stock_disk = scratch.path().join("stock.raw");
    quetzal_image::debian::stock_agent_copy(&debian, &stock_disk, &scratch.path().join("mnt"))?;
    let _ = store.remove(STOCK);
    store.import(
        STOCK,
        &stock_disk,
        quetzal_image::import::FirmwareChoice::Detect,
        Some("debian".into()),
        &mut |_| {},
    )?;
    std::fs::remove_file(&stock_disk)?;

    let daemon = Daemon::start(&bin.join("quetzald"), &data)?;
    let mut ours = Vec::new();
    let mut stock = Vec::new();
    for run in 0..runs {
        ours.push(boot(
            &daemon,
            &format!("{PREFIX}-deb{run}"),
            "debian",
            &public,
            &key,
        )?);
        stock.push(boot(
            &daemon,
            &format!("{PREFIX}-stock{run}"),
            STOCK,
            &public,
            &key,
        )?);
    }
    drop(daemon);
    let (mut our_pings, mut stock_pings) = (Vec::new(), Vec::new());
    let stock_image = store.get(STOCK)?;
    for _ in 0..runs {
        our_pings.extend(pings(&debian, scratch.path())?);
        stock_pings.extend(pings(&stock_image, scratch.path())?);
    }
    store.remove(STOCK)?;

    let column = |boots: &[Boot], pick: fn(&Boot) -> Duration| {
        summary(&boots.iter().map(pick).collect::<Vec<_>>())
    };
    let execs = |boots: &[Boot]| {
        let all: Vec<Duration> = boots.iter().flat_map(|b| b.execs.clone()).collect();
        (percentile(&all, 50), percentile(&all, 99))
    };
    let medians = |boots: &[Boot], pick: fn(&Boot) -> Duration| {
        let mut values: Vec<Duration> = boots.iter().map(pick).collect();
        values.sort();
        values[values.len() / 2]
    };
    println!(
        "| debian under TCG, 2 vCPUs, 1 GiB ({runs} runs) | quetzal-agent | stock qemu-guest-agent |"
    );
    println!("|---|---|---|");
    println!(
        "| start to login prompt (GRUB, kernel, systemd, cloud-init) | {} | {} |",
        column(&ours, |b| b.login),
        column(&stock, |b| b.login)
    );
    println!(
        "| start to agent connected | {} | {} |",
        column(&ours, |b| b.agent),
        column(&stock, |b| b.agent)
    );
    println!(
        "| start to SSH answering with the VM's key | {} | {} |",
        column(&ours, |b| b.ssh),
        column(&stock, |b| b.ssh)
    );
    println!(
        "| agent-ready / login prompt (medians) | {:.2}× | {:.2}× |",
        medians(&ours, |b| b.agent).as_secs_f64() / medians(&ours, |b| b.login).as_secs_f64(),
        medians(&stock, |b| b.agent).as_secs_f64() / medians(&stock, |b| b.login).as_secs_f64()
    );
    let (ours_50, ours_99) = execs(&ours);
    let (stock_50, stock_99) = execs(&stock);
    println!(
        "| `exec /bin/true` through the API, {EXECS} per boot: p50 / p99 | {:.1} / {:.1} ms | {:.1} / {:.1} ms |",
        millis(ours_50),
        millis(ours_99),
        millis(stock_50),
        millis(stock_99)
    );
    println!(
        "| exec p50, quetzal-agent / stock | {:.2}× | |",
        ours_50.as_secs_f64() / stock_50.as_secs_f64()
    );
    let (pings_50, pings_99) = (percentile(&our_pings, 50), percentile(&our_pings, 99));
    let (stock_pings_50, stock_pings_99) =
        (percentile(&stock_pings, 50), percentile(&stock_pings, 99));
    println!(
        "| `guest-ping` on the port (plain QEMU), {PINGS} per boot: p50 / p99 | {:.2} / {:.2} ms | {:.2} / {:.2} ms |",
        millis(pings_50),
        millis(pings_99),
        millis(stock_pings_50),
        millis(stock_pings_99)
    );
    println!(
        "| ping p50, quetzal-agent / stock | {:.2}× | |",
        pings_50.as_secs_f64() / stock_pings_50.as_secs_f64()
    );
    let all = |boots: &[Boot], pick: fn(&Boot) -> &Vec<Duration>| {
        summary(
            &boots
                .iter()
                .flat_map(|b| pick(b).clone())
                .collect::<Vec<_>>(),
        )
    };
    println!(
        "| snapshot (disks and memory), quiesced, {SNAPSHOTS} per boot | {} | {} |",
        all(&ours, |b| &b.quiesced),
        all(&stock, |b| &b.quiesced)
    );
    println!(
        "| snapshot (disks and memory), not quiesced, {SNAPSHOTS} per boot | {} | {} |",
        all(&ours, |b| &b.unquiesced),
        all(&stock, |b| &b.unquiesced)
    );
    Ok(())
}

fn boot(
    daemon: &Daemon,
    name: &str,
    image: &str,
    public_key: &str,
    key: &Path,
) -> anyhow::Result<Boot> {
    let body = serde_json::json!({
        "name": name, "image": image, "cpus": 2, "memory_mib": 1024,
        "ssh_keys": [public_key.trim()],
    })
    .to_string();
    let (status, answer) = daemon.request("POST", "/api/v1/vms", Some(&body))?;
    if status != 201 {
        bail!("create {name}: {status} {answer}");
    }
    let start = Instant::now();
    let (status, answer) = daemon.request("POST", &format!("/api/v1/vms/{name}/start"), None)?;
    if status != 200 {
        bail!("start {name}: {status} {answer}");
    }
    let show = || -> anyhow::Result<serde_json::Value> {
        let (_, shown) = daemon.request("GET", &format!("/api/v1/vms/{name}"), None)?;
        Ok(serde_json::from_str(&shown)?)
    };
    let poll = |what: &str, check: &mut dyn FnMut() -> anyhow::Result<bool>| {
        while !check()? {
            if start.elapsed() > TIMEOUT {
                bail!("{name}: no {what} after {TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(start.elapsed())
    };
    let (mut login, mut agent, mut ssh) = (None, None, None);
    // The three come in any order: watch for all at once.
    let console = daemon.data.join("vms").join(name).join("console.log");
    poll("login, agent or SSH", &mut || {
        if login.is_none() && wait_for_now(&console, b"login: ") {
            login = Some(start.elapsed());
        }
        let vm = show()?;
        if agent.is_none() && vm["agent"]["connected"] == true {
            agent = Some(start.elapsed());
        }
        if ssh.is_none()
            && let Some(address) = vm["addresses"][0].as_str()
            && ssh_answers(key, address)
        {
            ssh = Some(start.elapsed());
        }
        Ok(login.is_some() && agent.is_some() && ssh.is_some())
    })?;
    let execs = time_execs(daemon, name, EXECS)?;
    let (mut quiesced, mut unquiesced) = (Vec::new(), Vec::new());
    let snapshots = format!("/api/v1/vms/{name}/snapshots");
    for i in 0..SNAPSHOTS {
        for (quiesce, times) in [(true, &mut quiesced), (false, &mut unquiesced)] {
            let snapshot = format!("s{i}-{quiesce}");
            let body = serde_json::json!({ "name": snapshot, "quiesce": quiesce }).to_string();
            let start = Instant::now();
            api_op(daemon, "POST", &snapshots, Some(&body))?;
            times.push(start.elapsed());
            let (_, list) = daemon.request("GET", &snapshots, None)?;
            let list: serde_json::Value = serde_json::from_str(&list)?;
            let taken = list["snapshots"]
                .as_array()
                .and_then(|all| all.iter().find(|s| s["name"] == snapshot.as_str()))
                .context("the snapshot just taken")?;
            if taken["quiesced"] != quiesce {
                bail!("{name}: snapshot {snapshot} is not what was asked: {taken}");
            }
        }
    }
    daemon.request("POST", &format!("/api/v1/vms/{name}/force-stop"), None)?;
    daemon.request("DELETE", &format!("/api/v1/vms/{name}"), None)?;
    Ok(Boot {
        login: login.unwrap_or_default(),
        agent: agent.unwrap_or_default(),
        ssh: ssh.unwrap_or_default(),
        execs,
        quiesced,
        unquiesced,
    })
}

/// `guest-ping` round trips to the agent of `image`'s disk in plain QEMU.
fn pings(image: &quetzal_image::Image, scratch: &Path) -> anyhow::Result<Vec<Duration>> {
    let format = match image.manifest.root_disk_format.as_str() {
        "raw" => DiskFormat::Raw,
        _ => DiskFormat::Qcow2,
    };
    crate::ping::pings(&image.root_disk(), format, scratch, PINGS)
}

/// Whether `file` holds `needle` now.
fn wait_for_now(file: &Path, needle: &[u8]) -> bool {
    std::fs::read(file).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
}

fn ssh_answers(key: &Path, address: &str) -> bool {
    Command::new("ssh")
        .args([
            "-q",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=2",
            "-i",
        ])
        .arg(key)
        .arg(format!("debian@{address}"))
        .arg("true")
        .status()
        .is_ok_and(|s| s.success())
}
