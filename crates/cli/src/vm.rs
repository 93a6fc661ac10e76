//! `quetzal vm …` and `quetzal events`: calls to quetzald's API, printed
//! as tables for people or JSON for scripts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use http_body_util::BodyExt;
use hyper::Method;
use quetzal_api::{Event, EventPage, RestartPolicy, Snapshot, SnapshotList, Template, Vm};
use serde_json::json;

use crate::Output;
use crate::client::{Client, encode};
use crate::operation::{self, Outcome, WaitArgs};

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM (stopped, unless --start).
    Create(Box<CreateArgs>),
    /// List VMs.
    List {
        /// Only VMs in this state (running, stopped, paused, crashed…).
        #[arg(long)]
        state: Option<String>,
        /// Only VMs with this label (key=value).
        #[arg(long)]
        label: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one VM.
    Show {
        name: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Start a VM.
    Start { name: String },
    /// Stop a VM: the guest gets the power button, then is forced off after
    /// the timeout.
    Stop {
        name: String,
        /// Skip the power button: end QEMU at once.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest to shut down.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Stop then start a VM.
    Restart {
        name: String,
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Freeze a VM's vCPUs.
    Pause { name: String },
    /// Unfreeze a paused VM.
    Resume { name: String },
    /// Delete a stopped VM and its disks.
    Rm {
        name: String,
        /// Keep the VM's disk files on the host.
        #[arg(long)]
        keep_disks: bool,
    },
    /// Snapshots of a VM.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Make a new, stopped VM from a stopped one (a copy of its disk).
    Clone {
        source: String,
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Attach this terminal to a VM's serial console (Ctrl-] detaches; the
    /// VM keeps running).
    Console { name: String },
    /// Copy a file into or out of a running VM's guest through its agent:
    /// one side is VM:/PATH (at most 64 MiB).
    Cp { from: String, to: String },
    /// Run a command in a running VM's guest through its agent: prints its
    /// stdout and stderr, exits with its exit code.
    Exec {
        name: String,
        /// Seconds it may run [default: 30].
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// The program and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Make a running VM's guest a new machine through quetzal-agent: a
    /// new machine-id and SSH host keys, the VM's name as its host name,
    /// a DHCP renew, the host's time (what a copied guest needs).
    Reidentify { name: String },
    /// Print the text on a running desktop guest's clipboard, or with
    /// `--set` put text there (`--set -` reads it from stdin).
    Clipboard {
        name: String,
        #[arg(long, value_name = "TEXT")]
        set: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    name: String,
    /// The image to start from [default: tiny].
    #[arg(long, conflicts_with = "template")]
    image: Option<String>,
    /// Make a clone of this template (linked: a copy-on-write overlay).
    #[arg(long)]
    template: Option<String>,
    /// With --template: copy the template's disk (an independent VM).
    #[arg(long, requires = "template")]
    full: bool,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Root disk size in MiB [default: the image's].
    #[arg(long)]
    disk: Option<u64>,
    /// A label, key=value; may be repeated.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// never, on-failure or always.
    #[arg(long, default_value = "never")]
    restart: String,
    /// The managed network to join, or `user` for user-mode networking
    /// [default: the node's default network where it has one].
    #[arg(long)]
    network: Option<String>,
    /// A file of OpenSSH public keys (one per line, such as
    /// ~/.ssh/id_ed25519.pub) for the image's default user; may be
    /// repeated. Images with cloud-init only (debian).
    #[arg(long = "ssh-key", value_name = "FILE")]
    ssh_keys: Vec<PathBuf>,
    /// cloud-init user-data: a #cloud-config YAML file or a script.
    #[arg(long, value_name = "FILE")]
    user_data: Option<PathBuf>,
    /// A systemd unit the guest agent restarts whenever it is inactive or
    /// failed (quetzal-agent only); may be repeated.
    #[arg(long = "watch-unit", value_name = "UNIT")]
    watch_units: Vec<String>,
    /// A command (NAME=COMMAND, run with /bin/sh -c) the guest agent runs
    /// and starts again whenever it exits (quetzal-agent only); may be
    /// repeated.
    #[arg(long = "watch-command", value_name = "NAME=COMMAND")]
    watch_commands: Vec<String>,
    /// Keep its RAM in a file on the host's tmpfs, so that while it runs
    /// it can become a warm template (`template create --warm`); without
    /// it the RAM is anonymous memory that KSM merges and the balloon
    /// gives back.
    #[arg(long)]
    ram_file: bool,
    /// Host CPUs for its vCPU threads, as a list like 0-3,6: vCPU n runs
    /// on the n-th of them (round the list).
    #[arg(long, value_name = "LIST")]
    cpu_pin: Option<String>,
    /// Start it right away.
    #[arg(long)]
    start: bool,
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// A full clone copies its disk: print the operation's id instead of
    /// waiting for the copy.
    #[command(flatten)]
    wait: WaitArgs,
}

/// The keys of `--ssh-key` files (one per line; blank lines and `#`
/// comments skipped) and the `--user-data` file, each checked here so an
/// error names its file.
fn cloud_init_files(
    key_files: &[PathBuf],
    user_data: Option<&Path>,
) -> anyhow::Result<(Vec<String>, Option<String>)> {
    use quetzal_node::cloud_init::{check_ssh_key, check_user_data};
    let read = |flag: &str, path: &Path| {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read {flag} {}", path.display()))?;
        String::from_utf8(bytes)
            .map_err(|_| anyhow::anyhow!("{flag} {} is not text (UTF-8)", path.display()))
    };
    let mut keys = Vec::new();
    for path in key_files {
        let text = read("--ssh-key", path)?;
        // A private key is refused as a whole, not line by line.
        if text.trim_start().starts_with("-----BEGIN")
            && let Err(reason) = check_ssh_key(&text)
        {
            anyhow::bail!("--ssh-key {}: {reason}", path.display());
        }
        let before = keys.len();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = check_ssh_key(line)
                .map_err(|reason| anyhow::anyhow!("--ssh-key {}: {reason}", path.display()))?;
            keys.push(key);
        }
        if keys.len() == before {
            anyhow::bail!("--ssh-key {}: no public key in it", path.display());
        }
    }
    let user_data = match user_data {
        Some(path) => {
            let text = read("--user-data", path)?;
            check_user_data(&text)
                .map_err(|reason| anyhow::anyhow!("--user-data {}: {reason}", path.display()))?;
            Some(text)
        }
        None => None,
    };
    Ok((keys, user_data))
}

pub fn run(command: VmCommand) -> anyhow::Result<ExitCode> {
    crate::block_on(run_async(command))
}

async fn run_async(command: VmCommand) -> anyhow::Result<ExitCode> {
    let client = Client::from_env();
    match command {
        VmCommand::Create(args) => {
            let Some(restart) = RestartPolicy::parse(&args.restart) else {
                anyhow::bail!(
                    "--restart must be never, on-failure or always, not '{}'",
                    args.restart
                );
            };
            let mut labels = BTreeMap::new();
            for label in &args.labels {
                let (key, value) = label
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--label must be key=value, not '{label}'"))?;
                labels.insert(key.to_owned(), value.to_owned());
            }
            let (ssh_keys, user_data) =
                cloud_init_files(&args.ssh_keys, args.user_data.as_deref())?;
            let mut services: Vec<quetzal_api::WatchedService> = args
                .watch_units
                .iter()
                .map(|unit| quetzal_api::WatchedService {
                    name: unit.strip_suffix(".service").unwrap_or(unit).to_owned(),
                    unit: Some(unit.clone()),
                    command: None,
                })
                .collect();
            for watched in &args.watch_commands {
                let (name, command) = watched.split_once('=').ok_or_else(|| {
                    anyhow::anyhow!("--watch-command must be NAME=COMMAND, not '{watched}'")
                })?;
                services.push(quetzal_api::WatchedService {
                    name: name.to_owned(),
                    unit: None,
                    command: Some(command.to_owned()),
                });
            }
            let body = json!({
                "services": services,
                "ram_file": args.ram_file,
                "cpu_pin": args.cpu_pin,
                "name": args.name,
                "image": args.image,
                "ssh_keys": ssh_keys,
                "user_data": user_data,
                "template": args.template,
                "full_clone": args.full,
                "cpus": args.cpus,
                "memory_mib": args.memory,
                "disk_mib": args.disk,
                "labels": labels,
                "restart_policy": restart,
                "network": args.network,
            });
            let answer = client
                .call(Method::POST, "/api/v1/vms", Some(&body))
                .await?;
            let mut vm: Vm = match answer.get("operation") {
                Some(op) => {
                    let op: quetzal_api::Operation = serde_json::from_value(op.clone())?;
                    if args.wait.no_wait() {
                        println!("{}", op.id);
                        return Ok(ExitCode::SUCCESS);
                    }
                    let what = operation::describe(op.kind);
                    operation::finish(&client, op, what).await?;
                    let path = format!("/api/v1/vms/{}", encode(&args.name));
                    client.call_as(Method::GET, &path, None).await?
                }
                None => serde_json::from_value(answer)?,
            };
            // An instant clone (of a warm template) runs already.
            if args.start && vm.state != quetzal_api::VmState::Running {
                vm = action(&client, &vm.name, "start").await?;
            }
            print_vm(&vm, args.output)?;
        }
        VmCommand::List {
            state,
            label,
            output,
        } => {
            let mut query = Vec::new();
            if let Some(state) = state {
                query.push(format!("state={}", encode(&state)));
            }
            if let Some(label) = label {
                query.push(format!("label={}", encode(&label)));
            }
            let path = format!("/api/v1/vms?{}", query.join("&"));
            let vms: Vec<Vm> = client.call_as(Method::GET, &path, None).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&vms)?),
                Output::Human => print_table(&vms),
            }
        }
        VmCommand::Show { name, output } => {
            let vm: Vm = client
                .call_as(Method::GET, &format!("/api/v1/vms/{}", encode(&name)), None)
                .await?;
            print_vm(&vm, output)?;
        }
        VmCommand::Start { name } => report(&action(&client, &name, "start").await?),
        VmCommand::Stop {
            name,
            force,
            timeout,
        } => {
            let verb = if force {
                "force-stop".to_owned()
            } else {
                format!("stop?timeout_secs={timeout}")
            };
            report(&action(&client, &name, &verb).await?);
        }
        VmCommand::Restart { name, timeout } => {
            report(&action(&client, &name, &format!("restart?timeout_secs={timeout}")).await?);
        }
        VmCommand::Pause { name } => report(&action(&client, &name, "pause").await?),
        VmCommand::Resume { name } => report(&action(&client, &name, "resume").await?),
        VmCommand::Rm { name, keep_disks } => {
            let path = format!("/api/v1/vms/{}?keep_disks={keep_disks}", encode(&name));
            client.call(Method::DELETE, &path, None).await?;
            println!("{name} deleted");
        }
        VmCommand::Snapshot(command) => snapshot(&client, command).await?,
        VmCommand::Clone { source, name, wait } => {
            let path = format!("/api/v1/vms/{}/clone", encode(&source));
            let body = json!({ "name": name });
            let what = "copying the disk";
            if let Outcome::Done =
                operation::run(&client, Method::POST, &path, Some(&body), wait, what).await?
            {
                println!("{name} cloned from {source}");
            }
        }
        VmCommand::Console { name } => return crate::console::attach_remote(&client, &name).await,
        VmCommand::Exec {
            name,
            timeout,
            command,
        } => return exec(&client, &name, timeout, command).await,
        VmCommand::Cp { from, to } => copy(&client, &from, &to).await?,
        VmCommand::Reidentify { name } => {
            let path = format!("/api/v1/vms/{}/reidentify", encode(&name));
            let done: quetzal_api::Reidentified = client.call_as(Method::POST, &path, None).await?;
            for step in done.steps {
                println!("{}: {}", step.step, step.outcome);
            }
        }
        VmCommand::Clipboard { name, set } => {
            let path = format!("/api/v1/vms/{}/clipboard", encode(&name));
            match set {
                None => {
                    let clipboard: quetzal_api::Clipboard =
                        client.call_as(Method::GET, &path, None).await?;
                    print!("{}", clipboard.text);
                }
                Some(text) => {
                    let text = if text == "-" {
                        let mut text = String::new();
                        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                            .context("reading the text from stdin")?;
                        text
                    } else {
                        text
                    };
                    let body = serde_json::json!({ "text": text });
                    client.call(Method::PUT, &path, Some(&body)).await?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn action(client: &Client, name: &str, verb: &str) -> anyhow::Result<Vm> {
    let path = format!("/api/v1/vms/{}/{verb}", encode(name));
    Ok(client.call_as(Method::POST, &path, None).await?)
}

fn report(vm: &Vm) {
    println!("{} is {}", vm.name, vm.state.as_str());
}

/// `connected: quetzal-agent 0.1.0 on Debian GNU/Linux 12 (web)`.
fn describe_agent(agent: &quetzal_api::Agent) -> String {
    if !agent.connected {
        return "not connected".to_owned();
    }
    let mut text = format!(
        "connected: {}",
        agent.version.as_deref().unwrap_or("unknown version")
    );
    if let Some(os) = &agent.os {
        text.push_str(&format!(" on {os}"));
    }
    if let Some(hostname) = &agent.hostname {
        text.push_str(&format!(" ({hostname})"));
    }
    text
}

fn print_vm(vm: &Vm, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(vm)?),
        Output::Human => {
            let labels: Vec<String> = vm.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("Name      {}", vm.name);
            println!("State     {}", vm.state.as_str());
            println!("Image     {}", vm.image);
            println!("CPUs      {}", vm.cpus);
            println!("Memory    {} MiB", vm.memory_mib);
            println!("Disk      {} MiB", vm.disk_mib);
            println!("Restart   {}", vm.restart_policy.as_str());
            println!(
                "Labels    {}",
                if labels.is_empty() {
                    "-".to_owned()
                } else {
                    labels.join(", ")
                }
            );
            println!(
                "PID       {}",
                vm.pid.map_or_else(|| "-".to_owned(), |p| p.to_string())
            );
            println!("Restarts  {}", vm.restarts);
            println!("Network   {} (MAC {})", vm.network, vm.mac);
            println!("Addresses {}", addresses(vm));
            if let Some(cloud) = &vm.cloud_init {
                let user = cloud.user.as_deref().unwrap_or("the image's default user");
                let keys = match cloud.ssh_keys.len() {
                    0 => "no SSH key".to_owned(),
                    1 => format!("SSH key {}", cloud.ssh_keys[0]),
                    n => format!("{n} SSH keys"),
                };
                let user_data = match cloud.user_data_bytes {
                    Some(bytes) => format!(", user-data {bytes} bytes"),
                    None => String::new(),
                };
                println!(
                    "Cloud-init host {}, {keys} for {user}{user_data}",
                    cloud.hostname
                );
            }
            for service in &vm.services {
                let run = match (&service.unit, &service.command) {
                    (Some(unit), _) => format!("unit {unit}"),
                    (None, Some(command)) => format!("command {command}"),
                    (None, None) => "nothing".to_owned(),
                };
                println!("Watching  {}: {run}", service.name);
            }
            if let Some(memory) = &vm.guest_memory {
                #[allow(clippy::cast_precision_loss)]
                let mib = |bytes: u64| bytes as f64 / f64::from(1u32 << 20);
                println!(
                    "Guest mem {:.0} of {:.0} MiB used (from its {})",
                    mib(memory.used_bytes),
                    mib(memory.total_bytes),
                    memory.source
                );
            }
            if let Some(memory) = &vm.host_memory {
                #[allow(clippy::cast_precision_loss)]
                let mib = |bytes: u64| bytes as f64 / f64::from(1u32 << 20);
                let mut shared = format!("{:.0} MiB shared", mib(memory.shared_bytes));
                if let Some(template) = memory.template_shared_bytes {
                    shared.push_str(&format!(" ({:.0} MiB its template's)", mib(template)));
                }
                println!(
                    "Host mem  PSS {:.0} MiB: {:.0} MiB private, {shared}, {:.0} MiB merged by KSM",
                    mib(memory.pss_bytes),
                    mib(memory.private_bytes),
                    mib(memory.ksm_merged_bytes)
                );
            }
            if vm.ram_file {
                println!("RAM file  yes (it can become a warm template while it runs)");
            }
            if let Some(pin) = &vm.cpu_pin {
                println!("CPU pin   vCPUs on host CPUs {pin}");
            }
            if let Some(weight) = vm.cpu_weight {
                let state = if weight > 100 {
                    " (boosted: its user is at it)"
                } else {
                    ""
                };
                println!("CPU weight {weight}{state}");
            }
            if let Some(agent) = &vm.agent {
                println!("Agent     {}", describe_agent(agent));
                if let Some([one, five, fifteen]) = agent.load {
                    println!("Load      {one:.2} {five:.2} {fifteen:.2}");
                }
                for fs in &agent.filesystems {
                    // Whole GiB and tenths: sizes far below 2^52 bytes.
                    #[allow(clippy::cast_precision_loss)]
                    let gib = |bytes: u64| bytes as f64 / f64::from(1u32 << 30);
                    println!(
                        "Guest fs  {} ({}): {:.1} of {:.1} GiB used",
                        fs.mountpoint,
                        fs.fs_type,
                        gib(fs.used_bytes),
                        gib(fs.total_bytes)
                    );
                }
            }
            if let Some(template) = &vm.linked_to {
                println!("Linked to template {template}");
            }
        }
    }
    Ok(())
}

fn print_table(vms: &[Vm]) {
    let width = vms.iter().map(|vm| vm.name.len()).max().unwrap_or(4).max(4);
    println!(
        "{:<width$}  {:<8}  {:>4}  {:>8}  {:<6}  {:<10}  {:<15}  LABELS",
        "NAME", "STATE", "CPUS", "MEMORY", "IMAGE", "NETWORK", "ADDRESSES"
    );
    for vm in vms {
        let labels: Vec<String> = vm.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<width$}  {:<8}  {:>4}  {:>5} MiB  {:<6}  {:<10}  {:<15}  {}",
            vm.name,
            vm.state.as_str(),
            vm.cpus,
            vm.memory_mib,
            vm.image,
            vm.network,
            addresses(vm),
            labels.join(",")
        );
    }
}

fn addresses(vm: &Vm) -> String {
    if vm.addresses.is_empty() {
        "-".to_owned()
    } else {
        vm.addresses.join(",")
    }
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing events as they happen.
    #[arg(long)]
    follow: bool,
    /// Only this VM's events.
    #[arg(long)]
    vm: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

pub fn events(args: EventsArgs) -> anyhow::Result<ExitCode> {
    crate::block_on(async {
        let client = Client::from_env();
        let filter = args
            .vm
            .as_deref()
            .map(|vm| format!("&vm={}", encode(vm)))
            .unwrap_or_default();
        let mut after = 0;
        loop {
            let page: EventPage = client
                .call_as(
                    Method::GET,
                    &format!("/api/v1/events?after={after}&limit=1000{filter}"),
                    None,
                )
                .await?;
            for event in &page.events {
                print_event(event, args.output)?;
            }
            match page.next_after {
                Some(next) => after = next,
                None => break,
            }
        }
        if args.follow {
            follow(&client, args.vm.as_deref(), args.output).await?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

async fn follow(client: &Client, vm: Option<&str>, output: Output) -> anyhow::Result<()> {
    let response = client
        .send(Method::GET, "/api/v1/events/stream", None)
        .await?;
    let mut body = response.into_body();
    let mut pending = String::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = pending.find("\n\n") {
            let message: String = pending.drain(..end + 2).collect();
            // Named messages (`event: operation`) are not VM events.
            if message.lines().any(|line| line.starts_with("event:")) {
                continue;
            }
            for line in message.lines() {
                let Some(json) = line.strip_prefix("data:") else {
                    continue;
                };
                let event: Event = serde_json::from_str(json.trim())?;
                if vm.is_none_or(|vm| vm == event.vm) {
                    print_event(&event, output)?;
                }
            }
        }
    }
    Ok(())
}

fn print_event(event: &Event, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string(event)?),
        Output::Human => {
            let state = event.state.map_or("-", |s| s.as_str());
            println!(
                "{:>6}  {}  {:<12} {:<8} {}",
                event.id,
                event.vm,
                event.kind.as_str(),
                state,
                event.cause
            );
        }
    }
    use std::io::Write;
    std::io::stdout().flush()?;
    Ok(())
}

/// `quetzal token`: the API token for quetzald's TCP listener.
/// The API token quetzald keeps in `data`.
pub fn read_token(data: &std::path::Path) -> anyhow::Result<String> {
    let path = quetzal_node::token::path(data);
    let token = std::fs::read_to_string(&path).map_err(|err| {
        anyhow::anyhow!(
            "cannot read {}: {err} (has quetzald run on this data directory?)",
            path.display()
        )
    })?;
    Ok(token.trim().to_owned())
}

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Turn a stopped VM into a template (the VM is consumed; its disk
    /// becomes the template's read-only base); with --warm, a running VM
    /// whose memory is kept too (its clones resume it, without a boot).
    Create {
        name: String,
        /// The VM: stopped, or running with --warm.
        #[arg(long)]
        from: String,
        /// Keep the running VM's memory and device state: VMs created
        /// from the template are instant clones.
        #[arg(long)]
        warm: bool,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// List templates and their linked clones.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one template.
    Show {
        name: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a template no VM is a linked clone of.
    Rm { name: String },
}

pub fn template(command: TemplateCommand) -> anyhow::Result<ExitCode> {
    crate::block_on(async {
        let client = Client::from_env();
        match command {
            TemplateCommand::Create {
                name,
                from,
                warm,
                output,
                wait,
            } => {
                let body = json!({ "name": name, "from_vm": from, "warm": warm });
                let path = "/api/v1/templates";
                let what = if warm {
                    "saving the memory and hashing the files"
                } else {
                    "hashing the disk"
                };
                if let Outcome::Done =
                    operation::run(&client, Method::POST, path, Some(&body), wait, what).await?
                {
                    let path = format!("/api/v1/templates/{}", encode(&name));
                    let template: Template = client.call_as(Method::GET, &path, None).await?;
                    print_templates(&[template], output)?;
                }
            }
            TemplateCommand::List { output } => {
                let templates: Vec<Template> = client
                    .call_as(Method::GET, "/api/v1/templates", None)
                    .await?;
                print_templates(&templates, output)?;
            }
            TemplateCommand::Show { name, output } => {
                let path = format!("/api/v1/templates/{}", encode(&name));
                let template: Template = client.call_as(Method::GET, &path, None).await?;
                print_templates(&[template], output)?;
            }
            TemplateCommand::Rm { name } => {
                client
                    .call(
                        Method::DELETE,
                        &format!("/api/v1/templates/{}", encode(&name)),
                        None,
                    )
                    .await?;
                println!("template {name} deleted");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn print_templates(templates: &[Template], output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json if templates.len() == 1 => {
            println!("{}", serde_json::to_string_pretty(&templates[0])?)
        }
        Output::Json => println!("{}", serde_json::to_string_pretty(templates)?),
        Output::Human => {
            let width = templates
                .iter()
                .map(|t| t.name.len())
                .max()
                .unwrap_or(4)
                .max(4);
            println!(
                "{:<width$}  {:<6}  {:<4}  {:>4}  {:>8}  {:<10}  LINKED CLONES",
                "NAME", "IMAGE", "KIND", "CPUS", "MEMORY", "FROM VM"
            );
            for t in templates {
                println!(
                    "{:<width$}  {:<6}  {:<4}  {:>4}  {:>5} MiB  {:<10}  {}",
                    t.name,
                    t.image,
                    if t.warm.is_some() { "warm" } else { "cold" },
                    t.cpus,
                    t.memory_mib,
                    t.source_vm,
                    if t.linked_clones.is_empty() {
                        "-".to_owned()
                    } else {
                        t.linked_clones.join(",")
                    }
                );
            }
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot: disks and memory while the VM runs, disks only
    /// while it is stopped.
    Create {
        vm: String,
        name: String,
        /// Do not freeze the guest's filesystems through its agent: a
        /// crash-consistent snapshot.
        #[arg(long)]
        no_quiesce: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// List a VM's snapshots (* marks the one it is at).
    List {
        vm: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Go back to a snapshot.
    Revert {
        vm: String,
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Delete a snapshot.
    Rm {
        vm: String,
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

async fn snapshot(client: &Client, command: SnapshotCommand) -> anyhow::Result<()> {
    match command {
        SnapshotCommand::Create {
            vm,
            name,
            no_quiesce,
            wait,
        } => {
            let path = format!("/api/v1/vms/{}/snapshots", encode(&vm));
            let body = json!({ "name": name, "quiesce": !no_quiesce });
            let what = "taking the snapshot";
            if let Outcome::Done =
                operation::run(client, Method::POST, &path, Some(&body), wait, what).await?
            {
                let list: SnapshotList = client.call_as(Method::GET, &path, None).await?;
                let taken = list.snapshots.iter().find(|s: &&Snapshot| s.name == name);
                let kind = match taken {
                    Some(s) if s.with_memory && s.quiesced => "disks and memory, quiesced",
                    Some(s) if s.with_memory => "disks and memory",
                    _ => "disks only",
                };
                println!("snapshot {name} of {vm} taken ({kind})");
            }
        }
        SnapshotCommand::List { vm, output } => {
            let path = format!("/api/v1/vms/{}/snapshots", encode(&vm));
            let list: SnapshotList = client.call_as(Method::GET, &path, None).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                Output::Human => {
                    println!("  {:<20} {:<8} PARENT", "NAME", "MEMORY");
                    for s in &list.snapshots {
                        let mark = if list.current.as_deref() == Some(s.name.as_str()) {
                            "*"
                        } else {
                            " "
                        };
                        let memory = if s.with_memory { "yes" } else { "no" };
                        println!(
                            "{mark} {:<20} {memory:<8} {}",
                            s.name,
                            s.parent.as_deref().unwrap_or("-")
                        );
                    }
                }
            }
        }
        SnapshotCommand::Revert { vm, name, wait } => {
            let path = format!(
                "/api/v1/vms/{}/snapshots/{}/revert",
                encode(&vm),
                encode(&name)
            );
            let what = "reverting";
            if let Outcome::Done =
                operation::run(client, Method::POST, &path, None, wait, what).await?
            {
                let path = format!("/api/v1/vms/{}", encode(&vm));
                let vm: Vm = client.call_as(Method::GET, &path, None).await?;
                println!(
                    "{} reverted to {name}; it is {}",
                    vm.name,
                    vm.state.as_str()
                );
            }
        }
        SnapshotCommand::Rm { vm, name, wait } => {
            let path = format!("/api/v1/vms/{}/snapshots/{}", encode(&vm), encode(&name));
            let what = "deleting the snapshot";
            if let Outcome::Done =
                operation::run(client, Method::DELETE, &path, None, wait, what).await?
            {
                println!("snapshot {name} of {vm} deleted");
            }
        }
    }
    Ok(())
}

/// `quetzal vm exec`: the guest command's output on ours, its exit code
/// ours (128 + N for a signal, as a shell does).
async fn exec(
    client: &Client,
    name: &str,
    timeout: Option<u64>,
    mut command: Vec<String>,
) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let program = command.remove(0);
    let body = json!({ "command": program, "args": command, "timeout_secs": timeout });
    let ended: quetzal_api::ExecResult = client
        .call_as(
            Method::POST,
            &format!("/api/v1/vms/{}/exec", encode(name)),
            Some(&body),
        )
        .await?;
    let bytes = |text: &str| {
        quetzal_qga::decode(text)
            .ok_or_else(|| anyhow::anyhow!("quetzald sent output that is not base64"))
    };
    std::io::stdout().write_all(&bytes(&ended.stdout_b64)?)?;
    std::io::stderr().write_all(&bytes(&ended.stderr_b64)?)?;
    if ended.truncated {
        eprintln!("quetzal: the output was longer than 1 MiB; the rest is cut");
    }
    let code = match (ended.exit_code, ended.signal) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    };
    Ok(ExitCode::from(
        u8::try_from(code.clamp(0, 255)).unwrap_or(1),
    ))
}

/// `VM:/PATH` as (VM, PATH); none for a local path.
fn guest_side(arg: &str) -> Option<(&str, &str)> {
    let (vm, path) = arg.split_once(':')?;
    let named = !vm.is_empty()
        && vm
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    (named && path.starts_with('/')).then_some((vm, path))
}

/// `quetzal vm cp`: one side local, the other `VM:/PATH`.
async fn copy(client: &Client, from: &str, to: &str) -> anyhow::Result<()> {
    let files =
        |vm: &str, path: &str| format!("/api/v1/vms/{}/files?path={}", encode(vm), encode(path));
    match (guest_side(from), guest_side(to)) {
        (None, Some((vm, path))) => {
            let size = std::fs::metadata(from)
                .map_err(|err| anyhow::anyhow!("cannot read {from}: {err}"))?
                .len();
            let limit = quetzal_node::node::MAX_GUEST_FILE;
            if size > u64::try_from(limit).unwrap_or(u64::MAX) {
                anyhow::bail!(
                    "{from} is {size} bytes; a file copied into a guest is at most {} MiB",
                    limit >> 20
                );
            }
            let bytes =
                std::fs::read(from).map_err(|err| anyhow::anyhow!("cannot read {from}: {err}"))?;
            client
                .transfer(Method::PUT, &files(vm, path), Some(bytes))
                .await?;
            eprintln!("quetzal: {from} copied to {vm}:{path} ({size} bytes)");
        }
        (Some((vm, path)), None) => {
            let bytes = client.transfer(Method::GET, &files(vm, path), None).await?;
            std::fs::write(to, &bytes)
                .map_err(|err| anyhow::anyhow!("cannot write {to}: {err}"))?;
            eprintln!(
                "quetzal: {vm}:{path} copied to {to} ({} bytes)",
                bytes.len()
            );
        }
        _ => {
            anyhow::bail!("one side of vm cp is a guest file, VM:/PATH, and the other a local file")
        }
    }
    Ok(())
}
