use super::*;
use crate::effects::{Memory, MountId};

fn ds(name: &str, target: &str) -> Datastore {
    Datastore {
        name: name.into(),
        r#type: "nfs4".into(),
        source: "10.0.0.5:/srv".into(),
        target: target.into(),
        write_probe: true,
        probe_interval_ms: 1000,
        probe_timeout_ms: 500,
        revision: 5,
        ..Default::default()
    }
}

fn state(sup: &Supervisor<Memory>, name: &str) -> Option<DatastoreState> {
    sup.table
        .report(0)
        .datastores
        .iter()
        .find(|d| d.name == name)
        .map(|d| d.state())
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}

fn count(m: &Memory, what: &str) -> usize {
    m.log.lock().unwrap().iter().filter(|l| *l == what).count()
}

#[tokio::test(start_paused = true)]
async fn a_declared_datastore_is_mounted_probed_and_unmounted_when_removed() {
    let m = Memory::default();
    let dir = tempfile::tempdir().unwrap();
    let mut sup = Supervisor::new(Arc::new(m.clone()), 2, dir.path().into());
    sup.reconcile(&[ds("one", "/srv/one")]);
    settle().await;
    assert_eq!(state(&sup, "one"), Some(DatastoreState::Mounted));
    assert!(m.is_mounted("/srv/one"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        count(&m, "probe /srv/one") >= 3,
        "{:?}",
        m.log.lock().unwrap()
    );
    assert_eq!(count(&m, "mount /srv/one"), 1, "mounted once");
    // Recorded as ours, for a restart that finds it undeclared.
    let owned = std::fs::read_to_string(dir.path().join("owned.json")).unwrap();
    assert!(owned.contains("/srv/one"), "{owned}");
    sup.reconcile(&[]);
    settle().await;
    assert!(!m.is_mounted("/srv/one"));
    assert_eq!(count(&m, "umount /srv/one"), 1);
    assert_eq!(state(&sup, "one"), None);
    let owned = std::fs::read_to_string(dir.path().join("owned.json")).unwrap();
    assert!(
        !owned.contains("/srv/one"),
        "forgotten once unmounted: {owned}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_restart_unmounts_what_it_mounted_and_was_removed_meanwhile_and_nothing_else() {
    let m = Memory::default();
    let dir = tempfile::tempdir().unwrap();
    let mut sup = Supervisor::new(Arc::new(m.clone()), 2, dir.path().into());
    sup.reconcile(&[ds("one", "/srv/one"), ds("two", "/srv/two")]);
    settle().await;
    assert!(m.is_mounted("/srv/one") && m.is_mounted("/srv/two"));
    // zone-mounts stops (its tasks with it); meanwhile `one` is removed,
    // and someone mounts something of their own.
    drop(sup);
    settle().await;
    let foreign = MountId {
        target: "/srv/other".into(),
        ty: "ext4".into(),
        source: "/dev/vdz".into(),
    };
    m.mounted
        .lock()
        .unwrap()
        .insert(foreign.target.clone(), foreign);
    let mut again = Supervisor::new(Arc::new(m.clone()), 2, dir.path().into());
    again.reconcile(&[ds("two", "/srv/two")]);
    settle().await;
    assert!(
        !m.is_mounted("/srv/one"),
        "removed while down: unmounted on restart"
    );
    assert!(m.is_mounted("/srv/two"), "still declared: kept");
    assert_eq!(count(&m, "mount /srv/two"), 1, "adopted, not mounted again");
    assert!(m.is_mounted("/srv/other"), "not ours: untouched");
    assert_eq!(state(&again, "two"), Some(DatastoreState::Mounted));
}

#[tokio::test(start_paused = true)]
async fn something_else_mounted_on_the_target_is_neither_used_nor_unmounted() {
    let m = Memory::default();
    let dir = tempfile::tempdir().unwrap();
    let other = MountId {
        target: "/srv/one".into(),
        ty: "ext4".into(),
        source: "/dev/vdz".into(),
    };
    m.mounted
        .lock()
        .unwrap()
        .insert(other.target.clone(), other);
    let mut sup = Supervisor::new(Arc::new(m.clone()), 2, dir.path().into());
    sup.reconcile(&[ds("one", "/srv/one")]);
    settle().await;
    assert_eq!(state(&sup, "one"), Some(DatastoreState::Failed));
    let e = sup.table.report(0).datastores[0].error.clone();
    assert!(
        e.contains("another file system is mounted on /srv/one (ext4 /dev/vdz)"),
        "{e}"
    );
    assert_eq!(count(&m, "probe /srv/one"), 0, "not probed: not ours");
    sup.reconcile(&[]);
    settle().await;
    assert!(m.is_mounted("/srv/one"), "not ours: not unmounted");
    assert!(!m
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.starts_with("umount")));
}

#[tokio::test(start_paused = true)]
async fn a_busy_healthy_datastore_removed_is_detached_not_forced() {
    let m = Memory::default();
    let dir = tempfile::tempdir().unwrap();
    let mut sup = Supervisor::new(Arc::new(m.clone()), 2, dir.path().into());
    sup.reconcile(&[ds("one", "/srv/one")]);
    settle().await;
    // In use: a plain unmount fails (EBUSY).
    m.failing.lock().unwrap().insert("/srv/one".into());
    sup.reconcile(&[]);
    settle().await;
    let log = m.log.lock().unwrap().clone();
    assert!(log.contains(&"umount /srv/one".to_owned()), "{log:?}");
    assert!(log.contains(&"umount -l /srv/one".to_owned()), "{log:?}");
    assert!(
        !log.iter().any(|l| l.starts_with("umount -lf")),
        "forced: {log:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hung_datastore_is_reported_hung_probed_by_one_child_only_and_detached_lazily() {
    let m = Memory::default();
    let dir = tempfile::tempdir().unwrap();
    let mut sup = Supervisor::new(Arc::new(m.clone()), 2, dir.path().into());
    sup.reconcile(&[ds("one", "/srv/one"), ds("two", "/srv/two")]);
    settle().await;
    assert_eq!(state(&sup, "one"), Some(DatastoreState::Mounted));
    m.hanging.lock().unwrap().insert("/srv/one".into());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(state(&sup, "one"), Some(DatastoreState::Hung));
    let report = sup.table.report(0);
    let one = report.datastores.iter().find(|d| d.name == "one").unwrap();
    assert!(
        one.error.contains("did not finish within 500 ms"),
        "{}",
        one.error
    );
    // The other datastore is not held up.
    assert_eq!(state(&sup, "two"), Some(DatastoreState::Mounted));
    let probes = count(&m, "probe /srv/one");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        count(&m, "probe /srv/one"),
        probes,
        "no second child while the first is stuck"
    );
    assert!(sup.table.report(0).datastores[0].unhealthy_ms >= 5000);
    // The server answers again: healthy without anyone's help.
    m.hanging.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(state(&sup, "one"), Some(DatastoreState::Mounted));
    assert_eq!(sup.table.report(0).datastores[0].unhealthy_ms, 0);
    // Hung again, then removed: detached lazily, never a plain unmount.
    m.hanging.lock().unwrap().insert("/srv/one".into());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(state(&sup, "one"), Some(DatastoreState::Hung));
    sup.reconcile(&[ds("two", "/srv/two")]);
    settle().await;
    assert_eq!(count(&m, "umount /srv/one"), 0);
    assert_eq!(
        count(&m, "umount -lf /srv/one"),
        1,
        "hung: forced, then detached"
    );
    assert!(!m.is_mounted("/srv/one"));
    assert!(sup.table.report(0).unmounting.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failing_mount_is_failed_with_its_reason_and_retried() {
    let m = Memory::default();
    let dir = tempfile::tempdir().unwrap();
    let mut sup = Supervisor::new(Arc::new(m.clone()), 2, dir.path().into());
    m.failing.lock().unwrap().insert("/srv/one".into());
    sup.reconcile(&[ds("one", "/srv/one")]);
    settle().await;
    assert_eq!(state(&sup, "one"), Some(DatastoreState::Failed));
    assert!(sup.table.report(0).datastores[0]
        .error
        .contains("Input/output error"));
    m.failing.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(state(&sup, "one"), Some(DatastoreState::Mounted));
    assert!(count(&m, "mount /srv/one") >= 2);
}

fn exclusive(name: &str, target: &str) -> Datastore {
    Datastore {
        r#type: "ext4".into(),
        source: "/dev/disk/by-id/virtio-shared".into(),
        exclusive: true,
        required: true,
        write_probe: true,
        ..ds(name, target)
    }
}

#[tokio::test(start_paused = true)]
async fn an_exclusive_datastore_is_never_mounted_nor_unmounted_here_its_unit_is_listed_and_probed()
{
    let m = Memory::default();
    let dir = tempfile::tempdir().unwrap();
    let mut sup = Supervisor::new(Arc::new(m.clone()), 2, dir.path().into());
    let db = exclusive("db", "/srv/db");
    sup.reconcile(&[db.clone(), ds("one", "/srv/one")]);
    settle().await;
    // Away from the lease holder: unmounted, and that is healthy.
    assert_eq!(state(&sup, "db"), Some(DatastoreState::Unmounted));
    assert_eq!(count(&m, "mount /srv/db"), 0, "{:?}", m.log.lock().unwrap());
    assert_eq!(count(&m, "mount /srv/one"), 1);
    let units = m.units.lock().unwrap().clone();
    assert_eq!(
        units.keys().collect::<Vec<_>>(),
        ["srv-db.mount"],
        "only the exclusive one has a unit"
    );
    assert!(units["srv-db.mount"].contains("Where=/srv/db"));
    let list = dir.path().join(EXCLUSIVE_UNITS);
    assert_eq!(std::fs::read_to_string(&list).unwrap(), "srv-db.mount\n");
    // zone-vip mounts it (on the holder): probed like any other.
    m.mounted
        .lock()
        .unwrap()
        .insert("/srv/db".into(), MountId::of(&db));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    settle().await;
    assert_eq!(state(&sup, "db"), Some(DatastoreState::Mounted));
    assert!(count(&m, "probe /srv/db") >= 1);
    // Unmounted again (the lease moved): unmounted, not failed.
    m.mounted.lock().unwrap().remove("/srv/db");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    settle().await;
    assert_eq!(state(&sup, "db"), Some(DatastoreState::Unmounted));
    // Its device gone from this server: failed, naming it.
    m.missing
        .lock()
        .unwrap()
        .insert("/dev/disk/by-id/virtio-shared".into());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    settle().await;
    let report = sup.table.report(0);
    let h = report.datastores.iter().find(|d| d.name == "db").unwrap();
    assert_eq!(h.state(), DatastoreState::Failed);
    assert!(
        h.error.contains("/dev/disk/by-id/virtio-shared"),
        "{}",
        h.error
    );
    // Removed while mounted here: left to zone-vip (which stops the units
    // on it first), its unit and listing gone, nothing recorded as ours.
    m.missing.lock().unwrap().clear();
    m.mounted
        .lock()
        .unwrap()
        .insert("/srv/db".into(), MountId::of(&db));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    settle().await;
    sup.reconcile(&[ds("one", "/srv/one")]);
    settle().await;
    assert!(m.is_mounted("/srv/db"), "unmounted under zone-vip's units");
    assert_eq!(
        count(&m, "umount /srv/db") + count(&m, "umount -l /srv/db"),
        0
    );
    assert!(m.units.lock().unwrap().is_empty());
    assert_eq!(std::fs::read_to_string(&list).unwrap(), "");
    let owned = std::fs::read_to_string(dir.path().join("owned.json")).unwrap();
    assert!(!owned.contains("/srv/db"), "{owned}");
}
