//! `zone-sync`: runs on every server beside zoned. Reads the managed files
//! from the local zoned (a linearizable read of `zone/config/file*`),
//! brings the disk to them, then follows changes with a watch from the
//! revision it applied; every `--drift-interval` it passes again, so a file
//! edited by hand is noticed and restored. Each pass is reported under
//! `zone/config/status/<id>`. Exit code 2: bad arguments or configuration.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tonic::transport::{Channel, Endpoint};
use zone_files::keys::FILE_PREFIX;
use zone_proto::v1::{agent_client::AgentClient, kv_client::KvClient, WatchRequest};
use zone_sync::apply::{Applier, State};
use zone_sync::daemon::{Daemon, RollOptions, SystemClock};
use zone_sync::disk::RootedDisk;
use zone_sync::roll::Systemctl;
use zone_sync::store::Grpc;

#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// The local zoned's unix socket for agents. Default: zoned's
    /// node.agent_socket in --config (/run/zoned/agent.sock unless set).
    /// Only root reaches it (mode 0600): zone-sync needs no certificate.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// zoned's node.toml: its [files].managed_roots limit what this server
    /// writes, whatever the store says; its [files].local_root is the
    /// default for --root; its node.agent_socket the default for --socket.
    #[arg(long, default_value = "/etc/zoned/node.toml")]
    config: PathBuf,
    /// The filesystem managed paths are written under. Default: zoned's
    /// [files].local_root, which is `/` unless set (tests and development
    /// clusters use a directory of their own).
    #[arg(long)]
    root: Option<PathBuf>,
    /// State (applied revision, what was written) and backups.
    #[arg(long, default_value = "/var/lib/zone-sync")]
    state_dir: PathBuf,
    /// Previous versions kept per file in <state-dir>/backups.
    #[arg(long, default_value_t = 5)]
    backups: usize,
    /// Seconds between passes that look for files edited by hand.
    #[arg(long, default_value_t = 30)]
    drift_interval: u64,
    /// One pass, then exit (0 when nothing was refused); restarts nothing.
    #[arg(long)]
    once: bool,
    /// What restarts units: `PROGRAM restart UNIT`, `PROGRAM is-active
    /// --quiet UNIT` (tests use a stand-in that records them).
    #[arg(long, default_value = "systemctl")]
    systemctl: PathBuf,
    /// Seconds a restarted unit has to become active before the roll stops.
    #[arg(long, default_value_t = 120)]
    restart_timeout: u64,
    /// Take turns in the roll but only log the restarts (a development
    /// cluster on a workstation must not restart the workstation's units).
    #[arg(long)]
    no_restart: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    zone_log::init(None);
    let args = Args::parse();
    // zoned's [files] settings: the managed roots limit what this server
    // writes, whatever the store says; the local root is the default for
    // --root.
    let (roots, local_root, socket) = match zone_files::settings::read_node_file(&args.config) {
        Ok(node) => (
            node.files.check().expect("checked when read"),
            node.files.local_root,
            args.socket.clone().unwrap_or(node.node.agent_socket),
        ),
        Err(e) => {
            eprintln!("zone-sync: {:#}", anyhow::Error::from(e));
            std::process::exit(2);
        }
    };
    let state_path = args.state_dir.join("state.json");
    let state = match State::load(&state_path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("zone-sync: {e}");
            std::process::exit(2);
        }
    };
    let fs_root = args.root.clone().unwrap_or(local_root);
    let applier = Applier {
        disk: RootedDisk::new(&fs_root, args.state_dir.join("backups")),
        roots,
        fs_root,
        backups_keep: args.backups.max(1),
        state,
    };
    let roll = RollOptions {
        restart_timeout: Duration::from_secs(args.restart_timeout.max(1)),
        no_restart: args.no_restart,
    };
    let units = Systemctl {
        program: args.systemctl.clone(),
    };
    // One pass needs the zone now; the daemon connects in `follow`, which
    // sets its store each time it (re)connects.
    let ch = if args.once {
        match connect(&socket).await {
            Ok(ch) => ch,
            Err(e) => {
                eprintln!("zone-sync: {e:#}");
                std::process::exit(1);
            }
        }
    } else {
        lazy(&socket)
    };
    let mut daemon = Daemon::new(Grpc::new(ch), applier, units, SystemClock, roll, state_path);
    if args.once {
        match daemon.pass().await {
            Ok(r) if r.refused.is_empty() => return,
            Ok(_) => std::process::exit(1),
            Err(e) => {
                eprintln!("zone-sync: {e:#}");
                std::process::exit(1);
            }
        }
    }
    let drift = Duration::from_secs(args.drift_interval.max(1));
    loop {
        if let Err(e) = follow(&socket, &mut daemon, drift).await {
            tracing::warn!(error = %format!("{e:#}"), "lost the local zoned; retrying in 1 s");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn endpoint() -> Endpoint {
    // The URI is not used: every connection goes to the unix socket.
    Endpoint::from_static("http://zoned.agent")
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(15))
}

fn connector(
    path: &Path,
) -> impl tower::Service<
    tonic::codegen::http::Uri,
    Response = TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    let path = path.to_owned();
    tower::service_fn(move |_| {
        let path = path.clone();
        async move {
            Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
        }
    })
}

async fn connect(socket: &Path) -> Result<Channel> {
    endpoint()
        .connect_with_connector(connector(socket))
        .await
        .with_context(|| format!("connecting to zoned at {}", socket.display()))
}

fn lazy(socket: &Path) -> Channel {
    endpoint().connect_with_connector_lazy(connector(socket))
}

/// Passes now, on every change to the managed files, and every drift
/// interval; takes this server's turn in the roll; until the connection
/// fails.
async fn follow(
    addr: &Path,
    daemon: &mut Daemon<Grpc, RootedDisk, Systemctl>,
    drift: Duration,
) -> Result<()> {
    let ch = connect(addr).await?;
    daemon.store = Grpc::new(ch.clone());
    let report = daemon.pass().await?;
    daemon.roll_step().await?;
    daemon.everywhere().await;
    let mut agent = AgentClient::new(ch.clone());
    report_figures(&mut agent, daemon).await;
    let mut stream = KvClient::new(ch.clone())
        .watch(WatchRequest {
            prefix: FILE_PREFIX.to_vec(),
            start_revision: report.revision + 1,
            prev_kv: false,
        })
        .await?
        .into_inner();
    // The zone's services: only the everywhere units are zone-sync's.
    let mut services = KvClient::new(ch)
        .watch(WatchRequest {
            prefix: zone_sync::store::SERVICES_KEY.to_vec(),
            start_revision: report.revision + 1,
            prev_kv: false,
        })
        .await?
        .into_inner();
    loop {
        tokio::select! {
            m = services.message() => {
                match m? {
                    Some(_) => daemon.everywhere().await,
                    None => anyhow::bail!("the watch of the zone's services ended"),
                }
            }
            m = stream.message() => {
                match m? {
                    Some(_) => {
                        // Changes often come in bursts (a rollback, a
                        // script pushing several files): settle first.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        daemon.pass().await?;
                        daemon.roll_step().await?;
                        report_figures(&mut agent, daemon).await;
                    }
                    None => anyhow::bail!("the watch ended"),
                }
            }
            _ = tokio::time::sleep(drift) => {
                daemon.pass().await?;
                daemon.everywhere().await;
                report_figures(&mut agent, daemon).await;
            }
            // While units wait for their turn, look again often.
            _ = tokio::time::sleep(Duration::from_secs(1)),
                if !daemon.applier.state.pending_restarts.is_empty() =>
            {
                daemon.roll_step().await?;
                report_figures(&mut agent, daemon).await;
            }
        }
    }
}

/// Sends the daemon's figures to zoned for its metrics; best effort (a
/// zoned that predates the call answers UNIMPLEMENTED): a failure is only
/// logged at debug level.
async fn report_figures(
    agent: &mut AgentClient<Channel>,
    daemon: &Daemon<Grpc, RootedDisk, Systemctl>,
) {
    let mut req = tonic::Request::new(daemon.figures());
    req.set_timeout(Duration::from_secs(2));
    if let Err(e) = agent.report_figures(req).await {
        tracing::debug!(error = %e.message(), "cannot report figures to zoned");
    }
}
