//! Simulated histories: clients against a true atomic register (so
//! linearizable), and the same histories with one read made stale (so not).

mod common;

use std::time::{Duration, Instant};

use common::{simulate, stale_read, Sim};
use lincheck::{check, Verdict};

const BUDGET: Duration = Duration::from_secs(60);

#[test]
fn true_register_histories_are_linearizable() {
    for seed in 0..60 {
        let sim = Sim {
            clients: 2 + seed % 7,
            ops: 1_000 + 37 * seed as usize,
            unknowns: (seed % 13) as usize,
            bursts: seed % 2 == 0,
            seed,
        };
        let h = simulate(sim);
        let v = check(&h, None, BUDGET);
        assert_eq!(v, Verdict::Linearizable, "{sim:?}");
    }
}

#[test]
fn many_unknowns_and_clients() {
    for seed in 100..110 {
        let sim = Sim {
            clients: 12,
            ops: 2_000,
            unknowns: 150,
            bursts: seed % 2 == 0,
            seed,
        };
        let h = simulate(sim);
        let start = Instant::now();
        let v = check(&h, None, BUDGET);
        println!("{sim:?}: {v:?} in {:?}", start.elapsed());
        assert_eq!(v, Verdict::Linearizable, "{sim:?}");
    }
}

#[test]
fn a_stale_read_is_a_violation() {
    let mut mutated = 0;
    for seed in 0..60 {
        let sim = Sim {
            clients: 2 + seed % 7,
            ops: 1_000 + 37 * seed as usize,
            unknowns: (seed % 13) as usize,
            bursts: seed % 2 == 0,
            seed,
        };
        let mut h = simulate(sim);
        let Some(r) = stale_read(&mut h, seed) else {
            continue;
        };
        mutated += 1;
        let start = Instant::now();
        match check(&h, None, BUDGET) {
            Verdict::Violation { explanation } => {
                if seed < 3 {
                    println!(
                        "{sim:?}, read #{r} made stale, {:?}:\n{explanation}\n",
                        start.elapsed()
                    );
                }
            }
            other => panic!("{sim:?}, read #{r} made stale: {other:?}"),
        }
    }
    assert!(
        mutated >= 50,
        "only {mutated} histories had a read to make stale"
    );
}

#[test]
fn a_stale_read_among_many_unknowns_is_a_violation() {
    for seed in 200..210 {
        let sim = Sim {
            clients: 12,
            ops: 2_000,
            unknowns: 60,
            bursts: seed % 2 == 0,
            seed,
        };
        let mut h = simulate(sim);
        let Some(r) = stale_read(&mut h, seed) else {
            continue;
        };
        let start = Instant::now();
        let v = check(&h, None, BUDGET);
        println!("{sim:?}, read #{r} made stale: {:?}", start.elapsed());
        assert!(matches!(v, Verdict::Violation { .. }), "{sim:?}: {v:?}");
    }
}

#[test]
fn performance_5000_ops_8_clients_30_unknowns() {
    let mut worst = Duration::ZERO;
    for seed in 0..3 {
        let sim = Sim {
            clients: 8,
            ops: 5_000,
            unknowns: 30,
            bursts: seed % 2 == 1,
            seed: 1_000 + seed,
        };
        let h = simulate(sim);
        let start = Instant::now();
        let v = check(&h, None, BUDGET);
        let took = start.elapsed();
        println!("{sim:?}: {v:?} in {took:?}");
        assert_eq!(v, Verdict::Linearizable);
        worst = worst.max(took);

        let mut bad = h.clone();
        if let Some(r) = stale_read(&mut bad, seed) {
            let start = Instant::now();
            let v = check(&bad, None, BUDGET);
            let took = start.elapsed();
            println!(
                "  with read #{r} made stale: violation={} in {took:?}",
                matches!(v, Verdict::Violation { .. })
            );
            assert!(matches!(v, Verdict::Violation { .. }), "{v:?}");
            worst = worst.max(took);
        }
    }
    println!("worst: {worst:?}");
    assert!(worst < Duration::from_secs(20), "{worst:?}");
}
