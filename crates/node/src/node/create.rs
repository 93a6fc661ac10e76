//! Making new VMs: validating a create request, choosing the network, and
//! making the VM's directory and disk. An overlay is made in
//! milliseconds, inside the request; a copy (a full clone, a clone of a
//! VM) is an operation: the VM is recorded `creating` first, so its
//! network counts it and a listing shows it, and becomes `stopped` when
//! its disk is complete — or is removed with everything it made when the
//! copy fails or is cancelled.

use quetzal_engine::Engine;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quetzal_image::Image;

use quetzal_api::{CreateVm, EventKind, Operation, OperationKind, Vm, VmState};
use quetzal_engine::spec::{CpuSet, Cpus, Mac, MemoryMib, VmName};
use tokio::sync::OwnedMutexGuard;

use super::error::{Fault, VmError};
use super::templates::DiskPlan;
use super::{MAX_DISK_MIB, MIN_FREE_MIB, Node, NodeError, free_mib, new_machine_id, random_bytes};
use crate::cloud_init::CloudConfig;
use crate::store::{Change, VmRecord, now_millis};

/// What a create request made: a VM, or an operation that is making one.
#[derive(Debug)]
pub enum Created {
    Vm(Box<Vm>),
    Operation(Operation),
}

/// A VM whose disk is still to be copied, recorded `creating`.
#[derive(Debug)]
pub(super) struct PendingCopy {
    name: String,
    from: PathBuf,
    keep_base: PathBuf,
    disk: PathBuf,
    dir: PathBuf,
}

impl Node {
    /// Creates a stopped VM: an overlay on its image's base disk or on a
    /// template's (at once), or a full clone (an operation). An image not
    /// built yet is built first, in an operation that then makes the VM.
    pub async fn create(self: &Arc<Self>, request: CreateVm) -> Result<Created, NodeError> {
        let name = VmName::new(&request.name).map_err(invalid)?;
        Cpus::new(request.cpus).map_err(|e| VmError::Invalid {
            reason: cpus_message(&e.to_string()),
        })?;
        MemoryMib::new(request.memory_mib, self.host_memory_mib).map_err(|e| VmError::Invalid {
            reason: memory_message(&e.to_string()),
        })?;
        // Keys and user-data are checked before anything is built or made.
        CloudConfig::new(None, request.ssh_keys.clone(), request.user_data.clone())
            .map_err(invalid)?;
        crate::services::check(&request.services).map_err(invalid)?;
        let guard = self.slot(name.as_str()).lock().await;
        if let Some(image) = self.image_to_build(&request)? {
            if self.store().get(name.as_str())?.is_some() {
                return Err(VmError::Exists {
                    name: name.to_string(),
                }
                .into());
            }
            return Ok(Created::Operation(
                self.build_then_create(image, request, guard)?,
            ));
        }
        self.create_locked(request, guard).await
    }

    /// The image a request names when it is known but not built yet.
    fn image_to_build(&self, request: &CreateVm) -> Result<Option<String>, NodeError> {
        if request.template.is_some() {
            return Ok(None);
        }
        let name = request
            .image
            .as_deref()
            .unwrap_or(quetzal_image::DEFAULT_IMAGE);
        match self.images.get(name) {
            Err(quetzal_image::ImageError::NotBuilt { .. }) => Ok(Some(name.to_owned())),
            // Built, or unknown (which creating says clearly).
            _ => Ok(None),
        }
    }

    /// Builds `image` in an operation, then creates the VM the request
    /// asks for, with its lock held throughout.
    fn build_then_create(
        self: &Arc<Self>,
        image: String,
        request: CreateVm,
        guard: OwnedMutexGuard<()>,
    ) -> Result<Operation, NodeError> {
        let node = Arc::clone(self);
        let target = format!("/api/v1/vms/{}", request.name);
        self.operations.start(
            OperationKind::BuildImage,
            target,
            false,
            move |progress| async move {
                let images = node.images.clone();
                tracing::info!(image = %image, "building an image on first use");
                let building = image.clone();
                tokio::task::spawn_blocking(move || {
                    // Each step of a build is one line: five steps in all.
                    let mut steps = 0;
                    images.build(&building, &mut |line| {
                        steps += 1;
                        tracing::info!(step = line, "image build");
                        progress.set((steps * 18).min(90));
                    })
                })
                .await
                .map_err(Fault::task("the image build"))?
                .map_err(|source| VmError::ImageBuild { image, source })?;
                // An image's VM is an overlay, made at once: never a copy.
                node.create_locked(request, guard).await.map(drop)
            },
        )
    }

    /// [`Node::create`] with the new VM's lock held and its image built.
    async fn create_locked(
        self: &Arc<Self>,
        request: CreateVm,
        guard: OwnedMutexGuard<()>,
    ) -> Result<Created, NodeError> {
        let name = VmName::new(&request.name).map_err(invalid)?;
        let source = self.disk_source(&request)?;
        // A linked clone of a warm template is an instant clone: it
        // resumes the template's memory, so it has the template's CPUs,
        // RAM and disk size (the guest's kernel knows them).
        let warm = match (&request.template, request.full_clone) {
            (Some(template), false) => self
                .store()
                .template(template)?
                .filter(|record| record.warm.is_some()),
            _ => None,
        };
        let (cpus, memory_mib) = match &warm {
            Some(template) => instant_clone_size(&request, template)?,
            None => (request.cpus, request.memory_mib),
        };
        let disk_mib = request.disk_mib.unwrap_or(source.base_mib);
        if warm.is_some() && disk_mib != source.base_mib {
            return Err(VmError::Invalid {
                reason: format!(
                    "an instant clone's disk has its warm template's size ({} MiB)",
                    source.base_mib
                ),
            }
            .into());
        }
        if disk_mib < source.base_mib || disk_mib > MAX_DISK_MIB {
            return Err(VmError::Invalid {
                reason: format!(
                    "disk_mib must be between the base disk's {} and {MAX_DISK_MIB}, not {disk_mib}",
                    source.base_mib
                ),
            }
            .into());
        }
        if source.plan.is_copy() && disk_mib != source.base_mib {
            return Err(VmError::Invalid {
                reason: "disk_mib cannot be changed on a full clone".to_owned(),
            }
            .into());
        }
        let cloud_init = cloud_config(&source.image, &request)?;
        let cpu_pin = request
            .cpu_pin
            .as_deref()
            .map(|text| CpuSet::parse(text, self.host_cpus).map(|set| set.to_string()))
            .transpose()
            .map_err(invalid)?;
        let vm = VmRecord {
            name: name.to_string(),
            state: VmState::Stopped,
            image: source.image.manifest.name.clone(),
            image_dir: source.image.dir.clone(),
            cpus,
            memory_mib,
            disk_mib,
            labels: request.labels,
            restart_policy: request.restart_policy,
            pid: None,
            created_at: now_millis(),
            started_at: None,
            restarts: 0,
            linked_to: source.plan.linked_to(),
            machine_id: Some(new_machine_id()?),
            network: String::new(),
            // Drawn when it is recorded.
            mac: String::new(),
            engine: self.engine().kind().as_str().to_owned(),
            // Given when it is recorded.
            revision: 0,
            nic: 0,
            cloud_init,
            services: request.services.clone(),
            restore_from: warm.as_ref().map(|template| template.name.clone()),
            ram_file: request.ram_file,
            cpu_pin,
        };
        let cause = match &request.template {
            Some(template) if request.full_clone => format!("full clone of template {template}"),
            Some(template) if warm.is_some() => format!("instant clone of template {template}"),
            Some(template) => format!("linked clone of template {template}"),
            None => "created by request".to_owned(),
        };
        let made = {
            // Held only while the network is chosen and the VM recorded on
            // it, never through a copy.
            let _net = self.networks.hold().await;
            let vm = VmRecord {
                network: self.networks.choose(request.network.as_deref())?,
                ..vm
            };
            self.make_vm(vm, &source.plan, &cause)?
        };
        match made {
            Made::Done(_) if warm.is_some() => {
                let vm = self.start_instant_clone(name.as_str(), &cause).await?;
                drop(guard);
                Ok(Created::Vm(Box::new(vm)))
            }
            Made::Done(vm) => Ok(Created::Vm(vm)),
            Made::Copy(pending) => Ok(Created::Operation(self.copy_in_operation(
                OperationKind::FullClone,
                pending,
                vec![guard],
                cause,
            )?)),
        }
    }

    /// Makes a new VM's directory and disk and records it; a copy is only
    /// prepared (the VM recorded `creating`). On any failure nothing is
    /// left behind. Called with the new VM's lock held.
    pub(super) fn make_vm(
        &self,
        vm: VmRecord,
        plan: &DiskPlan,
        cause: &str,
    ) -> Result<Made, NodeError> {
        let free = free_mib(&self.data.join("vms"))?;
        if free < MIN_FREE_MIB {
            return Err(VmError::NoRoom {
                dir: self.data.clone(),
                free_mib: free,
                needed_mib: MIN_FREE_MIB,
            }
            .into());
        }
        let engine = self.engine_of(&vm)?;
        let room = engine.max_dir_name(&self.data.join("vms"));
        if vm.name.len() > room {
            return Err(VmError::NameTooLong {
                name: vm.name,
                max: room,
            }
            .into());
        }
        if self.store().get(&vm.name)?.is_some() {
            return Err(VmError::Exists { name: vm.name }.into());
        }
        let dir = self.vm_dir(&vm.name);
        // A directory without a VM is left from a create cut short.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(Fault::io(&dir))?;
        let disk = self.vm_disk(&vm)?;
        let (state, kind, made) = match plan {
            DiskPlan::Overlay { base, .. } => (
                VmState::Stopped,
                EventKind::Created,
                engine
                    .create_disk(base, &disk, vm.disk_mib)
                    .map_err(NodeError::from),
            ),
            DiskPlan::Copy { .. } => (VmState::Creating, EventKind::Creating, Ok(())),
        };
        let mut record = VmRecord { state, ..vm };
        let inserted = made.and_then(|()| self.insert_with_free_mac(&mut record, kind, cause));
        match inserted {
            Ok(event) => self.publish(event.into()),
            Err(err) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(err);
            }
        }
        Ok(match plan {
            DiskPlan::Overlay { .. } => Made::Done(Box::new(record.to_api())),
            DiskPlan::Copy {
                from, keep_base, ..
            } => Made::Copy(PendingCopy {
                name: record.name,
                from: from.clone(),
                keep_base: keep_base.clone(),
                disk,
                dir,
            }),
        })
    }

    /// Starts a new instant clone, with its lock held: its template's
    /// memory mapped, its device state restored, running at once; then
    /// the clone hook makes it a machine of its own. One that does not
    /// start is removed again.
    async fn start_instant_clone(
        self: &Arc<Self>,
        name: &str,
        cause: &str,
    ) -> Result<Vm, NodeError> {
        let slot = self.slot(name);
        let record = self.record(name)?;
        if let Err(err) = self
            .launch(&slot, &record, 0, EventKind::Started, cause, None)
            .await
        {
            let record = self.record(name)?;
            let removed =
                self.store()
                    .delete_vm(name, record.revision, "its instant clone did not start");
            let dir = self.vm_dir(name);
            if let Err(err) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(vm = %name, error = %err, "cannot remove the VM's directory");
            }
            if let Ok(event) = removed {
                self.publish(event.into());
            }
            self.forget_slot(name);
            return Err(err);
        }
        let live = slot.live().ok_or(VmError::NotRunning {
            name: name.to_owned(),
        })?;
        let record = self.record(name)?;
        let hooked = self.clone_hook(name, &live, &record.mac).await;
        let cause = match hooked {
            Ok(done) => {
                let steps: Vec<String> = done
                    .steps
                    .iter()
                    .map(|step| format!("{} {}", step.step, step.outcome))
                    .collect();
                format!("made a machine of its own: {}", steps.join(", "))
            }
            Err(err) => format!("its clone hook failed: {err}"),
        };
        tracing::info!(vm = %name, %cause, "instant clone");
        self.note(name, EventKind::Agent, &cause);
        self.get(name)
    }

    /// Inserts a new VM with a random MAC address that no other VM of the
    /// node has (the store's uniqueness constraint decides; a taken one
    /// is drawn again).
    fn insert_with_free_mac(
        &self,
        record: &mut VmRecord,
        kind: EventKind,
        cause: &str,
    ) -> Result<quetzal_api::Event, NodeError> {
        for _ in 0..MAC_DRAWS {
            record.mac = random_mac()?;
            match self.store().insert_vm(record, kind, cause) {
                Err(crate::store::StoreError::MacTaken(_)) => continue,
                other => return Ok(other?),
            }
        }
        Err(VmError::NoFreeMac { draws: MAC_DRAWS }.into())
    }

    /// Copies a `creating` VM's disk in an operation of `kind` that holds
    /// `locks` until it ends: the VM becomes `stopped`, or is removed.
    pub(super) fn copy_in_operation(
        self: &Arc<Self>,
        kind: OperationKind,
        pending: PendingCopy,
        locks: Vec<OwnedMutexGuard<()>>,
        cause: String,
    ) -> Result<Operation, NodeError> {
        let node = Arc::clone(self);
        let target = format!("/api/v1/vms/{}", pending.name);
        self.operations
            .start(kind, target, true, move |progress| async move {
                let _locks = locks;
                let copied = {
                    let (from, keep_base, disk) = (
                        pending.from.clone(),
                        pending.keep_base.clone(),
                        pending.disk.clone(),
                    );
                    let progress = progress.clone();
                    let engine = node.engine().clone();
                    tokio::task::spawn_blocking(move || {
                        engine.copy_disk(&from, &keep_base, &disk, &mut |percent| {
                            progress.set(percent);
                            quetzal_engine::failpoint::stall_until("copy-stall", || {
                                progress.cancelled()
                            });
                            !progress.cancelled()
                        })
                    })
                    .await
                    .map_err(|e| NodeError::from(Fault::task("the copy")(e)))
                    .and_then(|copied| Ok(copied?))
                };
                let name = pending.name.as_str();
                let done = copied.and_then(|()| {
                    node.change(
                        name,
                        crate::lifecycle::Cause::Copied,
                        &Change {
                            pid: None,
                            started_at: None,
                            restarts: 0,
                            kind: EventKind::Created,
                            cause: &cause,
                        },
                    )
                });
                if let Err(err) = &done {
                    node.note(name, EventKind::CreateFailed, &err.to_string());
                    node.remove_vm_record(name, &pending.dir, "its disk could not be made");
                }
                done
            })
    }

    /// Removes a VM that never became whole: its record and its directory.
    pub(super) fn remove_vm_record(&self, name: &str, dir: &Path, cause: &str) {
        let deleted = self
            .record(name)
            .and_then(|record| Ok(self.store().delete_vm(name, record.revision, cause)?));
        match deleted {
            Ok(event) => self.publish(event.into()),
            Err(err) => tracing::warn!(vm = %name, error = %err, "cannot remove the VM's record"),
        }
        if let Err(err) = std::fs::remove_dir_all(dir)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(vm = %name, error = %err, "cannot remove the VM's directory");
        }
        self.forget_slot(name);
    }
}

/// What [`Node::make_vm`] did.
#[derive(Debug)]
pub(super) enum Made {
    Done(Box<Vm>),
    Copy(PendingCopy),
}

/// How many random MAC addresses a new VM may draw before giving up.
const MAC_DRAWS: u32 = 8;

/// A random, locally administered unicast MAC address.
fn random_mac() -> Result<String, NodeError> {
    let bytes = random_bytes::<6>()?;
    Ok(Mac::from_random(bytes).to_string())
}

/// A create request's name, cpus or memory that the spec refuses.
/// What a new VM's cloud-init seed says: for an image with cloud-init,
/// its default user and the request's keys and user-data; an image
/// without takes neither.
fn cloud_config(image: &Image, request: &CreateVm) -> Result<Option<CloudConfig>, VmError> {
    match &image.manifest.cloud_init {
        Some(cloud_init) => CloudConfig::new(
            cloud_init.default_user.clone(),
            request.ssh_keys.clone(),
            request.user_data.clone(),
        )
        .map(Some)
        .map_err(invalid),
        None if request.ssh_keys.is_empty() && request.user_data.is_none() => Ok(None),
        None => Err(VmError::Invalid {
            reason: format!(
                "image {} has no cloud-init: ssh_keys and user_data need an image that has (such as debian)",
                image.manifest.name
            ),
        }),
    }
}

pub(super) fn invalid(err: impl std::fmt::Display) -> VmError {
    VmError::Invalid {
        reason: err.to_string(),
    }
}

/// The CLI's wording (`--cpus`) becomes the API's (`cpus`).
/// An instant clone's CPUs and RAM: its warm template's. A request that
/// asks for other figures than the defaults is refused.
fn instant_clone_size(
    request: &CreateVm,
    template: &crate::store::TemplateRecord,
) -> Result<(u32, u64), NodeError> {
    let asked = |value: u64, default: u64, template: u64| value == default || value == template;
    if !asked(
        u64::from(request.cpus),
        u64::from(quetzal_api::default_cpus()),
        u64::from(template.cpus),
    ) || !asked(
        request.memory_mib,
        quetzal_api::default_memory(),
        template.memory_mib,
    ) {
        return Err(VmError::Invalid {
            reason: format!(
                "an instant clone has its warm template's {} CPUs and {} MiB of memory",
                template.cpus, template.memory_mib
            ),
        }
        .into());
    }
    Ok((template.cpus, template.memory_mib))
}

fn cpus_message(message: &str) -> String {
    message.replace("--cpus", "cpus")
}

fn memory_message(message: &str) -> String {
    message.replace("--memory", "memory_mib")
}
