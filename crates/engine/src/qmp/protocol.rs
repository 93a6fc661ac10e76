//! QMP messages as Rust types, parsed in one place.
//!
//! QEMU sends one JSON object per line: a greeting once, then command
//! answers (`return` or `error`, echoing our `id`) and asynchronous events.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::QmpError;

/// The commands Quetzal sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Leaves capabilities negotiation mode; must be the first command.
    QmpCapabilities,
    QueryStatus,
    /// Pauses the vCPUs.
    Stop,
    /// Resumes the vCPUs (also starts a VM created with `-S`).
    Cont,
    /// Presses the ACPI power button: asks the guest to shut down.
    SystemPowerdown,
    /// Ends QEMU at once.
    Quit,
    /// I/O counters of every block device.
    QueryBlockstats,
    /// Starts a job saving an internal snapshot `tag` of `devices`, with the
    /// VM's memory state stored in `vmstate` (one of the devices).
    SnapshotSave(SnapshotJob),
    /// Starts a job loading an internal snapshot (disks and memory).
    SnapshotLoad(SnapshotJob),
    /// Starts a job deleting an internal snapshot from `devices`.
    SnapshotDelete(SnapshotJob),
    /// The state of every job.
    QueryJobs,
    /// Forgets a concluded job.
    JobDismiss {
        id: String,
    },
    /// How often the balloon driver in the guest reports its memory
    /// statistics (0: never).
    BalloonPollEvery {
        secs: u32,
    },
    /// The balloon driver's last memory statistics.
    BalloonStats,
    /// Migration leaves RAM that is in a shared file out of its stream
    /// (on the saving and the restoring side alike).
    IgnoreSharedRam,
    /// Saves the device state to a migration `uri` (the VM paused).
    Migrate {
        uri: String,
    },
    /// Restores a VM started with `-incoming defer` from `uri`.
    MigrateIncoming {
        uri: String,
    },
    /// The state of the current (or last) migration.
    QueryMigrate,
    /// Each vCPU with the host thread that runs it.
    QueryCpusFast,
}

/// The arguments of the snapshot jobs (QEMU 6.0+).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotJob {
    pub job_id: String,
    pub tag: String,
    /// Where the memory state goes (save) or comes from (load); not for
    /// delete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmstate: Option<String>,
    pub devices: Vec<String>,
}

/// The QOM path of the balloon device (`-device virtio-balloon-pci,id=balloon0`).
pub const BALLOON: &str = "/machine/peripheral/balloon0";

/// One entry of `query-jobs`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct JobInfo {
    pub id: String,
    pub status: String,
    pub error: Option<String>,
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::QmpCapabilities => "qmp_capabilities",
            Command::QueryStatus => "query-status",
            Command::Stop => "stop",
            Command::Cont => "cont",
            Command::SystemPowerdown => "system_powerdown",
            Command::Quit => "quit",
            Command::QueryBlockstats => "query-blockstats",
            Command::SnapshotSave(_) => "snapshot-save",
            Command::SnapshotLoad(_) => "snapshot-load",
            Command::SnapshotDelete(_) => "snapshot-delete",
            Command::QueryJobs => "query-jobs",
            Command::JobDismiss { .. } => "job-dismiss",
            Command::BalloonPollEvery { .. } => "qom-set",
            Command::BalloonStats => "qom-get",
            Command::IgnoreSharedRam => "migrate-set-capabilities",
            Command::Migrate { .. } => "migrate",
            Command::MigrateIncoming { .. } => "migrate-incoming",
            Command::QueryMigrate => "query-migrate",
            Command::QueryCpusFast => "query-cpus-fast",
        }
    }

    fn arguments(&self) -> Option<Value> {
        let value = match self {
            Command::SnapshotSave(job)
            | Command::SnapshotLoad(job)
            | Command::SnapshotDelete(job) => serde_json::to_value(job),
            Command::JobDismiss { id } => Ok(serde_json::json!({ "id": id })),
            Command::BalloonPollEvery { secs } => Ok(serde_json::json!({
                "path": BALLOON, "property": "guest-stats-polling-interval", "value": secs,
            })),
            Command::BalloonStats => Ok(serde_json::json!({
                "path": BALLOON, "property": "guest-stats",
            })),
            Command::IgnoreSharedRam => Ok(serde_json::json!({
                "capabilities": [{ "capability": "x-ignore-shared", "state": true }],
            })),
            Command::Migrate { uri } | Command::MigrateIncoming { uri } => {
                Ok(serde_json::json!({ "uri": uri }))
            }
            _ => return None,
        };
        Some(value.expect("strings and lists of strings always serialize"))
    }

    /// The line sent to QEMU for this command with this id.
    pub fn to_line(&self, id: u64) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            execute: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            arguments: Option<Value>,
            id: u64,
        }
        let mut line = serde_json::to_string(&Wire {
            execute: self.name(),
            arguments: self.arguments(),
            id,
        })
        .expect("a struct of strings, JSON and a number always serializes");
        line.push('\n');
        line
    }
}

/// QEMU's run state, as `query-status` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Created with `-S`, never started.
    Prelaunch,
    Running,
    Paused,
    /// The guest shut down (QEMU stays only with `-no-shutdown`).
    Shutdown,
    GuestPanicked,
    InternalError,
    #[serde(other)]
    Other,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Status {
    pub status: RunState,
    pub running: bool,
}

/// Why QEMU shut the VM down (the `reason` of a `SHUTDOWN` event).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownReason {
    /// The guest powered itself off.
    GuestShutdown,
    /// The guest rebooted and `-no-reboot` turned that into a shutdown.
    GuestReset,
    /// The guest kernel panicked (reported through pvpanic).
    GuestPanic,
    /// `quit` over QMP.
    HostQmpQuit,
    /// `system_reset` over QMP with `-no-reboot`.
    HostQmpSystemReset,
    /// A signal to the QEMU process (SIGTERM, SIGINT).
    HostSignal,
    /// The display window was closed.
    HostUi,
    #[serde(other)]
    Other,
}

/// An asynchronous QMP event that changes or tells about a VM's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// vCPUs stopped (paused, or on the way to shutdown).
    Stop,
    /// vCPUs running again.
    Resume,
    /// The VM is shutting down; QEMU exits next unless `-no-shutdown`.
    Shutdown { guest: bool, reason: ShutdownReason },
    /// The power button was pressed (`system_powerdown`).
    Powerdown,
    /// The VM reset (a reboot).
    Reset { guest: bool },
    /// The guest kernel panicked.
    GuestPanicked { action: String },
    /// The guest's watchdog device fired; `action` is what QEMU does next
    /// (`reset` with `-action watchdog=reset`).
    Watchdog { action: String },
    /// A disk request failed; with `action` `stop`, QEMU paused the VM.
    BlockIoError {
        action: String,
        nospace: bool,
        reason: String,
    },
    /// An event we do not act on, kept by name for the logs.
    Other { name: String },
}

#[derive(Clone, Debug, Deserialize)]
pub struct ErrorBody {
    pub class: String,
    pub desc: String,
}

/// One line from QEMU.
#[derive(Clone, Debug)]
pub enum Message {
    Greeting { version: String },
    Return { id: Option<u64>, value: Value },
    Error { id: Option<u64>, error: ErrorBody },
    Event(Event),
}

/// Parses one line of QMP.
pub fn parse_message(line: &str) -> Result<Message, QmpError> {
    let bad = |why: String| QmpError::Protocol {
        line: line.chars().take(200).collect(),
        why,
    };
    let mut object: serde_json::Map<String, Value> = match serde_json::from_str(line) {
        Ok(Value::Object(object)) => object,
        Ok(_) => return Err(bad("not a JSON object".to_owned())),
        Err(err) => return Err(bad(err.to_string())),
    };
    let id = object.get("id").and_then(Value::as_u64);
    if let Some(greeting) = object.remove("QMP") {
        let qemu = &greeting["version"]["qemu"];
        let version = format!("{}.{}.{}", qemu["major"], qemu["minor"], qemu["micro"]);
        return Ok(Message::Greeting { version });
    }
    if let Some(value) = object.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(error) = object.remove("error") {
        let error = serde_json::from_value(error).map_err(|err| bad(err.to_string()))?;
        return Ok(Message::Error { id, error });
    }
    if let Some(Value::String(name)) = object.remove("event") {
        let data = object.remove("data").unwrap_or(Value::Null);
        return parse_event(name, data)
            .map(Message::Event)
            .map_err(|err| bad(err.to_string()));
    }
    Err(bad("neither greeting, answer nor event".to_owned()))
}

fn parse_event(name: String, data: Value) -> Result<Event, serde_json::Error> {
    #[derive(Deserialize)]
    struct ShutdownData {
        guest: bool,
        reason: ShutdownReason,
    }
    #[derive(Deserialize)]
    struct ResetData {
        guest: bool,
    }
    #[derive(Deserialize)]
    struct IoErrorData {
        action: String,
        #[serde(default)]
        nospace: bool,
        #[serde(default)]
        reason: String,
    }
    #[derive(Deserialize)]
    struct PanicData {
        action: String,
    }
    Ok(match name.as_str() {
        "STOP" => Event::Stop,
        "RESUME" => Event::Resume,
        "POWERDOWN" => Event::Powerdown,
        "SHUTDOWN" => {
            let data: ShutdownData = serde_json::from_value(data)?;
            Event::Shutdown {
                guest: data.guest,
                reason: data.reason,
            }
        }
        "RESET" => Event::Reset {
            guest: serde_json::from_value::<ResetData>(data)?.guest,
        },
        "GUEST_PANICKED" => Event::GuestPanicked {
            action: serde_json::from_value::<PanicData>(data)?.action,
        },
        // Its data is `{"action": …}`, as a panic's.
        "WATCHDOG" => Event::Watchdog {
            action: serde_json::from_value::<PanicData>(data)?.action,
        },
        "BLOCK_IO_ERROR" => {
            let error = serde_json::from_value::<IoErrorData>(data)?;
            Event::BlockIoError {
                action: error.action,
                nospace: error.nospace,
                reason: error.reason,
            }
        }
        _ => Event::Other { name },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines recorded from qemu-system-x86_64 7.2 (Debian 12).
    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;
    const STATUS: &str =
        r#"{"return": {"status": "prelaunch", "singlestep": false, "running": false}, "id": 2}"#;
    const SHUTDOWN: &str = r#"{"timestamp": {"seconds": 1763790000, "microseconds": 12345}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#;
    const PANIC: &str = r#"{"timestamp": {"seconds": 1763790000, "microseconds": 1}, "event": "GUEST_PANICKED", "data": {"action": "poweroff", "info": {"core": 0, "arg1": 0}}}"#;
    const ERROR: &str = r#"{"id": 7, "error": {"class": "CommandNotFound", "desc": "The command frobnicate has not been found"}}"#;

    #[test]
    fn parses_a_watchdog_that_fired() {
        let line = r#"{"timestamp": {"seconds": 1764620000, "microseconds": 5}, "event": "WATCHDOG", "data": {"action": "reset"}}"#;

        assert!(matches!(
            parse_message(line).unwrap(),
            Message::Event(Event::Watchdog { action }) if action == "reset"
        ));
    }

    #[test]
    fn parses_a_disk_error_that_stopped_the_vm() {
        let line = r#"{"timestamp": {"seconds": 1764620000, "microseconds": 5}, "event": "BLOCK_IO_ERROR", "data": {"device": "", "nospace": true, "node-name": "disk0", "reason": "No space left on device", "operation": "write", "action": "stop"}}"#;

        let Message::Event(Event::BlockIoError {
            action,
            nospace,
            reason,
        }) = parse_message(line).unwrap()
        else {
            panic!("not a disk error");
        };

        assert_eq!((action.as_str(), nospace), ("stop", true));
        assert_eq!(reason, "No space left on device");
    }

    #[test]
    fn parses_the_greeting_version() {
        let message = parse_message(GREETING).unwrap();

        assert!(matches!(message, Message::Greeting { version } if version == "7.2.22"));
    }

    #[test]
    fn parses_a_query_status_answer() {
        let Message::Return { id, value } = parse_message(STATUS).unwrap() else {
            panic!("not a return");
        };
        let status: Status = serde_json::from_value(value).unwrap();

        assert_eq!(id, Some(2));
        assert_eq!(status.status, RunState::Prelaunch);
        assert!(!status.running);
    }

    #[test]
    fn parses_a_guest_shutdown_event() {
        let message = parse_message(SHUTDOWN).unwrap();

        assert!(matches!(
            message,
            Message::Event(Event::Shutdown {
                guest: true,
                reason: ShutdownReason::GuestShutdown
            })
        ));
    }

    #[test]
    fn parses_a_guest_panic_event() {
        let message = parse_message(PANIC).unwrap();

        assert!(
            matches!(message, Message::Event(Event::GuestPanicked { action }) if action == "poweroff")
        );
    }

    #[test]
    fn parses_an_error_answer() {
        let Message::Error { id, error } = parse_message(ERROR).unwrap() else {
            panic!("not an error");
        };

        assert_eq!(id, Some(7));
        assert_eq!(error.class, "CommandNotFound");
    }

    #[test]
    fn keeps_unknown_events_by_name() {
        let line = r#"{"event": "NIC_RX_FILTER_CHANGED", "data": {"path": "/x"}, "timestamp": {"seconds": 1, "microseconds": 2}}"#;

        let message = parse_message(line).unwrap();

        assert!(
            matches!(message, Message::Event(Event::Other { name }) if name == "NIC_RX_FILTER_CHANGED")
        );
    }

    #[test]
    fn maps_unknown_shutdown_reasons_to_other() {
        let line =
            r#"{"event": "SHUTDOWN", "data": {"guest": false, "reason": "subsystem-reset"}}"#;

        let message = parse_message(line).unwrap();

        assert!(matches!(
            message,
            Message::Event(Event::Shutdown {
                reason: ShutdownReason::Other,
                ..
            })
        ));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        for line in ["", "[]", "{", "{\"event\": 5}", "{\"error\": {}}", "{}"] {
            assert!(parse_message(line).is_err(), "{line}");
        }
    }

    #[test]
    fn writes_snapshot_jobs_with_their_arguments() {
        let command = Command::SnapshotSave(SnapshotJob {
            job_id: "snap-1".into(),
            tag: "before".into(),
            vmstate: Some("disk0".into()),
            devices: vec!["disk0".into()],
        });

        let sent: Value = serde_json::from_str(&command.to_line(4)).unwrap();

        assert_eq!(
            sent,
            serde_json::json!({
                "execute": "snapshot-save",
                "arguments": {"job-id": "snap-1", "tag": "before", "vmstate": "disk0", "devices": ["disk0"]},
                "id": 4
            })
        );
    }

    #[test]
    fn parses_a_concluded_job_with_its_error() {
        // Recorded from QEMU 7.2 after a failed snapshot-load.
        let line = r#"{"return": [{"current-progress": 1, "status": "concluded", "total-progress": 1, "type": "snapshot-load", "id": "load-1", "error": "Snapshot 'nope' does not exist in one or more devices"}], "id": 9}"#;
        let Message::Return { value, .. } = parse_message(line).unwrap() else {
            panic!("not a return");
        };

        let jobs: Vec<JobInfo> = serde_json::from_value(value).unwrap();

        assert_eq!(jobs[0].status, "concluded");
        assert!(jobs[0].error.as_deref().unwrap().contains("does not exist"));
    }

    #[test]
    fn writes_commands_with_their_id() {
        assert_eq!(
            Command::SystemPowerdown.to_line(3),
            "{\"execute\":\"system_powerdown\",\"id\":3}\n"
        );
    }
}
