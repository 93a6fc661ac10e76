//! `quetzal-bench instant`: instant clones of a warm Debian template
//! against cold starts, in the same run:
//!
//! - instant clone: `POST /api/v1/vms` from the warm template (the clone
//!   hook included) until `exec true` through the API answers;
//! - cold: create and start a VM of the debian image until `exec true`
//!   answers (a boot: firmware, kernel, systemd, the agent);
//! - libvirt: `virsh define` + `virsh start` of the same image (its
//!   kernel, 512 MiB) until its login prompt;
//! - clones per second: `CLONES` instant clones one after another;
//! - memory: what each idle clone holds privately of the template's RAM
//!   and in all, and the host's memory in use before and with them.
//!
//! Needs libvirt running (`scripts/bench-setup`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use quetzal_image::ImageStore;

use crate::node::{Daemon, PREFIX, cleanup_libvirt, libvirt_define_with, scratch, virsh, wait_for};
use crate::stats::{row, summary};

const MEMORY_MIB: u64 = 512;
/// The series: enough to show the rate and the sharing, few enough to
/// finish on 2 cores under TCG (50 took over 12 minutes, each create
/// slower with more clones running).
const CLONES: usize = 20;
const TIMEOUT: Duration = Duration::from_secs(400);
/// How long the clones idle before their memory is read.
const SETTLE: Duration = Duration::from_secs(60);

pub fn run(runs: usize, bin: &Path) -> anyhow::Result<()> {
    let image = ImageStore::new(&quetzal_image::data_dir())
        .get("debian")
        .context("build it first: quetzal image build debian")?;
    let (_scratch, data, lv) = scratch()?;
    let daemon = Daemon::start(&bin.join("quetzald"), &data)?;
    let result = measure(runs, &daemon, &image, &lv);
    cleanup_libvirt();
    drop(daemon);
    result
}

fn call(daemon: &Daemon, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<String> {
    let (status, answer) = daemon.request(method, path, body)?;
    if !(200..300).contains(&status) {
        bail!("{method} {path}: {status} {answer}");
    }
    Ok(answer)
}

/// Waits until `exec true` in VM `name` answers; the time since `start`.
fn exec_answers(daemon: &Daemon, name: &str, start: Instant) -> anyhow::Result<Duration> {
    let body = r#"{"command": "true"}"#;
    loop {
        let (status, _) =
            daemon.request("POST", &format!("/api/v1/vms/{name}/exec"), Some(body))?;
        if status == 200 {
            return Ok(start.elapsed());
        }
        if start.elapsed() > TIMEOUT {
            bail!("{name}: exec did not answer within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn create(daemon: &Daemon, name: &str, from: &str) -> anyhow::Result<()> {
    let body = serde_json::json!({ "name": name, "template": from }).to_string();
    call(daemon, "POST", "/api/v1/vms", Some(&body)).map(drop)
}

fn remove(daemon: &Daemon, name: &str) -> anyhow::Result<()> {
    call(
        daemon,
        "POST",
        &format!("/api/v1/vms/{name}/force-stop"),
        None,
    )?;
    call(daemon, "DELETE", &format!("/api/v1/vms/{name}"), None).map(drop)
}

/// `Private_*` of a process: of its mapping of `file`, and in all (KiB).
fn private_kib(pid: u64, file: &Path) -> anyhow::Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let file = file.display().to_string();
    let (mut inside, mut of_file, mut all) = (false, 0, 0);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            inside = line.ends_with(&file);
        } else if first.starts_with("Private_") {
            let kib: u64 = words.next().unwrap_or("0").parse()?;
            all += kib;
            if inside {
                of_file += kib;
            }
        }
    }
    Ok((of_file, all))
}

/// Memory in use on the host (`MemTotal - MemAvailable`), MiB.
fn host_used_mib() -> anyhow::Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo")?;
    let field = |name: &str| -> u64 {
        info.lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("MemTotal:") - field("MemAvailable:")) / 1024)
}

fn measure(
    runs: usize,
    daemon: &Daemon,
    image: &quetzal_image::Image,
    lv: &Path,
) -> anyhow::Result<()> {
    let memory = MEMORY_MIB.to_string();
    let body = serde_json::json!({
        "name": "source", "image": "debian", "memory_mib": MEMORY_MIB, "ram_file": true,
    })
    .to_string();
    call(daemon, "POST", "/api/v1/vms", Some(&body))?;
    call(daemon, "POST", "/api/v1/vms/source/start", None)?;
    exec_answers(daemon, "source", Instant::now())?;
    let body = r#"{"name": "warm", "from_vm": "source", "warm": true}"#;
    crate::clones::api_op(daemon, "POST", "/api/v1/templates", Some(body))?;
    let ram = daemon.data.join("templates/warm/ram");

    let (mut instant, mut cold, mut libvirt) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let name = format!("{PREFIX}-i{run}");
        let start = Instant::now();
        create(daemon, &name, "warm")?;
        instant.push(exec_answers(daemon, &name, start)?);
        remove(daemon, &name)?;

        let name = format!("{PREFIX}-c{run}");
        let start = Instant::now();
        let body = serde_json::json!({
            "name": name, "image": "debian", "memory_mib": MEMORY_MIB,
        })
        .to_string();
        call(daemon, "POST", "/api/v1/vms", Some(&body))?;
        call(daemon, "POST", &format!("/api/v1/vms/{name}/start"), None)?;
        cold.push(exec_answers(daemon, &name, start)?);
        remove(daemon, &name)?;

        let name = format!("{PREFIX}-lv{run}");
        let start = Instant::now();
        let log = libvirt_define_with(image, &image.root_disk(), lv, &name, MEMORY_MIB)?;
        virsh(&[&format!("start {name}")])?;
        wait_for(&log, b"login: ")?;
        libvirt.push(start.elapsed());
        virsh(&[&format!("destroy {name}"), &format!("undefine {name}")])?;
    }

    println!(
        "| debian, 1 vCPU, {memory} MiB, under TCG ({runs} runs) | median (min–max) | reference | ratio |"
    );
    println!("|---|---|---|---|");
    row(
        "instant clone request → `exec true` answers, against a cold create + start of the image",
        &instant,
        &cold,
    );
    row(
        "instant clone → exec, against libvirt define + start → login prompt",
        &instant,
        &libvirt,
    );
    println!(
        "| cold create + start → exec answers | {} | | |",
        summary(&cold)
    );
    // The single-clone rows are out before the slow series starts.
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let before = host_used_mib()?;
    let names: Vec<String> = (0..CLONES).map(|i| format!("{PREFIX}-n{i}")).collect();
    let series = Instant::now();
    for name in &names {
        create(daemon, name, "warm")?;
    }
    let took = series.elapsed();
    std::thread::sleep(SETTLE);
    let (mut of_template, mut in_all) = (Vec::new(), Vec::new());
    for name in &names {
        let vm: serde_json::Value =
            serde_json::from_str(&call(daemon, "GET", &format!("/api/v1/vms/{name}"), None)?)?;
        let pid = vm["pid"].as_u64().context("a running clone's pid")?;
        let (file, all) = private_kib(pid, &ram)?;
        of_template.push(file / 1024);
        in_all.push(all / 1024);
    }
    let with = host_used_mib()?;
    for name in &names {
        remove(daemon, name)?;
    }
    let mib_median = |values: &mut Vec<u64>| {
        values.sort();
        values[values.len() / 2]
    };

    println!(
        "| {CLONES} instant clones one after another | {:.1} s: {:.2} clones/s | | |",
        took.as_secs_f64(),
        CLONES as f64 / took.as_secs_f64()
    );
    println!(
        "| idle clone after {} s: private of the template's RAM, median | {} MiB | of {memory} MiB | |",
        SETTLE.as_secs(),
        mib_median(&mut of_template)
    );
    println!(
        "| idle clone: all private memory of its QEMU (with the TCG cache), median | {} MiB | | |",
        mib_median(&mut in_all)
    );
    println!(
        "| host memory in use: {CLONES} idle clones add | {} MiB | {} MiB if each had its own RAM | |",
        with.saturating_sub(before),
        CLONES as u64 * MEMORY_MIB
    );
    Ok(())
}
