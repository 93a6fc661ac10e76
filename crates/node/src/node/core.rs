//! What every part of a node shares: its store and its event stream.

use std::sync::{Mutex, MutexGuard};

use quetzal_api::EventKind;
use tokio::sync::broadcast;

use super::Published;
use crate::store::Store;

#[derive(Debug)]
pub(super) struct Core {
    store: Mutex<Box<dyn Store>>,
    events: broadcast::Sender<Published>,
}

impl Core {
    pub(super) fn new(store: Box<dyn Store>) -> Self {
        let (events, _) = broadcast::channel(1024);
        Core {
            store: Mutex::new(store),
            events,
        }
    }

    /// The store, for one short step (never held across an `.await`).
    pub(super) fn store(&self) -> MutexGuard<'_, Box<dyn Store>> {
        self.store
            .lock()
            .expect("never poisoned: no panics while held")
    }

    pub(super) fn subscribe(&self) -> broadcast::Receiver<Published> {
        self.events.subscribe()
    }

    /// Sends an event or an operation's news to every subscriber.
    pub(super) fn publish(&self, published: Published) {
        if let Published::Event(event) = &published {
            tracing::info!(vm = %event.vm, kind = %event.kind, cause = %event.cause, "vm event");
        }
        let _ = self.events.send(published);
    }

    /// Records and publishes an event that changes no state.
    pub(super) fn note(&self, name: &str, kind: EventKind, cause: &str) {
        let noted = self.store().note(name, kind, cause);
        match noted {
            Ok(event) => self.publish(event.into()),
            Err(err) => tracing::warn!(vm = %name, error = %err, "cannot record event"),
        }
    }
}
