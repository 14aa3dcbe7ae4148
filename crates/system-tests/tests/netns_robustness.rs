//! The nemesis, as CI runs it: a few minutes of faults on three servers
//! (zoned and zone-vip) in network namespaces, with clients through the
//! VIP and straight to each server, then every check
//! (`testbed::nemesis`; `cargo xtask robustness --minutes N` runs longer
//! ones). Root only; the testbed fails with the reason otherwise.
//!
//! `ZONED_NEMESIS_SECONDS` (default 180) and `ZONED_NEMESIS_SEED` (default
//! random, printed) change the run.

use std::time::Duration;

use testbed::nemesis::{run, Options};

#[test]
fn the_zone_keeps_every_promise_through_minutes_of_faults() {
    let env = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    let seconds = env("ZONED_NEMESIS_SECONDS").unwrap_or(180);
    let seed = env("ZONED_NEMESIS_SEED").unwrap_or_else(rand::random);
    eprintln!("nemesis seed {seed}: replay the schedule with ZONED_NEMESIS_SEED={seed}");
    let opts = Options {
        duration: Duration::from_secs(seconds),
        seed,
        clients: 8,
        out_dir: testbed::bin_dir().join("robustness"),
        check_budget: Duration::from_secs(120),
    };
    let report = run(&opts, &mut |line| eprintln!("{line}"));
    eprintln!("{}", report.table());
    assert!(
        report.passed(),
        "the nemesis found problems (seed {seed}); the table above says which"
    );
}
