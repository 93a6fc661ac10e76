//! Managed networks in the store.

use rusqlite::params;

use super::{SqliteStore, StoreError, now_millis};
use crate::net::Subnet;

/// A managed network as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkRecord {
    pub id: i64,
    pub name: String,
    pub subnet: Subnet,
    pub created_at: i64,
}

/// Managed networks: written once, deleted whole.
pub trait NetworkStore {
    fn insert_network(&mut self, name: &str, subnet: Subnet) -> Result<NetworkRecord, StoreError>;

    /// Every network, oldest first.
    fn networks(&self) -> Result<Vec<NetworkRecord>, StoreError>;

    /// The VMs attached to `network`.
    fn network_users(&self, network: &str) -> Result<Vec<String>, StoreError>;

    fn delete_network(&mut self, name: &str) -> Result<(), StoreError>;
}

impl NetworkStore for SqliteStore {
    fn insert_network(&mut self, name: &str, subnet: Subnet) -> Result<NetworkRecord, StoreError> {
        let created_at = now_millis();
        let inserted = self.conn.execute(
            "INSERT INTO networks (name, subnet, created_at) VALUES (?1, ?2, ?3)",
            params![name, subnet.to_string(), created_at],
        );
        match inserted {
            Ok(_) => Ok(NetworkRecord {
                id: self.conn.last_insert_rowid(),
                name: name.to_owned(),
                subnet,
                created_at,
            }),
            Err(rusqlite::Error::SqliteFailure(err, _))
                if err.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Exists(name.to_owned()))
            }
            Err(err) => Err(self.sql(err)),
        }
    }

    fn networks(&self) -> Result<Vec<NetworkRecord>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT id, name, subnet, created_at FROM networks ORDER BY id")
            .map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, i64>(3)?,
                ))
            })
            .map_err(|e| self.sql(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql(e))?;
        rows.into_iter()
            .map(|(id, name, subnet, created_at)| {
                let subnet = subnet
                    .parse()
                    .map_err(|e| StoreError::Corrupt(format!("subnet of network {name}: {e}")))?;
                Ok(NetworkRecord {
                    id,
                    name,
                    subnet,
                    created_at,
                })
            })
            .collect()
    }

    fn network_users(&self, network: &str) -> Result<Vec<String>, StoreError> {
        self.vm_names(
            "SELECT name FROM vms WHERE network = ?1 ORDER BY name",
            network,
        )
    }

    fn delete_network(&mut self, name: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM networks WHERE name = ?1", params![name])
            .map_err(|e| self.sql(e))?;
        Ok(())
    }
}
