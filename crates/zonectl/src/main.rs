//! `zonectl`: the Zoned management client. Exit code 0 on success, 1 when
//! the zone answered with an error or could not be reached, 2 for bad usage,
//! 3 when `config diff` found a server's copy differing from the zone's.

use std::io::Write;
use std::process::ExitCode;

mod config_cmd;
mod ext_cmd;
mod logs_cmd;
mod pki_cmd;
mod services_cmd;
mod snapshot_cmd;
mod space_cmd;
mod storage_cmd;
mod upgrade_cmd;
mod user_cmd;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use zonectl::v1::{
    cluster_client::ClusterClient, event::EventType, join_client::JoinClient, kv_client::KvClient,
    AddServerRequest, DeleteRequest, GetRequest, JoinTokenRequest, JoinTokenResponse, KeyValue,
    Member, PutRequest, RangeRequest, RemoveServerRequest, ResetServerRequest,
    SetMaintenanceRequest, StatusRequest, TransferLeaderRequest, WatchRequest,
};
use zonectl::{parse_endpoints, render_table, Credentials, ZoneView, DEFAULT_ENDPOINTS};

/// The credential this run uses, resolved once from the flags.
static CREDENTIALS: std::sync::OnceLock<Option<Credentials>> = std::sync::OnceLock::new();

fn credentials() -> Option<&'static Credentials> {
    CREDENTIALS.get().and_then(Option::as_ref)
}

/// Connects with this run's credential.
pub(crate) async fn connect(
    endpoints: &[String],
) -> Result<(tonic::transport::Channel, String), zonectl::ClientError> {
    zonectl::connect(endpoints, credentials()).await
}

/// What zonectl's exit code says (in --help and the man page).
const EXIT_CODES: &str = "\
Exit codes:
  0  done
  1  the zone refused or failed the request (the reason on stderr), no
     server answered, or `health` found an endpoint not serving
  2  bad usage (an unknown command or flag, a bad value)
  3  `config diff` found a server's copy differing from the zone's";

/// Manage a Zoned zone: its servers and its replicated key-value store.
#[derive(Debug, Parser)]
#[command(version = zonectl::CLIENT_BUILD, about, long_about = None, after_help = EXIT_CODES)]
struct Args {
    /// Client endpoints (host:port), comma-separated; the first that answers
    /// is used. Default: the local cluster of `cargo xtask cluster up`, whose
    /// first entry is also the local server on an appliance.
    #[arg(long, global = true, env = "ZONECTL_ENDPOINTS", default_value = DEFAULT_ENDPOINTS)]
    endpoints: String,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Directory holding a client credential: ca.pem, client.pem and
    /// client.key, as `zonectl zone init` (admin/) and `zonectl user issue`
    /// write them. Default: the first of these that holds one:
    /// target/local-zone/admin beside a zonectl built by cargo (the zone of
    /// `cargo xtask cluster up`), ~/.config/zonectl, /etc/zoned/admin (an
    /// appliance). zonectl speaks TLS only.
    #[arg(long, global = true, env = "ZONECTL_CREDENTIALS", value_name = "DIR")]
    credentials: Option<std::path::PathBuf>,
    /// The zone CA's certificate (with --cert and --key, instead of
    /// --credentials).
    #[arg(
        long = "cacert",
        global = true,
        env = "ZONECTL_CACERT",
        value_name = "FILE"
    )]
    tls_cacert: Option<std::path::PathBuf>,
    /// The client certificate.
    #[arg(
        long = "cert",
        global = true,
        env = "ZONECTL_CERT",
        value_name = "FILE"
    )]
    tls_cert: Option<std::path::PathBuf>,
    /// The client certificate's key.
    #[arg(long = "key", global = true, env = "ZONECTL_KEY", value_name = "FILE")]
    tls_key: Option<std::path::PathBuf>,
    /// Seconds to wait for an answer (watch excepted).
    #[arg(long, global = true, default_value_t = 15)]
    timeout: u64,
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
    /// Show every server of the zone: role, who holds the VIP, term, log
    /// indexes, lag, host figures, storage, certificate and build.
    Show,
    /// Print this zonectl's version and every server's: zoned's version,
    /// the commit it was built from, and the appliance image it booted.
    Version,
    /// Read a server's systemd journal (journalctl on that server, over
    /// the API; admin only): the last entries, then new ones with -f.
    Logs(logs_cmd::LogsArgs),
    /// Print a completion script for SHELL. bash: `zonectl completion
    /// bash > /etc/bash_completion.d/zonectl` (in place on the appliance);
    /// zsh: as `_zonectl` in a directory of $fpath; fish: as
    /// ~/.config/fish/completions/zonectl.fish.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print zonectl's man page (roff: `zonectl manpage | man -l -`), or
    /// with --dir write it and one page per command (zonectl-logs.1, ...)
    /// into DIR (the appliance has them in /usr/share/man/man1).
    Manpage {
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
    /// Read and write the replicated key-value store.
    #[command(subcommand)]
    Kv(KvCommand),
    /// Add, remove or reset servers of the zone.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Move leadership.
    #[command(subcommand)]
    Leader(LeaderCommand),
    /// Zone-wide switches.
    #[command(subcommand)]
    Zone(ZoneCommand),
    /// Configuration files kept identical on every server.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// The zone's client credentials: issue, list, revoke (admin only).
    #[command(subcommand)]
    User(user_cmd::UserCommand),
    /// Shared datastores, mounted and probed on every server.
    #[command(subcommand)]
    Storage(storage_cmd::StorageCommand),
    /// System extensions (the front-end's own services as systemd-sysext
    /// images), kept on every server.
    #[command(subcommand)]
    Ext(ext_cmd::ExtCommand),
    /// The front-end's own services set for the zone: units run only on the
    /// leader (after the VIP, the datastores and the fence delay) and units
    /// run on every server; where each runs.
    #[command(subcommand)]
    Services(services_cmd::ServicesCommand),
    /// Upgrade the zone's servers from a signed update bundle, one at a
    /// time, followers first and the leader last (admin): each installs it
    /// into its inactive root slot, reboots, and must be back in the zone
    /// with the new slot marked good before the next starts; the roll
    /// stops at the first failure or rollback. `upgrade status` shows each
    /// server's slot, image, boot entries and last upgrade.
    Upgrade(upgrade_cmd::UpgradeArgs),
    /// Back the store up to a file, and check a backup file.
    #[command(subcommand)]
    Snapshot(snapshot_cmd::SnapshotCommand),
    /// The zone's space alarms: raised by a server short of room, they
    /// stop writes that add data zone-wide until it has room again.
    #[command(subcommand)]
    Alarm(space_cmd::AlarmCommand),
    /// Drop the change history before a revision on every server (like
    /// etcdctl compact), and with --physical give the space back to the
    /// filesystem now.
    Compact(space_cmd::CompactArgs),
    /// Ask each endpoint for its gRPC health, as a load balancer would:
    /// SERVING only while the server is a member, knows a leader and has
    /// applied its log; `zone.v1.Cluster` answers while its Raft driver
    /// runs. Exit code 1 when any endpoint is not serving or cannot be
    /// reached.
    Health,
}

#[derive(Debug, Subcommand)]
enum ServerCommand {
    /// Add a server as a learner (it is promoted to voter once caught up)
    /// and print its one-time join token. Then start zoned on it with an
    /// empty data directory, `join = "<a founder's client address>"` and
    /// `join_token = "<the token>"` (on the appliance: the identity's
    /// `join` and `join_token`). The token admits that server once, within
    /// --ttl; the zone keeps only its hash.
    Add {
        /// Raft id of the new server (unused in the zone).
        #[arg(long)]
        id: u64,
        /// Display name (default zone-<id>).
        #[arg(long, default_value = "")]
        name: String,
        /// host:port of the new server's peer listener.
        #[arg(long)]
        peer: String,
        /// How long the join token may be used: seconds, or with a unit
        /// (90s, 30m, 1h, 2d); at most 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: u64,
    },
    /// Print a new join token for server ID, a member without a
    /// certificate yet (the one `server add` printed expired, was lost, or
    /// was used by a server since wiped). It replaces the one before.
    Token {
        id: u64,
        /// How long the token may be used (as for `server add`).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: u64,
    },
    /// Remove a server; the leader hands leadership over first.
    Remove { id: u64 },
    /// Make a follower receive a fresh snapshot from the leader.
    Reset { id: u64 },
}

#[derive(Debug, Subcommand)]
enum LeaderCommand {
    /// Hand leadership to server ID, or, without ID, to the most caught-up
    /// voter whose required datastores are healthy (refused when none is:
    /// name one to move leadership anyway).
    Transfer { id: Option<u64> },
}

#[derive(Debug, Subcommand)]
enum ZoneCommand {
    /// Refuse writes zone-wide for maintenance (reads still served).
    Disable,
    /// Accept writes again.
    Enable,
    /// Make a new zone's certificates on this machine: the zone CA, a node
    /// certificate per founder (with the CA's key, so that any server can
    /// sign a joiner's), and an admin credential for zonectl. Talks to no
    /// server.
    Init(pki_cmd::InitArgs),
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

/// What a membership change did (`said`, on a terminal), then the members.
fn print_change(members: &[Member], said: &str, json: bool) {
    if !json {
        println!("{said}");
    }
    print_members(members, json);
}

fn member_json(m: &Member) -> serde_json::Value {
    serde_json::json!({"id": m.id, "name": m.name, "peer_endpoint": m.peer_endpoint, "learner": m.learner})
}

/// A new join token for server `id`, valid `ttl` seconds.
async fn join_token(
    channel: &tonic::transport::Channel,
    id: u64,
    ttl: u64,
    timeout: std::time::Duration,
) -> Result<JoinTokenResponse, tonic::Status> {
    let req = t(
        JoinTokenRequest {
            id,
            ttl_seconds: ttl,
        },
        timeout,
    );
    let r = JoinClient::new(channel.clone()).issue_token(req).await?;
    Ok(r.into_inner())
}

/// A join token, and what to do with it.
fn print_token(id: u64, t: &JoinTokenResponse) {
    let expires = i64::try_from(t.expires_unix).map_or_else(|_| "-".into(), zone_pki::utc);
    println!();
    println!("join token for server {id} (one use, until {expires}):");
    println!("  {}", t.token);
    println!("start server {id} with an empty data directory and, in its node.toml:");
    println!("  join = \"<a founder's client address, host:7400>\"");
    println!("  join_token = \"<the token>\"");
    println!("(on the appliance: `join` and `join_token` in the identity file)");
}

/// A token's life: seconds, or a number with s, m, h or d.
fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (90s, 30m, 1h, 2d)"))?;
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    let secs = n.saturating_mul(per);
    if secs == 0 || secs > 7 * 86_400 {
        return Err(format!("{s:?}: from 1 s to 7 days"));
    }
    Ok(secs)
}

fn print_members(members: &[Member], json: bool) {
    if json {
        let v: Vec<_> = members.iter().map(member_json).collect();
        print_json(&serde_json::json!({ "members": v }));
        return;
    }
    let name_w = members
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    println!("{:<4}{:<9}{:<w$}  PEER", "ID", "ROLE", "NAME", w = name_w);
    for m in members {
        let role = if m.learner { "learner" } else { "voter" };
        let name = if m.name.is_empty() { "-" } else { &m.name };
        println!(
            "{:<4}{role:<9}{name:<w$}  {}",
            m.id,
            m.peer_endpoint,
            w = name_w
        );
    }
}

/// The services `zonectl health` asks about: the whole server (`""`), the
/// key-value store, the cluster service.
const HEALTH_SERVICES: [(&str, &str); 3] = [
    ("SERVER", ""),
    ("KV", "zone.v1.KV"),
    ("CLUSTER", "zone.v1.Cluster"),
];

/// `zonectl health`: every endpoint on its own.
async fn health(
    endpoints: &[String],
    timeout: std::time::Duration,
    json: bool,
) -> anyhow::Result<()> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let mut rows = Vec::new();
    for e in endpoints {
        let mut statuses = Vec::new();
        match connect(std::slice::from_ref(e)).await {
            Ok((channel, _)) => {
                let mut client = HealthClient::new(channel);
                for (_, service) in HEALTH_SERVICES {
                    let r = client
                        .check(t(
                            HealthCheckRequest {
                                service: service.into(),
                            },
                            timeout,
                        ))
                        .await;
                    statuses.push(match r {
                        Ok(r) => r.into_inner().status().as_str_name().to_owned(),
                        Err(s) => format!("error: {}", s.message()),
                    });
                }
            }
            Err(err) => statuses.push(format!("unreachable: {err}")),
        }
        rows.push((e.clone(), statuses));
    }
    let serving = |s: &[String]| s.first().is_some_and(|v| v == "SERVING");
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(e, s)| {
                let mut o = serde_json::json!({ "endpoint": e, "serving": serving(s) });
                for ((name, _), st) in HEALTH_SERVICES.iter().zip(s) {
                    o[name.to_lowercase()] = st.clone().into();
                }
                o
            })
            .collect();
        print_json(&serde_json::Value::Array(v));
    } else {
        let w = rows.iter().map(|(e, _)| e.len()).max().unwrap_or(0).max(8);
        println!("{:<w$}  {:<12} {:<12} CLUSTER", "ENDPOINT", "SERVER", "KV");
        for (e, s) in &rows {
            match s.as_slice() {
                [server, kv, cluster] => {
                    println!("{e:<w$}  {server:<12} {kv:<12} {cluster}")
                }
                other => println!("{e:<w$}  {}", other.join(" ")),
            }
        }
    }
    let bad = rows.iter().filter(|(_, s)| !serving(s)).count();
    if bad > 0 {
        anyhow::bail!("{bad} of {} endpoints not serving", rows.len());
    }
    Ok(())
}

/// `zonectl version`: each server's build (the client's own line is
/// printed before: see `run`); with `-o json` the client's too, even when
/// no server answers.
async fn version(
    endpoints: &[String],
    timeout: std::time::Duration,
    json: bool,
) -> anyhow::Result<()> {
    let client = serde_json::json!({
        "version": zone_version::VERSION,
        "build_commit": zone_version::COMMIT,
    });
    let status = match connect(endpoints).await {
        Ok((channel, _)) => ClusterClient::new(channel)
            .status(t(StatusRequest {}, timeout))
            .await
            .map(tonic::Response::into_inner)
            .map_err(anyhow::Error::from),
        Err(e) => Err(e.into()),
    };
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            if json {
                print_json(&serde_json::json!({ "client": client }));
            }
            return Err(e.context("no server told its version"));
        }
    };
    let view = ZoneView::from_status(&status);
    if json {
        let servers: Vec<_> = view
            .servers
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id,
                    "name": s.name,
                    "version": s.version,
                    "build_commit": s.build_commit,
                    "image_version": s.image_version,
                    "error": s.error,
                })
            })
            .collect();
        print_json(&serde_json::json!({ "client": client, "servers": servers }));
    } else {
        print!("{}", zonectl::render_versions(&view));
    }
    Ok(())
}

/// `zonectl manpage`: the main page on stdout, or every page into `dir`.
fn manpage(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
            clap_mangen::generate_to(Args::command(), dir)
                .with_context(|| format!("writing the man pages into {}", dir.display()))?;
        }
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Args::command()).render(&mut page)?;
            print_all(&page)?;
        }
    }
    Ok(())
}

/// Writes `bytes` to stdout; a reader that stopped early (`| head`) is
/// not an error.
fn print_all(bytes: &[u8]) -> anyhow::Result<()> {
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// A request with a deadline.
/// `msg` with a deadline: the global --timeout.
pub(crate) fn t<T>(msg: T, timeout: std::time::Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

async fn run(args: Args) -> anyhow::Result<()> {
    if matches!(args.command, Command::Version) && args.output == Output::Table {
        // The client's own build first, whatever happens next (no
        // credential, no server answering).
        println!("client {}", zonectl::CLIENT_BUILD);
    }
    match &args.command {
        Command::Completion { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Args::command(), "zonectl", &mut script);
            return print_all(&script);
        }
        Command::Manpage { dir } => return manpage(dir.as_deref()),
        _ => {}
    }
    if let Command::Zone(ZoneCommand::Init(init)) = &args.command {
        let made = pki_cmd::init(init)?;
        if args.output == Output::Json {
            print_json(&serde_json::to_value(&made)?);
        } else {
            print!("{}", pki_cmd::describe(&made));
        }
        return Ok(());
    }
    if let Command::Snapshot(snapshot_cmd::SnapshotCommand::Status { file }) = &args.command {
        return snapshot_cmd::status(file, args.output == Output::Json);
    }
    let creds = Credentials::resolve(
        args.tls_cacert.as_deref(),
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        args.credentials.as_deref(),
    )?;
    let Some(creds) = creds else {
        let looked: Vec<String> = zonectl::credentials::default_dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        anyhow::bail!(
            "no client credential: give --credentials DIR (ca.pem, client.pem, client.key) or --cacert, --cert and --key (or ZONECTL_CREDENTIALS, ...); none in {}",
            looked.join(", ")
        );
    };
    let _ = CREDENTIALS.set(Some(creds));
    let timeout = std::time::Duration::from_secs(args.timeout.max(1));
    let endpoints = parse_endpoints(&args.endpoints);
    if let Command::Snapshot(snapshot_cmd::SnapshotCommand::Save { file, .. }) = &args.command {
        // Before any connection: an existing file is never overwritten.
        snapshot_cmd::refuse_existing(file)?;
    }
    if let Command::Health = args.command {
        return health(&endpoints, timeout, args.output == Output::Json).await;
    }
    if let Command::Version = args.command {
        return version(&endpoints, timeout, args.output == Output::Json).await;
    }
    let (channel, reached) = connect(&endpoints).await?;
    let json = args.output == Output::Json;
    match args.command {
        Command::Show => {
            let status = ClusterClient::new(channel)
                .status(t(StatusRequest {}, timeout))
                .await?
                .into_inner();
            let view = ZoneView::from_status(&status);
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", render_table(&view));
            }
        }
        Command::Server(cmd) => {
            let mut c = ClusterClient::new(channel.clone());
            match cmd {
                ServerCommand::Add {
                    id,
                    name,
                    peer,
                    ttl,
                } => {
                    let r = c.add_server(t(AddServerRequest { id, name, peer }, timeout));
                    let members = r.await?.into_inner().members;
                    let token = join_token(&channel, id, ttl, timeout)
                        .await
                        .with_context(|| {
                            format!("server {id} was added, but no join token was made; `zonectl server token {id}` asks again")
                        })?;
                    if json {
                        print_json(&serde_json::json!({
                            "members": members.iter().map(member_json).collect::<Vec<_>>(),
                            "join_token": token.token,
                            "join_token_expires_unix": token.expires_unix,
                        }));
                    } else {
                        print_change(&members, &format!("server {id} added as a learner"), false);
                        print_token(id, &token);
                    }
                }
                ServerCommand::Token { id, ttl } => {
                    let token = join_token(&channel, id, ttl, timeout).await?;
                    if json {
                        print_json(&serde_json::json!({
                            "join_token": token.token,
                            "join_token_expires_unix": token.expires_unix,
                        }));
                    } else {
                        print_token(id, &token);
                    }
                }
                ServerCommand::Remove { id } => {
                    let r = c.remove_server(t(RemoveServerRequest { id }, timeout));
                    let said = format!("server {id} removed");
                    print_change(&r.await?.into_inner().members, &said, json);
                }
                ServerCommand::Reset { id } => {
                    c.reset_server(t(ResetServerRequest { id }, timeout))
                        .await?;
                    if json {
                        print_json(&serde_json::json!({ "reset": id }));
                    } else {
                        println!("server {id} asked the leader for a fresh snapshot");
                    }
                }
            }
        }
        Command::Leader(LeaderCommand::Transfer { id }) => {
            // Talk to the leader on its own address: through the VIP, the
            // answer would be lost when the VIP moves with leadership.
            let status = ClusterClient::new(channel.clone())
                .status(t(StatusRequest {}, timeout))
                .await?
                .into_inner();
            let direct = status
                .servers
                .iter()
                .find(|s| s.id == status.leader_id && !s.client_endpoint.is_empty())
                .map(|s| s.client_endpoint.clone());
            let channel = match direct {
                Some(ep) => connect(&[ep]).await.map(|(c, _)| c).unwrap_or(channel),
                None => channel,
            };
            let r = ClusterClient::new(channel)
                .transfer_leader(t(
                    TransferLeaderRequest {
                        target: id.unwrap_or(0),
                    },
                    timeout,
                ))
                .await;
            let (leader, term) = match r {
                Ok(r) => {
                    let r = r.into_inner();
                    (r.leader_id, r.term)
                }
                // Asked through the VIP, the answer is lost when the VIP
                // moves with leadership: ask the zone afresh what happened.
                Err(e)
                    if matches!(
                        e.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::Cancelled
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::Unknown
                    ) =>
                {
                    let (channel, _) = connect(&endpoints).await?;
                    let s = ClusterClient::new(channel)
                        .status(t(StatusRequest {}, timeout))
                        .await?
                        .into_inner();
                    let moved = s.leader_id != 0 && id.is_none_or(|want| want == s.leader_id);
                    if !moved {
                        return Err(e.into());
                    }
                    eprintln!("(the answer was lost, as the VIP moved with leadership; the zone now says:)");
                    (s.leader_id, s.term)
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                print_json(&serde_json::json!({ "leader_id": leader, "term": term }));
            } else {
                println!("server {leader} leads (term {term})");
            }
        }
        Command::Config(cmd) => config_cmd::run(cmd, channel, timeout, json).await?,
        Command::User(cmd) => user_cmd::run(cmd, channel, timeout, json).await?,
        Command::Storage(cmd) => storage_cmd::run(cmd, channel, timeout, json).await?,
        Command::Ext(cmd) => ext_cmd::run(cmd, channel, timeout, json).await?,
        Command::Services(cmd) => services_cmd::run(cmd, channel, timeout, json).await?,
        Command::Alarm(cmd) => space_cmd::alarm(cmd, channel, timeout, json).await?,
        Command::Compact(args) => space_cmd::compact(args, channel, timeout, json).await?,
        Command::Health
        | Command::Version
        | Command::Completion { .. }
        | Command::Manpage { .. } => {
            unreachable!("answered before connecting")
        }
        Command::Logs(logs) => logs_cmd::run(logs, channel, timeout, json).await?,
        Command::Upgrade(args) => upgrade_cmd::run(args, channel, &reached, timeout, json).await?,
        Command::Snapshot(snapshot_cmd::SnapshotCommand::Save { file, serializable }) => {
            snapshot_cmd::save(channel, &file, serializable, timeout, json).await?
        }
        Command::Snapshot(snapshot_cmd::SnapshotCommand::Status { .. }) => {
            unreachable!("answered before connecting")
        }
        Command::Zone(cmd) => {
            let disabled = matches!(cmd, ZoneCommand::Disable);
            let r = ClusterClient::new(channel)
                .set_maintenance(t(SetMaintenanceRequest { disabled }, timeout))
                .await?
                .into_inner();
            if json {
                print_json(&serde_json::json!({ "disabled": r.disabled }));
            } else if r.disabled {
                println!("zone disabled for maintenance: writes are refused, reads are served");
            } else {
                println!("zone enabled: writes are accepted");
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
                        .put(t(
                            PutRequest {
                                key: key.into_bytes(),
                                value,
                                prev_kv: false,
                            },
                            timeout,
                        ))
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
                        .get(t(
                            GetRequest {
                                key: key.clone().into_bytes(),
                                serializable,
                            },
                            timeout,
                        ))
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
                        .delete(t(
                            DeleteRequest {
                                key: key.into_bytes(),
                                prefix,
                                prev_kv: false,
                            },
                            timeout,
                        ))
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
                        .range(t(
                            RangeRequest {
                                prefix: prefix.into_bytes(),
                                limit,
                                serializable,
                                keys_only,
                            },
                            timeout,
                        ))
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
            if let Some(d) = e.downcast_ref::<config_cmd::Differ>() {
                eprintln!("zonectl: {d}");
                return ExitCode::from(3);
            }
            if let Some(status) = e.downcast_ref::<tonic::Status>() {
                match zonectl::explain_status(status, credentials()) {
                    Some(why) => eprintln!("zonectl: {why}"),
                    None => eprintln!("zonectl: {:?}: {}", status.code(), status.message()),
                }
            } else {
                eprintln!("zonectl: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn completion_scripts_name_every_command() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Args::command(), "zonectl", &mut buf);
            let text = String::from_utf8(buf).unwrap();
            for sub in Args::command().get_subcommands() {
                assert!(
                    text.contains(sub.get_name()),
                    "{shell:?}: no {}",
                    sub.get_name()
                );
            }
            assert!(text.contains("--endpoints"), "{shell:?}");
        }
    }

    #[test]
    fn a_man_page_for_zonectl_and_each_command() {
        let dir = tempfile::tempdir().unwrap();
        manpage(Some(dir.path())).unwrap();
        let main = std::fs::read_to_string(dir.path().join("zonectl.1")).unwrap();
        assert!(main.contains(".TH zonectl 1"), "{main}");
        assert!(main.contains("Exit codes"), "{main}");
        for page in [
            "zonectl-logs.1",
            "zonectl-version.1",
            "zonectl-kv-put.1",
            "zonectl-snapshot-save.1",
        ] {
            let text = std::fs::read_to_string(dir.path().join(page))
                .unwrap_or_else(|e| panic!("{page}: {e}"));
            assert!(text.contains(".TH"), "{page}");
        }
        let logs = std::fs::read_to_string(dir.path().join("zonectl-logs.1")).unwrap();
        assert!(logs.contains("follow"), "{logs}");
    }
}
