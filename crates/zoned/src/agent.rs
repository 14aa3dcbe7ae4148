//! The local agent API on a unix socket: the leader lease, streamed to
//! agents such as `zone-vip`, and their acknowledgements.
//!
//! Only processes on this host can reach it (the socket is mode 0600 in a
//! 0750 directory). Every agent stream gets the current lease at once and
//! every change after; the agent answers each state with what it did
//! (still acting as leader or not). Before a planned leadership transfer the
//! lease is revoked and [`AgentRegistry::wait_released`] waits until every
//! connected agent has let go, so the next leader's agent never overlaps.
//! [`fence`] removes the addresses of an agent that does not let go when
//! the lease ends.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use zone_proto::v1::{
    agent_server::Agent, HeldAddress, LeaseAck, LeaseState, StorageHealth, StorageReport,
    StorageReportAck,
};

use crate::node::{Lease, NodeHandle};

/// How long an agent has to declare its addresses once connected.
const DECLARATION_TIMEOUT: Duration = Duration::from_secs(5);

/// A storage report older than this is not zone-mounts' word any more: it
/// reports every couple of seconds whatever its probes' intervals.
pub const STORAGE_REPORT_STALE: Duration = Duration::from_secs(10);

/// When this process started, near enough (forced when the registry is
/// made): the age of a storage report never received.
pub static STARTED: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

/// What each connected agent last acknowledged, and zone-mounts' last
/// storage report.
#[derive(Debug, Default)]
pub struct AgentRegistry {
    next_id: AtomicU64,
    acks: Mutex<HashMap<u64, LeaseAck>>,
    changed: Notify,
    storage: Mutex<Option<(StorageReport, std::time::Instant)>>,
    /// Whether this server's required datastores are healthy, as
    /// [`crate::api::handover::run`] last worked out (every second): the
    /// lease stream only loads it, adding nothing between a lease's renewal
    /// and its delivery to the agents.
    storage_ready: std::sync::atomic::AtomicBool,
    /// Whether every system extension the zone wants is merged here (or
    /// this server does not manage extensions), as
    /// [`crate::api::extensions::follow`] last found: false until it says.
    extensions_ready: std::sync::atomic::AtomicBool,
    /// The zone's leader-only units (None: the zone sets none), as
    /// [`crate::api::services::run`] last read them: the lease stream only
    /// copies them.
    leader_units: Mutex<Option<Vec<String>>>,
    /// How systemd last said the zone's units are doing here.
    units_seen: Mutex<crate::api::services::UnitsSeen>,
}

impl AgentRegistry {
    /// This server's datastores as zone-mounts last reported them.
    pub fn storage(&self) -> StorageHealth {
        match &*self.storage.lock().expect("storage poisoned") {
            None => StorageHealth {
                age_ms: STARTED.elapsed().as_millis() as u64,
                ..StorageHealth::default()
            },
            Some((report, at)) => {
                let age = at.elapsed();
                StorageHealth {
                    reported: age < STORAGE_REPORT_STALE,
                    age_ms: age.as_millis() as u64,
                    datastores: report.datastores.clone(),
                    unmounting: report.unmounting.clone(),
                }
            }
        }
    }

    pub fn set_storage_ready(&self, ready: bool) {
        self.storage_ready.store(ready, Ordering::Release);
    }

    fn storage_ready(&self) -> bool {
        self.storage_ready.load(Ordering::Acquire)
    }

    pub fn set_extensions_ready(&self, ready: bool) {
        self.extensions_ready.store(ready, Ordering::Release);
    }

    pub fn extensions_ready(&self) -> bool {
        self.extensions_ready.load(Ordering::Acquire)
    }

    pub fn set_leader_units(&self, units: Option<Vec<String>>) {
        let mut l = self.leader_units.lock().expect("leader_units poisoned");
        if *l != units {
            tracing::info!(units = ?units, "the zone's leader-only units (None: each identity's)");
            *l = units;
        }
    }

    fn leader_units(&self) -> Option<Vec<String>> {
        self.leader_units
            .lock()
            .expect("leader_units poisoned")
            .clone()
    }

    pub fn set_units_seen(&self, seen: crate::api::services::UnitsSeen) {
        *self.units_seen.lock().expect("units_seen poisoned") = seen;
    }

    /// The zone's units here, for this server's status.
    pub fn units_status(&self) -> Vec<zone_proto::v1::UnitStatus> {
        self.units_seen
            .lock()
            .expect("units_seen poisoned")
            .status()
    }

    fn report_storage(&self, report: StorageReport) {
        *self.storage.lock().expect("storage poisoned") = Some((report, std::time::Instant::now()));
    }

    fn register(&self) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.acks.lock().expect("acks poisoned").insert(
            id,
            LeaseAck {
                generation: 0,
                holding: true,
                addresses: Vec::new(),
            },
        );
        id
    }

    fn ack(&self, id: u64, ack: LeaseAck) {
        if let Some(slot) = self.acks.lock().expect("acks poisoned").get_mut(&id) {
            *slot = ack;
        }
        self.changed.notify_waiters();
    }

    fn unregister(&self, id: u64) {
        self.acks.lock().expect("acks poisoned").remove(&id);
        self.changed.notify_waiters();
    }

    /// The agents that have not acknowledged letting go of lease
    /// `generation` (or a later one), with their addresses.
    fn not_released(&self, generation: u64) -> Vec<(u64, Vec<HeldAddress>)> {
        self.acks
            .lock()
            .expect("acks poisoned")
            .iter()
            .filter(|(_, a)| a.holding || a.generation < generation)
            .map(|(id, a)| (*id, a.addresses.clone()))
            .collect()
    }

    /// zoned removed agent `id`'s addresses: it holds nothing any more, as
    /// of lease `generation`.
    fn fenced(&self, id: u64, generation: u64) {
        if let Some(slot) = self.acks.lock().expect("acks poisoned").get_mut(&id) {
            slot.holding = false;
            slot.generation = slot.generation.max(generation);
        }
        self.changed.notify_waiters();
    }

    /// The addresses the agents hold now, as they last acknowledged
    /// (`address/prefix`, sorted): where the VIP is, for `zonectl show`.
    pub fn vips_held(&self) -> Vec<String> {
        let mut held: Vec<String> = self
            .acks
            .lock()
            .expect("acks poisoned")
            .values()
            .filter(|a| a.holding)
            .flat_map(|a| a.addresses.iter())
            .map(|h| format!("{}/{}", h.address, h.prefix))
            .collect();
        held.sort();
        held.dedup();
        held
    }

    pub fn connected(&self) -> usize {
        self.acks.lock().expect("acks poisoned").len()
    }

    /// Waits until every connected agent acknowledged `generation` (or a
    /// later one) without holding. Returns false on timeout.
    pub async fn wait_released(&self, generation: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            let done = self
                .acks
                .lock()
                .expect("acks poisoned")
                .values()
                .all(|a| a.generation >= generation && !a.holding);
            if done {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }
}

fn state(server_id: u64, l: &Lease, registry: &AgentRegistry) -> LeaseState {
    let units = registry.leader_units();
    LeaseState {
        leader_units_set: units.is_some(),
        leader_units: units.unwrap_or_default(),
        storage_not_ready: !registry.storage_ready(),
        extensions_not_ready: !registry.extensions_ready(),
        server_id,
        held: l.held,
        term: l.term,
        expires_boottime_ns: l.expires_ns,
        generation: l.generation,
        leader_id: l.leader_id,
        round_sent_boottime_ns: l.round_sent_ns,
    }
}

/// `zone.v1.Agent`.
#[derive(Debug, Clone)]
pub struct AgentService {
    node: NodeHandle,
    registry: Arc<AgentRegistry>,
}

impl AgentService {
    pub fn new(node: NodeHandle, registry: Arc<AgentRegistry>) -> AgentService {
        AgentService { node, registry }
    }
}

type LeaseStream = Pin<Box<dyn Stream<Item = Result<LeaseState, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    type LeaseStream = LeaseStream;

    async fn report_storage(
        &self,
        req: Request<StorageReport>,
    ) -> Result<Response<StorageReportAck>, Status> {
        self.registry.report_storage(req.into_inner());
        Ok(Response::new(StorageReportAck {}))
    }

    async fn report_figures(
        &self,
        req: Request<zone_proto::v1::AgentFigures>,
    ) -> Result<Response<zone_proto::v1::AgentFiguresAck>, Status> {
        let r = req.into_inner();
        for f in &r.figures {
            crate::metrics::METRICS.agent_figure(&r.agent, &f.name, f.value);
        }
        Ok(Response::new(zone_proto::v1::AgentFiguresAck {}))
    }

    async fn lease(
        &self,
        req: Request<Streaming<LeaseAck>>,
    ) -> Result<Response<LeaseStream>, Status> {
        let mut acks = req.into_inner();
        let id = self.registry.register();
        let registry = self.registry.clone();
        let mut lease: watch::Receiver<Lease> = self.node.watch_lease();
        let server_id = self.node.id();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            // No lease state before the agent declared its addresses: the
            // fence must know them before the agent can hold any.
            let declared = tokio::time::timeout(DECLARATION_TIMEOUT, acks.message()).await;
            let declared = match declared {
                Ok(Ok(Some(a))) => {
                    tracing::info!(agent = id, addresses = a.addresses.len(), "agent connected");
                    registry.ack(id, a);
                    true
                }
                Ok(Err(e)) => {
                    tracing::warn!(agent = id, error = %e, "agent stream failed before its declaration");
                    false
                }
                Ok(Ok(None)) | Err(_) => {
                    tracing::warn!(
                        agent = id,
                        "agent did not declare its addresses; closing its stream"
                    );
                    let _ = tx
                        .send(Err(Status::invalid_argument(
                            "LeaseAck: the first message must declare the agent's addresses (generation 0, not holding)",
                        )))
                        .await;
                    false
                }
            };
            // Whether the required datastores are healthy here, asked
            // afresh for every state sent (every renewal).
            // The lease is copied out first: a borrow of the watch holds
            // its lock, and the Raft driver's thread waits on that lock to
            // publish the next renewal; nothing slower than a copy may run
            // under it (reading the store there let leases lapse under
            // QEMU's emulation). Nor between a renewal and its delivery:
            // the storage's readiness is worked out elsewhere, only loaded.
            let l = *lease.borrow_and_update();
            let first = state(server_id, &l, &registry);
            if declared && tx.send(Ok(first)).await.is_ok() {
                loop {
                    tokio::select! {
                        changed = lease.changed() => {
                            if changed.is_err() {
                                let _ = tx.send(Err(Status::unavailable("server is shutting down"))).await;
                                break;
                            }
                            let l = *lease.borrow_and_update();
                            let s = state(server_id, &l, &registry);
                            if tx.send(Ok(s)).await.is_err() {
                                break;
                            }
                        }
                        ack = acks.message() => match ack {
                            Ok(Some(a)) => registry.ack(id, a),
                            _ => break,
                        },
                        _ = tx.closed() => break,
                    }
                }
            }
            registry.unregister(id);
            tracing::info!(agent = id, "agent disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn if_addr(a: &HeldAddress) -> Option<zone_addr::IfAddr> {
    Some(zone_addr::IfAddr {
        interface: a.interface.clone(),
        address: a.address.parse().ok()?,
        prefix: u8::try_from(a.prefix).ok()?,
    })
}

/// zoned's fence against an agent that cannot let go of the VIP.
///
/// Safety: an agent holds the VIP only within this server's lease and
/// acknowledges letting go when the lease ends (on its own timer) or is
/// revoked. An agent that is frozen (SIGSTOP, or stuck in a system call)
/// does neither, and the next leader adds the VIP as soon as it is elected:
/// no sooner than `raft.lease_margin_ms` less one tick after this lease
/// ended, as followers refuse votes until then (see `node::lease` and
/// `Config::validate`). So `grace` after the lease ends (half that time),
/// this task removes, itself,
/// the addresses that any agent still reports holding, and counts that
/// agent as released. What this cannot cover, a host whose zoned is frozen
/// as well, is left to the kernel lifetime the agent puts on each address
/// (see `zone_addr`).
pub async fn fence(node: NodeHandle, registry: Arc<AgentRegistry>, grace: Duration) {
    let mut lease = node.watch_lease();
    let grace_ns = grace.as_nanos() as u64;
    let mut netlink: Option<zone_addr::Netlink> = None;
    let timer = zone_proto::BootTimer::new();
    if !timer.is_boottime() {
        tracing::error!("fence: no CLOCK_BOOTTIME timer; using the monotonic clock");
    }
    // The last lease state in which this server held the lease: an agent
    // can only be holding because of it or an earlier one.
    let mut last_held: Option<u64> = None;
    loop {
        let l = *lease.borrow_and_update();
        if l.held {
            last_held = Some(l.generation);
        }
        let Some(held_generation) = last_held else {
            // Never held since this zoned started: no agent holds anything.
            if lease.changed().await.is_err() {
                return;
            }
            continue;
        };
        let now = zone_proto::boottime_ns();
        let due = if l.held { l.expires_ns.max(now) } else { now } + grace_ns;
        tokio::select! {
            changed = lease.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            _ = timer.sleep_until(due) => {}
        }
        let l = *lease.borrow();
        if l.held && l.expires_ns > zone_proto::boottime_ns() {
            continue;
        }
        for (id, addresses) in registry.not_released(held_generation) {
            if netlink.is_none() && !addresses.is_empty() {
                match zone_addr::Netlink::open() {
                    Ok(n) => netlink = Some(n),
                    Err(e) => {
                        tracing::error!(error = %e, "fence: cannot open netlink");
                        break;
                    }
                }
            }
            for a in &addresses {
                let nl = netlink.as_ref().expect("opened above");
                let Some(a) = if_addr(a) else {
                    tracing::error!(agent = id, address = ?a, "fence: an agent declared an address that is not one");
                    continue;
                };
                match nl.remove(&a).await {
                    Ok(()) => tracing::warn!(
                        agent = id,
                        address = %a,
                        grace_ms = grace.as_millis() as u64,
                        "the agent did not let go after the lease ended: removed its address"
                    ),
                    Err(e) => {
                        tracing::error!(agent = id, address = %a, error = %e, "fence: cannot remove the address")
                    }
                }
            }
            registry.fenced(id, l.generation.max(held_generation));
        }
        last_held = None;
        if lease.changed().await.is_err() {
            return;
        }
    }
}

/// Binds the agent socket: a 0750 directory, a 0600 socket, any stale
/// socket file from a previous run replaced.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
