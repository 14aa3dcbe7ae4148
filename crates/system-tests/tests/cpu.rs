//! zoned runs on any x86-64 CPU, and on the CPU's CRC-32C instructions
//! where it has them (`build-support/rocksdb-cxx`):
//! - a scan of the zoned binary: RocksDB's code uses no instruction beyond
//!   x86-64's baseline except in the CRC-32C chosen at run time, and that
//!   one does use the crc32 instruction;
//! - a real server on an emulated CPU without SSE4.2 and PCLMULQDQ (QEMU's
//!   default `qemu64` model, through qemu-user) serves a zone beside two
//!   servers on this machine's CPU, and stores written by either kind open
//!   and serve on the other.

#![cfg(target_arch = "x86_64")]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use testbed::zone::{poll, TestZone};
use zonectl::v1::{GetRequest, PutRequest};

/// Instructions of extensions beyond x86-64's baseline (SSE2), as objdump
/// names them: SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, LZCNT, BMI1/2, MOVBE,
/// ADX, RDRAND; then prefixes for PCLMULQDQ, AES, SHA and every VEX/EVEX
/// (AVX) form. `tzcnt` is left out: compilers emit it for plain x86-64 as
/// `rep bsf`, which older CPUs run as bsf.
#[rustfmt::skip]
const BEYOND_BASELINE: &[&str] = &[
    // SSE3
    "addsubpd", "addsubps", "haddpd", "haddps", "hsubpd", "hsubps", "lddqu", "movddup",
    "movshdup", "movsldup", "fisttp", "fisttps", "fisttpl", "fisttpll", "monitor", "mwait",
    // SSSE3
    "pabsb", "pabsw", "pabsd", "palignr", "phaddw", "phaddd", "phaddsw", "phsubw", "phsubd",
    "phsubsw", "pmaddubsw", "pmulhrsw", "pshufb", "psignb", "psignw", "psignd",
    // SSE4.1 (and pmovzx*, pmovsx* below)
    "blendpd", "blendps", "blendvpd", "blendvps", "dppd", "dpps", "extractps", "insertps",
    "movntdqa", "mpsadbw", "packusdw", "pblendvb", "pblendw", "pcmpeqq", "pextrb", "pextrd",
    "pextrq", "phminposuw", "pinsrb", "pinsrd", "pinsrq", "pmaxsb", "pmaxsd", "pmaxud",
    "pmaxuw", "pminsb", "pminsd", "pminud", "pminuw", "pmuldq", "pmulld", "ptest", "roundpd",
    "roundps", "roundsd", "roundss",
    // SSE4.2 (and crc32* below), POPCNT, LZCNT
    "pcmpestri", "pcmpestrm", "pcmpistri", "pcmpistrm", "pcmpgtq", "popcnt", "lzcnt",
    // BMI1, BMI2, MOVBE, ADX, RDRAND, RDSEED
    "andn", "bextr", "blsi", "blsmsk", "blsr", "bzhi", "mulx", "pdep", "pext", "rorx", "sarx",
    "shlx", "shrx", "movbe", "adcx", "adox", "rdrand", "rdseed",
];
const BEYOND_BASELINE_PREFIXES: &[&str] = &[
    "crc32", "pclmul", "pmovzx", "pmovsx", "aes", "sha1", "sha256",
];

fn beyond_baseline(mnemonic: &str) -> bool {
    BEYOND_BASELINE.contains(&mnemonic)
        || BEYOND_BASELINE_PREFIXES
            .iter()
            .any(|p| mnemonic.starts_with(p))
        || (mnemonic.starts_with('v') && !matches!(mnemonic, "verr" | "verw"))
}

/// Whose code a function of the binary is, by its symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// RocksDB's hardware CRC-32C, entered only where cpuid has both
    /// SSE4.2 and PCLMULQDQ.
    HardwareCrc,
    /// RocksDB's other C++ and C code (and the C++ library's inline code
    /// compiled with it): must run on any x86-64 CPU.
    RocksDb,
    /// Rust, and the C libraries built for plain x86-64 that dispatch at
    /// run time themselves (zstd's BMI2 paths): not checked here.
    Other,
}

/// Rust's legacy mangling looks like C++'s but ends in a hash: `17h<16 hex>E`,
/// then, in optimised builds, maybe a suffix such as `.llvm.<digits>` (the
/// name itself may hold dots: `..` stands for `::` in its paths).
fn rust_legacy(symbol: &str) -> bool {
    symbol.match_indices("17h").any(|(at, _)| {
        let rest = &symbol.as_bytes()[at + 3..];
        rest.len() >= 17
            && rest[..16].iter().all(u8::is_ascii_hexdigit)
            && rest[16] == b'E'
            && (rest.len() == 17 || rest[17] == b'.')
    })
}

fn owner(symbol: &str) -> Owner {
    if symbol.contains("zoned_crc32c_hw") {
        Owner::HardwareCrc
    } else if symbol.starts_with("_R") || rust_legacy(symbol) {
        Owner::Other
    } else if symbol.starts_with("_Z")
        || symbol.starts_with("rocksdb_")
        || symbol.starts_with("_GLOBAL__sub_I_")
    {
        Owner::RocksDb
    } else {
        Owner::Other
    }
}

#[derive(Debug, Default)]
struct Scan {
    rocksdb_functions: usize,
    hardware_functions: usize,
    hardware_crc32: usize,
    /// RocksDB function (mangled) -> the instructions beyond baseline in it.
    beyond: BTreeMap<String, BTreeSet<String>>,
}

/// Disassembles `bin` with objdump and sorts its instructions by owner.
fn scan(bin: &Path) -> Scan {
    let mut child = Command::new("objdump")
        .args(["--disassemble", "--no-show-raw-insn", "--wide"])
        .arg(bin)
        .stdout(Stdio::piped())
        .spawn()
        .expect("objdump is needed to scan the binary (Debian package binutils)");
    let mut scan = Scan::default();
    let mut current: Option<(String, Owner)> = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.expect("objdump output");
        // "0000000000a1b2c0 <symbol>:" opens a function.
        if let Some(name) = line
            .strip_suffix(">:")
            .and_then(|l| l.split_once(" <"))
            .filter(|(addr, _)| addr.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(|(_, name)| name)
        {
            let o = owner(name);
            match o {
                Owner::RocksDb => scan.rocksdb_functions += 1,
                Owner::HardwareCrc => scan.hardware_functions += 1,
                Owner::Other => {}
            }
            current = Some((name.to_owned(), o));
            continue;
        }
        let Some((name, o)) = &current else { continue };
        if *o == Owner::Other {
            continue;
        }
        // "  a1b2c4:\tmnemonic operands"
        let Some((_, insn)) = line.split_once(":\t") else {
            continue;
        };
        let mut words = insn.split_whitespace();
        let mut mnemonic = words.next().unwrap_or("");
        while matches!(
            mnemonic,
            "lock" | "rep" | "repz" | "repe" | "repnz" | "repne" | "data16" | "notrack" | "bnd"
        ) {
            mnemonic = words.next().unwrap_or("");
        }
        match o {
            Owner::HardwareCrc if mnemonic.starts_with("crc32") => scan.hardware_crc32 += 1,
            Owner::RocksDb if beyond_baseline(mnemonic) => {
                scan.beyond
                    .entry(name.clone())
                    .or_default()
                    .insert(mnemonic.to_owned());
            }
            _ => {}
        }
    }
    let status = child.wait().expect("objdump");
    assert!(
        status.success(),
        "objdump {} failed: {status}",
        bin.display()
    );
    scan
}

/// C++ names, readable (c++filt from binutils), or as they are.
fn demangle(names: &[&String]) -> Vec<String> {
    Command::new("c++filt")
        .args(names.iter().map(|s| s.as_str()))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_else(|| names.iter().map(|s| s.to_string()).collect())
}

#[test]
fn rocksdb_uses_nothing_beyond_baseline_x86_64_but_its_hardware_crc() {
    let bin = testbed::binary("zoned");
    let bin = bin.as_path();
    let scan = scan(bin);
    assert!(
        scan.rocksdb_functions > 1000,
        "found only {} RocksDB functions in {}: is the binary stripped?",
        scan.rocksdb_functions,
        bin.display()
    );
    if !scan.beyond.is_empty() {
        let names: Vec<&String> = scan.beyond.keys().collect();
        let shown: Vec<String> = demangle(&names)
            .into_iter()
            .zip(scan.beyond.values())
            .take(20)
            .map(|(f, m)| format!("  {f}: {}", m.iter().cloned().collect::<Vec<_>>().join(" ")))
            .collect();
        panic!(
            "{} of {} RocksDB functions use instructions beyond x86-64's baseline, so zoned \
             would die with SIGILL on CPUs without them (QEMU's qemu64, kvm64); was RocksDB \
             built with -msse4.2 or -march, or without build-support/rocksdb-cxx? The first:\n{}",
            scan.beyond.len(),
            scan.rocksdb_functions,
            shown.join("\n")
        );
    }
    assert!(
        scan.hardware_functions > 0 && scan.hardware_crc32 > 0,
        "RocksDB's hardware CRC-32C is missing from {} ({} functions, {} crc32 instructions): \
         its checksums would run from lookup tables on every CPU; is CXX for x86_64 still \
         build-support/rocksdb-cxx (.cargo/config.toml)?",
        bin.display(),
        scan.hardware_functions,
        scan.hardware_crc32
    );
}

/// qemu-user's CPU model without SSE4.2 and PCLMULQDQ: QEMU's default.
const QEMU64: &[&str] = &["qemu-x86_64", "-cpu", "qemu64"];

fn require_qemu_user() {
    let ok = Command::new(QEMU64[0])
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "qemu-x86_64 is missing: this test runs a zoned server on an emulated CPU without \
         SSE4.2 (QEMU's qemu64 model); install it with `cargo xtask deps` (Debian package \
         qemu-user)"
    );
}

/// RocksDB's own LOG of server `i`, which names the CRC-32C it chose at open.
fn rocksdb_crc_line(zone: &TestZone, i: usize) -> String {
    let log = zone.data_dir(i).join("data").join("db").join("LOG");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    text.lines()
        .find_map(|l| {
            l.split_once("Fast CRC32 supported: ")
                .map(|(_, r)| r.to_owned())
        })
        .unwrap_or_else(|| panic!("no \"Fast CRC32 supported\" line in {}", log.display()))
}

async fn put(zone: &TestZone, i: usize, key: &str) {
    let req = PutRequest {
        key: key.into(),
        value: b"1".to_vec(),
        prev_kv: false,
    };
    if let Err(e) = zone.kv(i).await.put(req).await {
        panic!("put {key} through server {}: {e}", zone.servers[i].id);
    }
}

/// Waits until server `i` has applied `key` (a read of its own store).
async fn wait_applied(zone: &TestZone, i: usize, key: &str) {
    let what = format!("server {} to apply {key}", zone.servers[i].id);
    poll(Duration::from_secs(60), &what, || async {
        let req = GetRequest {
            key: key.into(),
            serializable: true,
        };
        let r = zone.kv(i).await.get(req).await.ok()?.into_inner();
        r.kv.map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_a_cpu_without_sse42_serves_the_zone_and_its_store_moves_both_ways() {
    require_qemu_user();
    let mut zone = TestZone::prepare(3, "");
    zone.launch(0);
    zone.launch(1);
    zone.launch_under(2, QEMU64);
    zone.wait_leader().await;
    assert!(
        zone.servers[2].is_running(),
        "zoned on the emulated qemu64 CPU exited (SIGILL?): its log is below"
    );

    // Writes through the emulated server and through a native one reach
    // every store.
    put(&zone, 2, "through-emulated").await;
    put(&zone, 0, "through-native").await;
    for i in 0..3 {
        wait_applied(&zone, i, "through-emulated").await;
        wait_applied(&zone, i, "through-native").await;
    }
    assert!(zone.servers[2].is_running(), "the emulated server stopped");
    // Each chose what its CPU has, and says so.
    let emulated = rocksdb_crc_line(&zone, 2);
    let native = rocksdb_crc_line(&zone, 0);
    assert!(emulated.starts_with("Not supported"), "qemu64: {emulated}");
    assert!(native.starts_with("Supported"), "this machine: {native}");
    assert!(
        zone.log(2).contains("CRC-32C from lookup tables"),
        "the emulated server's log does not name its table checksums"
    );

    // A store written with tables opens with the hardware CRC, and the
    // other way round: killed without a flush, so each replays WAL records
    // summed by the other kind.
    zone.kill9(2);
    zone.kill9(0);
    zone.launch(2);
    zone.launch_under(0, QEMU64);
    zone.wait_leader().await;
    put(&zone, 0, "after-swap").await;
    for i in 0..3 {
        for key in ["through-emulated", "through-native", "after-swap"] {
            wait_applied(&zone, i, key).await;
        }
    }
    assert!(zone.servers[0].is_running() && zone.servers[2].is_running());
    assert!(rocksdb_crc_line(&zone, 0).starts_with("Not supported"));
    assert!(rocksdb_crc_line(&zone, 2).starts_with("Supported"));
}
