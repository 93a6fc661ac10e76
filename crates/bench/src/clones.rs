//! `quetzal-bench clones`: templates, clones and snapshots beside libvirt +
//! qemu-img doing the same, in the same run:
//!
//! - linked clone: `POST /api/v1/vms` with a template, against
//!   `qemu-img create -b <template disk>` + `virsh define`;
//! - full clone of a template holding 192 MiB of data: quetzald's full
//!   clone against `qemu-img convert -B` of the same disk, in MiB/s;
//! - snapshot create and revert of a running 256 MiB guest: quetzald
//!   against `virsh snapshot-create-as` / `snapshot-revert`;
//! - 10 linked clones created and started at once until all 10 show their
//!   shell prompt, against one VM doing the same.
//!
//! Needs libvirt running (`scripts/bench-setup`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use quetzal_image::ImageStore;

use crate::node::{
    Daemon, PREFIX, cleanup_libvirt, libvirt_define_with, ratio, scratch, virsh, wait_for,
};
use crate::stats::{median, millis, row};

const FILL_MIB: u64 = 192;
const PROMPT: &[u8] = b"tiny:/# ";
const CLONES: usize = 10;

pub fn run(runs: usize, bin: &Path) -> anyhow::Result<()> {
    let image = ImageStore::new(&quetzal_image::data_dir()).get("tiny")?;
    let (_scratch, data, lv) = scratch()?;
    let daemon = Daemon::start(&bin.join("quetzald"), &data)?;
    let result = measure(runs, &daemon, &image, &lv);
    cleanup_libvirt();
    drop(daemon);
    result
}

fn api(
    daemon: &Daemon,
    method: &str,
    path: &str,
    body: Option<&str>,
    expect: u16,
) -> anyhow::Result<String> {
    let (status, answer) = daemon.request(method, path, body)?;
    if status != expect {
        bail!("{method} {path}: {status} {answer}");
    }
    Ok(answer)
}

/// A request that starts an operation (`202`), waited for until it
/// succeeds (`GET …/wait`, which answers when it ends: no polling that
/// would compete with the copy for the two cores): what a user waits for.
pub(crate) fn api_op(
    daemon: &Daemon,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<()> {
    let answer = api(daemon, method, path, body, 202)?;
    let started: serde_json::Value = serde_json::from_str(&answer)?;
    let id = started["operation"]["id"]
        .as_str()
        .context("an operation id")?
        .to_owned();
    loop {
        let answer = api(
            daemon,
            "GET",
            &format!("/api/v1/operations/{id}/wait?timeout_secs=60"),
            None,
            200,
        )?;
        let op: serde_json::Value = serde_json::from_str(&answer)?;
        match op["operation"]["state"].as_str() {
            Some("running") => {}
            Some("succeeded") => return Ok(()),
            _ => bail!("{method} {path}: the operation ended {op}"),
        }
    }
}

fn measure(
    runs: usize,
    daemon: &Daemon,
    image: &quetzal_image::Image,
    lv: &Path,
) -> anyhow::Result<()> {
    let vms = daemon.data.join("vms");
    // A template that boots, and one full of data (for copy throughput).
    api(
        daemon,
        "POST",
        "/api/v1/vms",
        Some(r#"{"name": "gold"}"#),
        201,
    )?;
    api_op(
        daemon,
        "POST",
        "/api/v1/templates",
        Some(r#"{"name": "tpl", "from_vm": "gold"}"#),
    )?;
    api(
        daemon,
        "POST",
        "/api/v1/vms",
        Some(r#"{"name": "heavy"}"#),
        201,
    )?;
    let heavy_disk = vms.join("heavy/root.qcow2");
    let filled = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            &format!("write -P 0x5a 64M {FILL_MIB}M"),
        ])
        .arg(&heavy_disk)
        .output()
        .context("qemu-io (qemu-utils)")?;
    if !filled.status.success() {
        bail!("qemu-io: {}", String::from_utf8_lossy(&filled.stderr));
    }
    api_op(
        daemon,
        "POST",
        "/api/v1/templates",
        Some(r#"{"name": "fat", "from_vm": "heavy"}"#),
    )?;
    let tpl_disk = daemon.data.join("templates/tpl/disk.qcow2");
    let fat_disk = daemon.data.join("templates/fat/disk.qcow2");

    eprintln!("bench: linked clones, {runs} runs each");
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for run in 0..runs {
        let name = format!("{PREFIX}-l{run}");
        let start = Instant::now();
        api(
            daemon,
            "POST",
            "/api/v1/vms",
            Some(&format!(r#"{{"name": "{name}", "template": "tpl"}}"#)),
            201,
        )?;
        ours.push(start.elapsed());
        let start = Instant::now();
        libvirt_define_with(image, &tpl_disk, lv, &name, 256)?;
        theirs.push(start.elapsed());
        api(daemon, "DELETE", &format!("/api/v1/vms/{name}"), None, 204)?;
        virsh(&[&format!("undefine {name}")])?;
    }
    let linked = (ours, theirs);

    let full_runs = runs.min(6);
    eprintln!("bench: full clones of {FILL_MIB} MiB, {full_runs} runs each");
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for run in 0..full_runs {
        let name = format!("{PREFIX}-f{run}");
        let body = format!(r#"{{"name": "{name}", "template": "fat", "full_clone": true}}"#);
        let copy = lv.join(format!("{name}.qcow2"));
        // Which side goes first alternates: the second copy of a pair
        // runs while the first one's pages are still being written back.
        for ours_now in [run % 2 == 0, run % 2 == 1] {
            if ours_now {
                let start = Instant::now();
                api_op(daemon, "POST", "/api/v1/vms", Some(&body))?;
                ours.push(start.elapsed());
                api(daemon, "DELETE", &format!("/api/v1/vms/{name}"), None, 204)?;
            } else {
                let start = Instant::now();
                quetzal_engine::disk::copy_onto_base(
                    &fat_disk,
                    &image.root_disk(),
                    &copy,
                    &mut |_| true,
                )?;
                theirs.push(start.elapsed());
                std::fs::remove_file(&copy)?;
            }
        }
    }
    let full = (ours, theirs);

    eprintln!("bench: snapshots of a running 256 MiB guest, {runs} runs each");
    api(
        daemon,
        "POST",
        "/api/v1/vms",
        Some(r#"{"name": "snappy", "memory_mib": 256}"#),
        201,
    )?;
    api(daemon, "POST", "/api/v1/vms/snappy/start", None, 200)?;
    wait_for(&vms.join("snappy/console.log"), PROMPT)?;
    let lv_log = libvirt_define_with(image, &image.root_disk(), lv, "qbench-snappy", 256)?;
    virsh(&["start qbench-snappy"])?;
    wait_for(&lv_log, PROMPT)?;
    let (mut ours_save, mut ours_revert, mut theirs_save, mut theirs_revert) =
        (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        let snap = format!("s{run}");
        let start = Instant::now();
        api_op(
            daemon,
            "POST",
            "/api/v1/vms/snappy/snapshots",
            Some(&format!(r#"{{"name": "{snap}"}}"#)),
        )?;
        ours_save.push(start.elapsed());
        let start = Instant::now();
        api_op(
            daemon,
            "POST",
            &format!("/api/v1/vms/snappy/snapshots/{snap}/revert"),
            None,
        )?;
        ours_revert.push(start.elapsed());
        let start = Instant::now();
        virsh(&[&format!("snapshot-create-as qbench-snappy {snap}")])?;
        theirs_save.push(start.elapsed());
        let start = Instant::now();
        virsh(&[&format!("snapshot-revert qbench-snappy {snap} --running")])?;
        theirs_revert.push(start.elapsed());
    }
    api(daemon, "POST", "/api/v1/vms/snappy/force-stop", None, 200)?;
    virsh(&["destroy qbench-snappy"])?;
    let _ = Command::new("virsh")
        .args([
            "-c",
            "qemu:///system",
            "-q",
            "undefine qbench-snappy --snapshots-metadata",
        ])
        .output();

    eprintln!("bench: {CLONES} linked clones at once against one");
    let one = boot_clones(daemon, &vms, &["single".to_owned()])?;
    let names: Vec<String> = (0..CLONES).map(|i| format!("{PREFIX}-c{i}")).collect();
    let many = boot_clones(daemon, &vms, &names)?;

    println!(
        "| measure ({runs} runs) | quetzald median (min–max) | libvirt + qemu-img median (min–max) | ratio |"
    );
    println!("|---|---|---|---|");
    row("linked clone create", &linked.0, &linked.1);
    row(
        &format!("full clone of {FILL_MIB} MiB ({full_runs} runs)"),
        &full.0,
        &full.1,
    );
    println!(
        "| full clone throughput | {:.0} MiB/s | {:.0} MiB/s | — |",
        throughput(median(&full.0)),
        throughput(median(&full.1))
    );
    row(
        "snapshot create, running 256 MiB guest",
        &ours_save,
        &theirs_save,
    );
    row(
        "snapshot revert, running 256 MiB guest",
        &ours_revert,
        &theirs_revert,
    );
    println!(
        "| {CLONES} linked clones created and started until all show their prompt | {:.0} ms | one clone: {:.0} ms | {:.2}× |",
        millis(many),
        millis(one),
        ratio(many, one)
    );
    Ok(())
}

#[allow(clippy::cast_precision_loss)]
fn throughput(elapsed: Duration) -> f64 {
    FILL_MIB as f64 / elapsed.as_secs_f64()
}

/// Creates linked clones of `tpl` and starts them all at once; the time
/// until every one shows its shell prompt. They are deleted afterwards.
fn boot_clones(daemon: &Daemon, vms: &Path, names: &[String]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    std::thread::scope(|scope| {
        let handles: Vec<_> = names
            .iter()
            .map(|name| {
                scope.spawn(move || -> anyhow::Result<()> {
                    let body =
                        format!(r#"{{"name": "{name}", "template": "tpl", "memory_mib": 128}}"#);
                    api(daemon, "POST", "/api/v1/vms", Some(&body), 201)?;
                    api(
                        daemon,
                        "POST",
                        &format!("/api/v1/vms/{name}/start"),
                        None,
                        200,
                    )?;
                    wait_for(&vms.join(name).join("console.log"), PROMPT)
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a clone thread panicked"))?
        })
    })?;
    let elapsed = start.elapsed();
    for name in names {
        api(
            daemon,
            "POST",
            &format!("/api/v1/vms/{name}/force-stop"),
            None,
            200,
        )?;
        api(daemon, "DELETE", &format!("/api/v1/vms/{name}"), None, 204)?;
    }
    Ok(elapsed)
}
