//! `zonectl config`: managed configuration files in the zone's store.

use std::io::Write;
use std::path::PathBuf;

mod copies;

use clap::Subcommand;
use tonic::transport::Channel;
use zone_files::keys::STATUS_PREFIX;
use zone_files::report::SyncReport;
use zonectl::v1::{
    cluster_client::ClusterClient, config_client::ConfigClient, kv_client::KvClient,
    DeleteFileRequest, FileHistoryRequest, GetFileRequest, ListFilesRequest, ManagedFile,
    PushFileRequest, RangeRequest, RollbackRequest, StatusRequest,
};
use zonectl::ZoneView;

use crate::t;

/// `config diff` found a server whose copy differs (exit code 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Differ(pub String);

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Store FILE (or '-' for stdin) as the managed file PATH on every
    /// server. Refused, with nothing changed, outside the managed roots
    /// (zoned's files.managed_roots) or over the size limits.
    Push {
        file: PathBuf,
        /// Absolute path on the servers, under a managed root.
        #[arg(long)]
        path: String,
        /// A systemd unit to restart (one server at a time) when the file
        /// changes on a server; repeat for several.
        #[arg(long = "restart")]
        restart: Vec<String>,
        /// Permission bits, octal.
        #[arg(long, default_value = "0644", value_parser = parse_mode)]
        mode: u32,
        #[arg(long, default_value = "")]
        owner: String,
        #[arg(long, default_value = "")]
        group: String,
        /// Render per server: {{id}}, {{id0}}, {{name}}, {{address}},
        /// {{#node 1,3}}...{{/node}}, and {{{{ for a literal {{.
        #[arg(long)]
        template: bool,
    },
    /// Print the stored content of PATH (as pushed, before rendering).
    Get { path: String },
    /// List the managed files.
    Ls,
    /// Stop managing PATH and remove it from the store (servers keep their
    /// copy on disk).
    Rm { path: String },
    /// Versions of PATH, or of every file, newest first.
    History { path: Option<String> },
    /// Make every managed file what it was right after revision REV (from
    /// `history`): changed files restored, files created since removed.
    Rollback {
        #[arg(long = "to")]
        to: u64,
    },
    /// Compare the zone's version of PATH (or of every managed file),
    /// rendered for each server, with each server's copy on its disk: a
    /// unified diff (`-` the zone, `+` the disk), and mode or owner
    /// differences. Exit code 0 when every copy matches, 3 when some
    /// differ, 1 when a server could not be asked.
    Diff {
        path: Option<String>,
        /// Only this server (Raft id).
        #[arg(long)]
        server: Option<u64>,
    },
    /// Bring a file in from an existing server once: store what server
    /// FROM has on its disk at PATH (content, mode, owner, group) as the
    /// managed file PATH, so every server gets that copy.
    Import {
        path: String,
        /// The server (Raft id) whose copy is taken.
        #[arg(long = "from")]
        from: u64,
        /// A systemd unit to restart when the file changes on a server;
        /// repeat for several.
        #[arg(long = "restart")]
        restart: Vec<String>,
        /// Replace the zone's version when PATH is already managed.
        #[arg(long)]
        replace: bool,
    },
    /// What each server's zone-sync last reported: the revision it applied,
    /// files restored after a hand edit, files it refused, units waiting for
    /// a restart.
    Status,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("`{s}` is not an octal mode such as 0644"))
}

fn row(f: &ManagedFile) -> String {
    let units = if f.restart_units.is_empty() {
        "-".to_owned()
    } else {
        f.restart_units.join(",")
    };
    format!(
        "{:<40} {:>4} {:>6} {:>8} {:>8} {:<5} {}",
        f.path,
        f.version,
        format!("{:o}", f.mode),
        f.size,
        f.revision,
        if f.template { "yes" } else { "no" },
        units
    )
}

fn header() -> String {
    format!(
        "{:<40} {:>4} {:>6} {:>8} {:>8} {:<5} {}",
        "PATH", "VER", "MODE", "BYTES", "REV", "TMPL", "RESTART"
    )
}

fn json(f: &ManagedFile) -> serde_json::Value {
    serde_json::json!({
        "path": f.path,
        "version": f.version,
        "revision": f.revision,
        "mode": format!("{:o}", f.mode),
        "owner": f.owner,
        "group": f.group,
        "size": f.size,
        "sha256": f.sha256,
        "template": f.template,
        "restart_units": f.restart_units,
        "deleted": f.deleted,
    })
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn zone_view(channel: &Channel, timeout: std::time::Duration) -> anyhow::Result<ZoneView> {
    let s = ClusterClient::new(channel.clone())
        .status(t(StatusRequest {}, timeout))
        .await?
        .into_inner();
    Ok(ZoneView::from_status(&s))
}

/// Pushes `file`; answers what is stored (content left out) and whether
/// anything changed.
/// Stores `file`, then says what happened: as JSON (the file, `changed`,
/// and `more` fields), or as `text(file, changed)`.
async fn push_file(
    c: &mut ConfigClient<Channel>,
    file: ManagedFile,
    timeout: std::time::Duration,
    as_json: bool,
    more: &[(&str, serde_json::Value)],
    text: impl FnOnce(&ManagedFile, bool) -> String,
) -> anyhow::Result<()> {
    let r = c
        .push(t(PushFileRequest { file: Some(file) }, timeout))
        .await?
        .into_inner();
    let f = r.file.unwrap_or_default();
    if as_json {
        let mut v = json(&f);
        v["changed"] = r.changed.into();
        for (k, x) in more {
            v[*k] = x.clone();
        }
        print_json(&v);
    } else {
        println!("{}", text(&f, r.changed));
    }
    Ok(())
}

pub async fn run(
    cmd: ConfigCommand,
    channel: Channel,
    timeout: std::time::Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut c = ConfigClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    match cmd {
        ConfigCommand::Push {
            file,
            path,
            restart,
            mode,
            owner,
            group,
            template,
        } => {
            let content = if file.as_os_str() == "-" {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)?;
                v
            } else {
                std::fs::read(&file)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
            };
            push_file(
                &mut c,
                ManagedFile {
                    path: path.clone(),
                    content,
                    mode,
                    owner,
                    group,
                    restart_units: restart,
                    template,
                    ..ManagedFile::default()
                },
                timeout,
                as_json,
                &[],
                |f, changed| {
                    if changed {
                        format!(
                            "{path}: version {} stored at revision {}",
                            f.version, f.revision
                        )
                    } else {
                        format!(
                            "{path}: unchanged (version {} already has this content)",
                            f.version
                        )
                    }
                },
            )
            .await?;
        }
        ConfigCommand::Get { path } => {
            let f = c
                .get(t(GetFileRequest { path }, timeout))
                .await?
                .into_inner()
                .file
                .unwrap_or_default();
            if as_json {
                let mut v = json(&f);
                v["content"] = String::from_utf8_lossy(&f.content).into_owned().into();
                print_json(&v);
            } else {
                std::io::stdout().write_all(&f.content)?;
            }
        }
        ConfigCommand::Ls => {
            let r = c.list(t(ListFilesRequest {}, timeout)).await?.into_inner();
            if as_json {
                print_json(&serde_json::json!({
                    "files": r.files.iter().map(json).collect::<Vec<_>>(),
                    "revision": r.header.map_or(0, |h| h.revision),
                }));
            } else {
                println!("{}", header());
                for f in &r.files {
                    println!("{}", row(f));
                }
            }
        }
        ConfigCommand::Rm { path } => {
            let r = c
                .delete(t(DeleteFileRequest { path: path.clone() }, timeout))
                .await?
                .into_inner();
            let rev = r.header.map_or(0, |h| h.revision);
            if as_json {
                print_json(&serde_json::json!({ "deleted": r.deleted, "revision": rev }));
            } else if r.deleted {
                println!("{path}: no longer managed (revision {rev})");
            } else {
                println!("{path}: was not managed");
            }
        }
        ConfigCommand::History { path } => {
            let r = c
                .history(t(
                    FileHistoryRequest {
                        path: path.unwrap_or_default(),
                    },
                    timeout,
                ))
                .await?
                .into_inner();
            if as_json {
                print_json(&serde_json::json!({
                    "versions": r.versions.iter().map(json).collect::<Vec<_>>(),
                }));
            } else {
                println!("{}", header());
                for f in &r.versions {
                    if f.deleted {
                        println!(
                            "{:<40} {:>4} {:>6} {:>8} {:>8} (deleted)",
                            f.path, f.version, "-", "-", f.revision
                        );
                    } else {
                        println!("{}", row(f));
                    }
                }
            }
        }
        ConfigCommand::Status => {
            let r = KvClient::new(channel)
                .range(t(
                    RangeRequest {
                        prefix: STATUS_PREFIX.to_vec(),
                        limit: 0,
                        serializable: false,
                        keys_only: false,
                    },
                    timeout,
                ))
                .await?
                .into_inner();
            let revision = r.header.map_or(0, |h| h.revision);
            let reports: Vec<SyncReport> = r
                .kvs
                .iter()
                .filter_map(|kv| SyncReport::decode(&kv.value))
                .collect();
            if as_json {
                print_json(&serde_json::json!({ "servers": reports, "revision": revision }));
            } else {
                println!(
                    "{:<4} {:<16} {:>8} {:>6} {:<24} {:<24} REFUSED",
                    "ID", "NAME", "APPLIED", "FILES", "PENDING-RESTARTS", "DRIFT-RESTORED"
                );
                fn list<'a>(items: impl Iterator<Item = &'a String>) -> String {
                    let items: Vec<&str> = items.map(String::as_str).collect();
                    if items.is_empty() {
                        "-".into()
                    } else {
                        items.join(",")
                    }
                }
                for s in &reports {
                    println!(
                        "{:<4} {:<16} {:>8} {:>6} {:<24} {:<24} {}",
                        s.id,
                        s.name,
                        s.applied_revision,
                        s.files,
                        list(s.pending_restarts.iter()),
                        list(s.drift_restored.iter()),
                        list(s.refused.iter().map(|(path, _)| path))
                    );
                }
                for s in &reports {
                    if let (None, Some(why)) = (&s.restart_failed, &s.roll_wait) {
                        println!("server {}: restarts {why}", s.id);
                    }
                    if let Some(e) = &s.restart_failed {
                        println!(
                            "server {}: RESTART FAILED, the roll is stopped until a new push: {e}",
                            s.id
                        );
                    }
                }
                if reports.is_empty() {
                    println!("(no server has reported: is zone-sync running?)");
                }
                println!("store revision {revision}");
            }
        }
        ConfigCommand::Diff { path, server } => {
            copies::diff(&mut c, &channel, path, server, timeout, as_json).await?
        }
        ConfigCommand::Import {
            path,
            from,
            restart,
            replace,
        } => {
            let ask = copies::Import {
                path,
                from,
                restart,
                replace,
            };
            copies::import(&mut c, &channel, ask, timeout, as_json).await?
        }
        ConfigCommand::Rollback { to } => {
            let r = c
                .rollback(t(RollbackRequest { to_revision: to }, timeout))
                .await?
                .into_inner();
            let rev = r.header.map_or(0, |h| h.revision);
            if as_json {
                print_json(
                    &serde_json::json!({ "changed": r.changed, "removed": r.removed, "revision": rev }),
                );
            } else if r.changed.is_empty() {
                println!("nothing to do: every managed file is as it was at revision {to}");
            } else {
                for p in &r.changed {
                    if r.removed.contains(p) {
                        println!("{p}: not managed at revision {to}: removed from the store (servers keep their copy)");
                    } else {
                        println!("{p}: restored as of revision {to}");
                    }
                }
                println!("(revision {rev})");
            }
        }
    }
    Ok(())
}
