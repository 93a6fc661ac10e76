//! Every engine this build has, behind one type each for the engine, its
//! VMs, their snapshot jobs and their errors. The node holds an
//! [`Engines`] and sends each VM to the engine its record names: a new
//! engine is a variant here and nothing in the node's rules.

use std::path::Path;

use tokio::net::UnixStream;

#[cfg(feature = "memory")]
use crate::memory::{MemoryEngine, MemoryError, MemorySnapshots, MemoryVm};
use crate::qemu::{self, QemuEngine, QemuError, QemuVm};
use crate::{
    DiskError, Engine, EngineKind, EngineVm, Failure, Layout, Lifetime, MemoryUse, SnapshotAction,
    SnapshotJobs, Usage, VmEvent, VmSpec, VmState,
};

/// Runs `$body` with `$inner` bound to whichever engine's value `$value`
/// holds; every arm has the same shape, so each must convert its result.
macro_rules! each {
    ($value:expr, $inner:ident => $body:expr) => {
        match $value {
            Self::Qemu($inner) => $body,
            #[cfg(feature = "memory")]
            Self::Memory($inner) => $body,
        }
    };
}

/// One of the engines.
#[derive(Clone, Debug)]
pub enum AnyEngine {
    Qemu(QemuEngine),
    #[cfg(feature = "memory")]
    Memory(MemoryEngine),
}

/// A VM of one of the engines (one per running VM: its size does not
/// matter, and the small variant exists only in tests).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum AnyVm {
    Qemu(QemuVm),
    #[cfg(feature = "memory")]
    Memory(MemoryVm),
}

/// The snapshot jobs of one of the engines' VMs.
#[derive(Clone, Debug)]
pub enum AnySnapshots {
    Qemu(qemu::Snapshots),
    #[cfg(feature = "memory")]
    Memory(MemorySnapshots),
}

/// An error of one of the engines.
#[derive(Debug, thiserror::Error)]
pub enum AnyError {
    #[error(transparent)]
    Qemu(#[from] QemuError),
    #[cfg(feature = "memory")]
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

impl Failure for AnyError {
    fn no_space(&self) -> bool {
        each!(self, err => err.no_space())
    }
}

impl From<QemuVm> for AnyVm {
    fn from(vm: QemuVm) -> Self {
        AnyVm::Qemu(vm)
    }
}

#[cfg(feature = "memory")]
impl From<MemoryVm> for AnyVm {
    fn from(vm: MemoryVm) -> Self {
        AnyVm::Memory(vm)
    }
}

impl Engine for AnyEngine {
    type Vm = AnyVm;
    type Error = AnyError;

    fn kind(&self) -> EngineKind {
        each!(self, engine => engine.kind())
    }

    fn check_installed(&self) -> Result<(), AnyError> {
        each!(self, engine => Engine::check_installed(engine).map_err(AnyError::from))
    }

    async fn create(
        &self,
        spec: &VmSpec,
        run_dir: &Path,
        lifetime: Lifetime,
    ) -> Result<AnyVm, AnyError> {
        each!(self, engine => engine
            .create(spec, run_dir, lifetime)
            .await
            .map(AnyVm::from)
            .map_err(AnyError::from))
    }

    async fn adopt(&self, run_dir: &Path, pid: Option<u32>) -> Option<AnyVm> {
        each!(self, engine => engine.adopt(run_dir, pid).await.map(AnyVm::from))
    }

    fn layout(&self, run_dir: &Path) -> Layout {
        each!(self, engine => engine.layout(run_dir))
    }

    fn max_dir_name(&self, parent: &Path) -> usize {
        each!(self, engine => engine.max_dir_name(parent))
    }

    fn template_disk_name(&self) -> &'static str {
        each!(self, engine => engine.template_disk_name())
    }

    fn set_cpu_weight(&self, run_dir: &Path, weight: crate::spec::CpuWeight) -> bool {
        each!(self, engine => engine.set_cpu_weight(run_dir, weight))
    }

    fn cpu_weight(&self, run_dir: &Path) -> Option<crate::spec::CpuWeight> {
        each!(self, engine => engine.cpu_weight(run_dir))
    }

    fn create_disk(&self, base: &Path, disk: &Path, size_mib: u64) -> Result<(), DiskError> {
        each!(self, engine => engine.create_disk(base, disk, size_mib))
    }

    fn copy_disk(
        &self,
        from: &Path,
        keep_base: &Path,
        to: &Path,
        progress: &mut dyn FnMut(u32) -> bool,
    ) -> Result<(), DiskError> {
        each!(self, engine => engine.copy_disk(from, keep_base, to, progress))
    }

    fn snapshot_disk(
        &self,
        disk: &Path,
        action: SnapshotAction,
        tag: &str,
    ) -> Result<(), DiskError> {
        each!(self, engine => engine.snapshot_disk(disk, action, tag))
    }

    fn disk_size_mib(&self, disk: &Path) -> Result<u64, DiskError> {
        each!(self, engine => engine.disk_size_mib(disk))
    }

    fn disk_snapshots(&self, disk: &Path) -> Result<Vec<String>, DiskError> {
        each!(self, engine => engine.disk_snapshots(disk))
    }
}

impl EngineVm for AnyVm {
    type Error = AnyError;
    type Snapshots = AnySnapshots;

    fn pid(&self) -> Option<u32> {
        each!(self, vm => vm.pid())
    }

    async fn console(&self) -> Result<UnixStream, AnyError> {
        each!(self, vm => vm.console().await.map_err(AnyError::from))
    }

    async fn start(&self) -> Result<(), AnyError> {
        each!(self, vm => vm.start().await.map_err(AnyError::from))
    }

    async fn pause(&self) -> Result<(), AnyError> {
        each!(self, vm => vm.pause().await.map_err(AnyError::from))
    }

    async fn resume(&self) -> Result<(), AnyError> {
        each!(self, vm => vm.resume().await.map_err(AnyError::from))
    }

    async fn powerdown(&self) -> Result<(), AnyError> {
        each!(self, vm => vm.powerdown().await.map_err(AnyError::from))
    }

    async fn stop(&self) -> Result<(), AnyError> {
        each!(self, vm => vm.stop().await.map_err(AnyError::from))
    }

    async fn kill(&mut self) -> Result<(), AnyError> {
        each!(self, vm => EngineVm::kill(vm).await.map_err(AnyError::from))
    }

    async fn wait(&mut self) -> Result<(), AnyError> {
        each!(self, vm => EngineVm::wait(vm).await.map_err(AnyError::from))
    }

    async fn save_state(&self, file: &Path) -> Result<(), AnyError> {
        each!(self, vm => vm.save_state(file).await.map_err(AnyError::from))
    }

    async fn state(&self) -> Result<VmState, AnyError> {
        each!(self, vm => vm.state().await.map_err(AnyError::from))
    }

    async fn next_event(&mut self) -> VmEvent {
        each!(self, vm => vm.next_event().await)
    }

    fn usage(&self) -> Option<Usage> {
        each!(self, vm => vm.usage())
    }

    fn memory_use(&self) -> Option<MemoryUse> {
        each!(self, vm => vm.memory_use())
    }

    async fn disk_bytes(&self) -> Result<(u64, u64), AnyError> {
        each!(self, vm => vm.disk_bytes().await.map_err(AnyError::from))
    }

    async fn balloon_memory(&self) -> Result<Option<(u64, u64)>, AnyError> {
        each!(self, vm => vm.balloon_memory().await.map_err(AnyError::from))
    }

    fn log_tail(&self) -> String {
        each!(self, vm => vm.log_tail())
    }

    fn snapshots(&self) -> AnySnapshots {
        match self {
            AnyVm::Qemu(vm) => AnySnapshots::Qemu(vm.snapshots()),
            #[cfg(feature = "memory")]
            AnyVm::Memory(vm) => AnySnapshots::Memory(vm.snapshots()),
        }
    }
}

impl SnapshotJobs for AnySnapshots {
    type Error = AnyError;

    async fn save(&self, tag: &str) -> Result<(), AnyError> {
        each!(self, jobs => jobs.save(tag).await.map_err(AnyError::from))
    }

    async fn load(&self, tag: &str) -> Result<(), AnyError> {
        each!(self, jobs => jobs.load(tag).await.map_err(AnyError::from))
    }

    async fn delete(&self, tag: &str) -> Result<(), AnyError> {
        each!(self, jobs => jobs.delete(tag).await.map_err(AnyError::from))
    }
}

/// The engines a node has. The first one runs the VMs it creates; a VM
/// made by another engine goes to that one (and is refused when the node
/// lacks it).
#[derive(Clone, Debug)]
pub struct Engines {
    /// Never empty; the first is the default.
    engines: Vec<AnyEngine>,
}

impl Engines {
    /// The engines of this build that quetzald runs VMs with.
    pub fn of_this_host() -> Self {
        Engines::only(AnyEngine::Qemu(QemuEngine::new()))
    }

    /// A node with one engine.
    pub fn only(engine: AnyEngine) -> Self {
        Engines {
            engines: vec![engine],
        }
    }

    /// The engine new VMs get.
    pub fn default_engine(&self) -> &AnyEngine {
        &self.engines[0]
    }

    /// The engine a VM's record names (`qemu`), if this node has it.
    pub fn named(&self, name: &str) -> Option<&AnyEngine> {
        let kind = EngineKind::parse(name)?;
        self.engines.iter().find(|engine| engine.kind() == kind)
    }

    /// Fails when an engine cannot run VMs on this host.
    pub fn check_installed(&self) -> Result<(), AnyError> {
        self.engines.iter().try_for_each(Engine::check_installed)
    }

    /// What this host offers, as its default engine finds it.
    pub fn host_info(
        &self,
        requested: Option<crate::Accel>,
    ) -> Result<crate::host::HostInfo, crate::accel::AccelError> {
        let binary = match self.default_engine() {
            AnyEngine::Qemu(qemu) => Some(qemu.binary()),
            #[cfg(feature = "memory")]
            AnyEngine::Memory(_) => None,
        };
        crate::host::HostInfo::probe(binary, requested)
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use super::*;

    #[test]
    fn a_vm_goes_to_the_engine_its_record_names_and_no_other() {
        let engines = Engines::only(AnyEngine::Memory(MemoryEngine::default()));

        assert_eq!(
            engines.named("memory").map(Engine::kind),
            Some(EngineKind::Memory)
        );
        assert!(engines.named("qemu").is_none());
        assert!(engines.named("vmware").is_none());
        assert_eq!(engines.default_engine().kind(), EngineKind::Memory);
    }

    #[test]
    fn quetzald_runs_its_vms_on_qemu() {
        assert_eq!(
            Engines::of_this_host().default_engine().kind(),
            EngineKind::Qemu
        );
    }
}
