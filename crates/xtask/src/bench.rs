//! `cargo xtask bench failover`: what a client sees when the VIP moves, for
//! zone-vip and for keepalived, on the same namespace testbed, in one run.
//!
//! Both setups run the same three-server zone; only what moves the VIP
//! differs. Ungraceful: the VIP holder's server dies (its link is cut and
//! its zoned killed). Graceful: zone-vip's zone transfers leadership;
//! keepalived's master is stopped (SIGTERM: it resigns with priority 0).
//! Measured from the fault to the first write acknowledged through the VIP,
//! with VIP ownership sampled in every namespace meanwhile. A new write
//! attempt starts every 10 ms, overlapping, so the figures are the failover
//! to within 10 ms, not a client's retry interval.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testbed::{holders_of, ClientProbe, Testbed, VipManager};

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("probe runtime");
}

/// One write through `endpoint` on a fresh connection (its TLS handshake
/// included), as a client that just arrived would make it.
pub async fn put_fresh(
    endpoint: &str,
    creds: Option<&zonectl::Credentials>,
    timeout: Duration,
) -> bool {
    let Ok(ep) = zonectl::endpoint(endpoint, creds) else {
        return false;
    };
    let ep = ep.connect_timeout(timeout).timeout(timeout);
    let Ok(Ok(ch)) = tokio::time::timeout(timeout, ep.connect()).await else {
        return false;
    };
    let mut kv = zonectl::v1::kv_client::KvClient::new(ch);
    let req = zonectl::v1::PutRequest {
        key: b"bench".to_vec(),
        value: b"v".to_vec(),
        prev_kv: false,
    };
    matches!(tokio::time::timeout(timeout, kv.put(req)).await, Ok(Ok(_)))
}

/// [`put_fresh`] on this thread's runtime.
fn put_once(endpoint: &str, creds: Option<&zonectl::Credentials>, timeout: Duration) -> bool {
    RT.with(|rt| rt.block_on(put_fresh(endpoint, creds, timeout)))
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Series {
    system: String,
    kind: String,
    runs: usize,
    failover_ms: Vec<f64>,
    /// Most namespaces seen holding the VIP at once, per run.
    holders_max: Vec<usize>,
    /// How many terms the zone went through to elect the new leader, per
    /// ungraceful run (1: the first election won; more: split votes).
    terms: Vec<u64>,
}

/// The zone's term as the server at `endpoint` (client namespace) sees it.
fn term_at(tb: &Testbed, endpoint: &str) -> Option<u64> {
    let out = tb.zonectl(endpoint, &["-o", "json", "show"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get("term")?.as_u64()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Samples VIP ownership until told to stop; returns the most holders seen.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl Sampler {
    fn start(tb: &Testbed) -> Sampler {
        let (ns, vip) = (tb.namespaces(), tb.vip.clone());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = 0;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(holders_of(&ns, &vip).len());
            }
            max
        });
        Sampler { stop, thread }
    }

    fn finish(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(usize::MAX)
    }
}

/// Waits until one namespace has held the VIP for `steady` and a write
/// through it works; returns that namespace.
fn settle(tb: &Testbed, probe: &ClientProbe, vip: &str) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let steady = Duration::from_millis(1500);
    let mut since: Option<(usize, Instant)> = None;
    while Instant::now() < deadline {
        let h = tb.holders();
        match (h.as_slice(), since) {
            ([one], Some((who, t))) if *one == who && t.elapsed() >= steady => {
                if probe.attempt(vip, Duration::from_secs(2)) {
                    return Ok(who);
                }
            }
            ([one], Some((who, _))) if *one == who => {}
            ([one], _) => since = Some((*one, Instant::now())),
            _ => since = None,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("the VIP did not settle on one server within 60 s")
}

fn run_system(manager: VipManager, runs: usize) -> Result<Vec<Series>> {
    let name = match manager {
        VipManager::ZoneVip => "zone-vip",
        VipManager::Keepalived => "keepalived",
    };
    eprintln!("== {name}: starting three servers in namespaces");
    let mut tb = Testbed::start_with(3, manager);
    let creds = tb.pki.admin().clone();
    let probe = ClientProbe::start(&tb, move |ep, t| put_once(ep, Some(&creds), t));
    let vip = format!("{}:7400", tb.vip);
    let mut ungraceful = Series {
        system: name.into(),
        kind: "ungraceful".into(),
        runs,
        ..Default::default()
    };
    let mut graceful = Series {
        system: name.into(),
        kind: "graceful".into(),
        runs,
        ..Default::default()
    };
    for r in 0..runs {
        let h = settle(&tb, &probe, &vip)?;
        let before = term_at(&tb, &vip);
        let sampler = Sampler::start(&tb);
        let t0 = Instant::now();
        tb.set_link(h, false);
        tb.kill9_zoned(h);
        let d = probe
            .until_success(&vip, t0, Duration::from_secs(60))
            .context("no write through the VIP within 60 s")?;
        std::thread::sleep(Duration::from_millis(300));
        let max = sampler.finish();
        // What it took the zone to elect; with keepalived the VIP holder is
        // not always the Raft leader, so this says nothing there.
        let terms = match (before, term_at(&tb, &vip)) {
            (Some(b), Some(a)) => a.saturating_sub(b),
            _ => 0,
        };
        eprintln!(
            "{name} ungraceful {}/{runs}: {:.0} ms, max holders {max}, terms {terms}",
            r + 1,
            d.as_secs_f64() * 1e3
        );
        ungraceful.failover_ms.push(d.as_secs_f64() * 1e3);
        ungraceful.holders_max.push(max);
        if manager == VipManager::ZoneVip {
            ungraceful.terms.push(terms);
        }
        tb.set_link(h, true);
        tb.start_zoned(h);
    }
    for r in 0..runs {
        let h = settle(&tb, &probe, &vip)?;
        let sampler = Sampler::start(&tb);
        let t0 = Instant::now();
        match manager {
            VipManager::ZoneVip => {
                // Ask the holder itself (its own address), in the background.
                let ep = format!("{}:7400", tb.nodes[h].ip);
                let mut child = std::process::Command::new("ip")
                    .args(["netns", "exec", &tb.client_ns])
                    .arg(testbed::binary("zonectl"))
                    .args(["--endpoints", &ep, "leader", "transfer"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()?;
                // The VIP leaves the holder when the transfer starts: wait
                // for that, then for a write through it.
                while tb.holders().contains(&h) && t0.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let d = probe
                    .until_success(&vip, t0, Duration::from_secs(30))
                    .context("no write after transfer")?;
                let _ = child.wait();
                graceful.failover_ms.push(d.as_secs_f64() * 1e3);
            }
            VipManager::Keepalived => {
                tb.terminate_agent(h);
                while tb.holders().contains(&h) && t0.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let d = probe
                    .until_success(&vip, t0, Duration::from_secs(30))
                    .context("no write after keepalived stopped")?;
                graceful.failover_ms.push(d.as_secs_f64() * 1e3);
                tb.start_agent(h);
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let max = sampler.finish();
        graceful.holders_max.push(max);
        eprintln!(
            "{name} graceful {}/{runs}: {:.0} ms, max holders {max}",
            r + 1,
            graceful.failover_ms.last().unwrap()
        );
    }
    Ok(vec![ungraceful, graceful])
}

pub fn failover(runs: usize, out_dir: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the failover benchmark builds network namespaces: run it as root");
    }
    if !Path::new("/usr/sbin/keepalived").exists() {
        bail!("keepalived is missing: run `cargo xtask deps` (it installs Debian's keepalived)");
    }
    let mut all = run_system(VipManager::ZoneVip, runs)?;
    all.extend(run_system(VipManager::Keepalived, runs)?);
    println!();
    println!(
        "{:<11} {:<11} {:>5} {:>9} {:>9} {:>9} {:>13} {:>11}",
        "SYSTEM", "FAULT", "RUNS", "P50 ms", "P99 ms", "MAX ms", "MAX HOLDERS", "SPLIT VOTES"
    );
    for s in &all {
        let mut v = s.failover_ms.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let split = if s.terms.is_empty() {
            "-".to_string()
        } else {
            s.terms.iter().filter(|t| **t > 1).count().to_string()
        };
        println!(
            "{:<11} {:<11} {:>5} {:>9.0} {:>9.0} {:>9.0} {:>13} {:>11}",
            s.system,
            s.kind,
            v.len(),
            pct(&v, 50.0),
            pct(&v, 99.0),
            v.last().copied().unwrap_or(f64::NAN),
            s.holders_max.iter().max().copied().unwrap_or(0),
            split
        );
    }
    let p50 = |sys: &str, kind: &str| {
        all.iter()
            .find(|s| s.system == sys && s.kind == kind)
            .map(|s| {
                let mut v = s.failover_ms.clone();
                v.sort_by(|a, b| a.total_cmp(b));
                pct(&v, 50.0)
            })
    };
    if let (Some(z), Some(k)) = (
        p50("zone-vip", "ungraceful"),
        p50("keepalived", "ungraceful"),
    ) {
        println!("\nungraceful p50: keepalived / zone-vip = {:.1}x", k / z);
    }
    crate::write_results(out_dir, "failover", &serde_json::to_value(&all)?)
}
