//! Managed networks, a part of the node with its own state: the store's
//! records, the rules (names, subnets, who uses what), the lock that
//! orders network changes against VMs joining them, and the addresses VMs
//! were leased. The host side (bridges, dnsmasq, nftables) is
//! [`crate::net`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use quetzal_api::{CreateNetwork, Lease, Network, Vm};
use quetzal_engine::spec::VmName;

use super::NodeError;
use super::core::Core;
use super::error::{Fault, NetworkError};
use crate::net::{HostNetworks, NetworkSpec, Subnet, subnet};
use crate::store::{NetworkRecord, VmRecord};

/// The network the node makes and owns, where VMs go by default.
pub const DEFAULT_NETWORK: &str = "default";
/// Not a network: QEMU's user-mode networking.
pub const USER_NETWORK: &str = "user";

fn spec(record: &NetworkRecord) -> NetworkSpec {
    NetworkSpec {
        name: record.name.clone(),
        id: record.id,
        subnet: record.subnet,
    }
}

/// The node's managed networks.
#[derive(Debug)]
pub struct Networks {
    core: Arc<Core>,
    host: HostNetworks,
    /// Serializes network changes, and a VM joining a network against
    /// that network's deletion.
    op: tokio::sync::Mutex<()>,
    /// MAC to leased address, from the networks' lease files.
    addresses: Mutex<HashMap<String, String>>,
}

impl Networks {
    pub(super) fn new(core: Arc<Core>, host: HostNetworks) -> Self {
        Networks {
            core,
            host,
            op: tokio::sync::Mutex::default(),
            addresses: Mutex::default(),
        }
    }

    /// Holds network changes off: taken to choose a new VM's network and
    /// record the VM on it (never through a disk copy).
    pub(super) async fn hold(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.op.lock().await
    }

    /// The TAP device of the VM with NIC number `nic`.
    pub(super) fn tap(&self, nic: u32) -> String {
        self.host.tap(nic)
    }

    /// Plugs a VM's TAP into its network's bridge.
    pub(super) async fn plug(
        &self,
        tap: &str,
        network: &NetworkSpec,
    ) -> Result<(), crate::net::HostNetError> {
        self.host.plug(tap, network).await
    }

    /// At daemon start: makes the default network if the host can have
    /// one, and brings bridges, rules and dnsmasq up to the store's
    /// networks (after a restart they are reused, after a reboot remade).
    pub(super) async fn bring_up(&self) {
        let _op = self.op.lock().await;
        if self.host.available().is_err() {
            return;
        }
        let has_default = self
            .core
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
        let specs: Vec<NetworkSpec> = self.core.store().networks()?.iter().map(spec).collect();
        Ok(self.host.ensure(&specs).await.map_err(Fault::HostNetwork)?)
    }

    pub async fn create(&self, request: CreateNetwork) -> Result<Network, NodeError> {
        VmName::new(&request.name).map_err(|e| NetworkError::Invalid {
            reason: e.to_string().replace("VM name", "network name"),
        })?;
        if request.name == USER_NETWORK {
            return Err(NetworkError::UserIsReserved.into());
        }
        let subnet = request
            .subnet
            .as_deref()
            .map(str::parse::<Subnet>)
            .transpose()
            .map_err(|reason| NetworkError::Invalid { reason })?;
        self.host
            .available()
            .map_err(|reason| NetworkError::Unavailable { reason })?;
        let _op = self.op.lock().await;
        let record = self.add_network(&request.name, subnet).await?;
        let vms = self.core.store().list()?;
        Ok(self.view(&record, &vms))
    }

    /// Checks and records a network and brings it up; on failure nothing
    /// of it is left. Called with `op` held.
    async fn add_network(
        &self,
        name: &str,
        subnet: Option<Subnet>,
    ) -> Result<NetworkRecord, NodeError> {
        let existing = self.core.store().networks()?;
        if existing.iter().any(|n| n.name == name) {
            return Err(NetworkError::Exists {
                name: name.to_owned(),
            }
            .into());
        }
        // Held until the bridge (and so its route) exists: another node
        // on this host then sees the subnet as taken.
        let _host_lock = HostNetworks::subnet_lock().map_err(Fault::HostNetwork)?;
        let routes = self.host.host_routes().await.map_err(Fault::HostNetwork)?;
        let subnet = match subnet {
            Some(subnet) => {
                if let Some(other) = existing.iter().find(|n| n.subnet.overlaps(subnet)) {
                    return Err(NetworkError::OverlapsNetwork {
                        subnet: subnet.to_string(),
                        other: other.name.clone(),
                        other_subnet: other.subnet.to_string(),
                    }
                    .into());
                }
                if let Some((address, prefix, dev)) = routes
                    .iter()
                    .find(|(a, p, _)| subnet::overlaps_route(subnet, (*a, *p)))
                {
                    return Err(NetworkError::OverlapsRoute {
                        subnet: subnet.to_string(),
                        route: format!("{address}/{prefix}"),
                        device: dev.clone(),
                    }
                    .into());
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
                subnet::pick(&taken).ok_or(NetworkError::NoFreeSubnet)?
            }
        };
        let inserted = self.core.store().insert_network(name, subnet);
        let record = inserted.map_err(|e| match e {
            crate::store::StoreError::Exists(name) => NetworkError::Exists { name }.into(),
            other => NodeError::from(other),
        })?;
        if let Err(err) = self.sync_host().await {
            let _ = self.host.remove(&spec(&record)).await;
            self.core.store().delete_network(name)?;
            let _ = self.sync_host().await;
            return Err(err);
        }
        tracing::info!(network = %name, %subnet, "network created");
        Ok(record)
    }

    pub fn list(&self) -> Result<Vec<Network>, NodeError> {
        let records = self.core.store().networks()?;
        let vms = self.core.store().list()?;
        Ok(records.iter().map(|r| self.view(r, &vms)).collect())
    }

    pub fn get(&self, name: &str) -> Result<Network, NodeError> {
        let record = self.record(name)?;
        let vms = self.core.store().list()?;
        Ok(self.view(&record, &vms))
    }

    /// The network named `name`, if there is one.
    fn find(&self, name: &str) -> Result<Option<NetworkRecord>, NodeError> {
        let networks = self.core.store().networks()?;
        Ok(networks.into_iter().find(|n| n.name == name))
    }

    fn record(&self, name: &str) -> Result<NetworkRecord, NodeError> {
        let found = self.find(name)?;
        Ok(found.ok_or_else(|| NetworkError::NotFound {
            name: name.to_owned(),
        })?)
    }

    /// A network as the API shows it, with its VMs among `vms` and its
    /// leases matched to them by MAC.
    fn view(&self, record: &NetworkRecord, vms: &[VmRecord]) -> Network {
        let vm_with_mac = |mac: &str| vms.iter().find(|r| r.mac == mac).map(|r| r.name.clone());
        let spec = spec(record);
        Network {
            name: record.name.clone(),
            subnet: record.subnet.to_string(),
            gateway: record.subnet.gateway().to_string(),
            bridge: self.host.bridge(&spec),
            created_at: record.created_at,
            vms: vms
                .iter()
                .filter(|r| r.network == record.name)
                .map(|r| r.name.clone())
                .collect(),
            leases: self
                .host
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
    pub async fn delete(&self, name: &str) -> Result<(), NodeError> {
        if name == DEFAULT_NETWORK {
            return Err(NetworkError::DefaultIsTheNodes.into());
        }
        let _op = self.op.lock().await;
        let record = self.record(name)?;
        let users = self.core.store().network_users(name)?;
        if !users.is_empty() {
            return Err(NetworkError::InUse {
                name: name.to_owned(),
                users,
            }
            .into());
        }
        self.host
            .remove(&spec(&record))
            .await
            .map_err(Fault::HostNetwork)?;
        self.core.store().delete_network(name)?;
        self.sync_host().await?;
        tracing::info!(network = %name, "network deleted");
        Ok(())
    }

    /// The network a new VM goes on: the one asked for (which must exist),
    /// else the default network where there is one, else user-mode.
    /// Called with [`Networks::hold`] held.
    pub(super) fn choose(&self, requested: Option<&str>) -> Result<String, NodeError> {
        match requested {
            Some(USER_NETWORK) => Ok(USER_NETWORK.to_owned()),
            Some(name) => self.record(name).map(|r| r.name),
            None => Ok(match self.find(DEFAULT_NETWORK)? {
                Some(_) => DEFAULT_NETWORK.to_owned(),
                None => USER_NETWORK.to_owned(),
            }),
        }
    }

    /// The managed network a VM's NIC is plugged into, if any.
    pub(super) fn of_vm(&self, vm: &VmRecord) -> Result<Option<NetworkSpec>, NodeError> {
        if vm.network == USER_NETWORK {
            return Ok(None);
        }
        self.host
            .available()
            .map_err(|reason| NetworkError::NotAvailable {
                name: vm.network.clone(),
                reason,
            })?;
        self.record(&vm.network).map(|r| Some(spec(&r)))
    }

    /// Fills in the addresses a VM was leased.
    pub fn with_addresses(&self, mut vm: Vm) -> Vm {
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

    /// Learns the addresses in the lease files, and which VMs' changed:
    /// each with the cause of its `address` event.
    pub(super) fn read_leases(&self) -> Vec<(String, String)> {
        let Ok(records) = self.core.store().networks() else {
            return Vec::new();
        };
        let mut now: HashMap<String, String> = HashMap::new();
        for record in &records {
            for lease in self.host.leases(&spec(record)) {
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
        if changed.is_empty() {
            return Vec::new();
        }
        let Ok(vms) = self.core.store().list() else {
            return Vec::new();
        };
        changed
            .into_iter()
            .filter_map(|(mac, address)| {
                let record = vms.iter().find(|r| r.mac == mac)?;
                let cause = format!("DHCP on network {} gave it {address}", record.network);
                Some((record.name.clone(), cause))
            })
            .collect()
    }
}
