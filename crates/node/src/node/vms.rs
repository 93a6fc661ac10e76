//! A VM's lifecycle: start, stop, pause, resume, delete; booting it on
//! its engine and shutting it down; what its supervisor reports (its
//! exit, the engine pausing it) and the restart policy. Every state
//! change goes through [`crate::lifecycle::transition`] (via
//! [`Node::change`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quetzal_api::{EventKind, RestartPolicy, Vm, VmState};
use quetzal_engine::spec::{
    Confinement, CpuSet, Cpus, Disk, DiskFormat, Machine, MemoryMib, Nic, NicBackend, Ram, VmName,
    VmSpec, new_generation_id,
};
use quetzal_engine::{AnyVm, Engine, EngineVm, Lifetime, SnapshotJobs};
use quetzal_image::Image;

use super::error::{Fault, VmError};
use super::{Node, NodeError, QUIT_TIMEOUT, Slot, backoff, boot_of, down, now_millis};
use crate::cloud_init::{self, CloudConfig, Seed};
use crate::lifecycle::Cause;
use crate::store::{Change, VmRecord};
use crate::supervisor::{self, Command, Exit};

impl Node {
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<Vm, NodeError> {
        let slot = self.slot(name);
        let _op = slot.lock().await;
        let record = self.record(name)?;
        Self::allowed(&record, Cause::Start)?;
        self.engine_of(&record)?;
        self.launch(
            &slot,
            &record,
            0,
            EventKind::Started,
            "start requested",
            None,
        )
        .await?;
        self.get(name)
    }

    pub async fn stop(self: &Arc<Self>, name: &str, timeout: Duration) -> Result<Vm, NodeError> {
        let slot = self.slot(name);
        let _op = slot.lock().await;
        let record = self.record(name)?;
        Self::allowed(&record, Cause::Stop)?;
        self.shut_down(&slot, &record, Some(timeout)).await?;
        self.get(name)
    }

    pub async fn force_stop(self: &Arc<Self>, name: &str) -> Result<Vm, NodeError> {
        let slot = self.slot(name);
        let _op = slot.lock().await;
        let record = self.record(name)?;
        Self::allowed(&record, Cause::ForceStop)?;
        self.shut_down(&slot, &record, None).await?;
        self.get(name)
    }

    pub async fn restart(self: &Arc<Self>, name: &str, timeout: Duration) -> Result<Vm, NodeError> {
        let slot = self.slot(name);
        let _op = slot.lock().await;
        let record = self.record(name)?;
        Self::allowed(&record, Cause::Restart)?;
        self.shut_down(&slot, &record, Some(timeout)).await?;
        let record = self.record(name)?;
        self.launch(
            &slot,
            &record,
            0,
            EventKind::Started,
            "restart requested",
            None,
        )
        .await?;
        self.get(name)
    }

    pub async fn pause(&self, name: &str) -> Result<Vm, NodeError> {
        self.pause_or_resume(name, Cause::Pause).await
    }

    pub async fn resume(&self, name: &str) -> Result<Vm, NodeError> {
        self.pause_or_resume(name, Cause::Resume).await
    }

    async fn pause_or_resume(&self, name: &str, action: Cause) -> Result<Vm, NodeError> {
        let slot = self.slot(name);
        let _op = slot.lock().await;
        let record = self.record(name)?;
        Self::allowed(&record, action)?;
        let live = slot.live().ok_or_else(|| VmError::NotRunning {
            name: name.to_owned(),
        })?;
        let (command, kind, cause) = match action {
            Cause::Pause => (Command::Pause, EventKind::Paused, "pause requested"),
            _ => (Command::Resume, EventKind::Resumed, "resume requested"),
        };
        live.call(command).await?;
        self.change(
            name,
            action,
            &Change {
                pid: record.pid,
                started_at: record.started_at,
                restarts: record.restarts,
                kind,
                cause,
            },
        )?;
        self.get(name)
    }

    /// Deletes a stopped VM and, unless `keep_disks`, its directory.
    pub async fn delete(&self, name: &str, keep_disks: bool) -> Result<(), NodeError> {
        let slot = self.slot(name);
        let _op = slot.lock().await;
        let record = self.record(name)?;
        Self::allowed(&record, Cause::Delete)?;
        let cause = if keep_disks {
            "deleted by request; disks kept"
        } else {
            "deleted by request"
        };
        let event = self.store().delete_vm(name, record.revision, cause)?;
        let dir = self.vm_dir(name);
        if keep_disks {
            // Kept files go back to the daemon: the uid the VM ran as may
            // come back to another VM.
            give_back(&dir);
        } else if let Err(err) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(vm = %name, error = %err, "cannot remove the VM's directory");
        }
        self.publish(event.into());
        self.forget_slot(name);
        Ok(())
    }

    /// Drops the in-memory state of a VM that no longer exists.
    pub(super) fn forget_slot(&self, name: &str) {
        self.slots
            .lock()
            .expect("never poisoned: no panics while held")
            .remove(name);
    }

    /// Boots a VM's QEMU and starts supervising it. Called with the VM's
    /// operation lock held.
    pub(super) async fn launch(
        self: &Arc<Self>,
        slot: &Slot,
        record: &VmRecord,
        restarts: u32,
        kind: EventKind,
        cause: &str,
        load_snapshot: Option<&str>,
    ) -> Result<(), NodeError> {
        let name = record.name.as_str();
        self.change(
            name,
            Cause::Start,
            &Change {
                pid: None,
                started_at: None,
                restarts,
                kind: EventKind::Starting,
                cause,
            },
        )?;
        match self.boot(record, load_snapshot).await {
            Ok((vm, console, generation_id)) => {
                let generation = self
                    .generation
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let pid = vm.pid();
                let mut live = supervisor::spawn(
                    Arc::clone(self),
                    name.to_owned(),
                    generation,
                    vm,
                    console,
                    self.layout(record)?,
                    false,
                    &record.services,
                );
                live.generation_id = Some(generation_id);
                slot.set_live(Some(Arc::new(live)));
                self.change(
                    name,
                    Cause::Booted,
                    &Change {
                        pid,
                        started_at: Some(now_millis()),
                        restarts,
                        kind,
                        cause,
                    },
                )
            }
            Err(err) => {
                let reason = format!("start failed: {err}");
                self.change(
                    name,
                    Cause::BootFailed,
                    &Change {
                        pid: None,
                        started_at: None,
                        restarts,
                        kind: EventKind::StartFailed,
                        cause: &reason,
                    },
                )?;
                Err(VmError::Boot {
                    name: name.to_owned(),
                    source: Box::new(err),
                }
                .into())
            }
        }
    }

    /// Starts QEMU for a VM, its console attached, optionally at a snapshot
    /// (loaded before the vCPUs first run).
    async fn boot(
        &self,
        record: &VmRecord,
        load_snapshot: Option<&str>,
    ) -> Result<(AnyVm, tokio::net::UnixStream, String), NodeError> {
        let vm = record;
        let engine = self.engine_of(vm)?;
        let image = Image::open(&record.image_dir).map_err(Fault::Image)?;
        let network = self.networks.of_vm(vm)?;
        if record.nic > 0x00ff_ffff {
            return Err(VmError::NicBeyondTaps { nic: record.nic }.into());
        }
        let tap = self.networks.tap(record.nic);
        let dir = self.vm_dir(&vm.name);
        let mut disks = vec![Disk {
            path: engine.layout(&dir).disk,
            format: DiskFormat::Qcow2,
            read_only: false,
        }];
        if let Some(config) = &vm.cloud_init {
            disks.push(write_seed(vm, config, &dir).await?);
        }
        // An instant clone's first start maps its template's RAM and
        // restores its device state; every other start boots, with RAM in
        // a file of its own when it asked (so it can become a warm
        // template), else anonymous (KSM merges it, the balloon's
        // free-page reporting gives it back).
        let restore = vm
            .restore_from
            .as_ref()
            .map(|template| (self.template_ram(template), self.template_state(template)));
        let ram = match &restore {
            Some((file, _)) => Ram::Template { file: file.clone() },
            None if vm.ram_file => Ram::Shared {
                file: self.ram_dir().join(format!("{}.ram", vm.name)),
            },
            None => Ram::Anonymous,
        };
        let generation_id = new_generation_id().map_err(Fault::Random)?;
        let spec = VmSpec {
            name: VmName::new(&vm.name).map_err(Fault::Spec)?,
            cpus: Cpus::new(vm.cpus).map_err(Fault::Spec)?,
            memory: MemoryMib::new(vm.memory_mib, self.host_memory_mib).map_err(Fault::Spec)?,
            machine: Machine::Pc,
            accel: self.accel,
            boot: boot_of(&image, vm, &dir)?,
            disks,
            nics: vec![Nic {
                mac: vm.mac.parse().map_err(Fault::Spec)?,
                backend: match &network {
                    Some(_) => NicBackend::Tap {
                        ifname: tap.clone(),
                    },
                    None => NicBackend::User,
                },
            }],
            graphics: true,
            // Its own uid and cgroup when this daemon may give them.
            confinement: Confinement {
                extra_group: restore.as_ref().map(|_| Confinement::TEMPLATE_GID),
                ..Confinement::for_vm(
                    record.nic,
                    vm.memory_mib,
                    self.accel,
                    nix::unistd::geteuid().is_root(),
                )
            },
            ram,
            generation_id: generation_id.clone(),
            restore: restore.map(|(_, state)| state),
            cpu_pin: vm
                .cpu_pin
                .as_deref()
                .map(|list| CpuSet::parse(list, self.host_cpus))
                .transpose()
                .map_err(Fault::Spec)?,
        };
        quetzal_engine::failpoint::crash("start-before-spawn");
        let mut engine_vm = engine
            .create(&spec, &dir, Lifetime::Detached)
            .await
            .map_err(Fault::Boot)?;
        // From here on a failed step ends the QEMU it started: nothing runs
        // that the store does not show as running.
        let started = async {
            if let Some(network) = &network {
                self.networks
                    .plug(&tap, network)
                    .await
                    .map_err(Fault::HostNetwork)?;
            }
            let console = engine_vm.console().await.map_err(Fault::Boot)?;
            if let Some(tag) = load_snapshot {
                engine_vm.snapshots().load(tag).await.map_err(Fault::Boot)?;
            }
            quetzal_engine::failpoint::crash("start-before-cont");
            engine_vm.start().await.map_err(Fault::Boot)?;
            quetzal_engine::failpoint::crash("start-after-cont");
            Ok::<_, NodeError>(console)
        }
        .await;
        match started {
            Ok(console) => Ok((engine_vm, console, generation_id)),
            Err(err) => {
                let _ = engine_vm.kill().await;
                Err(err)
            }
        }
    }

    /// Stops a running VM: the power button, up to `graceful` for the guest
    /// to shut down, then quit, then kill. `None` skips the power button.
    pub(super) async fn shut_down(
        &self,
        slot: &Slot,
        record: &VmRecord,
        graceful: Option<Duration>,
    ) -> Result<(), NodeError> {
        let name = record.name.as_str();
        self.change(
            name,
            if graceful.is_some() {
                Cause::Stop
            } else {
                Cause::ForceStop
            },
            &Change {
                pid: record.pid,
                started_at: record.started_at,
                restarts: record.restarts,
                kind: EventKind::Stopping,
                cause: if graceful.is_some() {
                    "stop requested"
                } else {
                    "force stop requested"
                },
            },
        )?;
        let Some(live) = slot.live() else {
            return self.change(
                name,
                Cause::StopDone,
                &down(EventKind::Stopped, "it was not running"),
            );
        };
        let mut cause = "stopped by request".to_owned();
        let mut exit = None;
        if let Some(timeout) = graceful {
            if record.state == VmState::Paused {
                let _ = live.call(Command::Resume).await;
            }
            if live.call(Command::Powerdown).await.is_ok() {
                quetzal_engine::failpoint::crash("stop-powerdown-sent");
                exit = live.wait_exit(timeout).await;
            }
            if exit.is_none() {
                cause = format!(
                    "forced off: the guest did not shut down within {}s",
                    timeout.as_secs()
                );
            }
        } else {
            cause = "forced off by request".to_owned();
        }
        if exit.is_none() {
            let _ = live.call(Command::Quit).await;
            exit = live.wait_exit(QUIT_TIMEOUT).await;
        }
        if exit.is_none() {
            let _ = live.call(Command::Kill).await;
            live.wait_exit(QUIT_TIMEOUT).await;
        }
        slot.set_live(None);
        self.change(name, Cause::StopDone, &down(EventKind::Stopped, &cause))
    }

    /// Called by a VM's supervisor when its VM process is gone. Records how it
    /// ended unless an operation already did, and applies the restart
    /// policy.
    pub async fn vm_exited(self: &Arc<Self>, name: &str, generation: u64, exit: Exit) {
        let slot = self.slot(name);
        let _op = slot.lock().await;
        let current = slot
            .live()
            .is_some_and(|live| live.generation == generation);
        if !current {
            return;
        }
        slot.set_live(None);
        let Ok(record) = self.record(name) else {
            return;
        };
        if !matches!(record.state, VmState::Running | VmState::Paused) {
            return;
        }
        let (how, kind, cause) = match &exit {
            Exit::PoweredOff => (
                Cause::PoweredOff,
                EventKind::Stopped,
                "the guest powered off".to_owned(),
            ),
            Exit::Quit => (
                Cause::PoweredOff,
                EventKind::Stopped,
                "its VM process was told to quit".to_owned(),
            ),
            Exit::Crashed(reason) | Exit::Hung(reason) => {
                (Cause::Died, EventKind::Crashed, reason.clone())
            }
            Exit::Died(log) => (
                Cause::Died,
                EventKind::Crashed,
                format!(
                    "its VM process ended without a shutdown (killed or crashed); its log: {log}"
                ),
            ),
        };
        if let Err(err) = self.change(name, how, &down(kind, &cause)) {
            tracing::warn!(vm = %name, error = %err, "cannot record the VM's exit");
            return;
        }
        let state = if how == Cause::Died {
            VmState::Crashed
        } else {
            VmState::Stopped
        };
        self.apply_policy(&record, state, &cause);
    }

    /// Called by a VM's supervisor when the engine says its vCPUs stopped
    /// or run again. Once no operation holds the VM, its state follows
    /// what the engine said last: a VM that QEMU (or the guest through
    /// it) paused by itself shows as paused, with why.
    pub fn run_state_changed(self: &Arc<Self>, name: &str, generation: u64) {
        let node = Arc::clone(self);
        let name = name.to_owned();
        tokio::spawn(async move {
            let slot = node.slot(&name);
            let _op = slot.lock().await;
            let Some(live) = slot.live().filter(|live| live.generation == generation) else {
                return;
            };
            let Ok(record) = node.record(&name) else {
                return;
            };
            let now = live.run_state();
            let (cause, kind, why) = match (record.state, now.paused) {
                (VmState::Running, true) => (
                    Cause::EnginePaused,
                    EventKind::Paused,
                    now.why.unwrap_or_else(|| "the engine paused it".to_owned()),
                ),
                (VmState::Paused, false) => (
                    Cause::EngineResumed,
                    EventKind::Resumed,
                    "the engine resumed it".to_owned(),
                ),
                _ => return,
            };
            let change = Change {
                pid: record.pid,
                started_at: record.started_at,
                restarts: record.restarts,
                kind,
                cause: &why,
            };
            if let Err(err) = node.change(&name, cause, &change) {
                tracing::warn!(vm = %name, error = %err, "cannot record what the engine said");
            }
        });
    }

    pub(super) fn apply_policy(self: &Arc<Self>, record: &VmRecord, state: VmState, cause: &str) {
        let restart = match record.restart_policy {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => state == VmState::Crashed,
            RestartPolicy::Always => true,
        };
        if !restart {
            return;
        }
        let restarts = record.restarts.saturating_add(1);
        let delay = backoff(record.restarts);
        let why = format!(
            "restart policy {}: {cause}; restart {restarts} after {}s",
            record.restart_policy.as_str(),
            delay.as_secs()
        );
        self.note(&record.name, EventKind::Restarting, &why);
        let node = Arc::clone(self);
        let name = record.name.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let slot = node.slot(&name);
            let _op = slot.lock().await;
            let Ok(record) = node.record(&name) else {
                return;
            };
            // Someone may have started or deleted it meanwhile.
            if !matches!(record.state, VmState::Stopped | VmState::Crashed) {
                return;
            }
            if let Err(err) = node
                .launch(&slot, &record, restarts, EventKind::Restarted, &why, None)
                .await
            {
                tracing::warn!(vm = %name, error = %err, "restart failed");
                // Tried again, a little later each time.
                if let Ok(record) = node.record(&name) {
                    node.apply_policy(&record, VmState::Crashed, &err.to_string());
                }
            }
        });
    }
}

/// Gives a directory and what is directly in it to the daemon's own user.
fn give_back(dir: &std::path::Path) {
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let entries = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path());
    for path in std::iter::once(dir.to_owned()).chain(entries) {
        if let Err(err) = std::os::unix::fs::lchown(&path, Some(uid), Some(gid)) {
            tracing::warn!(path = %path.display(), error = %err, "cannot take a kept file back");
        }
    }
}

/// Makes a VM's cloud-init seed for this boot, as its second disk.
async fn write_seed(vm: &VmRecord, config: &CloudConfig, dir: &Path) -> Result<Disk, NodeError> {
    let path = dir.join(cloud_init::SEED);
    let seed = Seed {
        // A VM made before machine-ids keeps a stable id all the same.
        instance_id: format!(
            "iid-{}",
            vm.machine_id
                .clone()
                .unwrap_or_else(|| format!("{}-{}", vm.name, vm.created_at))
        ),
        hostname: cloud_init::hostname(&vm.name),
        macs: vec![vm.mac.clone()],
        config: config.clone(),
    };
    let target = path.clone();
    tokio::task::spawn_blocking(move || seed.write(&target))
        .await
        .map_err(Fault::task("making the cloud-init seed"))?
        .map_err(Fault::io(&path))?;
    Ok(Disk {
        path,
        format: DiskFormat::Raw,
        read_only: true,
    })
}
