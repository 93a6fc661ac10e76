//! Quetzal's own channel, beside QGA: the virtio-serial port
//! [`QUETZAL_PORT`], one JSON object per line each way, each at most
//! [`MAX_PORT_MESSAGE`] bytes. It carries what QGA lacks: the guest pushes
//! [`ToHost::Telemetry`] every few seconds and reports its watched
//! services; the host declares which services to watch and asks for a new
//! identity after a clone.
//!
//! The guest says [`ToHost::Hello`] whenever it (re)opens the port; the
//! host answers every hello with the VM's [`ToGuest::Services`], so an
//! agent that restarted, or a guest that rebooted, is told again. Nothing
//! is acknowledged: telemetry is sent again anyway, and a service event
//! lost while no host listened is also in the guest's own log.

use serde::{Deserialize, Serialize};

/// The port's name.
pub const QUETZAL_PORT: &str = "org.quetzal.agent.0";

/// The longest message either end accepts on the port.
pub const MAX_PORT_MESSAGE: usize = 64 * 1024;

/// How often the guest sends telemetry.
pub const TELEMETRY_EVERY_SECS: u64 = 5;

/// At most this many services are watched in one guest.
pub const MAX_SERVICES: usize = 16;

/// What the guest sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToHost {
    Hello { version: String },
    Telemetry(Telemetry),
    Service(ServiceEvent),
    Reidentified(Reidentified),
}

/// What the host sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToGuest {
    /// The host opened its end: the guest says hello (again). A guest
    /// resumed from a saved state never saw the port close.
    Hello {},
    /// The services the VM's spec declares (the guest adds its own, from
    /// its config file). Replaces any earlier list.
    Services(Vec<Service>),
    /// Become a new machine: the clone hook.
    Reidentify(Reidentify),
}

/// A snapshot of the guest's use, as the guest itself sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// `MemTotal` and `MemTotal - MemAvailable` from `/proc/meminfo`.
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    /// The 1, 5 and 15 minute load averages.
    pub load: [f64; 3],
    pub uptime_secs: u64,
    #[serde(default)]
    pub filesystems: Vec<Filesystem>,
}

/// One mounted block-device filesystem and how full it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filesystem {
    pub mountpoint: String,
    #[serde(rename = "type")]
    pub fs_type: String,
    pub used_bytes: u64,
    pub total_bytes: u64,
}

/// A service the guest's agent keeps running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// How events name it.
    pub name: String,
    #[serde(flatten)]
    pub run: Run,
}

/// How a watched service runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Run {
    /// A systemd unit, restarted with `systemctl restart` when it is
    /// inactive or failed.
    Unit(String),
    /// A command the agent runs itself with `/bin/sh -c` and starts again
    /// when it exits.
    Command(String),
}

/// Something that happened to a watched service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEvent {
    pub name: String,
    /// `restarted`, or `restart-failed`.
    pub what: String,
    /// Why: how it ended, or what the restart said.
    pub detail: String,
    /// Restarts of it since the agent started.
    pub restarts: u64,
}

/// The clone hook's request: every step runs, each one's outcome is
/// reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reidentify {
    /// Matches the answer to the request.
    pub id: u64,
    pub hostname: String,
    /// The host's clock, for the guest's (Unix milliseconds).
    pub unix_ms: i64,
    /// The MAC address its NIC is to have (an instant clone resumes with
    /// its template's); none leaves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Random bytes from the host (hex) for the guest's random pool,
    /// which a clone resumed with its template's memory shares with every
    /// other clone until it is reseeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reidentified {
    pub id: u64,
    /// Each step, in order, and `ok` or why it failed.
    pub steps: Vec<Step>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub step: String,
    pub outcome: String,
}

/// One message as a line.
pub fn line<T: Serialize>(message: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(message).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn messages_are_one_line_of_json_named_by_their_kind() {
        let services = ToGuest::Services(vec![
            Service {
                name: "web".into(),
                run: Run::Unit("nginx.service".into()),
            },
            Service {
                name: "tick".into(),
                run: Run::Command("sleep 100".into()),
            },
        ]);

        let bytes = line(&services);

        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            "{\"services\":[{\"name\":\"web\",\"unit\":\"nginx.service\"},\
             {\"name\":\"tick\",\"command\":\"sleep 100\"}]}\n"
        );
        let back: ToGuest = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, services);
        let hello: ToHost = serde_json::from_str(r#"{"hello":{"version":"0.1.0"}}"#).unwrap();
        assert_eq!(
            hello,
            ToHost::Hello {
                version: "0.1.0".into()
            }
        );
        assert!(serde_json::from_str::<ToHost>(r#"{"nonsense":1}"#).is_err());
    }
}
