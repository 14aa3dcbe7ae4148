//! Prometheus metrics on plain HTTP (`GET /metrics`, `[metrics] listen`):
//! Raft, the disk, the client API, the lease, and what the local agents
//! report (`Agent.ReportFigures`: zone-vip's VIP, zone-sync's files and
//! roll). Counters and histograms are kept where things happen (the
//! driver, the engine, the client port's layer); the Raft figures and sizes
//! are read when scraped. Names follow Prometheus conventions: `zoned_`,
//! base units, `_total` for counters (added by the encoder), `_seconds`.
//!
//! The port serves figures only, no key or value: no certificate is asked,
//! as Prometheus scrapes expect; bind it to an address only the monitoring
//! network reaches, or turn it off (`listen = "off"`).

use std::sync::LazyLock;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::node::NodeHandle;
use crate::storage::Engine;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// The gRPC method's path, `/zone.v1.KV/Put`.
    pub method: String,
    /// The gRPC status code's name, `OK`, `Unavailable`, ...
    pub code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    /// The RocksDB column family: `log`, `kv`, `history`, ...
    pub cf: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    pub term: Gauge,
    pub leader_id: Gauge,
    pub is_leader: Gauge,
    pub commit_index: Gauge,
    pub applied_index: Gauge,
    pub last_index: Gauge,
    pub log_entries: Gauge,
    pub voters: Gauge,
    pub learners: Gauge,
    pub revision: Gauge,
    pub proposals_committed: Counter,
    pub proposals_failed: Counter,
    pub leader_changes: Counter,
    pub snapshots_sent: Family<OutcomeLabels, Counter>,
    pub snapshots_received: Counter,
    pub wal_fsync: Histogram,
    pub db_bytes: Family<FamilyLabels, Gauge>,
    pub data_free_bytes: Gauge,
    pub space_alarms: Gauge,
    pub calls: Family<CallLabels, Counter>,
    pub call_seconds: Histograms<MethodLabels>,
    pub lease_held: Gauge,
    pub lease_renewals: Counter,
    pub lease_lapses: Counter,
    pub vip_held: Gauge,
    pub vip_transitions: Counter,
    pub vip_announcements: Counter,
    pub sync_applied_revision: Gauge,
    pub sync_drift_restores: Counter,
    pub sync_restarts_pending: Gauge,
    pub sync_roll_halted: Gauge,
    /// The last value of each counter an agent reported (`agent_figure`).
    reported: std::sync::Mutex<std::collections::HashMap<(String, String), f64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

fn latency() -> Histogram {
    // 0.25 ms to about 8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics::registered();
        // Shown as zeros from the start, not absent until the first one.
        for outcome in ["sent", "failed"] {
            let _ = m.snapshots_sent.get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            });
        }
        m
    }

    fn registered() -> Metrics {
        let mut r = Registry::default();
        macro_rules! reg {
            ($name:literal, $help:literal, $m:expr) => {{
                let m = $m;
                r.register($name, $help, m.clone());
                m
            }};
        }
        Metrics {
            term: reg!(
                "zoned_raft_term",
                "Raft term on this server",
                Gauge::default()
            ),
            leader_id: reg!(
                "zoned_raft_leader_id",
                "Leader this server knows (0: none)",
                Gauge::default()
            ),
            is_leader: reg!(
                "zoned_raft_is_leader",
                "1 while this server leads the zone",
                Gauge::default()
            ),
            commit_index: reg!(
                "zoned_raft_commit_index",
                "Highest log index known committed",
                Gauge::default()
            ),
            applied_index: reg!(
                "zoned_raft_applied_index",
                "Highest log index applied to the store",
                Gauge::default()
            ),
            last_index: reg!(
                "zoned_raft_last_index",
                "Last index in this server's log",
                Gauge::default()
            ),
            log_entries: reg!(
                "zoned_raft_log_entries",
                "Entries kept in the log (not yet compacted)",
                Gauge::default()
            ),
            voters: reg!("zoned_raft_voters", "Voters of the zone", Gauge::default()),
            learners: reg!(
                "zoned_raft_learners",
                "Learners of the zone",
                Gauge::default()
            ),
            revision: reg!(
                "zoned_store_revision",
                "Store revision applied on this server",
                Gauge::default()
            ),
            proposals_committed: reg!(
                "zoned_raft_proposals_committed",
                "Proposals of this server committed and applied",
                Counter::default()
            ),
            proposals_failed: reg!(
                "zoned_raft_proposals_failed",
                "Proposals of this server that failed once in the log (dropped by a new leader, leadership lost, a membership change refused)",
                Counter::default()
            ),
            leader_changes: reg!(
                "zoned_raft_leader_changes",
                "Changes of the leader this server knows",
                Counter::default()
            ),
            snapshots_sent: reg!(
                "zoned_raft_snapshots_sent",
                "Raft snapshots this server sent, by outcome",
                Family::default()
            ),
            snapshots_received: reg!(
                "zoned_raft_snapshots_received",
                "Raft snapshots this server installed",
                Counter::default()
            ),
            wal_fsync: reg!(
                "zoned_disk_wal_fsync_duration_seconds",
                "Time of each Raft Ready's synced write (log entries and state: WAL append and fsync)",
                latency()
            ),
            db_bytes: reg!(
                "zoned_disk_db_size_bytes",
                "RocksDB size by column family (SST files and memtables)",
                Family::default()
            ),
            data_free_bytes: reg!(
                "zoned_disk_data_free_bytes",
                "Free space on the data directory's file system",
                Gauge::default()
            ),
            space_alarms: reg!(
                "zoned_space_alarms",
                "Space alarms standing in the zone (writes that add data refused while above 0)",
                Gauge::default()
            ),
            calls: reg!(
                "zoned_grpc_requests",
                "Client gRPC calls by method and status code",
                Family::default()
            ),
            call_seconds: reg!(
                "zoned_grpc_request_duration_seconds",
                "Client gRPC call latency until the response headers, by method",
                Histograms::<MethodLabels>::new_with_constructor(latency)
            ),
            lease_held: reg!(
                "zoned_lease_held",
                "1 while this server holds an unexpired leader lease",
                Gauge::default()
            ),
            lease_renewals: reg!(
                "zoned_lease_renewals",
                "Leader lease renewals",
                Counter::default()
            ),
            lease_lapses: reg!(
                "zoned_lease_lapses",
                "Leases that expired before they were renewed",
                Counter::default()
            ),
            vip_held: reg!(
                "zoned_vip_held",
                "VIP addresses zone-vip holds on this server, as it reported",
                Gauge::default()
            ),
            vip_transitions: reg!(
                "zoned_vip_transitions",
                "VIPs taken or let go by zone-vip on this server",
                Counter::default()
            ),
            vip_announcements: reg!(
                "zoned_vip_announcements",
                "Gratuitous ARP and unsolicited neighbour advertisements zone-vip sent",
                Counter::default()
            ),
            sync_applied_revision: reg!(
                "zoned_sync_applied_revision",
                "Store revision of the managed files zone-sync last applied here",
                Gauge::default()
            ),
            sync_drift_restores: reg!(
                "zoned_sync_drift_restores",
                "Managed files zone-sync restored after they were changed by hand",
                Counter::default()
            ),
            sync_restarts_pending: reg!(
                "zoned_sync_restarts_pending",
                "Units waiting for this server's turn in the rolling restart",
                Gauge::default()
            ),
            sync_roll_halted: reg!(
                "zoned_sync_roll_halted",
                "1 while the rolling restart is halted by a failed restart",
                Gauge::default()
            ),
            reported: Default::default(),
            registry: r,
        }
    }

    /// One figure a local agent reported (`Agent.ReportFigures`). A
    /// counter the agent counts from its own start is added as the
    /// difference from its last report (all of it after a restart of the
    /// agent: lower than before), so zoned's counter only grows. Unknown
    /// names are ignored.
    pub fn agent_figure(&self, agent: &str, name: &str, value: f64) {
        if !value.is_finite() || value < 0.0 {
            return;
        }
        let gauge = match name {
            "vip_held" => Some(&self.vip_held),
            "sync_applied_revision" => Some(&self.sync_applied_revision),
            "sync_restarts_pending" => Some(&self.sync_restarts_pending),
            "sync_roll_halted" => Some(&self.sync_roll_halted),
            _ => None,
        };
        if let Some(g) = gauge {
            g.set(value as i64);
            return;
        }
        let counter = match name {
            "vip_transitions" => &self.vip_transitions,
            "vip_announcements" => &self.vip_announcements,
            "sync_drift_restores" => &self.sync_drift_restores,
            _ => return,
        };
        let mut last = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        let before = last
            .insert((agent.to_owned(), name.to_owned()), value)
            .unwrap_or(0.0);
        let delta = if value >= before {
            value - before
        } else {
            value
        };
        counter.inc_by(delta as u64);
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding metrics to a String cannot fail");
        out
    }

    /// Reads the figures kept elsewhere: the Raft state, the lease, sizes.
    pub async fn refresh(&self, node: &NodeHandle, engine: &Engine) {
        let status = tokio::time::timeout(REFRESH_EVERY, node.status()).await;
        if let Ok(Ok(s)) = status {
            self.term.set(s.term as i64);
            self.leader_id.set(s.leader_id as i64);
            self.is_leader
                .set(i64::from(s.role == raft::StateRole::Leader));
            self.commit_index.set(s.commit as i64);
            self.applied_index.set(s.applied as i64);
            self.last_index.set(s.last_index as i64);
            self.voters.set(s.voters.len() as i64);
            self.learners.set(s.learners.len() as i64);
            self.revision.set(s.revision as i64);
            self.log_entries
                .set((s.last_index + 1).saturating_sub(s.first_index) as i64);
        }
        let lease = *node.watch_lease().borrow();
        let now = zone_proto::boottime_ns();
        self.lease_held.set(i64::from(
            lease.held && lease.leader_id == node.id() && lease.expires_ns > now,
        ));
        for (cf, bytes) in engine.sizes() {
            self.db_bytes
                .get_or_create(&FamilyLabels { cf: cf.to_owned() })
                .set(bytes as i64);
        }
        self.space_alarms.set(node.reader().alarms().len() as i64);
        if let Ok(free) = crate::storage::free_bytes(engine.path()) {
            self.data_free_bytes.set(free as i64);
        }
    }
}

/// How often the figures kept elsewhere are read ([`Metrics::refresh`]):
/// a scrape only encodes, so scrapes cost the Raft driver nothing.
const REFRESH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 8;
/// A connection's request must arrive within this, and its answer go out
/// within [`CONNECTION_LIMIT`]; one request per connection.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const CONNECTION_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `GET /metrics` on `listener` until the process ends, and keeps
/// the figures fresh. Nothing a scraper does reaches the Raft driver: the
/// figures are read every [`REFRESH_EVERY`] by a task of their own;
/// connections are bounded in number and time (no keep-alive).
pub async fn serve(listener: tokio::net::TcpListener, node: NodeHandle, engine: Engine) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(REFRESH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            METRICS.refresh(&node, &engine).await;
        }
    });
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "metrics: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(
                    hyper_util::rt::TokioIo::new(stream),
                    hyper::service::service_fn(answer),
                );
            let _ = tokio::time::timeout(CONNECTION_LIMIT, conn).await;
        });
    }
}

/// `GET /metrics`: the text exposition; anything else: 404.
async fn answer(
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    let found = req.method() == http::Method::GET && req.uri().path() == "/metrics";
    let (status, body) = if found {
        (http::StatusCode::OK, METRICS.encode())
    } else {
        (
            http::StatusCode::NOT_FOUND,
            "not found: GET /metrics\n".to_owned(),
        )
    };
    let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *resp.status_mut() = status;
    if found {
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
    }
    Ok(resp)
}

/// A tower layer for the client port: counts each call by method and gRPC
/// status code, and times it until its response headers (a stream's first
/// answer, for a watch). A status in trailers (an error after the first
/// message of a stream) counts as the headers said: OK. Inside the gate:
/// a call refused for want of a credential is not counted (nor can an
/// unauthenticated caller fill the method label with names of its own).
#[derive(Debug, Clone, Default)]
pub struct Measure;

impl<S> tower::Layer<S> for Measure {
    type Service = Measured<S>;
    fn layer(&self, inner: S) -> Measured<S> {
        Measured { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Measured<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for Measured<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let mut pending = Pending {
            method: method_label(req.uri().path()),
            started: Instant::now(),
            done: false,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            let code = match &r {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                Err(_) => tonic::Code::Unknown,
            };
            pending.record(code);
            r
        })
    }
}

/// A call being measured: recorded once, with its code, or as Cancelled
/// when dropped before its answer (a deadline passed, the client left).
struct Pending {
    method: String,
    started: Instant,
    done: bool,
}

impl Pending {
    fn record(&mut self, code: tonic::Code) {
        self.done = true;
        let m = &*METRICS;
        // grpc-go's names: OK, InvalidArgument, Unavailable, ...
        let code = match code {
            tonic::Code::Ok => "OK".to_owned(),
            other => format!("{other:?}"),
        };
        m.calls
            .get_or_create(&CallLabels {
                method: self.method.clone(),
                code,
            })
            .inc();
        m.call_seconds
            .get_or_create(&MethodLabels {
                method: self.method.clone(),
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            self.record(tonic::Code::Cancelled);
        }
    }
}

/// The method label for a call's path: the path of a method the client
/// port serves, else "other" (a caller cannot make the label's values
/// grow: health needs no certificate, and any path reaches this layer).
fn method_label(path: &str) -> String {
    static KNOWN: LazyLock<std::collections::HashSet<String>> = LazyLock::new(|| {
        use prost::Message as _;
        let mut known = std::collections::HashSet::new();
        for set in [
            zone_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in set.file {
                for service in &file.service {
                    let name = format!("{}.{}", file.package(), service.name());
                    if !crate::server::CLIENT_SERVICES.contains(&name.as_str()) {
                        continue;
                    }
                    for method in &service.method {
                        known.insert(format!("/{name}/{}", method.name()));
                    }
                }
            }
        }
        known
    });
    if KNOWN.contains(path) {
        path.to_owned()
    } else {
        "other".to_owned()
    }
}
