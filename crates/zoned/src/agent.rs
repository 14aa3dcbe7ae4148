//! The local agent API on a unix socket: the leader lease, streamed to
//! agents such as `zone-vip`, and their acknowledgements.
//!
//! Only processes on this host can reach it (the socket is mode 0600 in a
//! 0750 directory). Every agent stream gets the current lease at once and
//! every change after; the agent answers each state with what it did
//! (still acting as leader or not). Before a planned leadership transfer the
//! lease is revoked and [`AgentRegistry::wait_released`] waits until every
//! connected agent has let go, so the next leader's agent never overlaps.

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
use zone_proto::v1::{agent_server::Agent, LeaseAck, LeaseState};

use crate::node::{Lease, NodeHandle};

/// What each connected agent last acknowledged.
#[derive(Debug, Default)]
pub struct AgentRegistry {
    next_id: AtomicU64,
    acks: Mutex<HashMap<u64, LeaseAck>>,
    changed: Notify,
}

impl AgentRegistry {
    fn register(&self) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.acks.lock().expect("acks poisoned").insert(
            id,
            LeaseAck {
                generation: 0,
                holding: true,
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

fn state(server_id: u64, l: &Lease) -> LeaseState {
    LeaseState {
        server_id,
        held: l.held,
        term: l.term,
        expires_monotonic_ns: l.expires_ns,
        generation: l.generation,
        leader_id: l.leader_id,
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
            tracing::info!(agent = id, "agent connected");
            let first = state(server_id, &lease.borrow_and_update());
            if tx.send(Ok(first)).await.is_ok() {
                loop {
                    tokio::select! {
                        changed = lease.changed() => {
                            if changed.is_err() {
                                let _ = tx.send(Err(Status::unavailable("server is shutting down"))).await;
                                break;
                            }
                            let s = state(server_id, &lease.borrow_and_update());
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
