//! The node's domain: VMs, their lifecycle and restart policy, over the
//! store and the node's engines, with networks and operations as parts of
//! their own. HTTP handlers call these functions and nothing else; every
//! rule lives here (or in [`crate::lifecycle`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quetzal_api::{Event, EventKind, Vm, VmState};
use quetzal_engine::accel::{self, AccelProbe};
use quetzal_engine::spec::{Boot, DirectBoot, Uefi};
use quetzal_engine::{Accel, AnyEngine, Engine, Engines};
use quetzal_image::{BootFrom, Firmware, Image, ImageStore};
use tokio::sync::broadcast;

use crate::lifecycle::{self, Cause};
use crate::net::{self, HostNetworks};
use crate::store::{Change, SqliteStore, Store, VmRecord, now_millis};
use crate::supervisor::{Live, Stats};

pub mod access;
mod activity;
mod core;
mod create;
mod error;
mod guest;
mod networks;
mod operations;
mod pools;
mod recovery;
mod snapshots;
mod templates;
mod vms;

pub use create::Created;
pub use error::{
    ErrorKind, Fault, NetworkError, NodeError, OperationError, PoolError, SnapshotError,
    TemplateError, VmError,
};
pub use guest::MAX_CLIPBOARD_BYTES;
pub use guest::MAX_FILE as MAX_GUEST_FILE;
pub use networks::{DEFAULT_NETWORK, Networks, USER_NETWORK};
pub use operations::{Operations, Progress};

pub use templates::{DiskPlan, DiskSource};

/// How often the lease files are read for new addresses.
const LEASE_POLL: Duration = Duration::from_secs(1);
/// How many events of one kind a guest can make us log per minute.
pub const GUEST_EVENTS_PER_MINUTE: u32 = 10;
/// How long a graceful stop waits for the guest before forcing it off.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long QEMU gets to quit before it is killed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest root disk a VM may ask for (16 TiB).
const MAX_DISK_MIB: u64 = 16 << 20;
/// Free space a new VM needs at least, for its overlay to start.
const MIN_FREE_MIB: u64 = 64;

/// What the event stream carries.
#[derive(Clone, Debug)]
pub enum Published {
    /// A VM's event, as stored in the log.
    Event(Event),
    /// An operation started, progressed or ended.
    Operation(quetzal_api::Operation),
    /// A desktop pool, or one of its desktops, changed (its name).
    Pool(String),
}

impl From<Event> for Published {
    fn from(event: Event) -> Self {
        Published::Event(event)
    }
}

/// Per-VM state kept in memory: the lock that serializes operations on it
/// and, while it runs, its supervisor.
#[derive(Debug, Default)]
struct Slot {
    op: Arc<tokio::sync::Mutex<()>>,
    live: Mutex<Option<Arc<Live>>>,
    /// Bounds on the events its guest can trigger at will, by kind.
    limits: Mutex<HashMap<EventKind, crate::ratelimit::Limiter>>,
    /// When a user last typed or pointed on its console or screen.
    last_input: Mutex<Option<std::time::Instant>>,
}

impl Slot {
    /// Takes the VM's operation lock; an operation carries it along.
    async fn lock(&self) -> tokio::sync::OwnedMutexGuard<()> {
        Arc::clone(&self.op).lock_owned().await
    }

    fn live(&self) -> Option<Arc<Live>> {
        self.live
            .lock()
            .expect("never poisoned: no panics while held")
            .clone()
    }

    fn set_live(&self, live: Option<Arc<Live>>) {
        *self
            .live
            .lock()
            .expect("never poisoned: no panics while held") = live;
    }
}

/// The node's domain over its engines (QEMU in quetzald; an in-memory
/// one in the unit tests of the rules). The VMs' lifecycle is its own
/// state (slots, engines, images); networks and operations are parts
/// with theirs; all share the store and the event stream ([`core::Core`]).
#[derive(Debug)]
pub struct Node {
    data: PathBuf,
    core: Arc<core::Core>,
    engines: Engines,
    images: ImageStore,
    operations: Operations,
    networks: Networks,
    access: access::Access,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    pool_work: pools::PoolWork,
    /// The host's KSM, when this node paces it.
    ksm: std::sync::OnceLock<crate::ksm::Ksm>,
    generation: std::sync::atomic::AtomicU64,
    host_memory_mib: u64,
    /// The CPUs this node may run VMs on (what `--cpu-pin` may name).
    host_cpus: u32,
    accel: Accel,
}

impl Node {
    /// Opens the store in `data` and re-attaches to the VMs that were
    /// running before this daemon started, with `engines` and the host's
    /// managed networks.
    pub async fn open(data: &Path, engines: Engines) -> anyhow::Result<Arc<Self>> {
        Self::open_with(data, engines, HostNetworks::open(data)?).await
    }

    /// [`Node::open`] with `host_net`.
    pub async fn open_with(
        data: &Path,
        engines: Engines,
        host_net: HostNetworks,
    ) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(data.join("vms"))?;
        let store: Box<dyn Store> = Box::new(SqliteStore::open(&data.join("quetzal.db"))?);
        let core = Arc::new(core::Core::new(store));
        let node = Arc::new(Node {
            data: data.to_owned(),
            engines,
            images: ImageStore::new(data),
            operations: Operations::new(Arc::clone(&core)),
            networks: Networks::new(Arc::clone(&core), host_net),
            access: access::Access::open(Arc::clone(&core))?,
            core,
            slots: Mutex::default(),
            pool_work: pools::PoolWork::default(),
            ksm: std::sync::OnceLock::new(),
            generation: std::sync::atomic::AtomicU64::new(1),
            host_memory_mib: quetzal_engine::host::host_memory_mib().unwrap_or(0),
            host_cpus: std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
            accel: accel::choose(&AccelProbe::of_this_host()).accel,
        });
        node.engines.check_installed()?;
        node.networks.bring_up().await;
        node.networks.read_leases();
        node.recover().await?;
        node.watch_leases();
        node.watch_pools();
        node.watch_activity();
        Ok(node)
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Box<dyn Store>> {
        self.core.store()
    }

    /// The node's managed networks.
    pub fn networks(&self) -> &Networks {
        &self.networks
    }

    /// The node's operations.
    pub fn operations(&self) -> &Operations {
        &self.operations
    }

    /// Who may do what: tokens, sessions, the audit log.
    pub fn access(&self) -> &access::Access {
        &self.access
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Reads the lease files every second (after a first read at start);
    /// a VM whose address changed gets an `address` event.
    fn watch_leases(self: &Arc<Self>) {
        let node = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(node) = node.upgrade() else {
                    return;
                };
                for (vm, cause) in node.networks.read_leases() {
                    node.note_from_guest(&vm, EventKind::Address, &cause);
                }
                drop(node);
                tokio::time::sleep(LEASE_POLL).await;
            }
        });
    }

    /// Paces the host's KSM from now on (once; a second call is ignored).
    pub fn manage_ksm(self: &Arc<Self>, ksm: crate::ksm::Ksm) {
        if self.ksm.set(ksm).is_err() {
            return;
        }
        let node = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(node) = node.upgrade() else {
                    return;
                };
                if let (Some(ksm), Some(memory)) =
                    (node.ksm.get(), crate::ksm::Memory::of_this_host())
                {
                    ksm.tick(memory);
                }
                drop(node);
                tokio::time::sleep(crate::ksm::TICK).await;
            }
        });
    }

    /// The host's KSM as this node paces it; `None` without KSM.
    pub fn ksm(&self) -> Option<&crate::ksm::Ksm> {
        self.ksm.get()
    }

    fn slot(&self, name: &str) -> Arc<Slot> {
        let mut slots = self
            .slots
            .lock()
            .expect("never poisoned: no panics while held");
        Arc::clone(slots.entry(name.to_owned()).or_default())
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.data.join("vms").join(name)
    }

    /// Where running VMs' RAM files are.
    fn ram_dir(&self) -> PathBuf {
        quetzal_engine::spec::ram_dir(&self.data)
    }

    /// The engine new VMs, disks and templates get.
    fn engine(&self) -> &AnyEngine {
        self.engines.default_engine()
    }

    /// The engine that runs a VM, as its record names it.
    fn engine_of(&self, vm: &VmRecord) -> Result<&AnyEngine, VmError> {
        self.engines
            .named(&vm.engine)
            .ok_or_else(|| VmError::NoEngine {
                name: vm.name.clone(),
                engine: vm.engine.clone(),
            })
    }

    /// Where a VM's files are, as its engine lays them out.
    fn layout(&self, vm: &VmRecord) -> Result<quetzal_engine::Layout, NodeError> {
        Ok(self.engine_of(vm)?.layout(&self.vm_dir(&vm.name)))
    }

    /// A VM's root disk.
    fn vm_disk(&self, vm: &VmRecord) -> Result<PathBuf, NodeError> {
        Ok(self.layout(vm)?.disk)
    }

    /// The size of a disk the guest sees, in MiB.
    fn disk_mib(&self, disk: &Path) -> Result<u64, NodeError> {
        Ok(self.engine().disk_size_mib(disk)?)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Published> {
        self.core.subscribe()
    }

    fn publish(&self, published: Published) {
        self.core.publish(published);
    }

    pub(crate) fn record(&self, name: &str) -> Result<VmRecord, NodeError> {
        let found = self.store().get(name)?;
        Ok(found.ok_or_else(|| VmError::NotFound {
            name: name.to_owned(),
        })?)
    }

    /// Moves a VM through the state machine ([`lifecycle::transition`])
    /// and records the change with its event. The store takes it only if
    /// the VM is still at the revision the new state was computed from.
    fn change(&self, name: &str, cause: Cause, change: &Change<'_>) -> Result<(), NodeError> {
        let record = self.record(name)?;
        let state = lifecycle::transition(record.state, cause).map_err(VmError::from)?;
        let event = self.store().change(name, record.revision, state, change)?;
        self.publish(event.into());
        Ok(())
    }

    /// Whether the state machine allows `cause` now: a request's check.
    fn allowed(record: &VmRecord, cause: Cause) -> Result<(), NodeError> {
        lifecycle::transition(record.state, cause)
            .map(drop)
            .map_err(|refused| VmError::from(refused).into())
    }

    /// Records an event its guest triggered (a reset, a new address),
    /// within [`GUEST_EVENTS_PER_MINUTE`] per kind.
    pub fn note_from_guest(&self, name: &str, kind: EventKind, cause: &str) {
        use crate::ratelimit::{Limiter, Verdict};
        let verdict = self
            .slot(name)
            .limits
            .lock()
            .expect("never poisoned: no panics while held")
            .entry(kind)
            .or_insert_with(|| Limiter::new(GUEST_EVENTS_PER_MINUTE, Duration::from_secs(60)))
            .admit(std::time::Instant::now());
        match verdict {
            Verdict::Log { left_out: 0 } => self.note(name, kind, cause),
            Verdict::Log { left_out } => self.note(
                name,
                kind,
                &format!(
                    "{cause} ({left_out} more {kind} events in the last minute were not logged)"
                ),
            ),
            Verdict::LogLimitReached => self.note(
                name,
                EventKind::Suppressed,
                &format!("{kind} events come too fast; the rest of this minute's are not logged"),
            ),
            Verdict::Drop => {}
        }
    }

    /// Records an event that changes no state.
    pub fn note(&self, name: &str, kind: EventKind, cause: &str) {
        self.core.note(name, kind, cause);
    }

    pub fn get(&self, name: &str) -> Result<Vm, NodeError> {
        Ok(self.with_agent(self.networks.with_addresses(self.record(name)?.to_api())))
    }

    /// VMs, filtered by state and by labels (`key=value`, all must match).
    pub fn list(
        &self,
        state: Option<VmState>,
        labels: &[(String, String)],
    ) -> Result<Vec<Vm>, NodeError> {
        Ok(self
            .store()
            .list()?
            .into_iter()
            .filter(|vm| state.is_none_or(|state| vm.state == state))
            .filter(|vm| labels.iter().all(|(k, v)| vm.labels.get(k) == Some(v)))
            .map(|vm| self.with_agent(self.networks.with_addresses(vm.to_api())))
            .collect())
    }

    pub fn events(
        &self,
        after: i64,
        limit: u32,
        vm: Option<&str>,
    ) -> Result<Vec<Event>, NodeError> {
        Ok(self.store().events(after, limit, vm)?)
    }

    /// The `limit` events just before `before`, oldest first.
    pub fn events_before(
        &self,
        before: i64,
        limit: u32,
        vm: Option<&str>,
    ) -> Result<Vec<Event>, NodeError> {
        Ok(self.store().events_before(before, limit, vm)?)
    }

    /// Resource use of every running VM.
    pub async fn stats(&self) -> Vec<(String, Stats)> {
        let lives: Vec<(String, Arc<Live>)> = {
            let slots = self
                .slots
                .lock()
                .expect("never poisoned: no panics while held");
            slots
                .iter()
                .filter_map(|(name, slot)| Some((name.clone(), slot.live()?)))
                .collect()
        };
        let mut stats = Vec::new();
        for (name, live) in lives {
            if let Some(s) = self.live_stats(&name, &live).await {
                stats.push((name, s));
            }
        }
        stats
    }

    /// A running VM's counters: its supervisor's, and its TAP's.
    async fn live_stats(&self, name: &str, live: &Live) -> Option<Stats> {
        let mut s = live.stats().await?;
        let nic = self.record(name).ok()?.nic;
        let tap = self.networks.tap(nic);
        // What the TAP transmits, the guest receives.
        s.net_received_bytes = net::tap_counter(&tap, "tx_bytes");
        s.net_sent_bytes = net::tap_counter(&tap, "rx_bytes");
        Some(s)
    }

    /// One running VM's counters.
    pub async fn vm_stats(&self, name: &str) -> Result<quetzal_api::VmStats, NodeError> {
        self.record(name)?;
        let not_running = || VmError::NotRunning {
            name: name.to_owned(),
        };
        let live = self.slot(name).live().ok_or_else(not_running)?;
        let s = self.live_stats(name, &live).await.ok_or_else(not_running)?;
        #[allow(clippy::cast_precision_loss)] // Exact below 2^53 ms.
        let cpu_seconds = s.cpu_millis as f64 / 1000.0;
        Ok(quetzal_api::VmStats {
            at: now_millis(),
            cpu_seconds,
            resident_bytes: s.resident_bytes,
            disk_read_bytes: s.disk_read_bytes,
            disk_written_bytes: s.disk_written_bytes,
            net_received_bytes: s.net_received_bytes,
            net_sent_bytes: s.net_sent_bytes,
            guest_memory_used_bytes: guest::guest_memory(&live).map(|m| m.used_bytes),
            memory: s.memory.map(vm_memory),
        })
    }

    /// A VM as `GET /api/v1/vms/{name}` shows it: with how it holds host
    /// memory while it runs.
    pub async fn show(&self, name: &str) -> Result<Vm, NodeError> {
        let mut vm = self.get(name)?;
        if let Some(live) = self.slot(name).live() {
            vm.host_memory = live.stats().await.and_then(|s| s.memory).map(vm_memory);
            vm.cpu_weight = self.cpu_weight(name).map(|w| w.get());
        }
        Ok(vm)
    }

    /// Where a VM's VNC server listens.
    pub fn vnc_socket(&self, name: &str) -> Result<PathBuf, NodeError> {
        let record = self.record(name)?;
        if self.slot(name).live().is_none() {
            return Err(VmError::NotRunning {
                name: name.to_owned(),
            }
            .into());
        }
        Ok(self.layout(&record)?.vnc)
    }

    /// The console of a running VM: its live output and its input.
    pub fn console(&self, name: &str) -> Result<(PathBuf, Option<Arc<Live>>), NodeError> {
        let record = self.record(name)?;
        Ok((self.layout(&record)?.console_log, self.slot(name).live()))
    }
}

/// The change of a VM whose QEMU is gone.
fn down(kind: EventKind, cause: &str) -> Change<'_> {
    Change {
        pid: None,
        started_at: None,
        restarts: 0,
        kind,
        cause,
    }
}

/// How a VM of `image` boots: its kernel directly, or its disk's own
/// bootloader under the firmware it needs (a UEFI VM keeps its variable
/// store in its directory).
pub(crate) fn boot_of(image: &Image, vm: &VmRecord, dir: &Path) -> Result<Boot, NodeError> {
    let boot = match (image.manifest.boot, image.manifest.firmware) {
        (BootFrom::Kernel, _) => {
            let kernel = image.kernel().ok_or_else(|| {
                Fault::Image(quetzal_image::ImageError::MissingFile {
                    what: "a kernel for a direct boot".to_owned(),
                    package: image.manifest.name.clone(),
                })
            })?;
            Boot::Kernel(
                DirectBoot::new(&kernel, image.initrd().as_deref(), &append(image, vm))
                    .map_err(Fault::Spec)?,
            )
        }
        (BootFrom::Disk, Firmware::Bios) => Boot::Bios,
        (BootFrom::Disk, Firmware::Uefi) => {
            Boot::Uefi(Uefi::new(&dir.join(UEFI_VARS)).map_err(Fault::Spec)?)
        }
    };
    Ok(boot)
}

/// A UEFI VM's variable store, in its directory.
pub(crate) const UEFI_VARS: &str = "uefi-vars.fd";

/// The image's kernel command line plus the VM's identity.
fn append(image: &Image, vm: &VmRecord) -> String {
    match &vm.machine_id {
        Some(id) => format!("{} quetzal.machine_id={id}", image.manifest.append),
        None => image.manifest.append.clone(),
    }
}

/// 128 random bits in hex, as systemd's machine-id.
pub(crate) fn new_machine_id() -> Result<String, NodeError> {
    random_hex(16)
}

/// `len` random bytes from the kernel, in hex.
pub(crate) fn random_hex(len: usize) -> Result<String, NodeError> {
    let mut bytes = vec![0u8; len];
    fill_random(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `N` random bytes from the kernel.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], NodeError> {
    let mut bytes = [0u8; N];
    fill_random(&mut bytes)?;
    Ok(bytes)
}

fn fill_random(bytes: &mut [u8]) -> Result<(), NodeError> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(bytes))
        .map_err(|e| Fault::Random(e).into())
}

/// 1 s, 2 s, 4 s ... up to 32 s between automatic restarts.
/// What the API shows of how a VM's process holds host memory.
fn vm_memory(m: quetzal_engine::MemoryUse) -> quetzal_api::VmMemory {
    quetzal_api::VmMemory {
        pss_bytes: m.pss_bytes,
        private_bytes: m.private_bytes,
        shared_bytes: m.shared_bytes,
        template_shared_bytes: m.template_shared_bytes,
        ksm_merged_bytes: m.ksm_merged_bytes,
    }
}

fn backoff(restarts: u32) -> Duration {
    Duration::from_secs(1 << restarts.min(5))
}

fn free_mib(dir: &Path) -> Result<u64, NodeError> {
    let stat =
        nix::sys::statvfs::statvfs(dir).map_err(|e| Fault::io(dir)(std::io::Error::from(e)))?;
    Ok(stat.blocks_available() * stat.fragment_size() / (1 << 20))
}

#[cfg(test)]
mod rules;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_exponentially_up_to_half_a_minute() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(40), Duration::from_secs(32));
    }
}
