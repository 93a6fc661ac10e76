//! `quetzal run`: one VM in the foreground, its first serial port on this
//! terminal, ended by the guest powering off.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use nix::fcntl::{Flock, FlockArg};
use quetzal_engine::accel::{self, AccelProbe};
use quetzal_engine::spec::{
    Boot, Cpus, DirectBoot, Disk, DiskFormat, Mac, Machine, MemoryMib, Nic, NicBackend, Uefi,
    VmName, VmSpec,
};
use quetzal_engine::{Accel, Engine, EngineVm, Lifetime, QemuEngine, QemuVm, VmEvent, disk, host};
use quetzal_image::{DEFAULT_IMAGE, Firmware, ImageStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::console::{ESCAPE, ESCAPE_NAME, RawTerminal, stdin_reader};
use crate::data_dir;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Boot a built image (see `quetzal image list`) [default: tiny].
    #[arg(long, conflicts_with = "kernel")]
    image: Option<String>,
    /// Boot this kernel instead of an image.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The initramfs for --kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// The kernel command line [default: the image's, or console=ttyS0].
    #[arg(long)]
    append: Option<String>,
    /// An extra disk (qcow2 or raw), attached as virtio; may be repeated.
    /// It is written to directly.
    #[arg(long = "disk")]
    disks: Vec<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Keep this VM's root disk overlay under DATA/run/NAME, so what
    /// the guest writes is there at its next run. Without a name the
    /// overlay is thrown away at exit.
    #[arg(long)]
    name: Option<String>,
    /// The network of the VM's NIC.
    #[arg(long, value_enum, default_value_t = Net::User)]
    net: Net,
    /// Override the accelerator (kvm fails where it cannot work).
    #[arg(long)]
    accel: Option<Accel>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Net {
    /// QEMU's user-mode NAT with DHCP: no host setup needed.
    User,
    /// No NIC.
    None,
}

/// How a foreground VM ended.
#[derive(Debug)]
enum Outcome {
    PoweredOff,
    StoppedByUser,
    Signal(i32),
    Crashed(String),
    QemuDied(String),
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    // The QEMU process is spawned on this (the main) thread: with
    // Lifetime::TiedToCaller it dies with it.
    let outcome = crate::block_on(run_vm(args))?;
    let code = match outcome {
        Outcome::PoweredOff => 0,
        Outcome::StoppedByUser => {
            eprintln!("quetzal: VM stopped ({ESCAPE_NAME})");
            0
        }
        Outcome::Signal(signal) => {
            eprintln!("quetzal: VM stopped by signal {signal}");
            128 + signal
        }
        Outcome::Crashed(reason) => {
            eprintln!("quetzal: guest crashed: {reason}");
            1
        }
        Outcome::QemuDied(reason) => {
            eprintln!("quetzal: QEMU exited unexpectedly: {reason}");
            1
        }
    };
    // The stdin reader thread may sit in a blocking read: leave without it.
    std::io::stdout().flush().ok();
    std::process::exit(code);
}

/// The validated spec and where the VM runs; `_lock` and `_scratch` live as
/// long as the VM.
struct Prepared {
    spec: VmSpec,
    run_dir: PathBuf,
    _lock: Option<Flock<std::fs::File>>,
    _scratch: Option<tempfile::TempDir>,
}

fn prepare(args: &RunArgs) -> anyhow::Result<Prepared> {
    let cpus = Cpus::new(args.cpus)?;
    let host_memory = host::host_memory_mib().context("cannot read /proc/meminfo")?;
    let memory = MemoryMib::new(args.memory, host_memory)?;
    let accel = accel::choose_with_override(&AccelProbe::of_this_host(), args.accel)?.accel;
    let engine = QemuEngine::new();
    engine.check_installed()?;

    let data = data_dir();
    let (name, run_dir, lock, scratch) = match &args.name {
        Some(name) => {
            let name = VmName::new(name)?;
            // Not vms/: that is quetzald's.
            let dir = data.join("run").join(name.as_str());
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let lock_file = std::fs::File::create(dir.join("lock"))
                .with_context(|| format!("cannot create {}", dir.join("lock").display()))?;
            let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
                .map_err(|_| anyhow::anyhow!("VM {name} is already running"))?;
            (name, dir, Some(lock), None)
        }
        None => {
            let runs = data.join("run");
            std::fs::create_dir_all(&runs)
                .with_context(|| format!("cannot create {}", runs.display()))?;
            let scratch = tempfile::Builder::new()
                // A VM name cannot start with '.': no clash with --name.
                .prefix(".vm-")
                .tempdir_in(&runs)
                .with_context(|| format!("cannot create a directory in {}", runs.display()))?;
            let name = VmName::new(&format!("run-{}", std::process::id()))?;
            (name, scratch.path().to_owned(), None, Some(scratch))
        }
    };

    let mut disks = Vec::new();
    let boot = match &args.kernel {
        Some(kernel) => Boot::Kernel(DirectBoot::new(
            kernel,
            args.initrd.as_deref(),
            args.append.as_deref().unwrap_or("console=ttyS0"),
        )?),
        None => {
            let image_name = args.image.as_deref().unwrap_or(DEFAULT_IMAGE);
            let image = ImageStore::new(&data).get(image_name)?;
            let overlay = run_dir.join("root.qcow2");
            if !overlay.exists() {
                disk::create_overlay(&image.root_disk(), DiskFormat::Qcow2, &overlay)?;
            }
            disks.push(Disk {
                path: overlay,
                format: DiskFormat::Qcow2,
                read_only: false,
            });
            // Its kernel directly where it has one (the faster boot), else
            // its disk's bootloader.
            match image.kernel() {
                Some(kernel) => Boot::Kernel(DirectBoot::new(
                    &kernel,
                    image.initrd().as_deref(),
                    args.append.as_deref().unwrap_or(&image.manifest.append),
                )?),
                None => match image.manifest.firmware {
                    Firmware::Bios => Boot::Bios,
                    Firmware::Uefi => Boot::Uefi(Uefi::new(&run_dir.join("uefi-vars.fd"))?),
                },
            }
        }
    };
    for path in &args.disks {
        let (format, _) = disk::probe(path)?;
        disks.push(Disk {
            path: path.clone(),
            format,
            read_only: false,
        });
    }
    let nics = match args.net {
        Net::User => vec![Nic {
            mac: Mac::local(std::process::id()),
            backend: NicBackend::User,
        }],
        Net::None => vec![],
    };
    let spec = VmSpec {
        name,
        cpus,
        memory,
        machine: Machine::Pc,
        accel,
        boot,
        disks,
        nics,
        graphics: false,
        confinement: Default::default(),
        ram: Default::default(),
        generation_id: quetzal_engine::spec::new_generation_id()?,
        restore: None,
        cpu_pin: None,
    };
    Ok(Prepared {
        spec,
        run_dir,
        _lock: lock,
        _scratch: scratch,
    })
}

async fn run_vm(args: RunArgs) -> anyhow::Result<Outcome> {
    let prepared = prepare(&args)?;
    let mut vm = QemuEngine::new()
        .create(&prepared.spec, &prepared.run_dir, Lifetime::TiedToCaller)
        .await?;
    let result = attach(&mut vm).await;
    if result.is_err() {
        let _ = vm.kill().await;
    }
    result
}

/// Connects the console, starts the vCPUs and shuttles bytes until the VM
/// is gone.
async fn attach(vm: &mut QemuVm) -> anyhow::Result<Outcome> {
    let console = vm.console().await?;
    let (mut from_guest, mut to_guest) = console.into_split();
    let terminal = RawTerminal::enter().context("cannot put the terminal in raw mode")?;
    if terminal.is_some() {
        eprint!("quetzal: console attached; {ESCAPE_NAME} stops the VM\r\n");
    }
    let watch_escape = terminal.is_some();
    let mut keys = stdin_reader();
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    vm.start().await?;

    let mut stdout = tokio::io::stdout();
    let mut buf = vec![0u8; 16 * 1024];
    let mut outcome: Option<Outcome> = None;
    let mut exited = false;
    let mut console_open = true;
    // Ends when QEMU has exited and the console has said all it had to.
    while console_open || !exited {
        tokio::select! {
            read = from_guest.read(&mut buf), if console_open => match read {
                Ok(0) | Err(_) => console_open = false,
                Ok(n) => {
                    stdout.write_all(&buf[..n]).await?;
                    stdout.flush().await?;
                }
            },
            key = keys.recv(), if outcome.is_none() => match key {
                Some(bytes) if watch_escape && bytes.contains(&ESCAPE) => {
                    let before = bytes.split(|&b| b == ESCAPE).next().unwrap_or_default();
                    to_guest.write_all(before).await?;
                    outcome = Some(Outcome::StoppedByUser);
                    vm.stop().await?;
                }
                Some(bytes) => to_guest.write_all(&bytes).await?,
                // stdin ended: the guest keeps running until it powers off.
                None => keys = mpsc::unbounded_channel().1,
            },
            event = vm.next_event(), if !exited => match event {
                VmEvent::GuestPoweredOff => {
                    outcome.get_or_insert(Outcome::PoweredOff);
                }
                VmEvent::Crashed { reason } => {
                    outcome.get_or_insert(Outcome::Crashed(reason));
                }
                VmEvent::Exited { expected } => {
                    exited = true;
                    if !expected && outcome.is_none() {
                        let status = vm.wait().await?.map_or_else(|| "exited".to_owned(), |s| s.to_string());
                        outcome = Some(Outcome::QemuDied(format!("{status}: {}", vm.log_tail())));
                    }
                }
                _ => {}
            },
            Some(number) = next_signal(&mut interrupt, &mut terminate, &mut hangup), if outcome.is_none() => {
                outcome = Some(Outcome::Signal(number));
                vm.stop().await?;
            }
            // The console normally closes with QEMU; do not wait on it forever.
            () = tokio::time::sleep(Duration::from_secs(2)), if exited => break,
        }
    }
    drop(terminal);
    let _ = vm.wait().await;
    Ok(outcome.unwrap_or_else(|| Outcome::QemuDied(format!("console closed: {}", vm.log_tail()))))
}

/// The number of the next of the three signals that end a foreground
/// program.
async fn next_signal(
    interrupt: &mut tokio::signal::unix::Signal,
    terminate: &mut tokio::signal::unix::Signal,
    hangup: &mut tokio::signal::unix::Signal,
) -> Option<i32> {
    tokio::select! {
        got = interrupt.recv() => got.map(|()| 2),
        got = terminate.recv() => got.map(|()| 15),
        got = hangup.recv() => got.map(|()| 1),
    }
}
