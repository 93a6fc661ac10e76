//! The QEMU engine: one `qemu-system-x86_64` process per VM, driven over QMP.

mod argv;
mod process;
pub mod sandbox;

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UnixStream;
use tokio::sync::mpsc;

pub use argv::argv;
pub use process::{Lifetime, MemoryUse, Usage};

use crate::disk::{self, DiskError, SnapshotAction};
use crate::qmp::{self, QmpClient, QmpError, RunState, ShutdownReason};
use crate::spec::{DiskFormat, VmSpec};
use crate::{Engine, EngineKind, EngineVm, Layout, SnapshotJobs, VmEvent, VmState};

/// How long QEMU may take to open its QMP socket.
const QMP_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// A Unix socket path must fit in `sun_path` (108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("QEMU is not installed: {binary} not found (install the qemu-system-x86 package)")]
    NotInstalled { binary: PathBuf },
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare the run directory {dir}: {source}")]
    RunDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot confine the VM's process ({path}): {source}")]
    Confine {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot pin vCPU {vcpu} to CPU {cpu}: {source}")]
    Pin {
        vcpu: u32,
        cpu: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("socket path {0} is too long for a Unix socket; use a shorter data directory")]
    SocketPathTooLong(PathBuf),
    #[error("QEMU failed to start ({status}): {log}")]
    EarlyExit { status: String, log: String },
    #[error("QEMU did not open its QMP socket within {QMP_READY_TIMEOUT:?}")]
    QmpNotReady,
    #[error("a VM without a disk has nowhere to keep a snapshot")]
    NoDisk,
    #[error("QEMU process {pid} is gone")]
    Gone { pid: u32 },
    #[error("cannot attach to the serial console: {0}")]
    Console(#[source] std::io::Error),
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// Where one VM's sockets and log live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunPaths {
    pub dir: PathBuf,
    pub qmp: PathBuf,
    pub console: PathBuf,
    /// Everything the guest printed on its console, written by QEMU itself
    /// (so it survives the death of whoever was attached).
    pub console_log: PathBuf,
    /// QEMU's stderr, kept to explain why it failed.
    pub log: PathBuf,
    /// The VNC server of a VM with graphics.
    pub vnc: PathBuf,
    /// The guest agent's virtio-serial port (QGA).
    pub agent: PathBuf,
    /// Quetzal's own virtio-serial port (telemetry, service watchdog).
    pub port: PathBuf,
    /// QEMU's pid, written by the process itself before it execs.
    pub pidfile: PathBuf,
    /// A link to the VM's own RAM file, where it has one.
    pub ram: PathBuf,
    /// Where QEMU sends its device state when it is saved.
    pub migration: PathBuf,
}

impl RunPaths {
    /// How long a run directory's own name under `parent` may be for all
    /// its sockets to fit in a Unix socket address.
    pub fn max_dir_name(parent: &Path) -> usize {
        let longest = ["qmp.sock", "console.sock", "vnc.sock"]
            .iter()
            .map(|name| name.len())
            .max()
            .unwrap_or(0);
        MAX_SOCKET_PATH.saturating_sub(parent.as_os_str().len() + 2 + longest)
    }

    pub fn new(dir: &Path) -> Self {
        RunPaths {
            dir: dir.to_owned(),
            qmp: dir.join("qmp.sock"),
            console: dir.join("console.sock"),
            console_log: dir.join("console.log"),
            log: dir.join("qemu.log"),
            vnc: dir.join("vnc.sock"),
            agent: dir.join("qga.sock"),
            port: dir.join("port.sock"),
            pidfile: dir.join("qemu.pid"),
            ram: dir.join("ram"),
            migration: dir.join("migrate.sock"),
        }
    }
}

/// The QEMU engine.
#[derive(Clone, Debug)]
pub struct QemuEngine {
    binary: PathBuf,
}

impl QemuEngine {
    /// The engine using `qemu-system-x86_64` from PATH.
    pub fn new() -> Self {
        Self::with_binary(PathBuf::from("qemu-system-x86_64"))
    }

    pub fn with_binary(binary: PathBuf) -> Self {
        QemuEngine { binary }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Fails with [`QemuError::NotInstalled`] unless the binary can be found.
    pub fn check_installed(&self) -> Result<PathBuf, QemuError> {
        process::resolve(&self.binary).ok_or_else(|| QemuError::NotInstalled {
            binary: self.binary.clone(),
        })
    }
}

impl Default for QemuEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl Engine for QemuEngine {
    type Vm = QemuVm;
    type Error = QemuError;

    fn kind(&self) -> EngineKind {
        EngineKind::Qemu
    }

    fn check_installed(&self) -> Result<(), QemuError> {
        QemuEngine::check_installed(self).map(drop)
    }

    async fn adopt(&self, run_dir: &Path, pid: Option<u32>) -> Option<QemuVm> {
        let Some(pid) = self.leftover(run_dir).or(pid) else {
            // Its QEMU ended while no daemon watched: its cgroup and RAM
            // go now.
            sandbox::cgroup::remove(run_dir);
            sandbox::remove_ram(&paths_ram(run_dir));
            return None;
        };
        match self.attach(run_dir, pid, 1).await {
            Ok(vm) => Some(vm),
            Err(err) => {
                tracing::debug!(pid, error = %err, "cannot take over");
                // One that runs but cannot be taken over is ended too.
                self.end_leftover(run_dir).await;
                None
            }
        }
    }

    fn layout(&self, run_dir: &Path) -> Layout {
        let paths = RunPaths::new(run_dir);
        Layout {
            disk: run_dir.join("root.qcow2"),
            console_log: paths.console_log,
            vnc: paths.vnc,
            agent: Some(paths.agent),
            port: Some(paths.port),
            ram: paths.ram,
        }
    }

    fn max_dir_name(&self, parent: &Path) -> usize {
        RunPaths::max_dir_name(parent)
    }

    fn template_disk_name(&self) -> &'static str {
        "disk.qcow2"
    }

    fn set_cpu_weight(&self, run_dir: &Path, weight: crate::spec::CpuWeight) -> bool {
        match sandbox::cgroup::set_cpu_weight(run_dir, weight) {
            Ok(()) => true,
            Err(err) => {
                tracing::debug!(dir = %run_dir.display(), %err, "no CPU weight to set");
                false
            }
        }
    }

    fn cpu_weight(&self, run_dir: &Path) -> Option<crate::spec::CpuWeight> {
        sandbox::cgroup::cpu_weight(run_dir)
    }

    fn create_disk(&self, base: &Path, disk: &Path, size_mib: u64) -> Result<(), DiskError> {
        disk::create_overlay_sized(base, DiskFormat::Qcow2, disk, Some(size_mib))
    }

    fn copy_disk(
        &self,
        from: &Path,
        keep_base: &Path,
        to: &Path,
        progress: &mut dyn FnMut(u32) -> bool,
    ) -> Result<(), DiskError> {
        disk::copy_onto_base(from, keep_base, to, progress)
    }

    fn snapshot_disk(
        &self,
        disk: &Path,
        action: SnapshotAction,
        tag: &str,
    ) -> Result<(), DiskError> {
        disk::snapshot_offline(disk, action, tag)
    }

    fn disk_size_mib(&self, disk: &Path) -> Result<u64, DiskError> {
        disk::virtual_size(disk).map(|bytes| bytes.div_ceil(1 << 20))
    }

    fn disk_snapshots(&self, disk: &Path) -> Result<Vec<String>, DiskError> {
        disk::snapshot_names(disk)
    }

    async fn create(
        &self,
        spec: &VmSpec,
        run_dir: &Path,
        lifetime: Lifetime,
    ) -> Result<QemuVm, QemuError> {
        let binary = self.check_installed()?;
        let paths = RunPaths::new(run_dir);
        for socket in [&paths.qmp, &paths.console] {
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(QemuError::SocketPathTooLong(socket.clone()));
            }
        }
        prepare_run_dir(&paths)?;
        let handover = sandbox::prepare(spec, &paths)?;
        let spawned = Instant::now();
        let child = process::spawn(
            &binary,
            &argv(spec, &paths),
            &paths.log,
            &paths.pidfile,
            lifetime,
            handover,
        )?;
        // Until it is handed over, a failure below kills what we started.
        let mut guard = SpawnGuard {
            child: Some(child),
            pidfile: paths.pidfile.clone(),
        };
        crate::failpoint::crash("qemu-spawned");
        let child = guard.child.as_mut().expect("held until handed over");
        let (qmp, events) = loop {
            match QmpClient::connect(&paths.qmp).await {
                Ok(connected) => break connected,
                Err(QmpError::Connect { .. }) => {}
                Err(err) => return Err(err.into()),
            }
            if let Some(status) = child.try_wait().map_err(|source| QemuError::Spawn {
                binary: binary.clone(),
                source,
            })? {
                return Err(QemuError::EarlyExit {
                    status: status.to_string(),
                    log: process::log_tail(&paths.log),
                });
            }
            if spawned.elapsed() > QMP_READY_TIMEOUT {
                return Err(QemuError::QmpNotReady);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        if let Some(cpus) = &spec.cpu_pin {
            pin_vcpus(&qmp, cpus).await?;
        }
        if spec.restore.is_some() {
            // Its device state, from the fd it was handed; RAM that is in
            // the template's file is not in the stream.
            qmp.execute(qmp::Command::IgnoreSharedRam).await?;
            qmp.execute(qmp::Command::MigrateIncoming {
                uri: format!("fd:{}", sandbox::restore_fd(spec)),
            })
            .await?;
            qmp.migration_done("migrate-incoming").await?;
        }
        let child = guard.hand_over();
        let qmp_ready = spawned.elapsed();
        tracing::debug!(vm = %spec.name, pid = ?child.id(), ?qmp_ready, "qemu ready");
        Ok(QemuVm {
            pid: child.id(),
            process: Process::Child(child),
            qmp: Arc::new(qmp),
            events,
            paths,
            qmp_ready,
            last_shutdown: None,
            // Read-only disks (a cloud-init seed) are in no snapshot.
            disks: spec
                .disks
                .iter()
                .enumerate()
                .filter(|(_, disk)| !disk.read_only)
                .map(|(index, _)| format!("disk{index}"))
                .collect(),
        })
    }
}

/// Pins vCPU n's thread to the n-th CPU of `cpus` (round the list).
async fn pin_vcpus(qmp: &qmp::QmpClient, cpus: &crate::spec::CpuSet) -> Result<(), QemuError> {
    let list = cpus.cpus();
    for (index, thread) in qmp.vcpu_threads().await? {
        let cpu = list[index as usize % list.len()];
        let mut set = nix::sched::CpuSet::new();
        let pinned = set
            .set(cpu as usize)
            .and_then(|()| {
                let tid = nix::unistd::Pid::from_raw(i32::try_from(thread).unwrap_or(0));
                nix::sched::sched_setaffinity(tid, &set)
            })
            .map_err(|errno| QemuError::Pin {
                vcpu: index,
                cpu,
                source: errno.into(),
            });
        pinned?;
    }
    Ok(())
}

/// A QEMU just spawned and not yet handed to its [`QemuVm`]: dropped
/// before then (a step of its start failed), it kills the process.
struct SpawnGuard {
    child: Option<tokio::process::Child>,
    pidfile: PathBuf,
}

impl SpawnGuard {
    fn hand_over(mut self) -> tokio::process::Child {
        self.child.take().expect("handed over once")
    }
}

impl Drop for SpawnGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            // Reaped by tokio's orphan queue; the file no longer names a
            // live QEMU either way.
            let _ = std::fs::remove_file(&self.pidfile);
        }
    }
}

impl QemuEngine {
    /// The pid of a QEMU started in `run_dir` that still runs (its
    /// pidfile names a live process serving that directory's QMP socket).
    pub fn leftover(&self, run_dir: &Path) -> Option<u32> {
        let paths = RunPaths::new(run_dir);
        process::pid_from_file(&paths.pidfile, &paths.qmp)
    }

    /// Kills a QEMU left running in `run_dir` that cannot be taken over
    /// (its QMP socket is not there yet) and waits for it to be gone.
    pub async fn end_leftover(&self, run_dir: &Path) {
        let Some(pid) = self.leftover(run_dir) else {
            return;
        };
        tracing::warn!(pid, dir = %run_dir.display(), "ending a QEMU left from an earlier daemon");
        process::kill(pid);
        let deadline = Instant::now() + QMP_READY_TIMEOUT;
        while process::is_alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sandbox::cgroup::remove_when_left(run_dir).await;
        sandbox::remove_ram(&paths_ram(run_dir));
    }

    /// Takes over a QEMU that a previous owner started in `run_dir` with
    /// process id `pid` (a daemon restarting): connects to its QMP socket.
    /// Fails with [`QemuError::Gone`] when that QEMU is no longer there.
    pub async fn attach(
        &self,
        run_dir: &Path,
        pid: u32,
        disks: usize,
    ) -> Result<QemuVm, QemuError> {
        let paths = RunPaths::new(run_dir);
        if !process::runs_with(pid, &paths.qmp) {
            return Err(QemuError::Gone { pid });
        }
        let (qmp, events) = match QmpClient::connect(&paths.qmp).await {
            Ok(connected) => connected,
            Err(QmpError::Connect { .. } | QmpError::Disconnected) => {
                return Err(QemuError::Gone { pid });
            }
            Err(err) => return Err(err.into()),
        };
        Ok(QemuVm {
            pid: Some(pid),
            process: Process::Adopted(pid),
            qmp: Arc::new(qmp),
            events,
            paths,
            qmp_ready: Duration::ZERO,
            last_shutdown: None,
            disks: (0..disks).map(|index| format!("disk{index}")).collect(),
        })
    }
}

fn paths_ram(run_dir: &Path) -> PathBuf {
    RunPaths::new(run_dir).ram
}

fn prepare_run_dir(paths: &RunPaths) -> Result<(), QemuError> {
    let failed = |source| QemuError::RunDir {
        dir: paths.dir.clone(),
        source,
    };
    std::fs::create_dir_all(&paths.dir).map_err(failed)?;
    for stale in [&paths.qmp, &paths.console, &paths.agent, &paths.port] {
        match std::fs::remove_file(stale) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(failed(err)),
        }
    }
    Ok(())
}

/// Snapshot jobs of one VM (internal qcow2 snapshots of every disk).
#[derive(Clone, Debug)]
pub struct Snapshots {
    qmp: Arc<QmpClient>,
    /// The node names of its writable disks (`disk0`…): what a snapshot
    /// covers.
    disks: Vec<String>,
}

impl Snapshots {
    /// Saves snapshot `tag` of every disk with the VM's memory (kept in
    /// the first disk). The guest is paused while it is written and
    /// resumes after.
    pub async fn save(&self, tag: &str) -> Result<(), QemuError> {
        let job = self.job("save", tag, true)?;
        Ok(self
            .qmp
            .run_job(qmp::Command::SnapshotSave(job), &format!("save-{tag}"))
            .await?)
    }

    /// Loads snapshot `tag`: disks and memory go back to that moment. The
    /// vCPUs are stopped afterwards; resume them.
    pub async fn load(&self, tag: &str) -> Result<(), QemuError> {
        let job = self.job("load", tag, true)?;
        Ok(self
            .qmp
            .run_job(qmp::Command::SnapshotLoad(job), &format!("load-{tag}"))
            .await?)
    }

    /// Deletes snapshot `tag` from every disk.
    pub async fn delete(&self, tag: &str) -> Result<(), QemuError> {
        let job = self.job("delete", tag, false)?;
        Ok(self
            .qmp
            .run_job(qmp::Command::SnapshotDelete(job), &format!("delete-{tag}"))
            .await?)
    }

    fn job(&self, kind: &str, tag: &str, memory: bool) -> Result<qmp::SnapshotJob, QemuError> {
        if self.disks.is_empty() {
            return Err(QemuError::NoDisk);
        }
        Ok(qmp::SnapshotJob {
            job_id: format!("{kind}-{tag}"),
            tag: tag.to_owned(),
            vmstate: memory.then(|| "disk0".to_owned()),
            devices: self.disks.clone(),
        })
    }
}

/// How we know the QEMU process.
#[derive(Debug)]
enum Process {
    /// We started it: we can reap it and read its exit status.
    Child(tokio::process::Child),
    /// A previous owner started it (a daemon before its restart).
    Adopted(u32),
}

/// One running QEMU process and its QMP session.
#[derive(Debug)]
pub struct QemuVm {
    pid: Option<u32>,
    process: Process,
    qmp: Arc<QmpClient>,
    events: mpsc::UnboundedReceiver<qmp::Event>,
    paths: RunPaths,
    qmp_ready: Duration,
    last_shutdown: Option<ShutdownReason>,
    /// The node names of its writable disks (`disk0`…): what a snapshot
    /// covers.
    disks: Vec<String>,
}

impl QemuVm {
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Time from spawning QEMU to a negotiated QMP session.
    pub fn qmp_ready(&self) -> Duration {
        self.qmp_ready
    }

    /// Kills QEMU outright (SIGKILL) and waits for it to be gone.
    pub async fn kill(&mut self) -> Result<Option<ExitStatus>, QemuError> {
        match &mut self.process {
            Process::Child(child) => {
                let _ = child.start_kill();
            }
            Process::Adopted(pid) => process::kill(*pid),
        }
        self.wait().await
    }

    /// Waits for the QEMU process to exit; its status when we started it,
    /// `None` for an adopted process (only its parent can read that).
    pub async fn wait(&mut self) -> Result<Option<ExitStatus>, QemuError> {
        let ended = match &mut self.process {
            Process::Child(child) => {
                child
                    .wait()
                    .await
                    .map(Some)
                    .map_err(|source| QemuError::Spawn {
                        binary: PathBuf::from("qemu"),
                        source,
                    })
            }
            Process::Adopted(pid) => {
                while process::is_alive(*pid) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(None)
            }
        };
        // Its cgroup and its RAM go with it.
        sandbox::cgroup::remove_when_left(&self.paths.dir).await;
        sandbox::remove_ram(&self.paths.ram);
        ended
    }

    /// Saves the device state of the paused VM to `file` (its RAM, in
    /// its shared file, is not in it): what an instant clone restores.
    pub async fn save_state(&self, file: &Path) -> Result<(), QemuError> {
        let socket = &self.paths.migration;
        let failed = |source| QemuError::RunDir {
            dir: socket.clone(),
            source,
        };
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket).map_err(failed)?;
        // QEMU runs as the VM's user; the run directory is closed to
        // every other.
        std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .map_err(failed)?;
        let mut out = tokio::fs::File::create(file).await.map_err(failed)?;
        let copy = async {
            let (mut stream, _) = listener.accept().await?;
            tokio::io::copy(&mut stream, &mut out).await?;
            tokio::io::AsyncWriteExt::flush(&mut out).await?;
            out.sync_all().await
        };
        let migrate = async {
            self.qmp.execute(qmp::Command::IgnoreSharedRam).await?;
            self.qmp
                .execute(qmp::Command::Migrate {
                    uri: format!("unix:{}", socket.display()),
                })
                .await?;
            self.qmp.migration_done("migrate").await
        };
        let (copied, migrated) = tokio::join!(copy, migrate);
        let _ = std::fs::remove_file(socket);
        migrated?;
        copied.map_err(failed)
    }

    /// CPU time and resident memory of the QEMU process, from /proc.
    pub fn usage(&self) -> Option<process::Usage> {
        process::usage(self.pid?)
    }

    /// How the QEMU process's memory is shared, from /proc.
    pub fn memory_use(&self) -> Option<MemoryUse> {
        MemoryUse::of_pid(self.pid?)
    }

    /// What runs this VM's snapshot jobs, apart from its owner: a job
    /// can take long, and the owner keeps serving events and the console
    /// meanwhile.
    pub fn snapshots(&self) -> Snapshots {
        Snapshots {
            qmp: Arc::clone(&self.qmp),
            disks: self.disks.clone(),
        }
    }

    /// Bytes read and written by the guest's disks since QEMU started.
    pub async fn disk_bytes(&self) -> Result<(u64, u64), QemuError> {
        Ok(self.qmp.block_bytes().await?)
    }

    /// The last lines QEMU wrote to stderr.
    pub fn log_tail(&self) -> String {
        process::log_tail(&self.paths.log)
    }

    fn translate(&mut self, event: qmp::Event) -> Option<VmEvent> {
        match event {
            qmp::Event::Resume => Some(VmEvent::Running),
            qmp::Event::Stop => Some(VmEvent::Paused),
            qmp::Event::Powerdown => Some(VmEvent::PowerdownRequested),
            qmp::Event::Reset { guest } => Some(VmEvent::Reset { by_guest: guest }),
            qmp::Event::Watchdog { .. } => Some(VmEvent::WatchdogFired),
            qmp::Event::GuestPanicked { .. } => Some(VmEvent::Crashed {
                reason: "the guest kernel panicked".to_owned(),
            }),
            qmp::Event::Shutdown { reason, .. } => {
                self.last_shutdown = Some(reason);
                match reason {
                    ShutdownReason::GuestShutdown => Some(VmEvent::GuestPoweredOff),
                    // The GUEST_PANICKED event already said so.
                    ShutdownReason::GuestPanic => None,
                    other => Some(VmEvent::ShuttingDown {
                        reason: format!("{other:?}"),
                    }),
                }
            }
            qmp::Event::BlockIoError {
                action,
                nospace,
                reason,
            } => (action == "stop").then_some(VmEvent::DiskError {
                no_space: nospace,
                reason,
            }),
            qmp::Event::Other { .. } => None,
        }
    }
}

impl crate::Failure for QemuError {
    fn no_space(&self) -> bool {
        match self {
            QemuError::Qmp(QmpError::Refused { desc, .. }) => crate::says_no_space(desc),
            _ => false,
        }
    }
}

impl SnapshotJobs for Snapshots {
    type Error = QemuError;

    async fn save(&self, tag: &str) -> Result<(), QemuError> {
        Snapshots::save(self, tag).await
    }

    async fn load(&self, tag: &str) -> Result<(), QemuError> {
        Snapshots::load(self, tag).await
    }

    async fn delete(&self, tag: &str) -> Result<(), QemuError> {
        Snapshots::delete(self, tag).await
    }
}

impl EngineVm for QemuVm {
    type Error = QemuError;
    type Snapshots = Snapshots;

    fn pid(&self) -> Option<u32> {
        self.pid
    }

    async fn kill(&mut self) -> Result<(), QemuError> {
        QemuVm::kill(self).await.map(drop)
    }

    async fn wait(&mut self) -> Result<(), QemuError> {
        QemuVm::wait(self).await.map(drop)
    }

    fn usage(&self) -> Option<Usage> {
        QemuVm::usage(self)
    }

    fn memory_use(&self) -> Option<MemoryUse> {
        QemuVm::memory_use(self)
    }

    async fn disk_bytes(&self) -> Result<(u64, u64), QemuError> {
        QemuVm::disk_bytes(self).await
    }

    async fn balloon_memory(&self) -> Result<Option<(u64, u64)>, QemuError> {
        Ok(self.qmp.balloon_memory().await?)
    }

    fn log_tail(&self) -> String {
        QemuVm::log_tail(self)
    }

    fn snapshots(&self) -> Snapshots {
        QemuVm::snapshots(self)
    }

    async fn save_state(&self, file: &Path) -> Result<(), QemuError> {
        QemuVm::save_state(self, file).await
    }

    async fn console(&self) -> Result<UnixStream, QemuError> {
        UnixStream::connect(&self.paths.console)
            .await
            .map_err(QemuError::Console)
    }

    async fn start(&self) -> Result<(), QemuError> {
        self.qmp.execute(qmp::Command::Cont).await?;
        Ok(())
    }

    async fn pause(&self) -> Result<(), QemuError> {
        self.qmp.execute(qmp::Command::Stop).await?;
        Ok(())
    }

    async fn resume(&self) -> Result<(), QemuError> {
        self.qmp.execute(qmp::Command::Cont).await?;
        Ok(())
    }

    async fn powerdown(&self) -> Result<(), QemuError> {
        self.qmp.execute(qmp::Command::SystemPowerdown).await?;
        Ok(())
    }

    async fn stop(&self) -> Result<(), QemuError> {
        Ok(self.qmp.quit().await?)
    }

    async fn state(&self) -> Result<VmState, QemuError> {
        let status = match self.qmp.query_status().await {
            Ok(status) => status,
            Err(QmpError::Disconnected) => return Ok(VmState::Stopped),
            Err(err) => return Err(err.into()),
        };
        Ok(match status.status {
            RunState::Prelaunch => VmState::Created,
            RunState::Running => VmState::Running,
            RunState::Paused => VmState::Paused,
            RunState::GuestPanicked | RunState::InternalError => VmState::Crashed,
            RunState::Shutdown | RunState::Other => VmState::Stopped,
        })
    }

    async fn next_event(&mut self) -> VmEvent {
        loop {
            match self.events.recv().await {
                Some(event) => {
                    if let Some(event) = self.translate(event) {
                        return event;
                    }
                }
                None => {
                    let expected = matches!(
                        self.last_shutdown,
                        Some(ShutdownReason::GuestShutdown | ShutdownReason::HostQmpQuit)
                    );
                    return VmEvent::Exited { expected };
                }
            }
        }
    }
}
