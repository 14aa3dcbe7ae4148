//! Prometheus metrics on plain HTTP (`GET /metrics`, `[metrics] listen`):
//! Raft, the disk, the client API, the lease, and what the local agents
//! report. Counters and histograms are kept where things happen (the
//! driver, the engine, the client port's layer); the Raft figures and sizes
//! are read when scraped. Names follow Prometheus conventions: `zoned_`,
//! base units, `_total` for counters (added by the encoder), `_seconds`.
//!
//! The port serves figures only, no key or value: no certificate is asked,
//! as Prometheus scrapes expect; bind it to an address only the monitoring
//! network reaches, or turn it off (`listen = "off"`).

use std::net::SocketAddr;
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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabels {
    /// The agent (`zone-vip`, `zone-sync`, `zone-mounts`).
    pub agent: String,
    /// What it counts or measures, as it names it.
    pub figure: String,
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
    pub calls: Family<CallLabels, Counter>,
    pub call_seconds: Histograms<MethodLabels>,
    pub lease_held: Gauge,
    pub lease_renewals: Counter,
    pub lease_lapses: Counter,
    pub agent_figures: Family<AgentLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
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
                "Proposals of this server that failed (dropped, leadership lost, refused)",
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
                "Time of each synced write of the store (one per Raft Ready that must persist)",
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
            agent_figures: reg!(
                "zoned_agent_figure",
                "Figures the local agents report through zoned (zone-vip, zone-sync, zone-mounts)",
                Family::default()
            ),
            registry: r,
        }
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
        if let Ok(s) = node.status().await {
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
        if let Ok(st) = nix::sys::statvfs::statvfs(engine.path()) {
            self.data_free_bytes
                .set((st.blocks_available() * st.fragment_size()) as i64);
        }
    }
}

/// Times a synced write.
pub fn fsync_timer() -> impl Drop {
    struct T(Instant);
    impl Drop for T {
        fn drop(&mut self) {
            METRICS.wal_fsync.observe(self.0.elapsed().as_secs_f64());
        }
    }
    T(Instant::now())
}

/// Serves `GET /metrics` on `addr` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: NodeHandle,
    engine: Engine,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let (node, engine) = (node.clone(), engine.clone());
            async move {
                METRICS.refresh(&node, &engine).await;
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    METRICS.encode(),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}

/// Binds the metrics port: a port in use fails the start, like the others.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
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
        let method = req.uri().path().to_owned();
        let started = Instant::now();
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
            let m = &*METRICS;
            // grpc-go's names: OK, InvalidArgument, Unavailable, ...
            let code = match code {
                tonic::Code::Ok => "OK".to_owned(),
                other => format!("{other:?}"),
            };
            m.calls
                .get_or_create(&CallLabels {
                    method: method.clone(),
                    code,
                })
                .inc();
            m.call_seconds
                .get_or_create(&MethodLabels { method })
                .observe(started.elapsed().as_secs_f64());
            r
        })
    }
}
