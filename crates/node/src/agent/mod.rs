//! The host side of the guest agent: one task per running VM owns the
//! VM's agent channel (QGA over a virtio-serial port, exposed by the engine
//! as a Unix socket), so stock `qemu-guest-agent` and `quetzal-agent`
//! both work. The task connects, synchronises with `guest-sync-delimited`
//! (a fresh id each time: a stale answer cannot be taken for ours), asks
//! `guest-info` what the agent supports, then pings it every few seconds
//! and runs callers' commands one at a time, each with a timeout. A
//! timeout, garbage, or a closed channel sends it back to synchronising,
//! with back-off. Nothing the guest sends can make it hold more than one
//! bounded message.

pub mod port;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quetzal_qga::{Framer, MAX_MESSAGE};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

/// How long a sync or a ping may take, and the gap between pings.
const SYNC_TIMEOUT: Duration = Duration::from_secs(3);
const PING_EVERY: Duration = Duration::from_secs(5);
/// How long one sync waits for its answer.
const SYNC_WAIT: Duration = Duration::from_secs(1);
/// How soon a sync nobody answered is tried again.
const SYNC_RETRY: Duration = Duration::from_millis(500);
/// The longest wait between two tries to reach a silent agent.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What the host knows of a VM's agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentStatus {
    pub connected: bool,
    /// What `guest-info` said: `quetzal-agent 0.1.0`, or stock QGA's
    /// version number.
    pub version: Option<String>,
    /// Unix ms of its last answer.
    pub last_contact_at: Option<i64>,
    /// The commands it says it supports.
    pub commands: Vec<String>,
    /// The guest's OS (`guest-get-osinfo`'s pretty name).
    pub os: Option<String>,
    /// The guest's own host name.
    pub hostname: Option<String>,
    /// The guest's IPv4 addresses, loopback left out, as its agent last
    /// said (refreshed every few seconds).
    pub addresses: Vec<String>,
    /// Its filesystems' use, as its agent last said.
    pub filesystems: Vec<quetzal_api::GuestFilesystem>,
}

/// How many addresses of a guest are kept.
const MAX_ADDRESSES: usize = 32;

/// A short string from the guest, bounded.
fn short(value: Option<&Value>) -> Option<String> {
    value
        .and_then(Value::as_str)
        .map(|text| text.chars().take(128).collect())
}

/// At most this many filesystems are kept of what an agent reports.
const MAX_FILESYSTEMS: usize = 32;

/// The filesystems in a `guest-get-fsinfo` answer that say how full they
/// are (stock QGA and quetzal-agent both do), bounded.
fn filesystems(answer: &Value) -> Vec<quetzal_api::GuestFilesystem> {
    answer
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|fs| {
            Some(quetzal_api::GuestFilesystem {
                mountpoint: short(fs.get("mountpoint"))?,
                fs_type: short(fs.get("type")).unwrap_or_default(),
                used_bytes: fs.get("used-bytes")?.as_u64()?,
                total_bytes: fs.get("total-bytes")?.as_u64()?,
            })
        })
        .take(MAX_FILESYSTEMS)
        .collect()
}

/// The IPv4 addresses in a `guest-network-get-interfaces` answer.
fn ipv4_addresses(interfaces: &Value) -> Vec<String> {
    let mut found = Vec::new();
    for interface in interfaces.as_array().into_iter().flatten() {
        if interface.get("name").and_then(Value::as_str) == Some("lo") {
            continue;
        }
        let listed = interface.get("ip-addresses").and_then(Value::as_array);
        for address in listed.into_iter().flatten() {
            if address.get("ip-address-type").and_then(Value::as_str) != Some("ipv4") {
                continue;
            }
            let Some(ip) = address.get("ip-address").and_then(Value::as_str) else {
                continue;
            };
            match ip.parse::<std::net::Ipv4Addr>() {
                Ok(ip) if !ip.is_loopback() && found.len() < MAX_ADDRESSES => {
                    found.push(ip.to_string());
                }
                _ => {}
            }
        }
    }
    found
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the VM's guest agent is not connected")]
    Unavailable,
    #[error("the guest agent does not support {0}")]
    Unsupported(String),
    #[error("the guest agent did not answer {command} within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("the guest agent answered {command} with an error: {desc}")]
    Refused { command: String, desc: String },
    #[error("the guest agent's answer to {command} makes no sense: {why}")]
    Garbled { command: String, why: String },
}

/// Told what happened to the link, for the VM's event log.
pub type News = Box<dyn Fn(&str) + Send + Sync>;

struct Call {
    command: String,
    arguments: Value,
    timeout: Duration,
    reply: oneshot::Sender<Result<Value, AgentError>>,
}

/// A VM's agent link; dropping it ends its task.
#[derive(Debug)]
pub struct AgentLink {
    calls: mpsc::Sender<Call>,
    status: Arc<Mutex<AgentStatus>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("command", &self.command)
            .finish()
    }
}

/// When a VM's agent last answered, for whoever watches for a hung guest.
#[derive(Clone, Debug)]
pub struct Contact(Arc<Mutex<AgentStatus>>);

impl Contact {
    /// Unix ms of the agent's last answer.
    pub fn last(&self) -> Option<i64> {
        self.0
            .lock()
            .expect("never poisoned: no panics while held")
            .last_contact_at
    }
}

/// How long a running guest's agent, once it answered in this boot, may
/// stay silent before the guest counts as hung. Its pings come every 5 s;
/// a guest starved of CPU for half a minute is not one a user can use.
pub const HUNG_AFTER_MS: i64 = 30_000;

/// Decides when a guest is hung from what the supervisor sees: its agent
/// must have answered since the guest last (re)booted, the vCPUs must be
/// running, and the agent silent for [`HUNG_AFTER_MS`] of running time.
/// A boot, a pause or a power-down never count as silence.
#[derive(Clone, Debug)]
pub struct HangWatch {
    booted_at: i64,
    running_since: Option<i64>,
    powering_down: bool,
    /// The contact a hang was reported after: once per silence.
    reported: Option<i64>,
}

impl HangWatch {
    pub fn new(now: i64, running: bool) -> Self {
        HangWatch {
            booted_at: now,
            running_since: running.then_some(now),
            powering_down: false,
            reported: None,
        }
    }

    /// The guest rebooted (or was reset): its agent starts over.
    pub fn rebooted(&mut self, now: i64) {
        self.booted_at = now;
        self.reported = None;
    }

    pub fn paused(&mut self) {
        self.running_since = None;
    }

    pub fn resumed(&mut self, now: i64) {
        self.running_since = Some(now);
    }

    /// Asked to power off: a guest shutting down stops its agent.
    pub fn powering_down(&mut self) {
        self.powering_down = true;
    }

    /// How long the agent has been silent, once, when that makes the
    /// guest hung.
    pub fn check(&mut self, now: i64, last_contact: Option<i64>) -> Option<i64> {
        let last = last_contact.filter(|at| *at >= self.booted_at)?;
        let running = self.running_since?;
        if self.powering_down || self.reported == Some(last) {
            return None;
        }
        let silent = now - last.max(running);
        (silent >= HUNG_AFTER_MS).then(|| {
            self.reported = Some(last);
            now - last
        })
    }
}

impl Drop for AgentLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AgentLink {
    /// Starts the link to the agent behind `socket`; `news` hears when
    /// it connects and when it is lost.
    pub fn start(vm: String, socket: PathBuf, news: News) -> Self {
        let (calls, rx) = mpsc::channel(16);
        let status = Arc::new(Mutex::new(AgentStatus::default()));
        let task = tokio::spawn(run(vm, socket, rx, Arc::clone(&status), news));
        AgentLink {
            calls,
            status,
            task,
        }
    }

    /// A handle on when it last answered.
    pub fn contact(&self) -> Contact {
        Contact(Arc::clone(&self.status))
    }

    pub fn status(&self) -> AgentStatus {
        self.status
            .lock()
            .expect("never poisoned: no panics while held")
            .clone()
    }

    /// Runs `command` in the agent: its `return` value.
    pub async fn call(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let status = self.status();
        if !status.connected {
            return Err(AgentError::Unavailable);
        }
        if !status.commands.iter().any(|c| c == command) {
            return Err(AgentError::Unsupported(command.to_owned()));
        }
        let (reply, answer) = oneshot::channel();
        self.calls
            .send(Call {
                command: command.to_owned(),
                arguments,
                timeout,
                reply,
            })
            .await
            .map_err(|_| AgentError::Unavailable)?;
        answer.await.unwrap_or(Err(AgentError::Unavailable))
    }
}

/// One conversation with the agent over a connected socket.
struct Channel {
    stream: UnixStream,
    framer: Framer,
    pending: std::collections::VecDeque<Vec<u8>>,
}

impl Channel {
    async fn send(&mut self, request: &Value) -> std::io::Result<()> {
        let mut bytes = request.to_string().into_bytes();
        bytes.push(b'\n');
        self.stream.write_all(&bytes).await
    }

    /// The next whole JSON object from the agent.
    async fn next(&mut self) -> std::io::Result<Value> {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            while let Some(object) = self.pending.pop_front() {
                if let Ok(value) = serde_json::from_slice::<Value>(&object) {
                    return Ok(value);
                }
            }
            let read = self.stream.read(&mut buffer).await?;
            if read == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            // An object past the bound is dropped; wait for the next.
            if let Ok(objects) = self.framer.push(&buffer[..read]) {
                self.pending.extend(objects);
            }
        }
    }

    /// The answer to the command just sent: the next `return` or `error`.
    async fn answer(&mut self, command: &str) -> std::io::Result<Result<Value, AgentError>> {
        loop {
            let value = self.next().await?;
            if let Some(returned) = value.get("return") {
                return Ok(Ok(returned.clone()));
            }
            if let Some(error) = value.get("error") {
                let desc = error
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no description")
                    .chars()
                    .take(500)
                    .collect();
                return Ok(Err(AgentError::Refused {
                    command: command.to_owned(),
                    desc,
                }));
            }
            // Anything else (an event, noise) is not an answer.
        }
    }

    /// `guest-sync-delimited` with `id`: true once the agent echoes it.
    async fn sync(&mut self, id: u64) -> std::io::Result<bool> {
        self.framer.reset();
        self.pending.clear();
        // The send is inside the timeout too: a guest that reads nothing
        // can leave the channel full.
        let waited = tokio::time::timeout(SYNC_WAIT, async {
            self.send(&json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } }))
                .await?;
            loop {
                let value = self.next().await?;
                // Answers to older syncs (an agent that started late reads
                // them all) are skipped until ours.
                if value.get("return").and_then(Value::as_u64) == Some(id) {
                    return Ok::<_, std::io::Error>(true);
                }
            }
        })
        .await;
        match waited {
            Ok(result) => result,
            Err(_) => Ok(false),
        }
    }

    async fn request(
        &mut self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> std::io::Result<Result<Value, AgentError>> {
        let exchange = async {
            self.send(&json!({ "execute": command, "arguments": arguments }))
                .await?;
            self.answer(command).await
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Ok(Err(AgentError::Timeout {
                command: command.to_owned(),
                timeout,
            })),
        }
    }
}

fn set(status: &Mutex<AgentStatus>, change: impl FnOnce(&mut AgentStatus)) {
    change(&mut status.lock().expect("never poisoned: no panics while held"));
}

async fn run(
    vm: String,
    socket: PathBuf,
    mut calls: mpsc::Receiver<Call>,
    status: Arc<Mutex<AgentStatus>>,
    news: News,
) {
    let mut backoff = Duration::from_millis(200);
    let mut sync_id: u64 = u64::from(std::process::id()) << 32;
    loop {
        set(&status, |s| s.connected = false);
        let stream = match UnixStream::connect(&socket).await {
            Ok(stream) => stream,
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let mut channel = Channel {
            stream,
            framer: Framer::new(MAX_MESSAGE),
            pending: Default::default(),
        };
        // Synchronise; an agent not up yet (a guest still booting) is
        // asked again every half second (each try waits up to
        // SYNC_TIMEOUT for its answer).
        let synced = loop {
            sync_id += 1;
            match channel.sync(sync_id).await {
                Ok(true) => break true,
                Ok(false) => tokio::time::sleep(SYNC_RETRY).await,
                Err(_) => break false,
            }
        };
        if !synced {
            tokio::time::sleep(backoff).await;
            continue;
        }
        let info = match channel.request("guest-info", json!({}), SYNC_TIMEOUT).await {
            Ok(Ok(info)) => info,
            _ => continue,
        };
        let commands: Vec<String> = info
            .get("supported_commands")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter(|c| c.get("enabled").and_then(Value::as_bool) != Some(false))
                    .filter_map(|c| c.get("name").and_then(Value::as_str))
                    .take(512)
                    .map(|name| name.chars().take(64).collect())
                    .collect()
            })
            .unwrap_or_default();
        let version = info
            .get("version")
            .and_then(Value::as_str)
            .map(|v| v.chars().take(64).collect::<String>());
        tracing::info!(vm = %vm, version = ?version, "guest agent connected");
        news(&format!(
            "guest agent connected: {}",
            version.as_deref().unwrap_or("unknown version")
        ));
        let supports = |name: &str| commands.iter().any(|c| c == name);
        let (mut os, mut hostname) = (None, None);
        if supports("guest-get-osinfo")
            && let Ok(Ok(info)) = channel
                .request("guest-get-osinfo", json!({}), SYNC_TIMEOUT)
                .await
        {
            os = short(info.get("pretty-name")).or_else(|| short(info.get("name")));
        }
        if supports("guest-get-host-name")
            && let Ok(Ok(name)) = channel
                .request("guest-get-host-name", json!({}), SYNC_TIMEOUT)
                .await
        {
            hostname = short(name.get("host-name"));
        }
        // Addresses double as the keep-alive when the agent can tell them.
        let keep_alive = if supports("guest-network-get-interfaces") {
            "guest-network-get-interfaces"
        } else {
            "guest-ping"
        };
        // Every third keep-alive asks how full its filesystems are.
        let fsinfo = supports("guest-get-fsinfo");
        set(&status, |s| {
            s.connected = true;
            s.version = version;
            s.commands = commands;
            s.os = os;
            s.hostname = hostname;
            s.last_contact_at = Some(crate::store::now_millis());
        });
        backoff = Duration::from_millis(200);
        // Serve calls; ping when idle. Any failure: back to connecting.
        let mut ping = tokio::time::interval(PING_EVERY);
        let mut ticks = 0u32;
        loop {
            let (command, arguments, timeout, reply) = tokio::select! {
                call = calls.recv() => match call {
                    Some(call) => (call.command, call.arguments, call.timeout, Some(call.reply)),
                    None => return,
                },
                _ = ping.tick() => {
                    ticks = ticks.wrapping_add(1);
                    let command = if fsinfo && ticks % 3 == 1 { "guest-get-fsinfo" } else { keep_alive };
                    (command.to_owned(), json!({}), SYNC_TIMEOUT, None)
                }
            };
            let result = channel.request(&command, arguments, timeout).await;
            if command == "guest-network-get-interfaces"
                && let Ok(Ok(interfaces)) = &result
            {
                let addresses = ipv4_addresses(interfaces);
                set(&status, |s| s.addresses = addresses);
            }
            if command == "guest-get-fsinfo"
                && let Ok(Ok(answer)) = &result
            {
                let found = filesystems(answer);
                set(&status, |s| s.filesystems = found);
            }
            let healthy = matches!(result, Ok(Ok(_)) | Ok(Err(AgentError::Refused { .. })));
            if healthy {
                set(&status, |s| {
                    s.last_contact_at = Some(crate::store::now_millis())
                });
            } else {
                // Before the caller hears: whoever asks next sees it.
                set(&status, |s| s.connected = false);
            }
            let answer = result.unwrap_or(Err(AgentError::Unavailable));
            if let Some(reply) = reply {
                let _ = reply.send(answer);
            }
            if !healthy {
                tracing::info!(vm = %vm, command = %command, "guest agent lost; reconnecting");
                news(&format!(
                    "guest agent lost (no answer to {command}); reconnecting"
                ));
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn keeps_filesystems_that_say_how_full_they_are_up_to_a_bound() {
        let one = json!({"name": "vda1", "mountpoint": "/", "type": "ext4",
            "used-bytes": 500, "total-bytes": 3000, "disk": []});
        let mut answer = vec![one.clone(), json!({"mountpoint": "/boot", "type": "vfat"})];
        answer.extend(std::iter::repeat_n(one, 100));

        let found = filesystems(&Value::Array(answer));

        assert_eq!(found.len(), MAX_FILESYSTEMS);
        assert_eq!(found[0].mountpoint, "/");
        assert_eq!((found[0].used_bytes, found[0].total_bytes), (500, 3000));
        // The one without figures is left out.
        assert!(found.iter().all(|fs| fs.mountpoint == "/"));
        assert!(filesystems(&json!("garbage")).is_empty());
    }

    #[test]
    fn a_running_guest_whose_agent_goes_silent_is_hung_once() {
        let mut watch = HangWatch::new(0, true);

        assert_eq!(watch.check(10_000, Some(5_000)), None);
        assert_eq!(watch.check(34_999, Some(5_000)), None);
        assert_eq!(watch.check(35_000, Some(5_000)), Some(30_000));
        // Reported once per silence; a new answer and a new silence again.
        assert_eq!(watch.check(60_000, Some(5_000)), None);
        assert_eq!(watch.check(90_000, Some(65_000)), None);
        assert_eq!(watch.check(95_000 + 1, Some(65_000)), Some(30_001));
    }

    #[test]
    fn a_guest_without_an_answer_since_its_boot_is_never_hung() {
        let mut watch = HangWatch::new(0, true);
        assert_eq!(watch.check(100_000, None), None);

        // An answer from before a reboot does not count.
        watch.rebooted(50_000);
        assert_eq!(watch.check(200_000, Some(40_000)), None);
        assert_eq!(watch.check(200_000, Some(60_000)), Some(140_000));
    }

    #[test]
    fn paused_time_and_power_down_are_not_silence() {
        let mut watch = HangWatch::new(0, true);
        watch.paused();
        assert_eq!(watch.check(100_000, Some(1_000)), None);
        // Resumed after a long pause: the clock starts at the resume.
        watch.resumed(100_000);
        assert_eq!(watch.check(120_000, Some(1_000)), None);
        assert_eq!(watch.check(130_000, Some(1_000)), Some(129_000));

        let mut stopping = HangWatch::new(0, true);
        stopping.powering_down();
        assert_eq!(stopping.check(100_000, Some(1_000)), None);
    }

    /// An agent that answers syncs after noise and a stale answer, says
    /// what it supports, and answers `guest-exec` with a line far past any
    /// bound.
    async fn hostile_agent(listener: UnixListener) {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut framer = Framer::new(MAX_MESSAGE);
        let mut buffer = [0u8; 4096];
        loop {
            let read = stream.read(&mut buffer).await.unwrap_or(0);
            if read == 0 {
                return;
            }
            for object in framer.push(&buffer[..read]).unwrap_or_default() {
                let request: Value = serde_json::from_slice(&object).unwrap();
                let answer: Vec<u8> = match request["execute"].as_str().unwrap() {
                    "guest-sync-delimited" => {
                        let mut bytes = b"}}{{noise \xff{\"return\": 1}\n\xff".to_vec();
                        bytes.extend(
                            json!({ "return": request["arguments"]["id"] })
                                .to_string()
                                .into_bytes(),
                        );
                        bytes
                    }
                    "guest-info" => json!({ "return": {
                        "version": "hostile 1",
                        "supported_commands": [{ "name": "guest-ping" }, { "name": "guest-exec" }],
                    }})
                    .to_string()
                    .into_bytes(),
                    "guest-exec" => {
                        let mut bytes = b"{\"return\": \"".to_vec();
                        bytes.extend(std::iter::repeat_n(b'a', MAX_MESSAGE + 10));
                        bytes
                    }
                    _ => json!({ "return": {} }).to_string().into_bytes(),
                };
                if stream.write_all(&answer).await.is_err() {
                    return;
                }
            }
        }
    }

    #[test]
    fn reads_ipv4_addresses_leaving_out_loopback_and_garbage() {
        let interfaces = json!([
            {"name": "lo", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1"}]},
            {"name": "eth0", "ip-addresses": [
                {"ip-address-type": "ipv4", "ip-address": "10.80.0.7", "prefix": 24},
                {"ip-address-type": "ipv6", "ip-address": "fe80::1"},
                {"ip-address-type": "ipv4", "ip-address": "not an address"}
            ]},
            "garbage"
        ]);

        assert_eq!(ipv4_addresses(&interfaces), ["10.80.0.7"]);
        assert!(ipv4_addresses(&json!({"not": "a list"})).is_empty());
    }

    #[tokio::test]
    async fn a_hostile_agent_is_synced_past_and_cannot_make_the_host_hold_an_endless_answer() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(hostile_agent(listener));
        let heard = Arc::new(Mutex::new(Vec::<String>::new()));
        let news: News = {
            let heard = Arc::clone(&heard);
            Box::new(move |what| heard.lock().unwrap().push(what.to_owned()))
        };

        let link = AgentLink::start("vm".into(), socket, news);
        let mut waited = 0;
        while !link.status().connected {
            assert!(waited < 200, "never connected");
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += 1;
        }

        assert_eq!(link.status().version.as_deref(), Some("hostile 1"));
        assert_eq!(heard.lock().unwrap()[0], "guest agent connected: hostile 1");
        let unsupported = link
            .call("guest-file-open", json!({}), Duration::from_secs(1))
            .await;
        assert!(
            matches!(unsupported, Err(AgentError::Unsupported(_))),
            "{unsupported:?}"
        );
        let endless = link
            .call("guest-exec", json!({}), Duration::from_secs(2))
            .await;
        assert!(
            matches!(endless, Err(AgentError::Timeout { .. })),
            "{endless:?}"
        );
        assert!(!link.status().connected, "a link that timed out reconnects");
    }
}
