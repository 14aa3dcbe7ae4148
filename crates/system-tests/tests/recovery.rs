//! Getting a zone back (issue 23): a backup restored into a new zone with
//! `zoned restore`, and a quorum loss survived with `zoned
//! --force-new-zone`, against real processes, disks and sockets.

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use testbed::zone::{poll, TestZone};
use zonectl::v1::{DeleteRequest, MembersRequest, PutRequest};

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The voters and learners of the zone as server `i` has them.
async fn members(zone: &TestZone, i: usize) -> Vec<(u64, bool)> {
    let mut c = zone.cluster(i).await;
    let mut m: Vec<(u64, bool)> = c
        .members(MembersRequest {})
        .await
        .map(|r| r.into_inner().members)
        .unwrap_or_default()
        .into_iter()
        .map(|m| (m.id, m.learner))
        .collect();
    m.sort();
    m
}

/// Adds a fresh server `id` to `zone` through server index `via` (a join
/// token, no certificate of its own), and waits until it is a voter.
async fn add_fresh(zone: &mut TestZone, id: u64, via: usize) -> usize {
    let i = zone.prepare_token_joiner(id, via);
    let peer = zone.servers[i].peer.to_string();
    zone.add_server(via, id, peer).await;
    let token = zone.join_token(via, id).await;
    zone.give_token(i, &token);
    zone.launch(i);
    poll(
        Duration::from_secs(60),
        &format!("server {id} to be a voter"),
        || async {
            members(zone, via)
                .await
                .contains(&(id, false))
                .then_some(())
        },
    )
    .await;
    i
}

/// 1000 keys written, a fifth overwritten, a seventh deleted, backed up;
/// three founders of a new zone restored from the file: every key holds
/// its value, create and mod revisions and version, the store its
/// revision, the zone a new id; writes go on from there. A store in place
/// and a damaged file are refused, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restored_into_a_new_zone_holds_every_key_at_its_revision() {
    let mut old = TestZone::start(3, "");
    old.wait_leader().await;
    let mut kv = old.kv(0).await;
    for i in 0..1000u32 {
        let value = format!("v{i}-").repeat(1 + i as usize % 40).into_bytes();
        kv.put(PutRequest {
            key: format!("k{i:04}").into_bytes(),
            value,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for i in (0..1000u32).step_by(5) {
        kv.put(PutRequest {
            key: format!("k{i:04}").into_bytes(),
            value: b"again".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for i in (0..1000u32).step_by(7) {
        kv.delete(DeleteRequest {
            key: format!("k{i:04}").into_bytes(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let before = old.range(0, b"", false).await;
    let revision = before.header.as_ref().unwrap().revision;
    let old_id = old.own_row(0).await.unwrap().zone_id;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("zone.backup");
    let f = file.to_str().unwrap();
    let endpoints = old.endpoints().join(",");
    let out = old.zonectl(&["--endpoints", &endpoints, "snapshot", "save", f]);
    assert!(out.status.success(), "{}", text(&out));

    let mut new = TestZone::prepare(3, "");
    // A damaged copy is refused before anything is written.
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    let bad = dir.path().join("bad.backup");
    std::fs::write(&bad, &bytes).unwrap();
    let out = new.run_zoned(0, &["restore", "--from", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.backup"),
        "{}",
        text(&out)
    );
    assert!(
        !new.data_dir(0).join("data/db").exists(),
        "a refused restore left a store"
    );

    for i in 0..3 {
        let out = new.run_zoned(i, &["restore", "--from", f]);
        assert!(out.status.success(), "{}", text(&out));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains(&format!(
                "restored {} keys at revision {revision}",
                before.kvs.len()
            )),
            "{said}"
        );
    }
    // A store in place is never overwritten.
    let out = new.run_zoned(0, &["restore", "--from", f]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("never overwrites"),
        "{}",
        text(&out)
    );

    for i in 0..3 {
        new.launch(i);
    }
    new.wait_leader().await;
    for i in 0..3 {
        let after = new.range(i, b"", false).await;
        assert_eq!(after.header.as_ref().unwrap().revision, revision);
        assert_eq!(after.kvs.len(), before.kvs.len());
        for (a, b) in after.kvs.iter().zip(&before.kvs) {
            assert_eq!(a, b, "server {} of the new zone", new.servers[i].id);
        }
        // Each server's own copy too.
        let own = new.range(i, b"", true).await;
        assert!(own.kvs == before.kvs, "server {}'s own copy", i + 1);
    }
    let new_id = poll(Duration::from_secs(10), "the new zone's id", || async {
        let id = new.own_row(0).await?.zone_id;
        (!id.is_empty()).then_some(id)
    })
    .await;
    assert_ne!(new_id, old_id, "a restored zone gets a new id");
    let r = new
        .kv(1)
        .await
        .put(PutRequest {
            key: b"after".to_vec(),
            value: b"restore".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.header.unwrap().revision, revision + 1);

    // The appliance's route: node.restore_from (the identity's
    // `restore_from`) builds the store at the first start with an empty
    // data directory, and is ignored once a store is there.
    let mut third = TestZone::prepare(3, "");
    for i in 0..3 {
        let path = third.servers[i].config_path();
        let config = std::fs::read_to_string(&path).unwrap();
        let config = config.replacen("[node]\n", &format!("[node]\nrestore_from = {f:?}\n"), 1);
        std::fs::write(&path, config).unwrap();
        third.launch(i);
    }
    third.wait_leader().await;
    for i in 0..3 {
        let after = third.range(i, b"", false).await;
        assert_eq!(after.header.as_ref().unwrap().revision, revision);
        assert!(
            after.kvs == before.kvs,
            "server {} restored at start",
            i + 1
        );
        assert!(
            third
                .log(i)
                .contains("building it from the backup named by node.restore_from"),
            "server {}'s log",
            i + 1
        );
    }
    third
        .kv(0)
        .await
        .put(PutRequest {
            key: b"after".to_vec(),
            value: b"kept".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    third.kill9(0);
    third.launch(0);
    third.wait_leader().await;
    assert_eq!(
        third.value(0, "after", false).await.as_deref(),
        Some(&b"kept"[..]),
        "a restart with a store in place restored nothing"
    );
    assert!(
        third
            .log(0)
            .contains("node.restore_from ignored: a store is in place"),
        "{}",
        third.log(0)
    );
    // The field left in place, the disk of a founder of the running zone
    // replaced later: refused (it took part), not restored from the old
    // backup (which would have it answer as a member that forgot its vote).
    tokio::time::sleep(Duration::from_secs(1)).await;
    third.kill9(1);
    std::fs::remove_dir_all(third.data_dir(1).join("data")).unwrap();
    third.launch(1);
    let st = third.wait_exit(1, Duration::from_secs(30));
    let log = third.log(1);
    assert_eq!(st.code(), Some(2), "{log}");
    assert!(log.contains("already took part in the zone"), "{log}");
    assert!(
        !third.data_dir(1).join("data/db").exists(),
        "a refused server restored the old backup"
    );
}

/// Three servers under a writer; one follower killed, then the leader
/// (the survivor's log holds acknowledged writes whose commit it may not
/// have heard), both data directories deleted. The survivor forced alone
/// with `--force-new-zone`, two fresh servers added: every acknowledged
/// write is on all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_loss_is_survived_with_force_new_zone_and_no_acknowledged_write_lost() {
    let mut zone = TestZone::start(3, "");
    let leader = zone.wait_leader().await;
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let (first_lost, survivor) = (others[0], others[1]);
    let endpoints = Arc::new(std::sync::Mutex::new(vec![zone.servers[leader].endpoint()]));
    let writer = testbed::zone::start_writer(endpoints.clone(), zone.pki.admin().clone(), "w");
    writer.wait_more(50).await;
    zone.kill9(first_lost);
    // From here every acknowledged write is on the survivor.
    writer.wait_more(50).await;
    zone.kill9(leader);
    let (acked, _) = writer.finish().await;
    for i in [first_lost, leader] {
        std::fs::remove_dir_all(zone.data_dir(i).join("data/db")).unwrap();
    }
    zone.kill9(survivor);

    zone.launch_with(survivor, &["--force-new-zone"]);
    let leader = zone.wait_leader().await;
    assert_eq!(leader, survivor);
    let log = zone.log(survivor);
    assert!(
        log.contains("FORCED A NEW CONFIGURATION"),
        "the force is said loudly:\n{log}"
    );
    if let Some(line) = log.lines().find(|l| l.contains("FORCED")) {
        eprintln!("{line}");
    }
    assert_eq!(
        members(&zone, survivor).await,
        [(zone.servers[survivor].id, false)]
    );

    let four = add_fresh(&mut zone, 4, survivor).await;
    let five = add_fresh(&mut zone, 5, survivor).await;
    assert_eq!(
        members(&zone, survivor).await,
        [(zone.servers[survivor].id, false), (4, false), (5, false)]
    );
    for i in [survivor, four, five] {
        let got = zone.mod_revisions(i, b"w", false).await;
        let missing: Vec<_> = acked
            .iter()
            .filter(|(k, rev)| got.get(*k) != Some(rev))
            .collect();
        assert!(
            missing.is_empty(),
            "server {}: {} of {} acknowledged writes missing or changed: {:?}",
            zone.servers[i].id,
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)]
        );
    }
    eprintln!(
        "{} acknowledged writes, all present after the recovery",
        acked.len()
    );

    // Started again with the flag still given: refused (servers 4 and 5
    // answer), nothing forced; without it, one of three voters again.
    zone.terminate(survivor);
    zone.launch_with(survivor, &["--force-new-zone"]);
    let status = zone.wait_exit(survivor, Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{}", zone.log(survivor));
    let log = zone.log(survivor);
    let refusal = log
        .lines()
        .rfind(|l| l.contains("--force-new-zone refused"))
        .unwrap_or_else(|| panic!("no refusal in the log:\n{log}"));
    assert!(refusal.contains("was forced already"), "{refusal}");
    assert!(refusal.contains("answers on its peer port"), "{refusal}");
    zone.launch(survivor);
    poll(
        Duration::from_secs(30),
        "the survivor back among three voters",
        || async {
            (members(&zone, survivor).await.len() == 3
                && zone.status(survivor).await?.leader_id != 0)
                .then_some(())
        },
    )
    .await;
}

/// `--force-new-zone` on a server whose zone still answers is refused,
/// naming the server that answered, and changes nothing: started again
/// without it, the server is one of three voters as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_new_zone_is_refused_while_another_server_answers() {
    let mut zone = TestZone::start(3, "");
    zone.wait_leader().await;
    zone.terminate(2);
    zone.launch_with(2, &["--force-new-zone"]);
    let status = zone.wait_exit(2, Duration::from_secs(20));
    assert_eq!(status.code(), Some(2));
    let log = zone.log(2);
    assert!(log.contains("--force-new-zone refused"), "{log}");
    assert!(log.contains("answers on its peer port"), "{log}");
    zone.launch(2);
    poll(
        Duration::from_secs(30),
        "server 3 back among three voters",
        || async {
            (members(&zone, 2).await == [(1, false), (2, false), (3, false)]
                && zone.status(2).await?.leader_id != 0)
                .then_some(())
        },
    )
    .await;
}
