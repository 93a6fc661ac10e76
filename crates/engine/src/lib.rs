//! Quetzal's engine layer: a typed VM spec goes in, a running VM with typed
//! events comes out. The node never builds a QEMU command line or speaks QMP
//! itself; engines never touch the node's store.
//!
//! - [`accel`] and [`host`]: what the host can do, and KVM-or-TCG.
//! - [`spec`]: the validated [`VmSpec`].
//! - [`qmp`]: the typed QMP client.
//! - [`qemu`]: the QEMU engine; [`disk`]: qcow2 overlays through qemu-img.
//! - [`engines`]: every engine behind one type, which the node holds.
//! - `memory` (feature `memory`): VMs in memory, for the node's unit tests.

pub mod accel;
pub mod disk;
pub mod engines;
pub mod failpoint;
pub mod host;
#[cfg(feature = "memory")]
pub mod memory;
pub mod qemu;
pub mod qmp;
pub mod spec;

use std::future::Future;
use std::path::Path;

use tokio::net::UnixStream;

pub use accel::Accel;
pub use disk::{DiskError, SnapshotAction};
pub use engines::{AnyEngine, AnyError, AnySnapshots, AnyVm, Engines};
pub use qemu::{Lifetime, QemuEngine, QemuError, QemuVm};
pub use spec::VmSpec;

/// A VM's state as the engine sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// The process exists, the vCPUs have not run yet.
    Created,
    Running,
    Paused,
    Crashed,
    Stopped,
}

/// What happened to a VM, as told by its engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    Running,
    /// The vCPUs stopped: asked for, or by the engine itself (after a
    /// [`VmEvent::DiskError`]).
    Paused,
    /// A disk request failed and the engine paused the VM for it (a full
    /// host disk); it resumes when asked and fails again while the cause
    /// lasts.
    DiskError {
        no_space: bool,
        reason: String,
    },
    /// The power button was pressed; the guest decides what to do.
    PowerdownRequested,
    Reset {
        by_guest: bool,
    },
    /// The guest's watchdog device fired (its watchdog daemon stopped
    /// feeding it); the engine resets the guest.
    WatchdogFired,
    /// The guest powered itself off.
    GuestPoweredOff,
    /// The host is shutting the VM down (quit, a signal).
    ShuttingDown {
        reason: String,
    },
    Crashed {
        reason: String,
    },
    /// The engine process is gone. `expected` is true after a guest poweroff
    /// or a requested stop, false when it died (killed, crashed).
    Exited {
        expected: bool,
    },
}

/// Which engine runs a VM; recorded with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// One `qemu-system-x86_64` per VM, over QMP.
    Qemu,
    /// VMs that exist only in memory, for the node's unit tests.
    Memory,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Qemu => "qemu",
            EngineKind::Memory => "memory",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [EngineKind::Qemu, EngineKind::Memory]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

/// Where a VM's files are in its directory, as its engine lays them out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The root disk.
    pub disk: std::path::PathBuf,
    /// Everything the guest printed on its first serial port.
    pub console_log: std::path::PathBuf,
    /// The graphical console's VNC server (a Unix socket).
    pub vnc: std::path::PathBuf,
    /// The guest agent's channel (a Unix socket speaking QGA), if the
    /// engine gives VMs one.
    pub agent: Option<std::path::PathBuf>,
    /// Quetzal's own agent port (a Unix socket, JSON lines), if the engine
    /// gives VMs one.
    pub port: Option<std::path::PathBuf>,
    /// The VM's own RAM file while it runs with one ([`spec::Ram::Shared`]):
    /// a link to it, or the file itself.
    pub ram: std::path::PathBuf,
}

/// CPU time and memory of a VM's engine process.
pub use qemu::{MemoryUse, Usage};

/// Everything the node does to VMs and their disks. A typed [`VmSpec`]
/// goes in; VMs with typed [`VmEvent`]s come out. The node never names
/// the program, protocol or files behind it.
pub trait Engine: Send + Sync + 'static {
    type Vm: EngineVm;
    type Error: std::error::Error + Send + Sync + 'static;

    /// Which engine this is.
    fn kind(&self) -> EngineKind;

    /// Fails when the engine cannot run VMs on this host.
    fn check_installed(&self) -> Result<(), Self::Error>;

    /// Starts a VM's process in `run_dir` with its vCPUs not yet running;
    /// attach the console (and plug its NICs), then [`EngineVm::start`].
    /// A step that fails ends what it started.
    fn create(
        &self,
        spec: &VmSpec,
        run_dir: &Path,
        lifetime: Lifetime,
    ) -> impl Future<Output = Result<Self::Vm, Self::Error>> + Send;

    /// Takes over the VM an earlier owner started in `run_dir` (found by
    /// what the engine recorded when it started it, or by `pid`), if it
    /// still runs; one that runs but cannot be taken over is ended.
    fn adopt(
        &self,
        run_dir: &Path,
        pid: Option<u32>,
    ) -> impl Future<Output = Option<Self::Vm>> + Send;

    /// Where a VM's files are in `run_dir`.
    fn layout(&self, run_dir: &Path) -> Layout;

    /// How long the name of a run directory under `parent` may be.
    fn max_dir_name(&self, parent: &Path) -> usize;

    /// The file name of a template's disk in its directory.
    fn template_disk_name(&self) -> &'static str;

    // Disks. These block: run them off the async runtime's workers.

    /// A new disk at `disk` whose reads come from `base` until written
    /// (copy on write), `size_mib` large.
    fn create_disk(&self, base: &Path, disk: &Path, size_mib: u64) -> Result<(), DiskError>;

    /// Copies `from` into a new disk at `to` that keeps only `keep_base`
    /// underneath; `progress` hears the percentage and stops the copy by
    /// answering `false` ([`DiskError::Cancelled`]).
    fn copy_disk(
        &self,
        from: &Path,
        keep_base: &Path,
        to: &Path,
        progress: &mut dyn FnMut(u32) -> bool,
    ) -> Result<(), DiskError>;

    /// A disk-only snapshot of a disk no VM has open.
    fn snapshot_disk(
        &self,
        disk: &Path,
        action: SnapshotAction,
        tag: &str,
    ) -> Result<(), DiskError>;

    /// The size the guest sees, in MiB.
    fn disk_size_mib(&self, disk: &Path) -> Result<u64, DiskError>;

    /// The names of the snapshots a disk holds (also while its VM runs).
    fn disk_snapshots(&self, disk: &Path) -> Result<Vec<String>, DiskError>;

    /// Gives the running VM of `run_dir` a share of contended CPU time;
    /// false where the engine has no hold on it (no cgroup of its own).
    fn set_cpu_weight(&self, run_dir: &Path, weight: spec::CpuWeight) -> bool;

    /// The VM's CPU weight now, where the engine has a hold on it.
    fn cpu_weight(&self, run_dir: &Path) -> Option<spec::CpuWeight>;
}

/// One VM an [`Engine`] runs.
pub trait EngineVm: Send + Sync + 'static {
    type Error: std::error::Error + Send + Sync + 'static;
    type Snapshots: SnapshotJobs;

    /// The engine process's id, while it runs.
    fn pid(&self) -> Option<u32>;
    /// A new connection to the first serial port.
    fn console(&self) -> impl Future<Output = Result<UnixStream, Self::Error>> + Send;
    /// Lets the vCPUs of a created VM run.
    fn start(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn pause(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn resume(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Asks the guest to shut down (ACPI power button).
    fn powerdown(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Ends the VM at once, in order.
    fn stop(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Ends the VM's process outright and waits until it is gone.
    fn kill(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Waits until the VM's process is gone.
    fn wait(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn state(&self) -> impl Future<Output = Result<VmState, Self::Error>> + Send;
    /// The next state change; [`VmEvent::Exited`] once the VM is gone, and
    /// again on every later call.
    fn next_event(&mut self) -> impl Future<Output = VmEvent> + Send;
    /// CPU time and memory of its process.
    fn usage(&self) -> Option<Usage>;
    /// How its process's memory is shared (with a template, by KSM).
    fn memory_use(&self) -> Option<MemoryUse>;
    /// Bytes read and written by its disks.
    fn disk_bytes(&self) -> impl Future<Output = Result<(u64, u64), Self::Error>> + Send;
    /// The guest's total and used memory as its balloon driver reports
    /// them; `None` where it has none (or has not reported yet).
    fn balloon_memory(
        &self,
    ) -> impl Future<Output = Result<Option<(u64, u64)>, Self::Error>> + Send;
    /// The last lines its process wrote about itself (why it failed).
    fn log_tail(&self) -> String;
    /// What runs its memory snapshots, beside whoever owns the VM.
    fn snapshots(&self) -> Self::Snapshots;
    /// Saves the device state of the paused VM to `file`, without the RAM
    /// in its shared file: with that file, what an instant clone restores
    /// ([`VmSpec::restore`]).
    fn save_state(&self, file: &Path) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// An engine's error, with what the node acts on told apart (the host
/// out of space is a 507, not a 500).
pub trait Failure: std::error::Error + Send + Sync + 'static {
    /// The host had no room for what the engine wrote.
    fn no_space(&self) -> bool;
}

/// Whether a program's message is the operating system's ENOSPC: how
/// QEMU and qemu-img report it (they report errors as text only). Used
/// where their output is turned into typed errors, nowhere else.
pub fn says_no_space(message: &str) -> bool {
    let text = std::io::Error::from_raw_os_error(nix::libc::ENOSPC).to_string();
    // "No space left on device (os error 28)": compare the words.
    let words = text.split(" (os error").next().unwrap_or(&text);
    message.contains(words)
}

/// Snapshots with memory of a running VM (every disk and its RAM).
pub trait SnapshotJobs: Clone + Send + Sync + 'static {
    type Error: Failure;

    fn save(&self, tag: &str) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Loads a snapshot; the vCPUs are stopped afterwards.
    fn load(&self, tag: &str) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn delete(&self, tag: &str) -> impl Future<Output = Result<(), Self::Error>> + Send;
}
