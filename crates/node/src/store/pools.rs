//! Desktop pools in the store: each pool's settings, and its desktops —
//! which VM, made from which template, held by whom.
//!
//! A desktop row is written *before* its VM is made (`creating`), so a
//! daemon killed mid-make leaves a row that says what to clean up; a row
//! whose VM is gone (deleted by hand) is dropped by the node.

use quetzal_api::DesktopState;
use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, StoreError, sqlite_error};

/// A pool as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolRecord {
    pub name: String,
    pub template: String,
    pub spare: u32,
    pub max: u32,
    pub persistent: bool,
    pub created_at: i64,
}

/// One desktop of a pool as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesktopRecord {
    pub vm: String,
    pub pool: String,
    pub template: String,
    pub state: DesktopState,
    pub user: Option<String>,
    pub assigned_at: Option<i64>,
}

pub trait PoolStore {
    /// [`StoreError::Exists`] when a pool has that name.
    fn insert_pool(&mut self, pool: &PoolRecord) -> Result<(), StoreError>;

    fn pool(&self, name: &str) -> Result<Option<PoolRecord>, StoreError>;

    fn pools(&self) -> Result<Vec<PoolRecord>, StoreError>;

    /// The pools whose desktops are made from `template`.
    fn pools_of_template(&self, template: &str) -> Result<Vec<String>, StoreError>;

    /// Writes a pool's settings (its name picks the row).
    fn update_pool(&mut self, pool: &PoolRecord) -> Result<(), StoreError>;

    /// Deletes a pool and its desktop rows (not their VMs).
    fn delete_pool(&mut self, name: &str) -> Result<(), StoreError>;

    /// Records a new `creating` desktop of `pool` under the next free
    /// name `POOL-N` (one no VM and no desktop has), and returns it.
    fn reserve_desktop(
        &mut self,
        pool: &str,
        template: &str,
        user: Option<&str>,
    ) -> Result<DesktopRecord, StoreError>;

    /// Writes a desktop's state and holder (its VM picks the row).
    fn update_desktop(&mut self, desktop: &DesktopRecord) -> Result<(), StoreError>;

    fn delete_desktop(&mut self, vm: &str) -> Result<(), StoreError>;

    /// A pool's desktops, by VM name.
    fn desktops(&self, pool: &str) -> Result<Vec<DesktopRecord>, StoreError>;

    fn desktop(&self, vm: &str) -> Result<Option<DesktopRecord>, StoreError>;
}

impl PoolStore for SqliteStore {
    fn insert_pool(&mut self, pool: &PoolRecord) -> Result<(), StoreError> {
        let inserted = self.conn.execute(
            "INSERT INTO pools (name, template, spare, max, persistent, created_at, next_index)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1)",
            params![
                pool.name,
                pool.template,
                pool.spare,
                pool.max,
                pool.persistent,
                pool.created_at
            ],
        );
        match inserted {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(err, _))
                if err.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Exists(pool.name.clone()))
            }
            Err(err) => Err(self.sql(err)),
        }
    }

    fn pool(&self, name: &str) -> Result<Option<PoolRecord>, StoreError> {
        self.conn
            .query_row(
                &format!("{SELECT_POOL} WHERE name = ?1"),
                params![name],
                read_pool,
            )
            .optional()
            .map_err(|e| self.sql(e))
    }

    fn pools(&self) -> Result<Vec<PoolRecord>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached(&format!("{SELECT_POOL} ORDER BY name"))
            .map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map([], read_pool)
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    fn pools_of_template(&self, template: &str) -> Result<Vec<String>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT name FROM pools WHERE template = ?1 ORDER BY name")
            .map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map(params![template], |row| row.get(0))
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    fn update_pool(&mut self, pool: &PoolRecord) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE pools SET template = ?2, spare = ?3, max = ?4 WHERE name = ?1",
                params![pool.name, pool.template, pool.spare, pool.max],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    fn delete_pool(&mut self, name: &str) -> Result<(), StoreError> {
        let sql = sqlite_error(&self.path);
        let tx = self.conn.transaction().map_err(sql)?;
        tx.execute("DELETE FROM desktops WHERE pool = ?1", params![name])
            .map_err(sql)?;
        tx.execute("DELETE FROM pools WHERE name = ?1", params![name])
            .map_err(sql)?;
        tx.commit().map_err(sql)
    }

    fn reserve_desktop(
        &mut self,
        pool: &str,
        template: &str,
        user: Option<&str>,
    ) -> Result<DesktopRecord, StoreError> {
        let sql = sqlite_error(&self.path);
        let tx = self.conn.transaction().map_err(sql)?;
        let mut index: i64 = tx
            .query_row(
                "SELECT next_index FROM pools WHERE name = ?1",
                params![pool],
                |row| row.get(0),
            )
            .optional()
            .map_err(sql)?
            .ok_or_else(|| StoreError::Missing(pool.to_owned()))?;
        let vm = loop {
            let vm = format!("{pool}-{index}");
            index += 1;
            let taken: bool = tx
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM vms WHERE name = ?1)
                        OR EXISTS (SELECT 1 FROM desktops WHERE vm = ?1)
                        OR EXISTS (SELECT 1 FROM templates WHERE name = ?1)",
                    params![vm],
                    |row| row.get(0),
                )
                .map_err(sql)?;
            if !taken {
                break vm;
            }
        };
        tx.execute(
            "UPDATE pools SET next_index = ?2 WHERE name = ?1",
            params![pool, index],
        )
        .map_err(sql)?;
        let desktop = DesktopRecord {
            vm,
            pool: pool.to_owned(),
            template: template.to_owned(),
            state: DesktopState::Creating,
            user: user.map(str::to_owned),
            assigned_at: None,
        };
        tx.execute(
            "INSERT INTO desktops (vm, pool, template, state, user, assigned_at)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
            params![
                desktop.vm,
                desktop.pool,
                desktop.template,
                desktop.state.as_str(),
                desktop.user
            ],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(desktop)
    }

    fn update_desktop(&mut self, desktop: &DesktopRecord) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE desktops SET state = ?2, user = ?3, assigned_at = ?4 WHERE vm = ?1",
                params![
                    desktop.vm,
                    desktop.state.as_str(),
                    desktop.user,
                    desktop.assigned_at
                ],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    fn delete_desktop(&mut self, vm: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM desktops WHERE vm = ?1", params![vm])
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    fn desktops(&self, pool: &str) -> Result<Vec<DesktopRecord>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached(&format!("{SELECT_DESKTOP} WHERE pool = ?1 ORDER BY vm"))
            .map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map(params![pool], read_desktop)
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    fn desktop(&self, vm: &str) -> Result<Option<DesktopRecord>, StoreError> {
        self.conn
            .query_row(
                &format!("{SELECT_DESKTOP} WHERE vm = ?1"),
                params![vm],
                read_desktop,
            )
            .optional()
            .map_err(|e| self.sql(e))
    }
}

const SELECT_POOL: &str = "SELECT name, template, spare, max, persistent, created_at FROM pools";

fn read_pool(row: &rusqlite::Row<'_>) -> rusqlite::Result<PoolRecord> {
    Ok(PoolRecord {
        name: row.get(0)?,
        template: row.get(1)?,
        spare: row.get(2)?,
        max: row.get(3)?,
        persistent: row.get(4)?,
        created_at: row.get(5)?,
    })
}

const SELECT_DESKTOP: &str = "SELECT vm, pool, template, state, user, assigned_at FROM desktops";

fn read_desktop(row: &rusqlite::Row<'_>) -> rusqlite::Result<DesktopRecord> {
    let state: String = row.get(3)?;
    Ok(DesktopRecord {
        vm: row.get(0)?,
        pool: row.get(1)?,
        template: row.get(2)?,
        state: DesktopState::parse(&state).unwrap_or(DesktopState::Unknown),
        user: row.get(4)?,
        assigned_at: row.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("q.db")).unwrap();
        store
            .conn
            .execute_batch(
                "INSERT INTO templates (name, image, image_dir, cpus, memory_mib, disk_mib,
                    source_vm, created_at, disk_sha256) VALUES ('t', 'tiny', '/i', 1, 256, 64,
                    'base', 0, 'x')",
            )
            .unwrap();
        store
            .insert_pool(&PoolRecord {
                name: "lab".into(),
                template: "t".into(),
                spare: 2,
                max: 4,
                persistent: false,
                created_at: 1,
            })
            .unwrap();
        (dir, store)
    }

    #[test]
    fn desktops_get_names_of_their_own_and_keep_their_holder() {
        let (_dir, mut store) = store();
        store
            .conn
            .execute_batch(
                "INSERT INTO vms (name, image, image_dir, cpus, memory_mib, disk_mib, labels,
                    restart_policy, state, created_at, nic) VALUES ('lab-2', 'tiny', '/i', 1,
                    256, 64, '{}', 'never', 'stopped', 0, 1)",
            )
            .unwrap();

        let first = store.reserve_desktop("lab", "t", None).unwrap();
        let second = store.reserve_desktop("lab", "t", Some("alice")).unwrap();
        let assigned = DesktopRecord {
            state: DesktopState::Assigned,
            assigned_at: Some(5),
            ..second.clone()
        };
        store.update_desktop(&assigned).unwrap();

        assert_eq!(first.vm, "lab-1");
        // lab-2 is a VM of someone else's.
        assert_eq!(second.vm, "lab-3");
        assert_eq!(first.state, DesktopState::Creating);
        assert_eq!(store.desktops("lab").unwrap(), vec![first, assigned]);
        assert!(matches!(
            store.reserve_desktop("nope", "t", None),
            Err(StoreError::Missing(_))
        ));
    }

    #[test]
    fn a_pool_is_unique_and_goes_with_its_desktop_rows() {
        let (_dir, mut store) = store();
        store.reserve_desktop("lab", "t", None).unwrap();
        let again = store.pool("lab").unwrap().unwrap();

        assert!(matches!(
            store.insert_pool(&again),
            Err(StoreError::Exists(_))
        ));
        assert_eq!(store.pools_of_template("t").unwrap(), vec!["lab"]);
        store.delete_pool("lab").unwrap();
        assert_eq!(store.pools().unwrap(), vec![]);
        assert_eq!(store.desktop("lab-1").unwrap(), None);
    }
}
