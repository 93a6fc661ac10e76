//! Templates and clones: a stopped VM becomes a template (its disk a
//! read-only base); VMs are made from templates as linked clones (a qcow2
//! overlay on the template's disk: no copy) or full clones (a copy of the
//! template's data on the image's base disk), or cloned from a stopped VM.

use quetzal_engine::Engine;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quetzal_api::{CloneVm, CreateTemplate, CreateVm, Operation, OperationKind, Template, VmState};
use quetzal_engine::spec::VmName;
use quetzal_image::{Image, ImageError};

use super::create::Made;
use super::error::{Fault, TemplateError, VmError};
use super::{Node, NodeError, Published, now_millis};
use crate::store::VmRecord;
use crate::store::{StoreError, TemplateRecord, WarmFiles};
use crate::supervisor::Command;

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

    /// A warm template's RAM file: what its instant clones map.
    pub(super) fn template_ram(&self, name: &str) -> PathBuf {
        self.templates_dir().join(name).join("ram")
    }

    /// A warm template's saved device state: what its instant clones
    /// restore.
    pub(super) fn template_state(&self, name: &str) -> PathBuf {
        self.templates_dir().join(name).join("state")
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
                    NodeError::from(TemplateError::Image(err))
                }
                other => Fault::Image(other).into(),
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
            return Err(TemplateError::ImageAndTemplate.into());
        }
        let record = self.template_record(template)?;
        let image = Image::open(&record.image_dir).map_err(Fault::Image)?;
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
            warm: record.warm.map(|warm| quetzal_api::WarmTemplate {
                ram_sha256: warm.ram_sha256,
                state_sha256: warm.state_sha256,
            }),
        })
    }

    pub fn templates(&self) -> Result<Vec<Template>, NodeError> {
        let records = self.store().templates()?;
        records.into_iter().map(|r| self.template_view(r)).collect()
    }

    pub fn template(&self, name: &str) -> Result<Template, NodeError> {
        let record = self.template_record(name)?;
        self.template_view(record)
    }

    pub(super) fn template_record(&self, name: &str) -> Result<TemplateRecord, NodeError> {
        let found = self.store().template(name)?;
        Ok(found.ok_or_else(|| TemplateError::NotFound {
            name: name.to_owned(),
        })?)
    }

    /// Turns a stopped VM into a template: its disk moves to
    /// `templates/NAME/disk.qcow2` and becomes read-only; the VM is gone.
    /// With `warm`, a running VM, whose RAM and device state are kept too.
    /// An operation: hashing the disk takes a while.
    pub async fn create_template(
        self: &Arc<Self>,
        request: CreateTemplate,
    ) -> Result<Operation, NodeError> {
        let name = VmName::new(&request.name).map_err(|e| TemplateError::InvalidName {
            reason: e.to_string().replace("VM name", "template name"),
        })?;
        let slot = self.slot(&request.from_vm);
        let lock = slot.lock().await;
        let record = self.record(&request.from_vm)?;
        if request.warm {
            if !matches!(record.state, VmState::Running | VmState::Paused) {
                return Err(TemplateError::NotRunning {
                    state: record.state,
                }
                .into());
            }
        } else if !matches!(record.state, VmState::Stopped | VmState::Crashed) {
            return Err(TemplateError::NotStopped {
                action: "make a template of",
                state: record.state,
            }
            .into());
        }
        if let Some(template) = &record.linked_to {
            return Err(TemplateError::LinkedClone {
                vm: record.name.clone(),
                template: template.clone(),
            }
            .into());
        }
        if self.store().template(name.as_str())?.is_some() {
            return Err(TemplateError::Exists {
                name: name.to_string(),
            }
            .into());
        }
        if request.warm && !self.layout(&record)?.ram.exists() {
            return Err(TemplateError::NoRamFile { vm: record.name }.into());
        }
        let node = Arc::clone(self);
        let warm = request.warm;
        let target = format!("/api/v1/templates/{name}");
        self.operations.start(
            OperationKind::CreateTemplate,
            target,
            false,
            move |_| async move {
                let _lock = lock;
                if !warm {
                    return node.templatize(name.as_str(), record, None).await;
                }
                let (record, files) = node.keep_memory(name.as_str(), &slot, record).await?;
                node.templatize(name.as_str(), record, Some(files)).await
            },
        )
    }

    /// The first half of a warm template, with the VM's lock held: once
    /// its agent says the guest is up, the guest's disks are synced, the
    /// VM paused, its device state saved and its RAM file copied into
    /// the template's directory; then its process ends. Any step that
    /// fails resumes the VM and leaves no template files.
    async fn keep_memory(
        self: &Arc<Self>,
        name: &str,
        slot: &super::Slot,
        record: VmRecord,
    ) -> Result<(VmRecord, WarmFiles), NodeError> {
        let dir = self.templates_dir().join(name);
        // A directory without a template is left from a create cut short.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(Fault::io(&dir))?;
        let kept = async {
            let live = slot.live().ok_or(TemplateError::NotRunning {
                state: VmState::Stopped,
            })?;
            self.guest_ready(&record.name, &live, WARM_READY_TIMEOUT)
                .await?;
            // What the guest has cached for its disks reaches them; the
            // saved RAM has it too, but a clone that boots later reads
            // only the disk.
            self.exec(
                &record.name,
                quetzal_api::Exec {
                    command: "sync".to_owned(),
                    args: vec![],
                    stdin_b64: None,
                    timeout_secs: Some(60),
                },
            )
            .await?;
            live.call(Command::Pause).await.map_err(Fault::Engine)?;
            let saved = async {
                let state = self.template_state(name);
                live.call(Command::SaveState(state.clone()))
                    .await
                    .map_err(Fault::Engine)?;
                let ram = std::fs::read_link(self.layout(&record)?.ram)
                    .map_err(Fault::io(&self.layout(&record)?.ram))?;
                let to = self.template_ram(name);
                let (ram_sha256, state_sha256) = tokio::task::spawn_blocking(move || {
                    let ram = copy_sparse(&ram, &to).map_err(Fault::io(&to))?;
                    let state = quetzal_image::sha256_file(&state).map_err(Fault::Image)?;
                    Ok::<_, NodeError>((ram, state.0))
                })
                .await
                .map_err(Fault::task("copying the RAM"))??;
                Ok::<_, NodeError>(WarmFiles {
                    ram_sha256,
                    state_sha256,
                })
            }
            .await;
            if saved.is_err() {
                let _ = live.call(Command::Resume).await;
            }
            saved
        }
        .await;
        let files = match kept {
            Ok(files) => files,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(err);
            }
        };
        quetzal_engine::failpoint::crash("warm-saved");
        // Paused, saved and copied: its process ends (never to run again).
        self.shut_down(slot, &record, None).await?;
        Ok((self.record(&record.name)?, files))
    }

    /// The work of [`Node::create_template`], with the VM's lock held.
    async fn templatize(
        &self,
        name: &str,
        record: crate::store::VmRecord,
        warm: Option<WarmFiles>,
    ) -> Result<(), NodeError> {
        let dir = self.templates_dir().join(name);
        let disk = self.template_disk(name);
        let vm_disk = self.vm_disk(&record)?;
        if warm.is_none() {
            // A directory without a template is left from a create cut short.
            let _ = std::fs::remove_dir_all(&dir);
        }
        let linked = std::fs::create_dir_all(&dir)
            // A hard link: until the store says otherwise, the VM keeps its disk.
            .and_then(|()| std::fs::hard_link(&vm_disk, &disk))
            .map_err(|e| NodeError::from(Fault::io(&disk)(e)));
        let hashed = match linked {
            Ok(()) => {
                let path = disk.clone();
                tokio::task::spawn_blocking(move || quetzal_image::sha256_file(&path))
                    .await
                    .map_err(|e| NodeError::from(Fault::task("hashing the disk")(e)))
                    .and_then(|hashed| hashed.map_err(|e| Fault::Image(e).into()))
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
            warm,
        };
        let templatized = self.store().templatize(&template);
        let event = match templatized {
            Ok(event) => event,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(match err {
                    StoreError::Exists(name) => TemplateError::Exists { name }.into(),
                    other => other.into(),
                });
            }
        };
        quetzal_engine::failpoint::crash("template-recorded");
        // The template's disk belongs to the daemon, read-only to all (the
        // base of every clone, whichever user each runs as): the uid its VM
        // ran as may come back to another VM.
        let _ = std::os::unix::fs::lchown(
            &disk,
            Some(nix::unistd::geteuid().as_raw()),
            Some(nix::unistd::getegid().as_raw()),
        );
        let _ = std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o444));
        if template.warm.is_some() {
            seal_memory(&self.template_ram(name), &self.template_state(name));
        }
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
        self.check_no_pool_uses(name)?;
        if !template.linked_clones.is_empty() {
            return Err(TemplateError::HasLinkedClones {
                name: name.to_owned(),
                clones: template.linked_clones,
            }
            .into());
        }
        self.store().delete_template(name)?;
        let dir = self.templates_dir().join(name);
        if let Err(err) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(template = %name, error = %err, "cannot remove the template's directory");
        }
        Ok(())
    }

    /// Deletes image `name` (every build of it), refused while a VM or a
    /// template was made from it: each needs its files to boot or to
    /// make clones.
    pub async fn delete_image(&self, name: &str) -> Result<(), NodeError> {
        if !self
            .images
            .names()
            .map_err(Fault::Image)?
            .iter()
            .any(|n| n == name)
        {
            return Err(TemplateError::ImageNotFound {
                name: name.to_owned(),
            }
            .into());
        }
        let mut users: Vec<String> = self
            .store()
            .list()?
            .into_iter()
            .filter(|vm| vm.image == name)
            .map(|vm| format!("VM {}", vm.name))
            .collect();
        users.extend(
            self.store()
                .templates()?
                .into_iter()
                .filter(|t| t.image == name)
                .map(|t| format!("template {}", t.name)),
        );
        if !users.is_empty() {
            return Err(TemplateError::ImageInUse {
                name: name.to_owned(),
                users,
            }
            .into());
        }
        let images = self.images.clone();
        let image = name.to_owned();
        tokio::task::spawn_blocking(move || images.remove(&image))
            .await
            .map_err(Fault::task("removing an image"))?
            .map_err(Fault::Image)?;
        tracing::info!(image = %name, "image removed");
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
        let name = VmName::new(&request.name).map_err(super::create::invalid)?;
        if name.as_str() == source {
            return Err(VmError::Exists {
                name: source.to_owned(),
            }
            .into());
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
            return Err(TemplateError::NotStopped {
                action: "clone",
                state: record.state,
            }
            .into());
        }
        let keep_base = match &record.linked_to {
            Some(template) => self.template_disk(template),
            None => Image::open(&record.image_dir)
                .map_err(Fault::Image)?
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
            let _net = self.networks.hold().await;
            self.make_vm(vm, &plan, &cause)?
        };
        match made {
            Made::Copy(pending) => {
                self.copy_in_operation(OperationKind::CloneVm, pending, locks, cause)
            }
            Made::Done(_) => Err(Fault::Broken("a clone of a VM is always a copy").into()),
        }
    }
}

/// How long a warm template waits for its VM's guest agent to answer.
const WARM_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Copies a RAM file, leaving holes where its pages are zero (RAM a
/// guest never touched), and answers the sha256 of its content.
fn copy_sparse(from: &Path, to: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::{Read, Seek, SeekFrom, Write};
    const PAGE: usize = 4096;
    let mut input = std::fs::File::open(from)?;
    let size = input.metadata()?.len();
    let mut output = std::fs::File::create(to)?;
    let mut hash = sha2::Sha256::new();
    let mut chunk = vec![0u8; 256 * PAGE];
    loop {
        let mut filled = 0;
        while filled < chunk.len() {
            match input.read(&mut chunk[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            break;
        }
        hash.update(&chunk[..filled]);
        for page in chunk[..filled].chunks(PAGE) {
            if page.iter().all(|&byte| byte == 0) {
                output.seek(SeekFrom::Current(page.len() as i64))?;
            } else {
                output.write_all(page)?;
            }
        }
    }
    output.set_len(size)?;
    output.sync_all()?;
    Ok(hash
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

/// A warm template's memory files become the daemon's, never written
/// again: the device state read-only; the RAM file also open to the group
/// its clones' QEMU processes are in (QEMU 7.2 opens it for writing even
/// to map it copy on write; nothing writes it).
fn seal_memory(ram: &Path, state: &Path) {
    let privileged = nix::unistd::geteuid().is_root();
    let (group, mode) = if privileged {
        (quetzal_engine::spec::Confinement::TEMPLATE_GID, 0o660)
    } else {
        (nix::unistd::getegid().as_raw(), 0o600)
    };
    let _ = std::os::unix::fs::lchown(ram, Some(nix::unistd::geteuid().as_raw()), Some(group));
    let _ = std::fs::set_permissions(ram, std::fs::Permissions::from_mode(mode));
    let _ = std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o400));
}
