//! Operations in the store: one row each, updated as they progress, so
//! they outlive the daemon (one that was running when it stopped is
//! marked failed at the next start, never left running).

use quetzal_api::{ErrorDetail, Operation, OperationKind, OperationState};
use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, StoreError, now_millis};

/// An operation as the node keeps it; the API's [`Operation`] is made
/// from it by [`OperationRecord::to_api`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperationRecord {
    pub id: String,
    pub kind: OperationKind,
    /// The API path of what it works on.
    pub target: String,
    pub state: OperationState,
    /// 0-100.
    pub progress: u8,
    pub cancellable: bool,
    /// Why it failed or was cancelled.
    pub error: Option<Failure>,
    pub started_at: i64,
    pub finished_at: Option<i64>,
}

/// Why an operation ended without success: a stable code and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub code: String,
    pub message: String,
}

impl OperationRecord {
    pub fn to_api(&self) -> Operation {
        Operation {
            id: self.id.clone(),
            kind: self.kind,
            target: self.target.clone(),
            state: self.state,
            progress: self.progress,
            cancellable: self.cancellable,
            error: self.error.as_ref().map(|failure| ErrorDetail {
                code: failure.code.clone(),
                message: failure.message.clone(),
            }),
            started_at: self.started_at,
            finished_at: self.finished_at,
        }
    }
}

/// How many finished operations the store keeps.
const KEEP_FINISHED: u32 = 1000;

const SELECT_OPERATION: &str = "SELECT id, kind, target, state, progress, cancellable,
    error_code, error_message, started_at, finished_at FROM operations";

/// Operations: each is written only by the task that runs it.
pub trait OperationStore {
    fn insert_operation(&mut self, op: &OperationRecord) -> Result<(), StoreError>;

    /// Writes an operation's progress, state, error and end.
    fn update_operation(&mut self, op: &OperationRecord) -> Result<(), StoreError>;

    fn operation(&self, id: &str) -> Result<Option<OperationRecord>, StoreError>;

    /// The newest `limit` operations, newest first.
    fn operations(&self, limit: u32) -> Result<Vec<OperationRecord>, StoreError>;

    /// At daemon start: what was running when the last daemon stopped
    /// failed with it. Returns those operations.
    fn fail_interrupted_operations(&mut self) -> Result<Vec<OperationRecord>, StoreError>;
}

impl OperationStore for SqliteStore {
    fn insert_operation(&mut self, op: &OperationRecord) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO operations (id, kind, target, state, progress, cancellable,
                    error_code, error_message, started_at, finished_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    op.id,
                    op.kind.as_str(),
                    op.target,
                    op.state.as_str(),
                    op.progress,
                    op.cancellable,
                    op.error.as_ref().map(|e| e.code.as_str()),
                    op.error.as_ref().map(|e| e.message.as_str()),
                    op.started_at,
                    op.finished_at,
                ],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    fn update_operation(&mut self, op: &OperationRecord) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE operations SET state = ?2, progress = ?3, error_code = ?4,
                    error_message = ?5, finished_at = ?6 WHERE id = ?1",
                params![
                    op.id,
                    op.state.as_str(),
                    op.progress,
                    op.error.as_ref().map(|e| e.code.as_str()),
                    op.error.as_ref().map(|e| e.message.as_str()),
                    op.finished_at,
                ],
            )
            .map_err(|e| self.sql(e))?;
        if op.state.is_finished() {
            self.conn
                .execute(
                    "DELETE FROM operations WHERE state != 'running' AND id NOT IN
                        (SELECT id FROM operations WHERE state != 'running'
                         ORDER BY started_at DESC LIMIT ?1)",
                    params![KEEP_FINISHED],
                )
                .map_err(|e| self.sql(e))?;
        }
        Ok(())
    }

    fn operation(&self, id: &str) -> Result<Option<OperationRecord>, StoreError> {
        self.conn
            .query_row(
                &format!("{SELECT_OPERATION} WHERE id = ?1"),
                params![id],
                read_operation,
            )
            .optional()
            .map_err(|e| self.sql(e))?
            .transpose()
    }

    fn operations(&self, limit: u32) -> Result<Vec<OperationRecord>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached(&format!(
                "{SELECT_OPERATION} ORDER BY started_at DESC, id LIMIT ?1"
            ))
            .map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map(params![limit], read_operation)
            .map_err(|e| self.sql(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql(e))?;
        rows.into_iter().collect()
    }

    fn fail_interrupted_operations(&mut self) -> Result<Vec<OperationRecord>, StoreError> {
        let running: Vec<OperationRecord> = self
            .operations(u32::MAX)?
            .into_iter()
            .filter(|op| op.state == OperationState::Running)
            .collect();
        let mut failed = Vec::new();
        for op in running {
            let op = OperationRecord {
                state: OperationState::Failed,
                error: Some(Failure {
                    code: "interrupted".to_owned(),
                    message: "quetzald stopped while it ran; what it had made was removed"
                        .to_owned(),
                }),
                finished_at: Some(now_millis()),
                ..op
            };
            self.update_operation(&op)?;
            failed.push(op);
        }
        Ok(failed)
    }
}

type Row = Result<OperationRecord, StoreError>;

fn read_operation(row: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let id: String = row.get(0)?;
    let kind: String = row.get(1)?;
    let state: String = row.get(3)?;
    let code: Option<String> = row.get(6)?;
    let message: Option<String> = row.get(7)?;
    let Some(kind) = OperationKind::parse(&kind) else {
        return Ok(Err(StoreError::Corrupt(format!(
            "kind of operation {id}: {kind}"
        ))));
    };
    let Some(state) = OperationState::parse(&state) else {
        return Ok(Err(StoreError::Corrupt(format!(
            "state of operation {id}: {state}"
        ))));
    };
    Ok(Ok(OperationRecord {
        id,
        kind,
        target: row.get(2)?,
        state,
        progress: row.get(4)?,
        cancellable: row.get(5)?,
        error: code.map(|code| Failure {
            code,
            message: message.unwrap_or_default(),
        }),
        started_at: row.get(8)?,
        finished_at: row.get(9)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::open;

    fn running(id: &str, started_at: i64) -> OperationRecord {
        OperationRecord {
            id: id.to_owned(),
            kind: OperationKind::FullClone,
            target: "/api/v1/vms/c1".to_owned(),
            state: OperationState::Running,
            progress: 0,
            cancellable: true,
            error: None,
            started_at,
            finished_at: None,
        }
    }

    #[test]
    fn keeps_an_operation_and_its_progress() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        store.insert_operation(&running("a", 1)).unwrap();

        let done = OperationRecord {
            state: OperationState::Succeeded,
            progress: 100,
            finished_at: Some(2),
            ..running("a", 1)
        };
        store.update_operation(&done).unwrap();

        assert_eq!(store.operation("a").unwrap(), Some(done));
        assert_eq!(store.operation("b").unwrap(), None);
    }

    #[test]
    fn a_restart_fails_what_was_running_and_leaves_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        store.insert_operation(&running("a", 1)).unwrap();
        let done = OperationRecord {
            state: OperationState::Succeeded,
            ..running("b", 2)
        };
        store.insert_operation(&done).unwrap();

        let failed = store.fail_interrupted_operations().unwrap();

        assert_eq!(failed.len(), 1);
        let a = store.operation("a").unwrap().unwrap();
        assert_eq!(a.state, OperationState::Failed);
        assert_eq!(a.error.unwrap().code, "interrupted");
        assert_eq!(store.operation("b").unwrap(), Some(done));
        let ids: Vec<String> = store
            .operations(10)
            .unwrap()
            .into_iter()
            .map(|o| o.id)
            .collect();
        assert_eq!(ids, ["b", "a"]);
    }
}
