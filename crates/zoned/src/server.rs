//! Wiring: open the store, start the Raft driver and the transport, serve
//! the client and peer ports, and stop cleanly on SIGTERM or SIGINT.
//!
//! Shutdown order matters: stop taking requests, stop the driver (it
//! finishes the Ready in hand and syncs the WAL), then exit. A driver that
//! stops on a storage failure takes the process down with an error, so
//! systemd restarts it rather than leaving a server that cannot persist.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use zone_proto::v1::agent_server::AgentServer;
use zone_proto::v1::cluster_client::ClusterClient;
use zone_proto::v1::cluster_server::ClusterServer;
use zone_proto::v1::kv_server::KvServer;
use zone_proto::v1::peer_server::PeerServer;
use zone_proto::v1::{Member, MembersRequest};

use crate::agent::{self, AgentRegistry, AgentService};
use crate::api::{ClusterService, KvService, ServerContext};
use crate::config::Config;
use crate::node::{self, Bootstrap, Stopped};
use crate::peer::PeerService;
use crate::storage::Engine;
use crate::tls::{Gate, Port, ZoneTls};
use crate::transport::{GrpcTransport, MAX_PEER_MESSAGE};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open the data directory {0}")]
    Storage(String, #[source] crate::storage::StorageFailure),
    #[error("cannot start Raft")]
    Start(#[from] node::StartError),
    #[error("invalid peer address")]
    PeerAddress(#[from] tonic::transport::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("node.agent_socket: cannot listen on {path}")]
    AgentSocket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {field} {addr}")]
    Listen {
        field: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC reflection setup failed")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the Raft driver stopped on a storage failure")]
    Driver(#[source] crate::storage::StorageFailure),
    #[error("the Raft driver panicked")]
    DriverPanic,
    #[error("node.join: cannot reach {addr} to join the zone: {reason}")]
    Join { addr: String, reason: String },
    #[error(transparent)]
    Joining(#[from] crate::join::JoinError),
    #[error("node.join: server {id} is not a member of the zone at {addr} (members: {members}); add it first with `zonectl server add --id {id} --name NAME --peer HOST:PORT`")]
    NotAMember {
        id: u64,
        addr: String,
        members: String,
    },
    #[error("this server was removed from the zone (at entry {index}); to rejoin, wipe its data directory and add it again with `zonectl server add`")]
    Removed { index: u64 },
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("the data directory is empty, but server {id} already took part in the zone: server {peer} {evidence}. Founding the zone again would forget this server's votes and what it acknowledged, and could lose committed writes. To bring it back: `zonectl server remove {id}`, then `zonectl server add --id {id} --name NAME --peer HOST:PORT`, and start it with `join` set to a member's client address")]
    WipedFounder {
        id: u64,
        peer: u64,
        evidence: String,
    },
    #[error(transparent)]
    ZoneMismatch(node::zone::ZoneMismatch),
    #[error(transparent)]
    Recovery(#[from] crate::recovery::RecoveryError),
}

async fn listen(field: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Listen {
            field,
            addr,
            source,
        })
}

/// Runs the daemon until a signal or a fatal error; `force_new_zone` is
/// how many times `--force-new-zone` was given (`crate::recovery`).
pub async fn run(config: Config, force_new_zone: u8) -> Result<(), ServeError> {
    let config = Arc::new(config);
    // A new server with a join token and no certificate yet gets one
    // first (`crate::join`).
    let joined = match (&config.node.join, &config.node.join_token) {
        (Some(addr), Some(token)) if !config.tls.dir.join("node.pem").exists() => {
            let token: zone_pki::JoinToken =
                token.parse().map_err(crate::join::JoinError::BadToken)?;
            Some(crate::join::redeem(&config.tls.dir, config.node.id, addr, &token).await?)
        }
        (_, Some(_)) => {
            tracing::info!(
                dir = %config.tls.dir.display(),
                "node.join_token is not used: tls.dir holds this server's certificate already"
            );
            None
        }
        _ => None,
    };
    // Read before anything opens: a missing or wrong certificate is a
    // configuration error, found at start.
    let tls = ZoneTls::load(&config.tls.dir, config.node.id)?;
    if let Some(from) = &config.node.restore_from {
        restore_at_start(&config, &tls, from).await?;
    }
    let engine = Engine::open(&config.node.data_dir)
        .map_err(|e| ServeError::Storage(config.node.data_dir.display().to_string(), e))?;
    let incarnation = engine
        .next_incarnation()
        .map_err(|e| ServeError::Storage(config.node.data_dir.display().to_string(), e))?;
    if force_new_zone > 0 {
        force(&engine, &config, &tls, force_new_zone).await?;
    }

    // Bind first: a port in use must fail before Raft starts campaigning.
    let client_listener = listen("node.client_listen", config.node.client_listen).await?;
    let peer_listener = listen("node.peer_listen", config.node.peer_listen).await?;
    let metrics_listener = match config.metrics_addr() {
        Some(addr) => Some(listen("metrics.listen", addr).await?),
        None => None,
    };
    let metrics_engine = engine.clone();
    let space_engine = engine.clone();

    let start_as = node::start_as(&engine, &config)
        .map_err(|e| ServeError::Storage(config.node.data_dir.display().to_string(), e))?;
    if start_as == node::StartAs::Founder {
        refuse_if_wiped(&config, &tls).await?;
    }
    let bootstrap = match (start_as, &config.node.join) {
        (node::StartAs::Joiner, Some(addr)) => match joined {
            // The member that signed sent the membership.
            Some(members) => Bootstrap::Join(members),
            None => Bootstrap::Join(join_members(addr, config.node.id, &tls).await?),
        },
        // A member's stored membership wins; this is only its fallback.
        _ => Bootstrap::Voters(founders(&config)),
    };
    let inbox = node::Inbox::default();
    let transport = Arc::new(GrpcTransport::new(
        config.node.id,
        tokio::runtime::Handle::current(),
        inbox.reports(),
        tls.clone(),
    ));
    let (node, driver) = match node::start(&config, engine, inbox, transport.clone(), bootstrap) {
        Err(node::StartError::Removed { index }) => return Err(ServeError::Removed { index }),
        Err(node::StartError::ZoneMismatch(m)) => return Err(ServeError::ZoneMismatch(m)),
        other => other?,
    };
    let agents = Arc::new(AgentRegistry::default());
    std::sync::LazyLock::force(&agent::STARTED);
    let zone = ServerContext::new(
        node.clone(),
        transport,
        config.clone(),
        agents.clone(),
        incarnation,
    );

    // SERVING only while this server is a member, knows a leader and has
    // applied its log (`crate::health`): NOT_SERVING until then.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    crate::health::mark(config.node.serving_file.as_deref(), false);
    // Before the agent socket serves: the first lease state an agent gets
    // carries the zone's leader-only units as this server applied them
    // (then re-read every second by `services::run`), and whether it
    // manages extensions at all.
    match crate::api::services::read(zone.reader()) {
        Ok(s) => agents.set_leader_units(s.map(|(s, _)| s.leader_units)),
        Err(e) => tracing::warn!(error = %e, "cannot read the zone's services yet"),
    }
    if config.extensions.dir.as_os_str().is_empty() {
        agents.set_extensions_ready(true);
    }
    tokio::spawn(crate::health::run(
        node.clone(),
        health,
        config.node.serving_file.clone(),
    ));
    if let Some(listener) = metrics_listener {
        let addr = listener.local_addr().ok();
        tracing::info!(addr = ?addr, "serving metrics on /metrics");
        let node = node.clone();
        tokio::spawn(crate::metrics::serve(listener, node, metrics_engine));
    }
    let reflection = reflection_builder().build_v1()?;
    // Python's grpcio-reflection and several GUI clients speak v1alpha only.
    let reflection_alpha = reflection_builder().build_v1alpha()?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let max_client = config.limits.max_value_bytes * 2 + config.limits.max_key_bytes + (1 << 20);
    // Every user call is checked against the revocations this server has
    // applied (`api::users`).
    let revoked: crate::tls::Revoked = {
        let zone = zone.clone();
        Arc::new(move |serial: &str| crate::api::users::is_revoked(&zone, serial))
    };
    // Keepalives find a client whose connection died without a word (a
    // cut cable, a host powered off): its watches and journal streams
    // (`zonectl logs -f`, a journalctl each, a few at most) end within a
    // minute instead of never.
    let client_server = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .layer(Gate {
            port: Port::Client,
            revoked,
        })
        .layer(crate::metrics::Measure)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(
            KvServer::new(KvService(zone.clone()))
                .max_decoding_message_size(max_client)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(ClusterServer::new(ClusterService(zone.clone())))
        .add_service(zone_proto::v1::config_server::ConfigServer::new(
            crate::api::ConfigService::new(zone.clone(), config.files_policy()),
        ))
        .add_service(zone_proto::v1::storage_server::StorageServer::new(
            crate::api::StorageService::new(zone.clone()),
        ))
        .add_service(zone_proto::v1::upgrade_server::UpgradeServer::new(
            crate::api::UpgradeService::new(zone.clone()),
        ))
        .add_service(zone_proto::v1::extensions_server::ExtensionsServer::new(
            crate::api::ExtensionsService::new(zone.clone()),
        ))
        .add_service(zone_proto::v1::services_server::ServicesServer::new(
            crate::api::ServicesService::new(zone.clone()),
        ))
        .add_service(zone_proto::v1::users_server::UsersServer::new(
            crate::api::UsersService::new(zone.clone(), tls.zone_ca()),
        ))
        .add_service(
            zone_proto::v1::join_server::JoinServer::new(crate::api::JoinService::new(
                zone.clone(),
                tls.ca_fingerprint(),
                tls.zone_ca(),
            ))
            // Anyone may call Join (a token is the credential): what
            // they send is read only up to a size no request needs.
            .max_decoding_message_size(16 * 1024),
        )
        .serve_with_incoming_shutdown(
            crate::tls::incoming(client_listener, tls.acceptor(Port::Client)?),
            stopped(stop_rx.clone()),
        );
    let peer_server = Server::builder()
        .layer(Gate {
            port: Port::Peer,
            revoked: Arc::new(|_: &str| false),
        })
        .add_service(
            PeerServer::new(PeerService(zone.clone()))
                .max_decoding_message_size(MAX_PEER_MESSAGE)
                .max_encoding_message_size(MAX_PEER_MESSAGE),
        )
        .serve_with_incoming_shutdown(
            crate::tls::incoming(peer_listener, tls.acceptor(Port::Peer)?),
            stopped(stop_rx.clone()),
        );
    let client_task = tokio::spawn(client_server);
    let peer_task = tokio::spawn(peer_server);
    let agent_task = if config.node.agent_socket.as_os_str().is_empty() {
        None
    } else {
        let path = &config.node.agent_socket;
        let listener = agent::bind(path).map_err(|source| ServeError::AgentSocket {
            path: path.display().to_string(),
            source,
        })?;
        // Half the time between the lease's end and the earliest moment
        // another server can be elected (the margin less the tick that a
        // busy follower may lose; see `Config::validate`).
        let grace_ms = config
            .raft
            .lease_margin_ms
            .saturating_sub(config.raft.tick_ms)
            / 2;
        tokio::spawn(agent::fence(
            node.clone(),
            agents.clone(),
            std::time::Duration::from_millis(grace_ms.max(1)),
        ));
        // Local agents: zone-vip's lease, and zone-sync's reads and
        // reports (the key-value and cluster services as on the client
        // port). Only root reaches the socket (mode 0600): whoever does
        // could read this server's keys anyway, so no certificate is asked.
        let server = Server::builder()
            .add_service(AgentServer::new(AgentService::new(node.clone(), agents)))
            .add_service(
                KvServer::new(KvService(zone.clone()))
                    .max_decoding_message_size(max_client)
                    .max_encoding_message_size(usize::MAX),
            )
            .add_service(ClusterServer::new(ClusterService(zone.clone())))
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(listener),
                stopped(stop_rx.clone()),
            );
        Some(tokio::spawn(server))
    };

    tracing::info!(
        id = config.node.id,
        name = %config.node.name,
        client = %config.node.client_listen,
        peer = %config.node.peer_listen,
        data_dir = %config.node.data_dir.display(),
        "zoned started"
    );
    tokio::spawn(crate::renew::run(zone.clone(), tls.clone()));
    node.reader()
        .compactor()
        .set_keep(crate::node::disk_hard_floor(config.limits.min_free_disk_mb));
    tokio::spawn(crate::space::run(
        zone.clone(),
        space_engine,
        config.node.data_dir.clone(),
        crate::space::Thresholds::from_limits(&config.limits),
    ));
    tokio::spawn(crate::api::handover::run(zone.clone()));
    tokio::spawn(crate::api::upgrade::settle(zone.clone()));
    tokio::spawn(crate::api::extensions::follow(zone.clone()));
    tokio::spawn(crate::api::services::run(zone.clone()));
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(period) = sd_notify::watchdog_enabled() {
        tokio::spawn(watchdog(node.clone(), period));
    }

    // Wait for a signal, or for the driver to die on its own.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ServeError::Signals)?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(ServeError::Signals)?;
    let driver = tokio::task::spawn_blocking(move || driver.join());
    tokio::pin!(driver);
    let driver_result = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: stopping"); None }
        _ = int.recv() => { tracing::info!("SIGINT: stopping"); None }
        r = &mut driver => Some(r),
    };
    if driver_result.is_none() {
        // A planned stop of the leader costs clients no election timeout.
        zone.hand_over_leadership().await;
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    node.shutdown();
    let joined = match driver_result {
        Some(r) => r,
        None => driver.await,
    };
    // Long-lived streams (watches, peers' Raft streams) keep the servers
    // open; the data is already flushed, so give answers in flight a moment
    // and go.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(300), async {
        let _ = client_task.await;
        let _ = peer_task.await;
        if let Some(t) = agent_task {
            let _ = t.await;
        }
    })
    .await;
    match joined {
        Ok(Ok(Ok(Stopped::Shutdown))) => {
            tracing::info!("zoned stopped cleanly");
            Ok(())
        }
        Ok(Ok(Ok(Stopped::Removed { index }))) => Err(ServeError::Removed { index }),
        Ok(Ok(Ok(Stopped::ZoneMismatch(m)))) => Err(ServeError::ZoneMismatch(m)),
        Ok(Ok(Err(e))) => Err(ServeError::Driver(e)),
        _ => Err(ServeError::DriverPanic),
    }
}

/// The founding members, from the configured initial voters.
pub(crate) fn founders(config: &Config) -> Vec<Member> {
    config
        .voters
        .iter()
        .map(|v| Member {
            id: v.id,
            name: if v.id == config.node.id {
                config.node.name.clone()
            } else if v.name.is_empty() {
                format!("zone-{}", v.id)
            } else {
                v.name.clone()
            },
            peer_endpoint: v.peer.clone(),
            learner: false,
        })
        .collect()
}

/// The services the client port serves, as reflection lists them (not
/// the peer port's, nor the agent socket's, though their descriptors are
/// in the same file set).
pub const CLIENT_SERVICES: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    zone_proto::v1::kv_server::SERVICE_NAME,
    zone_proto::v1::cluster_server::SERVICE_NAME,
    zone_proto::v1::config_server::SERVICE_NAME,
    zone_proto::v1::storage_server::SERVICE_NAME,
    zone_proto::v1::users_server::SERVICE_NAME,
    zone_proto::v1::join_server::SERVICE_NAME,
];

/// gRPC reflection over the client port's services ([`CLIENT_SERVICES`]).
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    CLIENT_SERVICES.iter().fold(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(zone_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
        |b, name| b.with_service_name(*name),
    )
}

/// `--force-new-zone`, said loudly: on the console and in the journal.
async fn force(
    engine: &Engine,
    config: &Config,
    tls: &ZoneTls,
    times: u8,
) -> Result<(), ServeError> {
    let Some(f) = crate::recovery::force_new_zone(engine, config, tls, times).await? else {
        return Ok(());
    };
    let ids = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    let text = format!(
        "FORCED A NEW CONFIGURATION: server {id} is now the only voter of its zone (voters were {voters}{learners}); \
         {committed}, {voided} unapplied membership change(s) voided. \
         Every other server of the old zone must stay stopped and have its data directory wiped; add servers back \
         with `zonectl server add`. Remove --force-new-zone from this server's command line now",
        id = config.node.id,
        voters = ids(&f.voters_before),
        learners = if f.learners_before.is_empty() {
            String::new()
        } else {
            format!(", learners {}", ids(&f.learners_before))
        },
        committed = if f.last > f.committed_before {
            format!(
                "entries {}..={} of its log taken as committed",
                f.committed_before + 1,
                f.last
            )
        } else {
            format!("its log committed to its end ({})", f.last)
        },
        voided = f.voided.len(),
    );
    eprintln!("zoned: WARNING: {text}");
    tracing::warn!("{text}");
    Ok(())
}

/// How long a blank founder waits for each other founder's answer.
const WIPED_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Safety: a founder with an empty data directory may be one whose data
/// was wiped (a reflashed disk). Founding again, it would forget its votes
/// and the entries it acknowledged: with one other server lagging, a
/// committed write could be lost. So before founding, it asks the other
/// founders what they know of it:
/// - every server's store records the servers that took part, those a
///   leader saw acknowledge an entry past the bootstrap (`node::zone`);
/// - a leader also knows from its progress, before that record commits.
///
/// A founder that merely starts late (never ran) is in neither, and
/// founds: it gets the zone's data from the leader. Best effort: a founder
/// that does not answer within [`WIPED_CHECK_TIMEOUT`] is skipped (at the
/// zone's first start the others are not serving yet); with every other
/// founder down, a wiped founder cannot be told from a new one. Left open:
/// a server wiped within a tick or so of its first acknowledgement, before
/// the leader recorded it.
async fn refuse_if_wiped(config: &Config, tls: &ZoneTls) -> Result<(), ServeError> {
    let me = config.node.id;
    let asks = config
        .voters
        .iter()
        .filter(|v| v.id != me)
        .map(|v| async move {
            let r =
                crate::transport::ask_node_status(v.id, &v.peer, tls, WIPED_CHECK_TIMEOUT).await?;
            let zone = r
                .server
                .as_ref()
                .map(|s| s.zone_id.clone())
                .unwrap_or_default();
            let evidence = if r.took_part.contains(&me) {
                format!("records it among the servers that took part in zone {zone}")
            } else {
                let matched = r.progress.iter().find(|p| p.id == me)?.match_index;
                if matched <= crate::storage::BOOTSTRAP_INDEX {
                    return None;
                }
                format!("leads, and has it acknowledging entries up to {matched}")
            };
            Some(ServeError::WipedFounder {
                id: me,
                peer: v.id,
                evidence,
            })
        });
    match futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .next()
    {
        Some(refusal) => Err(refusal),
        None => Ok(()),
    }
}

/// `node.restore_from`, the appliance's route to a restore (the identity
/// names a backup on the EFI partition): with no store in the data
/// directory, builds it from the backup as `zoned restore` does; with one,
/// touches nothing.
///
/// Safety: the field may stay in the identity long after the restore. A
/// founder whose data partition is later replaced must not come back from
/// that old backup: it would have forgotten its vote and the entries it
/// acknowledged, and the restored store's Raft state would let it answer as
/// a member. So the wiped-founder check runs first, as for a blank founder:
/// a member that records this server as having taken part refuses it
/// (exit 2). Founders restored together, none of them started yet, pass.
async fn restore_at_start(
    config: &Arc<Config>,
    tls: &ZoneTls,
    from: &std::path::Path,
) -> Result<(), ServeError> {
    if config.node.data_dir.join("db").exists() {
        tracing::warn!(
            from = %from.display(),
            "node.restore_from ignored: a store is in place"
        );
        return Ok(());
    }
    refuse_if_wiped(config, tls).await?;
    tracing::warn!(
        from = %from.display(),
        "no store in the data directory: building it from the backup named by node.restore_from"
    );
    // Before READY: a large backup may take longer than systemd's start
    // timeout (zoned.service: 120 s).
    let _ = sd_notify::notify(&[sd_notify::NotifyState::ExtendTimeoutUsec(1_800_000_000)]);
    let (config2, from2) = (config.clone(), from.to_owned());
    let r =
        tokio::task::spawn_blocking(move || crate::recovery::restore(&config2, &from2, |_, _| {}))
            .await
            .map_err(|e| crate::recovery::RecoveryError::Io {
                dir: config.node.data_dir.display().to_string(),
                what: "the restore stopped",
                source: std::io::Error::other(e.to_string()),
            })??;
    tracing::warn!(
        keys = r.summary.keys,
        revision = r.summary.header.revision,
        zone = %r.summary.header.zone_id,
        sha256 = %r.summary.sha256,
        db = %r.db.display(),
        "restored from the backup: this server is a founder of a new zone (every founder must be restored from the same file)"
    );
    Ok(())
}

/// Asks a member of the zone for the membership, and checks this server
/// was added to it.
async fn join_members(addr: &str, id: u64, tls: &ZoneTls) -> Result<Vec<Member>, ServeError> {
    let err = |reason: String| ServeError::Join {
        addr: addr.to_owned(),
        reason,
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| err(e.to_string()))?
        .tls_config(tls.to_any_server())
        .map_err(|e| err(e.to_string()))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| err(crate::logging::chain(&e)))?;
    let mut req = tonic::Request::new(MembersRequest {});
    req.set_timeout(std::time::Duration::from_secs(5));
    let members = ClusterClient::new(channel)
        .members(req)
        .await
        .map_err(|s| err(s.message().to_owned()))?
        .into_inner()
        .members;
    if !members.iter().any(|m| m.id == id) {
        return Err(ServeError::NotAMember {
            id,
            addr: addr.to_owned(),
            members: members
                .iter()
                .map(|m| m.id.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    tracing::info!(
        via = addr,
        members = members.len(),
        "joining the zone; waiting for the leader"
    );
    Ok(members)
}

/// Pets systemd's watchdog (`WatchdogSec=`) three times per period, but only
/// while the Raft driver answers: a wedged driver gets the process restarted
/// by systemd, and with it the VIP released by zone-vip.
async fn watchdog(node: crate::node::NodeHandle, period: Duration) {
    let every = period / 3;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match tokio::time::timeout(every, node.status()).await {
            Ok(Ok(_)) => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "watchdog: the Raft driver failed to answer"),
            Err(_) => tracing::warn!(
                waited_ms = every.as_millis() as u64,
                "watchdog: the Raft driver did not answer in time"
            ),
        }
    }
}
