//! Raft traffic between servers over gRPC, on the peer port.
//!
//! Sending: one task per peer owns a client-streaming `Peer.Raft` call whose
//! body takes, at each poll, whatever messages queued up meanwhile. When the call
//! breaks, queued messages are dropped (Raft retransmits), the peer is
//! reported unreachable so Raft stops pipelining to it, and the task
//! reconnects with exponential backoff. Snapshots go in their own
//! `Peer.Snapshot` call, in chunks, and their outcome is reported to Raft.
//! `send` never blocks the driver thread.
//!
//! Receiving: [`PeerService`] decodes each message and steps it into the
//! local driver. Messages are rust-protobuf `eraftpb` bytes (RUSTSEC-2024-0437:
//! a crafted message can exhaust the stack while parsing). Only the zone's
//! servers reach the parser ([`crate::tls`]), each only with messages from
//! its own id, and only while it is a member.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use protobuf::Message as PbMessage;
use raft::eraftpb::{Message, MessageType};
use raft::SnapshotStatus;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Response, Status, Streaming};
use zone_proto::v1::peer_client::PeerClient;
use zone_proto::v1::{Member, RaftAck, RaftBatch, RemovedNotice, SnapshotAck, SnapshotChunk};

use crate::node::{NodeHandle, PeerReports, Transport};
use crate::tls::ZoneTls;

/// Largest gRPC message on the peer port.
pub const MAX_PEER_MESSAGE: usize = 256 << 20;
/// A batch is closed at this many encoded bytes or messages.
const BATCH_BYTES: usize = 8 << 20;
const BATCH_MESSAGES: usize = 1024;
const SNAPSHOT_CHUNK: usize = 1 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A lazily connected client for peer `id`, shared by the Raft stream,
/// snapshots, forwarded writes and status calls. The peer's certificate
/// must name `id`.
pub fn peer_client(
    id: u64,
    addr: &str,
    tls: &ZoneTls,
) -> Result<PeerClient<Channel>, tonic::transport::Error> {
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls.to_server(id))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy();
    Ok(PeerClient::new(channel)
        .max_decoding_message_size(MAX_PEER_MESSAGE)
        .max_encoding_message_size(MAX_PEER_MESSAGE))
}

/// Server `id`'s own status (`Peer.NodeStatus`) at `addr`, or None when it
/// does not answer within `timeout`: asked at start by a founder whose
/// data directory is empty and by `--force-new-zone`.
pub async fn ask_node_status(
    id: u64,
    addr: &str,
    tls: &ZoneTls,
    timeout: Duration,
) -> Option<zone_proto::v1::NodeStatusResponse> {
    let mut client = peer_client(id, addr, tls).ok()?;
    let mut req = tonic::Request::new(zone_proto::v1::NodeStatusRequest {});
    req.set_timeout(timeout);
    let r = tokio::time::timeout(timeout, client.node_status(req))
        .await
        .ok()?
        .ok()?;
    Some(r.into_inner())
}

/// One peer: its address, the queue its sender task drains, and a client
/// for the other peer calls.
#[derive(Debug)]
struct Link {
    addr: String,
    queue: mpsc::UnboundedSender<Message>,
    client: PeerClient<Channel>,
}

/// The driver's [`Transport`] over gRPC. Links follow the membership:
/// [`Transport::set_peers`] opens links to new members and closes those of
/// removed ones (their sender tasks end when their queue closes).
#[derive(Debug)]
pub struct GrpcTransport {
    self_id: u64,
    links: RwLock<HashMap<u64, Link>>,
    /// Every member's id, this server's included, as of the last
    /// [`Transport::set_peers`]: whom the peer port hears.
    members: RwLock<BTreeSet<u64>>,
    /// Senders this server does not count as members yet, that another
    /// member's applied membership has (see [`check_member`]); forgotten
    /// at the next [`Transport::set_peers`].
    vouched: Arc<RwLock<BTreeMap<u64, Member>>>,
    /// When each unknown sender was last asked about (one question a
    /// second per sender).
    asked: Mutex<HashMap<u64, std::time::Instant>>,
    tls: ZoneTls,
    reports: PeerReports,
    runtime: tokio::runtime::Handle,
}

impl GrpcTransport {
    /// Tasks run on `runtime`; what becomes of peers and snapshots goes to
    /// the driver through `reports`.
    pub fn new(
        self_id: u64,
        runtime: tokio::runtime::Handle,
        reports: PeerReports,
        tls: ZoneTls,
    ) -> GrpcTransport {
        GrpcTransport {
            self_id,
            links: RwLock::new(HashMap::new()),
            members: RwLock::new(BTreeSet::new()),
            vouched: Arc::default(),
            asked: Mutex::new(HashMap::new()),
            tls,
            reports,
            runtime,
        }
    }

    /// When this server's node certificate expires (Unix seconds).
    pub fn cert_expires_unix(&self) -> i64 {
        self.tls.cert_expires_unix()
    }

    /// This server's certificates.
    pub fn tls(&self) -> &ZoneTls {
        &self.tls
    }

    /// Reopens every link to a peer: after this server's certificate was
    /// renewed (a link's channel would reconnect with the certificate it
    /// was made with, which expires). What was queued on the old links is
    /// dropped; Raft sends it again.
    pub fn relink(&self) {
        let _guard = self.runtime.enter();
        let mut links = self.links.write().expect("links poisoned");
        let old: Vec<Member> = links
            .iter()
            .map(|(id, l)| Member {
                id: *id,
                peer_endpoint: l.addr.clone(),
                ..Member::default()
            })
            .collect();
        links.clear();
        for m in &old {
            self.open_link(&mut links, m);
        }
    }

    /// The client for peer `id`, for forwarding and status calls.
    pub fn client(&self, id: u64) -> Option<PeerClient<Channel>> {
        self.links
            .read()
            .expect("links poisoned")
            .get(&id)
            .map(|l| l.client.clone())
    }

    /// Whether server `id` is a member, as this server last applied the
    /// membership, or as another member vouched for it since.
    pub fn is_member(&self, id: u64) -> bool {
        self.members.read().expect("members poisoned").contains(&id)
            || self
                .vouched
                .read()
                .expect("vouched poisoned")
                .contains_key(&id)
    }

    /// Queues `msg` on `link`, or sends it (a snapshot) in a call of its own.
    fn send_on(&self, link: &Link, msg: Message) {
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            self.runtime.spawn(send_snapshot(
                link.client.clone(),
                msg,
                self.reports.clone(),
            ));
        } else {
            let _ = link.queue.send(msg);
        }
    }

    /// Opens the link to member `m` (its sender task and client), unless
    /// it is this server, has no address, or has a link. Runs inside the
    /// runtime (the client spawns its connection task).
    fn open_link(&self, links: &mut HashMap<u64, Link>, m: &Member) {
        if m.id == self.self_id || m.peer_endpoint.is_empty() || links.contains_key(&m.id) {
            return;
        }
        let client = match peer_client(m.id, &m.peer_endpoint, &self.tls) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(peer = m.id, addr = %m.peer_endpoint, error = %e, "invalid peer address");
                return;
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.runtime.spawn(run_peer(
            m.id,
            m.peer_endpoint.clone(),
            client.clone(),
            rx,
            self.reports.clone(),
        ));
        links.insert(
            m.id,
            Link {
                addr: m.peer_endpoint.clone(),
                queue: tx,
                client,
            },
        );
    }

    /// Asks the other members, in the background, whether `id` is a
    /// member by their applied membership; the first that says so vouches
    /// for it. At most once a second per sender.
    fn ask_about(&self, id: u64) {
        {
            let mut asked = self.asked.lock().expect("asked poisoned");
            let now = std::time::Instant::now();
            if asked
                .get(&id)
                .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(1))
            {
                return;
            }
            asked.insert(id, now);
        }
        let clients: Vec<(u64, PeerClient<Channel>)> = self
            .links
            .read()
            .expect("links poisoned")
            .iter()
            .filter(|(m, _)| **m != id)
            .map(|(m, l)| (*m, l.client.clone()))
            .collect();
        let vouched = self.vouched.clone();
        self.runtime.spawn(async move {
            for (m, mut client) in clients {
                let mut req = tonic::Request::new(zone_proto::v1::NodeStatusRequest {});
                req.set_timeout(Duration::from_secs(1));
                let Ok(r) = client.node_status(req).await else {
                    continue;
                };
                if let Some(member) = r.into_inner().members.into_iter().find(|x| x.id == id) {
                    tracing::info!(
                        sender = id,
                        by = m,
                        "a server this one does not know as a member yet is one by another member's applied membership: hearing it"
                    );
                    vouched.write().expect("vouched poisoned").insert(id, member);
                    return;
                }
            }
        });
    }
}

impl Transport for GrpcTransport {
    fn send(&self, msgs: Vec<Message>) {
        let mut unlinked = Vec::new();
        {
            let links = self.links.read().expect("links poisoned");
            for msg in msgs {
                match links.get(&msg.to) {
                    Some(link) => self.send_on(link, msg),
                    None => unlinked.push(msg),
                }
            }
        }
        if unlinked.is_empty() {
            return;
        }
        // A server another member vouched for (see `check_member`) has no
        // link until this server applies the change that added it: open
        // one, or its answers would never reach it.
        let _guard = self.runtime.enter();
        let mut links = self.links.write().expect("links poisoned");
        for msg in unlinked {
            let to = msg.to;
            if !links.contains_key(&to) {
                let vouched = self.vouched.read().expect("vouched poisoned");
                if let Some(m) = vouched.get(&to) {
                    self.open_link(&mut links, m);
                }
            }
            match links.get(&to) {
                Some(link) => self.send_on(link, msg),
                None => {
                    tracing::debug!(to, "no address known for server; message dropped");
                    if msg.get_msg_type() == MessageType::MsgSnapshot {
                        self.reports.snapshot(to, SnapshotStatus::Failure);
                    } else {
                        self.reports.unreachable(to);
                    }
                }
            }
        }
    }

    fn set_peers(&self, members: &[Member]) {
        // Clients spawn their connection task on the runtime: enter it, as
        // this may run on the driver thread.
        let _guard = self.runtime.enter();
        *self.members.write().expect("members poisoned") = members.iter().map(|m| m.id).collect();
        self.vouched.write().expect("vouched poisoned").clear();
        let mut links = self.links.write().expect("links poisoned");
        links.retain(|id, link| {
            let keep = members
                .iter()
                .any(|m| m.id == *id && m.peer_endpoint == link.addr);
            if !keep {
                tracing::info!(peer = id, addr = %link.addr, "closing the link to a former member");
            }
            keep
        });
        for m in members {
            self.open_link(&mut links, m);
        }
    }

    fn notify_removed(&self, id: u64, leader: u64, index: u64) {
        let Some(mut client) = self.client(id) else {
            return;
        };
        self.runtime.spawn(async move {
            let mut req = tonic::Request::new(RemovedNotice {
                leader_id: leader,
                index,
            });
            req.set_timeout(Duration::from_secs(2));
            if let Err(e) = client.removed(req).await {
                tracing::info!(peer = id, error = %e.message(), "could not tell the removed server; it will learn from a peer or stay idle");
            }
        });
    }
}

fn encode(msg: &Message) -> Vec<u8> {
    msg.write_to_bytes()
        .expect("encoding to memory cannot fail")
}

/// The queue of one peer, shared by [`run_peer`] and the body of its
/// current call. Locked only for a poll: never contended but at a reconnect.
type Queue = Arc<Mutex<mpsc::UnboundedReceiver<Message>>>;

/// The body of a `Peer.Raft` call: each item is every message queued at the
/// time it is polled, up to the batch bounds. gRPC's own body task polls it,
/// so a message goes from the driver thread to the connection in one wake-up
/// (a sender task between them cost one more per batch, on each side of each
/// round trip).
struct Batches {
    queue: Queue,
    first: Option<Message>,
}

impl futures::Stream for Batches {
    type Item = RaftBatch;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<RaftBatch>> {
        use std::task::Poll;
        let queue = self.queue.clone();
        let mut rx = queue.lock().expect("peer queue poisoned");
        let first = match self.first.take() {
            Some(m) => m,
            None => match rx.poll_recv(cx) {
                Poll::Ready(Some(m)) => m,
                // The link was closed: end the call.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            },
        };
        let mut bytes = 0;
        let mut messages = Vec::with_capacity(1 + rx.len().min(BATCH_MESSAGES));
        let mut next = Some(first);
        while let Some(m) = next.take() {
            let b = encode(&m);
            bytes += b.len();
            messages.push(b);
            if messages.len() < BATCH_MESSAGES && bytes < BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        Poll::Ready(Some(RaftBatch { messages }))
    }
}

/// Owns the stream to one peer for the life of the process.
async fn run_peer(
    id: u64,
    addr: String,
    client: PeerClient<Channel>,
    rx: mpsc::UnboundedReceiver<Message>,
    reports: PeerReports,
) {
    let queue: Queue = Arc::new(Mutex::new(rx));
    let mut backoff = BACKOFF_MIN;
    let mut healthy = true;
    loop {
        // Connect only when there is something to say.
        let first =
            std::future::poll_fn(|cx| queue.lock().expect("peer queue poisoned").poll_recv(cx))
                .await;
        let Some(first) = first else { return };
        let body = Batches {
            queue: queue.clone(),
            first: Some(first),
        };
        let opened = std::time::Instant::now();
        // A client-streaming call answers once its body ends (the link
        // was closed) or the call broke.
        let reason = match client.clone().raft(body).await {
            Ok(_) if queue.lock().expect("peer queue poisoned").is_closed() => return,
            Ok(_) => "peer ended the stream".to_owned(),
            Err(status) => format!("{}: {}", status.code(), status.message()),
        };
        // A stream that lived a while proves the peer was back: warn again
        // on this failure and start the backoff from the bottom.
        if opened.elapsed() > Duration::from_secs(1) {
            healthy = true;
            backoff = BACKOFF_MIN;
        }
        if healthy {
            tracing::warn!(peer = id, %addr, reason, "Raft stream to peer broke; reconnecting");
            healthy = false;
        } else {
            tracing::debug!(peer = id, %addr, reason, "Raft stream to peer still failing");
        }
        reports.unreachable(id);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        // What queued meanwhile is stale: Raft resends what still matters.
        let mut rx = queue.lock().expect("peer queue poisoned");
        while rx.try_recv().is_ok() {}
    }
}

/// Sends one snapshot message in chunks and reports the outcome to Raft.
async fn send_snapshot(mut client: PeerClient<Channel>, mut msg: Message, reports: PeerReports) {
    let to = msg.to;
    let data = msg.mut_snapshot().take_data();
    let header = encode(&msg);
    let total = data.len();
    let mut chunks = Vec::with_capacity(total / SNAPSHOT_CHUNK + 1);
    let mut offset = 0;
    loop {
        let end = (offset + SNAPSHOT_CHUNK).min(total);
        chunks.push(SnapshotChunk {
            message: if offset == 0 {
                header.clone()
            } else {
                Vec::new()
            },
            data: data[offset..end].to_vec(),
            total_size: if offset == 0 { total as u64 } else { 0 },
        });
        offset = end;
        if offset >= total {
            break;
        }
    }
    tracing::info!(to, bytes = total, chunks = chunks.len(), "sending snapshot");
    let status = match client.snapshot(tokio_stream::iter(chunks)).await {
        Ok(_) => SnapshotStatus::Finish,
        Err(e) => {
            tracing::warn!(to, code = ?e.code(), message = e.message(), "snapshot send failed");
            SnapshotStatus::Failure
        }
    };
    crate::metrics::METRICS
        .snapshots_sent
        .get_or_create(&crate::metrics::OutcomeLabels {
            outcome: if status == SnapshotStatus::Finish {
                "sent"
            } else {
                "failed"
            }
            .to_owned(),
        })
        .inc();
    reports.snapshot(to, status);
}

/// Whether `sender` (by its certificate) may be heard now. Safety: a
/// server removed from the zone, or one with a certificate of the zone
/// that was never added, must not vote or append: raft-rs steps a message
/// from any id.
///
/// Liveness: this server's applied membership may be behind. A server
/// added while this one was down can be the leader when it comes back;
/// refusing it for good would keep this one from ever learning the change.
/// So a sender it does not know is refused, and the other members are
/// asked about it (`ask_about`): once one whose applied membership has it
/// vouches for it, it is heard until the next membership change applied
/// here. The members are trusted servers of the zone (each authenticated
/// by the certificate naming its id); a stale "yes" from one that has not
/// applied a removal yet is the same lag this check always has.
pub fn check_member(transport: &GrpcTransport, sender: u64) -> Result<(), Status> {
    if transport.is_member(sender) {
        return Ok(());
    }
    transport.ask_about(sender);
    Err(Status::permission_denied(format!(
        "server {sender} is not a member of the zone"
    )))
}

/// Checks that a Raft message from a peer's stream is its own: a server
/// speaks only for itself (a forged `from` could answer a vote or an
/// append on another's behalf).
fn check_from(msg: &Message, sender: u64) -> Result<(), Status> {
    if msg.from == sender {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "a Raft message from server {} on server {sender}'s connection: a server speaks only for itself",
            msg.from
        )))
    }
}

/// Receives Raft messages from a peer (`sender`, by its certificate).
pub async fn receive_stream(
    node: &NodeHandle,
    transport: &GrpcTransport,
    sender: u64,
    mut stream: Streaming<RaftBatch>,
) -> Result<Response<RaftAck>, Status> {
    while let Some(batch) = stream.message().await? {
        // Each batch: a member removed while its stream is open is no
        // longer heard.
        check_member(transport, sender)?;
        for bytes in batch.messages {
            let msg = Message::parse_from_bytes(&bytes).map_err(|e| {
                Status::invalid_argument(format!("messages: not a Raft message: {e}"))
            })?;
            check_from(&msg, sender)?;
            node.step(msg)
                .map_err(|_| Status::unavailable("server is shutting down"))?;
        }
    }
    Ok(Response::new(RaftAck {}))
}

/// The most memory a snapshot stream reserves before its data arrives.
const SNAPSHOT_RESERVE_MAX: usize = 64 << 20;

/// What to reserve for a snapshot announced as `total` bytes: the size is
/// the sender's word, so a larger one grows only as its bytes arrive (a
/// peer claiming 1 GiB must send 1 GiB to take it).
fn snapshot_reserve(total: usize) -> usize {
    total.min(SNAPSHOT_RESERVE_MAX)
}

/// Reassembles a chunked snapshot from `sender` and steps it into Raft.
/// Receives a snapshot from member `sender`, whole, in memory: at most
/// `max_bytes` (`limits.max_snapshot_mb`), checked against the announced
/// size before any data is read, and against what arrives.
pub async fn receive_snapshot(
    node: &NodeHandle,
    sender: u64,
    max_bytes: u64,
    mut stream: Streaming<SnapshotChunk>,
) -> Result<Response<SnapshotAck>, Status> {
    let Some(first) = stream.message().await? else {
        return Err(Status::invalid_argument("empty snapshot stream"));
    };
    let mut msg = Message::parse_from_bytes(&first.message)
        .map_err(|e| Status::invalid_argument(format!("message: not a Raft message: {e}")))?;
    if msg.get_msg_type() != MessageType::MsgSnapshot {
        return Err(Status::invalid_argument("message: not a snapshot message"));
    }
    check_from(&msg, sender)?;
    if first.total_size > max_bytes {
        tracing::warn!(
            from = sender,
            announced = first.total_size,
            limit = max_bytes,
            "a snapshot larger than limits.max_snapshot_mb was refused"
        );
        return Err(Status::resource_exhausted(format!(
            "snapshot: server {sender} announces {} bytes, over this server's limits.max_snapshot_mb ({} MiB); raise it on every server if the store is that large",
            first.total_size,
            max_bytes >> 20
        )));
    }
    let total = first.total_size as usize;
    let mut data = Vec::with_capacity(snapshot_reserve(total));
    data.extend_from_slice(&first.data);
    while let Some(chunk) = stream.message().await? {
        data.extend_from_slice(&chunk.data);
        if data.len() > total {
            return Err(Status::invalid_argument(
                "snapshot: more data than announced",
            ));
        }
    }
    if data.len() != total {
        return Err(Status::invalid_argument(format!(
            "snapshot: {} bytes received of {total}",
            data.len()
        )));
    }
    msg.mut_snapshot().set_data(data.into());
    node.step(msg)
        .map_err(|_| Status::unavailable("server is shutting down"))?;
    Ok(Response::new(SnapshotAck {}))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 20, defect 11: the old code reserved min(total, 1 GiB).
    #[test]
    fn a_snapshots_announced_size_reserves_at_most_64_mib() {
        assert_eq!(snapshot_reserve(1000), 1000);
        assert_eq!(snapshot_reserve(1 << 30), 64 << 20);
        assert_eq!(snapshot_reserve(usize::MAX), 64 << 20);
    }
}
