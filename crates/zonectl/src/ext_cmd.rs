//! `zonectl ext`: system extensions (the front-end's own services, as
//! systemd-sysext images) the zone keeps on every server. `add` uploads an
//! image once and waits until every server merged it; `rm` has every
//! server remove it; `ls` shows each server's state of each.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Subcommand;
use tonic::transport::Channel;
use zonectl::v1::{
    extensions_client::ExtensionsClient, ExtensionChunk, ExtensionState, ListExtensionsRequest,
    ListExtensionsResponse, RemoveExtensionRequest,
};

use crate::upgrade_cmd::{file_chunks, hash_file, say};

#[derive(Debug, Subcommand)]
pub enum ExtCommand {
    /// Add a system extension image (`cargo xtask ext build` makes one) to
    /// the zone (admin): uploaded once to the server reached, fetched from
    /// there by every other server, installed as
    /// /var/lib/extensions/NAME.raw and merged over /usr and /opt. Replaces
    /// an extension of the same name. Waits until every server reports it
    /// merged (or why not).
    Add {
        /// The image (squashfs or erofs, with
        /// usr/lib/extension-release.d/extension-release.NAME inside).
        file: PathBuf,
        /// The extension's name (default: the file's name without .raw).
        /// It must be the name the image was built with (`cargo xtask ext
        /// build --name`): systemd-sysext merges NAME.raw only if it holds
        /// extension-release.NAME, and each server reports it failed
        /// otherwise.
        #[arg(long)]
        name: Option<String>,
        /// Do not wait for the servers.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for every server (e.g. 300s, 10m).
        #[arg(long, default_value = "10m", value_parser = crate::storage_cmd::millis)]
        wait: u32,
    },
    /// Remove an extension from the zone (admin): every server removes it
    /// and merges the rest again. Waits until every server reports it gone.
    Rm {
        name: String,
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value = "10m", value_parser = crate::storage_cmd::millis)]
        wait: u32,
    },
    /// The zone's extensions and each server's state of each.
    Ls,
}

fn state_name(state: i32) -> &'static str {
    match ExtensionState::try_from(state) {
        Ok(ExtensionState::ExtensionFetching) => "fetching",
        Ok(ExtensionState::ExtensionMerged) => "merged",
        Ok(ExtensionState::ExtensionFailed) => "failed",
        _ => "unknown",
    }
}

/// Where server `id` stands with extension `name` at sha256 `sha` (None:
/// removed), for a wait that started at `revision`: done, and what to say.
fn server_done(
    list: &ListExtensionsResponse,
    id: u64,
    name: &str,
    sha: Option<&str>,
    revision: u64,
) -> (bool, String) {
    let Some(s) = list.servers.iter().find(|s| s.id == id) else {
        return (true, "no longer a member".into());
    };
    if !s.unmanaged.is_empty() {
        return (
            true,
            format!("does not manage extensions ({})", s.unmanaged),
        );
    }
    let Some(r) = &s.report else {
        return (false, "has not reported yet".into());
    };
    if r.wanted_revision < revision {
        return (false, "has not acted on it yet".into());
    }
    let e = r.extensions.iter().find(|e| e.name == name);
    match (sha, e) {
        (None, None) => (true, "removed".into()),
        (None, Some(e)) if e.state == ExtensionState::ExtensionFailed as i32 => {
            (true, format!("failed: {}", e.message))
        }
        (None, Some(_)) => (false, "still has it".into()),
        (Some(_), None) => (false, "has not reported it yet".into()),
        (Some(sha), Some(e)) if e.sha256 != sha => (false, "has another version".into()),
        (Some(_), Some(e)) if e.state == ExtensionState::ExtensionFailed as i32 => {
            (true, format!("failed: {}", e.message))
        }
        (Some(_), Some(e)) if !e.message.is_empty() => (
            e.state == ExtensionState::ExtensionMerged as i32,
            format!("{}: {}", state_name(e.state), e.message),
        ),
        (Some(_), Some(e)) => (
            e.state == ExtensionState::ExtensionMerged as i32,
            state_name(e.state).into(),
        ),
    }
}

/// Waits until every server is done with `name` as of `revision`; prints
/// each server's outcome. Err when one failed or the wait ran out.
async fn wait_servers(
    c: &mut ExtensionsClient<Channel>,
    name: &str,
    sha: Option<&str>,
    revision: u64,
    limit: Duration,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut said = String::new();
    loop {
        // A server that does not answer for a while (reset by its watchdog
        // after a stall, a leader changing) does not end the wait: it is
        // said, and asked again until the wait's limit.
        let list = match c.list(crate::t(ListExtensionsRequest {}, timeout)).await {
            Ok(r) => r.into_inner(),
            Err(e) if transient(&e) && started.elapsed() < limit => {
                let line = format!(
                    "the zone did not answer ({}: {}); asking again",
                    e.code(),
                    e.message()
                );
                if line != said {
                    say(format!("{:>5.1}s  {line}", started.elapsed().as_secs_f64()));
                    said = line;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let states: Vec<(u64, bool, String)> = list
            .servers
            .iter()
            .map(|s| {
                let (done, what) = server_done(&list, s.id, name, sha, revision);
                (s.id, done, what)
            })
            .collect();
        let line = states
            .iter()
            .map(|(id, _, what)| format!("server {id}: {what}"))
            .collect::<Vec<_>>()
            .join("; ");
        if line != said {
            say(format!("{:>5.1}s  {line}", started.elapsed().as_secs_f64()));
            said = line;
        }
        if states.iter().all(|(_, done, _)| *done) {
            let failed: Vec<String> = states
                .iter()
                .filter(|(_, _, w)| w.starts_with("failed"))
                .map(|(id, _, w)| format!("server {id} {w}"))
                .collect();
            if failed.is_empty() {
                return Ok(());
            }
            anyhow::bail!("{name}: {}", failed.join("; "));
        }
        if started.elapsed() >= limit {
            anyhow::bail!(
                "{name}: not every server was done within {} s ({said}); `zonectl ext ls` shows where each stands",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether a failed call may be made again: the zone did not answer, or
/// not yet (no leader, a leader changing, a server resetting).
fn transient(e: &tonic::Status) -> bool {
    matches!(
        e.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::Aborted
    )
}

fn list_json(list: &ListExtensionsResponse) -> serde_json::Value {
    serde_json::json!({
        "revision": list.revision,
        "extensions": list.extensions.iter().map(|e| serde_json::json!({
            "name": e.name,
            "sha256": e.sha256,
            "bytes": e.bytes,
            "format": e.format,
            "holder": e.holder,
            "added_unix_ms": e.added_unix_ms,
        })).collect::<Vec<_>>(),
        "servers": list.servers.iter().map(|s| serde_json::json!({
            "id": s.id,
            "name": s.name,
            "unmanaged": s.unmanaged,
            "wanted_revision": s.report.as_ref().map(|r| r.wanted_revision),
            "updated_unix_ms": s.report.as_ref().map(|r| r.updated_unix_ms),
            "extensions": s.report.as_ref().map(|r| r.extensions.iter().map(|e| serde_json::json!({
                "name": e.name,
                "sha256": e.sha256,
                "state": state_name(e.state),
                "message": e.message,
            })).collect::<Vec<_>>()),
        })).collect::<Vec<_>>(),
    })
}

/// The table: one line per extension, one column per server.
pub fn render(list: &ListExtensionsResponse) -> String {
    let mut out = String::new();
    if list.extensions.is_empty() {
        out.push_str("the zone has no extensions\n");
    } else {
        let mut header = format!("{:<20} {:>9}  {:<12}", "NAME", "SIZE", "SHA256");
        for s in &list.servers {
            header.push_str(&format!("  {:<9}", format!("SERVER {}", s.id)));
        }
        out.push_str(header.trim_end());
        out.push('\n');
        let mut notes = Vec::new();
        for e in &list.extensions {
            let mut line = format!(
                "{:<20} {:>9}  {:<12}",
                e.name,
                format!("{:.1} MiB", e.bytes as f64 / 1048576.0),
                &e.sha256[..e.sha256.len().min(12)]
            );
            for s in &list.servers {
                let what = match &s.report {
                    _ if !s.unmanaged.is_empty() => "unmanaged".to_owned(),
                    None => "-".into(),
                    Some(r) => match r.extensions.iter().find(|x| x.name == e.name) {
                        None => "-".into(),
                        Some(x) if x.sha256 != e.sha256 => "old".into(),
                        Some(x) => {
                            if !x.message.is_empty() {
                                notes.push(format!("server {} {}: {}", s.id, e.name, x.message));
                            }
                            state_name(x.state).into()
                        }
                    },
                };
                line.push_str(&format!("  {what:<9}"));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        for n in notes {
            out.push_str(&n);
            out.push('\n');
        }
    }
    for s in &list.servers {
        if !s.unmanaged.is_empty() {
            out.push_str(&format!("server {}: {}\n", s.id, s.unmanaged));
        }
    }
    out
}

pub async fn run(
    cmd: ExtCommand,
    channel: Channel,
    timeout: Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut c = ExtensionsClient::new(channel);
    match cmd {
        ExtCommand::Add {
            file,
            name,
            no_wait,
            wait,
        } => {
            let name = match name {
                Some(n) => n,
                None => file
                    .file_name()
                    .map(|n| n.to_string_lossy().trim_end_matches(".raw").to_owned())
                    .context("the file has no name: give --name")?,
            };
            let (total, sha) = hash_file(&file)?;
            say(format!(
                "{name}: {} ({:.1} MiB, sha256 {sha})",
                file.display(),
                total as f64 / 1048576.0
            ));
            let n = name.clone();
            let s = sha.clone();
            let (rx, reader) = file_chunks(&file, total, move |data, first| ExtensionChunk {
                name: if first { n.clone() } else { String::new() },
                data,
                total_bytes: if first { total } else { 0 },
                sha256: if first { s.clone() } else { String::new() },
            });
            let mut req = tonic::Request::new(rx);
            req.set_timeout(Duration::from_secs(3600));
            let r = c.add(req).await;
            reader.await??;
            let r = r?.into_inner();
            let holder = r.extension.as_ref().map_or(0, |e| e.holder);
            say(format!(
                "the zone wants {name} at revision {} (server {holder} holds the image; every server fetches and merges it)",
                r.revision
            ));
            if !no_wait {
                wait_servers(
                    &mut c,
                    &name,
                    Some(&sha),
                    r.revision,
                    Duration::from_millis(wait.into()),
                    timeout,
                )
                .await?;
            }
            if as_json {
                crate::print_json(&serde_json::json!({
                    "name": name, "sha256": sha, "bytes": total, "revision": r.revision, "holder": holder,
                }));
            } else {
                println!("{name} added at revision {}", r.revision);
            }
        }
        ExtCommand::Rm {
            name,
            no_wait,
            wait,
        } => {
            let r = c
                .remove(crate::t(
                    RemoveExtensionRequest { name: name.clone() },
                    timeout,
                ))
                .await?
                .into_inner();
            if !no_wait {
                wait_servers(
                    &mut c,
                    &name,
                    None,
                    r.revision,
                    Duration::from_millis(wait.into()),
                    timeout,
                )
                .await?;
            }
            if as_json {
                crate::print_json(&serde_json::json!({ "name": name, "revision": r.revision }));
            } else {
                println!("{name} removed at revision {}", r.revision);
            }
        }
        ExtCommand::Ls => {
            let list = c
                .list(crate::t(ListExtensionsRequest {}, timeout))
                .await?
                .into_inner();
            if as_json {
                crate::print_json(&list_json(&list));
            } else {
                print!("{}", render(&list));
            }
        }
    }
    Ok(())
}
