//! `quetzal token` (the first admin token, and named tokens with roles)
//! and `quetzal audit` (what was done, by whom).

use std::process::ExitCode;

use clap::{Args, Subcommand};
use hyper::Method;
use quetzal_api::{AuditEntry, CreatedToken, Host, Role, Token};
use serde_json::json;

use crate::Output;
use crate::client::{Client, encode};

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: Option<TokenCommand>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a named token with a role; its secret is printed once, as the
    /// last line.
    Create {
        name: String,
        /// viewer (read only), operator (runs VMs) or admin (everything).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Days until it stops working [default: never].
        #[arg(long, value_name = "DAYS")]
        expires: Option<u32>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// The tokens: names, roles, made, last used, expiry (never secrets).
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Revoke a token: it and its dashboard sessions stop working at once.
    Revoke { name: String },
}

fn parse_role(text: &str) -> Result<Role, String> {
    Role::parse(text).ok_or_else(|| format!("unknown role '{text}': viewer, operator or admin"))
}

pub fn token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    crate::block_on(async {
        let client = Client::from_env();
        match args.command {
            None => first_admin(&client).await?,
            Some(TokenCommand::Create {
                name,
                role,
                expires,
                output,
            }) => {
                let body = json!({ "name": name, "role": role, "expires_days": expires });
                let created: CreatedToken = client
                    .call_as(Method::POST, "/api/v1/tokens", Some(&body))
                    .await?;
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&created)?),
                    Output::Human => {
                        let expiry = created.token.expires_at.map_or_else(
                            || "never expires".to_owned(),
                            |at| format!("expires {}", when(at)),
                        );
                        println!(
                            "token {} ({}, {expiry}); its secret, shown only now:",
                            created.token.name, created.token.role
                        );
                        println!("{}", created.secret);
                    }
                }
            }
            Some(TokenCommand::List { output }) => {
                let tokens: Vec<Token> =
                    client.call_as(Method::GET, "/api/v1/tokens", None).await?;
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&tokens)?),
                    Output::Human => print_tokens(&tokens),
                }
            }
            Some(TokenCommand::Revoke { name }) => {
                client
                    .call(
                        Method::DELETE,
                        &format!("/api/v1/tokens/{}", encode(&name)),
                        None,
                    )
                    .await?;
                eprintln!("quetzal: token {name} revoked");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The first admin token (this host's `DATA/token`), and the fingerprint
/// of the certificate a remote CLI should pin.
async fn first_admin(client: &Client) -> anyhow::Result<()> {
    let token = crate::vm::read_token(&crate::data_dir())?;
    match client
        .call_as::<Host>(Method::GET, "/api/v1/host", None)
        .await
    {
        Ok(Host {
            tls_fingerprint: Some(fingerprint),
            ..
        }) => eprintln!(
            "quetzal: the HTTPS listener's certificate has SHA-256 fingerprint {fingerprint}"
        ),
        Ok(_) => eprintln!("quetzal: quetzald has no HTTPS listener (start it with --listen)"),
        Err(err) => eprintln!("quetzal: no certificate fingerprint: {err}"),
    }
    println!("{token}");
    Ok(())
}

fn print_tokens(tokens: &[Token]) {
    let width = tokens
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<width$}  {:<8}  {:<16}  {:<16}  EXPIRES",
        "NAME", "ROLE", "CREATED", "LAST USED"
    );
    for token in tokens {
        println!(
            "{:<width$}  {:<8}  {:<16}  {:<16}  {}",
            token.name,
            token.role,
            when(token.created_at),
            token.last_used_at.map_or_else(|| "never".to_owned(), when),
            token.expires_at.map_or_else(|| "never".to_owned(), when),
        );
    }
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Keep printing requests as they happen.
    #[arg(long)]
    follow: bool,
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

pub fn audit(args: AuditArgs) -> anyhow::Result<ExitCode> {
    crate::block_on(async {
        let client = Client::from_env();
        let mut after = 0;
        loop {
            // Following, each call waits up to 30 s for a new row.
            let wait = if args.follow { 30 } else { 0 };
            let rows: Vec<AuditEntry> = client
                .call_as(
                    Method::GET,
                    &format!("/api/v1/audit?after={after}&limit=1000&wait_secs={wait}"),
                    None,
                )
                .await?;
            match args.output {
                Output::Json if !args.follow => {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                }
                Output::Json => {
                    for row in &rows {
                        println!("{}", serde_json::to_string(row)?);
                    }
                }
                Output::Human => {
                    if after == 0 {
                        println!(
                            "{:>6}  {:<16}  {:<12}  {:<16}  {:>6}  {:<6}  PATH",
                            "ID", "AT", "WHO", "FROM", "STATUS", "METHOD"
                        );
                    }
                    for row in &rows {
                        println!(
                            "{:>6}  {:<16}  {:<12}  {:<16}  {:>6}  {:<6}  {}",
                            row.id,
                            when(row.at),
                            row.who,
                            row.source,
                            row.status,
                            row.method,
                            row.path
                        );
                    }
                }
            }
            let full = rows.len() == 1000;
            if let Some(last) = rows.last() {
                after = last.id;
            }
            if !full && !args.follow {
                break;
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM` in UTC.
fn when(millis: i64) -> String {
    let secs = millis.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_times_in_utc() {
        assert_eq!(when(0), "1970-01-01 00:00");
        assert_eq!(when(951_782_400_000), "2000-02-29 00:00");
        assert_eq!(when(1_796_179_139_995), "2026-12-02 02:38");
    }

    #[test]
    fn knows_the_three_roles_only() {
        assert_eq!(parse_role("operator"), Ok(Role::Operator));
        assert!(
            parse_role("root")
                .unwrap_err()
                .contains("viewer, operator or admin")
        );
    }
}
