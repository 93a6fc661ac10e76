//! What the node does inside a running guest through its agent: the
//! agent's state for the API, and commands run with `guest-exec`.

use std::time::{Duration, Instant};

use quetzal_api::{Agent, Exec, ExecResult, Vm};
use serde_json::{Value, json};

use super::{Node, NodeError, VmError};
use crate::agent::AgentError;

/// How long a command may run by default, and at most.
pub const DEFAULT_EXEC_SECS: u64 = 30;
pub const MAX_EXEC_SECS: u64 = 3600;
/// How long one agent call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl Node {
    /// `vm` with its agent's state, while it runs.
    pub(super) fn with_agent(&self, mut vm: Vm) -> Vm {
        let slot = self
            .slots
            .lock()
            .expect("never poisoned: no panics while held")
            .get(&vm.name)
            .cloned();
        vm.agent = slot
            .and_then(|slot| slot.live())
            .and_then(|live| live.agent.as_ref().map(|agent| agent.status()))
            .map(|status| Agent {
                connected: status.connected,
                version: status.version,
                last_contact_at: status.last_contact_at,
            });
        vm
    }

    /// Runs a command in VM `name`'s guest and waits for it to end.
    pub async fn exec(&self, name: &str, request: Exec) -> Result<ExecResult, NodeError> {
        let timeout_secs = request.timeout_secs.unwrap_or(DEFAULT_EXEC_SECS);
        if !(1..=MAX_EXEC_SECS).contains(&timeout_secs) {
            return Err(VmError::Invalid {
                reason: format!("timeout_secs must be 1 to {MAX_EXEC_SECS}, not {timeout_secs}"),
            }
            .into());
        }
        if request.command.is_empty() {
            return Err(VmError::Invalid {
                reason: "command is empty".into(),
            }
            .into());
        }
        if request
            .stdin_b64
            .as_deref()
            .is_some_and(|stdin| quetzal_qga::decode(stdin).is_none())
        {
            return Err(VmError::Invalid {
                reason: "stdin_b64 is not base64".into(),
            }
            .into());
        }
        // An unknown VM is a 404, before anything about its agent.
        self.record(name)?;
        let agent_error = |source| NodeError::Agent {
            vm: name.to_owned(),
            source,
        };
        let live = self
            .slot(name)
            .live()
            .ok_or_else(|| agent_error(AgentError::Unavailable))?;
        let agent = live
            .agent
            .as_ref()
            .ok_or_else(|| agent_error(AgentError::Unavailable))?;
        let mut arguments = json!({
            "path": request.command,
            "arg": request.args,
            "capture-output": true,
        });
        if let Some(stdin) = request.stdin_b64 {
            arguments["input-data"] = json!(stdin);
        }
        let started = agent
            .call("guest-exec", arguments, CALL_TIMEOUT)
            .await
            .map_err(agent_error)?;
        let pid = started.get("pid").and_then(Value::as_u64).ok_or_else(|| {
            agent_error(AgentError::Garbled {
                command: "guest-exec".into(),
                why: "no pid".into(),
            })
        })?;
        let deadline = Instant::now() + Duration::from_secs(timeout_secs);
        let mut pause = Duration::from_millis(20);
        loop {
            let status = agent
                .call("guest-exec-status", json!({ "pid": pid }), CALL_TIMEOUT)
                .await
                .map_err(agent_error)?;
            if status.get("exited").and_then(Value::as_bool) == Some(true) {
                return result(&status).map_err(agent_error);
            }
            if Instant::now() >= deadline {
                return Err(agent_error(AgentError::Timeout {
                    command: "the command".into(),
                    timeout: Duration::from_secs(timeout_secs),
                }));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }
}

/// An exec's end from `guest-exec-status`, with its output bounded.
fn result(status: &Value) -> Result<ExecResult, AgentError> {
    const KEEP: usize = 1 << 20;
    let garbled = |why: &str| AgentError::Garbled {
        command: "guest-exec-status".into(),
        why: why.into(),
    };
    let output = |key: &str| -> Result<(Vec<u8>, bool), AgentError> {
        let mut bytes = match status.get(key).and_then(Value::as_str) {
            Some(text) => {
                quetzal_qga::decode(text).ok_or_else(|| garbled("output is not base64"))?
            }
            None => Vec::new(),
        };
        let cut = bytes.len() > KEEP;
        bytes.truncate(KEEP);
        Ok((bytes, cut))
    };
    let (stdout, cut_out) = output("out-data")?;
    let (stderr, cut_err) = output("err-data")?;
    let flagged = |key: &str| status.get(key).and_then(Value::as_bool) == Some(true);
    let number = |key: &str| {
        status
            .get(key)
            .and_then(Value::as_i64)
            .and_then(|n| i32::try_from(n).ok())
    };
    Ok(ExecResult {
        exit_code: number("exitcode"),
        signal: number("signal"),
        stdout_b64: quetzal_qga::encode(&stdout),
        stderr_b64: quetzal_qga::encode(&stderr),
        truncated: cut_out || cut_err || flagged("out-truncated") || flagged("err-truncated"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_is_read_with_its_output_and_garbage_is_refused() {
        let status =
            json!({"exited": true, "exitcode": 3, "out-data": "aGkK", "err-truncated": true});
        let ended = result(&status).unwrap();
        assert_eq!(ended.exit_code, Some(3));
        assert_eq!(quetzal_qga::decode(&ended.stdout_b64).unwrap(), b"hi\n");
        assert!(ended.truncated);

        let killed = result(&json!({"exited": true, "signal": 9})).unwrap();
        assert_eq!((killed.exit_code, killed.signal), (None, Some(9)));

        assert!(result(&json!({"exited": true, "out-data": "!!"})).is_err());
    }
}
