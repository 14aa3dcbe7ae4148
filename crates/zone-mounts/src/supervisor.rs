//! One task per declared datastore: mount it if it is not, probe it every
//! interval, keep its health in the table the reports are made from. A
//! removed datastore's task is stopped and the datastore unmounted, lazily
//! when it is hung (a normal unmount would wait on the dead server).
//!
//! What zone-mounts mounted is recorded in `<state dir>/owned.json` (on
//! /run: mounts do not outlive a boot either), so that a datastore removed
//! while zone-mounts was down is still unmounted when it comes back, and
//! nothing it did not mount is ever unmounted.
//!
//! An `exclusive` datastore is never mounted here: it must be mounted on
//! the lease holder alone, and only once the old holder is fenced, which
//! zone-vip knows. zone-mounts writes its systemd mount unit (see
//! [`zone_datastores::mount_unit_text`]) and lists the units, in
//! declaration order, in `<state dir>/exclusive-units`, which zone-vip
//! reads: it starts them before the leader-only units and stops them
//! after. Here such a datastore is probed while mounted (on the holder),
//! and otherwise reported `unmounted`, or `failed` when its device is
//! missing (this server could not take it over). zone-mounts never
//! unmounts one: a removed one leaves the list, and zone-vip unmounts it
//! (at once if it can, else when the lease ends, after the units on it).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock: the unit tests run on paused time.
use tokio::time::Instant;

use tokio::sync::Notify;
use zone_datastores::healthy;
use zone_proto::v1::{Datastore, DatastoreHealth, DatastoreState, StorageReport};

use crate::effects::{MountId, MountState, Mounts, Outcome, Stuck, Unmount};

/// How long an unmount may take before it is done lazily instead.
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(5);
/// The least a mount is given before it counts as hung, whatever the probe
/// timeout: a first NFS mount loads the kernel's modules and negotiates
/// with the server, seconds on a slow machine.
const MOUNT_TIMEOUT_FLOOR: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
struct Slot {
    health: DatastoreHealth,
    unhealthy_since: Option<Instant>,
}

/// The health of every datastore, shared by the tasks and the reporter.
#[derive(Debug, Clone, Default)]
pub struct Table {
    slots: Arc<Mutex<BTreeMap<String, Slot>>>,
    /// Targets of removed datastores not yet seen unmounted.
    unmounting: Arc<Mutex<std::collections::BTreeSet<String>>>,
    /// Notified at every change of state (not of latency alone).
    pub changed: Arc<Notify>,
}

impl Table {
    fn set(&self, ds: &Datastore, state: DatastoreState, latency: Option<Duration>, error: String) {
        let mut slots = self.slots.lock().expect("table poisoned");
        let slot = slots.entry(ds.name.clone()).or_insert_with(|| Slot {
            health: DatastoreHealth {
                name: ds.name.clone(),
                required: ds.required,
                exclusive: ds.exclusive,
                revision: ds.revision,
                ..Default::default()
            },
            unhealthy_since: Some(Instant::now()),
        });
        let before = (slot.health.state, slot.health.error.clone());
        slot.health.state = state as i32;
        if let Some(l) = latency {
            slot.health.latency_us = l.as_micros() as u64;
        }
        slot.health.error = error;
        // An exclusive datastore away from the lease holder is as it should
        // be: not unhealthy.
        let fine = healthy(state, ds.exclusive);
        if fine {
            slot.unhealthy_since = None;
        } else if slot.unhealthy_since.is_none() {
            slot.unhealthy_since = Some(Instant::now());
        }
        if before != (slot.health.state, slot.health.error.clone()) {
            if state == DatastoreState::Mounted {
                tracing::info!(datastore = %ds.name, target = %ds.target, "healthy");
            } else {
                tracing::warn!(datastore = %ds.name, target = %ds.target, state = zone_datastores::state_name(state), error = %slot.health.error, "datastore state");
            }
            self.changed.notify_one();
        }
    }

    fn state(&self, name: &str) -> Option<DatastoreState> {
        self.slots
            .lock()
            .expect("table poisoned")
            .get(name)
            .map(|s| s.health.state())
    }

    fn unmounting(&self, target: &str, pending: bool) {
        let mut u = self.unmounting.lock().expect("table poisoned");
        if pending {
            u.insert(target.to_owned());
        } else {
            u.remove(target);
        }
        self.changed.notify_one();
    }

    fn forget(&self, name: &str) {
        self.slots.lock().expect("table poisoned").remove(name);
        self.changed.notify_one();
    }

    /// The report for zoned, at `revision` of the declarations.
    pub fn report(&self, revision: u64) -> StorageReport {
        let slots = self.slots.lock().expect("table poisoned");
        StorageReport {
            revision,
            unmounting: self
                .unmounting
                .lock()
                .expect("table poisoned")
                .iter()
                .cloned()
                .collect(),
            datastores: slots
                .values()
                .map(|s| DatastoreHealth {
                    unhealthy_ms: s
                        .unhealthy_since
                        .map_or(0, |t| t.elapsed().as_millis() as u64),
                    ..s.health.clone()
                })
                .collect(),
        }
    }
}

/// What this supervisor mounted (name → mount), kept in `owned.json`, and
/// the names whose unmount is under way.
#[derive(Debug, Clone)]
struct Owned {
    path: PathBuf,
    mounts: Arc<Mutex<BTreeMap<String, MountId>>>,
    pending: Arc<Mutex<std::collections::BTreeSet<String>>>,
}

impl Owned {
    fn load(path: PathBuf) -> Owned {
        let mounts = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Owned {
            path,
            mounts: Arc::new(Mutex::new(mounts)),
            pending: Arc::default(),
        }
    }

    fn set(&self, name: &str, id: Option<&MountId>) {
        let mut m = self.mounts.lock().expect("owned poisoned");
        let changed = match id {
            Some(id) => m.insert(name.to_owned(), id.clone()).as_ref() != Some(id),
            None => m.remove(name).is_some(),
        };
        if !changed {
            return;
        }
        let data = serde_json::to_vec_pretty(&*m).expect("a map of strings serialises");
        drop(m);
        if let Err(e) = zone_files::atomic::write(&self.path, &data, 0o600, None) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot record what is mounted; a datastore removed while zone-mounts is down may stay mounted");
        }
    }
}

/// One lock per target: a removed datastore's unmount and a new one's
/// mount on the same target never overlap (an unmount spawned first takes
/// it first: tasks start in order).
type Locks = Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

fn lock_for(locks: &Locks, target: &str) -> Arc<tokio::sync::Mutex<()>> {
    locks
        .lock()
        .expect("locks poisoned")
        .entry(target.to_owned())
        .or_default()
        .clone()
}

/// The file, in the state directory, that lists the exclusive datastores'
/// mount units for zone-vip: one unit name per line, in declaration order.
pub const EXCLUSIVE_UNITS: &str = "exclusive-units";

/// How long a failed installation of the mount units waits to try again.
const UNITS_RETRY: Duration = Duration::from_secs(5);

/// The supervisor of this server's datastores.
#[derive(Debug)]
pub struct Supervisor<M: Mounts> {
    mounts: Arc<M>,
    /// This server's id: the write probe's directory.
    server: u64,
    pub table: Table,
    tasks: HashMap<String, (Datastore, tokio::task::JoinHandle<()>)>,
    owned: Owned,
    locks: Locks,
    /// The exclusive datastores' mount units (file name, text) wanted.
    units: tokio::sync::watch::Sender<Vec<(String, String)>>,
}

impl<M: Mounts> Supervisor<M> {
    /// `state_dir` keeps `owned.json` and [`EXCLUSIVE_UNITS`]. Starts the
    /// task that installs the mount units (in a runtime).
    pub fn new(mounts: Arc<M>, server: u64, state_dir: PathBuf) -> Supervisor<M> {
        let (units, rx) = tokio::sync::watch::channel(Vec::new());
        tokio::spawn(install_units(
            mounts.clone(),
            rx,
            state_dir.join(EXCLUSIVE_UNITS),
        ));
        Supervisor {
            mounts,
            server,
            table: Table::default(),
            tasks: HashMap::new(),
            owned: Owned::load(state_dir.join("owned.json")),
            locks: Locks::default(),
            units,
        }
    }

    /// Brings the tasks to `declared`: starts one for each new declaration
    /// (or a new revision of one), stops and unmounts what is gone, and
    /// what an earlier run mounted that is no longer declared.
    pub fn reconcile(&mut self, declared: &[Datastore]) {
        let units: Vec<(String, String)> = declared
            .iter()
            .filter(|d| d.exclusive)
            .map(|d| {
                (
                    zone_datastores::mount_unit_name(&d.target),
                    zone_datastores::mount_unit_text(d),
                )
            })
            .collect();
        self.units.send_if_modified(|u| {
            let changed = *u != units;
            *u = units;
            changed
        });
        let wanted: HashMap<&str, &Datastore> =
            declared.iter().map(|d| (d.name.as_str(), d)).collect();
        let gone: Vec<String> = self
            .tasks
            .iter()
            .filter(|(name, (ds, _))| {
                wanted
                    .get(name.as_str())
                    .is_none_or(|w| w.revision != ds.revision)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            let (ds, task) = self.tasks.remove(&name).expect("listed");
            // Stopping the task kills its helper in flight, if any.
            task.abort();
            let hung = self.table.state(&name) == Some(DatastoreState::Hung);
            self.table.forget(&name);
            if ds.exclusive {
                // zone-vip's: it unmounts it once the units on it stopped
                // (unmounted here, lazily if busy, the units would go on
                // under the empty mount point).
                continue;
            }
            self.unmount(name, MountId::of(&ds), hung);
        }
        let stale: Vec<(String, MountId)> = self
            .owned
            .mounts
            .lock()
            .expect("owned poisoned")
            .iter()
            .filter(|(name, id)| {
                !self.tasks.contains_key(name.as_str())
                    && wanted
                        .get(name.as_str())
                        .is_none_or(|w| MountId::of(w) != **id)
            })
            .map(|(n, id)| (n.clone(), id.clone()))
            .collect();
        for (name, id) in stale {
            if !self
                .owned
                .pending
                .lock()
                .expect("owned poisoned")
                .contains(&name)
            {
                self.unmount(name, id, false);
            }
        }
        for ds in declared {
            if self.tasks.contains_key(&ds.name) {
                continue;
            }
            tracing::info!(datastore = %ds.name, r#type = %ds.r#type, source = %ds.source, target = %ds.target, "following");
            let task = tokio::spawn(supervise(
                self.mounts.clone(),
                ds.clone(),
                self.server,
                self.table.clone(),
                self.owned.clone(),
                lock_for(&self.locks, &ds.target),
            ));
            self.tasks.insert(ds.name.clone(), (ds.clone(), task));
        }
    }

    /// Unmounts datastore `name`'s mount in the background, under its
    /// target's lock: normally first unless `hung`, then lazily (forced
    /// when hung). Forgotten from `owned.json` once the mount is gone.
    fn unmount(&mut self, name: String, id: MountId, hung: bool) {
        let m = self.mounts.clone();
        let table = self.table.clone();
        let owned = self.owned.clone();
        let lock = lock_for(&self.locks, &id.target);
        owned
            .pending
            .lock()
            .expect("owned poisoned")
            .insert(name.clone());
        table.unmounting(&id.target, true);
        tokio::spawn(async move {
            let guard = lock.lock().await;
            unmount(&*m, &name, &id, hung).await;
            // Reported until this namespace's mounts no longer show it.
            let still = m.state(&id) == MountState::Ours;
            drop(guard);
            if still {
                tracing::error!(datastore = %name, target = %id.target, "still mounted after unmounting");
            } else if owned.mounts.lock().expect("owned poisoned").get(&name) == Some(&id) {
                owned.set(&name, None);
            }
            owned.pending.lock().expect("owned poisoned").remove(&name);
            table.unmounting(&id.target, still);
        });
    }
}

/// Installs the exclusive datastores' mount units as they change, then
/// lists them for zone-vip in `list` (after: zone-vip must never find a
/// unit systemd does not know). Gives up when the supervisor is dropped.
async fn install_units<M: Mounts>(
    m: Arc<M>,
    mut wanted: tokio::sync::watch::Receiver<Vec<(String, String)>>,
    list: PathBuf,
) {
    // The list as last written: none at start, so that it is written once
    // even when no datastore is exclusive (a stale one from an earlier run
    // would name units that are gone).
    let mut listed: Option<Vec<String>> = None;
    loop {
        let units = wanted.borrow_and_update().clone();
        let names: Vec<String> = units.iter().map(|(n, _)| n.clone()).collect();
        let m2 = m.clone();
        let installed = tokio::task::spawn_blocking(move || m2.install_units(&units)).await;
        // What to list (None: the installation failed, list nothing new),
        // and whether to try again.
        let (to_list, retry): (Option<Vec<String>>, bool) = match installed {
            Ok(Ok(refused)) => {
                for (unit, why) in &refused {
                    tracing::error!(%unit, error = %why, "exclusive datastore's mount unit not installed: zone-vip will not mount it");
                }
                // A refused unit is left out, the others listed.
                let names = names
                    .into_iter()
                    .filter(|n| !refused.iter().any(|(r, _)| r == n))
                    .collect();
                (Some(names), !refused.is_empty())
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot install the exclusive datastores' mount units");
                (None, true)
            }
            Err(e) => {
                tracing::error!(error = %e, "installing the mount units panicked");
                (None, true)
            }
        };
        if let Some(names) = to_list.filter(|n| listed.as_ref() != Some(n)) {
            let text: String = names.iter().map(|n| format!("{n}\n")).collect();
            match zone_files::atomic::write(&list, text.as_bytes(), 0o644, None) {
                Ok(()) => listed = Some(names),
                Err(e) => {
                    tracing::error!(path = %list.display(), error = %e, "cannot list the exclusive datastores' units for zone-vip")
                }
            }
        }
        let changed = if retry || listed.is_none() {
            tokio::time::timeout(UNITS_RETRY, wanted.changed())
                .await
                .unwrap_or(Ok(()))
        } else {
            wanted.changed().await
        };
        if changed.is_err() {
            return;
        }
    }
}

/// Unmounts datastore `name` if it is what is mounted on its target:
/// normally first unless `hung`, then lazily (forced when hung: see
/// [`Unmount::ForcedLazy`]). Something else mounted there is left alone.
async fn unmount<M: Mounts>(m: &M, name: &str, id: &MountId, hung: bool) {
    let target = id.target.as_str();
    match m.state(id) {
        MountState::Absent => return,
        MountState::Other(what) => {
            tracing::warn!(datastore = %name, %target, mounted = %what, "another file system is mounted there; left alone");
            return;
        }
        MountState::Ours => {}
    }
    tracing::info!(datastore = %name, %target, hung, "unmounting");
    if !hung {
        match m.unmount(target, Unmount::Plain, UNMOUNT_TIMEOUT).await {
            Outcome::Done(_) => return,
            Outcome::Failed(e) => {
                tracing::warn!(datastore = %name, %target, error = %e, "unmount failed (in use?); detaching lazily")
            }
            Outcome::Hung(_) => {
                tracing::warn!(datastore = %name, %target, "unmount hung; detaching lazily")
            }
        }
    }
    let how = if hung {
        Unmount::ForcedLazy
    } else {
        Unmount::Lazy
    };
    match m.unmount(target, how, UNMOUNT_TIMEOUT).await {
        Outcome::Done(_) => tracing::info!(datastore = %name, %target, "detached"),
        Outcome::Failed(e) => {
            tracing::error!(datastore = %name, %target, error = %e, "cannot unmount")
        }
        Outcome::Hung(_) => {
            tracing::error!(datastore = %name, %target, "even a lazy unmount hung")
        }
    }
}

/// Mounts and probes one datastore, forever (the supervisor aborts it).
/// Each operation holds the target's lock.
async fn supervise<M: Mounts>(
    m: Arc<M>,
    ds: Datastore,
    server: u64,
    table: Table,
    owned: Owned,
    lock: Arc<tokio::sync::Mutex<()>>,
) {
    let interval = Duration::from_millis(ds.probe_interval_ms.max(1).into());
    let timeout = Duration::from_millis(ds.probe_timeout_ms.max(1).into());
    let id = MountId::of(&ds);
    table.set(&ds, DatastoreState::Probing, None, String::new());
    let write_as = ds.write_probe.then_some(server);
    let mut stuck: Option<Box<dyn Stuck>> = None;
    loop {
        if let Some(s) = stuck.as_mut() {
            // The last child is still held by the kernel: start no other
            // (they would pile up on the dead server); stay hung.
            if !s.finished() {
                tokio::time::sleep(interval.min(Duration::from_secs(1))).await;
                continue;
            }
            stuck = None;
        }
        let guard = lock.lock().await;
        match m.state(&id) {
            MountState::Ours if ds.exclusive => {
                // Mounted by zone-vip on the lease holder: probed, never
                // recorded (zone-mounts never unmounts it).
            }
            MountState::Ours => {
                // Mounted by an earlier run (or exactly as declared): ours.
                owned.set(&ds.name, Some(&id));
            }
            MountState::Other(what) => {
                drop(guard);
                table.set(
                    &ds,
                    DatastoreState::Failed,
                    None,
                    format!(
                        "another file system is mounted on {} ({what}); zone-mounts neither uses nor unmounts it",
                        ds.target
                    ),
                );
                tokio::time::sleep(interval).await;
                continue;
            }
            MountState::Absent if ds.exclusive => {
                // Mounted by zone-vip on the lease holder alone.
                drop(guard);
                if m.device_present(&ds.source) {
                    table.set(&ds, DatastoreState::Unmounted, None, String::new());
                } else {
                    table.set(
                        &ds,
                        DatastoreState::Failed,
                        None,
                        format!(
                            "{} is not present on this server: it could not mount the datastore if it led",
                            ds.source
                        ),
                    );
                }
                tokio::time::sleep(interval).await;
                continue;
            }
            MountState::Absent => {
                let mount_timeout = timeout.max(MOUNT_TIMEOUT_FLOOR);
                match m.mount(&ds, mount_timeout).await {
                    Outcome::Done(d) => {
                        owned.set(&ds.name, Some(&id));
                        tracing::info!(datastore = %ds.name, target = %ds.target, took = ?d, "mounted");
                    }
                    Outcome::Failed(e) => {
                        drop(guard);
                        table.set(&ds, DatastoreState::Failed, None, e);
                        tokio::time::sleep(interval).await;
                        continue;
                    }
                    Outcome::Hung(s) => {
                        drop(guard);
                        stuck = Some(s);
                        table.set(
                            &ds,
                            DatastoreState::Hung,
                            None,
                            format!(
                                "the mount did not finish within {} ms",
                                mount_timeout.as_millis()
                            ),
                        );
                        continue;
                    }
                }
            }
        }
        let outcome = m.probe(&ds.target, write_as, timeout).await;
        drop(guard);
        match outcome {
            Outcome::Done(d) => table.set(&ds, DatastoreState::Mounted, Some(d), String::new()),
            Outcome::Failed(e) => table.set(&ds, DatastoreState::Failed, None, e),
            Outcome::Hung(s) => {
                stuck = Some(s);
                table.set(
                    &ds,
                    DatastoreState::Hung,
                    None,
                    format!(
                        "a probe did not finish within {} ms: the storage does not answer",
                        timeout.as_millis()
                    ),
                );
            }
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests;
