//! `zonectl alarm` and `zonectl compact`: the zone's space alarms, and
//! giving space back.

use clap::{Args, Subcommand};
use tonic::transport::Channel;
use zonectl::v1::{
    cluster_client::ClusterClient, kv_client::KvClient, AlarmsRequest, CompactRequest,
    DisarmAlarmRequest, RangeRequest,
};
use zonectl::AlarmRow;

use crate::t;

#[derive(Debug, Subcommand)]
pub enum AlarmCommand {
    /// List the space alarms standing: which server, what it measured,
    /// the limit it crossed. While any stands, writes that add data are
    /// refused zone-wide (RESOURCE_EXHAUSTED); reads, deletes and
    /// compaction are served.
    Ls,
    /// Clear an alarm now (a server clears its own once it has room
    /// again). A server still short of space raises its alarm again
    /// within seconds.
    Disarm {
        /// The server whose alarm to clear.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        server: Option<u64>,
        /// Clear every alarm.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Args)]
pub struct CompactArgs {
    /// Drop the change history before this revision (`now`: all of it,
    /// up to the store's current revision included). Watches from an
    /// older revision then fail; the keys' current values are untouched.
    #[arg(value_name = "REV")]
    pub revision: String,
    /// Also compact RocksDB on every server now, giving the space of
    /// deleted keys and dropped history back to the filesystem; waits for
    /// the answering server's (within --timeout).
    #[arg(long)]
    pub physical: bool,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs `zonectl alarm ...`.
pub async fn alarm(
    cmd: AlarmCommand,
    channel: Channel,
    timeout: std::time::Duration,
    json: bool,
) -> anyhow::Result<()> {
    let mut c = ClusterClient::new(channel);
    let (alarms, said) = match cmd {
        AlarmCommand::Ls => (
            c.alarms(t(AlarmsRequest {}, timeout)).await?.into_inner(),
            None,
        ),
        AlarmCommand::Disarm { server, all: _ } => {
            let server = server.unwrap_or(0);
            let r = c
                .disarm_alarm(t(DisarmAlarmRequest { server }, timeout))
                .await?
                .into_inner();
            let said = if server == 0 {
                "every alarm cleared".to_owned()
            } else {
                format!("server {server}'s alarm cleared")
            };
            (r, Some(said))
        }
    };
    let rows: Vec<AlarmRow> = alarms.alarms.iter().map(AlarmRow::from_alarm).collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "alarms": rows }))?
        );
    } else {
        if let Some(said) = said {
            println!("{said} (a server still short of space raises its alarm again)");
        }
        print!("{}", zonectl::render_alarms(&rows, now_ms()));
    }
    Ok(())
}

/// Runs `zonectl compact`.
pub async fn compact(
    args: CompactArgs,
    channel: Channel,
    timeout: std::time::Duration,
    json: bool,
) -> anyhow::Result<()> {
    let mut kv = KvClient::new(channel);
    let revision = match args.revision.as_str() {
        "now" => kv
            .range(t(
                RangeRequest {
                    prefix: Vec::new(),
                    limit: 1,
                    serializable: false,
                    keys_only: true,
                },
                timeout,
            ))
            .await?
            .into_inner()
            .header
            .map_or(0, |h| h.revision + 1),
        n => n.parse::<u64>().map_err(|_| {
            anyhow::anyhow!("REV: {n:?} is not a revision (a number from 1, or `now`)")
        })?,
    };
    let r = kv
        .compact(t(
            CompactRequest {
                revision,
                physical: args.physical,
            },
            timeout,
        ))
        .await?
        .into_inner();
    let server = r.header.as_ref().map_or(0, |h| h.member_id);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "revision": r.header.as_ref().map_or(0, |h| h.revision),
                "compacted": r.compacted,
                "physical": args.physical,
                "physical_done": r.physical_done,
            }))?
        );
        return Ok(());
    }
    println!(
        "history compacted: everything before revision {} is gone on every server",
        r.compacted
    );
    if args.physical {
        if r.physical_done {
            println!("store compacted on server {server}; every server compacts its own");
        } else {
            println!(
                "the store's compaction is still running on server {server} (and on the others): see zonectl logs -u zoned"
            );
        }
    }
    Ok(())
}
