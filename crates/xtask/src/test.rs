//! `cargo xtask test`: the test suite by tier, fastest first (DESIGN.md's
//! tiers). Each tier is a nextest filter set; every test is in exactly one,
//! which `cargo xtask test --tiers` checks (CI runs it).

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// One tier: what it is, what it needs, and its nextest filter.
#[derive(Debug, Clone, Copy)]
pub struct Tier {
    pub number: u8,
    pub what: &'static str,
    pub needs: &'static str,
    pub filter: &'static str,
}

pub const TIERS: [Tier; 5] = [
    Tier {
        number: 1,
        what: "unit tests beside the code, zonectl's golden output, the linearizability checker's",
        needs: "nothing",
        filter: "kind(lib) | kind(bin) | (package(zonectl) & binary(golden)) | (package(lincheck) & kind(test))",
    },
    Tier {
        number: 2,
        what: "in-process zones of Raft drivers on simulated time",
        needs: "nothing",
        filter: "package(zoned) & kind(test)",
    },
    Tier {
        number: 3,
        what: "real processes on loopback (zoned, zone-sync, zonectl, kvbench)",
        needs: "the workspace's binaries (built first); etcd for kvbench; qemu-user for cpu",
        filter: "(package(system-tests) & kind(test) & !binary(/^netns/) & !binary(/^vm_/)) | (package(kvbench) & kind(test))",
    },
    Tier {
        number: 4,
        what: "network namespaces: zoned and zone-vip for real, VIPs and ARP; the nemesis",
        needs: "root, iproute2, nftables; the workspace's binaries",
        filter: "package(system-tests) & binary(/^netns/)",
    },
    Tier {
        number: 5,
        what: "three VMs booted from the image under QEMU",
        needs: "root; the images (cargo xtask image --profile vm and --profile metal)",
        filter: "package(system-tests) & binary(/^vm_/)",
    },
];

/// Runs tier `n` (binaries built first for the tiers that start them).
pub fn run(mut cargo: impl FnMut() -> Command, n: u8) -> Result<()> {
    let tier = TIERS
        .iter()
        .find(|t| t.number == n)
        .with_context(|| format!("--tier: {n} is not a tier (1 to {})", TIERS.len()))?;
    eprintln!("tier {}: {} (needs {})", tier.number, tier.what, tier.needs);
    if tier.number >= 3 {
        eprintln!("building the workspace's binaries...");
        crate::run(&mut crate::cargo_build(&["--workspace", "--bins"]))?;
    }
    crate::run(cargo().args([
        "nextest",
        "run",
        "--workspace",
        "--cargo-profile",
        crate::PROFILE,
        "-E",
        tier.filter,
    ]))
}

/// The tests of the whole workspace each tier selects, by name.
fn listed(cargo: &mut impl FnMut() -> Command, filter: Option<&str>) -> Result<Vec<String>> {
    let mut cmd = cargo();
    cmd.args([
        "nextest",
        "list",
        "--workspace",
        "--cargo-profile",
        crate::PROFILE,
    ]);
    cmd.args(["-T", "oneline"]);
    if let Some(f) = filter {
        cmd.args(["-E", f]);
    }
    let out = cmd.output().context("cannot run cargo nextest list")?;
    if !out.status.success() {
        bail!(
            "cargo nextest list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

/// Prints each tier's size, and fails if a test is in no tier or in two.
pub fn check(mut cargo: impl FnMut() -> Command) -> Result<()> {
    let all = listed(&mut cargo, None)?;
    let mut tier_of: BTreeMap<&str, Vec<u8>> =
        all.iter().map(|t| (t.as_str(), Vec::new())).collect();
    for tier in TIERS {
        let tests = listed(&mut cargo, Some(tier.filter))?;
        println!(
            "tier {}: {:>4} tests: {}",
            tier.number,
            tests.len(),
            tier.what
        );
        for t in &tests {
            if let Some(tiers) = tier_of.get_mut(t.as_str()) {
                tiers.push(tier.number);
            }
        }
    }
    let mut bad = Vec::new();
    for (test, tiers) in &tier_of {
        match tiers.len() {
            1 => {}
            0 => bad.push(format!("in no tier: {test}")),
            _ => bad.push(format!("in tiers {tiers:?}: {test}")),
        }
    }
    println!("all:    {:>4} tests", all.len());
    if !bad.is_empty() {
        bail!(
            "every test must be in exactly one tier (crates/xtask/src/test.rs):\n{}",
            bad.join("\n")
        );
    }
    Ok(())
}
