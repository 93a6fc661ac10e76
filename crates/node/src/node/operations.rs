//! Long work as operations: the request that starts one is answered at
//! once (`202` with the operation), the work runs in its own task, its
//! progress is stored and published on the event stream, and a
//! cancellable one stops when asked. What an operation works on stays
//! locked (its VM's operation lock) until it ends.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quetzal_api::{Operation, OperationKind, OperationState};
use tokio::sync::{broadcast, watch};

use super::core::Core;
use super::error::{ErrorKind, Fault, OperationError};
use super::{NodeError, Published, now_millis, random_hex};
use crate::store::{Failure, OperationRecord};

/// How many operations a listing shows.
const LIST_LIMIT: u32 = 200;
/// The smallest rise of progress that is recorded and published...
const PROGRESS_STEP: u8 = 5;
/// ...and the least time between two records: a copy of a second writes
/// the store a few times, one of 70 ms not at all until it ends.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// The operations running in this daemon: how to cancel each.
#[derive(Debug, Default)]
struct Running {
    cancels: Mutex<HashMap<String, watch::Sender<bool>>>,
}

impl Running {
    fn insert(&self, id: &str, cancel: watch::Sender<bool>) {
        self.lock().insert(id.to_owned(), cancel);
    }

    fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Asks a running operation to stop; false when it is not running here.
    fn cancel(&self, id: &str) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|cancel| cancel.send(true).is_ok())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<bool>>> {
        self.cancels
            .lock()
            .expect("never poisoned: no panics while held")
    }
}

/// What an operation's work gets: a way to report progress and to learn
/// that it was cancelled.
#[derive(Clone, Debug)]
pub struct Progress {
    core: Arc<Core>,
    id: String,
    cancel: watch::Receiver<bool>,
    /// The last progress recorded, and when.
    last: Arc<Mutex<(u8, Instant)>>,
    /// The last progress reported, recorded or not: a failed operation
    /// ends showing how far it got.
    reported: Arc<AtomicU8>,
}

impl Progress {
    /// Records how far the work is (0-100): a rise of at least
    /// [`PROGRESS_STEP`] points, at most every [`PROGRESS_INTERVAL`], so a
    /// copy does not write the store on every line it reports.
    pub fn set(&self, percent: u32) {
        let percent = u8::try_from(percent.min(100)).expect("at most 100");
        self.reported.fetch_max(percent, Ordering::Relaxed);
        {
            let mut last = self.last.lock().expect("never poisoned");
            let (recorded, at) = *last;
            if percent < recorded.saturating_add(PROGRESS_STEP) || at.elapsed() < PROGRESS_INTERVAL
            {
                return;
            }
            *last = (percent, Instant::now());
        }
        update(&self.core, &self.id, |op| op.progress = percent);
    }

    /// Whether a user asked to stop it.
    pub fn cancelled(&self) -> bool {
        *self.cancel.borrow()
    }
}

/// The node's operations: those stored, and how to cancel those running.
#[derive(Debug)]
pub struct Operations {
    core: Arc<Core>,
    running: Arc<Running>,
}

impl Operations {
    pub(super) fn new(core: Arc<Core>) -> Self {
        Operations {
            core,
            running: Arc::default(),
        }
    }

    /// Starts `work` as an operation on `target` (an API path) and returns
    /// it, running. `work` runs in its own task; what it returns ends the
    /// operation (an error of kind [`ErrorKind::Cancelled`] as
    /// `cancelled`).
    pub(super) fn start<F, Fut>(
        &self,
        kind: OperationKind,
        target: String,
        cancellable: bool,
        work: F,
    ) -> Result<Operation, NodeError>
    where
        F: FnOnce(Progress) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), NodeError>> + Send + 'static,
    {
        let op = OperationRecord {
            id: random_hex(8)?,
            kind,
            target,
            state: OperationState::Running,
            progress: 0,
            cancellable,
            error: None,
            started_at: now_millis(),
            finished_at: None,
        };
        self.core.store().insert_operation(&op)?;
        let (cancel_tx, cancel) = watch::channel(false);
        self.running.insert(&op.id, cancel_tx);
        let progress = Progress {
            core: Arc::clone(&self.core),
            id: op.id.clone(),
            cancel,
            last: Arc::new(Mutex::new((0, Instant::now()))),
            reported: Arc::default(),
        };
        let reported = Arc::clone(&progress.reported);
        tracing::info!(operation = %op.id, kind = op.kind.as_str(), target = %op.target, "operation started");
        self.core.publish(Published::Operation(op.to_api()));
        let (core, running) = (Arc::clone(&self.core), Arc::clone(&self.running));
        let id = op.id.clone();
        tokio::spawn(async move {
            // Its own task, so that a panic in the work still ends the
            // operation (as failed) instead of leaving it running.
            let result = match tokio::spawn(work(progress)).await {
                Ok(result) => result,
                Err(err) => Err(Fault::task("the operation")(err).into()),
            };
            running.remove(&id);
            update(&core, &id, |op| {
                op.finished_at = Some(now_millis());
                match &result {
                    Ok(()) => {
                        op.state = OperationState::Succeeded;
                        op.progress = 100;
                    }
                    Err(err) => {
                        op.progress = op.progress.max(reported.load(Ordering::Relaxed));
                        op.state = match err.kind() {
                            ErrorKind::Cancelled => OperationState::Cancelled,
                            _ => OperationState::Failed,
                        };
                        op.error = Some(Failure {
                            code: err.code().to_owned(),
                            message: err.to_string(),
                        });
                    }
                }
            });
        });
        Ok(op.to_api())
    }

    /// The newest operations, newest first.
    pub fn list(&self) -> Result<Vec<Operation>, NodeError> {
        let records = self.core.store().operations(LIST_LIMIT)?;
        Ok(records.iter().map(OperationRecord::to_api).collect())
    }

    pub fn get(&self, id: &str) -> Result<Operation, NodeError> {
        let found = self.core.store().operation(id)?;
        let record = found.ok_or_else(|| OperationError::NotFound { id: id.to_owned() })?;
        Ok(record.to_api())
    }

    /// The operation once it has ended, or as it is after `timeout`: a
    /// client waits without polling (it follows the event stream here).
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Operation, NodeError> {
        // Subscribed before reading, so an end between the two is heard.
        let mut events = self.core.subscribe();
        let op = self.get(id)?;
        if op.state.is_finished() {
            return Ok(op);
        }
        let ended = async {
            loop {
                match events.recv().await {
                    Ok(Published::Operation(op)) if op.id == id && op.state.is_finished() => {
                        return;
                    }
                    Ok(_) => {}
                    // Missed messages: the store says whether it ended.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if self.get(id).is_ok_and(|op| op.state.is_finished()) {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        };
        let _ = tokio::time::timeout(timeout, ended).await;
        self.get(id)
    }

    /// Asks a running, cancellable operation to stop. It ends `cancelled`
    /// once its work has undone what it made.
    pub fn cancel(&self, id: &str) -> Result<Operation, NodeError> {
        let op = self.get(id)?;
        if op.state.is_finished() {
            return Err(OperationError::Finished {
                id: op.id,
                state: op.state,
            }
            .into());
        }
        if !op.cancellable {
            return Err(OperationError::NotCancellable { kind: op.kind }.into());
        }
        if !self.running.cancel(id) {
            return Err(OperationError::Ending { id: op.id }.into());
        }
        self.get(id)
    }
}

/// Changes a stored operation and publishes it.
fn update(core: &Core, id: &str, change: impl FnOnce(&mut OperationRecord)) {
    let updated = {
        let mut store = core.store();
        store.operation(id).and_then(|op| {
            let Some(mut op) = op else { return Ok(None) };
            change(&mut op);
            store.update_operation(&op).map(|()| Some(op))
        })
    };
    match updated {
        Ok(Some(op)) => {
            if op.state.is_finished() {
                tracing::info!(operation = %op.id, state = op.state.as_str(), "operation ended");
            }
            core.publish(Published::Operation(op.to_api()));
        }
        Ok(None) => {}
        Err(err) => {
            tracing::warn!(operation = %id, error = %err, "cannot record the operation")
        }
    }
}
