//! `quetzald`: the Quetzal node daemon (the library is `quetzal-node`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "quetzald", version, about = "The Quetzal node daemon")]
struct Args {
    /// Where VMs, images and the store live [default: $QUETZAL_DATA_DIR,
    /// else /var/lib/quetzal as root, else ~/.local/share/quetzal].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Also serve the API on this TCP address, over HTTPS (a bearer token
    /// is required).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The certificate (PEM, leaf first) to serve HTTPS with [default: the
    /// node's own, made at first start in DATA/tls/].
    #[arg(long, requires_all = ["tls_key", "listen"])]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Remove what this data directory's networks made on the host
    /// (dnsmasq, bridges, nftables rules), then exit. A stopped quetzald
    /// otherwise leaves them up for the VMs still running.
    #[arg(long, conflicts_with = "listen")]
    remove_networks: bool,
    /// Kernel samepage merging of the host: `off`, `on`, or `auto` (on
    /// while less than 40% of memory is available), paced as ksmtuned
    /// paces it.
    #[arg(long, default_value = "auto", value_parser = ["off", "on", "auto"])]
    ksm: String,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(err) if !err.use_stderr() => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            let rendered = err.to_string();
            eprintln!(
                "quetzald: {}",
                rendered
                    .lines()
                    .next()
                    .unwrap_or("invalid arguments")
                    .trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUETZAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    quetzal_engine::failpoint::setup();
    let config = quetzal_node::Config {
        data_dir: args.data_dir.unwrap_or_else(quetzal_image::data_dir),
        listen: args.listen,
        tls: args
            .tls_cert
            .zip(args.tls_key)
            .map(|(cert, key)| quetzal_node::tls::Given { cert, key }),
        ksm: quetzal_node::ksm::KsmMode::parse(&args.ksm).unwrap_or_default(),
    };
    let remove_networks = args.remove_networks;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("quetzald: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    if remove_networks {
        return match runtime.block_on(quetzal_node::net::teardown(&config.data_dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("quetzald: {err}");
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(quetzal_node::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("quetzald: {err:#}");
            ExitCode::FAILURE
        }
    }
}
