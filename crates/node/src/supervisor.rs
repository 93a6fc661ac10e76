//! One task per running VM: it owns the engine's VM handle and its console
//! connection, runs the commands the node sends it one at a time, fans the
//! console out to every viewer, and reports how the VM ended.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quetzal_engine::{EngineVm, SnapshotJobs, VmEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::consolelog;
use crate::node::Node;

/// What the node asks of a running VM.
#[derive(Debug)]
pub enum Command {
    Pause,
    Resume,
    /// The ACPI power button.
    Powerdown,
    /// End QEMU now.
    Quit,
    Kill,
    /// A snapshot job on the snapshot with this tag.
    Snapshot(SnapshotJob, String),
    /// Saves the paused VM's device state to this file (a warm template).
    SaveState(std::path::PathBuf),
}

/// What a snapshot job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotJob {
    /// Save one with memory.
    Save,
    /// Go back to one (disks and memory).
    Load,
    Delete,
}

/// How a VM's QEMU ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The guest powered itself off.
    PoweredOff,
    /// The guest kernel panicked.
    Crashed(String),
    /// QEMU died (killed, crashed).
    Died(String),
    /// QEMU was told to quit.
    Quit,
    /// The guest hung (its agent silent while it ran) and was ended so its
    /// restart policy brings it back.
    Hung(String),
}

/// Resource use of a running VM.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub cpu_millis: u64,
    /// How its process's memory is shared (none where the engine cannot
    /// tell).
    pub memory: Option<quetzal_engine::MemoryUse>,
    pub resident_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_written_bytes: u64,
    /// Bytes the guest received and sent on its NIC (its TAP device's
    /// counters, the other way round); zero on user-mode networking.
    pub net_received_bytes: u64,
    pub net_sent_bytes: u64,
}

type Reply = oneshot::Sender<Result<(), CallError>>;

/// Why a command to a running VM failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CallError {
    pub message: String,
    /// The host had no room for what the engine wrote.
    pub no_space: bool,
}

impl CallError {
    fn gone() -> Self {
        CallError {
            message: "the VM has exited".to_owned(),
            no_space: false,
        }
    }

    fn of<F: quetzal_engine::Failure>(err: &F) -> Self {
        CallError {
            message: err.to_string(),
            no_space: err.no_space(),
        }
    }
}

/// Whether a VM's vCPUs run, as its engine last said (in the order it
/// said it), and why they stopped when the engine stopped them itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunState {
    pub paused: bool,
    pub why: Option<String>,
}

/// The node's side of a running VM.
#[derive(Debug)]
pub struct Live {
    pub generation: u64,
    pub pid: Option<u32>,
    commands: mpsc::Sender<(Command, Reply)>,
    stats: mpsc::Sender<oneshot::Sender<Stats>>,
    pub console_out: broadcast::Sender<Vec<u8>>,
    pub console_in: mpsc::Sender<Vec<u8>>,
    exited: watch::Receiver<Option<Exit>>,
    run_state: watch::Receiver<RunState>,
    /// Its guest agent's link, when the engine gives the VM a channel.
    pub agent: Option<crate::agent::AgentLink>,
    /// Quetzal's own agent port, when the engine gives the VM one.
    pub port: Option<crate::agent::port::PortLink>,
    /// Total and used memory as the guest's balloon driver last said.
    balloon: watch::Receiver<Option<(u64, u64)>>,
    /// The generation id its guest sees, where the node started it
    /// (not known of a VM taken over from an earlier daemon).
    pub generation_id: Option<String>,
}

impl Live {
    /// Runs one command on the VM.
    pub async fn call(&self, command: Command) -> Result<(), CallError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send((command, tx))
            .await
            .map_err(|_| CallError::gone())?;
        rx.await.unwrap_or_else(|_| Err(CallError::gone()))
    }

    pub async fn stats(&self) -> Option<Stats> {
        let (tx, rx) = oneshot::channel();
        self.stats.send(tx).await.ok()?;
        tokio::time::timeout(Duration::from_secs(2), rx)
            .await
            .ok()?
            .ok()
    }

    /// The guest's total and used memory from its balloon driver, where
    /// it has one that reported.
    pub fn balloon_memory(&self) -> Option<(u64, u64)> {
        *self.balloon.borrow()
    }

    /// Whether the vCPUs run now, as the engine last reported.
    pub fn run_state(&self) -> RunState {
        self.run_state.borrow().clone()
    }

    /// Waits up to `timeout` for QEMU to be gone.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<Exit> {
        let mut exited = self.exited.clone();
        let result = tokio::time::timeout(timeout, exited.wait_for(Option::is_some)).await;
        match result {
            Ok(Ok(exit)) => exit.clone(),
            _ => None,
        }
    }
}

/// Starts supervising `vm`, whose console is `console` and whose vCPUs
/// are `paused` or not. `generation` tells this run of the VM from later
/// ones. Its guest agent is told to watch `services`.
#[allow(clippy::too_many_arguments)]
pub fn spawn<V: EngineVm>(
    node: Arc<Node>,
    name: String,
    generation: u64,
    vm: V,
    console: UnixStream,
    layout: quetzal_engine::Layout,
    paused: bool,
    services: &[quetzal_api::WatchedService],
) -> Live {
    let console_log = layout.console_log;
    let agent = layout.agent.map(|socket| {
        let node = Arc::downgrade(&node);
        let vm = name.clone();
        let news: crate::agent::News = Box::new(move |cause| {
            if let Some(node) = node.upgrade() {
                node.note_from_guest(&vm, quetzal_api::EventKind::Agent, cause);
            }
        });
        crate::agent::AgentLink::start(name.clone(), socket, news)
    });
    let port = layout.port.map(|socket| {
        let node = Arc::downgrade(&node);
        let vm = name.clone();
        let news: crate::agent::port::ServiceNews = Box::new(move |event| {
            if let Some(node) = node.upgrade() {
                let cause = format!(
                    "service {} {}: {} (restarts: {})",
                    event.name, event.what, event.detail, event.restarts
                );
                node.note_from_guest(&vm, quetzal_api::EventKind::Service, &cause);
            }
        });
        crate::agent::port::PortLink::start(socket, crate::services::to_port(services), news)
    });
    let contact = agent.as_ref().map(crate::agent::AgentLink::contact);
    let (commands_tx, commands) = mpsc::channel(8);
    let (stats_tx, stats) = mpsc::channel(8);
    let (console_out, _) = broadcast::channel(256);
    let (console_in_tx, console_in) = mpsc::channel(64);
    let (exited_tx, exited) = watch::channel(None);
    let (run_state_tx, run_state) = watch::channel(RunState { paused, why: None });
    let (balloon_tx, balloon) = watch::channel(None);
    let live = Live {
        generation,
        pid: vm.pid(),
        commands: commands_tx,
        stats: stats_tx,
        console_out: console_out.clone(),
        console_in: console_in_tx,
        exited,
        run_state,
        agent,
        port,
        balloon,
        generation_id: None,
    };
    let task = Task {
        vm,
        contact,
        hang: crate::agent::HangWatch::new(crate::store::now_millis(), !paused),
        console,
        commands,
        stats,
        console_out,
        console_in,
        run_state: run_state_tx,
        balloon: balloon_tx,
        generation,
        console_log,
    };
    tokio::spawn(async move {
        let exit = task.run(&node, &name).await;
        let _ = exited_tx.send(Some(exit.clone()));
        node.vm_exited(&name, generation, exit).await;
    });
    live
}

/// How often the balloon's memory statistics are read.
const BALLOON_EVERY: Duration = Duration::from_secs(5);

struct Task<V: EngineVm> {
    vm: V,
    /// When its agent last answered, and what makes it hung.
    contact: Option<crate::agent::Contact>,
    hang: crate::agent::HangWatch,
    console: UnixStream,
    commands: mpsc::Receiver<(Command, Reply)>,
    stats: mpsc::Receiver<oneshot::Sender<Stats>>,
    console_out: broadcast::Sender<Vec<u8>>,
    console_in: mpsc::Receiver<Vec<u8>>,
    run_state: watch::Sender<RunState>,
    balloon: watch::Sender<Option<(u64, u64)>>,
    generation: u64,
    /// Where the engine logs the console, kept bounded
    /// ([`crate::consolelog`]).
    console_log: PathBuf,
}

impl<V: EngineVm> Task<V> {
    /// A hung guest: told in an event; ended (so its restart policy
    /// restarts it) unless its policy is `never`, which leaves it running
    /// for its user to look at. Returns how the VM is ending, if it is.
    async fn hung(vm: &mut V, node: &Arc<Node>, name: &str, silent_ms: i64) -> Option<Exit> {
        let policy = node.record(name).map(|vm| vm.restart_policy);
        let silent = format!(
            "its guest agent has not answered for {} s while it ran",
            silent_ms / 1000
        );
        if matches!(policy, Ok(quetzal_api::RestartPolicy::Never) | Err(_)) {
            node.note_from_guest(
                name,
                quetzal_api::EventKind::Hung,
                &format!("the guest looks hung: {silent}; its restart policy is never, so it is left running"),
            );
            return None;
        }
        node.note_from_guest(
            name,
            quetzal_api::EventKind::Hung,
            &format!("the guest is hung: {silent}; ending it for its restart policy"),
        );
        tracing::warn!(vm = %name, silent_ms, "guest hung; ending it for its restart policy");
        if let Err(err) = vm.kill().await {
            tracing::warn!(vm = %name, error = %err, "cannot end a hung guest");
            return None;
        }
        Some(Exit::Hung(format!("hung: {silent}")))
    }

    async fn run(mut self, node: &Arc<Node>, name: &str) -> Exit {
        // Why the engine is about to pause the VM by itself.
        let mut pause_reason: Option<String> = None;
        let (mut from_guest, mut to_guest) = self.console.into_split();
        let mut buf = vec![0u8; 8192];
        let mut console_open = true;
        let mut since_check = 0;
        let mut ending: Option<Exit> = None;
        let mut hang_check = tokio::time::interval(Duration::from_secs(1));
        let mut balloon_check = tokio::time::interval(BALLOON_EVERY);
        loop {
            tokio::select! {
                _ = balloon_check.tick(), if ending.is_none() => {
                    let memory = self.vm.balloon_memory().await.ok().flatten();
                    self.balloon.send_replace(memory);
                }
                _ = hang_check.tick(), if self.contact.is_some() && ending.is_none() => {
                    let now = crate::store::now_millis();
                    let last = self.contact.as_ref().and_then(crate::agent::Contact::last);
                    if let Some(silent) = self.hang.check(now, last) {
                        ending = Self::hung(&mut self.vm, node, name, silent).await;
                    }
                }
                event = self.vm.next_event() => match event {
                    VmEvent::GuestPoweredOff => { ending.get_or_insert(Exit::PoweredOff); }
                    VmEvent::Crashed { reason } => { ending.get_or_insert(Exit::Crashed(reason)); }
                    VmEvent::ShuttingDown { .. } => { ending.get_or_insert(Exit::Quit); }
                    VmEvent::Reset { by_guest } => {
                        self.hang.rebooted(crate::store::now_millis());
                        let cause = if by_guest { "the guest rebooted" } else { "reset by the host" };
                        node.note_from_guest(name, quetzal_api::EventKind::Reset, cause);
                    }
                    VmEvent::Exited { expected } => {
                        let _ = self.vm.wait().await;
                        return match ending {
                            Some(exit) => exit,
                            None if expected => Exit::Quit,
                            None => Exit::Died(self.vm.log_tail()),
                        };
                    }
                    VmEvent::DiskError { no_space, reason } => {
                        pause_reason = Some(if no_space {
                            format!("the engine paused it: the host has no space left for its disk ({reason})")
                        } else {
                            format!("the engine paused it: its disk failed ({reason})")
                        });
                    }
                    VmEvent::Paused => {
                        self.hang.paused();
                        let why = pause_reason.take();
                        self.run_state.send_replace(RunState { paused: true, why });
                        node.run_state_changed(name, self.generation);
                    }
                    VmEvent::Running => {
                        self.hang.resumed(crate::store::now_millis());
                        self.run_state.send_replace(RunState::default());
                        node.run_state_changed(name, self.generation);
                    }
                    VmEvent::PowerdownRequested => self.hang.powering_down(),
                    VmEvent::WatchdogFired => node.note_from_guest(
                        name,
                        quetzal_api::EventKind::Hung,
                        "its watchdog device fired (the guest's watchdog daemon stopped feeding it): reset",
                    ),
                },
                Some((command, reply)) = self.commands.recv() => {
                    let result = match command {
                        Command::Pause => self.vm.pause().await,
                        Command::Resume => self.vm.resume().await,
                        Command::Powerdown => {
                            self.hang.powering_down();
                            self.vm.powerdown().await
                        }
                        Command::Quit => self.vm.stop().await,
                        Command::Kill => self.vm.kill().await.map(drop),
                        Command::SaveState(file) => self.vm.save_state(&file).await,
                        // A snapshot job can run for long: it runs beside
                        // this loop, which keeps relaying the console and
                        // answering for stats meanwhile.
                        Command::Snapshot(job, tag) => {
                            let snapshots = self.vm.snapshots();
                            tokio::spawn(async move {
                                let result = match job {
                                    SnapshotJob::Save => snapshots.save(&tag).await,
                                    SnapshotJob::Load => snapshots.load(&tag).await,
                                    SnapshotJob::Delete => snapshots.delete(&tag).await,
                                };
                                let _ = reply.send(result.map_err(|err| CallError::of(&err)));
                            });
                            continue;
                        }
                    };
                    let _ = reply.send(result.map_err(|err| CallError {
                        message: err.to_string(),
                        no_space: false,
                    }));
                }
                Some(reply) = self.stats.recv() => {
                    let usage = self.vm.usage();
                    let (read, written) = self.vm.disk_bytes().await.unwrap_or_default();
                    let _ = reply.send(Stats {
                        memory: self.vm.memory_use(),
                        cpu_millis: usage.map_or(0, |u| u.cpu_millis),
                        resident_bytes: usage.map_or(0, |u| u.resident_bytes),
                        disk_read_bytes: read,
                        disk_written_bytes: written,
                        ..Stats::default()
                    });
                }
                read = from_guest.read(&mut buf), if console_open => match read {
                    Ok(0) | Err(_) => console_open = false,
                    // Nobody watching is fine: the engine's console log keeps it.
                    Ok(n) => {
                        let _ = self.console_out.send(buf[..n].to_vec());
                        since_check += n;
                        if since_check >= consolelog::CHECK_EVERY {
                            since_check = 0;
                            let trimmed = consolelog::trim(
                                &self.console_log,
                                consolelog::MAX_BYTES,
                                consolelog::KEEP_BYTES,
                            );
                            if let Err(err) = trimmed {
                                tracing::warn!(vm = %name, error = %err, "cannot cut the console log");
                            }
                        }
                    }
                },
                Some(input) = self.console_in.recv() => {
                    if to_guest.write_all(&input).await.is_err() {
                        console_open = false;
                    }
                }
            }
        }
    }
}
