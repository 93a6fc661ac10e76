//! Snapshots of a VM, kept by its engine in the VM's disk. Taken while
//! the VM runs they include its memory (the engine's snapshot jobs), so a
//! revert resumes the guest exactly where it was; taken while it is
//! stopped they are disk-only. The store keeps the tree (each snapshot's
//! parent) and the snapshot the VM is at.

use quetzal_engine::{AnyEngine, Engine};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use quetzal_api::{CreateSnapshot, EventKind, Operation, OperationKind, SnapshotList, VmState};
use quetzal_engine::SnapshotAction;
use quetzal_engine::spec::VmName;

use super::error::{Fault, SnapshotError, VmError};
use super::{Node, NodeError, now_millis};
use crate::store::{SnapshotRecord, VmRecord};
use crate::supervisor::CallError;
use crate::supervisor::{Command, Live, SnapshotJob};

impl Node {
    pub fn snapshots(&self, vm: &str) -> Result<SnapshotList, NodeError> {
        self.record(vm)?;
        let (snapshots, current) = self.store().snapshots(vm)?;
        Ok(SnapshotList {
            snapshots: snapshots.iter().map(SnapshotRecord::to_api).collect(),
            current,
        })
    }

    fn snapshot(&self, vm: &str, name: &str) -> Result<SnapshotRecord, NodeError> {
        self.record(vm)?;
        let (snapshots, _) = self.store().snapshots(vm)?;
        snapshots
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                SnapshotError::NotFound {
                    vm: vm.to_owned(),
                    name: name.to_owned(),
                }
                .into()
            })
    }

    /// Takes a snapshot, as an operation: with memory while the VM runs or
    /// is paused, disk-only while it is stopped.
    pub async fn snapshot_create(
        self: &Arc<Self>,
        vm: &str,
        request: CreateSnapshot,
    ) -> Result<Operation, NodeError> {
        let name = VmName::new(&request.name).map_err(|e| SnapshotError::InvalidName {
            reason: e.to_string().replace("VM name", "snapshot name"),
        })?;
        let slot = self.slot(vm);
        let lock = slot.lock().await;
        let record = self.record(vm)?;
        let (existing, current) = self.store().snapshots(vm)?;
        if existing.iter().any(|s| s.name == name.as_str()) {
            return Err(SnapshotError::Exists {
                vm: vm.to_owned(),
                name: name.to_string(),
            }
            .into());
        }
        let how = self.snapshot_target(&slot, &record, "snapshot")?;
        let node = Arc::clone(self);
        let vm = vm.to_owned();
        let target = format!("/api/v1/vms/{vm}/snapshots/{name}");
        let release = self.vm_dir(&vm).join("failpoint-release");
        self.operations.start(
            OperationKind::SnapshotCreate,
            target,
            false,
            move |_| async move {
                let _lock = lock;
                quetzal_engine::failpoint::hold_until_file("snapshot-hold", &release).await;
                let with_memory = matches!(how, On::Live(_));
                let mut quiesced = false;
                match how {
                    On::Live(live) => {
                        // A running guest with an agent that can freeze:
                        // frozen for the snapshot, thawed on every path
                        // (and by the agent itself after 10 s).
                        let freezer = live.agent.as_ref().filter(|agent| {
                            request.quiesce
                                && record.state == VmState::Running
                                && agent.status().commands.iter().any(|c| c == FREEZE)
                        });
                        if let Some(agent) = freezer {
                            match agent.call(FREEZE, json!({}), FREEZE_TIMEOUT).await {
                                Ok(_) => quiesced = true,
                                Err(err) => tracing::warn!(vm = %vm, error = %err,
                                    "cannot freeze the guest's filesystems; the snapshot is not quiesced"),
                            }
                            // Dying here leaves the guest frozen: only its
                            // agent's own timer thaws it.
                            quetzal_engine::failpoint::crash("snapshot-frozen");
                        }
                        let saved = live
                            .call(Command::Snapshot(SnapshotJob::Save, name.to_string()))
                            .await;
                        if let Some(agent) = freezer {
                            thaw(agent, &vm).await;
                        }
                        saved.map_err(failed(&vm))?;
                    }
                    On::Disk(engine, disk) => {
                        run_offline(engine, disk, SnapshotAction::Create, name.to_string()).await?
                    }
                }
                quetzal_engine::failpoint::crash("snapshot-taken");
                let snapshot = SnapshotRecord {
                    vm: vm.clone(),
                    name: name.to_string(),
                    created_at: now_millis(),
                    with_memory,
                    parent: current,
                    quiesced,
                };
                let cause = format!(
                    "snapshot {name} taken ({}{})",
                    if with_memory {
                        "disks and memory"
                    } else {
                        "disks only"
                    },
                    if quiesced { ", quiesced" } else { "" }
                );
                let event = node.store().add_snapshot(&snapshot, &cause)?;
                node.publish(event.into());
                Ok(())
            },
        )
    }

    /// Where a snapshot job on `vm` runs: its supervisor while it is up,
    /// its disk file while it is down.
    fn snapshot_target(
        &self,
        slot: &super::Slot,
        vm: &VmRecord,
        action: &'static str,
    ) -> Result<On, NodeError> {
        match vm.state {
            VmState::Running | VmState::Paused => {
                Ok(slot
                    .live()
                    .map(On::Live)
                    .ok_or_else(|| VmError::NotRunning {
                        name: vm.name.clone(),
                    })?)
            }
            VmState::Stopped | VmState::Crashed => {
                Ok(On::Disk(self.engine_of(vm)?.clone(), self.vm_disk(vm)?))
            }
            state => Err(SnapshotError::Refused { action, state }.into()),
        }
    }

    /// Goes back to a snapshot, as an operation. A running VM resumes
    /// where the snapshot was taken; a stopped VM with a memory snapshot
    /// is started into it; a stopped VM with a disk-only snapshot gets its
    /// disk back.
    pub async fn snapshot_revert(
        self: &Arc<Self>,
        vm: &str,
        name: &str,
    ) -> Result<Operation, NodeError> {
        let slot = self.slot(vm);
        let lock = slot.lock().await;
        let record = self.record(vm)?;
        let snapshot = self.snapshot(vm, name)?;
        let how = self.snapshot_target(&slot, &record, "revert")?;
        if matches!(how, On::Live(_)) && !snapshot.with_memory {
            return Err(SnapshotError::NoMemory {
                vm: vm.to_owned(),
                name: name.to_owned(),
            }
            .into());
        }
        let node = Arc::clone(self);
        let (vm, name) = (vm.to_owned(), name.to_owned());
        let target = format!("/api/v1/vms/{vm}");
        self.operations.start(
            OperationKind::SnapshotRevert,
            target,
            false,
            move |_| async move {
                let _lock = lock;
                let cause = format!("reverted to snapshot {name}");
                match how {
                    On::Live(live) => {
                        live.call(Command::Snapshot(SnapshotJob::Load, name.clone()))
                            .await
                            .map_err(failed(&vm))?;
                        if record.state == VmState::Running {
                            live.call(Command::Resume).await?;
                        }
                        // The guest resumes where it was frozen: thaw it now
                        // rather than after its agent's own 10 s.
                        if record.state == VmState::Running
                            && let Some(agent) = &live.agent
                        {
                            if snapshot.quiesced {
                                thaw(agent, &vm).await;
                            }
                            // Its clock is the snapshot's: set it to now.
                            set_clock(agent, &vm).await;
                        }
                    }
                    On::Disk(..) if snapshot.with_memory => {
                        node.launch(&slot, &record, 0, EventKind::Started, &cause, Some(&name))
                            .await?;
                    }
                    On::Disk(engine, disk) => {
                        run_offline(engine, disk, SnapshotAction::Apply, name.clone()).await?
                    }
                }
                let event = node.store().set_current_snapshot(&vm, &name, &cause)?;
                node.publish(event.into());
                Ok(())
            },
        )
    }

    /// Deletes a snapshot (its space in the disk image is reused), as an
    /// operation.
    pub async fn snapshot_delete(
        self: &Arc<Self>,
        vm: &str,
        name: &str,
    ) -> Result<Operation, NodeError> {
        let slot = self.slot(vm);
        let lock = slot.lock().await;
        let record = self.record(vm)?;
        self.snapshot(vm, name)?;
        let how = self.snapshot_target(&slot, &record, "delete a snapshot of")?;
        let node = Arc::clone(self);
        let (vm, name) = (vm.to_owned(), name.to_owned());
        let target = format!("/api/v1/vms/{vm}/snapshots/{name}");
        self.operations.start(
            OperationKind::SnapshotDelete,
            target,
            false,
            move |_| async move {
                let _lock = lock;
                match how {
                    On::Live(live) => live
                        .call(Command::Snapshot(SnapshotJob::Delete, name.clone()))
                        .await
                        .map_err(failed(&vm))?,
                    On::Disk(engine, disk) => {
                        run_offline(engine, disk, SnapshotAction::Delete, name.clone()).await?
                    }
                }
                let event = node.store().remove_snapshot(
                    &vm,
                    &name,
                    &format!("snapshot {name} deleted"),
                )?;
                node.publish(event.into());
                Ok(())
            },
        )
    }
}

/// Where a snapshot job runs.
#[derive(Debug)]
enum On {
    /// The running VM's supervisor (jobs with memory).
    Live(Arc<Live>),
    /// The stopped VM's disk file (disk only), and its engine.
    Disk(AnyEngine, PathBuf),
}

/// A disk-only snapshot job on a stopped VM's disk, off the runtime.
async fn run_offline(
    engine: AnyEngine,
    disk: PathBuf,
    action: SnapshotAction,
    tag: String,
) -> Result<(), NodeError> {
    let done = tokio::task::spawn_blocking(move || engine.snapshot_disk(&disk, action, &tag))
        .await
        .map_err(Fault::task("the snapshot job"))?;
    Ok(done?)
}

/// A failed snapshot job of VM `vm` (out of space is its own kind, 507).
fn failed(vm: &str) -> impl FnOnce(CallError) -> SnapshotError + '_ {
    move |source| SnapshotError::Failed {
        vm: vm.to_owned(),
        source,
    }
}

const FREEZE: &str = "guest-fsfreeze-freeze";
/// How long a freeze may take (every filesystem flushes its dirty data).
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets the guest's clock to the host's (after it went back in time), if
/// its agent can; a failure is logged (the guest's NTP, if any, corrects
/// it later).
async fn set_clock(agent: &crate::agent::AgentLink, vm: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    match agent
        .call("guest-set-time", json!({ "time": now }), FREEZE_TIMEOUT)
        .await
    {
        // An agent without the command is not asked (`call` checks).
        Ok(_) | Err(crate::agent::AgentError::Unsupported(_)) => {}
        Err(err) => tracing::warn!(vm = %vm, error = %err, "cannot set the guest's clock"),
    }
}

/// Thaws the guest's filesystems; a failure is logged (the agent thaws by
/// itself after 10 s).
async fn thaw(agent: &crate::agent::AgentLink, vm: &str) {
    if let Err(err) = agent
        .call("guest-fsfreeze-thaw", json!({}), FREEZE_TIMEOUT)
        .await
    {
        tracing::warn!(vm = %vm, error = %err, "cannot thaw the guest's filesystems; its agent will");
    }
}
