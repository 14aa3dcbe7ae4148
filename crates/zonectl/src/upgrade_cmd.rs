//! `zonectl upgrade`: a rolling upgrade of the zone from a signed update
//! bundle (`zone.v1.Upgrade`), and `zonectl upgrade status`.
//!
//! The roll: the bundle is uploaded once, to the server zonectl reached
//! (it verifies it before keeping it); then one server at a time, the
//! followers first and the leader last (leadership handed to an upgraded
//! server first), each fetches the bundle from the holder, installs it into
//! its inactive root slot and reboots; zonectl waits until that server has
//! recorded the new slot as marked good (its boot assessment: zoned back
//! in the zone and caught up, its units active) before the next starts. It
//! stops at the first server that fails or rolls back, leaving the others
//! as they are. A server already running the bundle's version is skipped,
//! so a roll that stopped can be run again.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use zonectl::v1::{
    cluster_client::ClusterClient, upgrade_client::UpgradeClient, BundleChunk, BundleInfo,
    InstallRequest, ServerUpgrade, StatusRequest, TransferLeaderRequest, UpgradeRecord,
    UpgradeState, UpgradeStatusRequest, UpgradeStatusResponse,
};

use crate::t;

/// What `zonectl upgrade` does.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct UpgradeArgs {
    #[command(subcommand)]
    command: Option<UpgradeCommand>,
    /// The update bundle (`zoned-<profile>-<version>.bundle`, written by
    /// `cargo xtask image`), signed by a key the servers' image trusts.
    #[arg(long, value_name = "FILE", required = true)]
    bundle: Option<PathBuf>,
    /// Upgrade this server only (by id); the leader hands leadership over
    /// first.
    #[arg(long, value_name = "ID")]
    server: Option<u64>,
    /// Minutes a server may take from the start of its install to its new
    /// slot marked good.
    #[arg(long, default_value_t = 30, value_name = "MINUTES")]
    wait: u64,
    /// Install on a server that already rolled this bundle back (by
    /// default such a server stops the roll: three more failed boots
    /// would follow).
    #[arg(long)]
    retry: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum UpgradeCommand {
    /// Each server's role, running slot, image, boot entries and last
    /// upgrade.
    Status,
}

/// Bytes per upload chunk.
pub(crate) const CHUNK: usize = 1 << 20;

/// Whether `endpoint` (`host:port`, maybe with a scheme) is a loopback
/// address: zonectl then runs on the server that answered.
fn loopback(endpoint: &str) -> bool {
    let hostport = endpoint.rsplit("://").next().unwrap_or(endpoint);
    let host = match hostport.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => hostport,
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub async fn run(
    args: UpgradeArgs,
    channel: tonic::transport::Channel,
    reached: &str,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<()> {
    match (args.command, args.bundle) {
        (Some(UpgradeCommand::Status), _) => {
            let st = status(&channel, timeout).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status_json(&st))?);
            } else {
                print!("{}", render(&st));
            }
            Ok(())
        }
        (None, Some(bundle)) => {
            let opts = RollOptions {
                only: args.server,
                wait: Duration::from_secs(args.wait * 60),
                retry: args.retry,
                local: loopback(reached),
            };
            roll(&bundle, &opts, channel, timeout, json).await
        }
        (None, None) => anyhow::bail!("give --bundle FILE, or `zonectl upgrade status`"),
    }
}

async fn status(
    channel: &tonic::transport::Channel,
    timeout: Duration,
) -> anyhow::Result<UpgradeStatusResponse> {
    Ok(UpgradeClient::new(channel.clone())
        .status(t(UpgradeStatusRequest {}, timeout))
        .await?
        .into_inner())
}

fn state_name(r: &UpgradeRecord) -> &'static str {
    match UpgradeState::try_from(r.state) {
        Ok(UpgradeState::Installing) => "installing",
        Ok(UpgradeState::Installed) => "installed",
        Ok(UpgradeState::Good) => "good",
        Ok(UpgradeState::RolledBack) => "rolled back",
        Ok(UpgradeState::Failed) => "failed",
        _ => "unknown",
    }
}

fn utc_ms(ms: u64) -> String {
    i64::try_from(ms / 1000).map_or_else(|_| "-".into(), zonectl::zone_pki::utc)
}

/// `b good, a good`: each entry's slot and how it stands, in boot order.
fn entries(s: &ServerUpgrade) -> String {
    let Some(b) = &s.boot else {
        return "-".into();
    };
    if !b.error.is_empty() {
        return format!("unreadable: {}", b.error);
    }
    b.entries
        .iter()
        .map(|e| match e.assessment.as_str() {
            "trial" => format!("{} trial ({} left)", e.slot, e.tries_left),
            "bad" => format!("{} bad", e.slot),
            other => format!("{} {other}", e.slot),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The status as a table.
pub fn render(st: &UpgradeStatusResponse) -> String {
    let mut rows = vec![[
        "ID".to_owned(),
        "NAME".into(),
        "ROLE".into(),
        "SLOT".into(),
        "IMAGE".into(),
        "BOOT ENTRIES".into(),
        "LAST UPGRADE".into(),
    ]];
    let mut notes = Vec::new();
    for s in &st.servers {
        let role = if !s.error.is_empty() {
            "unreachable"
        } else if s.leader {
            "leader"
        } else {
            "follower"
        };
        let slot = s
            .boot
            .as_ref()
            .map_or("-".to_owned(), |b| b.running_slot.clone());
        let last = match &s.record {
            None => "-".to_owned(),
            Some(r) => format!(
                "{} {}, {} (slot {})",
                state_name(r),
                utc_ms(r.updated_unix_ms),
                r.target_version,
                r.target_slot
            ),
        };
        if let Some(r) = &s.record {
            if !r.reason.is_empty() {
                notes.push(format!("server {}: {}", s.id, r.reason));
            }
        }
        if !s.error.is_empty() {
            notes.push(format!("server {}: {}", s.id, s.error));
        }
        rows.push([
            s.id.to_string(),
            if s.name.is_empty() {
                "-".into()
            } else {
                s.name.clone()
            },
            role.into(),
            slot,
            if s.image_version.is_empty() {
                "-".into()
            } else {
                s.image_version.clone()
            },
            entries(s),
            last,
        ]);
    }
    let mut widths = [0usize; 7];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, (w, c)) in widths.iter().zip(r).enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    for n in notes {
        out.push_str(&n);
        out.push('\n');
    }
    out
}

fn status_json(st: &UpgradeStatusResponse) -> serde_json::Value {
    let servers: Vec<_> = st
        .servers
        .iter()
        .map(|s| {
            serde_json::json!({
                "id": s.id,
                "name": s.name,
                "leader": s.leader,
                "error": s.error,
                "image": s.image_version,
                "running_slot": s.boot.as_ref().map(|b| b.running_slot.clone()),
                "entries": s.boot.as_ref().map(|b| b.entries.iter().map(|e| serde_json::json!({
                    "file": e.file, "slot": e.slot, "generation": e.generation,
                    "assessment": e.assessment, "tries_left": e.tries_left, "tries_done": e.tries_done,
                })).collect::<Vec<_>>()),
                "last_upgrade": s.record.as_ref().map(|r| serde_json::json!({
                    "state": state_name(r),
                    "target_version": r.target_version,
                    "from_version": r.from_version,
                    "target_slot": r.target_slot,
                    "from_slot": r.from_slot,
                    "sha256": r.sha256,
                    "reason": r.reason,
                    "started_unix_ms": r.started_unix_ms,
                    "updated_unix_ms": r.updated_unix_ms,
                })),
            })
        })
        .collect();
    serde_json::json!({ "leader_id": st.leader_id, "servers": servers })
}

/// The file's size and sha256, read once.
pub(crate) fn hash_file(path: &Path) -> anyhow::Result<(u64, String)> {
    use sha2::Digest as _;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        let got = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if got == 0 {
            break;
        }
        h.update(&buf[..got]);
        n += got as u64;
    }
    let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((n, hex))
}

/// Prints `what` on stderr (progress: never mixed into JSON on stdout).
pub(crate) fn say(what: impl AsRef<str>) {
    eprintln!("{}", what.as_ref());
}

/// The file at `path` (`total` bytes) as a stream of chunks made by `make`
/// (the data, and whether it is the first), read on a thread of its own,
/// with the upload's progress on stderr every tenth.
pub(crate) fn file_chunks<T: Send + 'static>(
    path: &Path,
    total: u64,
    make: impl Fn(Vec<u8>, bool) -> T + Send + 'static,
) -> (
    tokio_stream::wrappers::ReceiverStream<T>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<T>(4);
    let path = path.to_owned();
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut f = std::fs::File::open(&path)?;
        let mut sent = 0u64;
        let mut shown = 0;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let got = f.read(&mut buf)?;
            if got == 0 {
                return Ok(());
            }
            buf.truncate(got);
            let first = sent == 0;
            sent += got as u64;
            if tx.blocking_send(make(buf, first)).is_err() {
                return Ok(());
            }
            let pct = sent * 100 / total.max(1);
            if pct / 10 > shown {
                shown = pct / 10;
                say(format!("uploading: {pct}% of {} MiB", total >> 20));
            }
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), reader)
}

/// Sends the bundle to the server behind `channel`.
async fn upload(
    channel: &tonic::transport::Channel,
    path: &Path,
    total: u64,
    sha: &str,
) -> anyhow::Result<BundleInfo> {
    let sha = sha.to_owned();
    let (rx, reader) = file_chunks(path, total, move |data, first| BundleChunk {
        data,
        total_bytes: if first { total } else { 0 },
        sha256: if first { sha.clone() } else { String::new() },
    });
    let mut req = tonic::Request::new(rx);
    req.set_timeout(Duration::from_secs(3600));
    let r = UpgradeClient::new(channel.clone()).upload(req).await;
    reader.await??;
    Ok(r?.into_inner())
}

/// Each server's client address, from the zone's status.
async fn client_endpoints(
    channel: &tonic::transport::Channel,
    timeout: Duration,
) -> anyhow::Result<Vec<(u64, String)>> {
    let st = ClusterClient::new(channel.clone())
        .status(t(StatusRequest {}, timeout))
        .await?
        .into_inner();
    Ok(st
        .servers
        .iter()
        .filter(|s| !s.client_endpoint.is_empty())
        .map(|s| (s.id, s.client_endpoint.clone()))
        .collect())
}

/// Whether `s` runs `version` from a slot marked good.
fn runs(s: &ServerUpgrade, version: &str) -> bool {
    s.image_version == version
        && s.boot.as_ref().is_some_and(|b| {
            b.entries
                .iter()
                .find(|e| e.slot == b.running_slot)
                .is_some_and(|e| e.assessment == "good")
        })
}

/// How a roll runs.
struct RollOptions {
    /// `--server`.
    only: Option<u64>,
    wait: Duration,
    retry: bool,
    /// zonectl reached the zone over loopback: it runs on the server that
    /// answered.
    local: bool,
}

async fn roll(
    bundle: &Path,
    opts: &RollOptions,
    channel: tonic::transport::Channel,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let (only, wait) = (opts.only, opts.wait);
    let started = Instant::now();
    let st = status(&channel, timeout).await?;
    for s in &st.servers {
        if !s.error.is_empty() {
            anyhow::bail!(
                "server {} does not answer ({}): a roll needs every server up; nothing was changed",
                s.id,
                s.error
            );
        }
        if s.boot.is_none() {
            anyhow::bail!(
                "server {} did not boot from an appliance root slot: only appliance servers can be upgraded; nothing was changed",
                s.id
            );
        }
    }
    if let Some(id) = only {
        if !st.servers.iter().any(|s| s.id == id) {
            let ids: Vec<String> = st.servers.iter().map(|s| s.id.to_string()).collect();
            anyhow::bail!(
                "server {id} is not a member of the zone (members: {})",
                ids.join(", ")
            );
        }
    }
    // The server zonectl runs on, if it does: the roll would reboot it
    // under zonectl's feet.
    let here = opts.local.then_some(st.member_id);
    if let (Some(here), None) = (here, only) {
        anyhow::bail!(
            "zonectl reached server {here} over loopback: it runs on that server, which the roll reboots. Run the roll from a machine outside the zone (--endpoints with the servers' addresses), or from here upgrade the others with --server and this one last; nothing was changed"
        );
    }
    say(format!("hashing {}", bundle.display()));
    let (total, sha) = hash_file(bundle)?;
    let info = upload(&channel, bundle, total, &sha)
        .await
        .context("uploading the bundle")?;
    let version = format!("{} {}", info.image_id, info.version);
    say(format!(
        "server {} holds {version} (commit {}, {} binaries, signed by key {}, {} MiB)",
        info.holder,
        info.commit,
        info.binaries_profile,
        info.key_id,
        info.bytes >> 20
    ));
    // Followers by id, then the leader.
    let mut order: Vec<u64> = st
        .servers
        .iter()
        .filter(|s| !s.leader)
        .map(|s| s.id)
        .collect();
    order.sort_unstable();
    order.extend(st.servers.iter().filter(|s| s.leader).map(|s| s.id));
    if let Some(id) = only {
        order.retain(|&s| s == id);
    }
    let endpoints = client_endpoints(&channel, timeout).await?;
    let mut done = Vec::new();
    for (n, &id) in order.iter().enumerate() {
        let now = status(&channel_to_others(&endpoints, id).await?, timeout).await?;
        let Some(s) = now.servers.iter().find(|s| s.id == id) else {
            anyhow::bail!("server {id} left the zone during the roll");
        };
        if runs(s, &version) {
            say(format!(
                "server {id} already runs {version} from a slot marked good: skipped"
            ));
            continue;
        }
        let rest: Vec<String> = order[n + 1..].iter().map(u64::to_string).collect();
        let untouched = if rest.is_empty() {
            String::new()
        } else {
            format!("; servers {} untouched", rest.join(", "))
        };
        let server_start = Instant::now();
        // What this server's record says of this very bundle: installed
        // before (a stopped roll): wait for it rather than install again;
        // rolled back: stop unless asked to try again.
        let record = s.record.as_ref().filter(|r| r.sha256 == info.sha256);
        match record.map(|r| UpgradeState::try_from(r.state)) {
            Some(Ok(UpgradeState::Installing | UpgradeState::Installed)) => {
                say(format!(
                    "server {id} is already upgrading to {version}: waiting for it"
                ));
                let took = await_outcome(&endpoints, id, &info.sha256, &version, wait, server_start, &untouched).await?;
                say(format!(
                    "server {id}: on {version}, slot marked good ({:.0} s)",
                    took.as_secs_f64()
                ));
                done.push(id);
                continue;
            }
            Some(Ok(UpgradeState::RolledBack)) if !opts.retry => anyhow::bail!(
                "server {id} rolled this bundle back before ({}): fix the bundle, or run again with --retry{untouched}",
                record.map(|r| r.reason.as_str()).unwrap_or("")
            ),
            _ => {}
        }
        if s.leader && now.servers.len() > 1 {
            let leader_ch = endpoint_channel(&endpoints, id)
                .await
                .with_context(|| format!("the roll stops here{untouched}"))?;
            let r = ClusterClient::new(leader_ch)
                .transfer_leader(t(TransferLeaderRequest { target: 0 }, timeout))
                .await
                .with_context(|| {
                    format!(
                        "handing leadership over from server {id} before its upgrade{untouched}"
                    )
                })?
                .into_inner();
            say(format!(
                "server {id} leads: leadership handed to server {} (term {}) first",
                r.leader_id, r.term
            ));
        }
        install(&endpoints, id, &info, &untouched).await?;
        if here == Some(id) {
            say(format!(
                "zonectl runs on server {id}, which is rebooting: it stops here; `zonectl upgrade status` tells the outcome once the server is back"
            ));
            return Ok(());
        }
        let took = await_outcome(
            &endpoints,
            id,
            &info.sha256,
            &version,
            wait,
            server_start,
            &untouched,
        )
        .await?;
        say(format!(
            "server {id}: on {version}, slot marked good, {:.0} s after its install began (boot and assessment {:.0} s)",
            server_start.elapsed().as_secs_f64(),
            took.as_secs_f64()
        ));
        done.push(id);
    }
    let after = status(&channel_to_others(&endpoints, 0).await?, timeout).await?;
    if json {
        let mut v = status_json(&after);
        v["upgraded"] = serde_json::json!(done);
        v["version"] = serde_json::json!(version);
        v["seconds"] = serde_json::json!(started.elapsed().as_secs_f64());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "upgraded {} server(s) to {version} in {:.0} s",
            done.len(),
            started.elapsed().as_secs_f64()
        );
        print!("{}", render(&after));
    }
    Ok(())
}

/// A channel to server `id`'s own client address.
async fn endpoint_channel(
    endpoints: &[(u64, String)],
    id: u64,
) -> anyhow::Result<tonic::transport::Channel> {
    let ep = endpoints
        .iter()
        .find(|(s, _)| *s == id)
        .map(|(_, e)| e.clone())
        .with_context(|| format!("server {id} has no client address in the zone's status"))?;
    let (ch, _) = crate::connect(std::slice::from_ref(&ep))
        .await
        .with_context(|| format!("server {id} at {ep}"))?;
    Ok(ch)
}

/// A channel to any server but `id` (any at all for 0 once `id`'s is the
/// only one answering).
async fn channel_to_others(
    endpoints: &[(u64, String)],
    id: u64,
) -> anyhow::Result<tonic::transport::Channel> {
    let mut others: Vec<String> = endpoints
        .iter()
        .filter(|(s, _)| *s != id)
        .map(|(_, e)| e.clone())
        .collect();
    others.extend(
        endpoints
            .iter()
            .filter(|(s, _)| *s == id)
            .map(|(_, e)| e.clone()),
    );
    let (ch, _) = crate::connect(&others).await?;
    Ok(ch)
}

/// Asks server `id` to install and reboot, printing its progress.
async fn install(
    endpoints: &[(u64, String)],
    id: u64,
    info: &BundleInfo,
    untouched: &str,
) -> anyhow::Result<()> {
    let ch = endpoint_channel(endpoints, id)
        .await
        .with_context(|| format!("the roll stops here{untouched}"))?;
    let mut req = tonic::Request::new(InstallRequest {
        sha256: info.sha256.clone(),
        holder: info.holder,
        no_reboot: false,
    });
    req.set_timeout(Duration::from_secs(3600));
    let mut stream = UpgradeClient::new(ch)
        .install(req)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "server {id}: {}; the roll stops here{untouched}",
                e.message()
            )
        })?
        .into_inner();
    let mut last_step = String::new();
    loop {
        match stream.message().await {
            Ok(Some(p)) => {
                let line = if let Some(pct) = (p.done_bytes * 100).checked_div(p.total_bytes) {
                    format!(
                        "server {id}: {}: {pct}% of {} MiB",
                        p.step,
                        p.total_bytes >> 20
                    )
                } else if p.message.is_empty() {
                    format!("server {id}: {}", p.step)
                } else {
                    format!("server {id}: {}: {}", p.step, p.message)
                };
                // Every line: the server sends a step's progress in tenths
                // (the tool's), so a log off a terminal gets a few lines a
                // step, not only the step's 0%.
                say(line);
                last_step = p.step.clone();
                if p.done {
                    return Ok(());
                }
            }
            // The stream may break as the server reboots; the record says
            // whether the install ended.
            Ok(None) => return Ok(()),
            Err(e) if last_step == "rebooting" || last_step == "handing over" => {
                say(format!(
                    "server {id}: the stream ended as it rebooted ({})",
                    e.message()
                ));
                return Ok(());
            }
            Err(e) => anyhow::bail!(
                "server {id}: {}; the roll stops here{untouched}",
                e.message()
            ),
        }
    }
}

/// Waits until server `id` records the upgrade to bundle `sha` as good;
/// fails on a rollback, a failure or the deadline.
#[allow(clippy::too_many_arguments)]
async fn await_outcome(
    endpoints: &[(u64, String)],
    id: u64,
    sha: &str,
    version: &str,
    wait: Duration,
    began: Instant,
    untouched: &str,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut said = String::new();
    loop {
        let seen = match channel_to_others(endpoints, id).await {
            Ok(ch) => {
                let mut c = UpgradeClient::new(ch);
                match c
                    .status(t(UpgradeStatusRequest {}, Duration::from_secs(5)))
                    .await
                {
                    Ok(r) => r.into_inner().servers.into_iter().find(|s| s.id == id),
                    Err(_) => None,
                }
            }
            Err(_) => None,
        };
        let now = match &seen {
            None => "the zone does not answer".to_owned(),
            Some(s) if !s.error.is_empty() => "not answering (rebooting)".to_owned(),
            Some(s) => {
                let rec = s.record.as_ref().filter(|r| r.sha256 == sha);
                match rec.map(|r| UpgradeState::try_from(r.state)) {
                    Some(Ok(UpgradeState::Good)) if runs(s, version) => {
                        return Ok(start.elapsed());
                    }
                    Some(Ok(UpgradeState::RolledBack | UpgradeState::Failed)) => {
                        let r = rec.map(|r| r.reason.clone()).unwrap_or_default();
                        anyhow::bail!(
                            "server {id}: the upgrade to {version} {}: {r}; the roll stops here{untouched}",
                            state_name(rec.unwrap_or(&UpgradeRecord::default()))
                        );
                    }
                    other => format!(
                        "runs slot {} ({}), boot entries: {}; record: {}",
                        s.boot.as_ref().map_or("-", |b| b.running_slot.as_str()),
                        if s.image_version.is_empty() {
                            "-"
                        } else {
                            &s.image_version
                        },
                        entries(s),
                        match (other, rec) {
                            (Some(_), Some(r)) => state_name(r),
                            _ => "none yet",
                        }
                    ),
                }
            }
        };
        if now != said {
            say(format!("server {id}: {now}"));
            said = now;
        }
        if began.elapsed() >= wait {
            anyhow::bail!(
                "server {id} did not record {version} as good within {} min (last: {said}); the roll stops here{untouched}",
                wait.as_secs() / 60
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::loopback;

    #[test]
    fn a_loopback_endpoint_means_zonectl_runs_on_the_server_that_answered() {
        for e in [
            "127.0.0.1:7400",
            "127.0.0.3:7400",
            "https://127.0.0.1:7400",
            "[::1]:7400",
            "localhost:7400",
        ] {
            assert!(loopback(e), "{e}");
        }
        for e in [
            "10.0.0.1:7400",
            "https://10.0.0.100:7400",
            "[fd00::1]:7400",
            "zone-1:7400",
        ] {
            assert!(!loopback(e), "{e}");
        }
    }
}
