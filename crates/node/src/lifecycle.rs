//! A VM's state machine: one transition function owns every state change
//! — what users ask for, what the node's own work reaches, what the
//! engine reports, what recovery finds — so a new state is one row here,
//! not a hunt through handlers. The node calls [`transition`] before
//! every change it records; a refusal is a 409 for a request and a bug
//! (logged) for anything else.

use quetzal_api::VmState;

/// What moves a VM from one state to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    // What users ask for.
    Start,
    Stop,
    ForceStop,
    /// A stop, then a start.
    Restart,
    Pause,
    Resume,
    /// Leaves the state as it is; the VM's record goes.
    Delete,
    // The node's own work reaching its end.
    /// A `creating` VM's disk is whole.
    Copied,
    /// Its QEMU runs the vCPUs.
    Booted,
    BootFailed,
    /// Its QEMU is gone after a requested stop.
    StopDone,
    // What the engine reports.
    /// QEMU (or the guest, through it) stopped the vCPUs by itself.
    EnginePaused,
    EngineResumed,
    /// The guest powered itself off.
    PoweredOff,
    /// The guest panicked or QEMU died.
    Died,
    // What recovery after a daemon restart finds.
    /// Its QEMU still runs; `paused` says whether its vCPUs are stopped.
    Reattached {
        paused: bool,
    },
    /// Its QEMU is gone (or was ended: it had not run yet).
    Gone,
    // For the cluster: the states exist, nothing moves a VM there yet.
    MigrationStarted,
    MigrationEnded {
        paused: bool,
    },
    /// Its node cannot be reached: what runs there is not known.
    NodeUnreachable,
    /// Its node answers again and says what the VM is.
    NodeBack {
        now: VmState,
    },
}

impl Cause {
    fn verb(self) -> &'static str {
        match self {
            Cause::Start => "start",
            Cause::Stop => "stop",
            Cause::ForceStop => "force-stop",
            Cause::Restart => "restart",
            Cause::Pause => "pause",
            Cause::Resume => "resume",
            Cause::Delete => "delete",
            Cause::MigrationStarted => "migrate",
            _ => "change",
        }
    }
}

/// A transition the state machine does not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot {} a VM that is {}{}", .cause.verb(), .from.as_str(), hint(*.cause, *.from))]
pub struct Refused {
    pub from: VmState,
    pub cause: Cause,
}

fn hint(cause: Cause, from: VmState) -> &'static str {
    use VmState::*;
    match (cause, from) {
        (Cause::Delete, Running | Paused) => "; stop it first",
        (Cause::Start, Running | Paused) => "; it is already up",
        (_, Creating) => "; its disk is still being made",
        _ => "",
    }
}

/// The state a VM in `from` is in after `cause`, or why it cannot be.
pub fn transition(from: VmState, cause: Cause) -> Result<VmState, Refused> {
    use VmState::*;
    let to = match (from, cause) {
        (Stopped | Crashed, Cause::Start) => Starting,
        (Running | Paused, Cause::Stop | Cause::ForceStop) => Stopping,
        (Running, Cause::Restart) => Stopping,
        (Running, Cause::Pause) => Paused,
        (Paused, Cause::Resume) => Running,
        (Stopped | Crashed, Cause::Delete) => from,

        (Creating, Cause::Copied) => Stopped,
        (Starting, Cause::Booted) => Running,
        (Starting, Cause::BootFailed) => Crashed,
        (Stopping, Cause::StopDone) => Stopped,

        (Running | Paused, Cause::EnginePaused) => Paused,
        (Running | Paused, Cause::EngineResumed) => Running,
        (Running | Paused, Cause::PoweredOff) => Stopped,
        (Running | Paused, Cause::Died) => Crashed,
        // Gone while being stopped is what was asked for.
        (Stopping, Cause::PoweredOff | Cause::Died) => Stopped,

        (Running | Paused | Starting, Cause::Reattached { paused }) => {
            if paused {
                Paused
            } else {
                Running
            }
        }
        (Running | Paused | Starting, Cause::Gone) => Crashed,
        (Stopping, Cause::Gone) => Stopped,

        (Running | Paused, Cause::MigrationStarted) => Migrating,
        (Migrating, Cause::MigrationEnded { paused }) => {
            if paused {
                Paused
            } else {
                Running
            }
        }
        (Creating, Cause::NodeUnreachable) => return Err(Refused { from, cause }),
        (_, Cause::NodeUnreachable) => Unknown,
        (Unknown, Cause::NodeBack { now }) => now,
        _ => return Err(Refused { from, cause }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_only_what_is_down() {
        assert_eq!(
            transition(VmState::Stopped, Cause::Start),
            Ok(VmState::Starting)
        );
        assert_eq!(
            transition(VmState::Crashed, Cause::Start),
            Ok(VmState::Starting)
        );
        assert!(transition(VmState::Running, Cause::Start).is_err());
        assert!(transition(VmState::Paused, Cause::Start).is_err());
    }

    #[test]
    fn rejects_resume_of_running_vm() {
        let refused = transition(VmState::Running, Cause::Resume).unwrap_err();

        assert_eq!(refused.to_string(), "cannot resume a VM that is running");
    }

    #[test]
    fn refuses_to_delete_a_running_vm_and_says_what_to_do() {
        let refused = transition(VmState::Running, Cause::Delete).unwrap_err();

        assert_eq!(
            refused.to_string(),
            "cannot delete a VM that is running; stop it first"
        );
    }

    #[test]
    fn stops_running_and_paused_vms_only() {
        assert_eq!(
            transition(VmState::Running, Cause::Stop),
            Ok(VmState::Stopping)
        );
        assert_eq!(
            transition(VmState::Paused, Cause::ForceStop),
            Ok(VmState::Stopping)
        );
        assert!(transition(VmState::Stopped, Cause::Stop).is_err());
    }

    #[test]
    fn transient_states_allow_no_request() {
        for cause in [Cause::Start, Cause::Stop, Cause::Pause, Cause::Delete] {
            for state in [VmState::Starting, VmState::Stopping, VmState::Creating] {
                assert!(transition(state, cause).is_err(), "{state:?} {cause:?}");
            }
        }
    }

    #[test]
    fn a_vm_whose_disk_is_being_copied_says_so() {
        let refused = transition(VmState::Creating, Cause::Start).unwrap_err();

        assert_eq!(
            refused.to_string(),
            "cannot start a VM that is creating; its disk is still being made"
        );
        assert_eq!(
            transition(VmState::Creating, Cause::Copied),
            Ok(VmState::Stopped)
        );
    }

    #[test]
    fn the_engine_pausing_a_running_vm_shows_as_paused_and_back() {
        assert_eq!(
            transition(VmState::Running, Cause::EnginePaused),
            Ok(VmState::Paused)
        );
        assert_eq!(
            transition(VmState::Paused, Cause::EngineResumed),
            Ok(VmState::Running)
        );
        assert!(transition(VmState::Stopped, Cause::EnginePaused).is_err());
    }

    #[test]
    fn an_exit_while_stopping_is_the_stop_and_otherwise_a_crash_or_a_poweroff() {
        assert_eq!(
            transition(VmState::Stopping, Cause::Died),
            Ok(VmState::Stopped)
        );
        assert_eq!(
            transition(VmState::Running, Cause::Died),
            Ok(VmState::Crashed)
        );
        assert_eq!(
            transition(VmState::Paused, Cause::PoweredOff),
            Ok(VmState::Stopped)
        );
    }

    #[test]
    fn recovery_keeps_what_runs_and_marks_what_is_gone() {
        let paused = Cause::Reattached { paused: true };
        assert_eq!(transition(VmState::Starting, paused), Ok(VmState::Paused));
        assert_eq!(
            transition(VmState::Running, Cause::Reattached { paused: false }),
            Ok(VmState::Running)
        );
        assert_eq!(
            transition(VmState::Starting, Cause::Gone),
            Ok(VmState::Crashed)
        );
        assert_eq!(
            transition(VmState::Stopping, Cause::Gone),
            Ok(VmState::Stopped)
        );
        assert!(transition(VmState::Stopped, Cause::Reattached { paused: false }).is_err());
    }

    #[test]
    fn an_unreachable_node_makes_its_vms_unknown_until_it_is_back() {
        assert_eq!(
            transition(VmState::Running, Cause::NodeUnreachable),
            Ok(VmState::Unknown)
        );
        let back = Cause::NodeBack {
            now: VmState::Stopped,
        };
        assert_eq!(transition(VmState::Unknown, back), Ok(VmState::Stopped));
        assert!(transition(VmState::Unknown, Cause::Start).is_err());
    }

    #[test]
    fn a_migration_leaves_a_vm_as_it_found_it() {
        assert_eq!(
            transition(VmState::Running, Cause::MigrationStarted),
            Ok(VmState::Migrating)
        );
        let ended = Cause::MigrationEnded { paused: false };
        assert_eq!(transition(VmState::Migrating, ended), Ok(VmState::Running));
        assert!(transition(VmState::Migrating, Cause::Stop).is_err());
    }
}
