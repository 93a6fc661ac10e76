//! Which lifecycle action is legal in which state: the one place the rules
//! live, for the API, the CLI and the restart policy alike.

use quetzal_api::VmState;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    ForceStop,
    Restart,
    Pause,
    Resume,
    Delete,
}

impl Action {
    pub fn verb(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::ForceStop => "force-stop",
            Action::Restart => "restart",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Delete => "delete",
        }
    }
}

/// `Ok` when `action` may be taken on a VM in `state`, else why not.
pub fn check(state: VmState, action: Action) -> Result<(), String> {
    use Action::*;
    use VmState::*;
    let allowed = match action {
        Start => matches!(state, Stopped | Crashed),
        Stop | ForceStop => matches!(state, Running | Paused),
        Restart | Pause => state == Running,
        Resume => state == Paused,
        Delete => matches!(state, Stopped | Crashed),
    };
    if allowed {
        return Ok(());
    }
    let hint = match (action, state) {
        (Delete, Running | Paused) => "; stop it first",
        (Start, Running | Paused) => "; it is already up",
        _ => "",
    };
    Err(format!(
        "cannot {} a VM that is {}{hint}",
        action.verb(),
        state.as_str()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_only_what_is_down() {
        assert!(check(VmState::Stopped, Action::Start).is_ok());
        assert!(check(VmState::Crashed, Action::Start).is_ok());
        assert!(check(VmState::Running, Action::Start).is_err());
        assert!(check(VmState::Paused, Action::Start).is_err());
    }

    #[test]
    fn rejects_resume_of_running_vm() {
        let result = check(VmState::Running, Action::Resume);

        assert_eq!(result, Err("cannot resume a VM that is running".to_owned()));
    }

    #[test]
    fn refuses_to_delete_a_running_vm_and_says_what_to_do() {
        let result = check(VmState::Running, Action::Delete);

        assert_eq!(
            result,
            Err("cannot delete a VM that is running; stop it first".to_owned())
        );
    }

    #[test]
    fn stops_running_and_paused_vms_only() {
        assert!(check(VmState::Running, Action::Stop).is_ok());
        assert!(check(VmState::Paused, Action::ForceStop).is_ok());
        assert!(check(VmState::Stopped, Action::Stop).is_err());
    }

    #[test]
    fn transient_states_allow_nothing() {
        for action in [Action::Start, Action::Stop, Action::Pause, Action::Delete] {
            assert!(check(VmState::Starting, action).is_err());
            assert!(check(VmState::Stopping, action).is_err());
        }
    }
}
