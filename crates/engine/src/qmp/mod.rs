//! A typed QMP client: one owner per QEMU monitor socket.
//!
//! A reader task owns the socket's read half: it routes answers to the
//! command that waits for them (by `id`) and forwards events to one channel.
//! When QEMU goes away the event channel closes and every waiting command
//! fails with [`QmpError::Disconnected`], so the owner always learns of it.

mod protocol;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

pub use protocol::{
    Command, Event, JobInfo, Message, RunState, ShutdownReason, SnapshotJob, Status, parse_message,
};

/// How long a command may take before we give up on QEMU.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a job (a snapshot of a large VM) may run.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("QEMU sent something that is not QMP ({why}): {line}")]
    Protocol { line: String, why: String },
    #[error("QEMU refused {command}: {class}: {desc}")]
    Refused {
        command: &'static str,
        class: String,
        desc: String,
    },
    #[error("QEMU did not answer {command} within {COMMAND_TIMEOUT:?}")]
    Timeout { command: &'static str },
    #[error("the QMP connection closed (QEMU exited)")]
    Disconnected,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>;

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: std::sync::atomic::AtomicU64,
}

impl QmpClient {
    /// Connects, reads the greeting and leaves negotiation mode. Events come
    /// out of the returned receiver, which closes when QEMU goes away.
    pub async fn connect(path: &Path) -> Result<(Self, mpsc::UnboundedReceiver<Event>), QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read);
        let mut line = String::new();
        if lines.read_line(&mut line).await? == 0 {
            return Err(QmpError::Disconnected);
        }
        let Message::Greeting { .. } = parse_message(line.trim_end())? else {
            return Err(QmpError::Protocol {
                line,
                why: "expected the QMP greeting".to_owned(),
            });
        };
        let pending: Pending = Arc::default();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        tokio::spawn(read_loop(lines, Arc::clone(&pending), events_tx));
        let client = QmpClient {
            writer: tokio::sync::Mutex::new(write),
            pending,
            next_id: std::sync::atomic::AtomicU64::new(1),
        };
        client.execute(Command::QmpCapabilities).await?;
        Ok((client, events_rx))
    }

    /// Sends a command and waits for its answer.
    pub async fn execute(&self, command: Command) -> Result<Value, QmpError> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("the pending map is never left poisoned: no code panics while holding it")
            .insert(id, tx);
        let sent = self
            .writer
            .lock()
            .await
            .write_all(command.to_line(id).as_bytes())
            .await;
        if sent.is_err() {
            self.forget(id);
            return Err(QmpError::Disconnected);
        }
        let name = command.name();
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(QmpError::Refused { class, desc, .. }))) => Err(QmpError::Refused {
                command: name,
                class,
                desc,
            }),
            Ok(Ok(Err(err))) => Err(err),
            Ok(Err(_closed)) => Err(QmpError::Disconnected),
            Err(_elapsed) => {
                self.forget(id);
                Err(QmpError::Timeout { command: name })
            }
        }
    }

    pub async fn query_status(&self) -> Result<Status, QmpError> {
        let value = self.execute(Command::QueryStatus).await?;
        serde_json::from_value(value.clone()).map_err(|err| QmpError::Protocol {
            line: value.to_string(),
            why: err.to_string(),
        })
    }

    /// Bytes read and written, summed over all block devices.
    pub async fn block_bytes(&self) -> Result<(u64, u64), QmpError> {
        let value = self.execute(Command::QueryBlockstats).await?;
        let devices = value.as_array().cloned().unwrap_or_default();
        let sum = |key: &str| {
            devices
                .iter()
                .filter_map(|device| device["stats"][key].as_u64())
                .sum()
        };
        Ok((sum("rd_bytes"), sum("wr_bytes")))
    }

    /// The guest's total and used memory, as its balloon driver last
    /// reported (`stat-total-memory`, less `stat-available-memory`);
    /// `None` until a driver has reported both. Asks the driver to report
    /// every few seconds first (setting it again is harmless).
    pub async fn balloon_memory(&self) -> Result<Option<(u64, u64)>, QmpError> {
        self.execute(Command::BalloonPollEvery { secs: 5 }).await?;
        let value = self.execute(Command::BalloonStats).await?;
        Ok(balloon_memory(&value))
    }

    /// The host thread of each vCPU, by vCPU index.
    pub async fn vcpu_threads(&self) -> Result<Vec<(u32, u32)>, QmpError> {
        let value = self.execute(Command::QueryCpusFast).await?;
        Ok(vcpu_threads(&value))
    }

    /// Runs a job-starting command and waits until the job concludes;
    /// its error, if any, becomes [`QmpError::Refused`].
    pub async fn run_job(&self, command: Command, job_id: &str) -> Result<(), QmpError> {
        let name = command.name();
        self.execute(command).await?;
        let deadline = tokio::time::Instant::now() + JOB_TIMEOUT;
        loop {
            let value = self.execute(Command::QueryJobs).await?;
            let jobs: Vec<JobInfo> =
                serde_json::from_value(value.clone()).map_err(|err| QmpError::Protocol {
                    line: value.to_string(),
                    why: err.to_string(),
                })?;
            let job = jobs.into_iter().find(|job| job.id == job_id);
            match job {
                Some(job) if job.status == "concluded" => {
                    self.execute(Command::JobDismiss {
                        id: job_id.to_owned(),
                    })
                    .await?;
                    return match job.error {
                        None => Ok(()),
                        Some(desc) => Err(QmpError::Refused {
                            command: name,
                            class: "JobFailed".to_owned(),
                            desc,
                        }),
                    };
                }
                // Gone without concluding: nothing more to learn.
                None => return Ok(()),
                Some(_) if tokio::time::Instant::now() > deadline => {
                    return Err(QmpError::Timeout { command: name });
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Waits until the current migration (a save or a restore) is done;
    /// a failed one becomes [`QmpError::Refused`].
    pub async fn migration_done(&self, command: &'static str) -> Result<(), QmpError> {
        let deadline = tokio::time::Instant::now() + JOB_TIMEOUT;
        loop {
            let value = self.execute(Command::QueryMigrate).await?;
            match value["status"].as_str() {
                Some("completed") => return Ok(()),
                Some("failed" | "cancelled") => {
                    return Err(QmpError::Refused {
                        command,
                        class: "MigrationFailed".to_owned(),
                        desc: value["error-desc"]
                            .as_str()
                            .unwrap_or("the migration failed")
                            .to_owned(),
                    });
                }
                _ if tokio::time::Instant::now() > deadline => {
                    return Err(QmpError::Timeout { command });
                }
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    /// Sends `quit`. QEMU may close the socket before it answers; both mean
    /// it is going away.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute(Command::Quit).await {
            Ok(_) | Err(QmpError::Disconnected) => Ok(()),
            Err(err) => Err(err),
        }
    }

    fn forget(&self, id: u64) {
        self.pending
            .lock()
            .expect("the pending map is never left poisoned: no code panics while holding it")
            .remove(&id);
    }
}

async fn read_loop(
    mut lines: BufReader<OwnedReadHalf>,
    pending: Pending,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let answer = match parse_message(line.trim_end()) {
            Ok(Message::Event(event)) => {
                tracing::debug!(?event, "qmp event");
                // The owner may have stopped listening; the VM still ends.
                let _ = events.send(event);
                continue;
            }
            Ok(Message::Return { id, value }) => (id, Ok(value)),
            Ok(Message::Error { id, error }) => (
                id,
                Err(QmpError::Refused {
                    command: "",
                    class: error.class,
                    desc: error.desc,
                }),
            ),
            Ok(Message::Greeting { .. }) => continue,
            Err(err) => {
                tracing::warn!(error = %err, "ignoring a QMP line");
                continue;
            }
        };
        let (Some(id), result) = answer else {
            continue;
        };
        let waiter = pending
            .lock()
            .expect("the pending map is never left poisoned: no code panics while holding it")
            .remove(&id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(result);
        }
    }
    // Dropping the senders fails every waiting command with Disconnected;
    // dropping `events` closes the owner's receiver.
    pending
        .lock()
        .expect("the pending map is never left poisoned: no code panics while holding it")
        .clear();
}

/// Total and used bytes from a `guest-stats` answer; QEMU reports a
/// statistic the guest never sent as -1, and a stats block never updated
/// with `last-update` 0.
/// `query-cpus-fast`'s answer as (vCPU index, thread id) pairs.
fn vcpu_threads(value: &Value) -> Vec<(u32, u32)> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|cpu| {
            let index = u32::try_from(cpu.get("cpu-index")?.as_u64()?).ok()?;
            let thread = u32::try_from(cpu.get("thread-id")?.as_u64()?).ok()?;
            Some((index, thread))
        })
        .collect()
}

fn balloon_memory(value: &Value) -> Option<(u64, u64)> {
    if value["last-update"].as_u64().unwrap_or(0) == 0 {
        return None;
    }
    let total = value["stats"]["stat-total-memory"].as_u64()?;
    let available = value["stats"]["stat-available-memory"].as_u64()?;
    (total > 0).then(|| (total, total.saturating_sub(available)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_threads_come_from_query_cpus_fast() {
        // QEMU 7.2's answer for two vCPUs under TCG.
        let answer = serde_json::json!([
            {"thread-id": 4242, "props": {"core-id": 0, "thread-id": 0, "socket-id": 0},
             "qom-path": "/machine/unattached/device[0]", "cpu-index": 0, "target": "x86_64"},
            {"thread-id": 4243, "props": {"core-id": 0, "thread-id": 0, "socket-id": 1},
             "qom-path": "/machine/unattached/device[1]", "cpu-index": 1, "target": "x86_64"}
        ]);

        assert_eq!(vcpu_threads(&answer), vec![(0, 4242), (1, 4243)]);
    }

    #[test]
    fn balloon_figures_count_only_once_the_guest_reported_them() {
        let reported = serde_json::json!({"last-update": 1700000000, "stats": {
            "stat-total-memory": 1000, "stat-available-memory": 600, "stat-free-memory": 500}});
        let never = serde_json::json!({"last-update": 0, "stats": {
            "stat-total-memory": -1, "stat-available-memory": -1}});
        let partly = serde_json::json!({"last-update": 5, "stats": {
            "stat-total-memory": 1000, "stat-available-memory": -1}});

        assert_eq!(balloon_memory(&reported), Some((1000, 400)));
        assert_eq!(balloon_memory(&never), None);
        assert_eq!(balloon_memory(&partly), None);
    }
}
