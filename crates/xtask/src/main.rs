//! Developer tasks, reached as `cargo xtask <task>`:
//! - `deps`: install the system packages the build and tests need (Debian);
//! - `cluster up`: run a local three-node zone on 127.0.0.1-3 until Ctrl-C;
//! - `image`: build the appliance's disk image;
//! - `ext build`: a payload (Debian packages, a directory) as a system
//!   extension image for the appliance;
//! - `qemu up`: three VMs booted from that image, until Ctrl-C;
//! - `bench failover`: VIP failover, zone-vip against keepalived;
//! - `bench qemu`: image build times and sizes, VM boot and failover times;
//! - `bench kv`: the key-value store against etcd, side by side;
//! - `test --tier N`: one tier of the test suite; `test --tiers`: how many
//!   tests each tier has, and that each test is in exactly one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod bundle;
mod ext;
mod image;
mod qemu;
mod test;

#[derive(Debug, Parser)]
#[command(about = "Zoned developer tasks")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install the Debian packages the build and the tests need (uses sudo
    /// when not root).
    Deps,
    /// A local zone of zoned processes.
    #[command(subcommand)]
    Cluster(ClusterTask),
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(BenchTask),
    /// A virtual cluster of VMs booted from the image (root).
    #[command(subcommand)]
    Qemu(QemuTask),
    /// System extensions: the front-end's own services for the appliance.
    #[command(subcommand)]
    Ext(ExtTask),
    /// One tier of the test suite, fastest first: 1 unit, 2 in-process
    /// zones on simulated time, 3 processes on loopback, 4 network
    /// namespaces (root), 5 VMs under QEMU (root, the images built).
    Test {
        /// The tier to run (1-5).
        #[arg(long, required_unless_present = "tiers", value_parser = clap::value_parser!(u8).range(1..=5))]
        tier: Option<u8>,
        /// Instead: list how many tests each tier holds, and fail if a test
        /// is in no tier or in two.
        #[arg(long, conflicts_with = "tier")]
        tiers: bool,
    },
    /// The nemesis on real processes (root): three servers (zoned and
    /// zone-vip) in network namespaces, clients through the VIP and
    /// straight to each server, and faults one after another (kill -9 of
    /// the leader, a follower, all; SIGSTOP of zoned and of zone-vip; a
    /// link down; one-way loss). Then checks every key's history for
    /// linearizability, lost or doubled writes, the watch, convergence and
    /// the VIP. Prints a table; writes target/robustness/<time>.json.
    Robustness {
        /// Minutes of faults.
        #[arg(long, default_value_t = 3)]
        minutes: u64,
        /// Seed of the fault schedule and the clients' choices (default:
        /// random, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Concurrent clients.
        #[arg(long, default_value_t = 8)]
        clients: u64,
    },
    /// Build the appliance disk image (root): target/image/zoned-<profile>.raw
    /// (for dd onto a disk), .qcow2 (for VMs), the kernel and initrd for
    /// direct kernel boot, the signed update bundle
    /// zoned-<profile>-<version>.bundle, and manifest.json (versions, sizes,
    /// sha256).
    Image {
        /// vm: cloud kernel, virtio-only initramfs; metal: generic kernel
        /// with hardware drivers.
        #[arg(long, value_enum, default_value_t = image::Profile::Vm)]
        profile: image::Profile,
        /// Rebuild the cached Debian root tree (mmdebstrap) even if one made
        /// from the same inputs exists.
        #[arg(long)]
        fresh_root: bool,
        /// The image's version (os-release IMAGE_VERSION, the bundle's
        /// name and manifest); default <workspace version>+<commit>.
        #[arg(long)]
        version: Option<String>,
        /// The minisign secret key that signs the bundle (`minisign -G`;
        /// an encrypted one reads its password from
        /// ZONED_SIGNING_KEY_PASSWORD). Default: a throwaway test key,
        /// target/image/signing/zoned-test.key, made if absent. The image
        /// trusts bundles signed with this key.
        #[arg(long, value_name = "FILE")]
        signing_key: Option<PathBuf>,
        /// Another minisign public key the image trusts bundles from
        /// (repeatable): e.g. the next release key, before rotating to it.
        #[arg(long, value_name = "FILE")]
        trust_key: Vec<PathBuf>,
        /// Write the update bundle only, not the disk image.
        #[arg(long)]
        bundle_only: bool,
        /// Test only (with --bundle-only and --version): a bundle whose
        /// zoned exits at start, so a server upgraded to it is never
        /// healthy and rolls back by itself (the rollback test).
        #[arg(long)]
        never_healthy: bool,
        /// After the image, also write the QEMU upgrade test's two bundles:
        /// version 99.0.0-upgrade-test (this tree), and
        /// 99.0.1-never-healthy (--never-healthy).
        #[arg(long, conflicts_with_all = ["bundle_only", "never_healthy", "version"])]
        test_bundles: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ExtTask {
    /// Build a system extension (systemd-sysext) image of a payload:
    /// target/ext/NAME.raw, to add to a zone with `zonectl ext add`.
    /// From Debian packages it holds what they add to the image's base
    /// (same suite and apt sources, root needed): their files under /usr
    /// and /opt, their system users and groups as userdb records, their
    /// /etc files as defaults under /usr/share/factory/etc.
    Build {
        /// The extension's name (NAME.raw; extension-release.NAME).
        #[arg(long)]
        name: String,
        /// Debian packages to install, separated by spaces or commas
        /// (`name` or `name=version`); their dependencies come too, not
        /// their recommends.
        #[arg(long, value_name = "\"PKG ...\"", default_value = "")]
        packages: String,
        /// A directory of files laid over the result (only usr/ and opt/:
        /// units, drop-ins, scripts), or the whole extension without
        /// --packages.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Where to write the image (default target/ext/NAME.raw).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = ext::Format::Squashfs)]
        format: ext::Format,
    },
    /// mmdebstrap's hook (internal): notes the base's files, users and
    /// packages before the payload's packages are installed.
    #[command(hide = true)]
    Snapshot { root: PathBuf, out: PathBuf },
}

#[derive(Debug, Subcommand)]
enum BenchTask {
    /// VIP failover seen by a client, zone-vip against keepalived, on a
    /// namespace testbed (root). Writes target/bench/failover-<time>.json.
    Failover {
        /// Repetitions of each fault.
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// The image and its VMs (root): build time from scratch and from the
    /// cached root tree, sizes, QEMU start to zoned ready for one VM and
    /// for three at once, failover through the VIP under QEMU. Writes
    /// target/bench/qemu-<time>.json.
    Qemu {
        /// Leader VM kills to time.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Skip the from-scratch image build (reuse the cached root tree).
        #[arg(long)]
        skip_fresh: bool,
    },
    /// Shared storage under QEMU (root): three VMs and nfs-ganesha, one NFS
    /// datastore; time until every VM reports a stopped NFS server, and
    /// until leadership moves when only the leader's path to it is cut
    /// (p50/p99). Writes target/bench/storage-<time>.json.
    Storage {
        /// NFS server stops to time.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Leader path cuts to time.
        #[arg(long, default_value_t = 5)]
        leader_runs: usize,
    },
    /// Zoned against etcd (Debian's etcd-server), three servers each on
    /// loopback, data on the same disk, fsync on: sequential puts, puts
    /// from 16, 64 and 256 clients, linearizable reads from 1 and 64, a
    /// 90/10 mix; throughput and p50/p99/p99.9 latency per system, the
    /// ratio, and the machine's fsync and loopback round trip. Builds a
    /// release zoned first (RocksDB's C++ once more: ~15 min the first
    /// time). Writes target/bench/kv-<time>.json.
    Kv(KvArgs),
}

/// `bench kv` options, handed to kvbench.
#[derive(Debug, clap::Args)]
struct KvArgs {
    /// Seconds per workload and system.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Stop each workload after this many operations.
    #[arg(long)]
    max_ops: Option<u64>,
    /// Rounds per workload, the two systems taking turns.
    #[arg(long, default_value_t = 4)]
    rounds: u32,
    /// Build and run the debug profile instead of release (the binaries
    /// the tests use; much slower, not for figures).
    #[arg(long)]
    debug: bool,
}

#[derive(Debug, Subcommand)]
enum QemuTask {
    /// Boot three VMs from the built vm image (building it if missing) on a
    /// bridge in a network namespace, wait for a leader behind the VIP,
    /// print the zone and how to reach it; Ctrl-C stops everything.
    Up,
}

#[derive(Debug, Subcommand)]
enum ClusterTask {
    /// Build zoned, start N servers on 127.0.0.1..N (client port 7400, peer
    /// port 7401), wait for a leader, print the zone, stop them on Ctrl-C.
    Up {
        /// Number of servers.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Remove the data of a previous run first.
        #[arg(long)]
        fresh: bool,
    },
}

/// Debian packages: building RocksDB (libclang for its bindings, a C++
/// compiler), the namespace testbed (iproute2, nftables), the failover benchmark
/// (keepalived), the kv benchmark (etcd, protoc), the image (mmdebstrap, filesystem and partition tools, the
/// systemd EFI stub) and the QEMU tests (qemu-system, OVMF firmware).
const APT_PACKAGES: &[&str] = &[
    "libclang-dev",
    "clang",
    "g++",
    "make",
    "pkg-config",
    "iproute2",
    // zone-vip: the kernel kept from answering ARP for the VIP.
    "nftables",
    "keepalived",
    "mmdebstrap",
    "e2fsprogs",
    // The nemesis: losetup and fsfreeze (disks of its own per server).
    "util-linux",
    "dosfstools",
    "mtools",
    // The update bundle's root image.
    "zstd",
    // System extensions (cargo xtask ext build).
    "squashfs-tools",
    "erofs-utils",
    "fdisk",
    "binutils",
    "systemd-boot-efi",
    "qemu-system-x86",
    "ovmf",
    // zone-mounts' tests: a real NFS server (the host kernel has no nfsd).
    "nfs-ganesha",
    "nfs-ganesha-vfs",
    // zoned's CPU test: a server on an emulated CPU without SSE4.2.
    "qemu-user",
    // The kv benchmark: etcd to compare with, and protoc with its
    // well-known types for the etcd-client crate's build.
    "etcd-server",
    "protobuf-compiler",
    "libprotobuf-dev",
];

/// Installed after the rest: this machine kind may come with a newer
/// qemu-utils than Debian's that qemu-system-x86 makes apt remove; this puts
/// Debian's back.
const APT_PACKAGES_AFTER: &[&str] = &["qemu-utils"];

fn main() -> Result<()> {
    match Args::parse().task {
        Task::Deps => deps(),
        Task::Cluster(ClusterTask::Up { nodes, fresh }) => cluster_up(nodes, fresh),
        Task::Image {
            profile,
            fresh_root,
            version,
            signing_key,
            trust_key,
            bundle_only,
            never_healthy,
            test_bundles,
        } => {
            let opts = image::Options {
                profile,
                fresh_root,
                version,
                signing_key,
                trust_keys: trust_key,
                bundle_only,
                never_healthy,
            };
            let target = target_dir()?;
            image::build_with(&opts, &target)?;
            if test_bundles {
                for (version, never_healthy) in image::TEST_BUNDLES {
                    let o = image::Options {
                        version: Some(version.to_owned()),
                        bundle_only: true,
                        never_healthy,
                        ..opts.clone()
                    };
                    image::build_with(&o, &target)?;
                }
            }
            Ok(())
        }
        Task::Bench(BenchTask::Failover { runs }) => {
            let target = build_testbed_binaries()?;
            bench::failover(runs.max(1), &target.join("bench"))
        }
        Task::Bench(BenchTask::Qemu { runs, skip_fresh }) => {
            qemu::bench(&target_dir()?, runs, skip_fresh)
        }
        Task::Bench(BenchTask::Storage { runs, leader_runs }) => {
            qemu::bench_storage(&target_dir()?, runs.max(1), leader_runs)
        }
        Task::Bench(BenchTask::Kv(kv)) => bench_kv(kv),
        Task::Qemu(QemuTask::Up) => qemu::up(&target_dir()?),
        Task::Ext(ExtTask::Build {
            name,
            packages,
            dir,
            out,
            format,
        }) => {
            let opts = ext::Options {
                name,
                packages: packages
                    .split(|c: char| c == ',' || c.is_whitespace())
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect(),
                dir,
                out,
                format,
            };
            ext::build(&opts, &target_dir()?).map(drop)
        }
        Task::Ext(ExtTask::Snapshot { root, out }) => ext::snapshot(&root, &out),
        Task::Robustness {
            minutes,
            seed,
            clients,
        } => robustness(minutes, seed, clients),
        Task::Test { tiers: true, .. } => test::check(cargo),
        Task::Test { tier, .. } => test::run(cargo, tier.expect("required by clap")),
    }
}

/// Builds what the namespace testbed runs and points it there; the target
/// directory.
fn build_testbed_binaries() -> Result<PathBuf> {
    eprintln!("building zoned, zone-vip and zonectl...");
    run(&mut cargo_build(&[
        "--bin", "zoned", "--bin", "zone-vip", "--bin", "zonectl",
    ]))?;
    let target = target_dir()?;
    std::env::set_var("ZONED_BIN_DIR", target.join(PROFILE));
    Ok(target)
}

fn robustness(minutes: u64, seed: Option<u64>, clients: u64) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the nemesis builds network namespaces: run it as root");
    }
    if minutes == 0 || clients == 0 {
        bail!("--minutes and --clients: at least 1");
    }
    let target = build_testbed_binaries()?;
    let seed = seed.unwrap_or_else(rand::random);
    eprintln!("seed {seed} (replay the schedule with --seed {seed})");
    let opts = testbed::nemesis::Options {
        duration: Duration::from_secs(minutes * 60),
        seed,
        clients,
        out_dir: target.join("robustness"),
        check_budget: Duration::from_secs(300),
    };
    let report = testbed::nemesis::run(&opts, &mut |line| eprintln!("{line}"));
    println!("{}", report.table());
    if !report.passed() {
        bail!("the nemesis found problems (seed {seed}): see the table above");
    }
    Ok(())
}

fn bench_kv(kv: KvArgs) -> Result<()> {
    let profile = if kv.debug { "debug" } else { "release" };
    eprintln!("building zoned and kvbench ({profile}; the first release build compiles RocksDB: ~15 minutes)...");
    let mut build = cargo();
    build.args(["build", "--bin", "zoned", "--bin", "kvbench"]);
    if !kv.debug {
        build.arg("--release");
    }
    run(&mut build)?;
    let target = target_dir()?;
    let mut bench = Command::new(target.join(profile).join("kvbench"));
    bench
        .arg("--out")
        .arg(target.join("bench"))
        .arg("--seconds")
        .arg(kv.seconds.to_string())
        .arg("--rounds")
        .arg(kv.rounds.to_string());
    if let Some(n) = kv.max_ops {
        bench.arg("--max-ops").arg(n.to_string());
    }
    run(&mut bench)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn deps() -> Result<()> {
    let root = nix::unistd::geteuid().is_root();
    let apt = |args: &[&str]| {
        let mut c = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    eprintln!("xtask deps: apt-get update");
    run(apt(&["update", "-qq"]).stdout(Stdio::null()))?;
    eprintln!("xtask deps: installing {}", APT_PACKAGES.join(" "));
    let mut install = apt(&["install", "-y", "-qq", "--no-install-recommends"]);
    install.args(APT_PACKAGES).stdout(Stdio::null());
    run(&mut install)?;
    let mut after = apt(&["install", "-y", "-qq", "--no-install-recommends"]);
    after.args(APT_PACKAGES_AFTER).stdout(Stdio::null());
    run(&mut after)?;
    let has_nextest = Command::new("cargo")
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_nextest {
        eprintln!("xtask deps: installing cargo-nextest");
        run(Command::new("cargo").args(["install", "--locked", "cargo-nextest"]))?;
    }
    eprintln!("xtask deps: done");
    Ok(())
}

/// The one build of the workspace: the tests, the local zone, the
/// benchmarks and the appliance image all run these binaries, so what the
/// appliance ships is what the tests checked and the benchmarks measured
/// (and RocksDB's C++, most of a build's time, is compiled once).
pub const PROFILE: &str = "release";

/// `cargo build --release` (the profile above) with `args`.
fn cargo_build(args: &[&str]) -> Command {
    let mut cmd = cargo();
    cmd.args(["build", "--release"]).args(args);
    cmd
}

/// cargo, as if run from the shell: without the variables `cargo run` set
/// for xtask itself (`CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, ...). Some
/// build scripts watch them (ring's): with them, every switch between a
/// plain `cargo build` and one run by xtask rebuilt ring and everything
/// above it (rustls, tonic, the whole workspace).
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || matches!(
                name,
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(name);
        }
    }
    cmd
}

fn target_dir() -> Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(PathBuf::from(
        meta["target_directory"]
            .as_str()
            .context("no target_directory")?,
    ))
}

/// Children are killed when this guard drops, also on an error path.
/// Writes a benchmark's figures to `dir/<name>-<unix time>.json` and says
/// where.
fn write_results(dir: &Path, name: &str, figures: &serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let path = dir.join(format!("{name}-{stamp}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(figures)?)?;
    println!("written to {}", path.display());
    Ok(())
}

struct Zone {
    /// ("zoned 2", its process), ...
    children: Vec<(String, Child)>,
}

impl Zone {
    /// Starts `cmd` with its output in `log` (truncated), as `name`.
    fn spawn(&mut self, name: String, mut cmd: Command, log: &Path) -> Result<()> {
        let out = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.children.push((name, child));
        Ok(())
    }

    fn stop(&mut self) {
        for (_, child) in &self.children {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (id, child) in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        eprintln!("{id} stopped ({status})");
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        eprintln!("{id} did not stop in time; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        self.children.clear();
    }
}

impl Drop for Zone {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_config(dir: &Path, id: u64, nodes: u64, tls: &Path) -> Result<PathBuf> {
    let mut text = format!(
        "# Written by `cargo xtask cluster up`.\n[node]\nid = {id}\nname = \"zone-{id}\"\n\
         data_dir = \"{}\"\nagent_socket = \"{}\"\nclient_listen = \"127.0.0.{id}:7400\"\npeer_listen = \"127.0.0.{id}:7401\"\n",
        dir.join("data").display(),
        dir.join("agent.sock").display()
    );
    // Managed files (zone-sync, `zonectl config diff`) live under node-N/root.
    text.push_str(&format!(
        "\n[files]\nlocal_root = \"{}\"\n",
        dir.join("root").display()
    ));
    text.push_str(&format!(
        "\n[tls]\ndir = \"{}\"\n",
        tls.join(format!("server-{id}")).display()
    ));
    for v in 1..=nodes {
        text.push_str(&format!(
            "\n[[voters]]\nid = {v}\nname = \"zone-{v}\"\npeer = \"127.0.0.{v}:7401\"\n"
        ));
    }
    let path = dir.join("node.toml");
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The local zone's certificates, in `target/local-zone` (where a zonectl
/// built in `target/` finds the admin credential): made with `zonectl zone
/// init` the first time, and again when they lack a server.
fn local_zone_certs(target: &Path, bin: &Path, nodes: u64) -> Result<PathBuf> {
    let certs = target.join(zonectl::credentials::LOCAL_ZONE);
    if certs
        .join(format!("server-{nodes}"))
        .join("node.pem")
        .exists()
        && certs.join("admin").join("client.pem").exists()
    {
        return Ok(certs);
    }
    if certs.exists() {
        std::fs::remove_dir_all(&certs)
            .with_context(|| format!("cannot remove {}", certs.display()))?;
    }
    let mut init = Command::new(bin.join("zonectl"));
    init.args(["zone", "init", "--servers", &nodes.to_string(), "--out"])
        .arg(&certs);
    for id in 1..=nodes {
        init.args(["--address", &format!("{id}=127.0.0.{id}")]);
    }
    let out = init.output().context("cannot run zonectl zone init")?;
    if !out.status.success() {
        bail!(
            "zonectl zone init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(certs)
}

fn cluster_up(nodes: u64, fresh: bool) -> Result<()> {
    if !(1..=9).contains(&nodes) {
        bail!("--nodes: {nodes} is not between 1 and 9");
    }
    eprintln!("building zoned, zone-sync and zonectl (the first build compiles RocksDB: ~10-15 minutes)...");
    run(&mut cargo_build(&[
        "--bin",
        "zoned",
        "--bin",
        "zone-sync",
        "--bin",
        "zonectl",
    ]))?;
    let target = target_dir()?;
    let bin = target.join(PROFILE);
    let base = target.join("cluster");
    if fresh && base.exists() {
        std::fs::remove_dir_all(&base)
            .with_context(|| format!("cannot remove {}", base.display()))?;
    }
    let certs = local_zone_certs(&target, &bin, nodes)?;
    let admin = certs.join("admin");
    let mut zone = Zone {
        children: Vec::new(),
    };
    let mut logs = Vec::new();
    for id in 1..=nodes {
        let dir = base.join(format!("node-{id}"));
        std::fs::create_dir_all(&dir)?;
        let config = write_config(&dir, id, nodes, &certs)?;
        let log = dir.join("zoned.log");
        let mut zoned = Command::new(bin.join("zoned"));
        zoned.arg("--config").arg(&config);
        zone.spawn(format!("zoned {id}"), zoned, &log)?;
        logs.push(log);
        // zone-sync writes this server's managed files under node-N/root.
        // zone-sync talks to its zoned on the agent socket the config names.
        let mut sync = Command::new(bin.join("zone-sync"));
        sync.arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(dir.join("sync"))
            .args(["--drift-interval", "5"])
            // Restarts are this machine's units: only logged.
            .arg("--no-restart");
        zone.spawn(format!("zone-sync {id}"), sync, &dir.join("zone-sync.log"))?;
    }
    let endpoints: Vec<String> = (1..=nodes).map(|i| format!("127.0.0.{i}:7400")).collect();
    let creds = zonectl::Credentials::from_dir(&admin, "the local zone's admin credential")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let view = loop {
        for ((id, child), log) in zone.children.iter_mut().step_by(2).zip(&logs) {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{id} exited ({status}); its log {}:\n{}",
                    log.display(),
                    log_tail(log)
                );
            }
        }
        let attempt = rt.block_on(async {
            let (ch, _) = zonectl::connect(&endpoints, Some(&creds)).await.ok()?;
            let mut client = zonectl::v1::cluster_client::ClusterClient::new(ch);
            let status = client
                .status(zonectl::v1::StatusRequest {})
                .await
                .ok()?
                .into_inner();
            Some(zonectl::ZoneView::from_status(&status))
        });
        if let Some(v) = attempt {
            let reachable = v
                .servers
                .iter()
                .filter(|s| s.state != "unreachable")
                .count();
            if v.leader().is_some() && reachable as u64 == nodes {
                break v;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "no leader with all {nodes} servers within 60 s; logs are in {}",
                base.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    print!("{}", zonectl::render_table(&view));
    println!();
    println!(
        "The zone is up: {nodes} servers, data and logs in {}",
        base.display()
    );
    println!("Talk to it (zonectl's default endpoints are this cluster):");
    println!("  {} show", bin.join("zonectl").display());
    println!("  {} kv put greeting hello", bin.join("zonectl").display());
    println!("  {} kv get greeting", bin.join("zonectl").display());
    println!(
        "  {} config push FILE --path /etc/zoned/managed/NAME   (lands in {}/node-N/root/etc/zoned/managed/)",
        bin.join("zonectl").display(),
        base.display()
    );
    println!(
        "  grpcurl -cacert {a}/ca.pem -cert {a}/client.pem -key {a}/client.key -servername {} 127.0.0.1:7400 list",
        zonectl::zone_pki::ANY_SERVER,
        a = admin.display()
    );
    println!(
        "(zonectl finds the admin credential in {} by itself; the zone's certificates are in {})",
        admin.display(),
        certs.display()
    );
    println!("Press Ctrl-C to stop all {nodes} servers.");
    rt.block_on(async {
        let mut poll = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = poll.tick() => {
                    for (id, child) in zone.children.iter_mut() {
                        if let Ok(Some(status)) = child.try_wait() {
                            eprintln!("warning: zoned {id} exited ({status}); see its log");
                        }
                    }
                    zone.children.retain_mut(|(_, c)| matches!(c.try_wait(), Ok(None)));
                }
            }
        }
    });
    eprintln!("stopping...");
    zone.stop();
    Ok(())
}
