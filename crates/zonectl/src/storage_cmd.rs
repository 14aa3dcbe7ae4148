//! `zonectl storage`: the zone's shared datastores. `add` declares one
//! (every server's zone-mounts mounts it), `rm` removes it (unmounted
//! everywhere, lazily where hung), `ls` lists the declarations, `status`
//! shows each server's view of each datastore.

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};
use tonic::transport::Channel;
use zonectl::v1::{
    cluster_client::ClusterClient, storage_client::StorageClient, AddDatastoreRequest, Datastore,
    ListDatastoresRequest, RemoveDatastoreRequest, StatusRequest,
};
use zonectl::ZoneView;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FsType {
    /// NFS version 4 (`host:/export`).
    Nfs4,
    /// NFS version 3 (`host:/export`).
    Nfs,
    Ext4,
    Xfs,
    Btrfs,
    Ext3,
    Ext2,
    Gfs2,
    Ocfs2,
    /// A directory of this server's, bound (`--source /srv/dir`).
    Bind,
}

#[derive(Debug, Subcommand)]
pub enum StorageCommand {
    /// Declare a datastore: every server mounts it on TARGET within seconds
    /// and probes it every --probe-interval. Refused (and mounted nowhere)
    /// when a field is wrong: the refusal names it.
    Add {
        /// 1 to 63 of a-z, 0-9, `.`, `_`, `-`.
        name: String,
        #[arg(long = "type", value_enum)]
        ty: FsType,
        /// `host:/export` for nfs and nfs4; a block device (/dev/...) for
        /// ext4, xfs...; a directory for bind.
        #[arg(long)]
        source: String,
        /// Where it is mounted, the same on every server: not on or under
        /// the system's trees (/etc, /usr, /boot, /run, /var/lib/zoned...),
        /// not on a directory holding one of them or a file system of the
        /// server's own (/var, /tmp), nor inside another datastore; the
        /// appliance's root is read-only: use /var/... there.
        #[arg(long)]
        target: String,
        /// Mount options, comma-separated (e.g. `hard,timeo=600,vers=4.2`).
        #[arg(long, default_value = "")]
        options: String,
        /// The leader's front-end services need it: a leader whose
        /// required datastores stay unhealthy hands leadership over.
        #[arg(long)]
        required: bool,
        /// Mounted only on the lease holder, after the fence delay (a
        /// shared block device's ext4, xfs... that must never be mounted
        /// twice); not for nfs or bind. zone-vip mounts it before the
        /// leader-only units and unmounts it after them.
        #[arg(long)]
        exclusive: bool,
        /// Time between probes (e.g. 2s, 500ms).
        #[arg(long, default_value = "2s", value_parser = millis)]
        probe_interval: u32,
        /// Time after which a probe, mount or unmount counts as hung.
        #[arg(long, default_value = "5s", value_parser = millis)]
        probe_timeout: u32,
        /// Probe by reading only (no file written under
        /// `.zoned-probe/<server>`); needed with `ro`.
        #[arg(long)]
        no_write_probe: bool,
    },
    /// Remove a datastore: every server unmounts it (lazily where the
    /// storage hangs).
    Rm { name: String },
    /// List the declared datastores.
    Ls,
    /// Each server's view of each datastore: state (mounted, probing, hung,
    /// failed, unmounted), last probe latency, how long unhealthy, why.
    Status,
}

/// `500ms`, `2s`, `1m` or plain milliseconds.
pub(crate) fn millis(s: &str) -> Result<u32, String> {
    let (n, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else {
        (s, 1)
    };
    n.parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("`{s}` is not a duration (e.g. 500ms, 2s, 1m)"))
}

fn type_name(t: FsType) -> String {
    t.to_possible_value()
        .expect("no variant is skipped")
        .get_name()
        .to_owned()
}

fn json(d: &Datastore) -> serde_json::Value {
    serde_json::json!({
        "name": d.name,
        "type": d.r#type,
        "source": d.source,
        "target": d.target,
        "options": d.options,
        "required": d.required,
        "exclusive": d.exclusive,
        "probe_interval_ms": d.probe_interval_ms,
        "probe_timeout_ms": d.probe_timeout_ms,
        "write_probe": d.write_probe,
        "revision": d.revision,
    })
}

pub async fn run(
    cmd: StorageCommand,
    channel: Channel,
    timeout: std::time::Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut c = StorageClient::new(channel.clone());
    match cmd {
        StorageCommand::Add {
            name,
            ty,
            source,
            target,
            options,
            required,
            exclusive,
            probe_interval,
            probe_timeout,
            no_write_probe,
        } => {
            let ds = Datastore {
                name,
                r#type: type_name(ty),
                source,
                target,
                options,
                required,
                exclusive,
                probe_interval_ms: probe_interval,
                probe_timeout_ms: probe_timeout,
                write_probe: !no_write_probe,
                revision: 0,
            };
            let r = c
                .add(crate::t(
                    AddDatastoreRequest {
                        datastore: Some(ds),
                    },
                    timeout,
                ))
                .await?
                .into_inner();
            let d = r.datastore.unwrap_or_default();
            if as_json {
                let mut v = json(&d);
                v["changed"] = serde_json::json!(r.changed);
                crate::print_json(&v);
            } else if r.changed {
                println!(
                    "datastore {} declared at revision {}: every server mounts {} on {} (zonectl storage status)",
                    d.name, d.revision, d.source, d.target
                );
            } else {
                println!(
                    "datastore {} was declared already, the same way: nothing changed",
                    d.name
                );
            }
        }
        StorageCommand::Rm { name } => {
            let r = c
                .remove(crate::t(
                    RemoveDatastoreRequest { name: name.clone() },
                    timeout,
                ))
                .await?
                .into_inner();
            let revision = r.header.map_or(0, |h| h.revision);
            if as_json {
                crate::print_json(&serde_json::json!({ "name": name, "revision": revision }));
            } else {
                println!(
                    "datastore {name} removed at revision {revision}: every server unmounts it"
                );
            }
        }
        StorageCommand::Ls => {
            let r = c
                .list(crate::t(ListDatastoresRequest {}, timeout))
                .await?
                .into_inner();
            if as_json {
                crate::print_json(&serde_json::Value::Array(
                    r.datastores.iter().map(json).collect(),
                ));
            } else if r.datastores.is_empty() {
                println!("no datastores (zonectl storage add)");
            } else {
                let rows = r
                    .datastores
                    .iter()
                    .map(|d| {
                        let mut flags = Vec::new();
                        if d.required {
                            flags.push("required");
                        }
                        if d.exclusive {
                            flags.push("exclusive");
                        }
                        if !d.write_probe {
                            flags.push("read-probe");
                        }
                        vec![
                            d.name.clone(),
                            d.r#type.clone(),
                            d.source.clone(),
                            d.target.clone(),
                            if d.options.is_empty() {
                                "-".into()
                            } else {
                                d.options.clone()
                            },
                            format!("{}/{}ms", d.probe_interval_ms, d.probe_timeout_ms),
                            if flags.is_empty() {
                                "-".into()
                            } else {
                                flags.join(",")
                            },
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    zonectl::columns(
                        &["NAME", "TYPE", "SOURCE", "TARGET", "OPTIONS", "PROBE", "FLAGS"],
                        rows
                    )
                );
            }
        }
        StorageCommand::Status => {
            let status = ClusterClient::new(channel)
                .status(crate::t(StatusRequest {}, timeout))
                .await
                .context("asking the zone's status")?
                .into_inner();
            let view = ZoneView::from_status(&status);
            if as_json {
                let v: Vec<serde_json::Value> = view
                    .servers
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "id": s.id,
                            "name": s.name,
                            "storage": s.storage,
                        })
                    })
                    .collect();
                crate::print_json(&serde_json::Value::Array(v));
            } else {
                print!("{}", zonectl::render_storage(&view));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_milliseconds() {
        assert_eq!(millis("500ms"), Ok(500));
        assert_eq!(millis("2s"), Ok(2000));
        assert_eq!(millis("1m"), Ok(60_000));
        assert_eq!(millis("750"), Ok(750));
        assert!(millis("2h").is_err());
        assert!(millis("99999999s").is_err());
    }
}
