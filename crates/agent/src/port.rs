//! The agent's side of Quetzal's own port (`org.quetzal.agent.0`, see
//! [`quetzal_qga::port`]): telemetry every few seconds, service events as
//! they happen, and what the host asks (the services to watch, a new
//! identity). The port is non-blocking: while no host listens (the daemon
//! restarting) writes would block, so telemetry is dropped and service
//! events wait in a short queue.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, poll};
use quetzal_qga::Framer;
use quetzal_qga::port::{
    MAX_PORT_MESSAGE, MAX_SERVICES, QUETZAL_PORT, ServiceEvent, TELEMETRY_EVERY_SECS, ToGuest,
    ToHost, line,
};

use crate::services::Declared;

/// Service events kept while no host listens.
const MAX_QUEUED: usize = 32;
/// Bytes waiting for a slow host, at most.
const MAX_OUTBOX: usize = 256 * 1024;

pub fn serve(declared: Declared, events: Receiver<ServiceEvent>) {
    let mut queued = VecDeque::new();
    loop {
        match crate::find_port(QUETZAL_PORT) {
            Some(device) => {
                if let Err(err) = run(&device, &declared, &events, &mut queued) {
                    eprintln!("quetzal-agent: {}: {err}", device.display());
                }
            }
            // A VM without the port (another platform, an older node).
            None => std::thread::sleep(Duration::from_secs(5)),
        }
        keep(&mut queued, &events);
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Moves new service events into the queue, dropping the oldest past its
/// bound.
fn keep(queued: &mut VecDeque<ServiceEvent>, events: &Receiver<ServiceEvent>) {
    while let Ok(event) = events.try_recv() {
        if queued.len() == MAX_QUEUED {
            queued.pop_front();
        }
        queued.push_back(event);
    }
}

/// Whole messages not yet taken by the host.
#[derive(Default)]
struct Outbox(Vec<u8>);

impl Outbox {
    /// Queues one message, or drops it if the host is too far behind.
    fn push(&mut self, message: &ToHost) -> bool {
        let bytes = line(message);
        if self.0.len() + bytes.len() > MAX_OUTBOX {
            return false;
        }
        self.0.extend_from_slice(&bytes);
        true
    }

    fn flush(&mut self, port: &mut std::fs::File) -> std::io::Result<()> {
        while !self.0.is_empty() {
            match port.write(&self.0) {
                Ok(written) => {
                    self.0.drain(..written);
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

fn run(
    device: &Path,
    declared: &Declared,
    events: &Receiver<ServiceEvent>,
    queued: &mut VecDeque<ServiceEvent>,
) -> std::io::Result<()> {
    let mut port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(device)?;
    let mut framer = Framer::new(MAX_PORT_MESSAGE);
    let mut outbox = Outbox::default();
    let mut host_listens = false;
    let mut next_telemetry = Instant::now();
    let mut buffer = vec![0u8; 16 * 1024];
    let every = Duration::from_secs(TELEMETRY_EVERY_SECS);
    loop {
        let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, 500u16)?;
        let ready = fds[0].revents().unwrap_or(PollFlags::empty());
        keep(queued, events);
        // The port hangs up while no host has its end open.
        if ready.contains(PollFlags::POLLHUP) {
            host_listens = false;
            outbox = Outbox::default();
            framer.reset();
            // Not a busy loop while no host listens; short, because a
            // clone resumed from its template's state sees one hang-up
            // just before the host it answers to connects.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        if !host_listens {
            host_listens = true;
            outbox.push(&ToHost::Hello {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            });
            next_telemetry = Instant::now();
        }
        if ready.contains(PollFlags::POLLIN) {
            match port.read(&mut buffer) {
                Ok(read) => {
                    // An object past the bound is dropped by the framer.
                    for object in framer.push(&buffer[..read]).unwrap_or_default() {
                        if let Some(answer) = handle(&object, declared) {
                            outbox.push(&answer);
                        }
                    }
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => {}
                Err(err) => return Err(err),
            }
        }
        while let Some(event) = queued.front() {
            if !outbox.push(&ToHost::Service(event.clone())) {
                break;
            }
            queued.pop_front();
        }
        if Instant::now() >= next_telemetry {
            outbox.push(&ToHost::Telemetry(crate::telemetry::now()));
            next_telemetry += every;
            if next_telemetry < Instant::now() {
                next_telemetry = Instant::now() + every;
            }
        }
        outbox.flush(&mut port)?;
    }
}

/// What the agent does with one message from the host, and its answer.
fn handle(object: &[u8], declared: &Declared) -> Option<ToHost> {
    match serde_json::from_slice::<ToGuest>(object).ok()? {
        ToGuest::Services(mut services) => {
            services.truncate(MAX_SERVICES);
            *declared.lock().expect("never poisoned") = services;
            None
        }
        ToGuest::Hello {} => Some(ToHost::Hello {
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }),
        ToGuest::Reidentify(request) => {
            Some(ToHost::Reidentified(crate::identity::reidentify(&request)))
        }
    }
}
