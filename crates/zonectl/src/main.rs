//! `zonectl`: the Zoned management client. Exit code 0 on success, 1 when
//! the zone answered with an error or could not be reached, 2 for bad usage.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use zonectl::v1::{
    cluster_client::ClusterClient, event::EventType, kv_client::KvClient, DeleteRequest,
    GetRequest, KeyValue, PutRequest, RangeRequest, StatusRequest, WatchRequest,
};
use zonectl::{connect, parse_endpoints, render_table, ZoneView, DEFAULT_ENDPOINTS};

/// Manage a Zoned zone: its servers and its replicated key-value store.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Client endpoints (host:port), comma-separated; the first that answers
    /// is used. Default: the local cluster of `cargo xtask cluster up`, whose
    /// first entry is also the local server on an appliance.
    #[arg(long, global = true, env = "ZONECTL_ENDPOINTS", default_value = DEFAULT_ENDPOINTS)]
    endpoints: String,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show every server of the zone: role, term, log indexes, lag.
    Show,
    /// Read and write the replicated key-value store.
    #[command(subcommand)]
    Kv(KvCommand),
}

#[derive(Debug, Subcommand)]
enum KvCommand {
    /// Set KEY to VALUE (use '-' to read the value from stdin).
    Put { key: String, value: String },
    /// Print the value of KEY.
    Get {
        key: String,
        /// Answer from the contacted server's state, possibly stale, without
        /// asking the leader.
        #[arg(long)]
        serializable: bool,
    },
    /// Delete KEY, or every key under it with --prefix.
    Del {
        key: String,
        #[arg(long)]
        prefix: bool,
    },
    /// List keys under PREFIX (all keys when omitted).
    Range {
        #[arg(default_value = "")]
        prefix: String,
        /// At most this many keys (0: no limit).
        #[arg(long, default_value_t = 0)]
        limit: u64,
        #[arg(long)]
        keys_only: bool,
        #[arg(long)]
        serializable: bool,
    },
    /// Stream changes under PREFIX until interrupted.
    Watch {
        #[arg(default_value = "")]
        prefix: String,
        /// Start from this revision (default: changes from now on).
        #[arg(long, default_value_t = 0)]
        rev: u64,
    },
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn kv_json(kv: &KeyValue) -> serde_json::Value {
    serde_json::json!({
        "key": text(&kv.key),
        "value": text(&kv.value),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
    })
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn run(args: Args) -> anyhow::Result<()> {
    let endpoints = parse_endpoints(&args.endpoints);
    let (channel, _) = connect(&endpoints).await?;
    let json = args.output == Output::Json;
    match args.command {
        Command::Show => {
            let status = ClusterClient::new(channel)
                .status(StatusRequest {})
                .await?
                .into_inner();
            let view = ZoneView::from_status(&status);
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", render_table(&view));
            }
        }
        Command::Kv(cmd) => {
            let mut kv = KvClient::new(channel).max_decoding_message_size(usize::MAX);
            match cmd {
                KvCommand::Put { key, value } => {
                    let value = if value == "-" {
                        let mut buf = Vec::new();
                        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
                        buf
                    } else {
                        value.into_bytes()
                    };
                    let r = kv
                        .put(PutRequest {
                            key: key.into_bytes(),
                            value,
                            prev_kv: false,
                        })
                        .await?
                        .into_inner();
                    let rev = r.header.map_or(0, |h| h.revision);
                    if json {
                        print_json(&serde_json::json!({ "revision": rev }));
                    } else {
                        println!("OK (revision {rev})");
                    }
                }
                KvCommand::Get { key, serializable } => {
                    let r = kv
                        .get(GetRequest {
                            key: key.clone().into_bytes(),
                            serializable,
                        })
                        .await?
                        .into_inner();
                    match (r.kv, json) {
                        (Some(kv), true) => print_json(&kv_json(&kv)),
                        (Some(kv), false) => {
                            std::io::stdout().write_all(&kv.value)?;
                            println!();
                        }
                        (None, _) => anyhow::bail!("key '{key}' not found"),
                    }
                }
                KvCommand::Del { key, prefix } => {
                    let r = kv
                        .delete(DeleteRequest {
                            key: key.into_bytes(),
                            prefix,
                            prev_kv: false,
                        })
                        .await?
                        .into_inner();
                    if json {
                        print_json(&serde_json::json!({
                            "deleted": r.deleted,
                            "revision": r.header.map_or(0, |h| h.revision),
                        }));
                    } else {
                        println!("{} deleted", r.deleted);
                    }
                }
                KvCommand::Range {
                    prefix,
                    limit,
                    keys_only,
                    serializable,
                } => {
                    let r = kv
                        .range(RangeRequest {
                            prefix: prefix.into_bytes(),
                            limit,
                            serializable,
                            keys_only,
                        })
                        .await?
                        .into_inner();
                    if json {
                        print_json(&serde_json::json!({
                            "kvs": r.kvs.iter().map(kv_json).collect::<Vec<_>>(),
                            "more": r.more,
                            "revision": r.header.map_or(0, |h| h.revision),
                        }));
                    } else {
                        for kv in &r.kvs {
                            if keys_only {
                                println!("{}", text(&kv.key));
                            } else {
                                println!("{}\t{}", text(&kv.key), text(&kv.value));
                            }
                        }
                        if r.more {
                            eprintln!("(more keys; raise --limit)");
                        }
                    }
                }
                KvCommand::Watch { prefix, rev } => {
                    let mut stream = kv
                        .watch(WatchRequest {
                            prefix: prefix.into_bytes(),
                            start_revision: rev,
                            prev_kv: false,
                        })
                        .await?
                        .into_inner();
                    while let Some(resp) = stream.message().await? {
                        for ev in resp.events {
                            let Some(kv) = ev.kv else { continue };
                            let put = ev.r#type == EventType::Put as i32;
                            if json {
                                let mut v = kv_json(&kv);
                                v["type"] = if put { "PUT" } else { "DELETE" }.into();
                                println!("{v}");
                            } else if put {
                                println!(
                                    "PUT {} {} (revision {})",
                                    text(&kv.key),
                                    text(&kv.value),
                                    kv.mod_revision
                                );
                            } else {
                                println!("DELETE {} (revision {})", text(&kv.key), kv.mod_revision);
                            }
                        }
                        std::io::stdout().flush()?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(status) = e.downcast_ref::<tonic::Status>() {
                eprintln!("zonectl: {:?}: {}", status.code(), status.message());
            } else {
                eprintln!("zonectl: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
