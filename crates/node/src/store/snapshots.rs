//! Snapshots in the store: the tree (each one's parent) and the one a VM
//! is at.

use quetzal_api::{Event, EventKind, Snapshot};
use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, StoreError, insert_event, sqlite_error};

/// A snapshot as the node keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub vm: String,
    pub name: String,
    pub created_at: i64,
    /// Taken while the VM ran: it holds the memory too.
    pub with_memory: bool,
    /// The snapshot the VM was at when this one was taken.
    pub parent: Option<String>,
    /// The guest's filesystems were frozen by its agent while it was taken.
    pub quiesced: bool,
}

impl SnapshotRecord {
    pub fn to_api(&self) -> Snapshot {
        Snapshot {
            vm: self.vm.clone(),
            name: self.name.clone(),
            created_at: self.created_at,
            with_memory: self.with_memory,
            quiesced: self.quiesced,
            parent: self.parent.clone(),
        }
    }
}

/// A VM's snapshots: the tree (each one's parent) and the one it is at.
pub trait SnapshotStore {
    /// Records a new snapshot as the VM's current one, with its event.
    fn add_snapshot(&mut self, snapshot: &SnapshotRecord, cause: &str)
    -> Result<Event, StoreError>;

    /// The VM's snapshots, oldest first, and which one it is at.
    fn snapshots(&self, vm: &str) -> Result<(Vec<SnapshotRecord>, Option<String>), StoreError>;

    /// Makes `name` the VM's current snapshot (after a revert).
    fn set_current_snapshot(
        &mut self,
        vm: &str,
        name: &str,
        cause: &str,
    ) -> Result<Event, StoreError>;

    /// Removes a snapshot; its children take its parent, and a VM at it is
    /// then at its parent.
    fn remove_snapshot(&mut self, vm: &str, name: &str, cause: &str) -> Result<Event, StoreError>;
}

impl SnapshotStore for SqliteStore {
    fn add_snapshot(
        &mut self,
        snapshot: &SnapshotRecord,
        cause: &str,
    ) -> Result<Event, StoreError> {
        let sql = sqlite_error(&self.path);
        let tx = self.conn.transaction().map_err(sql)?;
        tx.execute(
            "INSERT INTO snapshots (vm, name, created_at, with_memory, parent, quiesced)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                snapshot.vm,
                snapshot.name,
                snapshot.created_at,
                snapshot.with_memory,
                snapshot.parent,
                snapshot.quiesced
            ],
        )
        .map_err(sql)?;
        tx.execute(
            "UPDATE vms SET current_snapshot = ?2 WHERE name = ?1",
            params![snapshot.vm, snapshot.name],
        )
        .map_err(sql)?;
        let event =
            insert_event(&tx, &snapshot.vm, EventKind::SnapshotTaken, None, cause).map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(event)
    }

    fn snapshots(&self, vm: &str) -> Result<(Vec<SnapshotRecord>, Option<String>), StoreError> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT vm, name, created_at, with_memory, parent, quiesced FROM snapshots
                 WHERE vm = ?1 ORDER BY created_at, name",
            )
            .map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map(params![vm], |row| {
                Ok(SnapshotRecord {
                    vm: row.get(0)?,
                    name: row.get(1)?,
                    created_at: row.get(2)?,
                    with_memory: row.get(3)?,
                    quiesced: row.get(5)?,
                    parent: row.get(4)?,
                })
            })
            .map_err(|e| self.sql(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql(e))?;
        let current = self
            .conn
            .query_row(
                "SELECT current_snapshot FROM vms WHERE name = ?1",
                params![vm],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.sql(e))?
            .flatten();
        Ok((rows, current))
    }

    fn set_current_snapshot(
        &mut self,
        vm: &str,
        name: &str,
        cause: &str,
    ) -> Result<Event, StoreError> {
        let sql = sqlite_error(&self.path);
        let tx = self.conn.transaction().map_err(sql)?;
        tx.execute(
            "UPDATE vms SET current_snapshot = ?2 WHERE name = ?1",
            params![vm, name],
        )
        .map_err(sql)?;
        let event = insert_event(&tx, vm, EventKind::Reverted, None, cause).map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(event)
    }

    fn remove_snapshot(&mut self, vm: &str, name: &str, cause: &str) -> Result<Event, StoreError> {
        let sql = sqlite_error(&self.path);
        let tx = self.conn.transaction().map_err(sql)?;
        let parent: Option<String> = tx
            .query_row(
                "SELECT parent FROM snapshots WHERE vm = ?1 AND name = ?2",
                params![vm, name],
                |row| row.get(0),
            )
            .map_err(sql)?;
        tx.execute(
            "UPDATE snapshots SET parent = ?3 WHERE vm = ?1 AND parent = ?2",
            params![vm, name, parent],
        )
        .map_err(sql)?;
        tx.execute(
            "UPDATE vms SET current_snapshot = ?3 WHERE name = ?1 AND current_snapshot = ?2",
            params![vm, name, parent],
        )
        .map_err(sql)?;
        tx.execute(
            "DELETE FROM snapshots WHERE vm = ?1 AND name = ?2",
            params![vm, name],
        )
        .map_err(sql)?;
        let event = insert_event(&tx, vm, EventKind::SnapshotDeleted, None, cause).map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(event)
    }
}
