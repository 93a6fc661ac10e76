//! `quetzal pool …`: desktop pools through quetzald's API.

use std::process::ExitCode;

use clap::Subcommand;
use hyper::Method;
use quetzal_api::{Assigned, Pool, PoolDesktop};
use serde_json::json;

use crate::Output;
use crate::client::{Client, encode};

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Create a pool that keeps SPARE desktops ready (running clones of
    /// TEMPLATE), up to MAX in all.
    Create {
        name: String,
        #[arg(long)]
        template: String,
        #[arg(long, default_value_t = 1)]
        spare: u32,
        #[arg(long)]
        max: u32,
        /// A released desktop stays its user's instead of being replaced.
        #[arg(long)]
        persistent: bool,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// List pools.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show a pool and its desktops.
    Show {
        name: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Hand a ready desktop to a user; prints its VM and the URL that
    /// opens it full-window in the dashboard.
    Assign {
        name: String,
        /// Who gets it [default: the caller's token name].
        #[arg(long)]
        user: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Take a desktop back: destroyed and replaced by a fresh clone, or
    /// in a persistent pool kept for its user.
    Release { name: String, vm: String },
    /// Change a pool: a new template replaces its spares at once and its
    /// assigned desktops when they are released.
    Update {
        name: String,
        #[arg(long)]
        template: Option<String>,
        #[arg(long)]
        spare: Option<u32>,
        #[arg(long)]
        max: Option<u32>,
    },
    /// Delete a pool and its spares (refused while users hold desktops).
    Rm { name: String },
}

pub fn run(command: PoolCommand) -> anyhow::Result<ExitCode> {
    crate::block_on(async {
        let client = Client::from_env();
        match command {
            PoolCommand::Create {
                name,
                template,
                spare,
                max,
                persistent,
                output,
            } => {
                let body = json!({ "name": name, "template": template, "spare": spare,
                    "max": max, "persistent": persistent });
                let pool: Pool = client
                    .call_as(Method::POST, "/api/v1/pools", Some(&body))
                    .await?;
                print_one(&pool, output)?;
            }
            PoolCommand::List { output } => {
                let pools: Vec<Pool> = client.call_as(Method::GET, "/api/v1/pools", None).await?;
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&pools)?),
                    Output::Human => print_table(&pools),
                }
            }
            PoolCommand::Show { name, output } => {
                let path = format!("/api/v1/pools/{}", encode(&name));
                let pool: Pool = client.call_as(Method::GET, &path, None).await?;
                print_one(&pool, output)?;
            }
            PoolCommand::Assign { name, user, output } => {
                let path = format!("/api/v1/pools/{}/assign", encode(&name));
                let body = match user {
                    Some(user) => json!({ "user": user }),
                    None => json!({}),
                };
                let assigned: Assigned = client.call_as(Method::POST, &path, Some(&body)).await?;
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&assigned)?),
                    Output::Human => println!(
                        "desktop {} for {}: {}{}",
                        assigned.vm,
                        assigned.user,
                        dashboard(),
                        assigned.path
                    ),
                }
            }
            PoolCommand::Release { name, vm } => {
                let path = format!(
                    "/api/v1/pools/{}/desktops/{}/release",
                    encode(&name),
                    encode(&vm)
                );
                let desktop: PoolDesktop = client.call_as(Method::POST, &path, None).await?;
                if desktop.vm_state.is_some() {
                    println!("desktop {vm} released; kept for its user");
                } else {
                    println!("desktop {vm} released and destroyed; a fresh clone replaces it");
                }
            }
            PoolCommand::Update {
                name,
                template,
                spare,
                max,
            } => {
                let path = format!("/api/v1/pools/{}", encode(&name));
                let body = json!({ "template": template, "spare": spare, "max": max });
                let body = strip_nulls(body);
                let pool: Pool = client.call_as(Method::PATCH, &path, Some(&body)).await?;
                print_one(&pool, Output::Human)?;
            }
            PoolCommand::Rm { name } => {
                let path = format!("/api/v1/pools/{}", encode(&name));
                client.call(Method::DELETE, &path, None).await?;
                println!("pool {name} deleted");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The dashboard's address: `QUETZAL_URL`'s, else where `quetzal up`
/// has quetzald listen.
fn dashboard() -> String {
    match std::env::var("QUETZAL_URL") {
        Ok(url) => url.trim_end_matches('/').to_owned(),
        Err(_) => format!("https://{}", crate::up::listen()),
    }
}

fn strip_nulls(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => map.into_iter().filter(|(_, v)| !v.is_null()).collect(),
        other => other,
    }
}

fn print_table(pools: &[Pool]) {
    let width = pools.iter().map(|p| p.name.len()).max().unwrap_or(4).max(4);
    println!(
        "{:<width$}  {:<16}  {:>5}  {:>5}  {:>3}  {:>8}  KIND",
        "NAME", "TEMPLATE", "READY", "SPARE", "MAX", "ASSIGNED"
    );
    for p in pools {
        let assigned = p
            .desktops
            .iter()
            .filter(|d| d.state == quetzal_api::DesktopState::Assigned)
            .count();
        println!(
            "{:<width$}  {:<16}  {:>5}  {:>5}  {:>3}  {:>8}  {}",
            p.name,
            p.template,
            p.ready,
            p.spare,
            p.max,
            assigned,
            if p.persistent { "persistent" } else { "reset" }
        );
    }
}

fn print_one(pool: &Pool, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(pool)?);
        return Ok(());
    }
    print_table(std::slice::from_ref(pool));
    if let Some(error) = &pool.error {
        println!("\nlast failure: {error}");
    }
    if pool.desktops.is_empty() {
        println!("\nno desktops yet");
        return Ok(());
    }
    println!(
        "\n{:<20}  {:<9}  {:<9}  {:<16}  USER",
        "DESKTOP", "STATE", "VM", "TEMPLATE"
    );
    for d in &pool.desktops {
        println!(
            "{:<20}  {:<9}  {:<9}  {:<16}  {}",
            d.vm,
            d.state.as_str(),
            d.vm_state.map_or("-", |s| s.as_str()),
            d.template,
            d.user.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}
