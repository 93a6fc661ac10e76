//! Request bodies and the names and subnets in them, as a client sends
//! them: accepted or refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quetzal_api::{CloneVm, CreateNetwork, CreateSnapshot, CreateTemplate, CreateVm, Login};

fuzz_target!(|body: &[u8]| {
    if let Ok(create) = serde_json::from_slice::<CreateVm>(body) {
        let _ = quetzal_engine::spec::VmName::new(&create.name);
        let _ = quetzal_engine::spec::Cpus::new(create.cpus);
        let _ = quetzal_engine::spec::MemoryMib::new(create.memory_mib, 24 * 1024);
    }
    let _ = serde_json::from_slice::<CreateTemplate>(body);
    let _ = serde_json::from_slice::<CloneVm>(body);
    let _ = serde_json::from_slice::<CreateSnapshot>(body);
    let _ = serde_json::from_slice::<Login>(body);
    if let Ok(network) = serde_json::from_slice::<CreateNetwork>(body)
        && let Some(subnet) = network.subnet
    {
        let _ = subnet.parse::<quetzal_node::net::Subnet>();
    }
});
