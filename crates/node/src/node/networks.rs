//! Managed networks in the node's domain: the store's records, the
//! rules (names, subnets, who uses what) and the addresses VMs got. The
//! host side (bridges, dnsmasq, nftables) is [`crate::net`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use quetzal_api::{CreateNetwork, Lease, Network, Vm};
use quetzal_engine::spec::VmName;

use super::{Node, NodeError};
use crate::net::{HostNetworks, NetworkSpec, Subnet, subnet};
use crate::store::{NetworkRecord, VmRecord};

/// The network the node makes and owns, where VMs go by default.
pub const DEFAULT_NETWORK: &str = "default";
/// Not a network: QEMU's user-mode networking.
pub const USER_NETWORK: &str = "user";
/// How often the lease files are read for new addresses.
const LEASE_POLL: Duration = Duration::from_secs(1);

fn spec(record: &NetworkRecord) -> NetworkSpec {
    NetworkSpec {
        name: record.name.clone(),
        id: record.id,
        subnet: record.subnet,
    }
}

impl Node {
    /// At daemon start: makes the default network if the host can have
    /// one, and brings bridges, rules and dnsmasq up to the store's
    /// networks (after a restart they are reused, after a reboot remade).
    pub(super) async fn bring_up_networks(&self) {
        let _op = self.net_op.lock().await;
        if self.host_net.available().is_err() {
            return;
        }
        let has_default = self
            .store()
            .networks()
            .is_ok_and(|nets| nets.iter().any(|n| n.name == DEFAULT_NETWORK));
        if !has_default {
            if let Err(err) = self.add_network(DEFAULT_NETWORK, None).await {
                tracing::warn!(error = %err, "cannot make the default network");
            }
            return;
        }
        if let Err(err) = self.sync_host().await {
            tracing::warn!(error = %err, "cannot bring the networks up");
        }
    }

    async fn sync_host(&self) -> Result<(), NodeError> {
        let specs: Vec<NetworkSpec> = self.store().networks()?.iter().map(spec).collect();
        self.host_net
            .ensure(&specs)
            .await
            .map_err(NodeError::Internal)
    }

    pub async fn create_network(&self, request: CreateNetwork) -> Result<Network, NodeError> {
        VmName::new(&request.name)
            .map_err(|e| NodeError::Invalid(e.to_string().replace("VM name", "network name")))?;
        if request.name == USER_NETWORK {
            return Err(NodeError::Invalid(
                "`user` names user-mode networking; pick another network name".to_owned(),
            ));
        }
        let subnet = request
            .subnet
            .as_deref()
            .map(str::parse::<Subnet>)
            .transpose()
            .map_err(NodeError::Invalid)?;
        self.host_net.available().map_err(|reason| {
            NodeError::Conflict(format!("cannot create networks here: {reason}"))
        })?;
        let _op = self.net_op.lock().await;
        let record = self.add_network(&request.name, subnet).await?;
        Ok(self.network_view(&record, &self.store().list()?))
    }

    /// Checks and records a network and brings it up; on failure nothing
    /// of it is left. Called with `net_op` held.
    async fn add_network(
        &self,
        name: &str,
        subnet: Option<Subnet>,
    ) -> Result<NetworkRecord, NodeError> {
        let existing = self.store().networks()?;
        if existing.iter().any(|n| n.name == name) {
            return Err(NodeError::Conflict(format!(
                "a network named {name} already exists"
            )));
        }
        // Held until the bridge (and so its route) exists: another node
        // on this host then sees the subnet as taken.
        let _host_lock = HostNetworks::subnet_lock().map_err(NodeError::Internal)?;
        let routes = self
            .host_net
            .host_routes()
            .await
            .map_err(NodeError::Internal)?;
        let subnet = match subnet {
            Some(subnet) => {
                if let Some(other) = existing.iter().find(|n| n.subnet.overlaps(subnet)) {
                    return Err(NodeError::Conflict(format!(
                        "{subnet} overlaps network {} ({})",
                        other.name, other.subnet
                    )));
                }
                if let Some((address, prefix, dev)) = routes
                    .iter()
                    .find(|(a, p, _)| subnet::overlaps_route(subnet, (*a, *p)))
                {
                    return Err(NodeError::Conflict(format!(
                        "{subnet} overlaps the host's route to {address}/{prefix} on {dev}"
                    )));
                }
                subnet
            }
            None => {
                let mut taken: Vec<_> = routes.iter().map(|(a, p, _)| (*a, *p)).collect();
                taken.extend(
                    existing
                        .iter()
                        .map(|n| (n.subnet.network(), n.subnet.prefix())),
                );
                subnet::pick(&taken).ok_or_else(|| {
                    NodeError::Conflict("no free /24 left in 10.80.0.0-10.95.255.0".to_owned())
                })?
            }
        };
        let record = self
            .store()
            .insert_network(name, subnet)
            .map_err(|e| match e {
                crate::store::StoreError::Exists(name) => {
                    NodeError::Conflict(format!("a network named {name} already exists"))
                }
                other => other.into(),
            })?;
        if let Err(err) = self.sync_host().await {
            let _ = self.host_net.remove(&spec(&record)).await;
            self.store().delete_network(name)?;
            let _ = self.sync_host().await;
            return Err(err);
        }
        tracing::info!(network = %name, %subnet, "network created");
        Ok(record)
    }

    pub fn networks(&self) -> Result<Vec<Network>, NodeError> {
        let records = self.store().networks()?;
        let vms = self.store().list()?;
        Ok(records.iter().map(|r| self.network_view(r, &vms)).collect())
    }

    pub fn network(&self, name: &str) -> Result<Network, NodeError> {
        let record = self.network_record(name)?;
        Ok(self.network_view(&record, &self.store().list()?))
    }

    fn network_record(&self, name: &str) -> Result<NetworkRecord, NodeError> {
        self.store()
            .networks()?
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| NodeError::NotFound(format!("no network named {name}")))
    }

    /// A network as the API shows it, with its VMs among `vms` and its
    /// leases matched to them by MAC.
    fn network_view(&self, record: &NetworkRecord, vms: &[VmRecord]) -> Network {
        let vm_with_mac = |mac: &str| vms.iter().find(|r| r.mac == mac).map(|r| r.name.clone());
        let spec = spec(record);
        Network {
            name: record.name.clone(),
            subnet: record.subnet.to_string(),
            gateway: record.subnet.gateway().to_string(),
            bridge: self.host_net.bridge(&spec),
            created_at: record.created_at,
            vms: vms
                .iter()
                .filter(|r| r.network == record.name)
                .map(|r| r.name.clone())
                .collect(),
            leases: self
                .host_net
                .leases(&spec)
                .into_iter()
                .map(|lease| Lease {
                    vm: vm_with_mac(&lease.mac),
                    mac: lease.mac,
                    address: lease.address,
                    hostname: lease.hostname,
                    expires_at: lease.expires.map(|s| s.saturating_mul(1000)),
                })
                .collect(),
        }
    }

    /// Deletes an unused network: its dnsmasq, bridge and rules go.
    pub async fn delete_network(&self, name: &str) -> Result<(), NodeError> {
        if name == DEFAULT_NETWORK {
            return Err(NodeError::Conflict(
                "the default network belongs to the node and cannot be deleted".to_owned(),
            ));
        }
        let _op = self.net_op.lock().await;
        let record = self.network_record(name)?;
        let users = self.store().network_users(name)?;
        if !users.is_empty() {
            return Err(NodeError::Conflict(format!(
                "network {name} is in use by {}; delete those VMs first",
                users.join(", ")
            )));
        }
        self.host_net
            .remove(&spec(&record))
            .await
            .map_err(NodeError::Internal)?;
        self.store().delete_network(name)?;
        self.sync_host().await?;
        tracing::info!(network = %name, "network deleted");
        Ok(())
    }

    /// The network a new VM goes on: the one asked for (which must exist),
    /// else the default network where there is one, else user-mode.
    pub(super) fn choose_network(&self, requested: Option<&str>) -> Result<String, NodeError> {
        match requested {
            Some(USER_NETWORK) => Ok(USER_NETWORK.to_owned()),
            Some(name) => self.network_record(name).map(|r| r.name),
            None => Ok(match self.network_record(DEFAULT_NETWORK) {
                Ok(_) => DEFAULT_NETWORK.to_owned(),
                Err(_) => USER_NETWORK.to_owned(),
            }),
        }
    }

    /// The managed network a VM's NIC is plugged into, if any.
    pub(super) fn vm_network(&self, vm: &VmRecord) -> Result<Option<NetworkSpec>, String> {
        if vm.network == USER_NETWORK {
            return Ok(None);
        }
        self.host_net
            .available()
            .map_err(|reason| format!("network {} is not available: {reason}", vm.network))?;
        self.network_record(&vm.network)
            .map(|r| Some(spec(&r)))
            .map_err(|e| e.to_string())
    }

    /// Fills in the addresses a VM was leased.
    pub(super) fn with_addresses(&self, mut vm: Vm) -> Vm {
        if vm.network != USER_NETWORK {
            vm.addresses = self
                .addresses
                .lock()
                .expect("never poisoned: no panics while held")
                .get(&vm.mac)
                .cloned()
                .into_iter()
                .collect();
        }
        vm
    }

    /// Reads the lease files every second (after a first read at start).
    pub(super) fn watch_leases(self: &Arc<Self>) {
        let node = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(node) = node.upgrade() else {
                    return;
                };
                node.read_leases(true);
                drop(node);
                tokio::time::sleep(LEASE_POLL).await;
            }
        });
    }

    /// Learns the addresses in the lease files; with `announce`, a VM
    /// whose address changed gets an `address` event.
    pub(super) fn read_leases(&self, announce: bool) {
        let Ok(records) = self.store().networks() else {
            return;
        };
        let mut now: HashMap<String, String> = HashMap::new();
        for record in &records {
            for lease in self.host_net.leases(&spec(record)) {
                now.insert(lease.mac, lease.address);
            }
        }
        let changed: Vec<(String, String)> = {
            let mut known = self
                .addresses
                .lock()
                .expect("never poisoned: no panics while held");
            let changed = now
                .iter()
                .filter(|(mac, address)| known.get(*mac) != Some(address))
                .map(|(mac, address)| (mac.clone(), address.clone()))
                .collect();
            *known = now;
            changed
        };
        if changed.is_empty() || !announce {
            return;
        }
        let Ok(vms) = self.store().list() else {
            return;
        };
        for (mac, address) in changed {
            if let Some(record) = vms.iter().find(|r| r.mac == mac) {
                let cause = format!("DHCP on network {} gave it {address}", record.network);
                self.note_from_guest(&record.name, quetzal_api::EventKind::Address, &cause);
            }
        }
    }
}
