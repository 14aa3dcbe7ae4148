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
    #[arg(short, long, env = "ZONED_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Raft id of this server (node.id).
    #[arg(long, global = true)]
    id: Option<u64>,
    /// Display name (node.name).
    #[arg(long, global = true)]
    name: Option<String>,
    /// Data directory (node.data_dir).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Client gRPC listen address (node.client_listen).
    #[arg(long)]
    client_listen: Option<SocketAddr>,
    /// Peer gRPC listen address (node.peer_listen).
    #[arg(long)]
    peer_listen: Option<SocketAddr>,
    /// Initial voters as id=host:port,... (replaces [[voters]]); may be
    /// given more than once.
    #[arg(long, value_parser = parse_voter, value_delimiter = ',', global = true)]
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
    #[arg(long, global = true)]
    log: Option<String>,
    /// Print a commented configuration with every default and exit.
    #[arg(long)]
    print_config: bool,
    /// Validate the configuration, print it resolved, and exit.
    #[arg(long)]
    check_config: bool,
    /// After losing quorum (the other servers' disks gone): make this
    /// server, with its data, the single voter of its zone; add the others
    /// back with `zonectl server add`. Refused when a leader told it of
    /// entries beyond its log or another server of the zone answers; given
    /// twice, forces regardless. Remove it once the server runs.
    #[arg(long, action = clap::ArgAction::Count)]
    force_new_zone: u8,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Build this server's data directory from a backup (`zonectl snapshot
    /// save`), as a founder of a new zone, then exit.
    ///
    /// Run it on every founder of the new zone with the same file and the
    /// same voters ([[voters]] or --voters), then start them: the zone
    /// gets a new id, every key its value and revisions at the backup's
    /// revision. Or restore one server alone (voters: itself) and add the
    /// others with `zonectl server add`. The file is checked whole before
    /// anything is written; an existing store is never overwritten.
    Restore {
        /// The backup file.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_config {
        print!("{}", Config::example());
        return ExitCode::SUCCESS;
    }
    // A restore prints its own lines; the log says only what goes wrong.
    let quiet = matches!(args.command, Some(Command::Restore { .. })).then_some("warn");
    zoned::logging::init(args.log.as_deref().or(quiet));
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
    // At least four workers, however few CPUs the server has. tokio's
    // default is one per CPU: on a one-CPU server (a small VM) one worker
    // then runs, task after task, a bulk transfer's TLS connection and the
    // tasks carrying Raft's messages, and a long poll of the first delays
    // the second. CI saw it: the leader of three one-vCPU VMs under QEMU's
    // TCG lost its lease every 3 s for 30 s while it received a 41 MiB
    // system extension, and zone-vip's watchdog finally reset it. With more
    // workers than CPUs, the kernel's scheduler shares the CPU between them
    // a time slice at a time, and an idle worker takes the waiting tasks.
    let workers = std::thread::available_parallelism().map_or(4, |n| n.get().max(4));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zoned: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Restore { from }) = &args.command {
        if args.force_new_zone > 0 {
            eprintln!("zoned restore: --force-new-zone does not apply to a restore (it forces a running zone's survivor)");
            return ExitCode::from(2);
        }
        return restore(&config, from);
    }
    if config.node.restore_from.is_some()
        && args.force_new_zone > 0
        && !config.node.data_dir.join("db").exists()
    {
        eprintln!("zoned: --force-new-zone does not apply to a start that restores node.restore_from (it forces a running zone's survivor)");
        return ExitCode::from(2);
    }
    match runtime.block_on(zoned::server::run(config, args.force_new_zone)) {
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
                | zoned::server::ServeError::ZoneMismatch(_)
                | zoned::server::ServeError::Recovery(_) => ExitCode::from(2),
                zoned::server::ServeError::Joining(j) if j.is_final() => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// `zoned restore --from FILE`: exit 0 once the store is in place, 2 when
/// the file or the data directory is refused, 1 on a write failure.
fn restore(config: &Config, from: &std::path::Path) -> ExitCode {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let mut shown = std::time::Instant::now();
    let progress = |done: u64, total: u64| {
        if tty && (shown.elapsed().as_millis() >= 200 || done == total) {
            shown = std::time::Instant::now();
            eprint!("\rzoned: restoring: {done} of {total} keys");
            if done == total {
                eprintln!();
            }
        }
    };
    match zoned::recovery::restore(config, from, progress) {
        Ok(r) => {
            let h = &r.summary.header;
            println!(
                "restored {} keys at revision {} (backup of zone {} taken from server {}, SHA-256 {}) into {}",
                r.summary.keys,
                h.revision,
                if h.zone_id.is_empty() { "?" } else { &h.zone_id },
                h.server_id,
                r.summary.sha256,
                r.db.display()
            );
            if r.voters.len() == 1 {
                println!(
                    "server {} is the single founder of a new zone: start it, then add the other servers with `zonectl server add`",
                    config.node.id
                );
            } else {
                println!(
                    "server {} is a founder of a new zone of voters {}: restore every other founder from the same file, then start them all",
                    config.node.id,
                    r.voters
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("zoned restore: {}", zoned::logging::chain(&e));
            match e {
                zoned::recovery::RecoveryError::Storage(_)
                | zoned::recovery::RecoveryError::Io { .. } => ExitCode::FAILURE,
                _ => ExitCode::from(2),
            }
        }
    }
}
