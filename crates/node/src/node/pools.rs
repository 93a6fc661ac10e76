//! Desktop pools: desktops (clones of a template) kept ready for users.
//!
//! A pool keeps `spare` running desktops waiting, up to `max` in all.
//! `assign` hands a ready spare to a user (or makes one at once when none
//! is ready and there is room); `release` destroys it — the next user
//! gets a fresh clone — or, in a persistent pool, keeps it for its user.
//! A background task (`watch_pools`) makes and removes desktops until
//! each pool is as its settings say: it replaces spares of an old
//! template, spares stopped by hand, desktops left half made by a daemon
//! killed mid-make, and drops the rows of VMs deleted by hand.
//!
//! Every decision is taken under the pool's lock, from the store; the
//! slow work (making or destroying a VM) runs outside it, with the
//! desktop's row saying what it is meanwhile (`creating`), so an assign
//! never waits for the spares being made.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quetzal_api::{
    Assigned, CreatePool, CreateVm, DesktopState, EventKind, Pool, PoolDesktop, RestartPolicy,
    UpdatePool, VmState, desktop_path,
};
use quetzal_engine::spec::VmName;

use super::create::Created;
use super::error::{PoolError, TemplateError, VmError};
use super::{Node, NodeError, Published};
use crate::store::{DesktopRecord, PoolRecord, StoreError, now_millis};

/// The most desktops one pool may have.
pub const MAX_DESKTOPS: u32 = 1000;
/// The longest pool name: room is left for `-N` in its desktops' names.
pub const MAX_POOL_NAME: usize = 56;
/// How often every pool is looked at even when nothing asked.
const POOL_POLL: Duration = Duration::from_secs(5);
/// The first and the longest wait before a pool tries again after a
/// desktop could not be made.
const FIRST_RETRY: Duration = Duration::from_secs(5);
const LONGEST_RETRY: Duration = Duration::from_secs(80);
/// How long deleting a pool waits for the desktops being made.
const MAKE_WAIT: Duration = Duration::from_secs(120);

/// The node's pool work that lives in memory: one lock per pool, the
/// desktops being made now, the last failure of each pool.
#[derive(Debug, Default)]
pub(super) struct PoolWork {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    in_flight: Mutex<HashSet<String>>,
    failures: Mutex<HashMap<String, Failure>>,
    wake: tokio::sync::Notify,
    /// Told whenever a desktop's making ends.
    made: tokio::sync::Notify,
}

#[derive(Clone, Debug)]
struct Failure {
    message: String,
    retry_at: Instant,
    wait: Duration,
}

/// What a pool needs next.
#[derive(Debug)]
enum Step {
    Make(DesktopRecord),
    Remove(DesktopRecord, &'static str),
}

impl PoolWork {
    fn lock(&self, pool: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().expect("never poisoned");
        Arc::clone(locks.entry(pool.to_owned()).or_default())
    }

    fn making(&self, vm: &str) -> bool {
        self.in_flight.lock().expect("never poisoned").contains(vm)
    }

    fn set_making(&self, vm: &str, making: bool) {
        let mut in_flight = self.in_flight.lock().expect("never poisoned");
        if making {
            in_flight.insert(vm.to_owned());
        } else {
            in_flight.remove(vm);
            self.made.notify_waiters();
        }
    }

    fn failure(&self, pool: &str) -> Option<Failure> {
        self.failures
            .lock()
            .expect("never poisoned")
            .get(pool)
            .cloned()
    }

    fn failed(&self, pool: &str, message: String) {
        let mut failures = self.failures.lock().expect("never poisoned");
        let wait = failures
            .get(pool)
            .map_or(FIRST_RETRY, |last| (last.wait * 2).min(LONGEST_RETRY));
        failures.insert(
            pool.to_owned(),
            Failure {
                message,
                retry_at: Instant::now() + wait,
                wait,
            },
        );
    }

    fn succeeded(&self, pool: &str) {
        self.failures.lock().expect("never poisoned").remove(pool);
    }
}

impl Node {
    /// Tells the event stream that pool `name` changed.
    fn pool_changed(&self, name: &str) {
        self.publish(Published::Pool(name.to_owned()));
    }

    pub fn pools(&self) -> Result<Vec<Pool>, NodeError> {
        let records = self.store().pools()?;
        records
            .into_iter()
            .map(|record| self.pool_view(record))
            .collect()
    }

    pub fn pool(&self, name: &str) -> Result<Pool, NodeError> {
        let record = self.pool_record(name)?;
        self.pool_view(record)
    }

    fn pool_record(&self, name: &str) -> Result<PoolRecord, NodeError> {
        self.store().pool(name)?.ok_or_else(|| {
            PoolError::NotFound {
                name: name.to_owned(),
            }
            .into()
        })
    }

    fn pool_view(&self, record: PoolRecord) -> Result<Pool, NodeError> {
        let store = self.store();
        let mut desktops = Vec::new();
        let mut ready = 0;
        for desktop in store.desktops(&record.name)? {
            let vm_state = store.get(&desktop.vm)?.map(|vm| vm.state);
            if desktop.state == DesktopState::Spare && vm_state == Some(VmState::Running) {
                ready += 1;
            }
            desktops.push(PoolDesktop {
                path: desktop_path(&desktop.vm),
                vm: desktop.vm,
                state: desktop.state,
                template: desktop.template,
                user: desktop.user,
                assigned_at: desktop.assigned_at,
                vm_state,
            });
        }
        drop(store);
        Ok(Pool {
            error: self.pool_work.failure(&record.name).map(|f| f.message),
            name: record.name,
            template: record.template,
            spare: record.spare,
            max: record.max,
            persistent: record.persistent,
            created_at: record.created_at,
            ready,
            desktops,
        })
    }

    pub fn create_pool(&self, request: CreatePool) -> Result<Pool, NodeError> {
        let name = VmName::new(&request.name).map_err(|e| PoolError::Invalid {
            reason: e.to_string(),
        })?;
        if name.as_str().len() > MAX_POOL_NAME {
            return Err(PoolError::Invalid {
                reason: format!(
                    "a pool's name is at most {MAX_POOL_NAME} characters (its desktops are NAME-N)"
                ),
            }
            .into());
        }
        check_sizes(request.spare, request.max)?;
        let template = self.template_record(&request.template)?;
        if let Some(host) = crate::ksm::Memory::of_this_host() {
            check_memory(
                name.as_str(),
                request.spare,
                request.max,
                template.memory_mib,
                host,
                0,
            )?;
        }
        let record = PoolRecord {
            name: name.to_string(),
            template: request.template,
            spare: request.spare,
            max: request.max,
            persistent: request.persistent,
            created_at: now_millis(),
        };
        match self.store().insert_pool(&record) {
            Err(StoreError::Exists(name)) => return Err(PoolError::Exists { name }.into()),
            other => other?,
        }
        tracing::info!(pool = %record.name, template = %record.template, spare = record.spare,
            max = record.max, "pool created");
        self.pool_changed(&record.name);
        self.pool_work.wake.notify_one();
        self.pool(name.as_str())
    }

    /// Changes a pool's settings: a new template replaces the spares at
    /// once (and assigned desktops as they are released).
    pub async fn update_pool(&self, name: &str, request: UpdatePool) -> Result<Pool, NodeError> {
        let lock = self.pool_work.lock(name);
        let _held = lock.lock().await;
        let old = self.pool_record(name)?;
        if let Some(template) = &request.template {
            self.template_record(template)?;
        }
        let record = PoolRecord {
            template: request.template.unwrap_or(old.template.clone()),
            spare: request.spare.unwrap_or(old.spare),
            max: request.max.unwrap_or(old.max),
            ..old.clone()
        };
        check_sizes(record.spare, record.max)?;
        if let Some(host) = crate::ksm::Memory::of_this_host() {
            // The spares running now make room as they are replaced.
            let memory_mib = self.template_record(&record.template)?.memory_mib;
            let mut spares_mib = 0;
            let store = self.store();
            for desktop in store.desktops(name)? {
                if desktop.state == DesktopState::Spare
                    && let Some(vm) = store.get(&desktop.vm)?
                    && vm.state == VmState::Running
                {
                    spares_mib += vm.memory_mib;
                }
            }
            drop(store);
            check_memory(name, record.spare, record.max, memory_mib, host, spares_mib)?;
        }
        self.store().update_pool(&record)?;
        self.pool_changed(name);
        tracing::info!(pool = %name, template = %record.template, spare = record.spare,
            max = record.max, "pool changed");
        self.pool_work.wake.notify_one();
        self.pool_view(record)
    }

    /// Deletes a pool and its spares; refused while users hold desktops
    /// of it. Desktops being made are waited for (the pool makes no new
    /// spares meanwhile), then destroyed with the rest.
    pub async fn delete_pool(self: &Arc<Self>, name: &str) -> Result<(), NodeError> {
        let lock = self.pool_work.lock(name);
        let deadline = Instant::now() + MAKE_WAIT;
        let _held = loop {
            let held = lock.lock().await;
            let record = self.pool_record(name)?;
            let desktops = self.store().desktops(name)?;
            let users: Vec<String> = desktops
                .iter()
                .filter(|d| matches!(d.state, DesktopState::Assigned | DesktopState::Held))
                .map(|d| d.vm.clone())
                .collect();
            if !users.is_empty() {
                return Err(PoolError::InUse {
                    name: name.to_owned(),
                    desktops: users,
                }
                .into());
            }
            let Some(making) = desktops.iter().find(|d| self.pool_work.making(&d.vm)) else {
                break held;
            };
            if Instant::now() >= deadline {
                return Err(PoolError::Busy {
                    name: name.to_owned(),
                    vm: making.vm.clone(),
                }
                .into());
            }
            if record.spare > 0 {
                self.store()
                    .update_pool(&PoolRecord { spare: 0, ..record })?;
            }
            let made = self.pool_work.made.notified();
            drop(held);
            let _ = tokio::time::timeout_at(deadline.into(), made).await;
        };
        let desktops = self.store().desktops(name)?;
        for desktop in desktops {
            self.destroy_desktop_vm(&desktop.vm).await?;
        }
        self.store().delete_pool(name)?;
        self.pool_changed(name);
        tracing::info!(pool = %name, "pool deleted");
        Ok(())
    }

    /// Hands a desktop of `pool` to `user`: theirs again in a persistent
    /// pool, else a ready spare, else a new one when the pool has room.
    pub async fn assign(self: &Arc<Self>, pool: &str, user: &str) -> Result<Assigned, NodeError> {
        check_user(user)?;
        let lock = self.pool_work.lock(pool);
        let held = lock.lock().await;
        let record = self.pool_record(pool)?;
        let desktops = self.store().desktops(pool)?;
        let vm_state = |vm: &str| -> Result<Option<VmState>, NodeError> {
            Ok(self.store().get(vm)?.map(|vm| vm.state))
        };
        if record.persistent
            && let Some(own) = desktops.iter().find(|d| {
                d.user.as_deref() == Some(user)
                    && matches!(d.state, DesktopState::Assigned | DesktopState::Held)
            })
            && let Some(state) = vm_state(&own.vm)?
        {
            let own = own.clone();
            if !matches!(state, VmState::Running | VmState::Paused) {
                self.start(&own.vm).await?;
            }
            return self.hand_over(&record, own, user, "given back to");
        }
        for desktop in &desktops {
            if desktop.state == DesktopState::Spare
                && desktop.template == record.template
                && vm_state(&desktop.vm)? == Some(VmState::Running)
            {
                return self.hand_over(&record, desktop.clone(), user, "assigned to");
            }
        }
        if desktops.len() >= record.max as usize {
            return Err(PoolError::Full {
                name: pool.to_owned(),
                max: record.max,
            }
            .into());
        }
        // None ready: make one for this user now.
        let desktop = self
            .store()
            .reserve_desktop(pool, &record.template, Some(user))?;
        self.pool_work.set_making(&desktop.vm, true);
        self.pool_changed(pool);
        drop(held);
        let made = self.make_desktop(&desktop).await;
        self.pool_work.set_making(&desktop.vm, false);
        let _held = lock.lock().await;
        if let Err(err) = made {
            self.store().delete_desktop(&desktop.vm)?;
            self.pool_changed(pool);
            return Err(err);
        }
        let record = self.pool_record(pool)?;
        self.hand_over(&record, desktop, user, "made for")
    }

    fn hand_over(
        &self,
        pool: &PoolRecord,
        desktop: DesktopRecord,
        user: &str,
        how: &str,
    ) -> Result<Assigned, NodeError> {
        let desktop = DesktopRecord {
            state: DesktopState::Assigned,
            user: Some(user.to_owned()),
            assigned_at: Some(now_millis()),
            ..desktop
        };
        self.store().update_desktop(&desktop)?;
        self.pool_changed(&pool.name);
        self.note(
            &desktop.vm,
            EventKind::Pool,
            &format!("{how} {user} from pool {}", pool.name),
        );
        tracing::info!(pool = %pool.name, vm = %desktop.vm, %user, "desktop assigned");
        // A spare went: the pool makes the next.
        self.pool_work.wake.notify_one();
        Ok(Assigned {
            pool: pool.name.clone(),
            path: desktop_path(&desktop.vm),
            vm: desktop.vm,
            user: user.to_owned(),
        })
    }

    /// Takes back an assigned desktop: destroyed (its replacement is a
    /// fresh clone), or in a persistent pool kept for its user.
    pub async fn release(self: &Arc<Self>, pool: &str, vm: &str) -> Result<PoolDesktop, NodeError> {
        let lock = self.pool_work.lock(pool);
        let _held = lock.lock().await;
        let record = self.pool_record(pool)?;
        let desktop = self
            .store()
            .desktop(vm)?
            .filter(|d| d.pool == pool)
            .ok_or_else(|| PoolError::NoSuchDesktop {
                pool: pool.to_owned(),
                vm: vm.to_owned(),
            })?;
        if desktop.state != DesktopState::Assigned {
            return Err(PoolError::NotAssigned {
                vm: vm.to_owned(),
                state: desktop.state,
            }
            .into());
        }
        let user = desktop.user.clone().unwrap_or_default();
        let vm_state = self.store().get(vm)?.map(|vm| vm.state);
        if record.persistent {
            let held = DesktopRecord {
                state: DesktopState::Held,
                ..desktop
            };
            self.store().update_desktop(&held)?;
            self.pool_changed(pool);
            self.note(
                vm,
                EventKind::Pool,
                &format!("released by {user}; kept for them"),
            );
            return Ok(PoolDesktop {
                path: desktop_path(vm),
                vm: held.vm,
                state: held.state,
                template: held.template,
                user: held.user,
                assigned_at: held.assigned_at,
                vm_state,
            });
        }
        self.note(
            vm,
            EventKind::Pool,
            &format!("released by {user}; destroyed, a fresh clone replaces it"),
        );
        self.destroy_desktop_vm(vm).await?;
        self.store().delete_desktop(vm)?;
        self.pool_changed(pool);
        tracing::info!(%pool, %vm, %user, "desktop released");
        self.pool_work.wake.notify_one();
        Ok(PoolDesktop {
            path: desktop_path(vm),
            vm: desktop.vm,
            state: desktop.state,
            template: desktop.template,
            user: desktop.user,
            assigned_at: desktop.assigned_at,
            vm_state: None,
        })
    }

    /// Refuses to delete a template a pool makes desktops from.
    pub(super) fn check_no_pool_uses(&self, template: &str) -> Result<(), NodeError> {
        let pools = self.store().pools_of_template(template)?;
        if pools.is_empty() {
            return Ok(());
        }
        Err(TemplateError::UsedByPools {
            name: template.to_owned(),
            pools,
        }
        .into())
    }

    /// Makes every pool as its settings say, now and whenever something
    /// asks (a change, an assign, a release) or [`POOL_POLL`] passed.
    pub(super) fn watch_pools(self: &Arc<Self>) {
        let node = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(node) = node.upgrade() else {
                    return;
                };
                let pools = node.store().pools();
                match pools {
                    Ok(pools) => {
                        for pool in pools {
                            node.reconcile_pool(&pool.name).await;
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "cannot read the pools"),
                }
                let woken = Arc::clone(&node);
                drop(node);
                let _ = tokio::time::timeout(POOL_POLL, woken.pool_work.wake.notified()).await;
            }
        });
    }

    /// Takes a pool's steps one at a time until it needs none.
    async fn reconcile_pool(self: &Arc<Self>, pool: &str) {
        if self
            .pool_work
            .failure(pool)
            .is_some_and(|f| f.retry_at > Instant::now())
        {
            return;
        }
        loop {
            let step = {
                let lock = self.pool_work.lock(pool);
                let _held = lock.lock().await;
                self.next_step(pool)
            };
            let done = match step {
                Ok(None) => return,
                Ok(Some(Step::Make(desktop))) => {
                    let made = self.make_desktop(&desktop).await;
                    self.pool_work.set_making(&desktop.vm, false);
                    self.spare_made(&desktop, made).await
                }
                Ok(Some(Step::Remove(desktop, why))) => {
                    tracing::info!(%pool, vm = %desktop.vm, why, "removing a desktop");
                    let lock = self.pool_work.lock(pool);
                    let _held = lock.lock().await;
                    let removed = match self.destroy_desktop_vm(&desktop.vm).await {
                        Ok(()) => self.store().delete_desktop(&desktop.vm).map_err(Into::into),
                        Err(err) => Err(err),
                    };
                    self.pool_changed(pool);
                    removed
                }
                Err(err) => Err(err),
            };
            if let Err(err) = done {
                tracing::warn!(%pool, error = %err, "a pool step failed");
                self.pool_work.failed(pool, err.to_string());
                return;
            }
        }
    }

    /// Records how making a spare went: a spare now, or its row gone.
    async fn spare_made(
        self: &Arc<Self>,
        desktop: &DesktopRecord,
        made: Result<(), NodeError>,
    ) -> Result<(), NodeError> {
        let lock = self.pool_work.lock(&desktop.pool);
        let _held = lock.lock().await;
        match made {
            Ok(()) => {
                self.pool_work.succeeded(&desktop.pool);
                self.store().update_desktop(&DesktopRecord {
                    state: DesktopState::Spare,
                    ..desktop.clone()
                })?;
                self.pool_changed(&desktop.pool);
                self.note(
                    &desktop.vm,
                    EventKind::Pool,
                    &format!("a spare of pool {}", desktop.pool),
                );
                Ok(())
            }
            Err(err) => {
                self.store().delete_desktop(&desktop.vm)?;
                self.pool_changed(&desktop.pool);
                Err(err)
            }
        }
    }

    /// What pool `name` needs next, decided under its lock. Rows of VMs
    /// deleted by hand are dropped here.
    fn next_step(&self, name: &str) -> Result<Option<Step>, NodeError> {
        let Some(pool) = self.store().pool(name)? else {
            return Ok(None);
        };
        let desktops = self.store().desktops(name)?;
        let mut kept = Vec::new();
        for desktop in desktops {
            let vm = self.store().get(&desktop.vm)?;
            let making = self.pool_work.making(&desktop.vm);
            match (desktop.state, vm) {
                (DesktopState::Creating, _) if !making => {
                    return Ok(Some(Step::Remove(desktop, "left half made")));
                }
                (DesktopState::Creating, _) => kept.push(desktop),
                (_, None) => {
                    tracing::info!(pool = %name, vm = %desktop.vm, "its VM was deleted");
                    self.store().delete_desktop(&desktop.vm)?;
                    self.pool_changed(name);
                }
                (DesktopState::Spare, Some(_)) if desktop.template != pool.template => {
                    return Ok(Some(Step::Remove(desktop, "its pool has a new template")));
                }
                (DesktopState::Spare, Some(vm)) if vm.state == VmState::Stopped => {
                    return Ok(Some(Step::Remove(desktop, "a spare that was stopped")));
                }
                _ => kept.push(desktop),
            }
        }
        let waiting = |d: &&DesktopRecord| {
            d.state == DesktopState::Spare
                || (d.state == DesktopState::Creating && d.user.is_none())
        };
        let spares = kept.iter().filter(waiting).count();
        if spares > pool.spare as usize
            && let Some(extra) = kept.iter().rev().find(|d| d.state == DesktopState::Spare)
        {
            return Ok(Some(Step::Remove(extra.clone(), "more spares than asked")));
        }
        if spares < pool.spare as usize && kept.len() < pool.max as usize {
            let desktop = self.store().reserve_desktop(name, &pool.template, None)?;
            self.pool_work.set_making(&desktop.vm, true);
            self.pool_changed(name);
            return Ok(Some(Step::Make(desktop)));
        }
        Ok(None)
    }

    /// Makes a desktop's VM and has it running: an instant clone of a
    /// warm template, or a linked clone of a cold one, booted.
    async fn make_desktop(self: &Arc<Self>, desktop: &DesktopRecord) -> Result<(), NodeError> {
        let template = self.template_record(&desktop.template)?;
        let request = CreateVm {
            name: desktop.vm.clone(),
            image: None,
            template: Some(desktop.template.clone()),
            full_clone: false,
            cpus: template.cpus,
            memory_mib: template.memory_mib,
            disk_mib: None,
            labels: BTreeMap::from([("pool".to_owned(), desktop.pool.clone())]),
            restart_policy: RestartPolicy::OnFailure,
            network: None,
            ssh_keys: Vec::new(),
            user_data: None,
            services: Vec::new(),
            ram_file: false,
            cpu_pin: None,
        };
        tracing::info!(pool = %desktop.pool, vm = %desktop.vm, "making a desktop");
        match self.create(request).await? {
            Created::Vm(vm) if vm.state == VmState::Running => Ok(()),
            Created::Vm(vm) => {
                if let Err(err) = self.start(&vm.name).await {
                    let _ = self.destroy_desktop_vm(&vm.name).await;
                    return Err(err);
                }
                Ok(())
            }
            // A linked clone's overlay is made at once: never a copy.
            Created::Operation(operation) => Err(PoolError::Unexpected {
                vm: desktop.vm.clone(),
                operation: operation.id,
            }
            .into()),
        }
    }

    /// Stops (hard: a desktop's state is thrown away) and deletes a
    /// desktop's VM, if there is one.
    async fn destroy_desktop_vm(self: &Arc<Self>, vm: &str) -> Result<(), NodeError> {
        let Some(record) = self.store().get(vm)? else {
            return Ok(());
        };
        if !matches!(record.state, VmState::Stopped | VmState::Crashed) {
            match self.force_stop(vm).await {
                Ok(_) => {}
                Err(err) if err.kind() == super::ErrorKind::Conflict => {}
                Err(err) => return Err(err),
            }
        }
        match self.delete(vm, false).await {
            Err(NodeError::Vm(VmError::NotFound { .. })) => Ok(()),
            other => other,
        }
    }
}

fn check_sizes(spare: u32, max: u32) -> Result<(), PoolError> {
    if max == 0 || max > MAX_DESKTOPS {
        return Err(PoolError::Invalid {
            reason: format!("max must be between 1 and {MAX_DESKTOPS}, not {max}"),
        });
    }
    if spare > max {
        return Err(PoolError::Invalid {
            reason: format!("spare ({spare}) cannot be more than max ({max})"),
        });
    }
    Ok(())
}

/// How far a pool's desktops together may promise more memory than the
/// host has: instant clones share their template's RAM until they write
/// to it, and KSM merges what is alike.
pub const MEMORY_OVERCOMMIT: u64 = 4;

/// Whether a pool of `spare` and `max` desktops of `memory_mib` each fits
/// `host`: its spares run at once, so they must fit what is available now
/// (with `freed_mib` that spares being replaced give back); all `max` of
/// them must fit [`MEMORY_OVERCOMMIT`] times the host's memory.
fn check_memory(
    name: &str,
    spare: u32,
    max: u32,
    memory_mib: u64,
    host: crate::ksm::Memory,
    freed_mib: u64,
) -> Result<(), PoolError> {
    let too_large = |why: String| PoolError::TooLarge {
        name: name.to_owned(),
        why,
    };
    let all = u64::from(max) * memory_mib;
    let ceiling = MEMORY_OVERCOMMIT * host.total_mib;
    if all > ceiling {
        return Err(too_large(format!(
            "{max} desktops of {memory_mib} MiB promise {all} MiB; the host has {} MiB \
             and desktops may promise at most {MEMORY_OVERCOMMIT}× that ({ceiling} MiB)",
            host.total_mib
        )));
    }
    let spares = u64::from(spare) * memory_mib;
    let room = host.available_mib + freed_mib;
    if spares > room {
        return Err(too_large(format!(
            "{spare} running spares of {memory_mib} MiB need {spares} MiB; {room} MiB is available"
        )));
    }
    Ok(())
}

/// A user's name: what a token name may be, or an e-mail-like name.
fn check_user(user: &str) -> Result<(), PoolError> {
    let fine = !user.is_empty()
        && user.len() <= 64
        && user
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.@-".contains(c));
    if fine {
        Ok(())
    } else {
        Err(PoolError::Invalid {
            reason: "a user is 1-64 letters, digits, `_`, `.`, `@` or `-`, starting with a \
                     letter or digit"
                .to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ksm::Memory;

    const HOST: Memory = Memory {
        total_mib: 16 * 1024,
        available_mib: 10 * 1024,
    };

    #[test]
    fn a_pool_may_promise_four_times_the_hosts_memory_and_its_spares_must_fit_now() {
        assert!(check_memory("lab", 2, 128, 512, HOST, 0).is_ok());
        let err = check_memory("lab", 2, 129, 512, HOST, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pool lab is too large for this host: 129 desktops of 512 MiB promise 66048 MiB; \
             the host has 16384 MiB and desktops may promise at most 4× that (65536 MiB)"
        );
        let err = check_memory("lab", 21, 21, 512, HOST, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pool lab is too large for this host: 21 running spares of 512 MiB need 10752 MiB; \
             10240 MiB is available"
        );
        // Spares being replaced give their memory back.
        assert!(check_memory("lab", 21, 21, 512, HOST, 1024).is_ok());
    }
}
