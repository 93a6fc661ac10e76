//! What the node does inside a running guest through its agent: the
//! agent's state for the API, and commands run with `guest-exec`.

use std::time::{Duration, Instant};

use quetzal_api::{Agent, Exec, ExecResult, Reidentified, ReidentifyStep, Vm};
use serde_json::{Value, json};

use super::{Node, NodeError, VmError};
use crate::agent::{AgentError, AgentLink};
use crate::supervisor::Live;

/// How long a command may run by default, and at most.
pub const DEFAULT_EXEC_SECS: u64 = 30;
pub const MAX_EXEC_SECS: u64 = 3600;
/// The most text a clipboard carries either way (what an exec keeps of
/// its output).
pub const MAX_CLIPBOARD_BYTES: usize = 1 << 20;
/// How long reading or setting a guest's clipboard may take.
const CLIPBOARD_SECS: u64 = 10;
/// How long one agent call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a re-identification may take (new SSH host keys and a DHCP
/// renew, in a guest under TCG).
const REIDENTIFY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running guest's memory as it counts it: its agent's telemetry
/// where that is fresh, else its balloon driver's statistics.
pub(super) fn guest_memory(live: &crate::supervisor::Live) -> Option<quetzal_api::GuestMemory> {
    let now = crate::store::now_millis();
    let port = live.port.as_ref().map(|port| port.status());
    if let Some(telemetry) = port.as_ref().and_then(|port| port.fresh(now)) {
        return Some(quetzal_api::GuestMemory {
            used_bytes: telemetry.memory_used_bytes,
            total_bytes: telemetry.memory_total_bytes,
            source: "agent".to_owned(),
        });
    }
    let (total, used) = live.balloon_memory()?;
    Some(quetzal_api::GuestMemory {
        used_bytes: used,
        total_bytes: total,
        source: "balloon".to_owned(),
    })
}

impl Node {
    /// `vm` with its agent's state, while it runs; the addresses the
    /// agent reports replace the leases' (a guest may have more, or a
    /// static one).
    pub(super) fn with_agent(&self, mut vm: Vm) -> Vm {
        let slot = self
            .slots
            .lock()
            .expect("never poisoned: no panics while held")
            .get(&vm.name)
            .cloned();
        let live = slot.and_then(|slot| slot.live());
        let status = live
            .as_ref()
            .and_then(|live| live.agent.as_ref().map(|agent| agent.status()));
        let port = live
            .as_ref()
            .and_then(|live| live.port.as_ref().map(|port| port.status()))
            .unwrap_or_default();
        let telemetry = port.fresh(crate::store::now_millis()).cloned();
        vm.guest_memory = live.as_deref().and_then(guest_memory);
        vm.generation_id = live.as_ref().and_then(|live| live.generation_id.clone());
        if let Some(status) = status {
            // A user-mode NIC's address is reachable from nowhere: none is
            // shown, whatever the guest says.
            if status.connected && !status.addresses.is_empty() && vm.network != super::USER_NETWORK
            {
                vm.addresses = status.addresses;
            }
            vm.agent = Some(Agent {
                connected: status.connected,
                version: status.version,
                last_contact_at: status.last_contact_at,
                os: status.os,
                hostname: status.hostname,
                // The port's telemetry is the fresher (every 5 s).
                filesystems: match &telemetry {
                    Some(telemetry) => telemetry
                        .filesystems
                        .iter()
                        .map(|fs| quetzal_api::GuestFilesystem {
                            mountpoint: fs.mountpoint.clone(),
                            fs_type: fs.fs_type.clone(),
                            used_bytes: fs.used_bytes,
                            total_bytes: fs.total_bytes,
                        })
                        .collect(),
                    None => status.filesystems,
                },
                load: telemetry.as_ref().map(|telemetry| telemetry.load),
                port_connected: port.connected,
            });
        }
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
        let mut arguments = json!({
            "path": request.command,
            "arg": request.args,
            "capture-output": true,
        });
        if let Some(stdin) = request.stdin_b64 {
            arguments["input-data"] = json!(stdin);
        }
        let timeout = Duration::from_secs(timeout_secs);
        self.through_agent(name, async |agent| {
            let started = agent.call("guest-exec", arguments, CALL_TIMEOUT).await?;
            let pid =
                started
                    .get("pid")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| AgentError::Garbled {
                        command: "guest-exec".into(),
                        why: "no pid".into(),
                    })?;
            let deadline = Instant::now() + timeout;
            let mut pause = Duration::from_millis(5);
            loop {
                let status = agent
                    .call("guest-exec-status", json!({ "pid": pid }), CALL_TIMEOUT)
                    .await?;
                if status.get("exited").and_then(Value::as_bool) == Some(true) {
                    return result(&status);
                }
                if Instant::now() >= deadline {
                    return Err(AgentError::Timeout {
                        command: "the command".into(),
                        timeout,
                    });
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(250));
            }
        })
        .await
    }

    /// The text on VM `name`'s desktop clipboard, through its agent and
    /// the guest's `quetzal-clipboard` (the desktop image has it).
    pub async fn clipboard(&self, name: &str) -> Result<String, NodeError> {
        let out = self.run_clipboard(name, "get", None).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Puts `text` on VM `name`'s desktop clipboard, for its user to paste.
    pub async fn set_clipboard(&self, name: &str, text: &str) -> Result<(), NodeError> {
        if text.len() > MAX_CLIPBOARD_BYTES {
            return Err(VmError::Invalid {
                reason: format!(
                    "clipboard text is {} bytes; at most {MAX_CLIPBOARD_BYTES}",
                    text.len()
                ),
            }
            .into());
        }
        self.run_clipboard(name, "set", Some(text.as_bytes()))
            .await
            .map(drop)
    }

    async fn run_clipboard(
        &self,
        name: &str,
        verb: &str,
        stdin: Option<&[u8]>,
    ) -> Result<Vec<u8>, NodeError> {
        // 127 when the guest has no helper: a guest without a desktop.
        let script = "command -v quetzal-clipboard >/dev/null || exit 127; \
                      exec quetzal-clipboard \"$1\"";
        let done = self
            .exec(
                name,
                Exec {
                    command: "/bin/sh".into(),
                    args: vec!["-c".into(), script.into(), "sh".into(), verb.into()],
                    stdin_b64: stdin.map(quetzal_qga::encode),
                    timeout_secs: Some(CLIPBOARD_SECS),
                },
            )
            .await?;
        let decode = |b64: &str| quetzal_qga::decode(b64).unwrap_or_default();
        match done.exit_code {
            Some(0) => Ok(decode(&done.stdout_b64)),
            Some(127) => Err(VmError::NoClipboard {
                name: name.to_owned(),
                why: "its guest has no quetzal-clipboard (the desktop image has one)".into(),
            }
            .into()),
            _ => {
                let stderr = decode(&done.stderr_b64);
                let why = String::from_utf8_lossy(&stderr);
                let why = why.lines().next().unwrap_or("quetzal-clipboard failed");
                Err(VmError::NoClipboard {
                    name: name.to_owned(),
                    why: why.chars().take(200).collect(),
                }
                .into())
            }
        }
    }

    /// Makes VM `name`'s guest a new machine through quetzal-agent's port
    /// (the clone hook): the host's time, a new machine-id, the VM's name
    /// as its host name, new SSH host keys, a DHCP renew. A guest with
    /// only a stock agent has no port: `agent_unavailable`.
    pub async fn reidentify(&self, name: &str) -> Result<Reidentified, NodeError> {
        let record = self.record(name)?;
        let live = self.slot(name).live();
        let answer = match live.as_ref().and_then(|live| live.port.as_ref()) {
            Some(port) => {
                port.reidentify(name, Some(&record.mac), REIDENTIFY_TIMEOUT)
                    .await
            }
            None => Err(AgentError::Unavailable),
        };
        let answer = answer.map_err(|source| NodeError::Agent {
            vm: name.to_owned(),
            source,
        })?;
        let steps: Vec<ReidentifyStep> = answer
            .steps
            .into_iter()
            .map(|step| ReidentifyStep {
                step: step.step,
                outcome: step.outcome,
            })
            .collect();
        let summary: Vec<String> = steps
            .iter()
            .map(|s| format!("{} {}", s.step, s.outcome))
            .collect();
        tracing::info!(vm = %name, steps = %summary.join(", "), "guest re-identified");
        Ok(Reidentified { steps })
    }

    /// Waits until running VM `name`'s guest agent is connected (the
    /// guest is up), at most `timeout`.
    pub(super) async fn guest_ready(
        &self,
        name: &str,
        live: &Live,
        timeout: Duration,
    ) -> Result<(), NodeError> {
        let failed = |source| NodeError::Agent {
            vm: name.to_owned(),
            source,
        };
        let agent = live
            .agent
            .as_ref()
            .ok_or_else(|| failed(AgentError::Unavailable))?;
        let deadline = Instant::now() + timeout;
        while !agent.status().connected {
            if Instant::now() >= deadline {
                return Err(failed(AgentError::Timeout {
                    command: "connecting".to_owned(),
                    timeout,
                }));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Waits until VM `name`'s Quetzal port is connected, then runs the
    /// clone hook there (an instant clone's first minutes: a new MAC,
    /// machine-id, name, SSH host keys, lease, clock).
    pub(super) async fn clone_hook(
        &self,
        name: &str,
        live: &Live,
        mac: &str,
    ) -> Result<Reidentified, NodeError> {
        let failed = |source| NodeError::Agent {
            vm: name.to_owned(),
            source,
        };
        let port = live
            .port
            .as_ref()
            .ok_or_else(|| failed(AgentError::Unavailable))?;
        let deadline = Instant::now() + REIDENTIFY_TIMEOUT;
        while !port.status().connected {
            if Instant::now() >= deadline {
                return Err(failed(AgentError::Timeout {
                    command: "connecting".to_owned(),
                    timeout: REIDENTIFY_TIMEOUT,
                }));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let answer = port
            .reidentify(name, Some(mac), REIDENTIFY_TIMEOUT)
            .await
            .map_err(failed)?;
        Ok(Reidentified {
            steps: answer
                .steps
                .into_iter()
                .map(|step| ReidentifyStep {
                    step: step.step,
                    outcome: step.outcome,
                })
                .collect(),
        })
    }

    /// Runs `work` with running VM `name`'s agent link; an unknown VM is
    /// a 404 before anything about its agent, a VM with none to talk to
    /// `agent_unavailable`.
    async fn through_agent<T>(
        &self,
        name: &str,
        work: impl AsyncFnOnce(&AgentLink) -> Result<T, AgentError>,
    ) -> Result<T, NodeError> {
        self.record(name)?;
        let live = self.slot(name).live();
        let result = match live.as_ref().and_then(|live| live.agent.as_ref()) {
            Some(agent) => work(agent).await,
            None => Err(AgentError::Unavailable),
        };
        result.map_err(|source| NodeError::Agent {
            vm: name.to_owned(),
            source,
        })
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

/// The largest file copied into or out of a guest.
pub const MAX_FILE: usize = 64 << 20;
/// Bytes per `guest-file-read`/`-write` (1 MiB: 1.4 MiB of base64, well
/// inside a message's bound).
const CHUNK: usize = 1 << 20;

impl Node {
    /// Writes `bytes` to `path` in VM `name`'s guest (made or replaced).
    pub async fn write_file(&self, name: &str, path: &str, bytes: &[u8]) -> Result<(), NodeError> {
        check_guest_path(path)?;
        self.through_agent(name, async |agent| {
            with_file(agent, path, "w", async |handle| {
                for chunk in bytes.chunks(CHUNK) {
                    let data = quetzal_qga::encode(chunk);
                    let write = json!({ "handle": handle, "buf-b64": data });
                    agent.call("guest-file-write", write, CALL_TIMEOUT).await?;
                }
                Ok(())
            })
            .await
        })
        .await
    }

    /// Reads `path` from VM `name`'s guest, at most [`MAX_FILE`] bytes.
    pub async fn read_file(&self, name: &str, path: &str) -> Result<Vec<u8>, NodeError> {
        check_guest_path(path)?;
        self.through_agent(name, async |agent| {
            with_file(agent, path, "r", async |handle| {
                let mut bytes = Vec::new();
                loop {
                    let read = json!({ "handle": handle, "count": CHUNK });
                    let chunk = agent.call("guest-file-read", read, CALL_TIMEOUT).await?;
                    let data = chunk
                        .get("buf-b64")
                        .and_then(Value::as_str)
                        .and_then(quetzal_qga::decode)
                        .ok_or_else(|| AgentError::Garbled {
                            command: "guest-file-read".into(),
                            why: "no base64 data".into(),
                        })?;
                    if bytes.len() + data.len() > MAX_FILE {
                        return Err(AgentError::Refused {
                            command: "guest-file-read".into(),
                            desc: format!("the file is larger than {} MiB", MAX_FILE >> 20),
                        });
                    }
                    let done =
                        data.is_empty() || chunk.get("eof").and_then(Value::as_bool) == Some(true);
                    bytes.extend(data);
                    if done {
                        return Ok(bytes);
                    }
                }
            })
            .await
        })
        .await
    }
}

/// Opens `path` in the guest with `mode`, runs `work` on the handle, and
/// closes it on every path (the agent keeps few files open).
async fn with_file<T>(
    agent: &AgentLink,
    path: &str,
    mode: &str,
    work: impl AsyncFnOnce(&Value) -> Result<T, AgentError>,
) -> Result<T, AgentError> {
    let open = json!({ "path": path, "mode": mode });
    let handle = agent.call("guest-file-open", open, CALL_TIMEOUT).await?;
    let done = work(&handle).await;
    let closed = agent
        .call(
            "guest-file-close",
            json!({ "handle": handle }),
            CALL_TIMEOUT,
        )
        .await;
    let done = done?;
    closed?;
    Ok(done)
}

fn check_guest_path(path: &str) -> Result<(), NodeError> {
    if !path.starts_with('/') || path.len() > 4096 || path.contains('\0') {
        return Err(VmError::Invalid {
            reason: format!("a guest path is absolute and at most 4096 bytes, not '{path}'"),
        }
        .into());
    }
    Ok(())
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
