//! A short run of the benchmark (a few hundred operations per workload, no
//! targets), so that it cannot rot: both clusters start, every workload
//! completes on both, and the JSON report has a row for each with figures.

use std::process::Command;

#[test]
fn a_short_run_measures_every_workload_on_both_systems() {
    let bench = env!("CARGO_BIN_EXE_kvbench");
    let zoned = std::path::Path::new(bench).with_file_name("zoned");
    assert!(
        zoned.exists(),
        "{} is missing: build the workspace's binaries first (cargo build --workspace --bins)",
        zoned.display()
    );
    assert!(
        std::path::Path::new("/usr/bin/etcd").exists(),
        "/usr/bin/etcd is missing: install Debian's etcd-server (cargo xtask deps does)"
    );
    let out = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let run = Command::new(bench)
        .arg("--out")
        .arg(out.path())
        .args(["--seconds", "20", "--max-ops", "300", "--keys", "200"])
        .args([
            "--put-clients",
            "16",
            "--read-clients",
            "1,16",
            "--mixed-clients",
            "16",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "kvbench failed:\n{stdout}\n{stderr}");
    eprintln!("{stderr}\n{stdout}");
    let report = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("kv-") && e.path().is_file())
        .expect("a kv-<time>.json report");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.path()).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    let shape: Vec<(String, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["workload"].as_str().unwrap().to_owned(),
                r["clients"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, u64)> = [
        ("put", 1),
        ("put", 16),
        ("read", 1),
        ("read", 16),
        ("mixed", 16),
    ]
    .iter()
    .map(|(w, c)| (w.to_string(), *c))
    .collect();
    assert_eq!(shape, want);
    for r in rows {
        for system in ["zoned", "etcd"] {
            let f = &r[system];
            assert_eq!(f["errors"], 0, "{r}");
            assert_eq!(f["ops"], 300, "every operation done: {r}");
            assert!(f["ops_per_sec"].as_f64().unwrap() > 0.0, "{r}");
            let (p50, p99, p999) = (
                f["p50_ms"].as_f64().unwrap(),
                f["p99_ms"].as_f64().unwrap(),
                f["p999_ms"].as_f64().unwrap(),
            );
            assert!(0.0 < p50 && p50 <= p99 && p99 <= p999, "{r}");
            // Counted, not required to be 0: a loaded CI host may see one.
            assert!(f["elections"].is_u64(), "elections counted: {r}");
        }
        assert!(r["ratio"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["server_cpu_ratio"].as_f64().unwrap() >= 0.0, "{r}");
    }
    // CPU is counted in 10 ms ticks: a few hundred operations may round to
    // zero for one workload, never for all of them.
    for system in ["zoned", "etcd"] {
        let cpu: f64 = rows
            .iter()
            .map(|r| r[system]["server_cpu_us_per_op"].as_f64().unwrap())
            .sum();
        assert!(cpu > 0.0, "no server CPU counted for {system}");
    }
    for probe in [
        "fsync_p50_ms",
        "loopback_rtt_p50_ms",
        "bare_replicated_write_p50_ms",
        "grpc_replicated_write_p50_ms",
    ] {
        let ms = v["machine"][probe].as_f64();
        assert!(ms.is_some_and(|ms| ms > 0.0), "machine.{probe}: {ms:?}");
    }
    assert!(
        stdout.contains("WORKLOAD") && stdout.contains("target: "),
        "{stdout}"
    );
}
