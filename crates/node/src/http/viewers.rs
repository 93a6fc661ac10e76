//! Bounds on the long-lived connections a client can hold open: each VM's
//! console and screen viewers, the event streams, and both per caller. Past them a new one
//! is refused with `429` instead of costing the daemon a task, a socket
//! and buffers each, without end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ApiError;

/// Console and screen (VNC) viewers of one VM at once.
pub const VIEWERS_PER_VM: usize = 8;
/// Consoles and screens one caller (a token, or `local`) holds at once,
/// over all VMs.
pub const VIEWERS_PER_CALLER: usize = 16;
/// Event streams at once.
pub const EVENT_STREAMS: usize = 64;
/// Event streams one caller holds at once.
pub const STREAMS_PER_CALLER: usize = 8;

#[derive(Debug)]
pub struct Viewers {
    per_vm: Mutex<HashMap<String, Arc<Semaphore>>>,
    per_caller: Mutex<HashMap<String, Arc<Semaphore>>>,
    streams: Arc<Semaphore>,
    streams_per_caller: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Default for Viewers {
    fn default() -> Self {
        Viewers {
            per_vm: Mutex::default(),
            per_caller: Mutex::default(),
            streams: Arc::new(Semaphore::new(EVENT_STREAMS)),
            streams_per_caller: Mutex::default(),
        }
    }
}

/// A place among the viewers, held until the viewer leaves.
#[derive(Debug)]
pub struct Seat {
    _permits: [OwnedSemaphorePermit; 2],
}

/// The semaphore of `key` in `map`, made with `size` permits.
fn seats(map: &Mutex<HashMap<String, Arc<Semaphore>>>, key: &str, size: usize) -> Arc<Semaphore> {
    Arc::clone(
        map.lock()
            .expect("never poisoned: no panics while held")
            .entry(key.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(size))),
    )
}

impl Viewers {
    /// A place among VM `name`'s viewers and among `who`'s.
    pub fn of_vm(&self, name: &str, who: &str) -> Result<Seat, ApiError> {
        let vm = seats(&self.per_vm, name, VIEWERS_PER_VM)
            .try_acquire_owned()
            .map_err(|_| {
                too_many(format!(
                    "VM {name} has {VIEWERS_PER_VM} console and screen viewers already; close one first"
                ))
            })?;
        let caller = seats(&self.per_caller, who, VIEWERS_PER_CALLER)
            .try_acquire_owned()
            .map_err(|_| {
                too_many(format!(
                    "{who} has {VIEWERS_PER_CALLER} consoles and screens open already; close one first"
                ))
            })?;
        Ok(Seat {
            _permits: [vm, caller],
        })
    }

    /// A place among the event streams and among `who`'s.
    pub fn stream(&self, who: &str) -> Result<Seat, ApiError> {
        let all = Arc::clone(&self.streams).try_acquire_owned().map_err(|_| {
            too_many(format!(
                "{EVENT_STREAMS} event streams are open already; close one first"
            ))
        })?;
        let caller = seats(&self.streams_per_caller, who, STREAMS_PER_CALLER)
            .try_acquire_owned()
            .map_err(|_| {
                too_many(format!(
                    "{who} has {STREAMS_PER_CALLER} event streams open already; close one first"
                ))
            })?;
        Ok(Seat {
            _permits: [all, caller],
        })
    }
}

fn too_many(message: String) -> ApiError {
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", message)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests fail loudly by design.

    use super::*;

    #[test]
    fn a_vm_takes_so_many_viewers_and_a_seat_comes_back_when_one_leaves() {
        let viewers = Viewers::default();
        let mut seats: Vec<_> = (0..VIEWERS_PER_VM)
            .map(|_| viewers.of_vm("web", "ops").unwrap())
            .collect();

        let refused = viewers.of_vm("web", "ops");
        let other_vm = viewers.of_vm("db", "ops");
        seats.pop();
        let again = viewers.of_vm("web", "ops");

        assert!(refused.is_err());
        assert!(other_vm.is_ok(), "every VM has its own seats");
        assert!(again.is_ok());
    }

    #[test]
    fn event_streams_are_bounded_too() {
        let viewers = Viewers::default();
        let streams: Vec<_> = (0..EVENT_STREAMS)
            .map(|i| viewers.stream(&format!("token{}", i % 10)).unwrap())
            .collect();

        assert!(viewers.stream("another").is_err());
        drop(streams);
        assert!(viewers.stream("another").is_ok());
    }

    #[test]
    fn one_caller_holds_so_many_viewers_and_streams_over_all_vms() {
        let viewers = Viewers::default();
        let seats: Vec<_> = (0..VIEWERS_PER_CALLER)
            .map(|i| viewers.of_vm(&format!("vm{i}"), "ops").unwrap())
            .collect();
        let streams: Vec<_> = (0..STREAMS_PER_CALLER)
            .map(|_| viewers.stream("ops").unwrap())
            .collect();

        assert!(viewers.of_vm("another", "ops").is_err());
        assert!(viewers.stream("ops").is_err());
        assert!(viewers.of_vm("another", "other-token").is_ok());
        assert!(viewers.stream("other-token").is_ok());
        drop((seats, streams));
        assert!(viewers.of_vm("another", "ops").is_ok());
    }
}
