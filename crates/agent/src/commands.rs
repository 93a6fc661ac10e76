//! The QGA commands the agent answers, with QEMU guest agent's names,
//! arguments and answers, so the host speaks to it exactly as to stock
//! `qemu-guest-agent`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

/// How much of an exec's stdout and of its stderr is kept (QGA reports
/// the rest as truncated).
pub const MAX_OUTPUT: usize = 1 << 20;
/// How many exec'd processes are tracked at once (a host that never asks
/// for their status cannot make the agent hold more).
const MAX_PROCESSES: usize = 64;
/// How many files may be open at once, and the largest read.
const MAX_FILES: usize = 16;
const MAX_READ: usize = 1 << 20;

const COMMANDS: &[&str] = &[
    "guest-ping",
    "guest-sync",
    "guest-sync-delimited",
    "guest-info",
    "guest-exec",
    "guest-exec-status",
    "guest-get-osinfo",
    "guest-get-host-name",
    "guest-network-get-interfaces",
    "guest-file-open",
    "guest-file-read",
    "guest-file-write",
    "guest-file-close",
    "guest-shutdown",
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-thaw",
    "guest-fsfreeze-status",
    "guest-get-fsinfo",
    "guest-set-time",
];

/// Output of a process, as much as is kept, and whether more came.
#[derive(Debug, Default)]
struct Captured {
    bytes: Vec<u8>,
    truncated: bool,
}

#[derive(Debug)]
struct Process {
    child: Child,
    stdout: Arc<Mutex<Captured>>,
    stderr: Arc<Mutex<Captured>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
pub struct Agent {
    processes: HashMap<u32, Process>,
    files: HashMap<u64, std::fs::File>,
    next_handle: u64,
    freezer: crate::filesystems::Freezer,
}

type Answer = Result<Value, (&'static str, String)>;

fn generic(desc: impl Into<String>) -> (&'static str, String) {
    ("GenericError", desc.into())
}

fn argument<'a>(args: &'a Value, name: &str) -> Result<&'a Value, (&'static str, String)> {
    args.get(name)
        .ok_or_else(|| ("InvalidParameter", format!("missing argument '{name}'")))
}

impl Agent {
    /// The bytes to answer `object` with; none for commands QGA answers
    /// with silence (a shutdown) or input that is not a command.
    pub fn handle(&mut self, object: &[u8]) -> Option<Vec<u8>> {
        let Ok(request) = serde_json::from_slice::<Value>(object) else {
            return Some(line(&quetzal_qga::error("GenericError", "invalid JSON")));
        };
        let Some(name) = request.get("execute").and_then(Value::as_str) else {
            return Some(line(&quetzal_qga::error(
                "GenericError",
                "a command is {\"execute\": NAME, \"arguments\": {...}}",
            )));
        };
        let args = request.get("arguments").cloned().unwrap_or(json!({}));
        if name == "guest-shutdown" {
            self.shutdown(&args);
            return None;
        }
        let answer = self.run(name, &args);
        let mut bytes = Vec::new();
        if name == "guest-sync-delimited" {
            bytes.push(quetzal_qga::SYNC_DELIMITER);
        }
        let value = match answer {
            Ok(value) => json!({ "return": value }),
            Err((class, desc)) => quetzal_qga::error(class, &desc),
        };
        bytes.extend(line(&value));
        Some(bytes)
    }

    fn run(&mut self, name: &str, args: &Value) -> Answer {
        match name {
            "guest-ping" => Ok(json!({})),
            "guest-sync" | "guest-sync-delimited" => Ok(argument(args, "id")?.clone()),
            "guest-info" => Ok(info()),
            "guest-exec" => self.exec(args),
            "guest-exec-status" => self.exec_status(args),
            "guest-get-osinfo" => Ok(osinfo()),
            "guest-get-host-name" => Ok(json!({ "host-name": hostname() })),
            "guest-network-get-interfaces" => Ok(interfaces()),
            "guest-file-open" => self.file_open(args),
            "guest-file-read" => self.file_read(args),
            "guest-file-write" => self.file_write(args),
            "guest-file-close" => self.file_close(args),
            "guest-fsfreeze-freeze" => self.freezer.freeze().map(|n| json!(n)).map_err(generic),
            "guest-fsfreeze-thaw" => Ok(json!(self.freezer.thaw())),
            "guest-fsfreeze-status" => Ok(json!(self.freezer.status())),
            "guest-get-fsinfo" => Ok(crate::filesystems::fsinfo()),
            "guest-set-time" => set_time(args),
            other => Err((
                "CommandNotFound",
                format!("The command {other} has not been found"),
            )),
        }
    }

    fn exec(&mut self, args: &Value) -> Answer {
        let path = argument(args, "path")?
            .as_str()
            .ok_or_else(|| generic("'path' is a string"))?;
        let argv: Vec<String> = match args.get("arg") {
            None => vec![],
            Some(list) => list
                .as_array()
                .ok_or_else(|| generic("'arg' is a list of strings"))?
                .iter()
                .map(|a| a.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| generic("'arg' is a list of strings"))?,
        };
        let capture = args
            .get("capture-output")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let input = match args.get("input-data").and_then(Value::as_str) {
            Some(text) => Some(
                quetzal_qga::decode(text).ok_or_else(|| generic("'input-data' is not base64"))?,
            ),
            None => None,
        };
        if self.processes.len() >= MAX_PROCESSES {
            return Err(generic(format!(
                "{MAX_PROCESSES} processes are waiting for their status to be read"
            )));
        }
        let output = || {
            if capture {
                Stdio::piped()
            } else {
                Stdio::null()
            }
        };
        let mut child = Command::new(path)
            .args(&argv)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(output())
            .stderr(output())
            .spawn()
            .map_err(|err| generic(format!("cannot run {path}: {err}")))?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            std::thread::spawn(move || {
                let _ = stdin.write_all(&input);
            });
        }
        let stdout = Arc::new(Mutex::new(Captured::default()));
        let stderr = Arc::new(Mutex::new(Captured::default()));
        let mut readers = Vec::new();
        if let Some(pipe) = child.stdout.take() {
            readers.push(capture_into(pipe, Arc::clone(&stdout)));
        }
        if let Some(pipe) = child.stderr.take() {
            readers.push(capture_into(pipe, Arc::clone(&stderr)));
        }
        let pid = child.id();
        self.processes.insert(
            pid,
            Process {
                child,
                stdout,
                stderr,
                readers,
            },
        );
        Ok(json!({ "pid": pid }))
    }

    fn exec_status(&mut self, args: &Value) -> Answer {
        let pid = argument(args, "pid")?
            .as_u64()
            .and_then(|pid| u32::try_from(pid).ok())
            .ok_or_else(|| generic("'pid' is a process id"))?;
        let process = self
            .processes
            .get_mut(&pid)
            .ok_or_else(|| generic(format!("no process {pid} was started by the agent")))?;
        let status = process
            .child
            .try_wait()
            .map_err(|err| generic(format!("process {pid}: {err}")))?;
        let Some(status) = status else {
            return Ok(json!({ "exited": false }));
        };
        let Some(process) = self.processes.remove(&pid) else {
            return Err(generic("the process went away"));
        };
        for reader in process.readers {
            let _ = reader.join();
        }
        let mut answer = json!({ "exited": true });
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => answer["exitcode"] = json!(code),
            (None, Some(signal)) => answer["signal"] = json!(signal),
            (None, None) => {}
        }
        for (key, captured) in [("out", &process.stdout), ("err", &process.stderr)] {
            let captured = captured.lock().map_err(|_| generic("a reader failed"))?;
            answer[format!("{key}-data")] = json!(quetzal_qga::encode(&captured.bytes));
            if captured.truncated {
                answer[format!("{key}-truncated")] = json!(true);
            }
        }
        Ok(answer)
    }

    fn file_open(&mut self, args: &Value) -> Answer {
        let path = argument(args, "path")?
            .as_str()
            .ok_or_else(|| generic("'path' is a string"))?;
        let mode = args.get("mode").and_then(Value::as_str).unwrap_or("r");
        if self.files.len() >= MAX_FILES {
            return Err(generic(format!("{MAX_FILES} files are open already")));
        }
        let mut options = std::fs::OpenOptions::new();
        match mode.trim_end_matches('b') {
            "r" => options.read(true),
            "r+" => options.read(true).write(true),
            "w" => options.write(true).create(true).truncate(true),
            "w+" => options.read(true).write(true).create(true).truncate(true),
            "a" => options.append(true).create(true),
            "a+" => options.read(true).append(true).create(true),
            other => return Err(generic(format!("unknown mode '{other}'"))),
        };
        let file = options
            .open(path)
            .map_err(|err| generic(format!("cannot open {path}: {err}")))?;
        self.next_handle += 1;
        self.files.insert(self.next_handle, file);
        Ok(json!(self.next_handle))
    }

    fn file(&mut self, args: &Value) -> Result<(u64, &mut std::fs::File), (&'static str, String)> {
        let handle = argument(args, "handle")?
            .as_u64()
            .ok_or_else(|| generic("'handle' is a number"))?;
        let file = self
            .files
            .get_mut(&handle)
            .ok_or_else(|| generic(format!("no open file {handle}")))?;
        Ok((handle, file))
    }

    fn file_read(&mut self, args: &Value) -> Answer {
        let count = args
            .get("count")
            .and_then(Value::as_u64)
            .map_or(4096, |c| usize::try_from(c).unwrap_or(MAX_READ))
            .min(MAX_READ);
        let (_, file) = self.file(args)?;
        let mut bytes = vec![0u8; count];
        let mut filled = 0;
        while filled < count {
            match file.read(&mut bytes[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(err) => return Err(generic(format!("read: {err}"))),
            }
        }
        bytes.truncate(filled);
        Ok(json!({
            "count": filled,
            "buf-b64": quetzal_qga::encode(&bytes),
            "eof": filled < count,
        }))
    }

    fn file_write(&mut self, args: &Value) -> Answer {
        let data = argument(args, "buf-b64")?
            .as_str()
            .and_then(quetzal_qga::decode)
            .ok_or_else(|| generic("'buf-b64' is base64"))?;
        let (_, file) = self.file(args)?;
        file.write_all(&data)
            .map_err(|err| generic(format!("write: {err}")))?;
        Ok(json!({ "count": data.len(), "eof": false }))
    }

    fn file_close(&mut self, args: &Value) -> Answer {
        let (handle, file) = self.file(args)?;
        file.sync_all()
            .map_err(|err| generic(format!("sync: {err}")))?;
        self.files.remove(&handle);
        Ok(json!({}))
    }

    fn shutdown(&mut self, args: &Value) {
        let program = match args.get("mode").and_then(Value::as_str) {
            Some("reboot") => "reboot",
            Some("halt") => "halt",
            _ => "poweroff",
        };
        let _ = Command::new(program).spawn();
    }
}

/// `guest-set-time`: the clock set to `time` (nanoseconds since the
/// epoch), or, without it, to the hardware clock (the RTC, as QGA does).
fn set_time(args: &Value) -> Answer {
    let unix_ms = match args.get("time") {
        Some(time) => {
            let nanos = time
                .as_i64()
                .ok_or_else(|| ("InvalidParameter", "'time' is not an integer".to_owned()))?;
            nanos / 1_000_000
        }
        None => {
            let rtc = std::fs::read_to_string("/sys/class/rtc/rtc0/since_epoch")
                .map_err(|err| generic(format!("no hardware clock to read: {err}")))?;
            let secs: i64 = rtc
                .trim()
                .parse()
                .map_err(|_| generic("the hardware clock says no time"))?;
            secs * 1000
        }
    };
    crate::identity::set_clock(unix_ms).map_err(generic)?;
    Ok(json!({}))
}

fn capture_into(
    mut pipe: impl Read + Send + 'static,
    into: Arc<Mutex<Captured>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match pipe.read(&mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let Ok(mut captured) = into.lock() else {
                        return;
                    };
                    let room = MAX_OUTPUT.saturating_sub(captured.bytes.len());
                    let kept = n.min(room);
                    captured.bytes.extend_from_slice(&buffer[..kept]);
                    if kept < n {
                        captured.truncated = true;
                    }
                }
            }
        }
    })
}

fn line(value: &Value) -> Vec<u8> {
    let mut bytes = value.to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

fn info() -> Value {
    let commands: Vec<Value> = COMMANDS
        .iter()
        .map(|name| json!({ "name": name, "enabled": true, "success-response": *name != "guest-shutdown" }))
        .collect();
    json!({
        "version": format!("quetzal-agent {}", env!("CARGO_PKG_VERSION")),
        "supported_commands": commands,
    })
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_default()
}

fn osinfo() -> Value {
    let uname = nix::sys::utsname::uname().ok();
    let field = |f: fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr| {
        uname
            .as_ref()
            .map(|u| f(u).to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut answer = json!({
        "kernel-release": field(nix::sys::utsname::UtsName::release),
        "kernel-version": field(nix::sys::utsname::UtsName::version),
        "machine": field(nix::sys::utsname::UtsName::machine),
    });
    let release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    for line in release.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim_matches('"');
        let name = match key {
            "ID" => "id",
            "NAME" => "name",
            "PRETTY_NAME" => "pretty-name",
            "VERSION" => "version",
            "VERSION_ID" => "version-id",
            _ => continue,
        };
        answer[name] = json!(value);
    }
    if answer.get("id").is_none() {
        answer["id"] = json!("linux");
        answer["name"] = json!("Linux");
    }
    answer
}

fn interfaces() -> Value {
    let mut by_name: Vec<(String, Value)> = Vec::new();
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return json!([]);
    };
    for entry in addresses {
        let index = match by_name
            .iter()
            .position(|(name, _)| *name == entry.interface_name)
        {
            Some(index) => index,
            None => {
                by_name.push((
                    entry.interface_name.clone(),
                    json!({ "name": entry.interface_name, "ip-addresses": [] }),
                ));
                by_name.len() - 1
            }
        };
        let interface = &mut by_name[index].1;
        let Some(address) = entry.address else {
            continue;
        };
        if let Some(link) = address.as_link_addr()
            && let Some(mac) = link.addr()
        {
            let text: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
            interface["hardware-address"] = json!(text.join(":"));
        }
        let prefix = |mask: Option<nix::sys::socket::SockaddrStorage>, v4: bool| -> u32 {
            mask.and_then(|m| {
                if v4 {
                    m.as_sockaddr_in().map(|s| s.ip().to_bits().count_ones())
                } else {
                    m.as_sockaddr_in6().map(|s| s.ip().to_bits().count_ones())
                }
            })
            .unwrap_or(0)
        };
        let ip = if let Some(v4) = address.as_sockaddr_in() {
            Some(
                json!({ "ip-address-type": "ipv4", "ip-address": v4.ip().to_string(), "prefix": prefix(entry.netmask, true) }),
            )
        } else {
            address.as_sockaddr_in6().map(|v6| {
                json!({ "ip-address-type": "ipv6", "ip-address": v6.ip().to_string(), "prefix": prefix(entry.netmask, false) })
            })
        };
        if let (Some(ip), Some(list)) = (ip, interface["ip-addresses"].as_array_mut()) {
            list.push(ip);
        }
    }
    Value::Array(by_name.into_iter().map(|(_, v)| v).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ask(agent: &mut Agent, request: Value) -> Value {
        let bytes = agent.handle(request.to_string().as_bytes()).unwrap();
        let bytes = bytes
            .strip_prefix(&[quetzal_qga::SYNC_DELIMITER])
            .unwrap_or(&bytes);
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn a_delimited_sync_answers_the_id_after_the_delimiter() {
        let mut agent = Agent::default();
        let bytes = agent
            .handle(br#"{"execute":"guest-sync-delimited","arguments":{"id":42}}"#)
            .unwrap();

        assert_eq!(bytes[0], 0xFF);
        assert_eq!(&bytes[1..], b"{\"return\":42}\n");
    }

    #[test]
    fn runs_a_command_and_reports_its_output_and_exit_code() {
        let mut agent = Agent::default();
        let started = ask(
            &mut agent,
            json!({"execute": "guest-exec", "arguments": {
                "path": "/bin/sh", "arg": ["-c", "read x; echo out-$x; echo err >&2; exit 3"],
                "input-data": quetzal_qga::encode(b"in\n"), "capture-output": true}}),
        );
        let pid = started["return"]["pid"].clone();
        let status = loop {
            let status = ask(
                &mut agent,
                json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
            );
            if status["return"]["exited"] == true {
                break status["return"].clone();
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };

        assert_eq!(status["exitcode"], 3);
        assert_eq!(
            quetzal_qga::decode(status["out-data"].as_str().unwrap()).unwrap(),
            b"out-in\n"
        );
        assert_eq!(
            quetzal_qga::decode(status["err-data"].as_str().unwrap()).unwrap(),
            b"err\n"
        );
    }

    #[test]
    fn bad_requests_get_errors_not_panics() {
        let mut agent = Agent::default();
        for request in [
            json!({"execute": "guest-nope"}),
            json!({"execute": "guest-exec", "arguments": {"path": 7}}),
            json!({"execute": "guest-exec-status", "arguments": {"pid": 999_999}}),
            json!({"execute": "guest-file-read", "arguments": {"handle": 3}}),
            json!({"no": "execute"}),
        ] {
            let answer = ask(&mut agent, request.clone());
            assert!(answer["error"]["class"].is_string(), "{request}: {answer}");
        }
        let junk = agent.handle(b"{not json}").unwrap();
        assert!(String::from_utf8(junk).unwrap().contains("invalid JSON"));
    }

    #[test]
    fn files_go_in_and_out_whole() {
        let dir = std::env::temp_dir().join(format!("qagent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f").display().to_string();
        let mut agent = Agent::default();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();

        let handle = ask(
            &mut agent,
            json!({"execute": "guest-file-open", "arguments": {"path": path, "mode": "w"}}),
        )["return"]
            .clone();
        ask(
            &mut agent,
            json!({"execute": "guest-file-write", "arguments": {"handle": handle, "buf-b64": quetzal_qga::encode(&data)}}),
        );
        ask(
            &mut agent,
            json!({"execute": "guest-file-close", "arguments": {"handle": handle}}),
        );
        let handle = ask(
            &mut agent,
            json!({"execute": "guest-file-open", "arguments": {"path": path}}),
        )["return"]
            .clone();
        let read = ask(
            &mut agent,
            json!({"execute": "guest-file-read", "arguments": {"handle": handle, "count": 1_000_000}}),
        );

        assert_eq!(read["return"]["eof"], true);
        assert_eq!(
            quetzal_qga::decode(read["return"]["buf-b64"].as_str().unwrap()).unwrap(),
            data
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
