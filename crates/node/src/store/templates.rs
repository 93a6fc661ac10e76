//! Templates in the store: a template row swapped in for its VM's in one
//! transaction, and the VMs that are linked clones of it.

use std::path::PathBuf;

use quetzal_api::{Event, EventKind};
use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, StoreError, insert_event, sqlite_error};

/// A template as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateRecord {
    pub name: String,
    pub image: String,
    pub image_dir: PathBuf,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub source_vm: String,
    pub created_at: i64,
    pub disk_sha256: String,
    /// A warm template's memory: its RAM file and device state beside
    /// the disk (`None`: a template of a stopped VM).
    pub warm: Option<WarmFiles>,
}

/// What a warm template keeps of its VM's memory, with the sha256s its
/// files had when it was made.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WarmFiles {
    pub ram_sha256: String,
    pub state_sha256: String,
}

/// Templates, and the VMs that are linked clones of them. A template is
/// written once (made from a VM in one step) and deleted whole.
pub trait TemplateStore {
    /// Turns a VM into a template in one transaction: the template row in,
    /// the VM row out, with the VM's last event.
    fn templatize(&mut self, template: &TemplateRecord) -> Result<Event, StoreError>;

    fn template(&self, name: &str) -> Result<Option<TemplateRecord>, StoreError>;

    fn templates(&self) -> Result<Vec<TemplateRecord>, StoreError>;

    /// The VMs that are linked clones of `template`.
    fn linked_clones(&self, template: &str) -> Result<Vec<String>, StoreError>;

    fn delete_template(&mut self, name: &str) -> Result<(), StoreError>;
}

impl SqliteStore {
    /// The names a one-parameter query over `vms` selects.
    pub(super) fn vm_names(
        &self,
        query: &'static str,
        value: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut statement = self.conn.prepare_cached(query).map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map(params![value], |row| row.get(0))
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }
}

impl TemplateStore for SqliteStore {
    fn templatize(&mut self, template: &TemplateRecord) -> Result<Event, StoreError> {
        let sql = sqlite_error(&self.path);
        let tx = self.conn.transaction().map_err(sql)?;
        let inserted = tx.execute(
            "INSERT INTO templates (name, image, image_dir, cpus, memory_mib, disk_mib, source_vm,
                created_at, disk_sha256, warm) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                template.name,
                template.image,
                template.image_dir.display().to_string(),
                template.cpus,
                template.memory_mib,
                template.disk_mib,
                template.source_vm,
                template.created_at,
                template.disk_sha256,
                template
                    .warm
                    .as_ref()
                    .map(|warm| serde_json::to_string(warm).expect("two strings serialize")),
            ],
        );
        match inserted {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(err, _))
                if err.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(StoreError::Exists(template.name.clone()));
            }
            Err(err) => return Err(sql(err)),
        }
        tx.execute(
            "DELETE FROM vms WHERE name = ?1",
            params![template.source_vm],
        )
        .map_err(sql)?;
        tx.execute(
            "DELETE FROM snapshots WHERE vm = ?1",
            params![template.source_vm],
        )
        .map_err(sql)?;
        let cause = format!("turned into template {}", template.name);
        let event = insert_event(&tx, &template.source_vm, EventKind::Templated, None, &cause)
            .map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(event)
    }

    fn template(&self, name: &str) -> Result<Option<TemplateRecord>, StoreError> {
        self.conn
            .query_row(
                &format!("{SELECT_TEMPLATE} WHERE name = ?1"),
                params![name],
                read_template,
            )
            .optional()
            .map_err(|e| self.sql(e))
    }

    fn templates(&self) -> Result<Vec<TemplateRecord>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached(&format!("{SELECT_TEMPLATE} ORDER BY name"))
            .map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map([], read_template)
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    fn linked_clones(&self, template: &str) -> Result<Vec<String>, StoreError> {
        self.vm_names(
            "SELECT name FROM vms WHERE linked_to = ?1 ORDER BY name",
            template,
        )
    }

    fn delete_template(&mut self, name: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM templates WHERE name = ?1", params![name])
            .map_err(|e| self.sql(e))?;
        Ok(())
    }
}

const SELECT_TEMPLATE: &str =
    "SELECT name, image, image_dir, cpus, memory_mib, disk_mib, source_vm,
    created_at, disk_sha256, warm FROM templates";

fn read_template(row: &rusqlite::Row<'_>) -> rusqlite::Result<TemplateRecord> {
    let image_dir: String = row.get(2)?;
    Ok(TemplateRecord {
        name: row.get(0)?,
        image: row.get(1)?,
        image_dir: PathBuf::from(image_dir),
        cpus: row.get(3)?,
        memory_mib: row.get(4)?,
        disk_mib: row.get(5)?,
        source_vm: row.get(6)?,
        created_at: row.get(7)?,
        disk_sha256: row.get(8)?,
        warm: row
            .get::<_, Option<String>>(9)?
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(|err| {
                rusqlite::Error::FromSqlConversionFailure(
                    9,
                    rusqlite::types::Type::Text,
                    err.into(),
                )
            })?,
    })
}
