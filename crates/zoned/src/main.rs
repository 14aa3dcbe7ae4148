//! `zoned`: parse arguments, load the configuration, run the daemon. The
//! exit code is 0 after a clean stop, 2 for a configuration error (a join
//! to a zone that does not list this server included), 3 when this server
//! was removed from the zone, 1 for any other failure.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use zoned::config::{parse_voter, Config, Overrides, Voter};

/// mimalloc instead of glibc's malloc for Rust's allocations: requests,
/// entries and records are allocated on one thread and freed on another
/// (gRPC tasks, the Raft thread), which glibc's arenas handle poorly (its
/// malloc and free took about a sixth of the Raft thread under load).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Zoned control daemon: one server of a Raft-replicated zone.
///
/// Settings come from the TOML file given with --config (every field has a
/// default; see --print-config), then from the flags below, which win.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Node configuration file (TOML).
    #[arg(short, long, env = "ZONED_CONFIG")]
    config: Option<PathBuf>,
    /// Raft id of this server (node.id).
    #[arg(long)]
    id: Option<u64>,
    /// Display name (node.name).
    #[arg(long)]
    name: Option<String>,
    /// Data directory (node.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Client gRPC listen address (node.client_listen).
    #[arg(long)]
    client_listen: Option<SocketAddr>,
    /// Peer gRPC listen address (node.peer_listen).
    #[arg(long)]
    peer_listen: Option<SocketAddr>,
    /// Initial voters as id=host:port,... (replaces [[voters]]); may be
    /// given more than once.
    #[arg(long, value_parser = parse_voter, value_delimiter = ',')]
    voters: Option<Vec<Voter>>,
    /// Join an existing zone through this member's client address
    /// (node.join); the server must have been added with `zonectl server add`.
    #[arg(long)]
    join: Option<String>,
    /// With --join: the one-time token `zonectl server add` printed, for a
    /// server without certificates yet (node.join_token). Also read from
    /// ZONED_JOIN_TOKEN, which other users cannot see in the process list.
    #[arg(long, env = "ZONED_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Log filter, RUST_LOG syntax (default: info).
    #[arg(long)]
    log: Option<String>,
    /// Print a commented configuration with every default and exit.
    #[arg(long)]
    print_config: bool,
    /// Validate the configuration, print it resolved, and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_config {
        print!("{}", Config::example());
        return ExitCode::SUCCESS;
    }
    zoned::logging::init(args.log.as_deref());
    let overrides = Overrides {
        id: args.id,
        name: args.name,
        data_dir: args.data_dir,
        client_listen: args.client_listen,
        peer_listen: args.peer_listen,
        voters: args.voters,
        join: args.join,
        join_token: args.join_token,
    };
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("zoned: configuration error: {}", zoned::logging::chain(&e));
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        match toml::to_string_pretty(&config) {
            Ok(text) => print!("{text}"),
            Err(e) => eprintln!("zoned: cannot print the configuration: {e}"),
        }
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zoned: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(zoned::server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %zoned::logging::chain(&e), "zoned failed");
            eprintln!("zoned: {}", zoned::logging::chain(&e));
            match e {
                // systemd: RestartPreventExitStatus=3, a removed server must
                // not come back on its own.
                zoned::server::ServeError::Removed { .. } => ExitCode::from(3),
                zoned::server::ServeError::NotAMember { .. }
                | zoned::server::ServeError::WipedFounder { .. }
                | zoned::server::ServeError::ZoneTiming(_) => ExitCode::from(2),
                zoned::server::ServeError::Joining(j) if j.is_final() => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
