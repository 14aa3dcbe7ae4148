//! `zone-mounts`: mounts the zone's datastores on this server, probes them,
//! reports their health to the local zoned. Exit code 2: bad arguments or
//! configuration. `zone-mounts helper ...` is the child it runs for each
//! mount, probe and unmount (not for operators).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use zone_mounts::effects::Children;
use zone_mounts::supervisor::Supervisor;

const SYSTEMD_RUNTIME_UNITS: &str = "/run/systemd/system";

#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// The local zoned's unix socket for agents. Default: zoned's
    /// node.agent_socket in --config (/run/zoned/agent.sock unless set).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// zoned's node.toml: its node.id names this server's write-probe
    /// directory (`.zoned-probe/<id>`), its node.agent_socket is the
    /// default for --socket.
    #[arg(long, default_value = "/etc/zoned/node.toml")]
    config: PathBuf,
    /// What zone-mounts mounted (`owned.json`), so that a datastore removed
    /// while it was down is unmounted when it comes back. On /run: mounts
    /// do not outlive a boot either.
    #[arg(long, default_value = "/run/zone-mounts")]
    state_dir: PathBuf,
    /// Where the mount units of exclusive datastores go (zone-vip starts
    /// them on the lease holder). systemd is told of changes
    /// (`systemctl daemon-reload`) only when this is its runtime unit
    /// directory, /run/systemd/system.
    #[arg(long, default_value = SYSTEMD_RUNTIME_UNITS)]
    units_dir: PathBuf,
    #[command(subcommand)]
    helper: Option<Helper>,
}

/// One operation on storage, in a child process that may hang.
#[derive(Debug, Subcommand)]
enum Helper {
    #[command(hide = true, subcommand)]
    Helper(Op),
}

#[derive(Debug, Subcommand)]
enum Op {
    Mount {
        #[arg(long = "type")]
        ty: String,
        #[arg(long)]
        source: String,
        #[arg(long, default_value = "")]
        options: String,
        target: PathBuf,
    },
    Umount {
        #[arg(long)]
        lazy: bool,
        #[arg(long)]
        force: bool,
        target: PathBuf,
    },
    Probe {
        #[arg(long)]
        write_as: Option<u64>,
        target: PathBuf,
    },
}

fn helper(op: Op) -> ! {
    let r = match op {
        Op::Mount {
            ty,
            source,
            options,
            target,
        } => zone_mounts::child::mount(&ty, &source, &options, &target),
        Op::Umount {
            lazy,
            force,
            target,
        } => zone_mounts::child::unmount(&target, lazy, force),
        Op::Probe { write_as, target } => zone_mounts::child::probe(&target, write_as),
    };
    match r {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    }
}

fn main() {
    let args = Args::parse();
    if let Some(Helper::Helper(op)) = args.helper {
        helper(op);
    }
    zone_log::init(None);
    let node = match zone_files::settings::read_node_file(&args.config) {
        Ok(node) => node,
        Err(e) => {
            eprintln!("zone-mounts: {:#}", anyhow::Error::from(e));
            std::process::exit(2);
        }
    };
    if node.node.id == 0 {
        eprintln!(
            "zone-mounts: node.id: {} names no server id (zoned's node.id, 1 or more)",
            args.config.display()
        );
        std::process::exit(2);
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("zone-mounts: cannot find its own binary to run helpers: {e}");
            std::process::exit(2);
        }
    };
    let socket = args.socket.clone().unwrap_or(node.node.agent_socket);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let reload = args.units_dir == std::path::Path::new(SYSTEMD_RUNTIME_UNITS);
        let children = Children {
            exe,
            units_dir: args.units_dir,
            reload,
        };
        let mut sup = Supervisor::new(Arc::new(children), node.node.id, args.state_dir);
        let ch = zone_mounts::follow::channel(&socket);
        let (rev_tx, rev_rx) = tokio::sync::watch::channel(0);
        tokio::spawn(zone_mounts::follow::report(
            ch.clone(),
            sup.table.clone(),
            rev_rx,
        ));
        tracing::info!(id = node.node.id, socket = %socket.display(), "zone-mounts started");
        loop {
            if let Err(e) = zone_mounts::follow::follow(ch.clone(), &mut sup, &rev_tx).await {
                tracing::warn!(error = %format!("{e:#}"), "lost the local zoned; retrying in 1 s");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}
