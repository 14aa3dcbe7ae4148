//! `kvbench`: Zoned against etcd on one machine, in one run. Starts a
//! three-server cluster of each on loopback (data in one directory, fsync
//! on for both), drives the same workloads through each one's own gRPC API
//! (for etcd, the etcd-client crate), always at the leader, and prints one
//! table: throughput, p50, p99 and p99.9 latency, and the ratio Zoned/etcd.
//! The same goes to `<out>/kv-<unix time>.json`. Run it as `cargo xtask
//! bench kv` (a release build of zoned and of this).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

mod cluster;
mod floor;
mod load;
mod machine;

use load::{Figures, Kind, System};

#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// The zoned binary. Default: `zoned` beside this program.
    #[arg(long)]
    zoned: Option<PathBuf>,
    /// The etcd binary (Debian's etcd-server).
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd: PathBuf,
    /// Where the JSON report goes; both clusters keep their data in
    /// <out>/kv-data (removed before and after), so on the same disk.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Seconds per workload and system.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Each workload's time is cut into this many rounds, the two systems
    /// taking turns (Zoned first in odd rounds, etcd in even ones), so that
    /// a change in the machine's speed during the run (other tenants,
    /// writeback) falls on both alike.
    #[arg(long, default_value_t = 4)]
    rounds: u32,
    /// Stop a workload after this many operations (a smoke run).
    #[arg(long, default_value_t = u64::MAX)]
    max_ops: u64,
    /// Keys drawn from (16 bytes each; values are 256 bytes). Written once
    /// before the reads.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Concurrent clients for the put workloads (one client is always run
    /// first).
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    put_clients: Vec<usize>,
    /// Concurrent clients for the linearizable reads.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    read_clients: Vec<usize>,
    /// Concurrent clients for the 90/10 read/write mix.
    #[arg(long, default_value_t = 64)]
    mixed_clients: usize,
}

struct Row {
    kind: Kind,
    clients: usize,
    zoned: Figures,
    etcd: Figures,
}

impl Row {
    /// Zoned's throughput over etcd's.
    fn ratio(&self) -> f64 {
        if self.etcd.ops_per_sec > 0.0 {
            self.zoned.ops_per_sec / self.etcd.ops_per_sec
        } else {
            0.0
        }
    }

    /// etcd's servers' CPU per operation over Zoned's: above 1, Zoned spends less.
    fn cpu_ratio(&self) -> f64 {
        if self.zoned.server_cpu_us_per_op > 0.0 {
            self.etcd.server_cpu_us_per_op / self.zoned.server_cpu_us_per_op
        } else {
            0.0
        }
    }
}

fn figures_json(f: &Figures) -> serde_json::Value {
    serde_json::json!({
        "ops": f.ops,
        "errors": f.errors,
        "seconds": round(f.seconds, 3),
        "ops_per_sec": round(f.ops_per_sec, 1),
        "p50_ms": round(f.p50_ms, 3),
        "p99_ms": round(f.p99_ms, 3),
        "p999_ms": round(f.p999_ms, 3),
        "server_cpu_us_per_op": round(f.server_cpu_us_per_op, 1),
        "client_cpu_us_per_op": round(f.client_cpu_us_per_op, 1),
        "elections": f.elections,
    })
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("kvbench: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    if args.seconds <= 0.0 {
        bail!("--seconds must be more than 0");
    }
    if args.keys == 0 {
        bail!("--keys must be at least 1");
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let zoned_bin = match &args.zoned {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this program's directory")?
            .join("zoned"),
    };
    let data = args.out.join("kv-data");
    if data.exists() {
        std::fs::remove_dir_all(&data).with_context(|| format!("removing {}", data.display()))?;
    }
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;

    eprintln!("the machine: fsync and loopback round trip...");
    let fsync_ms = machine::fsync_p50_ms(&data, 200)?;
    let rtt_ms = machine::loopback_rtt_p50_ms(2000)?;
    eprintln!("  fsync (256 B append + fdatasync) p50 {fsync_ms:.3} ms, loopback TCP round trip p50 {rtt_ms:.3} ms");
    let bare_ms = machine::bare_replicated_write_p50_ms(&data, 1000)?;
    eprintln!(
        "  bare replicated write (client -> leader -> follower, both fsync) p50 {bare_ms:.3} ms"
    );
    let grpc_ms = floor::grpc_replicated_write_p50_ms(&data, 1000).await?;
    eprintln!(
        "  the same over gRPC (tonic unary hops in plaintext, a disk thread per server) p50 {grpc_ms:.3} ms"
    );

    let net = cluster::loopback_net();
    let up = Duration::from_secs(60);
    cluster::init_pki(&data.join("pki"))?;
    eprintln!(
        "starting three zoned ({}) and three etcd ({}) on 127.{}.{}.0/24, TLS with client certificates on every port of both, data in {}...",
        zoned_bin.display(),
        args.etcd.display(),
        net[0],
        net[1],
        data.display()
    );
    let (mut zoned, zoned_leader) = cluster::zoned(&zoned_bin, &data, net, up).await?;
    let (mut etcd, etcd_leader) = cluster::etcd(&args.etcd, &data, net, up).await?;
    eprintln!(
        "  zoned leader {} (term {}); {} leader {} (term {})",
        zoned_leader.endpoint,
        zoned_leader.term,
        etcd.version,
        etcd_leader.endpoint,
        etcd_leader.term
    );

    // The leader each system's clients go to. It is looked up again before
    // every round: after an election the next round goes to the new
    // leader, not through a follower, and the election is reported.
    let systems = [System::Zoned, System::Etcd];
    let mut leaders = [zoned_leader, etcd_leader];
    let settle = Duration::from_secs(30);
    let mut plan: Vec<(Kind, usize)> = vec![(Kind::Put, 1)];
    plan.extend(args.put_clients.iter().map(|&c| (Kind::Put, c)));
    plan.extend(args.read_clients.iter().map(|&c| (Kind::Read, c)));
    plan.push((Kind::Mixed, args.mixed_clients));
    if plan.iter().any(|&(_, c)| c == 0) {
        bail!("client counts must be at least 1");
    }

    let mut rows = Vec::new();
    let mut filled = false;
    for (kind, clients) in plan {
        if kind != Kind::Put && !filled {
            for (system, leader) in systems.iter().zip(&leaders) {
                eprintln!("writing the {} keys once on {system:?}...", args.keys);
                load::fill(*system, &leader.endpoint, args.keys).await?;
            }
            filled = true;
        }
        let rounds = args.rounds;
        let slice = args.seconds / f64::from(rounds);
        let max_ops = if args.max_ops == u64::MAX {
            u64::MAX
        } else {
            args.max_ops.div_ceil(u64::from(rounds))
        };
        let mut samples = [load::Sample::default(), load::Sample::default()];
        for round in 0..rounds {
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let system = systems[i];
                let leader = match system {
                    System::Zoned => zoned.wait_leader(settle).await?,
                    System::Etcd => etcd.wait_leader(settle).await?,
                };
                let mut elections = 0;
                if leader.term != leaders[i].term {
                    eprintln!(
                        "  note: {system:?} elected a leader in term {} (was {}), now {}",
                        leader.term, leaders[i].term, leader.endpoint
                    );
                    elections += 1;
                }
                leaders[i] = leader;
                let ep = leaders[i].endpoint.as_str();
                let server_cpu = || match system {
                    System::Zoned => zoned.cpu_ms(),
                    System::Etcd => etcd.cpu_ms(),
                };
                let (server0, client0) = (server_cpu()?, machine::cpu_ms(None)?);
                let mut s = load::run(system, ep, kind, clients, slice, max_ops, args.keys).await?;
                s.server_cpu_ms = server_cpu()? - server0;
                s.client_cpu_ms = machine::cpu_ms(None)? - client0;
                // An election during the round: the leader moved on while
                // the clients still sent to it.
                let term = match system {
                    System::Zoned => zoned.term(ep).await,
                    System::Etcd => etcd.term(ep).await,
                };
                if let Some(t) = term.filter(|&t| t != leaders[i].term) {
                    eprintln!(
                        "  note: {system:?} left term {} for {t} during {} {clients} round {}",
                        leaders[i].term,
                        kind.name(),
                        round + 1
                    );
                    elections += 1;
                    leaders[i].term = t;
                }
                s.elections = elections;
                samples[i].merge(s);
            }
        }
        let [zoned_s, etcd_s] = samples;
        let (zoned_f, etcd_f) = (zoned_s.figures(), etcd_s.figures());
        for (system, f) in [(System::Zoned, &zoned_f), (System::Etcd, &etcd_f)] {
            eprintln!(
                "  {:<6} {:>4} clients {:<6} {:>9.0} ops/s  p50 {:>7.3} ms  p99 {:>7.3} ms{}",
                kind.name(),
                clients,
                format!("{system:?}"),
                f.ops_per_sec,
                f.p50_ms,
                f.p99_ms,
                match (f.errors, f.elections) {
                    (0, 0) => String::new(),
                    (e, 0) => format!("  ({e} errors)"),
                    (0, n) => format!("  ({n} elections)"),
                    (e, n) => format!("  ({e} errors, {n} elections)"),
                }
            );
        }
        rows.push(Row {
            kind,
            clients,
            zoned: zoned_f,
            etcd: etcd_f,
        });
    }
    let etcd_version = etcd.version.clone();
    drop(zoned);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&data);

    // The table.
    println!();
    println!(
        "{:<8} {:>7} | {:>9} {:>8} {:>8} {:>8} | {:>9} {:>8} {:>8} {:>8} | {:>6}",
        "WORKLOAD",
        "CLIENTS",
        "ZONED/s",
        "p50 ms",
        "p99 ms",
        "p99.9",
        "ETCD/s",
        "p50 ms",
        "p99 ms",
        "p99.9",
        "RATIO"
    );
    for r in &rows {
        println!(
            "{:<8} {:>7} | {:>9.0} {:>8.3} {:>8.3} {:>8.3} | {:>9.0} {:>8.3} {:>8.3} {:>8.3} | {:>5.2}x",
            r.kind.name(),
            r.clients,
            r.zoned.ops_per_sec,
            r.zoned.p50_ms,
            r.zoned.p99_ms,
            r.zoned.p999_ms,
            r.etcd.ops_per_sec,
            r.etcd.p50_ms,
            r.etcd.p99_ms,
            r.etcd.p999_ms,
            r.ratio()
        );
    }
    // CPU per operation does not depend on how fast the shared machine
    // happened to be, so it compares the two more steadily than throughput.
    println!();
    println!(
        "{:<8} {:>7} | {:>11} {:>11} | {:>11} {:>11} | {:>6}",
        "CPU us/op", "CLIENTS", "ZONED srv", "client", "ETCD srv", "client", "E/Z"
    );
    for r in &rows {
        println!(
            "{:<8} {:>8} | {:>11.0} {:>11.0} | {:>11.0} {:>11.0} | {:>5.2}x",
            r.kind.name(),
            r.clients,
            r.zoned.server_cpu_us_per_op,
            r.zoned.client_cpu_us_per_op,
            r.etcd.server_cpu_us_per_op,
            r.etcd.client_cpu_us_per_op,
            r.cpu_ratio()
        );
    }
    let errors: u64 = rows.iter().map(|r| r.zoned.errors + r.etcd.errors).sum();
    println!(
        "machine: fsync p50 {fsync_ms:.3} ms, loopback round trip p50 {rtt_ms:.3} ms, bare replicated write p50 {bare_ms:.3} ms, over gRPC {grpc_ms:.3} ms; {}; {} s per workload and system in {} alternating rounds{}",
        etcd_version,
        args.seconds,
        args.rounds,
        if errors > 0 { format!("; {errors} failed operations (not counted)") } else { String::new() }
    );
    let of = |r: &Row, system: System| match system {
        System::Zoned => r.zoned.elections,
        System::Etcd => r.etcd.elections,
    };
    for system in systems {
        let at: Vec<String> = rows
            .iter()
            .filter(|r| of(r, system) > 0)
            .map(|r| format!("{} {}", r.kind.name(), r.clients))
            .collect();
        if !at.is_empty() {
            let n: u64 = rows.iter().map(|r| of(r, system)).sum();
            println!(
                "warning: {system:?} elected a new leader {n} time(s), in or before: {}; those rows did not measure a steady cluster",
                at.join(", ")
            );
        }
    }

    // The targets, printed, not asserted.
    let find = |k: Kind, c: usize| rows.iter().find(|r| r.kind == k && r.clients == c);
    let mut targets = Vec::new();
    if let Some(r) = find(Kind::Put, 1) {
        let bound = 1.5 * (fsync_ms + rtt_ms);
        targets.push((
            "sequential put p50 no worse than etcd's".to_owned(),
            r.zoned.p50_ms <= r.etcd.p50_ms,
            format!("{:.3} vs {:.3} ms", r.zoned.p50_ms, r.etcd.p50_ms),
        ));
        targets.push((
            "sequential put p50 within 1.5 x (fsync + round trip)".to_owned(),
            r.zoned.p50_ms <= bound,
            format!(
                "{:.3} vs {:.3} ms; a bare replicated write here: {bare_ms:.3} ms, over gRPC {grpc_ms:.3} ms",
                r.zoned.p50_ms, bound
            ),
        ));
    }
    for c in [64, 256] {
        if let Some(r) = find(Kind::Put, c) {
            targets.push((
                format!("put, {c} clients: at least 1.5 x etcd's throughput"),
                r.ratio() >= 1.5,
                format!("{:.2}x", r.ratio()),
            ));
        }
    }
    if let Some(r) = find(Kind::Read, 64) {
        targets.push((
            "linearizable read, 64 clients: at least etcd's throughput".to_owned(),
            r.ratio() >= 1.0,
            format!("{:.2}x", r.ratio()),
        ));
    }
    for (what, met, detail) in &targets {
        println!(
            "target: {what}: {} ({detail})",
            if *met { "met" } else { "NOT met" }
        );
    }

    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let report = serde_json::json!({
        "machine": {
            "fsync_p50_ms": round(fsync_ms, 3),
            "loopback_rtt_p50_ms": round(rtt_ms, 3),
            "bare_replicated_write_p50_ms": round(bare_ms, 3),
            "grpc_replicated_write_p50_ms": round(grpc_ms, 3),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        },
        "etcd_version": etcd_version,
        "zoned": zoned_bin.display().to_string(),
        "seconds_per_workload": args.seconds,
        "rounds": args.rounds,
        "max_ops": if args.max_ops == u64::MAX { serde_json::Value::Null } else { args.max_ops.into() },
        "keys": args.keys,
        "key_bytes": load::KEY_BYTES,
        "value_bytes": load::VALUE_BYTES,
        "rows": rows.iter().map(|r| serde_json::json!({
            "workload": r.kind.name(),
            "clients": r.clients,
            "zoned": figures_json(&r.zoned),
            "etcd": figures_json(&r.etcd),
            "ratio": round(r.ratio(), 3),
            "server_cpu_ratio": round(r.cpu_ratio(), 3),
        })).collect::<Vec<_>>(),
        "targets": targets.iter().map(|(w, m, d)| serde_json::json!({"target": w, "met": m, "figures": d})).collect::<Vec<_>>(),
    });
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join(format!("kv-{stamp}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("written to {}", path.display());
    Ok(())
}
