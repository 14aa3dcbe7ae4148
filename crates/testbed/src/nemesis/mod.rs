//! The nemesis on real processes (`cargo xtask robustness`, and a CI test
//! of a few minutes): three servers running zoned and zone-vip in network
//! namespaces; clients in the client namespace putting, compare-and-swapping
//! and reading keys through the VIP and through each server directly; a
//! watcher from revision 1; a sampler of who holds the VIP; and faults one
//! after another (kill -9 of the leader, of a follower, of all; SIGSTOP of
//! zoned and of zone-vip; a link down; one-way loss; and, each server's
//! data being on a disk of its own (ext4 on a loop device), a full disk
//! (filled to below the free-space floor) and a disk stall (fsfreeze:
//! writes and syncs block in the kernel until thawed)).
//!
//! Every operation is recorded with its invocation and completion times
//! and its result, or as indeterminate when no answer came. Once the faults
//! stop and everything is healed, the checks run: each key's history is
//! linearizable as a register with compare-and-set (`lincheck`), no
//! acknowledged write is lost and none applied twice, no client sees
//! revisions go back, the watch saw every revision in order and ends where
//! the final reads are, the servers converge within 10 s, the VIP was never
//! on two servers at once, and no process exited unless killed.
//!

mod checks;
mod clients;
mod faults;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

pub use checks::Check;
pub use faults::{Fault, Kind};

use crate::{holders_of, wait_for, Testbed};

/// Each server's data directory: a disk of its own of this size (MiB,
/// ext4 on a loop device), so that the full-disk fault fills it in an
/// instant...
const DATA_MB: u64 = 256;
/// ...to below this free-space floor (`limits.min_free_disk_mb`).
const FLOOR_MB: u64 = 32;
/// How long the clients go on after the faults are healed.
const WRITES_AFTER_HEAL: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long faults are injected.
    pub duration: Duration,
    /// Seeds the fault schedule and the clients' choices.
    pub seed: u64,
    /// Concurrent clients.
    pub clients: u64,
    /// Where the JSON report goes (a directory).
    pub out_dir: PathBuf,
    /// Time the linearizability search may take, over all keys.
    pub check_budget: Duration,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: u64,
    pub seconds: u64,
    /// Operations by kind and outcome.
    pub operations: BTreeMap<String, u64>,
    /// Faults by kind.
    pub fault_counts: BTreeMap<String, u64>,
    pub checks: Vec<Check>,
    pub faults: Vec<Fault>,
    pub vip: checks::VipSamples,
    /// Where the report was written.
    pub path: PathBuf,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut t = String::new();
        t.push_str(&format!(
            "seed {}, {} s of faults\n\nOPERATIONS\n",
            self.seed, self.seconds
        ));
        for (k, n) in &self.operations {
            t.push_str(&format!("  {k:<28} {n:>8}\n"));
        }
        t.push_str("\nFAULTS\n");
        for (k, n) in &self.fault_counts {
            t.push_str(&format!("  {k:<28} {n:>8}\n"));
        }
        t.push_str("\nCHECKS\n");
        for c in &self.checks {
            let verdict = if c.passed { "PASS" } else { "FAIL" };
            let mut lines = c.detail.lines();
            let first = lines.next().unwrap_or_default();
            let more = if lines.next().is_some() {
                " (more in the report)"
            } else {
                ""
            };
            t.push_str(&format!("  {verdict}  {:<48} {first}{more}\n", c.name));
        }
        t.push_str(&format!("\nreport: {}\n", self.path.display()));
        t
    }
}

/// Samples who holds the VIP in every server's namespace until stopped.
fn sample_vip(
    namespaces: Vec<String>,
    vip: String,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<checks::VipSamples> {
    std::thread::spawn(move || {
        let mut s = checks::VipSamples::default();
        while !stop.load(Ordering::Relaxed) {
            let h = holders_of(&namespaces, &vip);
            s.samples += 1;
            match h.len() {
                0 => s.none += 1,
                1 => {}
                _ => s.overlaps.push((start.elapsed().as_millis() as u64, h)),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    })
}

fn count_operations(ops: &[clients::Recorded]) -> BTreeMap<String, u64> {
    use lincheck::{Op, Outcome};
    let mut m = BTreeMap::new();
    for r in ops {
        let kind = match r.op.op {
            Op::Read => "read",
            Op::Write(_) => "put",
            Op::Cas { .. } => "compare-and-swap",
        };
        let outcome = match (&r.op.outcome, &r.error) {
            (Outcome::Unknown, Some(code)) => format!("error {code}"),
            (Outcome::Unknown, None) => "indeterminate".into(),
            (Outcome::Swapped(false), _) => "refused".into(),
            _ => "ok".into(),
        };
        *m.entry(format!("{kind} {outcome}")).or_default() += 1;
    }
    m.insert("all".into(), ops.len() as u64);
    m
}

/// `YYYYmmddTHHMMSSZ` for now (UTC), for the report's name.
fn timestamp() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Runs the nemesis; `progress` gets a line now and then. Panics if the
/// testbed cannot be built (not root, no iproute2).
pub fn run(opts: &Options, progress: &mut dyn FnMut(&str)) -> Report {
    let mut tb = Testbed::start_on_own_disks(3, DATA_MB, FLOOR_MB);
    progress("three servers started (zoned + zone-vip each, data on disks of their own); waiting for the VIP");
    wait_for(Duration::from_secs(60), "a VIP holder", || {
        (tb.holders().len() == 1).then_some(())
    });
    let start = Instant::now();
    let shared = Arc::new(clients::Shared::default());
    let targets = clients::Targets {
        servers: tb.nodes.iter().map(|n| format!("{}:7400", n.ip)).collect(),
        vip: format!("{}:7400", tb.vip),
        creds: tb.pki.admin().clone(),
    };
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let sampler = sample_vip(tb.namespaces(), tb.vip.clone(), start, stop_sampler.clone());
    let ns_path = Path::new("/run/netns").join(&tb.client_ns);
    let (control, recording) = clients::start(
        ns_path,
        targets,
        opts.clients,
        opts.seed,
        start,
        shared.clone(),
    );
    let mut last_line = Instant::now();
    let kinds = faults::KINDS.to_vec();
    let mut nemesis = faults::Nemesis::new(
        &mut tb,
        shared,
        StdRng::seed_from_u64(opts.seed),
        start,
        kinds,
        FLOOR_MB,
    );
    nemesis.run_until(start + opts.duration, &mut |log: &[Fault]| {
        if last_line.elapsed() >= Duration::from_secs(10) {
            last_line = Instant::now();
            progress(&format!(
                "{:>5} s: {} faults",
                start.elapsed().as_secs(),
                log.len()
            ));
        }
    });
    nemesis.heal();
    // The clients go on a while after the last heal: every fault, the last
    // one included, must be followed by acknowledged writes (a full disk
    // healed as the run ended had none to show).
    std::thread::sleep(WRITES_AFTER_HEAL);
    let _ = control.stop_clients.send(true);
    let faults_log = std::mem::take(&mut nemesis.log);
    let exits = std::mem::take(&mut nemesis.exits);
    drop(nemesis);
    let _ = control.healed.send(true);
    progress("faults over, all healed: measuring convergence, final reads");
    let rec = recording.join().expect("the clients' thread");
    stop_sampler.store(true, Ordering::Relaxed);
    let vip = sampler.join().expect("the VIP sampler");
    progress(&format!(
        "checking {} operations (linearizability search up to {} s)",
        rec.ops.len(),
        opts.check_budget.as_secs()
    ));
    let (lost, twice) = checks::writes(&rec);
    let checks = vec![
        checks::linearizable(&rec, opts.check_budget),
        lost,
        twice,
        checks::client_revisions(&rec),
        checks::watch(&rec),
        checks::converged(&rec),
        checks::vip(&vip),
        checks::full_disk(&rec, &faults_log),
        checks::exits(&exits),
    ];
    let mut fault_counts = BTreeMap::new();
    for f in &faults_log {
        *fault_counts.entry(f.kind.name().to_owned()).or_default() += 1;
    }
    let stamp = timestamp();
    let path = opts.out_dir.join(format!("{stamp}.json"));
    let report = Report {
        seed: opts.seed,
        seconds: opts.duration.as_secs(),
        operations: count_operations(&rec.ops),
        fault_counts,
        checks,
        faults: faults_log,
        vip,
        path: path.clone(),
    };
    if let Err(e) = std::fs::create_dir_all(&opts.out_dir).and_then(|()| {
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&report).expect("a report serializes"),
        )
    }) {
        progress(&format!("cannot write {}: {e}", path.display()));
    }
    if !report.passed() {
        // The servers' logs, for reading the failure beside the report.
        let logs = opts.out_dir.join(format!("{stamp}-logs"));
        for n in &tb.nodes {
            for name in ["zoned.log", "zone-vip.log"] {
                let _ = std::fs::create_dir_all(&logs);
                let _ = std::fs::copy(n.dir.join(name), logs.join(format!("n{}-{name}", n.id)));
            }
        }
        progress(&format!("servers' logs: {}", logs.display()));
    }
    drop(tb);
    report
}
