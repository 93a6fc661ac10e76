//! Bounds on the long-lived connections a client can hold open: each VM's
//! console and screen viewers, and the event streams. Past them a new one
//! is refused with `429` instead of costing the daemon a task, a socket
//! and buffers each, without end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ApiError;

/// Console and screen (VNC) viewers of one VM at once.
pub const VIEWERS_PER_VM: usize = 8;
/// Event streams at once.
pub const EVENT_STREAMS: usize = 64;

#[derive(Debug)]
pub struct Viewers {
    per_vm: Mutex<HashMap<String, Arc<Semaphore>>>,
    streams: Arc<Semaphore>,
}

impl Default for Viewers {
    fn default() -> Self {
        Viewers {
            per_vm: Mutex::default(),
            streams: Arc::new(Semaphore::new(EVENT_STREAMS)),
        }
    }
}

impl Viewers {
    /// A place among VM `name`'s viewers, held until the viewer leaves.
    pub fn of_vm(&self, name: &str) -> Result<OwnedSemaphorePermit, ApiError> {
        let seats = Arc::clone(
            self.per_vm
                .lock()
                .expect("never poisoned: no panics while held")
                .entry(name.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(VIEWERS_PER_VM))),
        );
        seats.try_acquire_owned().map_err(|_| {
            too_many(format!(
                "VM {name} has {VIEWERS_PER_VM} console and screen viewers already; close one first"
            ))
        })
    }

    /// A place among the event streams, held until the stream ends.
    pub fn stream(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        Arc::clone(&self.streams).try_acquire_owned().map_err(|_| {
            too_many(format!(
                "{EVENT_STREAMS} event streams are open already; close one first"
            ))
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
            .map(|_| viewers.of_vm("web").unwrap())
            .collect();

        let refused = viewers.of_vm("web");
        let other_vm = viewers.of_vm("db");
        seats.pop();
        let again = viewers.of_vm("web");

        assert!(refused.is_err());
        assert!(other_vm.is_ok(), "every VM has its own seats");
        assert!(again.is_ok());
    }

    #[test]
    fn event_streams_are_bounded_too() {
        let viewers = Viewers::default();
        let streams: Vec<_> = (0..EVENT_STREAMS)
            .map(|_| viewers.stream().unwrap())
            .collect();

        assert!(viewers.stream().is_err());
        drop(streams);
        assert!(viewers.stream().is_ok());
    }
}
