//! VMs and their event log in the store.

use std::collections::BTreeMap;
use std::path::PathBuf;

use quetzal_api::{Event, EventKind, RestartPolicy, Vm, VmState};
use rusqlite::{Connection, OptionalExtension, params};

use super::{SqliteStore, StoreError, insert_event, sqlite_error};
use crate::cloud_init::CloudConfig;

/// A VM as the node keeps it. The API's [`Vm`] is made from it in one
/// place ([`VmRecord::to_api`]) and is never stored; the two share only
/// the vocabulary of states and policies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmRecord {
    pub name: String,
    pub state: VmState,
    /// The image it was made from, and the build whose base disk its
    /// overlay sits on.
    pub image: String,
    pub image_dir: PathBuf,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub labels: BTreeMap<String, String>,
    pub restart_policy: RestartPolicy,
    /// Its engine process, while it runs.
    pub pid: Option<u32>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    /// Automatic restarts since it last started by request.
    pub restarts: u32,
    /// The engine that runs it (`qemu`).
    pub engine: String,
    /// The template whose disk its overlay sits on.
    pub linked_to: Option<String>,
    pub machine_id: Option<String>,
    pub network: String,
    /// Allocated by the store, unique among the node's VMs.
    pub mac: String,
    /// Rises with every change: a change names the revision it was
    /// computed from and fails if the record moved on (compare-and-swap,
    /// the shape an etcd-backed store has). Given by the store.
    pub revision: u64,
    /// Its NIC's number on this node, unique among its VMs (it names the
    /// TAP device); allocated by the store when the VM is inserted.
    pub nic: u32,
    /// What its cloud-init seed says; `None` for a VM of an image without
    /// cloud-init.
    pub cloud_init: Option<CloudConfig>,
    /// The services its guest agent keeps running.
    pub services: Vec<quetzal_api::WatchedService>,
    /// The warm template whose memory and device state its first start
    /// restores (an instant clone); cleared once it has run.
    pub restore_from: Option<String>,
    /// Its RAM is a file of its own on tmpfs (it can become a warm
    /// template); else anonymous memory.
    pub ram_file: bool,
    /// The host CPUs its vCPUs are pinned to, normalized (`0-3,6`).
    pub cpu_pin: Option<String>,
}

impl VmRecord {
    /// What the API shows of it (its leased addresses are added by the
    /// node, which reads them from the networks).
    pub fn to_api(&self) -> Vm {
        Vm {
            name: self.name.clone(),
            state: self.state,
            image: self.image.clone(),
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            disk_mib: self.disk_mib,
            labels: self.labels.clone(),
            restart_policy: self.restart_policy,
            pid: self.pid,
            created_at: self.created_at,
            started_at: self.started_at,
            restarts: self.restarts,
            engine: self.engine.clone(),
            linked_to: self.linked_to.clone(),
            machine_id: self.machine_id.clone(),
            network: self.network.clone(),
            mac: self.mac.clone(),
            addresses: Vec::new(),
            agent: None,
            cloud_init: self.cloud_init.as_ref().map(|c| c.to_api(&self.name)),
            services: self.services.clone(),
            ram_file: self.ram_file,
            cpu_pin: self.cpu_pin.clone(),
            cpu_weight: None,
            host_memory: None,
            guest_memory: None,
            generation_id: None,
        }
    }
}

/// A change of a VM's runtime fields, with the event that tells it (its
/// new state comes from the state machine, see [`crate::lifecycle`]).
#[derive(Clone, Debug)]
pub struct Change<'a> {
    pub pid: Option<u32>,
    pub started_at: Option<i64>,
    pub restarts: u32,
    pub kind: EventKind,
    pub cause: &'a str,
}

/// VMs and their event log. A VM's every change names the revision it was
/// computed from and is refused ([`StoreError::Stale`]) if the record
/// moved on: compare-and-swap, the shape an etcd-backed store has.
pub trait VmStore {
    /// Inserts a new VM and its first event (`created`, or `creating`
    /// for one whose disk is still being made).
    fn insert_vm(
        &mut self,
        record: &VmRecord,
        kind: EventKind,
        cause: &str,
    ) -> Result<Event, StoreError>;

    /// Moves VM `name` from `revision` to `state` with `change`, and
    /// records its event, atomically; [`StoreError::Stale`] when the VM
    /// is no longer at `revision`.
    fn change(
        &mut self,
        name: &str,
        revision: u64,
        state: VmState,
        change: &Change<'_>,
    ) -> Result<Event, StoreError>;

    /// Records an event that changes nothing stored (a guest reset).
    fn note(&mut self, name: &str, kind: EventKind, cause: &str) -> Result<Event, StoreError>;

    /// Deletes VM `name` at `revision` with its snapshots and records its
    /// `deleted` event; [`StoreError::Stale`] when it moved on.
    fn delete_vm(&mut self, name: &str, revision: u64, cause: &str) -> Result<Event, StoreError>;

    /// The VM named `name`, at its current revision.
    fn get(&self, name: &str) -> Result<Option<VmRecord>, StoreError>;

    /// Every VM, by name.
    fn list(&self) -> Result<Vec<VmRecord>, StoreError>;

    /// Events after `after`, oldest first, at most `limit`, for one VM or all.
    fn events(&self, after: i64, limit: u32, vm: Option<&str>) -> Result<Vec<Event>, StoreError>;

    /// The `limit` events just before `before`, oldest first (the end of
    /// the log, read backwards a page at a time).
    fn events_before(
        &self,
        before: i64,
        limit: u32,
        vm: Option<&str>,
    ) -> Result<Vec<Event>, StoreError>;
}

impl VmStore for SqliteStore {
    fn insert_vm(
        &mut self,
        record: &VmRecord,
        kind: EventKind,
        cause: &str,
    ) -> Result<Event, StoreError> {
        let sql = sqlite_error(&self.path);
        let vm = record;
        let tx = self.conn.transaction().map_err(sql)?;
        let inserted = tx.execute(
            "INSERT INTO vms (name, image, image_dir, cpus, memory_mib, disk_mib, labels,
                restart_policy, state, pid, created_at, started_at, restarts, linked_to, machine_id,
                network, mac, nic, engine, cloud_init, services, restore_from, ram_file,
                cpu_pin)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, NULL, ?10, NULL, 0, ?11, ?12, ?13, ?14,
                (SELECT COALESCE(MAX(nic), 0) + 1 FROM vms), ?15, ?16, ?17, ?18, ?19, ?20)",
            params![
                vm.name,
                vm.image,
                vm.image_dir.display().to_string(),
                vm.cpus,
                vm.memory_mib,
                vm.disk_mib,
                serde_json::to_string(&vm.labels).expect("a string map serializes"),
                vm.restart_policy.as_str(),
                vm.state.as_str(),
                vm.created_at,
                vm.linked_to,
                vm.machine_id,
                vm.network,
                vm.mac,
                vm.engine,
                vm.cloud_init
                    .as_ref()
                    .map(|c| serde_json::to_string(c).expect("a cloud config serializes")),
                serde_json::to_string(&vm.services).expect("services serialize"),
                vm.restore_from,
                vm.ram_file,
                vm.cpu_pin,
            ],
        );
        match inserted {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(err, message))
                if err.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                // Which uniqueness was violated: the name (primary key)
                // or the MAC (an index). A taken name is the answer that
                // matters even when the MAC is taken too.
                let name_taken = vm_exists(&tx, &vm.name).map_err(sql)?;
                let mac = message.as_deref().is_some_and(|m| m.contains("vms.mac"));
                return Err(if mac && !name_taken {
                    StoreError::MacTaken(vm.mac.clone())
                } else {
                    StoreError::Exists(vm.name.clone())
                });
            }
            Err(err) => return Err(sql(err)),
        }
        let event = insert_event(&tx, &vm.name, kind, Some(vm.state), cause).map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(event)
    }

    fn change(
        &mut self,
        name: &str,
        revision: u64,
        state: VmState,
        change: &Change<'_>,
    ) -> Result<Event, StoreError> {
        let sql = sqlite_error(&self.path);
        let tx = self.conn.transaction().map_err(sql)?;
        let updated = tx
            .execute(
                // A VM that has run restores no template's state again.
                "UPDATE vms SET state = ?3, pid = ?4, started_at = ?5, restarts = ?6,
                    restore_from = CASE WHEN ?3 = 'running' THEN NULL ELSE restore_from END,
                    revision = revision + 1 WHERE name = ?1 AND revision = ?2",
                params![
                    name,
                    revision,
                    state.as_str(),
                    change.pid,
                    change.started_at,
                    change.restarts
                ],
            )
            .map_err(sql)?;
        if updated == 0 {
            return Err(stale_or_missing(&tx, name, revision).map_err(sql)?);
        }
        let event = insert_event(&tx, name, change.kind, Some(state), change.cause).map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(event)
    }

    fn note(&mut self, name: &str, kind: EventKind, cause: &str) -> Result<Event, StoreError> {
        let state = self.get(name)?.map(|r| r.state);
        insert_event(&self.conn, name, kind, state, cause).map_err(|e| self.sql(e))
    }

    fn delete_vm(&mut self, name: &str, revision: u64, cause: &str) -> Result<Event, StoreError> {
        let sql = sqlite_error(&self.path);
        let tx = self.conn.transaction().map_err(sql)?;
        let deleted = tx
            .execute(
                "DELETE FROM vms WHERE name = ?1 AND revision = ?2",
                params![name, revision],
            )
            .map_err(sql)?;
        if deleted == 0 {
            return Err(stale_or_missing(&tx, name, revision).map_err(sql)?);
        }
        tx.execute("DELETE FROM snapshots WHERE vm = ?1", params![name])
            .map_err(sql)?;
        let event = insert_event(&tx, name, EventKind::Deleted, None, cause).map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(event)
    }

    fn get(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        self.conn
            .query_row(
                &format!("{SELECT_VM} WHERE name = ?1"),
                params![name],
                read_vm,
            )
            .optional()
            .map_err(|e| self.sql(e))?
            .transpose()
    }

    fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached(&format!("{SELECT_VM} ORDER BY name"))
            .map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map([], read_vm)
            .map_err(|e| self.sql(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql(e))?;
        rows.into_iter().collect()
    }

    fn events(&self, after: i64, limit: u32, vm: Option<&str>) -> Result<Vec<Event>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT id, at, vm, kind, state, cause FROM events
                 WHERE id > ?1 AND (?2 IS NULL OR vm = ?2) ORDER BY id LIMIT ?3",
            )
            .map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map(params![after, vm, limit], read_event)
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    fn events_before(
        &self,
        before: i64,
        limit: u32,
        vm: Option<&str>,
    ) -> Result<Vec<Event>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT id, at, vm, kind, state, cause FROM events
                 WHERE id < ?1 AND (?2 IS NULL OR vm = ?2) ORDER BY id DESC LIMIT ?3",
            )
            .map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map(params![before, vm, limit], read_event)
            .map_err(|e| self.sql(e))?;
        let mut events: Vec<Event> = rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))?;
        events.reverse();
        Ok(events)
    }
}

fn read_event(row: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    let state: Option<String> = row.get(4)?;
    let kind: String = row.get(3)?;
    Ok(Event {
        id: row.get(0)?,
        at: row.get(1)?,
        vm: row.get(2)?,
        kind: EventKind::parse(&kind).unwrap_or(EventKind::Other),
        state: state.as_deref().and_then(VmState::parse),
        cause: row.get(5)?,
    })
}

const SELECT_VM: &str = "SELECT name, image, image_dir, cpus, memory_mib, disk_mib, labels,
    restart_policy, state, pid, created_at, started_at, restarts, linked_to, machine_id,
    network, mac, revision, nic, engine, cloud_init, services, restore_from, ram_file, cpu_pin FROM vms";

fn read_vm(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<VmRecord, StoreError>> {
    let labels: String = row.get(6)?;
    let policy: String = row.get(7)?;
    let state: String = row.get(8)?;
    let image_dir: String = row.get(2)?;
    let name: String = row.get(0)?;
    let cloud_init: Option<String> = row.get(20)?;
    let services: String = row.get(21)?;
    let parsed = (|| {
        let labels: BTreeMap<String, String> = serde_json::from_str(&labels)
            .map_err(|e| StoreError::Corrupt(format!("labels of {name}: {e}")))?;
        let cloud_init = cloud_init
            .map(|text| serde_json::from_str::<CloudConfig>(&text))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("cloud-init of {name}: {e}")))?;
        let restart_policy = RestartPolicy::parse(&policy)
            .ok_or_else(|| StoreError::Corrupt(format!("restart policy of {name}: {policy}")))?;
        let state = VmState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("state of {name}: {state}")))?;
        let services = serde_json::from_str(&services)
            .map_err(|e| StoreError::Corrupt(format!("services of {name}: {e}")))?;
        Ok((labels, restart_policy, state, cloud_init, services))
    })();
    let (labels, restart_policy, state, cloud_init, services) = match parsed {
        Ok(parsed) => parsed,
        Err(err) => return Ok(Err(err)),
    };
    Ok(Ok(VmRecord {
        name,
        state,
        image: row.get(1)?,
        image_dir: PathBuf::from(image_dir),
        cpus: row.get(3)?,
        memory_mib: row.get(4)?,
        disk_mib: row.get(5)?,
        labels,
        restart_policy,
        pid: row.get(9)?,
        created_at: row.get(10)?,
        started_at: row.get(11)?,
        restarts: row.get(12)?,
        linked_to: row.get(13)?,
        machine_id: row.get(14)?,
        network: row.get(15)?,
        mac: row.get(16)?,
        engine: row.get(19)?,
        revision: row.get(17)?,
        nic: row.get(18)?,
        cloud_init,
        services,
        restore_from: row.get(22)?,
        ram_file: row.get(23)?,
        cpu_pin: row.get(24)?,
    }))
}

/// Why a change of VM `name` at `revision` matched no row.
fn stale_or_missing(conn: &Connection, name: &str, revision: u64) -> rusqlite::Result<StoreError> {
    Ok(if vm_exists(conn, name)? {
        StoreError::Stale {
            name: name.to_owned(),
            expected: revision,
        }
    } else {
        StoreError::Missing(name.to_owned())
    })
}

fn vm_exists(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT COUNT(*) FROM vms WHERE name = ?1",
        params![name],
        |row| row.get::<_, i64>(0),
    )
    .map(|count| count > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::open;

    fn record(name: &str) -> VmRecord {
        VmRecord {
            name: name.to_owned(),
            state: VmState::Stopped,
            image: "tiny".to_owned(),
            cpus: 1,
            memory_mib: 256,
            disk_mib: 256,
            labels: BTreeMap::from([("team".to_owned(), "web".to_owned())]),
            restart_policy: RestartPolicy::OnFailure,
            pid: None,
            created_at: 1,
            started_at: None,
            restarts: 0,
            linked_to: None,
            machine_id: Some("0123456789abcdef0123456789abcdef".to_owned()),
            network: "default".to_owned(),
            mac: format!(
                "52:54:00:00:00:{:02x}",
                name.bytes().map(u32::from).sum::<u32>() % 256
            ),
            engine: "qemu".to_owned(),
            image_dir: PathBuf::from("/images/tiny/x"),
            revision: 1,
            nic: 1,
            cloud_init: Some(CloudConfig {
                user: Some("debian".to_owned()),
                ssh_keys: vec!["ssh-ed25519 AAAA x".to_owned()],
                user_data: Some("#cloud-config\n".to_owned()),
            }),
            services: vec![quetzal_api::WatchedService {
                name: "web".to_owned(),
                unit: Some("nginx.service".to_owned()),
                command: None,
            }],
            restore_from: None,
            ram_file: false,
            cpu_pin: None,
        }
    }

    #[test]
    fn an_instant_clone_restores_its_warm_template_only_until_it_has_run() {
        use crate::store::{TemplateRecord, WarmFiles};
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        store
            .insert_vm(&record("src"), EventKind::Created, "x")
            .unwrap();
        let template = TemplateRecord {
            name: "warm".to_owned(),
            image: "debian".to_owned(),
            image_dir: PathBuf::from("/images/debian/x"),
            cpus: 1,
            memory_mib: 512,
            disk_mib: 3072,
            source_vm: "src".to_owned(),
            created_at: 2,
            disk_sha256: "d".repeat(64),
            warm: Some(WarmFiles {
                ram_sha256: "a".repeat(64),
                state_sha256: "b".repeat(64),
            }),
        };
        store.templatize(&template).unwrap();
        let clone = VmRecord {
            linked_to: Some("warm".to_owned()),
            restore_from: Some("warm".to_owned()),
            ..record("clone")
        };
        store
            .insert_vm(&clone, EventKind::Created, "instant clone")
            .unwrap();

        store
            .change("clone", 1, VmState::Starting, &started("start"))
            .unwrap();
        let starting = store.get("clone").unwrap().unwrap();
        store
            .change("clone", 2, VmState::Running, &started("started"))
            .unwrap();
        let running = store.get("clone").unwrap().unwrap();

        assert_eq!(store.template("warm").unwrap().unwrap(), template);
        assert_eq!(starting.restore_from.as_deref(), Some("warm"));
        assert_eq!(running.restore_from, None);
    }

    #[test]
    fn stores_and_reads_back_a_vm_with_its_created_event() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);

        let event = store
            .insert_vm(&record("web"), EventKind::Created, "created by test")
            .unwrap();

        assert_eq!(store.get("web").unwrap(), Some(record("web")));
        assert_eq!(event.kind, EventKind::Created);
        assert_eq!(store.events(0, 10, None).unwrap(), vec![event]);
    }

    #[test]
    fn gives_each_vm_its_own_nic_number_and_refuses_a_taken_mac() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        store
            .insert_vm(&record("a"), EventKind::Created, "x")
            .unwrap();
        store
            .insert_vm(&record("b"), EventKind::Created, "x")
            .unwrap();
        let twin = VmRecord {
            name: "c".to_owned(),
            mac: record("a").mac,
            ..record("c")
        };

        let taken = store.insert_vm(&twin, EventKind::Created, "x");

        assert!(matches!(&taken, Err(StoreError::MacTaken(_))), "{taken:?}");
        let nics: Vec<u32> = store.list().unwrap().iter().map(|r| r.nic).collect();
        assert_eq!(nics, [1, 2]);
    }

    #[test]
    fn refuses_a_second_vm_with_the_same_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        store
            .insert_vm(&record("web"), EventKind::Created, "x")
            .unwrap();

        let result = store.insert_vm(&record("web"), EventKind::Created, "x");

        assert!(matches!(result, Err(StoreError::Exists(name)) if name == "web"));
    }

    #[test]
    fn a_change_updates_state_and_logs_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        store
            .insert_vm(&record("web"), EventKind::Created, "x")
            .unwrap();

        store
            .change("web", 1, VmState::Running, &started("start requested"))
            .unwrap();

        let stored = store.get("web").unwrap().unwrap();
        assert_eq!((stored.state, stored.pid), (VmState::Running, Some(42)));
        assert_eq!(stored.revision, 2);
        let events = store.events(1, 10, Some("web")).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].cause, "start requested");
    }

    fn started(cause: &str) -> Change<'_> {
        Change {
            pid: Some(42),
            started_at: Some(5),
            restarts: 0,
            kind: EventKind::Started,
            cause,
        }
    }

    #[test]
    fn a_change_from_a_revision_that_moved_on_is_refused_and_leaves_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        store
            .insert_vm(&record("web"), EventKind::Created, "x")
            .unwrap();
        store
            .change("web", 1, VmState::Running, &started("first"))
            .unwrap();

        let stale = store.change("web", 1, VmState::Stopped, &started("second"));

        assert!(
            matches!(stale, Err(StoreError::Stale { expected: 1, .. })),
            "{stale:?}"
        );
        assert_eq!(store.get("web").unwrap().unwrap().state, VmState::Running);
        assert_eq!(store.events(0, 10, Some("web")).unwrap().len(), 2);
        let stale_delete = store.delete_vm("web", 1, "x");
        assert!(
            matches!(stale_delete, Err(StoreError::Stale { .. })),
            "{stale_delete:?}"
        );
        assert!(store.get("web").unwrap().is_some());
        let missing = store.change("ghost", 1, VmState::Running, &started("x"));
        assert!(
            matches!(missing, Err(StoreError::Missing(_))),
            "{missing:?}"
        );
    }

    #[test]
    fn reopening_keeps_everything_and_does_not_rerun_migrations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        SqliteStore::open(&path)
            .unwrap()
            .insert_vm(&record("web"), EventKind::Created, "x")
            .unwrap();

        let store = SqliteStore::open(&path).unwrap();

        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn reads_the_end_of_the_log_backwards_a_page_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        store
            .insert_vm(&record("a"), EventKind::Created, "test")
            .unwrap();
        for i in 0..5 {
            store
                .note("a", EventKind::Reset, &format!("reset {i}"))
                .unwrap();
        }
        let newest = store.events_before(i64::MAX, 2, None).unwrap();
        let causes: Vec<&str> = newest.iter().map(|e| e.cause.as_str()).collect();
        assert_eq!(causes, ["reset 3", "reset 4"]);
        let older = store.events_before(newest[0].id, 10, Some("a")).unwrap();
        assert_eq!(older.len(), 4);
        assert_eq!(older[0].kind, EventKind::Created);
        assert!(
            store
                .events_before(older[0].id, 10, None)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn pages_events_after_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        for name in ["a", "b", "c"] {
            store
                .insert_vm(&record(name), EventKind::Created, "x")
                .unwrap();
        }

        let first = store.events(0, 2, None).unwrap();
        let rest = store.events(first[1].id, 2, None).unwrap();

        assert_eq!(first.len(), 2);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].vm, "c");
    }
}
