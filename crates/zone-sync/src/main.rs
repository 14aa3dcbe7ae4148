//! `zone-sync`: runs on every server beside zoned. Reads the managed files
//! from the local zoned (a linearizable read of `zone/config/file*`),
//! brings the disk to them, then follows changes with a watch from the
//! revision it applied; every `--drift-interval` it passes again, so a file
//! edited by hand is noticed and restored. Each pass is reported under
//! `zone/config/status/<id>`. Exit code 2: bad arguments or configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use prost::Message as _;
use tonic::transport::{Channel, Endpoint};
use zone_proto::v1::{
    cluster_client::ClusterClient, kv_client::KvClient, ManagedFile, PutRequest, RangeRequest,
    StatusRequest, WatchRequest,
};
use zone_sync::apply::{Applier, Report, State, Wanted};
use zone_sync::disk::RootedDisk;
use zone_sync::keys::{FILE_PREFIX, STATUS_PREFIX};
use zone_sync::paths::{Roots, DEFAULT_ROOT};
use zone_sync::template::NodeVars;

#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// The local zoned's client address.
    #[arg(long, default_value = "127.0.0.1:7400")]
    endpoint: String,
    /// zoned's node.toml: its [files].managed_roots limit what this server
    /// writes, whatever the store says.
    #[arg(long, default_value = "/etc/zoned/node.toml")]
    config: PathBuf,
    /// The filesystem managed paths are written under (tests use a
    /// temporary directory).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// State (applied revision, what was written) and backups.
    #[arg(long, default_value = "/var/lib/zone-sync")]
    state_dir: PathBuf,
    /// Previous versions kept per file in <state-dir>/backups.
    #[arg(long, default_value_t = 5)]
    backups: usize,
    /// Seconds between passes that look for files edited by hand.
    #[arg(long, default_value_t = 30)]
    drift_interval: u64,
    /// One pass, then exit (0 when nothing was refused).
    #[arg(long)]
    once: bool,
}

fn managed_roots(config: &Path) -> Result<Roots> {
    let roots: Vec<String> = match std::fs::read_to_string(config) {
        Ok(text) => {
            let v: toml::Value =
                toml::from_str(&text).with_context(|| format!("{}: not TOML", config.display()))?;
            match v.get("files").and_then(|f| f.get("managed_roots")) {
                None => vec![DEFAULT_ROOT.to_owned()],
                Some(list) => list
                    .as_array()
                    .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_owned)).collect())
                    .with_context(|| {
                        format!(
                            "{}: files.managed_roots must be a list of paths",
                            config.display()
                        )
                    })?,
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![DEFAULT_ROOT.to_owned()],
        Err(e) => return Err(e).with_context(|| format!("reading {}", config.display())),
    };
    Roots::new(&roots).with_context(|| format!("{}: files.managed_roots", config.display()))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let roots = match managed_roots(&args.config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("zone-sync: {e:#}");
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
    let mut applier = Applier {
        disk: RootedDisk::new(&args.root, args.state_dir.join("backups")),
        roots,
        fs_root: args.root.clone(),
        backups_keep: args.backups.max(1),
        state,
    };
    if args.once {
        match connect(&args.endpoint).await {
            Ok(ch) => match pass(&ch, &mut applier, &state_path, &mut None).await {
                Ok(r) if r.refused.is_empty() => return,
                Ok(_) => std::process::exit(1),
                Err(e) => {
                    eprintln!("zone-sync: {e:#}");
                    std::process::exit(1);
                }
            },
            Err(e) => {
                eprintln!("zone-sync: {e:#}");
                std::process::exit(1);
            }
        }
    }
    let mut last_status = None;
    loop {
        if let Err(e) = follow(&args, &mut applier, &state_path, &mut last_status).await {
            tracing::warn!(error = %format!("{e:#}"), "lost the local zoned; retrying in 1 s");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn connect(endpoint: &str) -> Result<Channel> {
    Endpoint::from_shared(format!("http://{endpoint}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(15))
        .connect()
        .await
        .with_context(|| format!("connecting to zoned at {endpoint}"))
}

/// This server's id, name and address, as the zone knows them.
async fn node_vars(ch: &Channel) -> Result<NodeVars> {
    let s = ClusterClient::new(ch.clone())
        .status(StatusRequest {})
        .await?
        .into_inner();
    let me = s
        .servers
        .iter()
        .find(|x| x.id == s.member_id)
        .context("the local zoned does not list itself")?;
    let host = |ep: &str| {
        ep.rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
            .unwrap_or_default()
    };
    Ok(NodeVars {
        id: me.id,
        name: me.name.clone(),
        address: host(&me.peer_endpoint),
    })
}

async fn pass(
    ch: &Channel,
    applier: &mut Applier<RootedDisk>,
    state_path: &Path,
    last_status: &mut Option<serde_json::Value>,
) -> Result<Report> {
    let node = node_vars(ch).await?;
    let mut kv = KvClient::new(ch.clone()).max_decoding_message_size(256 << 20);
    let r = kv
        .range(RangeRequest {
            prefix: FILE_PREFIX.to_vec(),
            limit: 0,
            serializable: false,
            keys_only: false,
        })
        .await?
        .into_inner();
    let revision = r.header.map_or(0, |h| h.revision);
    let mut files = Vec::new();
    for kv in &r.kvs {
        let f = ManagedFile::decode(kv.value.as_slice())
            .with_context(|| format!("decoding {}", String::from_utf8_lossy(&kv.key)))?;
        files.push(Wanted {
            path: f.path,
            content: f.content,
            mode: f.mode,
            owner: f.owner,
            group: f.group,
            restart_units: f.restart_units,
            template: f.template,
        });
    }
    let report = applier.apply(&files, revision, &node);
    applier
        .state
        .save(state_path)
        .with_context(|| format!("saving {}", state_path.display()))?;
    let mut status = serde_json::json!({
        "id": node.id,
        "name": node.name,
        "applied_revision": revision,
        "files": applier.state.files.len(),
        "written": report.written,
        "drift_restored": report.drift_restored,
        "refused": report.refused,
        "pending_restarts": applier.state.pending_restarts,
    });
    // A drift pass that found nothing new is not worth a Raft write.
    if last_status.as_ref() == Some(&status) {
        return Ok(report);
    }
    *last_status = Some(status.clone());
    status["updated_unix"] = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .into();
    kv.put(PutRequest {
        key: [STATUS_PREFIX, node.id.to_string().as_bytes()].concat(),
        value: serde_json::to_vec(&status)?,
        prev_kv: false,
    })
    .await
    .context("reporting status")?;
    if !report.written.is_empty() || !report.drift_restored.is_empty() || !report.refused.is_empty()
    {
        tracing::info!(
            revision,
            written = report.written.len(),
            drift_restored = report.drift_restored.len(),
            refused = report.refused.len(),
            "pass done"
        );
    }
    Ok(report)
}

/// Passes now, on every change to the managed files, and every drift
/// interval, until the connection fails.
async fn follow(
    args: &Args,
    applier: &mut Applier<RootedDisk>,
    state_path: &Path,
    last_status: &mut Option<serde_json::Value>,
) -> Result<()> {
    let ch = connect(&args.endpoint).await?;
    let report = pass(&ch, applier, state_path, last_status).await?;
    let mut stream = KvClient::new(ch.clone())
        .watch(WatchRequest {
            prefix: FILE_PREFIX.to_vec(),
            start_revision: report.revision + 1,
            prev_kv: false,
        })
        .await?
        .into_inner();
    let drift = Duration::from_secs(args.drift_interval.max(1));
    loop {
        tokio::select! {
            m = stream.message() => {
                match m? {
                    Some(_) => {
                        // Changes often come in bursts (a rollback, a
                        // script pushing several files): settle first.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        pass(&ch, applier, state_path, last_status).await?;
                    }
                    None => anyhow::bail!("the watch ended"),
                }
            }
            _ = tokio::time::sleep(drift) => {
                pass(&ch, applier, state_path, last_status).await?;
            }
        }
    }
}
