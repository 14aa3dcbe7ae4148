//! `zonectl snapshot`: a backup of the zone's store to a file (`save`),
//! and what a backup file holds, checked (`status`). The file's format is
//! the `zone_backup` crate's: a header, the keys, a trailer whose SHA-256
//! covers the rest.

use std::io::{IsTerminal as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;
use tonic::transport::Channel;
use zone_backup::Summary;
use zonectl::v1::{cluster_client::ClusterClient, BackupRequest};

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Back the zone's store up to FILE: one consistent view of every key
    /// (with its revisions), the zone's id, revision and membership, taken
    /// on the first endpoint that answers, checked end to end with a
    /// SHA-256. Written to FILE.part, synced, then renamed: FILE is whole
    /// or absent. Admin only.
    Save {
        file: PathBuf,
        /// The answering server's data as it is, without first catching up
        /// with everything committed (a linearizable backup needs a
        /// leader; this one does not).
        #[arg(long)]
        serializable: bool,
    },
    /// Check a backup file (every frame, the key order and count, the
    /// checksum) and print what it holds. Reads the file only; needs no
    /// zone.
    Status { file: PathBuf },
}

/// `status`: offline, before any connection.
pub fn status(file: &Path, json: bool) -> anyhow::Result<()> {
    let f = std::fs::File::open(file).with_context(|| format!("{}", file.display()))?;
    let summary = zone_backup::read(std::io::BufReader::new(f), |_| {})
        .with_context(|| format!("{} is not a usable backup", file.display()))?;
    print_summary(file, &summary, json);
    Ok(())
}

/// A backup never replaces a file.
pub fn refuse_existing(file: &Path) -> anyhow::Result<()> {
    if file.exists() {
        anyhow::bail!(
            "{} exists already; remove it or name another file",
            file.display()
        );
    }
    Ok(())
}

/// `save`: `idle` is the longest wait for the next chunk.
pub async fn save(
    channel: Channel,
    file: &Path,
    serializable: bool,
    idle: std::time::Duration,
    json: bool,
) -> anyhow::Result<()> {
    refuse_existing(file)?;
    let mut part = file.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    // Made here, never truncated: a second save to the same FILE at once
    // is refused instead of writing into this one.
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&part)
        .with_context(|| {
            format!(
                "{} (another save of {} under way, or one interrupted: remove it)",
                part.display(),
                file.display()
            )
        })?;
    let r = tokio::select! {
        r = save_to(channel, out, file, &part, serializable, idle) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; nothing saved")),
    };
    match r {
        Ok(summary) => {
            print_summary(file, &summary, json);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            Err(e)
        }
    }
}

async fn save_to(
    channel: Channel,
    out: std::fs::File,
    file: &Path,
    part: &Path,
    serializable: bool,
    idle: std::time::Duration,
) -> anyhow::Result<Summary> {
    let mut writer = zone_backup::Writer::new(std::io::BufWriter::new(out))?;
    // A batch may carry a value up to zoned's largest.
    let mut stream = ClusterClient::new(channel)
        .max_decoding_message_size(zone_backup::MAX_FRAME)
        .backup(BackupRequest {
            linearizable: !serializable,
        })
        .await?
        .into_inner();
    let progress = std::io::stderr().is_terminal();
    let mut keys = 0;
    loop {
        let next = tokio::time::timeout(idle, stream.message())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the server sent nothing for {} s; nothing saved",
                    idle.as_secs()
                )
            })??;
        let Some(chunk) = next else { break };
        keys += writer.push(&chunk)?;
        if progress {
            let total = writer.header().map_or(0, |h| h.key_count);
            eprint!(
                "\rsaving {}: {keys} of {total} keys, {:.1} MiB ",
                file.display(),
                writer.bytes() as f64 / (1 << 20) as f64
            );
        }
    }
    if progress {
        eprintln!();
    }
    let (out, summary) = writer.finish()?;
    let out = out.into_inner().map_err(|e| e.into_error())?;
    out.sync_all()?;
    drop(out);
    // A link, not a rename: it fails if FILE appeared meanwhile.
    std::fs::hard_link(part, file)
        .with_context(|| format!("linking {} to {}", part.display(), file.display()))?;
    std::fs::remove_file(part)?;
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()?;
    Ok(summary)
}

fn print_summary(file: &Path, s: &Summary, json: bool) {
    let taken = time::OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(s.header.taken_unix_ms) * 1_000_000,
    )
    .ok()
    .and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_else(|| "-".into());
    let members: Vec<String> = s
        .header
        .members
        .iter()
        .map(|m| {
            format!(
                "{} {}{}",
                m.id,
                if m.name.is_empty() { "-" } else { &m.name },
                if m.learner { " (learner)" } else { "" }
            )
        })
        .collect();
    if json {
        let v = serde_json::json!({
            "file": file.display().to_string(),
            "format": s.header.format,
            "zone_id": s.header.zone_id,
            "revision": s.header.revision,
            "keys": s.keys,
            "bytes": s.bytes,
            "sha256": s.sha256,
            "server_id": s.header.server_id,
            "taken": taken,
            "disabled": s.header.disabled,
            "members": members,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "file:      {}", file.display());
    let _ = writeln!(
        out,
        "zone:      {}",
        if s.header.zone_id.is_empty() {
            "-"
        } else {
            &s.header.zone_id
        }
    );
    let _ = writeln!(out, "revision:  {}", s.header.revision);
    let _ = writeln!(out, "keys:      {}", s.keys);
    let _ = writeln!(out, "size:      {} bytes", s.bytes);
    let _ = writeln!(out, "taken:     {taken} on server {}", s.header.server_id);
    let _ = writeln!(out, "members:   {}", members.join(", "));
    if s.header.disabled {
        let _ = writeln!(out, "           (writes were disabled for maintenance)");
    }
    let _ = writeln!(out, "sha256:    {} (checked)", s.sha256);
}
