//! The host side of Quetzal's own agent port (`org.quetzal.agent.0`,
//! JSON lines, see [`quetzal_qga::port`]). One task per running VM reads
//! what the guest pushes — telemetry, service events, answers to the
//! clone hook — and answers each hello with the services the VM's spec
//! declares. A stock guest never opens the port; then nothing arrives and
//! nothing is sent. What the guest sends is bounded (one message at most
//! [`MAX_PORT_MESSAGE`], strings cut short, lists capped); what it cannot
//! make the host do is wait: every write has a timeout.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quetzal_qga::Framer;
use quetzal_qga::port::{
    MAX_PORT_MESSAGE, Reidentified, Reidentify, Service, ServiceEvent, TELEMETRY_EVERY_SECS,
    Telemetry, ToGuest, ToHost, line,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use super::AgentError;

/// The longest a write to the guest may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Telemetry older than this is not shown (three reports missed).
const FRESH_MS: i64 = 3 * 1000 * TELEMETRY_EVERY_SECS as i64 + 1000;
const MAX_FILESYSTEMS: usize = 32;

/// What the host knows from the port.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PortStatus {
    /// A guest agent said hello on this connection.
    pub connected: bool,
    pub version: Option<String>,
    /// The last telemetry and when it came (Unix ms).
    pub telemetry: Option<(Telemetry, i64)>,
}

impl PortStatus {
    /// The last telemetry, if it is recent.
    pub fn fresh(&self, now: i64) -> Option<&Telemetry> {
        let (telemetry, at) = self.telemetry.as_ref()?;
        (now - at <= FRESH_MS).then_some(telemetry)
    }
}

/// Told of each service event, for the VM's event log.
pub type ServiceNews = Box<dyn Fn(&ServiceEvent) + Send + Sync>;

struct Request {
    hostname: String,
    mac: Option<String>,
    timeout: Duration,
    reply: oneshot::Sender<Result<Reidentified, AgentError>>,
}

/// A VM's port link; dropping it ends its task.
#[derive(Debug)]
pub struct PortLink {
    status: Arc<Mutex<PortStatus>>,
    requests: mpsc::Sender<Request>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PortLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn set(status: &Mutex<PortStatus>, change: impl FnOnce(&mut PortStatus)) {
    change(&mut status.lock().expect("never poisoned: no panics while held"));
}

impl PortLink {
    pub fn start(socket: PathBuf, services: Vec<Service>, news: ServiceNews) -> Self {
        let status = Arc::new(Mutex::new(PortStatus::default()));
        let (requests, rx) = mpsc::channel(4);
        let task = tokio::spawn(run(socket, services, rx, Arc::clone(&status), news));
        PortLink {
            status,
            requests,
            task,
        }
    }

    pub fn status(&self) -> PortStatus {
        self.status
            .lock()
            .expect("never poisoned: no panics while held")
            .clone()
    }

    /// The clone hook: asks the guest to become a new machine named
    /// `hostname`, and waits for what each step did.
    pub async fn reidentify(
        &self,
        hostname: &str,
        mac: Option<&str>,
        timeout: Duration,
    ) -> Result<Reidentified, AgentError> {
        if !self.status().connected {
            return Err(AgentError::Unavailable);
        }
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request {
                hostname: hostname.to_owned(),
                mac: mac.map(str::to_owned),
                timeout,
                reply,
            })
            .await
            .map_err(|_| AgentError::Unavailable)?;
        answer.await.unwrap_or(Err(AgentError::Unavailable))
    }
}

/// A string from the guest, cut to a bound.
fn bounded(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// What the guest said, with every string and list bounded.
fn sanitize(message: ToHost) -> ToHost {
    match message {
        ToHost::Hello { version } => ToHost::Hello {
            version: bounded(&version, 64),
        },
        ToHost::Telemetry(mut telemetry) => {
            telemetry.filesystems.truncate(MAX_FILESYSTEMS);
            for fs in &mut telemetry.filesystems {
                fs.mountpoint = bounded(&fs.mountpoint, 128);
                fs.fs_type = bounded(&fs.fs_type, 32);
            }
            telemetry.load = telemetry.load.map(|l| if l.is_finite() { l } else { 0.0 });
            ToHost::Telemetry(telemetry)
        }
        ToHost::Service(event) => ToHost::Service(ServiceEvent {
            name: bounded(&event.name, 64),
            what: bounded(&event.what, 32),
            detail: bounded(&event.detail, 256),
            restarts: event.restarts,
        }),
        ToHost::Reidentified(mut answer) => {
            answer.steps.truncate(16);
            for step in &mut answer.steps {
                step.step = bounded(&step.step, 32);
                step.outcome = bounded(&step.outcome, 256);
            }
            ToHost::Reidentified(answer)
        }
    }
}

/// A clone hook sent, waiting for its answer.
struct Waiting {
    id: u64,
    deadline: tokio::time::Instant,
    timeout: Duration,
    reply: oneshot::Sender<Result<Reidentified, AgentError>>,
}

async fn write(stream: &mut UnixStream, message: &ToGuest) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&line(message))).await,
        Ok(Ok(()))
    )
}

async fn run(
    socket: PathBuf,
    services: Vec<Service>,
    mut requests: mpsc::Receiver<Request>,
    status: Arc<Mutex<PortStatus>>,
    news: ServiceNews,
) {
    let mut backoff = Duration::from_millis(200);
    let mut next_id: u64 = 1;
    loop {
        set(&status, |s| s.connected = false);
        let Ok(mut stream) = UnixStream::connect(&socket).await else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        };
        backoff = Duration::from_millis(200);
        // A guest that never saw the port close (one resumed from a saved
        // state) says hello when asked.
        if !write(&mut stream, &ToGuest::Hello {}).await {
            continue;
        }
        let mut framer = Framer::new(MAX_PORT_MESSAGE);
        let mut buffer = vec![0u8; 16 * 1024];
        let mut waiting: Option<Waiting> = None;
        loop {
            let deadline = waiting.as_ref().map(|w| w.deadline);
            tokio::select! {
                read = stream.read(&mut buffer) => {
                    let Ok(read @ 1..) = read else { break };
                    // An object past the bound is dropped by the framer.
                    for object in framer.push(&buffer[..read]).unwrap_or_default() {
                        let Ok(message) = serde_json::from_slice::<ToHost>(&object) else {
                            continue;
                        };
                        match sanitize(message) {
                            ToHost::Hello { version } => {
                                if !write(&mut stream, &ToGuest::Services(services.clone())).await {
                                    break;
                                }
                                set(&status, |s| {
                                    s.connected = true;
                                    s.version = Some(version);
                                });
                            }
                            ToHost::Telemetry(telemetry) => {
                                let now = crate::store::now_millis();
                                set(&status, |s| s.telemetry = Some((telemetry, now)));
                            }
                            ToHost::Service(event) => news(&event),
                            ToHost::Reidentified(answer) => {
                                if waiting.as_ref().is_some_and(|w| w.id == answer.id)
                                    && let Some(w) = waiting.take()
                                {
                                    let _ = w.reply.send(Ok(answer));
                                }
                            }
                        }
                    }
                }
                Some(request) = requests.recv(), if waiting.is_none() => {
                    let id = next_id;
                    next_id += 1;
                    let asked = ToGuest::Reidentify(Reidentify {
                        id,
                        hostname: request.hostname,
                        unix_ms: crate::store::now_millis(),
                        mac: request.mac,
                        seed: crate::node::random_hex(32).ok(),
                    });
                    if !write(&mut stream, &asked).await {
                        let _ = request.reply.send(Err(AgentError::Unavailable));
                        break;
                    }
                    waiting = Some(Waiting {
                        id,
                        deadline: tokio::time::Instant::now() + request.timeout,
                        timeout: request.timeout,
                        reply: request.reply,
                    });
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    if let Some(w) = waiting.take() {
                        let _ = w.reply.send(Err(AgentError::Timeout {
                            command: "reidentify".to_owned(),
                            timeout: w.timeout,
                        }));
                    }
                }
            }
        }
        if let Some(w) = waiting.take() {
            let _ = w.reply.send(Err(AgentError::Unavailable));
        }
        tokio::time::sleep(backoff).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quetzal_qga::port::Run;
    use tokio::net::UnixListener;

    #[test]
    fn strings_and_lists_from_the_guest_are_bounded() {
        let fs = quetzal_qga::port::Filesystem {
            mountpoint: "/".repeat(1000),
            fs_type: "ext4".into(),
            used_bytes: 1,
            total_bytes: 2,
        };
        let telemetry = Telemetry {
            load: [f64::NAN, 1.5, f64::INFINITY],
            filesystems: vec![fs; 100],
            ..Telemetry::default()
        };

        let ToHost::Telemetry(kept) = sanitize(ToHost::Telemetry(telemetry)) else {
            unreachable!()
        };

        assert_eq!(kept.filesystems.len(), MAX_FILESYSTEMS);
        assert_eq!(kept.filesystems[0].mountpoint.len(), 128);
        assert_eq!(kept.load, [0.0, 1.5, 0.0]);
    }

    #[tokio::test]
    async fn a_hello_gets_the_services_and_telemetry_and_events_are_taken_past_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("port.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (heard_tx, mut heard) = mpsc::unbounded_channel();
        let news: ServiceNews = Box::new(move |event| {
            let _ = heard_tx.send(event.clone());
        });
        let services = vec![Service {
            name: "web".into(),
            run: Run::Unit("nginx.service".into()),
        }];
        let link = PortLink::start(socket, services.clone(), news);
        let (mut guest, _) = listener.accept().await.unwrap();

        // Garbage, an object that is no message, and one past the bound
        // (dropped whole) come before what counts.
        let mut said = b"garbage\xff{not json}\n{\"hello\": 7}\n{\"x\": \"".to_vec();
        said.extend(vec![b'a'; MAX_PORT_MESSAGE + 10]);
        said.extend(b"\"}\n");
        guest.write_all(&said).await.unwrap();
        for message in [
            ToHost::Hello {
                version: "9".into(),
            },
            ToHost::Telemetry(Telemetry {
                memory_total_bytes: 1000,
                memory_used_bytes: 400,
                ..Telemetry::default()
            }),
            ToHost::Service(ServiceEvent {
                name: "web".into(),
                what: "restarted".into(),
                detail: "it was failed (signal)".into(),
                restarts: 1,
            }),
        ] {
            guest.write_all(&line(&message)).await.unwrap();
        }

        let event = heard.recv().await.unwrap();
        assert_eq!(event.detail, "it was failed (signal)");
        let status = link.status();
        assert!(status.connected);
        assert_eq!(status.version.as_deref(), Some("9"));
        let telemetry = status.fresh(crate::store::now_millis()).unwrap();
        assert_eq!(telemetry.memory_used_bytes, 400);
        let mut framer = Framer::new(MAX_PORT_MESSAGE);
        let mut buffer = [0u8; 4096];
        let mut told: Vec<ToGuest> = Vec::new();
        while told.len() < 2 {
            let read = guest.read(&mut buffer).await.unwrap();
            for object in framer.push(&buffer[..read]).unwrap() {
                told.push(serde_json::from_slice(&object).unwrap());
            }
        }
        // Asked to say hello (a resumed guest never saw the port close),
        // then given the services for the hello it said.
        assert_eq!(told, [ToGuest::Hello {}, ToGuest::Services(services)]);
        assert!(
            status
                .fresh(crate::store::now_millis() + FRESH_MS + 1)
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_guest_that_never_answers_the_clone_hook_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("port.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let link = PortLink::start(socket, vec![], Box::new(|_| {}));
        assert!(matches!(
            link.reidentify("x", None, Duration::from_millis(100)).await,
            Err(AgentError::Unavailable)
        ));
        let (mut guest, _) = listener.accept().await.unwrap();
        guest
            .write_all(&line(&ToHost::Hello {
                version: "1".into(),
            }))
            .await
            .unwrap();
        let mut buffer = [0u8; 4096];
        // The services answer means the hello was taken.
        let _ = guest.read(&mut buffer).await.unwrap();
        while !link.status().connected {
            tokio::task::yield_now().await;
        }

        let answer = link.reidentify("x", None, Duration::from_millis(200)).await;

        assert!(
            matches!(answer, Err(AgentError::Timeout { .. })),
            "{answer:?}"
        );
    }
}
