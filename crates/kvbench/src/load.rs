//! Workloads, the same for both systems: puts, linearizable reads, and a
//! 90/10 read/write mix, from N concurrent clients sharing a few
//! connections, each op timed on its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tonic::transport::Channel;
use zone_proto::v1::{kv_client::KvClient, GetRequest, PutRequest};

pub const KEY_BYTES: usize = 16;
pub const VALUE_BYTES: usize = 256;
/// Clients per connection (an HTTP/2 connection multiplexes them).
const CLIENTS_PER_CONN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Put,
    Read,
    /// 90 % linearizable reads, 10 % puts.
    Mixed,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Put => "put",
            Kind::Read => "read",
            Kind::Mixed => "mixed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Zoned,
    Etcd,
}

/// One client's handle to one system.
#[derive(Clone)]
enum Conn {
    Zoned(KvClient<Channel>),
    Etcd(Box<etcd_client::KvClient>),
}

impl Conn {
    async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<()> {
        match self {
            Conn::Zoned(c) => {
                c.put(PutRequest {
                    key,
                    value,
                    prev_kv: false,
                })
                .await?;
            }
            Conn::Etcd(c) => {
                c.put(key, value, None).await?;
            }
        }
        Ok(())
    }

    /// A linearizable read (the default of both).
    async fn get(&mut self, key: Vec<u8>) -> Result<()> {
        match self {
            Conn::Zoned(c) => {
                c.get(GetRequest {
                    key,
                    serializable: false,
                })
                .await?;
            }
            Conn::Etcd(c) => {
                c.get(key, None).await?;
            }
        }
        Ok(())
    }
}

async fn connect(system: System, endpoint: &str) -> Result<Conn> {
    Ok(match system {
        System::Zoned => Conn::Zoned(KvClient::new(crate::cluster::channel(endpoint).await?)),
        System::Etcd => {
            let opts = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(3))
                .with_timeout(Duration::from_secs(10))
                .with_tls(crate::cluster::etcd_tls());
            Conn::Etcd(Box::new(
                etcd_client::Client::connect([endpoint], Some(opts))
                    .await
                    .with_context(|| format!("connecting to etcd at {endpoint}"))?
                    .kv_client(),
            ))
        }
    })
}

pub fn key(n: u64) -> Vec<u8> {
    let k = format!("k{n:015}").into_bytes();
    debug_assert_eq!(k.len(), KEY_BYTES);
    k
}

/// What one workload measured.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// CPU time of the three servers per operation, µs.
    pub server_cpu_us_per_op: f64,
    /// CPU time of the benchmark's clients per operation, µs.
    pub client_cpu_us_per_op: f64,
    /// Leader elections (new terms) seen while the workload ran.
    pub elections: u64,
}

/// Latency at quantile `q` of sorted microseconds, in ms.
pub fn quantile_ms(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
    f64::from(sorted_us[rank - 1]) / 1000.0
}

/// What one timed slice of a workload measured, to be merged with the
/// other slices of the same workload and system.
#[derive(Debug, Default)]
pub struct Sample {
    /// Latency of each successful operation, microseconds.
    pub latencies_us: Vec<u32>,
    pub errors: u64,
    pub seconds: f64,
    /// CPU time the system's three servers used meanwhile, ms.
    pub server_cpu_ms: f64,
    /// CPU time the benchmark's own clients used meanwhile, ms.
    pub client_cpu_ms: f64,
    /// Leader elections (new terms) seen meanwhile.
    pub elections: u64,
}

impl Sample {
    pub fn merge(&mut self, other: Sample) {
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
        self.seconds += other.seconds;
        self.server_cpu_ms += other.server_cpu_ms;
        self.client_cpu_ms += other.client_cpu_ms;
        self.elections += other.elections;
    }

    pub fn figures(mut self) -> Figures {
        self.latencies_us.sort_unstable();
        let all = &self.latencies_us;
        let ops = all.len() as u64;
        let per_op = |ms: f64| {
            if ops > 0 {
                ms * 1000.0 / ops as f64
            } else {
                0.0
            }
        };
        Figures {
            ops,
            errors: self.errors,
            seconds: self.seconds,
            ops_per_sec: if self.seconds > 0.0 {
                ops as f64 / self.seconds
            } else {
                0.0
            },
            p50_ms: quantile_ms(all, 0.50),
            p99_ms: quantile_ms(all, 0.99),
            p999_ms: quantile_ms(all, 0.999),
            server_cpu_us_per_op: per_op(self.server_cpu_ms),
            client_cpu_us_per_op: per_op(self.client_cpu_ms),
            elections: self.elections,
        }
    }
}

/// Runs `kind` from `clients` concurrent clients against `endpoint` for
/// `seconds`, or until `max_ops` operations are done, on keys drawn from
/// the first `keys`.
pub async fn run(
    system: System,
    endpoint: &str,
    kind: Kind,
    clients: usize,
    seconds: f64,
    max_ops: u64,
    keys: u64,
) -> Result<Sample> {
    let conns = clients.div_ceil(CLIENTS_PER_CONN);
    let mut pool = Vec::with_capacity(conns);
    for _ in 0..conns {
        pool.push(connect(system, endpoint).await?);
    }
    let issued = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let mut conn = pool[i % conns].clone();
        let issued = issued.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(4096);
            let value = vec![b'v'; VALUE_BYTES];
            while Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < max_ops {
                let k = key(rand::random_range(0..keys));
                let write = match kind {
                    Kind::Put => true,
                    Kind::Read => false,
                    Kind::Mixed => rand::random_range(0..10) == 0,
                };
                let t0 = Instant::now();
                let r = if write {
                    conn.put(k, value.clone()).await
                } else {
                    conn.get(k).await
                };
                let us = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                match r {
                    Ok(()) => lat.push(us),
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("  {system:?} {}: {e:#}", kind.name());
                        }
                    }
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    Ok(Sample {
        latencies_us: all,
        errors: errors.load(Ordering::Relaxed),
        seconds: start.elapsed().as_secs_f64(),
        server_cpu_ms: 0.0,
        client_cpu_ms: 0.0,
        elections: 0,
    })
}

/// Writes each of the first `keys` keys once (64 clients), so reads find
/// values.
pub async fn fill(system: System, endpoint: &str, keys: u64) -> Result<()> {
    let mut conn = connect(system, endpoint).await?;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut c = conn.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= keys {
                    return Ok::<(), anyhow::Error>(());
                }
                c.put(key(n), vec![b'v'; VALUE_BYTES]).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    conn.get(key(0)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_ranks_of_the_sorted_latencies() {
        let v: Vec<u32> = (1..=1000).map(|i| i * 1000).collect();
        assert_eq!(quantile_ms(&v, 0.5), 500.0);
        assert_eq!(quantile_ms(&v, 0.99), 990.0);
        assert_eq!(quantile_ms(&v, 0.999), 999.0);
        assert_eq!(quantile_ms(&[7000], 0.999), 7.0);
        assert_eq!(quantile_ms(&[], 0.5), 0.0);
        assert_eq!(key(42).len(), KEY_BYTES);
    }
}
