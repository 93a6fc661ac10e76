//! Commands that start long work get an operation back (`202`): by
//! default they wait for it with a progress bar (on a terminal), with
//! `--no-wait` they print its id and return.

use std::process::ExitCode;

use clap::Args;
use hyper::Method;
use quetzal_api::{Operation, OperationKind, OperationList, OperationResponse, OperationState};
use serde_json::Value;

use crate::Output;
use crate::client::{Client, encode};

/// What a progress bar says an operation does.
pub fn describe(kind: OperationKind) -> &'static str {
    match kind {
        OperationKind::FullClone | OperationKind::CloneVm => "copying the disk",
        OperationKind::CreateTemplate => "hashing the disk",
        OperationKind::BuildImage => "building the image",
        OperationKind::SnapshotCreate => "taking the snapshot",
        OperationKind::SnapshotRevert => "reverting",
        OperationKind::SnapshotDelete => "deleting the snapshot",
    }
}

#[derive(Clone, Copy, Debug, Args)]
pub struct WaitArgs {
    /// Print the operation's id and return instead of waiting for it.
    #[arg(long)]
    no_wait: bool,
}

impl WaitArgs {
    pub fn no_wait(self) -> bool {
        self.no_wait
    }
}

/// What became of a request that may have started an operation.
#[derive(Debug)]
pub enum Outcome {
    /// It finished (with `--no-wait`: it was only started).
    Done,
    /// Started, not waited for: the operation's id was printed.
    Started,
}

/// Sends a request that answers an operation and, unless `--no-wait`,
/// waits for it to succeed. A failed or cancelled operation is an error
/// with its message.
pub async fn run(
    client: &Client,
    method: Method,
    path: &str,
    body: Option<&Value>,
    wait: WaitArgs,
    what: &str,
) -> anyhow::Result<Outcome> {
    let started: OperationResponse = client.call_as(method, path, body).await?;
    let op = started.operation;
    if wait.no_wait {
        println!("{}", op.id);
        return Ok(Outcome::Started);
    }
    finish(client, op, what).await.map(|_| Outcome::Done)
}

/// Waits for an operation to end; its final state, or an error when it
/// did not succeed.
pub async fn finish(client: &Client, mut op: Operation, what: &str) -> anyhow::Result<Operation> {
    let bar = indicatif::ProgressBar::new(100);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos:>3}%")
            .expect("a fixed template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    let path = format!("/api/v1/operations/{}", encode(&op.id));
    // The daemon answers when the operation ends, or after a second with
    // its progress so far.
    let path = format!("{path}/wait?timeout_secs=1");
    while op.state == OperationState::Running {
        bar.set_position(u64::from(op.progress));
        op = client
            .call_as::<OperationResponse>(Method::GET, &path, None)
            .await?
            .operation;
    }
    bar.finish_and_clear();
    match op.state {
        OperationState::Succeeded => Ok(op),
        _ => {
            let why = op
                .error
                .map_or_else(|| op.state.as_str().to_owned(), |e| e.message);
            anyhow::bail!("{why}")
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum OperationCommand {
    /// Recent operations, newest first.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// One operation.
    Show {
        id: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Wait for an operation to end (non-zero exit unless it succeeded).
    Wait { id: String },
    /// Cancel a running operation (a copy stops and leaves nothing).
    Cancel { id: String },
}

pub fn command(command: OperationCommand) -> anyhow::Result<ExitCode> {
    crate::block_on(async {
        let client = Client::from_env();
        let path = |id: &str| format!("/api/v1/operations/{}", encode(id));
        match command {
            OperationCommand::List { output } => {
                let list: OperationList = client
                    .call_as(Method::GET, "/api/v1/operations", None)
                    .await?;
                print(&list.operations, false, output)?;
            }
            OperationCommand::Show { id, output } => {
                let op: OperationResponse = client.call_as(Method::GET, &path(&id), None).await?;
                print(&[op.operation], true, output)?;
            }
            OperationCommand::Wait { id } => {
                let op: OperationResponse = client.call_as(Method::GET, &path(&id), None).await?;
                let what = describe(op.operation.kind);
                let op = finish(&client, op.operation.clone(), what).await?;
                println!("operation {} {}", op.id, op.state.as_str());
            }
            OperationCommand::Cancel { id } => {
                client.call(Method::DELETE, &path(&id), None).await?;
                println!("operation {id} is being cancelled");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Prints operations; `one` prints a lone JSON object, not a list.
fn print(ops: &[Operation], one: bool, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json if one => println!("{}", serde_json::to_string_pretty(&ops[0])?),
        Output::Json => println!("{}", serde_json::to_string_pretty(ops)?),
        Output::Human => {
            println!(
                "{:<16}  {:<15}  {:<9}  {:>4}  {:<30}  ERROR",
                "ID", "KIND", "STATE", "DONE", "TARGET"
            );
            for op in ops {
                println!(
                    "{:<16}  {:<15}  {:<9}  {:>3}%  {:<30}  {}",
                    op.id,
                    op.kind.as_str(),
                    op.state.as_str(),
                    op.progress,
                    op.target,
                    op.error.as_ref().map_or("-", |e| e.message.as_str())
                );
            }
        }
    }
    Ok(())
}
