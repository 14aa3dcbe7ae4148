//! Golden files for the output people read. Set `ZONED_BLESS=1` to rewrite
//! them after an intended change, then review the diff.

use std::path::PathBuf;

use zonectl::v1::{
    Alarm, AlarmKind, DatastoreHealth, DatastoreState, HostFigures, Role, ServerStatus,
    StatusResponse, StorageHealth,
};
use zonectl::{render_alarms, render_table, render_versions, AlarmRow, ZoneView};

fn check(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("ZONED_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with ZONED_BLESS=1 to create it)",
            path.display()
        )
    });
    assert_eq!(actual, expected, "output differs from {}", path.display());
}

/// `zonectl show`'s table for `s`, checked against golden file `name`.
fn check_show(name: &str, s: &StatusResponse) {
    check(name, &render_table(&ZoneView::from_status(s)));
}

const ZONE: &str = "5d0c6f2a9e71b3c48a2f0e6d1c9b7a35";

fn server(id: u64, role: Role, last: u64, matched: u64, contact: Option<u64>) -> ServerStatus {
    ServerStatus {
        id,
        name: format!("zone-{id}"),
        peer_endpoint: format!("127.0.0.{id}:7401"),
        client_endpoint: format!("127.0.0.{id}:7400"),
        role: role as i32,
        term: 4,
        last_index: last,
        commit: 1200,
        applied: 1200,
        vote: 1,
        match_index: matched,
        last_contact_ms: contact,
        voter: true,
        leader_id: 1,
        revision: 1100,
        host: Some(HostFigures {
            load1: 0.25 * id as f64,
            cpus: 2,
            memory_total_bytes: 8 << 30,
            memory_available_bytes: (5 << 30) + (id << 28),
            disk_total_bytes: 100 << 30,
            disk_free_bytes: (60 << 30) - (id << 30),
            // Server 3 runs on a CPU without SSE4.2 (a VM's qemu64 model).
            software_checksums: id == 3,
        }),
        zone_id: ZONE.into(),
        // 2100-01-01: far enough for no warning.
        cert_expires_unix: 4_102_444_800 + id as i64 * 86_400,
        storage: Some(StorageHealth {
            reported: true,
            age_ms: 800,
            datastores: vec![
                datastore("images", DatastoreState::Mounted, 1_200 + id * 100, true),
                datastore("backups", DatastoreState::Mounted, 15_400, false),
            ],
            unmounting: Vec::new(),
        }),
        version: "0.1.0".into(),
        build_commit: "3f2a1b9c0d1e".into(),
        image_version: "zoned-vm 0.1.0+3f2a1b9c0d1e".into(),
        // zone-vip holds the VIP on the leader.
        vips_held: if role == Role::Leader {
            vec!["10.0.0.10/24".into()]
        } else {
            Vec::new()
        },
        ..ServerStatus::default()
    }
}

fn datastore(
    name: &str,
    state: DatastoreState,
    latency_us: u64,
    required: bool,
) -> DatastoreHealth {
    DatastoreHealth {
        name: name.into(),
        state: state as i32,
        latency_us,
        required,
        revision: 42,
        ..DatastoreHealth::default()
    }
}

/// The leader's NFS server stopped answering; server 3's zone-mounts is
/// not running.
fn storage_trouble() -> StatusResponse {
    let mut s = healthy();
    let leader = s.servers.iter_mut().find(|x| x.id == 1).unwrap();
    let images = &mut leader.storage.as_mut().unwrap().datastores[0];
    images.state = DatastoreState::Hung as i32;
    images.unhealthy_ms = 12_300;
    images.error = "a probe did not finish within 5000 ms: the storage does not answer".into();
    let three = s.servers.iter_mut().find(|x| x.id == 3).unwrap();
    let st = three.storage.as_mut().unwrap();
    st.reported = false;
    st.age_ms = 64_000;
    st.unmounting = vec!["/srv/old".into()];
    let two = s.servers.iter_mut().find(|x| x.id == 2).unwrap();
    let backups = &mut two.storage.as_mut().unwrap().datastores[1];
    backups.state = DatastoreState::Failed as i32;
    backups.unhealthy_ms = 3_000;
    backups.latency_us = 0;
    backups.error =
        "mount -t nfs4 10.0.0.5:/backups /srv/backups: EACCES: Permission denied".into();
    s
}

#[test]
fn show_table_with_storage_trouble() {
    check_show("show-storage-trouble.txt", &storage_trouble());
}

#[test]
fn storage_status_table() {
    check(
        "storage-status.txt",
        &zonectl::render_storage(&ZoneView::from_status(&storage_trouble())),
    );
}

fn healthy() -> StatusResponse {
    StatusResponse {
        member_id: 2,
        leader_id: 1,
        term: 4,
        servers: vec![
            server(3, Role::Follower, 1195, 1195, Some(40)),
            server(1, Role::Leader, 1204, 1204, None),
            server(2, Role::Follower, 1204, 1204, Some(12)),
        ],
        disabled: false,
        alarms: Vec::new(),
    }
}

#[test]
fn show_table_healthy_zone() {
    check_show("show-healthy.txt", &healthy());
}

#[test]
fn show_table_with_an_unreachable_server() {
    let mut s = healthy();
    s.servers[0] = ServerStatus {
        id: 3,
        peer_endpoint: "127.0.0.3:7401".into(),
        role: Role::Unreachable as i32,
        voter: true,
        error: "transport error: connection refused".into(),
        last_contact_ms: Some(5300),
        ..ServerStatus::default()
    };
    check_show("show-unreachable.txt", &s);
}

#[test]
fn show_table_without_leader() {
    let mut s = healthy();
    s.leader_id = 0;
    for x in &mut s.servers {
        x.role = Role::PreCandidate as i32;
        x.match_index = 0;
        x.last_contact_ms = None;
    }
    check_show("show-no-leader.txt", &s);
}

#[test]
fn show_table_with_a_learner_in_a_disabled_zone() {
    let mut s = healthy();
    s.disabled = true;
    let mut learner = server(4, Role::Learner, 1100, 1100, Some(30));
    learner.voter = false;
    learner.name = "zone-4".into();
    s.servers.push(learner);
    check_show("show-learner-disabled.txt", &s);
}

/// A server started with another zone's data directory says so.
#[test]
fn show_table_with_servers_in_two_zones() {
    let mut s = healthy();
    s.servers[0].zone_id = "e41b09c7d25a6f8830b1c4d7e9f2a605".into();
    check_show("show-two-zones.txt", &s);
}

/// A server whose certificate expired (it was off for months, say) is
/// named below the table.
#[test]
fn show_table_with_an_expired_certificate() {
    let mut s = healthy();
    // 2020-01-01.
    s.servers[0].cert_expires_unix = 1_577_836_800;
    check_show("show-expired-certificate.txt", &s);
}

#[test]
fn show_json() {
    let v = ZoneView::from_status(&healthy());
    check(
        "show-healthy.json",
        &(serde_json::to_string_pretty(&v).unwrap() + "\n"),
    );
}

/// `zonectl version` during a rolling upgrade: server 2 already runs the
/// new build, server 3 does not answer.
#[test]
fn versions_of_a_zone_mid_upgrade() {
    let mut s = healthy();
    let two = s.servers.iter_mut().find(|x| x.id == 2).unwrap();
    two.build_commit = "8e41d07a55c2".into();
    two.version = "0.2.0".into();
    two.image_version = "zoned-vm 0.2.0+8e41d07a55c2".into();
    s.servers[0] = ServerStatus {
        id: 3,
        role: Role::Unreachable as i32,
        error: "transport error: connection refused".into(),
        ..ServerStatus::default()
    };
    let view = ZoneView::from_status(&s);
    check("version-mid-upgrade.txt", &render_versions(&view));
    // The same zone's table names both builds and who holds the VIP.
    check("show-mid-upgrade.txt", &render_table(&view));
}

/// Two servers whose zone-vip both hold a VIP are named.
#[test]
fn show_table_with_two_vip_holders() {
    let mut s = healthy();
    s.servers[0].vips_held = vec!["10.0.0.10/24".into()];
    check_show("show-two-vip-holders.txt", &s);
}

/// Server 2 short of disk, server 3 over its store quota.
fn alarms() -> Vec<Alarm> {
    vec![
        Alarm {
            server: 2,
            name: "zone-2".into(),
            kind: AlarmKind::NoSpace as i32,
            free_bytes: 200 << 20,
            store_bytes: 900 << 20,
            limit_bytes: 256 << 20,
            raised_unix_ms: 1_700_000_000_000,
        },
        Alarm {
            server: 3,
            name: "zone-3".into(),
            kind: AlarmKind::StoreQuota as i32,
            free_bytes: 40 << 30,
            store_bytes: 2100 << 20,
            limit_bytes: 2048 << 20,
            raised_unix_ms: 1_700_000_000_000 - 3_600_000,
        },
    ]
}

#[test]
fn show_table_with_space_alarms() {
    let mut s = healthy();
    s.alarms = alarms();
    check_show("show-space-alarms.txt", &s);
}

#[test]
fn alarm_list() {
    let rows: Vec<AlarmRow> = alarms().iter().map(AlarmRow::from_alarm).collect();
    check(
        "alarm-ls.txt",
        &render_alarms(&rows, 1_700_000_000_000 + 75_000),
    );
    check("alarm-ls-none.txt", &render_alarms(&[], 0));
}
