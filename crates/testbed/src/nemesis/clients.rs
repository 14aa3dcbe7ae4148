//! The nemesis's clients, on a runtime inside the client namespace: workers
//! that put, compare-and-swap and read keys through the VIP and through
//! each server directly, recording every operation (invocation, completion,
//! result or indeterminate); a watcher from revision 1; and a tracker of
//! who leads (for faults aimed at the leader).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lincheck::{Op, Operation, Outcome, Value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tonic::transport::Channel;
use zonectl::v1::cluster_client::ClusterClient;
use zonectl::v1::kv_client::KvClient;
use zonectl::v1::{
    compare, request_op, Compare, GetRequest, PutRequest, RangeRequest, RequestOp, StatusRequest,
    TxnRequest, WatchRequest,
};

/// Every key the clients use starts with this.
pub const PREFIX: &str = "n/";
/// Keys in use at once. Keys change every [`KEY_EPOCH`]: each key's
/// history stays short, and so does the linearizability search over it
/// (the indeterminate writes of one fault stay with the keys of its epoch).
pub const KEYS: u64 = 4;
pub const KEY_EPOCH: Duration = Duration::from_secs(15);
/// How long one request may take before it counts as indeterminate.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between a client's operations: bounds the history's length.
const PACE: Duration = Duration::from_millis(8);

/// One recorded operation on one key.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub key: String,
    pub op: Operation,
    /// The store revision of the answer (acknowledged operations).
    pub revision: Option<u64>,
    /// "vip" or "n<i>".
    pub via: String,
    /// For an indeterminate operation: the gRPC status.
    pub error: Option<String>,
}

/// A change as a watch reports it: (revision, key, value).
pub type Change = (u64, String, Value);

/// The changes one watch response carries. Every write here is a put: a
/// delete shows as the key absent.
fn changes(resp: zonectl::v1::WatchResponse) -> impl Iterator<Item = Change> {
    resp.events.into_iter().filter_map(|e| {
        let kv = e.kv?;
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        Some((
            kv.mod_revision,
            key,
            (e.r#type == 0).then(|| decode(&kv.value)),
        ))
    })
}

/// What the watcher saw: (revision, key, value), in order received, and
/// how many times it had to reconnect.
#[derive(Debug, Default, Clone)]
pub struct Watched {
    pub events: Vec<Change>,
    pub reconnects: u64,
    /// The last few reasons it reconnected: "at <ms> ms, <server>: <why>".
    pub errors: Vec<String>,
}

impl Watched {
    fn failed(&mut self, start: Instant, target: &str, why: String) {
        self.reconnects += 1;
        if self.errors.len() == 10 {
            self.errors.remove(0);
        }
        self.errors.push(format!(
            "at {} ms, {target}: {why}",
            start.elapsed().as_millis()
        ));
    }
}

/// The servers' state after healing.
#[derive(Debug, Clone)]
pub struct Converged {
    /// How long after healing every server had the same applied index,
    /// revision and data; None if not within the limit.
    pub after: Option<Duration>,
    /// The last state seen, per server: (applied, revision) or an error.
    pub last: Vec<Result<(u64, u64), String>>,
}

/// Everything the clients recorded.
#[derive(Debug)]
pub struct Recording {
    pub ops: Vec<Recorded>,
    pub watched: Watched,
    pub converged: Converged,
    /// Per key: the final linearizable read (value, revision), if any.
    pub final_reads: BTreeMap<String, (Value, u64)>,
    pub final_revision: u64,
    /// The store's whole history up to `final_revision`, read after the
    /// run by a new watch from revision 1 (server, events), if one server
    /// could give all of it.
    pub history: Result<(String, Vec<Change>), String>,
}

/// The addresses the clients use.
#[derive(Debug, Clone)]
pub struct Targets {
    /// host:port of each server, by index.
    pub servers: Vec<String>,
    /// host:port of the VIP.
    pub vip: String,
    /// The clients' credential (the test zone's admin).
    pub creds: zonectl::Credentials,
}

impl Targets {
    /// A channel to `addr` with the clients' credential.
    fn channel(&self, addr: &str) -> Channel {
        channel(addr, &self.creds)
    }
}

/// Shared between the clients' runtime and the fault loop.
#[derive(Debug, Default)]
pub struct Shared {
    /// The index of the server that leads, as last seen.
    pub leader: Mutex<Option<usize>>,
}

/// Nanoseconds since `start`.
fn ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

/// A channel to `addr`, with HTTP/2 keepalive. A watch through the VIP to
/// a server that lost the VIP while frozen (SIGSTOP, a stalled disk) can be
/// a half-open connection on which nothing arrives again, neither data nor
/// a reset. In a 30-minute run without pings the watcher stopped at
/// revision 17256 of 83267 (most likely so); with them, 8 minutes of faults
/// took 216 reconnections and the watch saw every revision.
fn channel(addr: &str, creds: &zonectl::Credentials) -> Channel {
    zonectl::endpoint(addr, Some(creds))
        .expect("a valid address")
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .connect_lazy()
}

fn encode(v: u64) -> Vec<u8> {
    v.to_string().into_bytes()
}

/// A value read back: the clients write decimal numbers only, so anything
/// else is recorded as a value no one wrote (the checker then fails).
fn decode(b: &[u8]) -> u64 {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX)
}

fn with_timeout<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(TIMEOUT);
    req
}

/// One client: operations one after another until `stop`.
async fn client(
    id: u64,
    seed: u64,
    start: Instant,
    targets: Targets,
    stop: watch::Receiver<bool>,
) -> Vec<Recorded> {
    let mut rng = StdRng::seed_from_u64(seed ^ (id << 32));
    let mut kvs: Vec<(String, KvClient<Channel>)> = targets
        .servers
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("n{i}"), KvClient::new(targets.channel(a))))
        .collect();
    kvs.push(("vip".into(), KvClient::new(targets.channel(&targets.vip))));
    let mut out = Vec::new();
    let mut last_seen: BTreeMap<String, Value> = BTreeMap::new();
    let mut counter = 0u64;
    while !*stop.borrow() {
        let epoch = start.elapsed().as_secs() / KEY_EPOCH.as_secs();
        let key = format!("{PREFIX}{epoch:05}/{}", rng.random_range(0..KEYS));
        // Half through the VIP, half straight to a server.
        let t = if rng.random_bool(0.5) {
            kvs.len() - 1
        } else {
            rng.random_range(0..kvs.len() - 1)
        };
        let (via, kv) = &mut kvs[t];
        counter += 1;
        let value = (id << 40) | counter;
        let op = match rng.random_range(0..100) {
            0..45 => Op::Read,
            45..80 => Op::Write(value),
            _ => Op::Cas {
                expect: last_seen.get(&key).copied().flatten(),
                new: value,
            },
        };
        let call_ns = ns(start);
        let answer: Result<(Outcome, u64), tonic::Status> = match &op {
            Op::Read => kv
                .get(with_timeout(GetRequest {
                    key: key.clone().into_bytes(),
                    serializable: false,
                }))
                .await
                .map(|r| {
                    let r = r.into_inner();
                    let v = r.kv.map(|kv| decode(&kv.value));
                    (Outcome::Read(v), r.header.map_or(0, |h| h.revision))
                }),
            Op::Write(v) => kv
                .put(with_timeout(PutRequest {
                    key: key.clone().into_bytes(),
                    value: encode(*v),
                    prev_kv: false,
                }))
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (Outcome::Written, r.header.map_or(0, |h| h.revision))
                }),
            Op::Cas { expect, new } => {
                let compare = match expect {
                    Some(v) => Compare {
                        key: key.clone().into_bytes(),
                        target: compare::Target::Value as i32,
                        op: compare::Op::Equal as i32,
                        target_value: Some(compare::TargetValue::Value(encode(*v))),
                    },
                    None => Compare {
                        key: key.clone().into_bytes(),
                        target: compare::Target::Version as i32,
                        op: compare::Op::Equal as i32,
                        target_value: Some(compare::TargetValue::Version(0)),
                    },
                };
                kv.txn(with_timeout(TxnRequest {
                    compare: vec![compare],
                    success: vec![RequestOp {
                        request: Some(request_op::Request::Put(PutRequest {
                            key: key.clone().into_bytes(),
                            value: encode(*new),
                            prev_kv: false,
                        })),
                    }],
                    failure: vec![],
                }))
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (
                        Outcome::Swapped(r.succeeded),
                        r.header.map_or(0, |h| h.revision),
                    )
                })
            }
        };
        let return_ns = ns(start);
        let rec = match answer {
            Ok((outcome, revision)) => {
                match (&op, &outcome) {
                    (_, Outcome::Read(v)) => {
                        last_seen.insert(key.clone(), *v);
                    }
                    (Op::Write(v), _) | (Op::Cas { new: v, .. }, Outcome::Swapped(true)) => {
                        last_seen.insert(key.clone(), Some(*v));
                    }
                    _ => {}
                }
                Recorded {
                    key,
                    op: Operation {
                        client: id,
                        op,
                        call_ns,
                        return_ns: Some(return_ns),
                        outcome,
                    },
                    revision: Some(revision),
                    via: via.clone(),
                    error: None,
                }
            }
            // No answer: it may or may not have taken effect.
            Err(status) => Recorded {
                key,
                op: Operation {
                    client: id,
                    op,
                    call_ns,
                    return_ns: None,
                    outcome: Outcome::Unknown,
                },
                revision: None,
                via: via.clone(),
                error: Some(format!("{:?}", status.code())),
            },
        };
        let failed = rec.error.is_some();
        out.push(rec);
        tokio::time::sleep(if failed { PACE * 6 } else { PACE }).await;
    }
    out
}

/// Watches every key from revision 1 until `stop`, reconnecting (to the
/// next server) from the revision after the last one seen.
/// `progress`: the last revision seen.
async fn watcher(
    targets: Targets,
    start: Instant,
    progress: Arc<AtomicU64>,
    stop: watch::Receiver<bool>,
) -> Watched {
    let mut seen = Watched::default();
    let mut next_rev = 1u64;
    let mut t = 0usize;
    let mut all = targets.servers.clone();
    all.push(targets.vip.clone());
    loop {
        if *stop.borrow() {
            return seen;
        }
        let target = all[t % all.len()].clone();
        let mut kv = KvClient::new(targets.channel(&target));
        t += 1;
        let stream = kv
            .watch(WatchRequest {
                prefix: Vec::new(),
                start_revision: next_rev,
                prev_kv: false,
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(e) => {
                seen.failed(start, &target, format!("{:?}: {}", e.code(), e.message()));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut stop_rx = stop.clone();
        loop {
            tokio::select! {
                _ = stop_rx.changed() => return seen,
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => {
                        for c in changes(resp) {
                            next_rev = next_rev.max(c.0 + 1);
                            seen.events.push(c);
                        }
                        progress.store(next_rev - 1, Ordering::Relaxed);
                    }
                    other => {
                        let why = match other {
                            Err(e) => format!("{:?}: {}", e.code(), e.message()),
                            _ => "the stream ended".into(),
                        };
                        seen.failed(start, &target, why);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        break;
                    }
                },
            }
        }
    }
}

/// Keeps `shared.leader` up to date: the server that says it leads, in the
/// highest term any server reports.
async fn track_leader(targets: Targets, shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let mut clients: Vec<ClusterClient<Channel>> = targets
        .servers
        .iter()
        .map(|a| ClusterClient::new(targets.channel(a)))
        .collect();
    while !*stop.borrow() {
        let mut best: Option<(u64, usize)> = None;
        for (i, c) in clients.iter_mut().enumerate() {
            let mut req = tonic::Request::new(StatusRequest {});
            req.set_timeout(Duration::from_millis(300));
            if let Ok(r) = c.status(req).await {
                let r = r.into_inner();
                if r.leader_id == r.member_id && best.is_none_or(|(t, _)| r.term > t) {
                    best = Some((r.term, i));
                }
            }
        }
        *shared.leader.lock().unwrap() = best.map(|(_, i)| i);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Each server's (applied, revision) and its data under [`PREFIX`], read
/// from its own copy.
async fn server_state(
    targets: &Targets,
    addr: &str,
) -> Result<((u64, u64), Vec<(Vec<u8>, Vec<u8>)>), String> {
    let mut c = ClusterClient::new(targets.channel(addr));
    let mut req = tonic::Request::new(StatusRequest {});
    req.set_timeout(Duration::from_secs(1));
    let st = c.status(req).await.map_err(|e| e.message().to_owned())?;
    let st = st.into_inner();
    let me = st
        .servers
        .iter()
        .find(|s| s.id == st.member_id)
        .ok_or("its status lacks itself")?;
    let mut kv = KvClient::new(targets.channel(addr));
    let mut req = tonic::Request::new(RangeRequest {
        prefix: PREFIX.as_bytes().to_vec(),
        limit: 0,
        serializable: true,
        keys_only: false,
    });
    req.set_timeout(Duration::from_secs(2));
    let r = kv.range(req).await.map_err(|e| e.message().to_owned())?;
    let r = r.into_inner();
    let data = r.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
    // The range's own revision, not the status's: both are read one after
    // the other, and the range is what the data is from.
    let revision = r.header.map_or(me.revision, |h| h.revision);
    Ok(((me.applied, revision), data))
}

/// Polls every server until all have the same applied index, revision and
/// data, for up to `limit`.
async fn converge(targets: &Targets, limit: Duration) -> Converged {
    let started = Instant::now();
    loop {
        let mut states = Vec::new();
        for a in &targets.servers {
            states.push(server_state(targets, a).await);
        }
        let last: Vec<Result<(u64, u64), String>> = states
            .iter()
            .map(|s| s.as_ref().map(|(ar, _)| *ar).map_err(Clone::clone))
            .collect();
        let same = match states.first() {
            Some(Ok(first)) => states.iter().all(|s| s.as_ref().is_ok_and(|s| s == first)),
            _ => false,
        };
        if same {
            return Converged {
                after: Some(started.elapsed()),
                last,
            };
        }
        if started.elapsed() > limit {
            return Converged { after: None, last };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The signals the fault loop sends the clients' runtime.
#[derive(Debug)]
pub struct Control {
    /// Set: the clients stop (the faults are over).
    pub stop_clients: watch::Sender<bool>,
    /// Set: every fault is healed; convergence is measured from now.
    pub healed: watch::Sender<bool>,
}

/// Starts the clients' runtime on a thread inside the namespace at
/// `ns_path`: `clients` workers, the watcher and the leader tracker. The
/// thread returns the recording once [`Control::healed`] is set and the
/// final reads are done.
pub fn start(
    ns_path: std::path::PathBuf,
    targets: Targets,
    clients: u64,
    seed: u64,
    start: Instant,
    shared: Arc<Shared>,
) -> (Control, std::thread::JoinHandle<Recording>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (healed_tx, mut healed_rx) = watch::channel(false);
    let handle = std::thread::spawn(move || {
        let ns =
            std::fs::File::open(&ns_path).unwrap_or_else(|e| panic!("{}: {e}", ns_path.display()));
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {}: {e}", ns_path.display()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the clients");
        rt.block_on(async move {
            let (watch_stop_tx, watch_stop_rx) = watch::channel(false);
            let workers: Vec<_> = (1..=clients)
                .map(|id| tokio::spawn(client(id, seed, start, targets.clone(), stop_rx.clone())))
                .collect();
            let progress = Arc::new(AtomicU64::new(0));
            let watcher = tokio::spawn(watcher(
                targets.clone(),
                start,
                progress.clone(),
                watch_stop_rx.clone(),
            ));
            let tracker = tokio::spawn(track_leader(
                targets.clone(),
                shared.clone(),
                watch_stop_rx.clone(),
            ));
            let mut ops = Vec::new();
            for w in workers {
                ops.extend(w.await.expect("a client task"));
            }
            while !*healed_rx.borrow() {
                if healed_rx.changed().await.is_err() {
                    break;
                }
            }
            let converged = converge(&targets, Duration::from_secs(10)).await;
            let (final_reads, final_revision, reads) = final_reads(&targets, start, &ops).await;
            ops.extend(reads);
            // The watcher has 10 s to catch up with the final reads.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && progress.load(Ordering::Relaxed) < final_revision {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = watch_stop_tx.send(true);
            let watched = watcher.await.expect("the watcher task");
            let _ = tracker.await;
            let history = whole_history(&targets, final_revision).await;
            Recording {
                ops,
                watched,
                converged,
                final_reads,
                final_revision,
                history,
            }
        })
    });
    (
        Control {
            stop_clients: stop_tx,
            healed: healed_tx,
        },
        handle,
    )
}

/// The store's history from revision 1 to `last`, from a new watch on
/// each server in turn until one gives all of it (within 20 s each).
async fn whole_history(targets: &Targets, last: u64) -> Result<(String, Vec<Change>), String> {
    let mut why = Vec::new();
    for addr in &targets.servers {
        let read = async {
            let mut kv = KvClient::new(targets.channel(addr));
            let mut stream = kv
                .watch(WatchRequest {
                    prefix: Vec::new(),
                    start_revision: 1,
                    prev_kv: false,
                })
                .await
                .map_err(|e| format!("{:?}: {}", e.code(), e.message()))?
                .into_inner();
            let mut events = Vec::new();
            let mut at = 0;
            while at < last {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        for c in changes(resp) {
                            at = at.max(c.0);
                            events.push(c);
                        }
                    }
                    Ok(None) => return Err(format!("the stream ended at revision {at}")),
                    Err(e) => {
                        return Err(format!("{:?}: {} at revision {at}", e.code(), e.message()))
                    }
                }
            }
            Ok(events)
        };
        match tokio::time::timeout(Duration::from_secs(20), read).await {
            Ok(Ok(events)) => return Ok((addr.clone(), events)),
            Ok(Err(e)) => why.push(format!("{addr}: {e}")),
            Err(_) => why.push(format!("{addr}: not all of it within 20 s")),
        }
    }
    Err(why.join("; "))
}

/// A linearizable read of every key used, each through the first server
/// that answers: recorded as operations of client 0, and returned with the
/// highest revision seen.
async fn final_reads(
    targets: &Targets,
    start: Instant,
    ops: &[Recorded],
) -> (BTreeMap<String, (Value, u64)>, u64, Vec<Recorded>) {
    let keys: std::collections::BTreeSet<&String> = ops.iter().map(|r| &r.key).collect();
    let mut kvs: Vec<KvClient<Channel>> = targets
        .servers
        .iter()
        .map(|a| KvClient::new(targets.channel(a)))
        .collect();
    let mut reads = BTreeMap::new();
    let mut recorded = Vec::new();
    let mut max_rev = 0;
    for key in keys {
        'tries: for _ in 0..60 {
            for (i, kv) in kvs.iter_mut().enumerate() {
                let call_ns = ns(start);
                let r = kv
                    .get(with_timeout(GetRequest {
                        key: key.clone().into_bytes(),
                        serializable: false,
                    }))
                    .await;
                if let Ok(r) = r {
                    let r = r.into_inner();
                    let v = r.kv.map(|kv| decode(&kv.value));
                    let rev = r.header.map_or(0, |h| h.revision);
                    max_rev = max_rev.max(rev);
                    reads.insert(key.clone(), (v, rev));
                    recorded.push(Recorded {
                        key: key.clone(),
                        op: Operation {
                            client: 0,
                            op: Op::Read,
                            call_ns,
                            return_ns: Some(ns(start)),
                            outcome: Outcome::Read(v),
                        },
                        revision: Some(rev),
                        via: format!("n{i}"),
                        error: None,
                    });
                    break 'tries;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    (reads, max_rev, recorded)
}
