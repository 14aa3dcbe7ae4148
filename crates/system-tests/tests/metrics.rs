//! Prometheus metrics (issue 23): each server of a zone of real processes
//! serves `/metrics` on its own address, port 7402, with figures that
//! follow what the zone did; the Grafana dashboard in `monitoring/` asks
//! only for series a server exposes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use testbed::zone::{poll, TestZone};
use zonectl::v1::PutRequest;

/// Series (name with its labels, as written) to value.
fn series(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn value(s: &BTreeMap<String, f64>, name: &str) -> f64 {
    *s.get(name)
        .unwrap_or_else(|| panic!("no series {name} among {:?}", s.keys().collect::<Vec<_>>()))
}

fn metrics_addr(zone: &TestZone, i: usize) -> SocketAddr {
    SocketAddr::new(zone.servers[i].client.ip(), testbed::METRICS_PORT)
}

/// 40 writes to server 1, one refused, one denied: every server answers a scrape,
/// one is the leader and holds the lease, the client port counted the
/// calls by method and code and timed them, the writes were proposed,
/// committed and synced; the dashboard's every series exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_serves_metrics_that_follow_the_zone() {
    let mut zone = TestZone::start(3, "");
    zone.wait_leader().await;
    let mut kv = zone.kv(0).await;
    for i in 0..40 {
        kv.put(PutRequest {
            key: format!("m{i}").into_bytes(),
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let refused = kv
        .put(PutRequest {
            key: vec![b'k'; 5000],
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::InvalidArgument);
    // A reader's write is refused by the gate, before the count: callers
    // without the role cannot make the figures say anything.
    let reader = zone.pki.user("rita", zonectl::zone_pki::Role::Reader);
    let denied = zonectl::v1::kv_client::KvClient::new(zone.channel_as(0, Some(&reader)))
        .put(PutRequest {
            key: b"m-denied".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await;
    assert_eq!(denied.unwrap_err().code(), tonic::Code::PermissionDenied);

    // The lease is taken a moment after the election, and the Raft
    // figures are read every 2 s: polled.
    let scrapes: Vec<BTreeMap<String, f64>> = poll(
        Duration::from_secs(10),
        "a scrape of every server, one holding the lease",
        || async {
            let mut all = Vec::new();
            for i in 0..3 {
                all.push(series(&testbed::scrape(metrics_addr(&zone, i)).await?));
            }
            // The Raft figures are read every 2 s: wait for a reading
            // taken after the writes, the same leader seen everywhere.
            let held: f64 = all.iter().map(|s| value(s, "zoned_lease_held")).sum();
            let leader = value(&all[0], "zoned_raft_leader_id");
            // The applied index counts the zone's own entries too: the
            // revision says the 40 writes are applied.
            let settled = all.iter().all(|s| {
                value(s, "zoned_raft_leader_id") == leader
                    && value(s, "zoned_raft_applied_index") >= 40.0
                    && value(s, "zoned_store_revision") >= 40.0
            });
            (held == 1.0 && leader > 0.0 && settled).then_some(all)
        },
    )
    .await;
    let leaders: Vec<usize> = (0..3)
        .filter(|&i| value(&scrapes[i], "zoned_raft_is_leader") == 1.0)
        .collect();
    assert_eq!(leaders.len(), 1, "one leader");
    let leader = leaders[0];
    assert_eq!(
        value(&scrapes[leader], "zoned_lease_held"),
        1.0,
        "the leader holds the lease"
    );
    assert!(value(&scrapes[leader], "zoned_lease_renewals_total") >= 1.0);
    let leader_id = zone.servers[leader].id as f64;
    for (i, s) in scrapes.iter().enumerate() {
        let id = zone.servers[i].id;
        assert_eq!(value(s, "zoned_raft_leader_id"), leader_id, "server {id}");
        assert!(value(s, "zoned_raft_term") >= 1.0, "server {id}");
        assert_eq!(value(s, "zoned_raft_voters"), 3.0, "server {id}");
        assert!(value(s, "zoned_raft_applied_index") >= 40.0, "server {id}");
        assert!(value(s, "zoned_store_revision") >= 40.0, "server {id}");
        assert!(
            value(s, "zoned_disk_wal_fsync_duration_seconds_count") >= 40.0,
            "server {id}: every write was synced"
        );
        assert!(
            value(s, "zoned_disk_db_size_bytes{cf=\"log\"}") > 0.0,
            "server {id}"
        );
        assert!(value(s, "zoned_disk_data_free_bytes") > 0.0, "server {id}");
        assert!(value(s, "zoned_raft_log_entries") >= 40.0, "server {id}");
    }
    let committed: f64 = scrapes
        .iter()
        .map(|s| value(s, "zoned_raft_proposals_committed_total"))
        .sum();
    assert!(committed >= 40.0, "{committed} proposals committed");
    let s1 = &scrapes[0];
    assert_eq!(
        value(
            s1,
            "zoned_grpc_requests_total{method=\"/zone.v1.KV/Put\",code=\"OK\"}"
        ),
        40.0
    );
    assert_eq!(
        value(
            s1,
            "zoned_grpc_requests_total{method=\"/zone.v1.KV/Put\",code=\"InvalidArgument\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            s1,
            "zoned_grpc_request_duration_seconds_count{method=\"/zone.v1.KV/Put\"}"
        ),
        41.0
    );
    assert!(
        !s1.keys().any(|k| k.contains("PermissionDenied")),
        "a call refused by the gate was counted"
    );

    // Every series the dashboard asks for is exposed.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../monitoring/grafana-zoned.json"),
    )
    .unwrap();
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut asked = std::collections::BTreeSet::new();
    for panel in parsed["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(at) = rest.find("zoned_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                asked.insert(name);
            }
        }
    }
    assert!(asked.len() >= 10, "{asked:?}");
    let exposed: std::collections::BTreeSet<String> = scrapes
        .iter()
        .flat_map(|s| s.keys())
        .map(|k| k.split('{').next().unwrap().to_owned())
        .collect();
    let missing: Vec<_> = asked.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard asks for series no server exposes: {missing:?}"
    );
}
