//! The node's errors: one type per part — [`VmError`] (lifecycle and
//! creation), [`SnapshotError`], [`TemplateError`], [`NetworkError`],
//! [`OperationError`] — whose variants carry what the message names,
//! [`Fault`] for what failed underneath (the host, the store, an engine)
//! with the error it wraps as its source, and [`NodeError`] over them.
//! Every variant has one [`ErrorKind`]; the API answers each kind with one
//! status and code, never by reading a message.

use std::path::PathBuf;

use quetzal_api::{DesktopState, OperationKind, OperationState, VmState};
use quetzal_engine::DiskError;
use quetzal_image::ImageError;

use crate::lifecycle::Refused;
use crate::store::StoreError;
use crate::supervisor::CallError;

/// What kind of failure an error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// What the request names does not exist.
    NotFound,
    /// The request is fine, but what it acts on refuses it now.
    Conflict,
    /// The request itself is wrong.
    Invalid,
    /// The host has no room for what the request makes.
    InsufficientStorage,
    /// Something failed underneath; not the client's doing.
    Internal,
    /// Long work stopped because a user asked.
    Cancelled,
    /// The VM has no guest agent to talk to now (not running, none
    /// installed, or not answering).
    AgentUnavailable,
    /// The guest agent did not answer in time.
    AgentTimeout,
}

impl ErrorKind {
    /// The stable code clients see (`error.code`).
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Invalid => "invalid_request",
            ErrorKind::InsufficientStorage => "insufficient_storage",
            ErrorKind::Internal => "internal",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::AgentUnavailable => "agent_unavailable",
            ErrorKind::AgentTimeout => "agent_timeout",
        }
    }
}

/// Any error of the node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Operation(#[from] OperationError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Access(#[from] super::access::AccessError),
    /// A VM's guest agent.
    #[error("VM {vm}: {source}")]
    Agent {
        vm: String,
        #[source]
        source: crate::agent::AgentError,
    },
    #[error(transparent)]
    Fault(#[from] Fault),
}

impl NodeError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            NodeError::Vm(err) => err.kind(),
            NodeError::Snapshot(err) => err.kind(),
            NodeError::Template(err) => err.kind(),
            NodeError::Network(err) => err.kind(),
            NodeError::Operation(err) => err.kind(),
            NodeError::Pool(err) => err.kind(),
            NodeError::Access(err) => err.kind(),
            NodeError::Agent { source, .. } => match source {
                crate::agent::AgentError::Unavailable
                | crate::agent::AgentError::Unsupported(_) => ErrorKind::AgentUnavailable,
                crate::agent::AgentError::Timeout { .. } => ErrorKind::AgentTimeout,
                crate::agent::AgentError::Refused { .. } => ErrorKind::Invalid,
                crate::agent::AgentError::Garbled { .. } => ErrorKind::Internal,
            },
            NodeError::Fault(err) => err.kind(),
        }
    }

    /// The stable code clients see (`error.code`).
    pub fn code(&self) -> &'static str {
        self.kind().code()
    }
}

/// What failed underneath a request.
#[derive(Debug, thiserror::Error)]
pub enum Fault {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A disk job of the engine (out of space, cancelled, or failed).
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A command to a running VM.
    #[error(transparent)]
    Engine(#[from] CallError),
    /// An engine, bringing a VM up.
    #[error(transparent)]
    Boot(#[from] quetzal_engine::AnyError),
    /// A stored VM that no longer makes a valid spec.
    #[error(transparent)]
    Spec(#[from] quetzal_engine::spec::SpecError),
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The host side of managed networks (bridges, dnsmasq, nftables).
    #[error(transparent)]
    HostNetwork(#[from] crate::net::HostNetError),
    /// A task of ours ended without an answer (it panicked).
    #[error("{what} failed: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// What the code promises did not hold (a bug of ours).
    #[error("{0}")]
    Broken(&'static str),
    /// The kernel's random numbers.
    #[error("/dev/urandom: {0}")]
    Random(#[source] std::io::Error),
}

impl Fault {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Fault {
        let path = path.into();
        move |source| Fault::Io { path, source }
    }

    pub fn task(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> Fault {
        move |source| Fault::Task { what, source }
    }

    fn kind(&self) -> ErrorKind {
        match self {
            Fault::Disk(DiskError::NoSpace { .. }) => ErrorKind::InsufficientStorage,
            Fault::Disk(DiskError::Cancelled { .. }) => ErrorKind::Cancelled,
            Fault::Engine(err) if err.no_space => ErrorKind::InsufficientStorage,
            _ => ErrorKind::Internal,
        }
    }
}

impl From<CallError> for NodeError {
    fn from(err: CallError) -> Self {
        Fault::Engine(err).into()
    }
}

impl From<DiskError> for NodeError {
    fn from(err: DiskError) -> Self {
        Fault::Disk(err).into()
    }
}

/// A store error, as the VM it is about: one that names a VM that is
/// missing, taken or changed is the client's; the rest are faults.
impl From<StoreError> for NodeError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Exists(name) => VmError::Exists { name }.into(),
            StoreError::Missing(name) => VmError::NotFound { name }.into(),
            StoreError::Stale { name, .. } => VmError::Changed { name }.into(),
            other => Fault::Store(other).into(),
        }
    }
}

/// A VM's lifecycle and creation.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("no VM named {name}")]
    NotFound { name: String },
    #[error("a VM named {name} already exists")]
    Exists { name: String },
    /// Its record moved on between reading and writing it.
    #[error("VM {name} changed meanwhile; try again")]
    Changed { name: String },
    /// The state machine has no such transition.
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("VM {name} is not running")]
    NotRunning { name: String },
    #[error("VM {name} runs on the {engine} engine, which this node does not have")]
    NoEngine { name: String, engine: String },
    /// The guest has no clipboard the node can reach.
    #[error("VM {name} has no clipboard to share: {why}")]
    NoClipboard { name: String, why: String },
    /// A create request the node cannot honour as asked.
    #[error("{reason}")]
    Invalid { reason: String },
    #[error(
        "the name {name} is too long for this node's data directory: at most {max} characters here"
    )]
    NameTooLong { name: String, max: usize },
    #[error("only {free_mib} MiB free in {}; a VM needs at least {needed_mib} MiB", dir.display())]
    NoRoom {
        dir: PathBuf,
        free_mib: u64,
        needed_mib: u64,
    },
    /// It could not be brought up (what stopped it is its source).
    #[error("start failed: {source}")]
    Boot {
        name: String,
        #[source]
        source: Box<NodeError>,
    },
    #[error("NIC number {nic} is beyond what TAP names can hold")]
    NicBeyondTaps { nic: u32 },
    #[error("no free MAC address after {draws} random draws")]
    NoFreeMac { draws: u32 },
    #[error("the image build failed: {source}")]
    ImageBuild {
        image: String,
        #[source]
        source: ImageError,
    },
}

impl VmError {
    fn kind(&self) -> ErrorKind {
        match self {
            VmError::NotFound { .. } => ErrorKind::NotFound,
            VmError::Exists { .. }
            | VmError::Changed { .. }
            | VmError::Refused(_)
            | VmError::NotRunning { .. }
            | VmError::NoEngine { .. }
            | VmError::NoClipboard { .. } => ErrorKind::Conflict,
            VmError::Invalid { .. } | VmError::NameTooLong { .. } => ErrorKind::Invalid,
            VmError::NoRoom { .. } => ErrorKind::InsufficientStorage,
            VmError::Boot { .. }
            | VmError::NicBeyondTaps { .. }
            | VmError::NoFreeMac { .. }
            | VmError::ImageBuild { .. } => ErrorKind::Internal,
        }
    }
}

/// A VM's snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("VM {vm} has no snapshot named {name}")]
    NotFound { vm: String, name: String },
    #[error("VM {vm} already has a snapshot named {name}")]
    Exists { vm: String, name: String },
    #[error("{reason}")]
    InvalidName { reason: String },
    #[error("cannot {action} a VM that is {}", state.as_str())]
    Refused {
        action: &'static str,
        state: VmState,
    },
    #[error(
        "snapshot {name} has no memory state (it was taken while {vm} was stopped); stop the VM to revert to it"
    )]
    NoMemory { vm: String, name: String },
    /// The engine's snapshot job failed.
    #[error("snapshot failed: {source}")]
    Failed {
        vm: String,
        #[source]
        source: CallError,
    },
}

impl SnapshotError {
    fn kind(&self) -> ErrorKind {
        match self {
            SnapshotError::NotFound { .. } => ErrorKind::NotFound,
            SnapshotError::Exists { .. }
            | SnapshotError::Refused { .. }
            | SnapshotError::NoMemory { .. } => ErrorKind::Conflict,
            SnapshotError::InvalidName { .. } => ErrorKind::Invalid,
            SnapshotError::Failed { source, .. } if source.no_space => {
                ErrorKind::InsufficientStorage
            }
            SnapshotError::Failed { .. } => ErrorKind::Internal,
        }
    }
}

/// Templates and images, and the VMs made from them.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("no image named {name}")]
    ImageNotFound { name: String },
    #[error("image {name} is in use by {}; delete them first", users.join(", "))]
    ImageInUse { name: String, users: Vec<String> },
    #[error("no template named {name}")]
    NotFound { name: String },
    #[error("a template named {name} already exists")]
    Exists { name: String },
    #[error("{reason}")]
    InvalidName { reason: String },
    #[error("give either image or template, not both")]
    ImageAndTemplate,
    /// The image a request names is unknown or not built.
    #[error(transparent)]
    Image(ImageError),
    #[error("cannot {action} a VM that is {}; stop it first", state.as_str())]
    NotStopped {
        action: &'static str,
        state: VmState,
    },
    #[error("cannot make a warm template of a VM that is {}; start it first", state.as_str())]
    NotRunning { state: VmState },
    #[error(
        "VM {vm} runs without a RAM file of its own; a warm template is made of a VM created \
         with --ram-file (ram_file), started by this quetzald, and not an instant clone's first run"
    )]
    NoRamFile { vm: String },
    #[error("VM {vm} is a linked clone of template {template}; make a full clone of it first")]
    LinkedClone { vm: String, template: String },
    #[error(
        "template {name} has linked clones: {}; delete them first (full clones do not count)",
        clones.join(", ")
    )]
    HasLinkedClones { name: String, clones: Vec<String> },
    #[error("template {name} makes the desktops of pool {}; change or delete the pool first", pools.join(", "))]
    UsedByPools { name: String, pools: Vec<String> },
}

impl TemplateError {
    fn kind(&self) -> ErrorKind {
        match self {
            TemplateError::NotFound { .. } | TemplateError::ImageNotFound { .. } => {
                ErrorKind::NotFound
            }
            TemplateError::InvalidName { .. }
            | TemplateError::ImageAndTemplate
            | TemplateError::Image(_) => ErrorKind::Invalid,
            TemplateError::Exists { .. }
            | TemplateError::NotStopped { .. }
            | TemplateError::NotRunning { .. }
            | TemplateError::NoRamFile { .. }
            | TemplateError::LinkedClone { .. }
            | TemplateError::HasLinkedClones { .. }
            | TemplateError::UsedByPools { .. }
            | TemplateError::ImageInUse { .. } => ErrorKind::Conflict,
        }
    }
}

/// Managed networks.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("no network named {name}")]
    NotFound { name: String },
    #[error("a network named {name} already exists")]
    Exists { name: String },
    #[error("{reason}")]
    Invalid { reason: String },
    #[error("`user` names user-mode networking; pick another network name")]
    UserIsReserved,
    /// This host cannot have managed networks (no root, no `ip`...).
    #[error("cannot create networks here: {reason}")]
    Unavailable { reason: String },
    #[error("network {name} is not available: {reason}")]
    NotAvailable { name: String, reason: String },
    #[error("{subnet} overlaps network {other} ({other_subnet})")]
    OverlapsNetwork {
        subnet: String,
        other: String,
        other_subnet: String,
    },
    #[error("{subnet} overlaps the host's route to {route} on {device}")]
    OverlapsRoute {
        subnet: String,
        route: String,
        device: String,
    },
    #[error("no free /24 left in 10.80.0.0-10.95.255.0")]
    NoFreeSubnet,
    #[error("the default network belongs to the node and cannot be deleted")]
    DefaultIsTheNodes,
    #[error("network {name} is in use by {}; delete those VMs first", users.join(", "))]
    InUse { name: String, users: Vec<String> },
}

impl NetworkError {
    fn kind(&self) -> ErrorKind {
        match self {
            NetworkError::NotFound { .. } => ErrorKind::NotFound,
            NetworkError::Invalid { .. } | NetworkError::UserIsReserved => ErrorKind::Invalid,
            _ => ErrorKind::Conflict,
        }
    }
}

/// Desktop pools.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no pool named {name}")]
    NotFound { name: String },
    #[error("a pool named {name} already exists")]
    Exists { name: String },
    #[error("{reason}")]
    Invalid { reason: String },
    #[error("pool {name} has no desktop free: all {max} are taken (raise its max, or release one)")]
    Full { name: String, max: u32 },
    #[error("pool {pool} has no desktop {vm}")]
    NoSuchDesktop { pool: String, vm: String },
    #[error("desktop {vm} is not assigned (it is {}); only an assigned desktop is released", state.as_str())]
    NotAssigned { vm: String, state: DesktopState },
    #[error("pool {name} has desktops its users hold: {}; release them first", desktops.join(", "))]
    InUse { name: String, desktops: Vec<String> },
    #[error("pool {name} is still making desktop {vm}; try again when it is made")]
    Busy { name: String, vm: String },
    #[error("making desktop {vm} started a copy (operation {operation}) instead of a clone")]
    Unexpected { vm: String, operation: String },
    /// More than the host's memory can hold.
    #[error("pool {name} is too large for this host: {why}")]
    TooLarge { name: String, why: String },
}

impl PoolError {
    fn kind(&self) -> ErrorKind {
        match self {
            PoolError::NotFound { .. } | PoolError::NoSuchDesktop { .. } => ErrorKind::NotFound,
            PoolError::Invalid { .. } => ErrorKind::Invalid,
            PoolError::Unexpected { .. } => ErrorKind::Internal,
            PoolError::TooLarge { .. } => ErrorKind::InsufficientStorage,
            PoolError::Exists { .. }
            | PoolError::Full { .. }
            | PoolError::NotAssigned { .. }
            | PoolError::InUse { .. }
            | PoolError::Busy { .. } => ErrorKind::Conflict,
        }
    }
}

/// Operations.
#[derive(Debug, thiserror::Error)]
pub enum OperationError {
    #[error("no operation with id {id}")]
    NotFound { id: String },
    #[error("operation {id} has already {}", state.as_str())]
    Finished { id: String, state: OperationState },
    #[error("a {} operation cannot be cancelled", kind.as_str())]
    NotCancellable { kind: OperationKind },
    #[error("operation {id} is ending already")]
    Ending { id: String },
}

impl OperationError {
    fn kind(&self) -> ErrorKind {
        match self {
            OperationError::NotFound { .. } => ErrorKind::NotFound,
            _ => ErrorKind::Conflict,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_comes_from_the_error_never_from_its_text() {
        let no_space = NodeError::from(CallError {
            message: "it said nothing about space".to_owned(),
            no_space: true,
        });
        let says_space = NodeError::from(CallError {
            message: "No space left on device".to_owned(),
            no_space: false,
        });

        assert_eq!(no_space.kind(), ErrorKind::InsufficientStorage);
        assert_eq!(says_space.kind(), ErrorKind::Internal);
    }

    #[test]
    fn a_store_error_about_a_vm_is_the_clients_and_the_rest_are_faults() {
        let missing = NodeError::from(StoreError::Missing("web".to_owned()));
        let stale = NodeError::from(StoreError::Stale {
            name: "web".to_owned(),
            expected: 3,
        });
        let corrupt = NodeError::from(StoreError::Corrupt("labels of web".to_owned()));

        assert_eq!(
            (missing.kind(), missing.to_string().as_str()),
            (ErrorKind::NotFound, "no VM named web")
        );
        assert_eq!(stale.kind(), ErrorKind::Conflict);
        assert_eq!(corrupt.kind(), ErrorKind::Internal);
    }

    #[test]
    fn a_fault_names_its_context_and_keeps_its_source() {
        let denied = std::io::Error::from_raw_os_error(nix::libc::EACCES);
        let err = NodeError::from(Fault::io("/data/vms/web")(denied));

        assert!(err.to_string().starts_with("/data/vms/web: "), "{err}");
        let source = std::error::Error::source(&err).expect("the io error");
        assert_eq!(
            source.to_string(),
            std::io::Error::from_raw_os_error(nix::libc::EACCES).to_string()
        );
    }
}
