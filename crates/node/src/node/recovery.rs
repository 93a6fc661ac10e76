//! After a daemon start: operations that were running failed with the
//! last daemon, and what they made half-way is removed; VMs whose QEMU
//! still runs are re-attached, and those that died meanwhile are marked
//! (and handled per their restart policy).

use quetzal_engine::Engine;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use quetzal_api::VmState;

use crate::store::VmRecord;
use quetzal_engine::{EngineVm, SnapshotAction};

use super::error::Fault;
use super::{Node, NodeError, Published, down};
use crate::lifecycle::Cause;
use crate::store::Change;
use crate::supervisor::{self, Command, SnapshotJob};
use quetzal_api::EventKind;

impl Node {
    pub(super) async fn recover(self: &Arc<Self>) -> Result<(), NodeError> {
        let interrupted = self.store().fail_interrupted_operations()?;
        for op in interrupted {
            tracing::warn!(operation = %op.id, kind = op.kind.as_str(), target = %op.target, "operation interrupted by a daemon restart");
            self.publish(Published::Operation(op.to_api()));
        }
        self.remove_half_made()?;
        self.reattach().await
    }

    /// Removes what an operation cut short by the last daemon's end left:
    /// VMs still `creating` (a copy that did not finish), template
    /// directories no template owns, and the directories of VMs that
    /// became templates.
    fn remove_half_made(&self) -> Result<(), NodeError> {
        let records = self.store().list()?;
        for record in records.iter().filter(|r| r.state == VmState::Creating) {
            let name = &record.name;
            tracing::warn!(vm = %name, "removing a VM whose disk copy was interrupted");
            self.note(
                name,
                EventKind::CreateFailed,
                "quetzald stopped while its disk was copied",
            );
            self.remove_vm_record(name, &self.vm_dir(name), "its disk copy was interrupted");
        }
        let templates = self.store().templates()?;
        let dir = self.templates_dir();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !templates.iter().any(|t| t.name == name) {
                tracing::warn!(template = %name, "removing a template directory no template owns");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        for template in &templates {
            let disk = self.template_disk(&template.name);
            let _ = std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o444));
            let source = self.vm_dir(&template.source_vm);
            let recorded = records.iter().any(|r| r.name == template.source_vm);
            if !recorded && self.engine().layout(&source).disk.exists() {
                tracing::warn!(vm = %template.source_vm, "removing the directory of a VM that became a template");
                let _ = std::fs::remove_dir_all(&source);
            }
        }
        Ok(())
    }

    /// Finds each VM's QEMU again (by the pidfile its process wrote, or
    /// the pid in the store) and makes the store agree with what runs:
    /// a running VM has exactly one QEMU, a stopped one none.
    async fn reattach(self: &Arc<Self>) -> Result<(), NodeError> {
        let records = self.store().list()?;
        for record in records {
            let vm = record.clone();
            let name = &vm.name;
            if let Err(err) = self.recover_vm(record).await {
                tracing::warn!(vm = %name, error = %err, "cannot recover the VM");
            }
            if vm.state != VmState::Creating
                && let Err(err) = self.reconcile_snapshots(&vm).await
            {
                tracing::warn!(vm = %name, error = %err, "cannot check the VM's snapshots");
            }
        }
        Ok(())
    }

    /// Makes the store's snapshots of a VM those its disk holds: one on
    /// the disk the store does not know was taken by an operation the
    /// last daemon's death cut short before recording it (it goes); one
    /// the store knows that the disk lacks was being deleted (its record
    /// goes).
    async fn reconcile_snapshots(self: &Arc<Self>, vm: &VmRecord) -> Result<(), NodeError> {
        let name = vm.name.as_str();
        let slot = self.slot(name);
        let _op = slot.lock().await;
        let engine = self.engine_of(vm)?.clone();
        let disk = self.vm_disk(vm)?;
        if !disk.exists() {
            return Ok(());
        }
        let (reader, path) = (engine.clone(), disk.clone());
        let on_disk = tokio::task::spawn_blocking(move || reader.disk_snapshots(&path))
            .await
            .map_err(Fault::task("reading the disk's snapshots"))??;
        let (stored, _) = self.store().snapshots(name)?;
        for tag in on_disk
            .iter()
            .filter(|tag| !stored.iter().any(|s| &s.name == *tag))
        {
            tracing::warn!(vm = %name, snapshot = %tag, "removing a snapshot the store never recorded");
            match slot.live() {
                Some(live) => {
                    live.call(Command::Snapshot(SnapshotJob::Delete, tag.clone()))
                        .await?
                }
                None => engine.snapshot_disk(&disk, SnapshotAction::Delete, tag)?,
            }
        }
        for snapshot in stored.iter().filter(|s| !on_disk.contains(&s.name)) {
            let cause = format!(
                "snapshot {} was being deleted when quetzald stopped",
                snapshot.name
            );
            let event = self.store().remove_snapshot(name, &snapshot.name, &cause)?;
            self.publish(Published::Event(event));
        }
        Ok(())
    }

    /// [`Node::reattach`] for one VM.
    async fn recover_vm(self: &Arc<Self>, record: crate::store::VmRecord) -> Result<(), NodeError> {
        let name = record.name.clone();
        if matches!(record.state, VmState::Migrating | VmState::Unknown) {
            // Cluster states: no single node records them.
            tracing::warn!(vm = %name, state = record.state.as_str(), "left as it is");
            return Ok(());
        }
        let dir = self.vm_dir(&name);
        let slot = self.slot(&name);
        let _op = slot.lock().await;
        let attached = self.engine_of(&record)?.adopt(&dir, record.pid).await;
        let state = record.state;
        let Some(mut engine_vm) = attached else {
            match state {
                VmState::Running | VmState::Paused | VmState::Starting => {
                    let cause = if state == VmState::Starting {
                        "quetzald stopped during its start; its VM process is gone".to_owned()
                    } else {
                        "its VM process ended while quetzald was down".to_owned()
                    };
                    self.mark_crashed(&record, &cause)?;
                }
                VmState::Stopping => {
                    self.change(
                        &name,
                        Cause::Gone,
                        &down(EventKind::Stopped, "stopped while quetzald was down"),
                    )?;
                }
                VmState::Stopped
                | VmState::Crashed
                | VmState::Creating
                | VmState::Migrating
                | VmState::Unknown => {}
            }
            return Ok(());
        };
        let engine_state = engine_vm.state().await.ok();
        let reattach = match state {
            VmState::Running | VmState::Paused => true,
            // A start cut short: keep it if its vCPUs already ran.
            VmState::Starting => matches!(
                engine_state,
                Some(quetzal_engine::VmState::Running | quetzal_engine::VmState::Paused)
            ),
            VmState::Stopping
            | VmState::Stopped
            | VmState::Crashed
            | VmState::Creating
            | VmState::Migrating
            | VmState::Unknown => false,
        };
        if !reattach {
            // Nothing may run that the store does not show running.
            let _ = engine_vm.kill().await;
            match state {
                VmState::Starting => {
                    self.mark_crashed(
                        &record,
                        "quetzald stopped during its start; its VM process was ended before it ran",
                    )?;
                }
                VmState::Stopping => {
                    self.change(
                        &name,
                        Cause::Gone,
                        &down(
                            EventKind::Stopped,
                            "the stop was finished after quetzald restarted",
                        ),
                    )?;
                }
                _ => {
                    tracing::warn!(vm = %name, state = state.as_str(), "ended a VM process the store did not know was running")
                }
            }
            return Ok(());
        }
        let console = match engine_vm.console().await {
            Ok(console) => console,
            Err(err) => {
                let _ = engine_vm.kill().await;
                self.mark_crashed(
                    &record,
                    &format!("its console could not be reached after a daemon restart ({err})"),
                )?;
                return Ok(());
            }
        };
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = engine_vm.pid();
        let paused = matches!(engine_state, Some(quetzal_engine::VmState::Paused));
        let live = supervisor::spawn(
            Arc::clone(self),
            name.clone(),
            generation,
            engine_vm,
            console,
            self.layout(&record)?,
            paused,
            &record.services,
        );
        slot.set_live(Some(Arc::new(live)));
        self.change(
            &name,
            Cause::Reattached { paused },
            &Change {
                pid,
                started_at: record.started_at.or(Some(super::now_millis())),
                restarts: record.restarts,
                kind: EventKind::Reattached,
                cause: "quetzald restarted; the VM kept running",
            },
        )?;
        Ok(())
    }

    /// Records that a VM's QEMU is gone without a stop, and applies its
    /// restart policy.
    fn mark_crashed(
        self: &Arc<Self>,
        record: &crate::store::VmRecord,
        cause: &str,
    ) -> Result<(), NodeError> {
        self.change(&record.name, Cause::Gone, &down(EventKind::Crashed, cause))?;
        self.apply_policy(record, VmState::Crashed, cause);
        Ok(())
    }
}
