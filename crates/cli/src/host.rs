//! `quetzal host info`.

use std::process::ExitCode;

use clap::Subcommand;
use quetzal_engine::host::HostInfo;
use quetzal_engine::{Accel, QemuEngine};

use crate::Output;

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// CPU, memory, hardware virtualization, QEMU, and the accelerator VMs get.
    Info {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        /// Override the accelerator (fails where it cannot work).
        #[arg(long)]
        accel: Option<Accel>,
    },
}

pub fn run(command: HostCommand) -> anyhow::Result<ExitCode> {
    let HostCommand::Info { output, accel } = command;
    let info = HostInfo::probe(Some(QemuEngine::new().binary()), accel)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&info)?),
        Output::Human => {
            let virt = match (info.hardware_virtualization, info.cpu_virt_flag) {
                (true, Some(flag)) => format!("yes ({flag}, /dev/kvm usable)"),
                (_, flag) => format!(
                    "no (CPU flag: {}, /dev/kvm: {})",
                    flag.map_or_else(|| "none".to_owned(), |f| f.to_string()),
                    info.kvm_device
                ),
            };
            println!("CPU            {} x {}", info.cpus, info.cpu_model);
            println!("Memory         {} MiB", info.memory_mib);
            println!("Hardware virt  {virt}");
            println!(
                "QEMU           {}",
                info.qemu_version
                    .as_deref()
                    .unwrap_or("not installed (install qemu-system-x86)")
            );
            println!("Acceleration   {}: {}", info.accel, info.accel_reason);
        }
    }
    Ok(ExitCode::SUCCESS)
}
