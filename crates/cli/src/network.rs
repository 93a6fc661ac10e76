//! `quetzal network …`: managed networks through quetzald's API.

use std::process::ExitCode;

use clap::Subcommand;
use hyper::Method;
use quetzal_api::Network;
use serde_json::json;

use crate::Output;
use crate::client::{Client, encode};

#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Create a network: a bridge on the host with DHCP, DNS and NAT.
    Create {
        name: String,
        /// An IPv4 subnet such as 10.90.0.0/24 [default: a free /24].
        #[arg(long)]
        subnet: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// List networks.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show a network with its DHCP leases.
    Show {
        name: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a network no VM uses.
    Rm { name: String },
}

pub fn run(command: NetworkCommand) -> anyhow::Result<ExitCode> {
    crate::block_on(async {
        let client = Client::from_env();
        match command {
            NetworkCommand::Create {
                name,
                subnet,
                output,
            } => {
                let body = json!({ "name": name, "subnet": subnet });
                let network: Network = client
                    .call_as(Method::POST, "/api/v1/networks", Some(&body))
                    .await?;
                print_one(&network, output)?;
            }
            NetworkCommand::List { output } => {
                let networks: Vec<Network> = client
                    .call_as(Method::GET, "/api/v1/networks", None)
                    .await?;
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&networks)?),
                    Output::Human => print_table(&networks),
                }
            }
            NetworkCommand::Show { name, output } => {
                let path = format!("/api/v1/networks/{}", encode(&name));
                let network: Network = client.call_as(Method::GET, &path, None).await?;
                print_one(&network, output)?;
            }
            NetworkCommand::Rm { name } => {
                let path = format!("/api/v1/networks/{}", encode(&name));
                client.call(Method::DELETE, &path, None).await?;
                println!("network {name} deleted");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn print_table(networks: &[Network]) {
    let width = networks
        .iter()
        .map(|n| n.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<width$}  {:<18}  {:<14}  {:<10}  VMS",
        "NAME", "SUBNET", "GATEWAY", "BRIDGE"
    );
    for n in networks {
        println!(
            "{:<width$}  {:<18}  {:<14}  {:<10}  {}",
            n.name,
            n.subnet,
            n.gateway,
            n.bridge,
            if n.vms.is_empty() {
                "-".to_owned()
            } else {
                n.vms.join(",")
            }
        );
    }
}

fn print_one(network: &Network, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(network)?);
        return Ok(());
    }
    print_table(std::slice::from_ref(network));
    if network.leases.is_empty() {
        println!("\nno DHCP leases");
        return Ok(());
    }
    println!("\n{:<17}  {:<15}  {:<12}  VM", "MAC", "ADDRESS", "HOSTNAME");
    for lease in &network.leases {
        println!(
            "{:<17}  {:<15}  {:<12}  {}",
            lease.mac,
            lease.address,
            lease.hostname.as_deref().unwrap_or("-"),
            lease.vm.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}
