//! Templates and clones: a stopped VM becomes a template (its disk a
//! read-only base); VMs are made from templates as linked clones (a qcow2
//! overlay on the template's disk: no copy) or full clones (a copy of the
//! template's data on the image's base disk), or cloned from a stopped VM.

use quetzal_engine::Engine;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use quetzal_api::{CloneVm, CreateTemplate, CreateVm, Operation, OperationKind, Template, VmState};
use quetzal_engine::spec::VmName;
use quetzal_image::{Image, ImageError};

use super::create::Made;
use super::{Node, NodeError, Published, now_millis};
use crate::store::TemplateRecord;
use crate::store::VmRecord;

/// How a new VM's disk is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskPlan {
    /// A qcow2 overlay on `base`; `linked_to` names the template it is.
    Overlay {
        base: PathBuf,
        linked_to: Option<String>,
    },
    /// A copy of `from`'s data on top of `keep_base` (the image's base or
    /// the template a linked clone sits on).
    Copy {
        from: PathBuf,
        keep_base: PathBuf,
        linked_to: Option<String>,
    },
}

impl DiskPlan {
    pub fn is_copy(&self) -> bool {
        matches!(self, DiskPlan::Copy { .. })
    }

    pub fn linked_to(&self) -> Option<String> {
        match self {
            DiskPlan::Overlay { linked_to, .. } | DiskPlan::Copy { linked_to, .. } => {
                linked_to.clone()
            }
        }
    }
}

/// Where a new VM's disk comes from.
#[derive(Clone, Debug)]
pub struct DiskSource {
    pub image: Image,
    /// The size of the disk it starts from.
    pub base_mib: u64,
    pub plan: DiskPlan,
}

impl Node {
    pub(super) fn templates_dir(&self) -> PathBuf {
        self.data.join("templates")
    }

    pub(super) fn template_disk(&self, name: &str) -> PathBuf {
        self.templates_dir()
            .join(name)
            .join(self.engine().template_disk_name())
    }

    /// Resolves a create request's image or template into a disk plan.
    pub(super) fn disk_source(&self, request: &CreateVm) -> Result<DiskSource, NodeError> {
        let Some(template) = &request.template else {
            let name = request
                .image
                .as_deref()
                .unwrap_or(quetzal_image::DEFAULT_IMAGE);
            let image = self.images.get(name).map_err(|err| match err {
                ImageError::Unknown { .. } | ImageError::NotBuilt { .. } => {
                    NodeError::Invalid(err.to_string())
                }
                other => NodeError::Internal(other.to_string()),
            })?;
            return Ok(DiskSource {
                base_mib: self.disk_mib(&image.root_disk())?,
                plan: DiskPlan::Overlay {
                    base: image.root_disk(),
                    linked_to: None,
                },
                image,
            });
        };
        if request.image.is_some() {
            return Err(NodeError::Invalid(
                "give either image or template, not both".to_owned(),
            ));
        }
        let record = self
            .store()
            .template(template)?
            .ok_or_else(|| NodeError::NotFound(format!("no template named {template}")))?;
        let image =
            Image::open(&record.image_dir).map_err(|e| NodeError::Internal(e.to_string()))?;
        let disk = self.template_disk(template);
        let plan = if request.full_clone {
            DiskPlan::Copy {
                from: disk,
                keep_base: image.root_disk(),
                linked_to: None,
            }
        } else {
            DiskPlan::Overlay {
                base: disk,
                linked_to: Some(template.clone()),
            }
        };
        Ok(DiskSource {
            image,
            base_mib: record.disk_mib,
            plan,
        })
    }

    fn template_view(&self, record: TemplateRecord) -> Result<Template, NodeError> {
        let linked_clones = self.store().linked_clones(&record.name)?;
        Ok(Template {
            name: record.name,
            image: record.image,
            cpus: record.cpus,
            memory_mib: record.memory_mib,
            disk_mib: record.disk_mib,
            source_vm: record.source_vm,
            created_at: record.created_at,
            disk_sha256: record.disk_sha256,
            linked_clones,
        })
    }

    pub fn templates(&self) -> Result<Vec<Template>, NodeError> {
        let records = self.store().templates()?;
        records.into_iter().map(|r| self.template_view(r)).collect()
    }

    pub fn template(&self, name: &str) -> Result<Template, NodeError> {
        let record = self
            .store()
            .template(name)?
            .ok_or_else(|| NodeError::NotFound(format!("no template named {name}")))?;
        self.template_view(record)
    }

    /// Turns a stopped VM into a template: its disk moves to
    /// `templates/NAME/disk.qcow2` and becomes read-only; the VM is gone.
    /// An operation: hashing the disk takes a while.
    pub async fn create_template(
        self: &Arc<Self>,
        request: CreateTemplate,
    ) -> Result<Operation, NodeError> {
        let name = VmName::new(&request.name)
            .map_err(|e| NodeError::Invalid(e.to_string().replace("VM name", "template name")))?;
        let slot = self.slot(&request.from_vm);
        let lock = slot.lock().await;
        let record = self.record(&request.from_vm)?;
        if !matches!(record.state, VmState::Stopped | VmState::Crashed) {
            return Err(NodeError::Conflict(format!(
                "cannot make a template of a VM that is {}; stop it first",
                record.state.as_str()
            )));
        }
        if let Some(template) = &record.linked_to {
            return Err(NodeError::Conflict(format!(
                "VM {} is a linked clone of template {template}; make a full clone of it first",
                record.name
            )));
        }
        if self.store().template(name.as_str())?.is_some() {
            return Err(NodeError::Conflict(format!(
                "a template named {name} already exists"
            )));
        }
        let node = Arc::clone(self);
        let target = format!("/api/v1/templates/{name}");
        self.start_operation(
            OperationKind::CreateTemplate,
            target,
            false,
            move |_| async move {
                let _lock = lock;
                node.templatize(name.as_str(), record).await
            },
        )
    }

    /// The work of [`Node::create_template`], with the VM's lock held.
    async fn templatize(
        &self,
        name: &str,
        record: crate::store::VmRecord,
    ) -> Result<(), NodeError> {
        let dir = self.templates_dir().join(name);
        let disk = self.template_disk(name);
        let vm_disk = self.vm_disk(&record)?;
        // A directory without a template is left from a create cut short.
        let _ = std::fs::remove_dir_all(&dir);
        let linked = std::fs::create_dir_all(&dir)
            // A hard link: until the store says otherwise, the VM keeps its disk.
            .and_then(|()| std::fs::hard_link(&vm_disk, &disk))
            .map_err(|e| NodeError::Internal(format!("{}: {e}", disk.display())));
        let hashed = match linked {
            Ok(()) => {
                let disk = disk.clone();
                tokio::task::spawn_blocking(move || quetzal_image::sha256_file(&disk))
                    .await
                    .map_err(|e| NodeError::Internal(e.to_string()))
                    .and_then(|hashed| hashed.map_err(|e| NodeError::Internal(e.to_string())))
            }
            Err(err) => Err(err),
        };
        quetzal_engine::failpoint::crash("template-hashed");
        let sha256 = match hashed {
            Ok((sha256, _)) => sha256,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(err);
            }
        };
        let template = TemplateRecord {
            name: name.to_owned(),
            image: record.image.clone(),
            image_dir: record.image_dir.clone(),
            cpus: record.cpus,
            memory_mib: record.memory_mib,
            disk_mib: record.disk_mib,
            source_vm: record.name.clone(),
            created_at: now_millis(),
            disk_sha256: sha256,
        };
        let event = match self.store().templatize(&template) {
            Ok(event) => event,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(err.into());
            }
        };
        quetzal_engine::failpoint::crash("template-recorded");
        let _ = std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o444));
        if let Err(err) = std::fs::remove_dir_all(self.vm_dir(&record.name)) {
            tracing::warn!(vm = %record.name, error = %err, "cannot remove the VM's directory");
        }
        self.publish(Published::Event(event));
        self.forget_slot(&record.name);
        Ok(())
    }

    /// Deletes a template that no VM is a linked clone of.
    pub async fn delete_template(&self, name: &str) -> Result<(), NodeError> {
        let template = self.template(name)?;
        if !template.linked_clones.is_empty() {
            return Err(NodeError::Conflict(format!(
                "template {name} has linked clones: {}; delete them first (full clones do not count)",
                template.linked_clones.join(", ")
            )));
        }
        self.store().delete_template(name)?;
        let dir = self.templates_dir().join(name);
        if let Err(err) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(template = %name, error = %err, "cannot remove the template's directory");
        }
        Ok(())
    }

    /// A new, stopped VM with a copy of a stopped VM's disk and settings (a
    /// linked clone stays linked to the same template): an operation that
    /// holds both VMs until the copy is done.
    pub async fn clone_vm(
        self: &Arc<Self>,
        source: &str,
        request: CloneVm,
    ) -> Result<Operation, NodeError> {
        let name = VmName::new(&request.name).map_err(|e| NodeError::Invalid(e.to_string()))?;
        if name.as_str() == source {
            return Err(NodeError::Conflict(format!(
                "a VM named {source} already exists"
            )));
        }
        // Both locks, in name order: two clones in opposite directions
        // cannot wait on each other.
        let (first, second) = if source < name.as_str() {
            (self.slot(source), self.slot(name.as_str()))
        } else {
            (self.slot(name.as_str()), self.slot(source))
        };
        let locks = vec![first.lock().await, second.lock().await];
        let record = self.record(source)?;
        if !matches!(record.state, VmState::Stopped | VmState::Crashed) {
            return Err(NodeError::Conflict(format!(
                "cannot clone a VM that is {}; stop it first",
                record.state.as_str()
            )));
        }
        let keep_base = match &record.linked_to {
            Some(template) => self.template_disk(template),
            None => Image::open(&record.image_dir)
                .map_err(|e| NodeError::Internal(e.to_string()))?
                .root_disk(),
        };
        let plan = DiskPlan::Copy {
            from: self.vm_disk(&record)?,
            keep_base,
            linked_to: record.linked_to.clone(),
        };
        let vm = VmRecord {
            name: name.to_string(),
            state: VmState::Stopped,
            pid: None,
            created_at: now_millis(),
            started_at: None,
            restarts: 0,
            machine_id: Some(super::new_machine_id()?),
            // Drawn when it is recorded.
            mac: String::new(),
            engine: self.engine().kind().as_str().to_owned(),
            ..record.clone()
        };
        let cause = format!("cloned from {source}");
        let made = {
            let _net = self.net_op.lock().await;
            self.make_vm(vm, &plan, &cause)?
        };
        match made {
            Made::Copy(pending) => {
                self.copy_in_operation(OperationKind::CloneVm, pending, locks, cause)
            }
            Made::Done(_) => Err(NodeError::Internal(
                "a clone of a VM is always a copy".to_owned(),
            )),
        }
    }
}
