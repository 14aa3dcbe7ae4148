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
use zone_files::keys::{FILE_PREFIX, ROLL_LOCK, STATUS_PREFIX};
use zone_files::report::{LastRestart, SyncReport};
use zone_files::template::NodeVars;
use zone_proto::v1::{
    cluster_client::ClusterClient, compare, kv_client::KvClient, request_op, Compare,
    DeleteRequest, ManagedFile, PutRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest,
    WatchRequest,
};
use zone_sync::apply::{Applier, Report, State, Wanted};
use zone_sync::disk::RootedDisk;
use zone_sync::roll::{restart_all, turn, PeerState, Systemctl, Turn, Units};

#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// The local zoned's client address.
    #[arg(long, default_value = "127.0.0.1:7400")]
    endpoint: String,
    /// zoned's node.toml: its [files].managed_roots limit what this server
    /// writes, whatever the store says; its [files].local_root is the
    /// default for --root.
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // zoned's [files] settings: the managed roots limit what this server
    // writes, whatever the store says; the local root is the default for
    // --root.
    let (roots, local_root) = match zone_files::settings::read_node_toml(&args.config) {
        Ok(files) => (files.check().expect("checked when read"), files.local_root),
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
    let mut applier = Applier {
        disk: RootedDisk::new(&fs_root, args.state_dir.join("backups")),
        roots,
        fs_root,
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
    Ok(NodeVars::from_member(me.id, &me.name, &me.peer_endpoint))
}

async fn pass(
    ch: &Channel,
    applier: &mut Applier<RootedDisk>,
    state_path: &Path,
    last_status: &mut Option<SyncReport>,
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
    let mut status = SyncReport {
        id: node.id,
        name: node.name.clone(),
        applied_revision: revision,
        files: applier.state.files.len() as u64,
        written: report.written.clone(),
        drift_restored: applier.state.drift_seen.keys().cloned().collect(),
        refused: report.refused.clone(),
        pending_restarts: applier.state.pending_restarts.clone(),
        restart_failed: applier.state.restart_failed.clone(),
        last_restart: applier.state.last_restart.clone(),
        updated_unix: 0,
    };
    // A drift pass that found nothing new is not worth a Raft write.
    if last_status.as_ref() == Some(&status) {
        return Ok(report);
    }
    *last_status = Some(status.clone());
    status.updated_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    kv.put(PutRequest {
        key: [STATUS_PREFIX, node.id.to_string().as_bytes()].concat(),
        value: status.encode(),
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
    last_status: &mut Option<SyncReport>,
) -> Result<()> {
    let ch = connect(&args.endpoint).await?;
    let report = pass(&ch, applier, state_path, last_status).await?;
    roll_step(args, &ch, applier, state_path, last_status).await?;
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
                        roll_step(args, &ch, applier, state_path, last_status).await?;
                    }
                    None => anyhow::bail!("the watch ended"),
                }
            }
            _ = tokio::time::sleep(drift) => {
                pass(&ch, applier, state_path, last_status).await?;
            }
            // While units wait for their turn, look again often.
            _ = tokio::time::sleep(Duration::from_secs(1)),
                if !applier.state.pending_restarts.is_empty() =>
            {
                roll_step(args, &ch, applier, state_path, last_status).await?;
            }
        }
    }
}

fn lock_txn(compare: Compare, op: request_op::Request) -> TxnRequest {
    TxnRequest {
        compare: vec![compare],
        success: vec![RequestOp { request: Some(op) }],
        failure: Vec::new(),
    }
}

/// Takes the roll's lock: free, or held for longer than any restart can
/// take by a server that must have died with it.
async fn take_lock(
    kv: &mut KvClient<Channel>,
    me: u64,
    stale: Duration,
) -> Result<Option<Vec<u8>>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let mine = format!("{me} {now}").into_bytes();
    let held = kv
        .get(zone_proto::v1::GetRequest {
            key: ROLL_LOCK.to_vec(),
            serializable: false,
        })
        .await?
        .into_inner()
        .kv;
    let compare = match &held {
        None => Compare {
            key: ROLL_LOCK.to_vec(),
            target: compare::Target::Version as i32,
            op: compare::Op::Equal as i32,
            target_value: Some(compare::TargetValue::Version(0)),
        },
        Some(kv) => {
            let text = String::from_utf8_lossy(&kv.value).into_owned();
            let mut it = text.split_whitespace();
            let holder: u64 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
            let since: u64 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
            if holder != me && now.saturating_sub(since) < stale.as_secs() {
                tracing::debug!(holder, "the roll lock is held");
                return Ok(None);
            }
            tracing::warn!(holder, "taking over a stale roll lock");
            Compare {
                key: ROLL_LOCK.to_vec(),
                target: compare::Target::ModRevision as i32,
                op: compare::Op::Equal as i32,
                target_value: Some(compare::TargetValue::ModRevision(kv.mod_revision)),
            }
        }
    };
    let r = kv
        .txn(lock_txn(
            compare,
            request_op::Request::Put(PutRequest {
                key: ROLL_LOCK.to_vec(),
                value: mine.clone(),
                prev_kv: false,
            }),
        ))
        .await?
        .into_inner();
    Ok(r.succeeded.then_some(mine))
}

async fn release_lock(kv: &mut KvClient<Channel>, mine: Vec<u8>) -> Result<()> {
    kv.txn(lock_txn(
        Compare {
            key: ROLL_LOCK.to_vec(),
            target: compare::Target::Value as i32,
            op: compare::Op::Equal as i32,
            target_value: Some(compare::TargetValue::Value(mine)),
        },
        request_op::Request::Delete(DeleteRequest {
            key: ROLL_LOCK.to_vec(),
            prefix: false,
            prev_kv: false,
        }),
    ))
    .await?;
    Ok(())
}

/// Restarts this server's pending units if it is its turn in the roll.
async fn roll_step(
    args: &Args,
    ch: &Channel,
    applier: &mut Applier<RootedDisk>,
    state_path: &Path,
    last_status: &mut Option<SyncReport>,
) -> Result<()> {
    if applier.state.pending_restarts.is_empty() || applier.state.restart_failed.is_some() {
        return Ok(());
    }
    let zone = ClusterClient::new(ch.clone())
        .status(StatusRequest {})
        .await?
        .into_inner();
    let me = zone.member_id;
    let reachable: std::collections::BTreeSet<u64> = zone
        .servers
        .iter()
        .filter(|s| s.error.is_empty())
        .map(|s| s.id)
        .collect();
    let mut kv = KvClient::new(ch.clone());
    let reports = kv
        .range(RangeRequest {
            prefix: STATUS_PREFIX.to_vec(),
            limit: 0,
            serializable: false,
            keys_only: false,
        })
        .await?
        .into_inner()
        .kvs;
    let mut peers = Vec::new();
    for r in reports
        .iter()
        .filter_map(|kv| SyncReport::decode(&kv.value))
    {
        if r.id == me || !reachable.contains(&r.id) {
            continue;
        }
        peers.push(PeerState {
            id: r.id,
            applied: r.applied_revision,
            pending: !r.pending_restarts.is_empty(),
            failed: r.restart_failed,
        });
    }
    // A reachable server that never reported has not applied anything.
    for id in &reachable {
        if *id != me && !peers.iter().any(|p| p.id == *id) {
            peers.push(PeerState {
                id: *id,
                applied: 0,
                pending: false,
                failed: None,
            });
        }
    }
    match turn(me, zone.leader_id, applier.state.pending_since, &peers) {
        Turn::Go => {}
        Turn::Wait(why) | Turn::Halted(why) => {
            tracing::debug!(%why, "restarts wait");
            return Ok(());
        }
    }
    let restart_timeout = Duration::from_secs(args.restart_timeout.max(1));
    let Some(mine) = take_lock(&mut kv, me, restart_timeout * 4).await? else {
        return Ok(());
    };
    let units: Vec<String> = applier.state.pending_restarts.iter().cloned().collect();
    tracing::info!(?units, "restarting, this server's turn in the roll");
    let program = Systemctl {
        program: args.systemctl.clone(),
    };
    let names = units.clone();
    let unix_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    };
    let started_unix_ms = unix_ms();
    let (outcome, active_since) = if args.no_restart {
        tracing::info!(?units, "--no-restart: not restarting");
        (Ok(()), Default::default())
    } else {
        tokio::task::spawn_blocking(move || {
            let r = restart_all(&program, &names, restart_timeout);
            let since = names
                .iter()
                .filter_map(|u| program.active_since(u).map(|t| (u.clone(), t)))
                .collect();
            (r, since)
        })
        .await?
    };
    applier.state.last_restart = Some(LastRestart {
        units: units.clone(),
        started_unix_ms,
        done_unix_ms: unix_ms(),
        active_since,
        ok: outcome.is_ok(),
    });
    match outcome {
        Ok(()) => {
            if !args.no_restart {
                tracing::info!(?units, "restarted and active again");
            }
            applier.state.pending_restarts.clear();
        }
        Err(e) => {
            tracing::error!(error = %e, "a restarted unit did not come back: the roll stops here");
            applier.state.restart_failed = Some(e);
        }
    }
    applier
        .state
        .save(state_path)
        .with_context(|| format!("saving {}", state_path.display()))?;
    // Report before letting the next server go.
    *last_status = None;
    pass(ch, applier, state_path, last_status).await?;
    release_lock(&mut kv, mine).await
}
