//! Snapshots: internal qcow2 snapshots of a VM's disk. Taken while the VM
//! runs they include its memory (QMP `snapshot-save`), so a revert resumes
//! the guest exactly where it was; taken while it is stopped they are
//! disk-only (`qemu-img snapshot`). The store keeps the tree (each
//! snapshot's parent) and the snapshot the VM is at.

use std::sync::Arc;

use quetzal_api::{CreateSnapshot, Snapshot, SnapshotList, Vm, VmState};
use quetzal_engine::disk::{self, SnapshotAction};
use quetzal_engine::spec::VmName;

use super::{Node, NodeError, now_millis};
use crate::supervisor::Command;

impl Node {
    pub fn snapshots(&self, vm: &str) -> Result<SnapshotList, NodeError> {
        self.record(vm)?;
        let (snapshots, current) = self.store().snapshots(vm)?;
        Ok(SnapshotList { snapshots, current })
    }

    fn snapshot(&self, vm: &str, name: &str) -> Result<Snapshot, NodeError> {
        self.snapshots(vm)?
            .snapshots
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| NodeError::NotFound(format!("VM {vm} has no snapshot named {name}")))
    }

    /// Takes a snapshot: with memory while the VM runs or is paused,
    /// disk-only while it is stopped.
    pub async fn snapshot_create(
        &self,
        vm: &str,
        request: CreateSnapshot,
    ) -> Result<Snapshot, NodeError> {
        let name = VmName::new(&request.name)
            .map_err(|e| NodeError::Invalid(e.to_string().replace("VM name", "snapshot name")))?;
        let slot = self.slot(vm);
        let _op = slot.op.lock().await;
        let record = self.record(vm)?;
        let (existing, current) = self.store().snapshots(vm)?;
        if existing.iter().any(|s| s.name == name.as_str()) {
            return Err(NodeError::Conflict(format!(
                "VM {vm} already has a snapshot named {name}"
            )));
        }
        let with_memory = match record.vm.state {
            VmState::Running | VmState::Paused => {
                let live = slot
                    .live()
                    .ok_or_else(|| NodeError::Conflict(format!("VM {vm} is not running")))?;
                live.call(Command::SnapshotSave(name.to_string()))
                    .await
                    .map_err(|e| snapshot_error(&e))?;
                true
            }
            VmState::Stopped | VmState::Crashed => {
                disk::snapshot_offline(
                    &self.vm_dir(vm).join("root.qcow2"),
                    SnapshotAction::Create,
                    name.as_str(),
                )
                .map_err(|e| snapshot_error(&e.to_string()))?;
                false
            }
            other => {
                return Err(NodeError::Conflict(format!(
                    "cannot snapshot a VM that is {}",
                    other.as_str()
                )));
            }
        };
        let snapshot = Snapshot {
            vm: vm.to_owned(),
            name: name.to_string(),
            created_at: now_millis(),
            with_memory,
            parent: current,
        };
        let cause = format!(
            "snapshot {name} taken ({})",
            if with_memory {
                "disks and memory"
            } else {
                "disks only"
            }
        );
        let event = self.store().add_snapshot(&snapshot, &cause)?;
        self.publish(event);
        Ok(snapshot)
    }

    /// Goes back to a snapshot. A running VM resumes where the snapshot
    /// was taken; a stopped VM with a memory snapshot is started into it;
    /// a stopped VM with a disk-only snapshot gets its disk back.
    pub async fn snapshot_revert(self: &Arc<Self>, vm: &str, name: &str) -> Result<Vm, NodeError> {
        let slot = self.slot(vm);
        let _op = slot.op.lock().await;
        let record = self.record(vm)?;
        let snapshot = self.snapshot(vm, name)?;
        let cause = format!("reverted to snapshot {name}");
        match (record.vm.state, snapshot.with_memory) {
            (VmState::Running | VmState::Paused, true) => {
                let live = slot
                    .live()
                    .ok_or_else(|| NodeError::Conflict(format!("VM {vm} is not running")))?;
                live.call(Command::SnapshotLoad(name.to_owned()))
                    .await
                    .map_err(|e| snapshot_error(&e))?;
                if record.vm.state == VmState::Running {
                    live.call(Command::Resume)
                        .await
                        .map_err(NodeError::Internal)?;
                }
            }
            (VmState::Running | VmState::Paused, false) => {
                return Err(NodeError::Conflict(format!(
                    "snapshot {name} has no memory state (it was taken while {vm} was stopped); stop the VM to revert to it"
                )));
            }
            (VmState::Stopped | VmState::Crashed, true) => {
                self.launch(&slot, &record, 0, "started", &cause, Some(name))
                    .await?;
            }
            (VmState::Stopped | VmState::Crashed, false) => {
                disk::snapshot_offline(
                    &self.vm_dir(vm).join("root.qcow2"),
                    SnapshotAction::Apply,
                    name,
                )
                .map_err(|e| snapshot_error(&e.to_string()))?;
            }
            (other, _) => {
                return Err(NodeError::Conflict(format!(
                    "cannot revert a VM that is {}",
                    other.as_str()
                )));
            }
        }
        let event = self.store().set_current_snapshot(vm, name, &cause)?;
        self.publish(event);
        self.get(vm)
    }

    /// Deletes a snapshot (its space in the disk image is reused).
    pub async fn snapshot_delete(&self, vm: &str, name: &str) -> Result<(), NodeError> {
        let slot = self.slot(vm);
        let _op = slot.op.lock().await;
        let record = self.record(vm)?;
        self.snapshot(vm, name)?;
        match record.vm.state {
            VmState::Running | VmState::Paused => {
                let live = slot
                    .live()
                    .ok_or_else(|| NodeError::Conflict(format!("VM {vm} is not running")))?;
                live.call(Command::SnapshotDelete(name.to_owned()))
                    .await
                    .map_err(|e| snapshot_error(&e))?;
            }
            VmState::Stopped | VmState::Crashed => {
                disk::snapshot_offline(
                    &self.vm_dir(vm).join("root.qcow2"),
                    SnapshotAction::Delete,
                    name,
                )
                .map_err(|e| snapshot_error(&e.to_string()))?;
            }
            other => {
                return Err(NodeError::Conflict(format!(
                    "cannot delete a snapshot of a VM that is {}",
                    other.as_str()
                )));
            }
        }
        let event = self
            .store()
            .remove_snapshot(vm, name, &format!("snapshot {name} deleted"))?;
        self.publish(event);
        Ok(())
    }
}

fn snapshot_error(message: &str) -> NodeError {
    if message.contains("No space left") {
        NodeError::InsufficientStorage(message.to_owned())
    } else {
        NodeError::Internal(format!("snapshot failed: {message}"))
    }
}
