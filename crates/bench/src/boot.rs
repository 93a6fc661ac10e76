//! `quetzal-bench boot`: how long `quetzal run` takes to bring the tiny
//! guest to its shell and to exit after `poweroff`, beside a hand-written
//! `qemu-system-x86_64` command line booting the same guest with the same
//! devices, alternating run by run; and the engine's own overhead, from
//! spawning QEMU to a negotiated QMP session.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use quetzal_engine::accel::{self, AccelProbe};
use quetzal_engine::spec::{
    Boot, Cpus, DirectBoot, Disk, DiskFormat, Machine, MemoryMib, VmName, VmSpec,
};
use quetzal_engine::{Engine, EngineVm, Lifetime, QemuEngine, VmEvent, disk};
use quetzal_image::{Image, ImageStore};

use crate::stats::{row, summary};

const PROMPT: &[u8] = b"tiny:/# ";
const TIMEOUT: Duration = Duration::from_secs(120);

pub fn run(runs: usize, quetzal: &Path) -> anyhow::Result<()> {
    let data = quetzal_image::data_dir();
    let image = ImageStore::new(&data).get("tiny")?;
    let scratch = tempfile::tempdir()?;
    let accel = accel::choose(&AccelProbe::of_this_host()).accel;

    eprintln!(
        "bench: {runs} runs each, accel {accel}, quetzal {}",
        quetzal.display()
    );
    let mut ours = Samples::default();
    let mut plain = Samples::default();
    for run in 0..runs {
        let (prompt, exit) = time_console(
            Command::new(quetzal)
                .arg("run")
                .env("QUETZAL_DATA_DIR", &data),
        )?;
        ours.prompt.push(prompt);
        ours.exit.push(exit);
        let overlay = scratch.path().join(format!("plain-{run}.qcow2"));
        disk::create_overlay(&image.root_disk(), DiskFormat::Qcow2, &overlay)?;
        let (prompt, exit) = time_console(&mut plain_qemu(&image, &overlay, &accel.to_string()))?;
        plain.prompt.push(prompt);
        plain.exit.push(exit);
        eprintln!("bench: run {}/{runs} done", run + 1);
    }
    let qmp = qmp_ready(&image, scratch.path(), runs, accel)?;

    println!(
        "| measure ({runs} runs) | quetzal median (min–max) | plain QEMU median (min–max) | ratio |"
    );
    println!("|---|---|---|---|");
    row("`run` to shell prompt", &ours.prompt, &plain.prompt);
    row("`poweroff` to exit", &ours.exit, &plain.exit);
    println!(
        "| spawn to QMP ready (engine) | {} | — | — |",
        summary(&qmp)
    );
    Ok(())
}

#[derive(Default)]
struct Samples {
    prompt: Vec<Duration>,
    exit: Vec<Duration>,
}

/// The hand-written reference: the same kernel, initrd, disk, NIC and
/// panic device as `quetzal run`, the console on stdio.
fn plain_qemu(image: &Image, overlay: &Path, accel: &str) -> Command {
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-machine",
            "pc",
        ])
        .args([
            "-accel", accel, "-smp", "1", "-m", "256M", "-serial", "stdio",
        ])
        .arg("-kernel")
        .arg(image.kernel().expect("tiny has a kernel"))
        .arg("-initrd")
        .arg(image.initrd().expect("tiny has an initrd"))
        .args(["-append", &image.manifest.append])
        .arg("-drive")
        .arg(format!("file={},format=qcow2,if=virtio", overlay.display()))
        .args([
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
        ])
        .args(["-device", "pvpanic"]);
    command
}

/// Starts `command`, waits for the shell prompt on its stdout, types
/// `poweroff` and waits for it to exit: (start to prompt, poweroff to exit).
fn time_console(command: &mut Command) -> anyhow::Result<(Duration, Duration)> {
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the program under test")?;
    let mut stdout = child.stdout.take().context("stdout is piped")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    while !seen.windows(PROMPT.len()).any(|w| w == PROMPT) {
        match rx.recv_timeout(TIMEOUT) {
            Ok(bytes) => seen.extend(bytes),
            Err(_) => {
                let _ = child.kill();
                bail!("no prompt; output: {}", String::from_utf8_lossy(&seen));
            }
        }
    }
    let prompt = start.elapsed();
    let poweroff = Instant::now();
    child
        .stdin
        .as_mut()
        .context("stdin is piped")?
        .write_all(b"poweroff\n")?;
    let status = child.wait()?;
    let exit = poweroff.elapsed();
    if !status.success() {
        bail!("exited with {status}");
    }
    Ok((prompt, exit))
}

/// Spawn-to-QMP-ready of the QEMU engine, `runs` times.
fn qmp_ready(
    image: &Image,
    scratch: &Path,
    runs: usize,
    accel: quetzal_engine::Accel,
) -> anyhow::Result<Vec<Duration>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut samples = Vec::new();
        for run in 0..runs {
            let overlay = scratch.join(format!("qmp-{run}.qcow2"));
            disk::create_overlay(&image.root_disk(), DiskFormat::Qcow2, &overlay)?;
            let spec = VmSpec {
                name: VmName::new("bench")?,
                cpus: Cpus::new(1)?,
                memory: MemoryMib::new(256, u64::MAX)?,
                machine: Machine::Pc,
                accel,
                boot: Boot::Kernel(DirectBoot::new(
                    &image.kernel().expect("tiny has a kernel"),
                    image.initrd().as_deref(),
                    &image.manifest.append,
                )?),
                disks: vec![Disk {
                    path: overlay,
                    format: DiskFormat::Qcow2,
                    read_only: false,
                }],
                nics: vec![],
                graphics: false,
                confinement: Default::default(),
                ram: Default::default(),
                generation_id: quetzal_engine::spec::new_generation_id()
                    .expect("the kernel's random pool"),
                restore: None,
                cpu_pin: None,
            };
            let run_dir: PathBuf = scratch.join(format!("qmp-{run}"));
            let mut vm = QemuEngine::new()
                .create(&spec, &run_dir, Lifetime::TiedToCaller)
                .await?;
            samples.push(vm.qmp_ready());
            vm.stop().await?;
            while !matches!(vm.next_event().await, VmEvent::Exited { .. }) {}
            vm.wait().await?;
        }
        Ok(samples)
    })
}
