//! CPU for the VM its user is at: input on a VM's console or screen gives
//! its cgroup [`CpuWeight::BOOSTED`] (four times an idle VM's share of
//! contended CPUs) until there has been none for [`ACTIVE_FOR`]. The
//! cgroup's weight is the truth (a restarted VM's new cgroup starts
//! normal; a re-attached one is checked like any other), and a `boost`
//! event records each change, never a repeat.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quetzal_api::EventKind;
use quetzal_engine::Engine;
use quetzal_engine::spec::CpuWeight;

use super::Node;

/// How long input keeps a VM boosted.
pub const ACTIVE_FOR: Duration = Duration::from_secs(30);
/// How often boosted VMs are checked for having gone idle.
const CHECK: Duration = Duration::from_secs(2);

impl Node {
    /// A user typed, clicked or moved the pointer on VM `name`'s console
    /// or screen.
    pub fn console_input(&self, name: &str) {
        let slot = self.slot(name);
        *slot.last_input.lock().expect("never poisoned") = Some(Instant::now());
        // The weight is read from the cgroup each time (a file read): it
        // is the truth, whatever restarted meanwhile.
        if self.cpu_weight(name) == Some(CpuWeight::NORMAL) {
            self.set_weight(name, CpuWeight::BOOSTED, "input on its console or screen");
        }
    }

    /// The running VM's CPU weight, where its engine has a hold on it.
    pub fn cpu_weight(&self, name: &str) -> Option<CpuWeight> {
        let record = self.record(name).ok()?;
        self.slot(name).live()?;
        let engine = self.engine_of(&record).ok()?;
        engine.cpu_weight(&self.vm_dir(name))
    }

    fn set_weight(&self, name: &str, weight: CpuWeight, why: &str) {
        let Ok(record) = self.record(name) else {
            return;
        };
        let Ok(engine) = self.engine_of(&record) else {
            return;
        };
        if engine.set_cpu_weight(&self.vm_dir(name), weight) {
            let share = weight.get() / CpuWeight::NORMAL.get();
            let cause = if weight == CpuWeight::NORMAL {
                format!("CPU weight {}: {why}", weight.get())
            } else {
                format!("CPU weight {} ({share}× an idle VM's): {why}", weight.get())
            };
            tracing::info!(vm = %name, %cause, "boost");
            self.note(name, EventKind::Boost, &cause);
        }
    }

    /// Takes the boost back from VMs without input for [`ACTIVE_FOR`].
    pub(super) fn watch_activity(self: &Arc<Self>) {
        let node = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CHECK).await;
                let Some(node) = node.upgrade() else {
                    return;
                };
                let running: Vec<(String, Option<Instant>)> = {
                    let slots = node.slots.lock().expect("never poisoned");
                    slots
                        .iter()
                        .filter(|(_, slot)| slot.live().is_some())
                        .map(|(name, slot)| {
                            (
                                name.clone(),
                                *slot.last_input.lock().expect("never poisoned"),
                            )
                        })
                        .collect()
                };
                for (name, last) in running {
                    let idle = last.is_none_or(|at| at.elapsed() >= ACTIVE_FOR);
                    if idle && node.cpu_weight(&name) == Some(CpuWeight::BOOSTED) {
                        let why = format!("no input for {} s", ACTIVE_FOR.as_secs());
                        node.set_weight(&name, CpuWeight::NORMAL, &why);
                    }
                }
            }
        });
    }
}
