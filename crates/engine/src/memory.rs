//! An engine whose VMs exist only in memory, for the node's unit tests
//! (built with the `memory` feature, never into quetzald's engines):
//! the node's rules (states, recovery, operations) run against it without
//! QEMU, and a test plays the engine's part (a VM that pauses or dies by
//! itself). Disks are plain files, so what the node makes and removes can
//! be seen.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::{
    DiskError, Engine, EngineKind, EngineVm, Layout, Lifetime, SnapshotAction, SnapshotJobs, Usage,
    VmEvent, VmSpec, VmState,
};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MemoryError(String);

impl crate::Failure for MemoryError {
    fn no_space(&self) -> bool {
        false
    }
}

/// One VM's engine-side state, shared by every handle to it.
#[derive(Debug)]
struct Machine {
    state: VmState,
    pid: u32,
    events: mpsc::UnboundedSender<VmEvent>,
    gone: watch::Sender<bool>,
    /// The guest's side of the serial console.
    guest_console: Option<UnixStream>,
}

#[derive(Debug, Default)]
struct Shared {
    machines: HashMap<PathBuf, Machine>,
    next_pid: u32,
    /// The CPU weight each run directory's VM was given.
    weights: HashMap<PathBuf, crate::spec::CpuWeight>,
}

/// The engine. Clones share their VMs (a "restarted daemon" gets a clone).
#[derive(Clone, Debug, Default)]
pub struct MemoryEngine {
    shared: Arc<Mutex<Shared>>,
}

impl MemoryEngine {
    /// How many VMs run (none may be left behind).
    pub fn running(&self) -> usize {
        let shared = self
            .shared
            .lock()
            .expect("never poisoned: no panics while held");
        shared
            .machines
            .values()
            .filter(|m| !*m.gone.borrow())
            .count()
    }

    /// Plays the engine: the VM in `dir` reports `event` (and is in the
    /// state it implies).
    pub fn report(&self, dir: &Path, event: VmEvent) {
        let mut shared = self
            .shared
            .lock()
            .expect("never poisoned: no panics while held");
        let machine = shared.machines.get_mut(dir).expect("a VM runs there");
        match &event {
            VmEvent::Paused => machine.state = VmState::Paused,
            VmEvent::Running => machine.state = VmState::Running,
            _ => {}
        }
        let _ = machine.events.send(event);
    }

    /// The VM in `dir` dies at once (as a killed QEMU).
    pub fn crash(&self, dir: &Path) {
        let mut shared = self
            .shared
            .lock()
            .expect("never poisoned: no panics while held");
        let machine = shared.machines.get_mut(dir).expect("a VM runs there");
        end(machine, false);
    }

    fn handle(&self, dir: &Path, machine: &mut Machine) -> MemoryVm {
        let (events, receiver) = mpsc::unbounded_channel();
        machine.events = events;
        MemoryVm {
            engine: self.clone(),
            dir: dir.to_owned(),
            pid: machine.pid,
            events: receiver,
            gone: machine.gone.subscribe(),
            exited: false,
        }
    }
}

fn end(machine: &mut Machine, expected: bool) {
    if *machine.gone.borrow() {
        return;
    }
    machine.state = VmState::Stopped;
    machine.guest_console = None;
    let _ = machine.events.send(VmEvent::Exited { expected });
    machine.gone.send_replace(true);
}

impl Engine for MemoryEngine {
    type Vm = MemoryVm;
    type Error = MemoryError;

    fn kind(&self) -> EngineKind {
        EngineKind::Memory
    }

    fn check_installed(&self) -> Result<(), MemoryError> {
        Ok(())
    }

    async fn create(
        &self,
        spec: &VmSpec,
        run_dir: &Path,
        _lifetime: Lifetime,
    ) -> Result<MemoryVm, MemoryError> {
        // Its RAM file, as a real engine's would be: there while it runs.
        if let crate::spec::Ram::Shared { .. } = spec.ram {
            std::fs::create_dir_all(run_dir)
                .and_then(|()| std::fs::write(self.layout(run_dir).ram, spec.name.as_str()))
                .map_err(|err| MemoryError(err.to_string()))?;
        }
        let mut shared = self
            .shared
            .lock()
            .expect("never poisoned: no panics while held");
        shared.next_pid += 1;
        let pid = 100_000 + shared.next_pid;
        let (events, _) = mpsc::unbounded_channel();
        let mut machine = Machine {
            state: VmState::Created,
            pid,
            events,
            gone: watch::channel(false).0,
            guest_console: None,
        };
        let vm = self.handle(run_dir, &mut machine);
        shared.machines.insert(run_dir.to_owned(), machine);
        Ok(vm)
    }

    async fn adopt(&self, run_dir: &Path, _pid: Option<u32>) -> Option<MemoryVm> {
        let mut shared = self
            .shared
            .lock()
            .expect("never poisoned: no panics while held");
        let machine = shared.machines.get_mut(run_dir)?;
        if *machine.gone.borrow() {
            return None;
        }
        Some(self.handle(run_dir, machine))
    }

    fn layout(&self, run_dir: &Path) -> Layout {
        Layout {
            disk: run_dir.join("disk.img"),
            console_log: run_dir.join("console.log"),
            vnc: run_dir.join("vnc.sock"),
            agent: None,
            port: None,
            ram: run_dir.join("ram"),
        }
    }

    fn max_dir_name(&self, _parent: &Path) -> usize {
        63
    }

    fn template_disk_name(&self) -> &'static str {
        "disk.img"
    }

    fn set_cpu_weight(&self, run_dir: &Path, weight: crate::spec::CpuWeight) -> bool {
        let mut shared = self
            .shared
            .lock()
            .expect("never poisoned: no panics while held");
        shared.weights.insert(run_dir.to_owned(), weight);
        true
    }

    fn cpu_weight(&self, run_dir: &Path) -> Option<crate::spec::CpuWeight> {
        let shared = self
            .shared
            .lock()
            .expect("never poisoned: no panics while held");
        Some(
            shared
                .weights
                .get(run_dir)
                .copied()
                .unwrap_or(crate::spec::CpuWeight::NORMAL),
        )
    }

    fn create_disk(&self, _base: &Path, disk: &Path, _size_mib: u64) -> Result<(), DiskError> {
        std::fs::write(disk, b"overlay").map_err(|e| DiskError::Overlay {
            path: disk.to_owned(),
            message: e.to_string(),
        })
    }

    fn copy_disk(
        &self,
        from: &Path,
        _keep_base: &Path,
        to: &Path,
        progress: &mut dyn FnMut(u32) -> bool,
    ) -> Result<(), DiskError> {
        for percent in [0, 50, 100] {
            if !progress(percent) {
                let _ = std::fs::remove_file(to);
                return Err(DiskError::Cancelled {
                    path: to.to_owned(),
                });
            }
            if percent == 50 {
                std::fs::copy(from, to).map_err(|e| DiskError::Overlay {
                    path: to.to_owned(),
                    message: e.to_string(),
                })?;
            }
        }
        Ok(())
    }

    fn snapshot_disk(&self, _: &Path, _: SnapshotAction, _: &str) -> Result<(), DiskError> {
        Ok(())
    }

    fn disk_size_mib(&self, _disk: &Path) -> Result<u64, DiskError> {
        Ok(64)
    }

    fn disk_snapshots(&self, _disk: &Path) -> Result<Vec<String>, DiskError> {
        Ok(Vec::new())
    }
}

/// A handle to one in-memory VM.
#[derive(Debug)]
pub struct MemoryVm {
    engine: MemoryEngine,
    dir: PathBuf,
    pid: u32,
    events: mpsc::UnboundedReceiver<VmEvent>,
    gone: watch::Receiver<bool>,
    exited: bool,
}

impl MemoryVm {
    fn with<T>(&self, f: impl FnOnce(&mut Machine) -> T) -> Result<T, MemoryError> {
        let mut shared = self
            .engine
            .shared
            .lock()
            .expect("never poisoned: no panics while held");
        match shared.machines.get_mut(&self.dir) {
            Some(machine) if !*machine.gone.borrow() => Ok(f(machine)),
            _ => Err(MemoryError("the VM is gone".to_owned())),
        }
    }

    fn set(&self, state: VmState, event: VmEvent) -> Result<(), MemoryError> {
        self.with(|machine| {
            machine.state = state;
            let _ = machine.events.send(event);
        })
    }
}

impl EngineVm for MemoryVm {
    type Error = MemoryError;
    type Snapshots = MemorySnapshots;

    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    async fn console(&self) -> Result<UnixStream, MemoryError> {
        let (ours, guest) = UnixStream::pair().map_err(|e| MemoryError(e.to_string()))?;
        self.with(|machine| machine.guest_console = Some(guest))?;
        Ok(ours)
    }

    async fn start(&self) -> Result<(), MemoryError> {
        self.set(VmState::Running, VmEvent::Running)
    }

    async fn pause(&self) -> Result<(), MemoryError> {
        self.set(VmState::Paused, VmEvent::Paused)
    }

    async fn resume(&self) -> Result<(), MemoryError> {
        self.set(VmState::Running, VmEvent::Running)
    }

    async fn powerdown(&self) -> Result<(), MemoryError> {
        // The guest obliges at once.
        self.with(|machine| {
            let _ = machine.events.send(VmEvent::GuestPoweredOff);
            end(machine, true);
        })
    }

    async fn stop(&self) -> Result<(), MemoryError> {
        self.with(|machine| end(machine, true))
    }

    async fn kill(&mut self) -> Result<(), MemoryError> {
        let _ = self.with(|machine| end(machine, false));
        Ok(())
    }

    async fn wait(&mut self) -> Result<(), MemoryError> {
        let _ = self.gone.wait_for(|gone| *gone).await;
        Ok(())
    }

    async fn state(&self) -> Result<VmState, MemoryError> {
        Ok(self
            .with(|machine| machine.state)
            .unwrap_or(VmState::Stopped))
    }

    async fn next_event(&mut self) -> VmEvent {
        if self.exited {
            return VmEvent::Exited { expected: true };
        }
        match self.events.recv().await {
            Some(event) => {
                if matches!(event, VmEvent::Exited { .. }) {
                    self.exited = true;
                }
                event
            }
            None => {
                self.exited = true;
                VmEvent::Exited { expected: false }
            }
        }
    }

    fn usage(&self) -> Option<Usage> {
        None
    }

    fn memory_use(&self) -> Option<crate::MemoryUse> {
        None
    }

    async fn disk_bytes(&self) -> Result<(u64, u64), MemoryError> {
        Ok((0, 0))
    }

    async fn balloon_memory(&self) -> Result<Option<(u64, u64)>, MemoryError> {
        Ok(None)
    }

    fn log_tail(&self) -> String {
        "the memory engine".to_owned()
    }

    fn snapshots(&self) -> MemorySnapshots {
        MemorySnapshots
    }

    async fn save_state(&self, file: &Path) -> Result<(), MemoryError> {
        std::fs::write(file, format!("state of {}\n", self.pid))
            .map_err(|err| MemoryError(err.to_string()))
    }
}

/// Memory snapshots that always succeed.
#[derive(Clone, Debug)]
pub struct MemorySnapshots;

impl SnapshotJobs for MemorySnapshots {
    type Error = MemoryError;

    async fn save(&self, _tag: &str) -> Result<(), MemoryError> {
        Ok(())
    }

    async fn load(&self, _tag: &str) -> Result<(), MemoryError> {
        Ok(())
    }

    async fn delete(&self, _tag: &str) -> Result<(), MemoryError> {
        Ok(())
    }
}
