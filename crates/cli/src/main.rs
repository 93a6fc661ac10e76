//! `quetzal`: the command line of the Quetzal virtualization platform.

mod access;
mod client;
mod console;
mod host;
mod image;
mod network;
mod operation;
mod pool;
mod run;
mod trust;
mod up;
mod vm;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "quetzal", version, about = "Run virtual machines with Quetzal")]
struct Cli {
    /// Over HTTPS (QUETZAL_URL=https://…): trust the server whose
    /// certificate has this SHA-256 fingerprint [env: QUETZAL_FINGERPRINT].
    #[arg(long, global = true, value_name = "SHA256")]
    fingerprint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// What this host offers to VMs.
    #[command(subcommand)]
    Host(host::HostCommand),
    /// Guest images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Boot a VM in the foreground with its serial console on this terminal
    /// (no daemon needed).
    Run(run::RunArgs),
    /// VMs managed by quetzald.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Templates managed by quetzald.
    #[command(subcommand)]
    Template(vm::TemplateCommand),
    /// Managed networks (bridges with DHCP, DNS and NAT).
    #[command(subcommand)]
    Network(network::NetworkCommand),
    /// Desktop pools: desktops kept ready for users, handed out and taken
    /// back.
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// Long work (copies, snapshots) and how far it is.
    #[command(subcommand)]
    Operation(operation::OperationCommand),
    /// quetzald's event log (--follow to keep watching).
    Events(vm::EventsArgs),
    /// Print the first admin token (and the HTTPS certificate's
    /// fingerprint); or make, list and revoke named tokens with roles.
    Token(access::TokenArgs),
    /// The audit log: every change made through the API, by whom.
    Audit(access::AuditArgs),
    /// A working node in one command: image, daemon, demo VM.
    Up,
}

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned text for people.
    #[default]
    Human,
    /// JSON for scripts.
    Json,
}

pub use quetzal_image::data_dir;

/// Runs a command's future on a single-threaded runtime (each CLI
/// command is one short conversation with the daemon or the engine).
fn block_on<T>(future: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(future)
}

/// An error and its causes on one line, each cause once (our errors often
/// repeat their source in their own message).
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// clap's error without its usage and help hints, on one line.
fn clap_error_line(rendered: &str) -> String {
    rendered
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
        .trim_start_matches("error: ")
        .to_owned()
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help and --version.
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("quetzal: {}", clap_error_line(&err.to_string()));
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUETZAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if let Some(fingerprint) = cli.fingerprint {
        trust::pin_for_this_run(fingerprint);
    }
    let result = match cli.command {
        Command::Host(command) => host::run(command),
        Command::Image(command) => image::run(command),
        Command::Run(args) => run::run(args),
        Command::Vm(command) => vm::run(command),
        Command::Template(command) => vm::template(command),
        Command::Network(command) => network::run(command),
        Command::Pool(command) => pool::run(command),
        Command::Operation(command) => operation::command(command),
        Command::Events(args) => vm::events(args),
        Command::Token(args) => access::token(args),
        Command::Audit(args) => access::audit(args),
        Command::Up => up::run(),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("quetzal: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read kernel /x: {0}")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn prints_a_cause_already_in_the_message_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let err = anyhow::Error::new(Outer(io));

        assert_eq!(one_line(&err), "cannot read kernel /x: No such file");
    }

    #[test]
    fn puts_a_multi_line_clap_error_on_one_line() {
        let rendered = "error: the following required arguments were not provided:\n  --kernel <KERNEL>\n\nUsage: quetzal run --kernel <KERNEL>\n\nFor more information, try '--help'.\n";

        assert_eq!(
            clap_error_line(rendered),
            "the following required arguments were not provided: --kernel <KERNEL>"
        );
    }

    #[test]
    fn joins_distinct_causes() {
        let err = anyhow::anyhow!("inner").context("outer");

        assert_eq!(one_line(&err), "outer: inner");
    }
}
