//! The REST API's types: what clients send and what quetzald answers.
//! Requests reject unknown fields; answers do not, so an older client
//! keeps working against a newer daemon that added some.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A VM's state as the node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Its disk is being made (a full clone copying); an operation says
    /// how far it is.
    Creating,
    /// Not running (never started, stopped, or powered off by its guest).
    Stopped,
    /// QEMU is starting.
    Starting,
    Running,
    Paused,
    /// Shutting down.
    Stopping,
    /// Its QEMU died or its guest panicked, and it was not restarted.
    Crashed,
    /// Moving to another node (cluster only).
    Migrating,
    /// Its node cannot be reached, so what it does is not known (cluster
    /// only). An older client also shows states it does not know as this.
    #[serde(other)]
    Unknown,
}

impl VmState {
    pub const ALL: [VmState; 9] = [
        VmState::Creating,
        VmState::Stopped,
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Stopping,
        VmState::Crashed,
        VmState::Migrating,
        VmState::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Crashed => "crashed",
            VmState::Migrating => "migrating",
            VmState::Unknown => "unknown",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == text)
    }
}

/// What the node does when a VM's QEMU ends without being asked to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Leave it stopped or crashed.
    #[default]
    Never,
    /// Restart it (with back-off) when QEMU dies or the guest panics.
    OnFailure,
    /// Restart it whenever it ends, even when the guest powers off.
    Always,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Never => "never",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::Never, Self::OnFailure, Self::Always]
            .into_iter()
            .find(|policy| policy.as_str() == text)
    }
}

/// `POST /api/v1/vms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// 1-63 letters, digits, `-` or `_`, starting with a letter or digit.
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// A built image [default: `tiny`]; not with `template`.
    #[serde(default)]
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$",
        min_length = 1,
        max_length = 63
    )]
    pub image: Option<String>,
    /// Make the VM a clone of this template.
    #[serde(default)]
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$",
        min_length = 1,
        max_length = 63
    )]
    pub template: Option<String>,
    /// With `template`: copy the template's disk (an independent VM)
    /// instead of a linked clone (a copy-on-write overlay on it).
    #[serde(default)]
    pub full_clone: bool,
    /// Virtual CPUs.
    #[serde(default = "default_cpus")]
    #[schema(minimum = 1, maximum = 255, default = 1)]
    pub cpus: u32,
    /// Memory in MiB: at least 32, at most the host's.
    #[serde(default = "default_memory")]
    #[schema(minimum = 32, default = 256)]
    pub memory_mib: u64,
    /// The root disk's size in MiB (at most 16 TiB); defaults to the
    /// image's, and cannot be smaller.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 16777216)]
    pub disk_mib: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// A managed network, or `user` for QEMU's user-mode networking
    /// [default: `default` where the node has managed networks, else
    /// `user`].
    #[serde(default)]
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$",
        min_length = 1,
        max_length = 63
    )]
    pub network: Option<String>,
    /// OpenSSH public keys (`TYPE BASE64 [COMMENT]` lines) authorized for
    /// the image's default user; only for images with cloud-init.
    #[serde(default)]
    #[schema(max_items = 32)]
    pub ssh_keys: Vec<String>,
    /// cloud-init user-data, passed through: a `#cloud-config` YAML
    /// mapping or a script (`#!`), at most 64 KiB; only for images with
    /// cloud-init.
    #[serde(default)]
    #[schema(max_length = 65536)]
    pub user_data: Option<String>,
    /// Services the guest's agent keeps running (quetzal-agent only).
    #[serde(default)]
    #[schema(max_items = 16)]
    pub services: Vec<WatchedService>,
    /// Keep its RAM in a file on the host's tmpfs, so that while it runs
    /// it can become a warm template (`template create --warm`). Without
    /// it the RAM is anonymous memory KSM can merge and the balloon's
    /// free-page reporting can give back to the host.
    #[serde(default)]
    pub ram_file: bool,
    /// Host CPUs for its vCPU threads, as a list like `0-3,6`: vCPU n
    /// runs on the n-th of them (round the list), and the rest of its
    /// process on all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$", max_length = 256)]
    pub cpu_pin: Option<String>,
}

/// A service the guest agent keeps running: a systemd `unit`, or a
/// `command` it runs itself with `/bin/sh -c` (exactly one of them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WatchedService {
    /// How its events name it.
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[A-Za-z0-9_.@:-]{1,64}$")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 4096)]
    pub command: Option<String>,
}

pub fn default_cpus() -> u32 {
    1
}

pub fn default_memory() -> u64 {
    256
}

/// A VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    pub name: String,
    pub state: VmState,
    pub image: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub labels: BTreeMap<String, String>,
    pub restart_policy: RestartPolicy,
    /// QEMU's process id while it runs.
    pub pid: Option<u32>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds of the last start, while it runs.
    pub started_at: Option<i64>,
    /// Automatic restarts since the last start by a user.
    pub restarts: u32,
    /// The engine that runs it (`qemu`).
    #[serde(default)]
    pub engine: String,
    /// The template this VM is a linked clone of (its disk is an overlay
    /// on the template's).
    pub linked_to: Option<String>,
    /// Its own identity, given to the guest (`/etc/machine-id` in tiny);
    /// every clone gets a new one.
    pub machine_id: Option<String>,
    /// The managed network its NIC is on, or `user` (user-mode: reachable
    /// from nowhere, no address shown).
    pub network: String,
    /// Its NIC's MAC address.
    pub mac: String,
    /// Its IPv4 addresses: what its guest agent reports, else what its
    /// network's DHCP server leased to it.
    pub addresses: Vec<String>,
    /// Its guest agent, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<Agent>,
    /// What its cloud-init seed carries, for a VM of a cloud-init image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
    /// The services its guest agent keeps running.
    #[serde(default)]
    pub services: Vec<WatchedService>,
    /// Its RAM is a file on the host's tmpfs (it can become a warm
    /// template while it runs).
    #[serde(default)]
    pub ram_file: bool,
    /// The host CPUs its vCPU threads are pinned to (`0-3,6`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_pin: Option<String>,
    /// Its share of contended host CPU time while it runs (cgroup v2's
    /// `cpu.weight` units: 100 normal, 400 while its user is at it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// How its process holds host memory, while it runs (in `GET
    /// /api/v1/vms/{name}` only, not in lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_memory: Option<VmMemory>,
    /// Memory in use as the guest itself counts it, while it runs and
    /// says so (its agent's telemetry, else the balloon's statistics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_memory: Option<GuestMemory>,
    /// The generation id its guest sees (its `vmgenid`, new on every
    /// start: an instant clone's differs from its template's), while it
    /// runs under this daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_id: Option<String>,
}

/// A running guest's memory, as the guest counts it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GuestMemory {
    /// Total less available (what `free` calls used).
    pub used_bytes: u64,
    /// What the guest's kernel has (a little less than allocated).
    pub total_bytes: u64,
    /// `agent` (quetzal-agent's telemetry) or `balloon` (the
    /// virtio-balloon driver's statistics).
    pub source: String,
}

/// A VM's cloud-init seed, as `vm show` tells it (never the user-data
/// itself, which may hold secrets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CloudInit {
    /// The user the SSH keys are for (`debian` on the debian image).
    pub user: Option<String>,
    /// The host name the guest is given.
    pub hostname: String,
    /// `SHA256:…` fingerprints of its authorized SSH keys.
    pub ssh_keys: Vec<String>,
    /// The size of its user-data, if it has any.
    pub user_data_bytes: Option<u64>,
}

/// A running VM's guest agent, as the node sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Agent {
    /// Whether the node is talking to it now.
    pub connected: bool,
    /// What it says it is (`quetzal-agent 0.1.0`, or stock QGA's version).
    #[serde(default)]
    pub version: Option<String>,
    /// When it last answered (Unix milliseconds).
    #[serde(default)]
    pub last_contact_at: Option<i64>,
    /// The guest's OS, as its agent says.
    #[serde(default)]
    pub os: Option<String>,
    /// The guest's host name, as its agent says.
    #[serde(default)]
    pub hostname: Option<String>,
    /// The guest's filesystems and how full they are, as its agent last
    /// said (`guest-get-fsinfo`, every 15 s).
    #[serde(default)]
    pub filesystems: Vec<GuestFilesystem>,
    /// The 1, 5 and 15 minute load averages, from quetzal-agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<[f64; 3]>,
    /// Whether quetzal-agent's own port is connected (telemetry, the
    /// service watchdog); stock agents never open it.
    #[serde(default)]
    pub port_connected: bool,
}

/// One filesystem inside a guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GuestFilesystem {
    pub mountpoint: String,
    #[serde(rename = "type")]
    pub fs_type: String,
    pub used_bytes: u64,
    pub total_bytes: u64,
}

/// `POST /api/v1/vms/{name}/exec`: run a command in the guest through its
/// agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    /// The program (a path in the guest, or a name its agent finds).
    #[schema(min_length = 1, max_length = 4096)]
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Bytes for its stdin, base64.
    #[serde(default)]
    pub stdin_b64: Option<String>,
    /// Seconds it may run (default 30, at most 3600).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3600)]
    pub timeout_secs: Option<u64>,
}

/// `GET`/`PUT /api/v1/vms/{name}/clipboard`: the text on the guest
/// desktop's clipboard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Clipboard {
    /// At most 1 MiB of UTF-8.
    pub text: String,
}

/// How a command run in the guest ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    /// Its exit code; none when a signal ended it.
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    #[serde(default)]
    pub signal: Option<i32>,
    /// Its stdout and stderr, base64 (at most 1 MiB each is kept).
    pub stdout_b64: String,
    pub stderr_b64: String,
    /// Whether more output came than was kept.
    #[serde(default)]
    pub truncated: bool,
}

/// What the guest's agent did to become a new machine
/// (`POST /api/v1/vms/{name}/reidentify`), step by step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Reidentified {
    pub steps: Vec<ReidentifyStep>,
}

/// One step of a re-identification: `clock`, `machine-id`, `hostname`,
/// `ssh-host-keys` or `dhcp`, and how it went (`ok`, `skipped: …` where
/// the guest has no such thing, `failed: …`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReidentifyStep {
    pub step: String,
    pub outcome: String,
}

/// `POST /api/v1/templates`: turn a stopped VM into a template, or with
/// `warm` a running one into a template that keeps its memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// The stopped VM whose disk becomes the template's (the VM is gone
    /// afterwards).
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$",
        min_length = 1,
        max_length = 63
    )]
    pub from_vm: String,
    /// Keep the running VM's memory and device state too: VMs made from
    /// the template are instant clones that resume it, without a boot.
    #[serde(default)]
    pub warm: bool,
}

/// A template: a read-only disk and the settings clones start from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Template {
    pub name: String,
    pub image: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    /// The VM it was made from.
    pub source_vm: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// The sha256 of its disk when it was made (it never changes).
    pub disk_sha256: String,
    /// VMs that are linked clones of it.
    pub linked_clones: Vec<String>,
    /// A warm template's memory (its VMs are instant clones); none for a
    /// template of a stopped VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<WarmTemplate>,
}

/// What a warm template keeps of its VM's memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WarmTemplate {
    /// The sha256 of its RAM file (never written while it exists).
    pub ram_sha256: String,
    /// The sha256 of its saved device state.
    pub state_sha256: String,
}

/// `POST /api/v1/pools`: desktops kept ready from a template.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePool {
    /// 1-56 letters, digits, `-` or `_`, starting with a letter or digit
    /// (its desktops are named `NAME-N`).
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,55}$",
        min_length = 1,
        max_length = 56
    )]
    pub name: String,
    /// The template its desktops are clones of: instant clones of a warm
    /// one, booted linked clones of a cold one.
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$",
        min_length = 1,
        max_length = 63
    )]
    pub template: String,
    /// How many running desktops wait for users.
    #[schema(maximum = 1000)]
    pub spare: u32,
    /// Desktops in all, spare and assigned (at least `spare`, at least 1).
    #[schema(minimum = 1, maximum = 1000)]
    pub max: u32,
    /// A released desktop stays its user's (given back to them at their
    /// next assign) instead of being replaced by a fresh clone.
    #[serde(default)]
    pub persistent: bool,
}

/// `PATCH /api/v1/pools/{name}`: what is given changes. A new template
/// replaces the spares at once and assigned desktops when released.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdatePool {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$",
        min_length = 1,
        max_length = 63
    )]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1000)]
    pub spare: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000)]
    pub max: Option<u32>,
}

/// `POST /api/v1/pools/{name}/assign`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignDesktop {
    /// Who gets it [default: the caller's token name, `local` on the
    /// Unix socket].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub user: Option<String>,
}

/// A desktop pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Pool {
    pub name: String,
    pub template: String,
    pub spare: u32,
    pub max: u32,
    pub persistent: bool,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Spares running now, ready to hand out.
    pub ready: u32,
    pub desktops: Vec<PoolDesktop>,
    /// Why the last desktop it tried to make failed (cleared by the next
    /// that works).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where a pool's desktop is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DesktopState {
    /// Being made.
    Creating,
    /// Ready, waiting for a user.
    Spare,
    /// Handed to its user.
    Assigned,
    /// A persistent pool's desktop its user released: theirs again at
    /// their next assign.
    Held,
    #[serde(other)]
    Unknown,
}

impl DesktopState {
    pub const ALL: [DesktopState; 4] = [
        DesktopState::Creating,
        DesktopState::Spare,
        DesktopState::Assigned,
        DesktopState::Held,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DesktopState::Creating => "creating",
            DesktopState::Spare => "spare",
            DesktopState::Assigned => "assigned",
            DesktopState::Held => "held",
            DesktopState::Unknown => "unknown",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == text)
    }
}

/// One of a pool's desktops: a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PoolDesktop {
    pub vm: String,
    pub state: DesktopState,
    /// The template it is a clone of.
    pub template: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_at: Option<i64>,
    /// The VM's state (none while it is being made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_state: Option<VmState>,
    /// The dashboard's full-window page for it, from the dashboard's root.
    pub path: String,
}

/// What `POST /api/v1/pools/{name}/assign` handed out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Assigned {
    pub pool: String,
    pub vm: String,
    pub user: String,
    /// The dashboard's full-window page for it, from the dashboard's root
    /// (`/#/desktop/VM`).
    pub path: String,
}

/// The dashboard path of a desktop's full-window page.
pub fn desktop_path(vm: &str) -> String {
    format!("/#/desktop/{vm}")
}

/// `POST /api/v1/vms/{name}/clone`: a new VM from a stopped one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneVm {
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
}

/// One lifecycle change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Increasing; page with `?after=ID`.
    pub id: i64,
    /// Unix milliseconds.
    pub at: i64,
    pub vm: String,
    pub kind: EventKind,
    /// The VM's state after the change.
    pub state: Option<VmState>,
    /// Why, in words.
    pub cause: String,
}

/// What an event tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A VM recorded while its disk is copied.
    Creating,
    Created,
    /// Its disk could not be made; the VM is gone.
    CreateFailed,
    /// Disk copy progress (written by daemons before operations existed).
    Copying,
    Starting,
    Started,
    StartFailed,
    /// The restart policy will start it again.
    Restarting,
    /// Started again by the restart policy.
    Restarted,
    /// A new quetzald took over its running QEMU.
    Reattached,
    Stopping,
    Stopped,
    Crashed,
    Paused,
    Resumed,
    /// The guest rebooted, or the host reset it.
    Reset,
    Deleted,
    /// It became a template.
    Templated,
    SnapshotTaken,
    Reverted,
    SnapshotDeleted,
    /// Its network's DHCP server gave it an address.
    Address,
    /// Events of this kind came too fast; some were not logged.
    Suppressed,
    /// Its guest agent connected, or was lost.
    Agent,
    /// The guest stopped answering (its agent silent while it runs), or
    /// its watchdog device fired.
    Hung,
    /// A service its agent watches died and was restarted (or could not
    /// be).
    Service,
    /// A desktop pool made it, handed it to a user, or took it back.
    Pool,
    /// Its CPU weight changed: input on its console gave it more, or
    /// none for a while took that back.
    Boost,
    /// A kind this client does not know (from a newer daemon).
    #[serde(other)]
    Other,
}

impl EventKind {
    pub const ALL: [EventKind; 29] = [
        EventKind::Creating,
        EventKind::Created,
        EventKind::CreateFailed,
        EventKind::Copying,
        EventKind::Starting,
        EventKind::Started,
        EventKind::StartFailed,
        EventKind::Restarting,
        EventKind::Restarted,
        EventKind::Reattached,
        EventKind::Stopping,
        EventKind::Stopped,
        EventKind::Crashed,
        EventKind::Paused,
        EventKind::Resumed,
        EventKind::Reset,
        EventKind::Deleted,
        EventKind::Templated,
        EventKind::SnapshotTaken,
        EventKind::Reverted,
        EventKind::SnapshotDeleted,
        EventKind::Address,
        EventKind::Suppressed,
        EventKind::Agent,
        EventKind::Hung,
        EventKind::Service,
        EventKind::Pool,
        EventKind::Boost,
        EventKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Creating => "creating",
            EventKind::Created => "created",
            EventKind::CreateFailed => "create-failed",
            EventKind::Copying => "copying",
            EventKind::Starting => "starting",
            EventKind::Started => "started",
            EventKind::StartFailed => "start-failed",
            EventKind::Restarting => "restarting",
            EventKind::Restarted => "restarted",
            EventKind::Reattached => "reattached",
            EventKind::Stopping => "stopping",
            EventKind::Stopped => "stopped",
            EventKind::Crashed => "crashed",
            EventKind::Paused => "paused",
            EventKind::Resumed => "resumed",
            EventKind::Reset => "reset",
            EventKind::Deleted => "deleted",
            EventKind::Templated => "templated",
            EventKind::SnapshotTaken => "snapshot-taken",
            EventKind::Reverted => "reverted",
            EventKind::SnapshotDeleted => "snapshot-deleted",
            EventKind::Address => "address",
            EventKind::Suppressed => "suppressed",
            EventKind::Agent => "agent",
            EventKind::Service => "service",
            EventKind::Pool => "pool",
            EventKind::Boost => "boost",
            EventKind::Hung => "hung",
            EventKind::Other => "other",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A page of events, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<Event>,
    /// Pass as `after` for the next page; null when this was the last one.
    pub next_after: Option<i64>,
    /// With `before`: pass as `before` for the page of older events; null
    /// when there are none.
    #[serde(default)]
    pub next_before: Option<i64>,
}

/// Every error answer: `{"error": {"code": ..., "message": ...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, for programs: `not_found`, `conflict`, `invalid_request`,
    /// `unauthorized`, `insufficient_storage`, `internal`; an operation's
    /// error also `cancelled` or `interrupted`.
    pub code: String,
    /// For people.
    pub message: String,
}

/// What the node runs on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub cpu_model: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub hardware_virtualization: bool,
    pub qemu_version: Option<String>,
    /// `kvm` or `tcg`.
    pub accel: String,
    pub accel_reason: String,
    pub vms_by_state: BTreeMap<String, u64>,
    /// The SHA-256 fingerprint (hex) of the certificate the HTTPS
    /// listener serves; none without `--listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_fingerprint: Option<String>,
    /// Kernel samepage merging, where the host's kernel has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ksm: Option<Ksm>,
}

/// The host's kernel samepage merging, as the node paces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Ksm {
    /// `off`, `on` or `auto` (quetzald's `--ksm`).
    pub mode: String,
    pub running: bool,
    /// Pages KSM keeps one copy of.
    pub pages_shared: u64,
    /// The mappings of those pages that share that copy: how many pages
    /// it saves.
    pub pages_sharing: u64,
    /// What that saves, in bytes.
    pub saved_bytes: u64,
}

/// `POST /api/v1/vms/{name}/snapshots`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// Freeze the guest's filesystems through its agent while a running
    /// VM's snapshot is taken (and thaw them afterwards), so what is on
    /// its disks is consistent; `false` takes a crash-consistent one. A
    /// guest without an agent that can freeze gets a crash-consistent
    /// snapshot either way; the snapshot's `quiesced` says which it got.
    #[serde(default = "quiesce_by_default")]
    #[schema(default = true)]
    pub quiesce: bool,
}

fn quiesce_by_default() -> bool {
    true
}

/// A snapshot of a VM: its disks, and its memory when taken while running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub vm: String,
    pub name: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Taken while running: reverting resumes the guest exactly there.
    pub with_memory: bool,
    /// The snapshot the VM was at when this one was taken (a tree).
    pub parent: Option<String>,
    /// Its guest's filesystems were frozen by the guest agent while it was
    /// taken (consistent on disk, as for a database's files).
    #[serde(default)]
    pub quiesced: bool,
}

/// A VM's snapshots, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<Snapshot>,
    /// The snapshot the VM's disks descend from now.
    pub current: Option<String>,
}

/// `POST /api/v1/networks`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNetwork {
    /// 1-63 letters, digits, `-` or `_`; not `user`.
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// An IPv4 subnet, `/16` to `/29`, such as `10.90.0.0/24`; one that
    /// overlaps nothing on the host is picked when left out.
    #[serde(default)]
    pub subnet: Option<String>,
}

/// A managed network: a bridge on the host with DHCP, DNS and NAT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Network {
    pub name: String,
    pub subnet: String,
    /// The host's address on it, the guests' router and DNS server.
    pub gateway: String,
    /// The Linux bridge on the host.
    pub bridge: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// VMs attached to it.
    pub vms: Vec<String>,
    pub leases: Vec<Lease>,
}

/// An address the network's DHCP server handed out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Lease {
    pub mac: String,
    pub address: String,
    /// The name the guest asked with.
    pub hostname: Option<String>,
    /// Unix milliseconds; null for a lease that does not expire.
    pub expires_at: Option<i64>,
    /// The VM with that MAC, if it is one of this node's.
    pub vm: Option<String>,
}

/// A running VM's counters, for charts: rates come from two readings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmStats {
    /// Unix milliseconds of the reading.
    pub at: i64,
    /// CPU time of its QEMU process.
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_written_bytes: u64,
    /// On managed networks (the TAP's counters); zero on user-mode.
    pub net_received_bytes: u64,
    pub net_sent_bytes: u64,
    /// Memory the guest itself uses, where its agent or balloon driver
    /// says.
    #[serde(default)]
    pub guest_memory_used_bytes: Option<u64>,
    /// How the host memory of its process is shared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<VmMemory>,
}

/// How a running VM's process holds host memory (from its
/// `/proc/PID/smaps` and `ksm_merging_pages`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmMemory {
    /// Proportional set size: each resident page divided by the number
    /// of processes mapping it.
    pub pss_bytes: u64,
    /// Resident pages only this VM holds.
    pub private_bytes: u64,
    /// Resident pages it shares (with its warm template's other clones,
    /// through KSM, libraries).
    pub shared_bytes: u64,
    /// An instant clone's: the part of its RAM still the template's file,
    /// shared with the template's other clones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_shared_bytes: Option<u64>,
    /// Pages KSM merged with identical ones.
    pub ksm_merged_bytes: u64,
}

/// `POST /api/v1/session`: the dashboard's login.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    /// The API token (`quetzal token`).
    pub token: String,
}

/// What long work an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OperationKind {
    /// A VM made from a template with a copy of its disk.
    FullClone,
    /// A VM made from a stopped VM (a copy of its disk).
    CloneVm,
    /// A stopped VM turned into a template.
    CreateTemplate,
    /// A guest image built from Debian packages.
    BuildImage,
    SnapshotCreate,
    SnapshotRevert,
    SnapshotDelete,
}

impl OperationKind {
    pub const ALL: [OperationKind; 7] = [
        OperationKind::FullClone,
        OperationKind::CloneVm,
        OperationKind::CreateTemplate,
        OperationKind::BuildImage,
        OperationKind::SnapshotCreate,
        OperationKind::SnapshotRevert,
        OperationKind::SnapshotDelete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::FullClone => "full-clone",
            OperationKind::CloneVm => "clone-vm",
            OperationKind::CreateTemplate => "create-template",
            OperationKind::BuildImage => "build-image",
            OperationKind::SnapshotCreate => "snapshot-create",
            OperationKind::SnapshotRevert => "snapshot-revert",
            OperationKind::SnapshotDelete => "snapshot-delete",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

/// Where an operation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OperationState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl OperationState {
    pub const ALL: [OperationState; 4] = [
        OperationState::Running,
        OperationState::Succeeded,
        OperationState::Failed,
        OperationState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OperationState::Running => "running",
            OperationState::Succeeded => "succeeded",
            OperationState::Failed => "failed",
            OperationState::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == text)
    }

    pub fn is_finished(self) -> bool {
        self != OperationState::Running
    }
}

/// Long work (a disk copy, a snapshot), followed at
/// `/api/v1/operations/{id}` and on the event stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Operation {
    pub id: String,
    pub kind: OperationKind,
    /// The API path of what it works on (`/api/v1/vms/web`).
    pub target: String,
    pub state: OperationState,
    /// 0-100.
    #[schema(minimum = 0, maximum = 100)]
    pub progress: u8,
    /// Whether `DELETE /api/v1/operations/{id}` can stop it.
    pub cancellable: bool,
    /// Why it failed (or was cancelled).
    pub error: Option<ErrorDetail>,
    /// Unix milliseconds.
    pub started_at: i64,
    /// Unix milliseconds; null while it runs.
    pub finished_at: Option<i64>,
}

/// An operation, as every endpoint that starts or reads one answers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OperationResponse {
    pub operation: Operation,
}

/// Operations, newest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OperationList {
    pub operations: Vec<Operation>,
}

/// What a token may do. Each role may do everything the ones before it
/// may.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything; changes nothing, no consoles.
    Viewer,
    /// Also runs VMs: their lifecycle, consoles and screens, snapshots,
    /// clones, templates, operations.
    Operator,
    /// Everything: also tokens, networks and the audit log.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_str() == text)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A named API token; its secret is shown once, when it is made, and
/// never again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Token {
    pub name: String,
    pub role: Role,
    /// Unix milliseconds.
    pub created_at: i64,
    /// When it stops working (Unix milliseconds); none: never.
    #[serde(default)]
    pub expires_at: Option<i64>,
    /// When a request last carried it (to the minute).
    #[serde(default)]
    pub last_used_at: Option<i64>,
}

/// `POST /api/v1/tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    pub role: Role,
    /// Days until it expires; none: never.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3650)]
    pub expires_days: Option<u32>,
}

/// A token just made, with its secret (shown only now).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub token: Token,
    /// What a client sends as `Authorization: Bearer <secret>`.
    pub secret: String,
}

/// One mutating request, as the audit log keeps it: never its body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    /// Unix milliseconds.
    pub at: i64,
    /// The token's name; `local` on the Unix socket; `-` when no valid
    /// credentials came with it.
    pub who: String,
    /// The client's address, or `unix` with the peer's uid.
    pub source: String,
    pub method: String,
    /// The request's path (without its query).
    pub path: String,
    /// The answer's status code.
    pub status: u16,
}
