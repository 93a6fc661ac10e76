//! Quetzal's engine layer: a typed VM spec goes in, a running VM with typed
//! events comes out. The node never builds a QEMU command line or speaks QMP
//! itself; engines never touch the node's store.
//!
//! - [`accel`] and [`host`]: what the host can do, and KVM-or-TCG.
//! - [`spec`]: the validated [`VmSpec`].
//! - [`qmp`]: the typed QMP client.
//! - [`qemu`]: the QEMU engine; [`disk`]: qcow2 overlays through qemu-img.

pub mod accel;
pub mod disk;
pub mod failpoint;
pub mod host;
pub mod qemu;
pub mod qmp;
pub mod spec;

use std::future::Future;
use std::path::Path;

use tokio::net::UnixStream;

pub use accel::Accel;
pub use qemu::{Lifetime, QemuEngine, QemuError, QemuVm};
pub use spec::VmSpec;

/// A VM's state as the engine sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// The process exists, the vCPUs have not run yet.
    Created,
    Running,
    Paused,
    Crashed,
    Stopped,
}

/// What happened to a VM, as told by its engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    Running,
    /// The vCPUs stopped: asked for, or by the engine itself (after a
    /// [`VmEvent::DiskError`]).
    Paused,
    /// A disk request failed and the engine paused the VM for it (a full
    /// host disk); it resumes when asked and fails again while the cause
    /// lasts.
    DiskError {
        no_space: bool,
        reason: String,
    },
    /// The power button was pressed; the guest decides what to do.
    PowerdownRequested,
    Reset {
        by_guest: bool,
    },
    /// The guest powered itself off.
    GuestPoweredOff,
    /// The host is shutting the VM down (quit, a signal).
    ShuttingDown {
        reason: String,
    },
    Crashed {
        reason: String,
    },
    /// The engine process is gone. `expected` is true after a guest poweroff
    /// or a requested stop, false when it died (killed, crashed).
    Exited {
        expected: bool,
    },
}

/// Something that can run VMs.
pub trait Engine {
    type Vm: EngineVm;
    type Error: std::error::Error;

    /// Starts the VM's process with its vCPUs not yet running; attach the
    /// console, then call [`EngineVm::start`].
    fn create(
        &self,
        spec: &VmSpec,
        run_dir: &Path,
        lifetime: Lifetime,
    ) -> impl Future<Output = Result<Self::Vm, Self::Error>> + Send;
}

/// One VM created by an [`Engine`].
pub trait EngineVm {
    type Error: std::error::Error;

    /// A new connection to the first serial port.
    fn console(&self) -> impl Future<Output = Result<UnixStream, Self::Error>> + Send;
    /// Lets the vCPUs of a created VM run.
    fn start(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn pause(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn resume(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Asks the guest to shut down (ACPI power button).
    fn powerdown(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Ends the VM at once.
    fn stop(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn state(&self) -> impl Future<Output = Result<VmState, Self::Error>> + Send;
    /// The next state change; [`VmEvent::Exited`] once the VM is gone, and
    /// again on every later call.
    fn next_event(&mut self) -> impl Future<Output = VmEvent> + Send;
}
