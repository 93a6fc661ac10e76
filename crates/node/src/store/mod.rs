//! What the node keeps — VMs and their event log, snapshots, templates,
//! networks, operations, desktop pools — behind the [`Store`] traits, and their SQLite
//! implementation.
//!
//! Every state change and its event are written in one transaction, in WAL
//! mode: a `kill -9` at any moment leaves a store that opens and holds
//! either the change with its event or neither.

use std::path::{Path, PathBuf};

use quetzal_api::{Event, EventKind, VmState};

use rusqlite::{Connection, params};

mod access;
mod networks;
mod operations;
mod pools;
mod snapshots;
mod templates;
mod vms;

pub use access::{AccessStore, AuditRecord, AuditStore, SessionRecord, TokenRecord};
pub use networks::{NetworkRecord, NetworkStore};
pub use operations::{Failure, OperationRecord, OperationStore};
pub use pools::{DesktopRecord, PoolRecord, PoolStore};
pub use snapshots::{SnapshotRecord, SnapshotStore};
pub use templates::{TemplateRecord, TemplateStore, WarmFiles};
pub use vms::{Change, VmRecord, VmStore};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("VM {0} already exists")]
    Exists(String),
    /// A compare-and-swap found the record at another revision than the
    /// one it was read at: someone else changed it meanwhile.
    #[error("VM {name} changed meanwhile (expected revision {expected})")]
    Stale { name: String, expected: u64 },
    #[error("no VM named {0}")]
    Missing(String),
    /// Another VM has this MAC address (pick another).
    #[error("MAC address {0} is taken")]
    MacTaken(String),
    #[error("the store holds a value it cannot read: {0}")]
    Corrupt(String),
}

/// Each migration moves the schema one version up; `user_version` says
/// how many have run.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE vms (
        name TEXT PRIMARY KEY,
        image TEXT NOT NULL,
        image_dir TEXT NOT NULL,
        cpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        disk_mib INTEGER NOT NULL,
        labels TEXT NOT NULL,
        restart_policy TEXT NOT NULL,
        state TEXT NOT NULL,
        pid INTEGER,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        restarts INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        vm TEXT NOT NULL,
        kind TEXT NOT NULL,
        state TEXT,
        cause TEXT NOT NULL
    );
    CREATE INDEX events_by_vm ON events (vm, id);",
    "CREATE TABLE templates (
        name TEXT PRIMARY KEY,
        image TEXT NOT NULL,
        image_dir TEXT NOT NULL,
        cpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        disk_mib INTEGER NOT NULL,
        source_vm TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        disk_sha256 TEXT NOT NULL
    );
    ALTER TABLE vms ADD COLUMN linked_to TEXT REFERENCES templates (name);",
    "CREATE TABLE snapshots (
        vm TEXT NOT NULL,
        name TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        with_memory INTEGER NOT NULL,
        parent TEXT,
        PRIMARY KEY (vm, name)
    );
    ALTER TABLE vms ADD COLUMN current_snapshot TEXT;",
    "ALTER TABLE vms ADD COLUMN machine_id TEXT;",
    "CREATE TABLE networks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        subnet TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    ALTER TABLE vms ADD COLUMN network TEXT NOT NULL DEFAULT 'user';
    ALTER TABLE vms ADD COLUMN mac TEXT NOT NULL DEFAULT '';",
    "ALTER TABLE vms ADD COLUMN revision INTEGER NOT NULL DEFAULT 1;",
    "ALTER TABLE vms ADD COLUMN nic INTEGER;
    UPDATE vms SET nic = rowid;
    CREATE UNIQUE INDEX vms_nic ON vms (nic);
    CREATE UNIQUE INDEX vms_mac ON vms (mac) WHERE mac != '';",
    "ALTER TABLE vms ADD COLUMN engine TEXT NOT NULL DEFAULT 'qemu';",
    "CREATE TABLE operations (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        state TEXT NOT NULL,
        progress INTEGER NOT NULL,
        cancellable INTEGER NOT NULL,
        error_code TEXT,
        error_message TEXT,
        started_at INTEGER NOT NULL,
        finished_at INTEGER
    );
    CREATE INDEX operations_by_start ON operations (started_at);",
    "CREATE TABLE tokens (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        last_used_at INTEGER
    );
    CREATE TABLE sessions (
        hash TEXT PRIMARY KEY,
        token TEXT NOT NULL REFERENCES tokens (name) ON DELETE CASCADE,
        created_at INTEGER NOT NULL,
        last_used_at INTEGER NOT NULL
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        who TEXT NOT NULL,
        source TEXT NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        status INTEGER NOT NULL
    );",
    "ALTER TABLE vms ADD COLUMN cloud_init TEXT;",
    "ALTER TABLE snapshots ADD COLUMN quiesced INTEGER NOT NULL DEFAULT 0;",
    "ALTER TABLE vms ADD COLUMN services TEXT NOT NULL DEFAULT '[]';",
    "ALTER TABLE templates ADD COLUMN warm TEXT;
    ALTER TABLE vms ADD COLUMN restore_from TEXT REFERENCES templates (name);",
    "CREATE TABLE pools (
        name TEXT PRIMARY KEY,
        template TEXT NOT NULL REFERENCES templates (name),
        spare INTEGER NOT NULL,
        max INTEGER NOT NULL,
        persistent INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        next_index INTEGER NOT NULL
    );
    CREATE TABLE desktops (
        vm TEXT PRIMARY KEY,
        pool TEXT NOT NULL REFERENCES pools (name),
        template TEXT NOT NULL,
        state TEXT NOT NULL,
        user TEXT,
        assigned_at INTEGER
    );
    CREATE INDEX desktops_by_pool ON desktops (pool);",
    "ALTER TABLE vms ADD COLUMN ram_file INTEGER NOT NULL DEFAULT 0;",
    "ALTER TABLE vms ADD COLUMN cpu_pin TEXT;",
];

/// Everything the node keeps, one trait per concern. SQLite
/// ([`SqliteStore`]) is the embedded default; a cluster keeps the same
/// records in etcd behind the same traits.
pub trait Store:
    VmStore
    + SnapshotStore
    + TemplateStore
    + NetworkStore
    + OperationStore
    + PoolStore
    + AccessStore
    + AuditStore
    + Send
    + std::fmt::Debug
{
}

impl<T> Store for T where
    T: VmStore
        + SnapshotStore
        + TemplateStore
        + NetworkStore
        + OperationStore
        + PoolStore
        + AccessStore
        + AuditStore
        + Send
        + std::fmt::Debug
{
}

/// The store in one SQLite file, in WAL mode.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

/// Turns a SQLite error into a [`StoreError`] naming the store's file.
fn sqlite_error(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + Copy + '_ {
    move |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    }
}

pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(|source| StoreError::Sqlite {
            path: path.to_owned(),
            source,
        })?;
        let mut store = SqliteStore {
            conn,
            path: path.to_owned(),
        };
        store.migrate()?;
        Ok(store)
    }

    fn sql(&self, source: rusqlite::Error) -> StoreError {
        sqlite_error(&self.path)(source)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        self.conn
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
            )
            .map_err(|e| self.sql(e))?;
        let version: usize = self
            .conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|e| self.sql(e))?;
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = self.conn.transaction().map_err(sqlite_error(&self.path))?;
            tx.execute_batch(migration)
                .and_then(|()| tx.execute_batch(&format!("PRAGMA user_version = {}", index + 1)))
                .and_then(|()| tx.commit())
                .map_err(sqlite_error(&self.path))?;
        }
        Ok(())
    }
}

fn insert_event(
    conn: &Connection,
    vm: &str,
    kind: EventKind,
    state: Option<VmState>,
    cause: &str,
) -> rusqlite::Result<Event> {
    let at = now_millis();
    conn.execute(
        "INSERT INTO events (at, vm, kind, state, cause) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![at, vm, kind.as_str(), state.map(VmState::as_str), cause],
    )?;
    Ok(Event {
        id: conn.last_insert_rowid(),
        at,
        vm: vm.to_owned(),
        kind,
        state,
        cause: cause.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The store under test, seen only through its traits.
    pub(super) fn open(dir: &tempfile::TempDir) -> Box<dyn Store> {
        Box::new(SqliteStore::open(&dir.path().join("q.db")).unwrap())
    }
}
