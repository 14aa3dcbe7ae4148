//! One task per declared datastore: mount it if it is not, probe it every
//! interval, keep its health in the table the reports are made from. A
//! removed datastore's task is stopped and the datastore unmounted, lazily
//! when it is hung (a normal unmount would wait on the dead server).
//!
//! What zone-mounts mounted is recorded in `<state dir>/owned.json` (on
//! /run: mounts do not outlive a boot either), so that a datastore removed
//! while zone-mounts was down is still unmounted when it comes back, and
//! nothing it did not mount is ever unmounted.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock: the unit tests run on paused time.
use tokio::time::Instant;

use tokio::sync::Notify;
use zone_datastores::healthy;
use zone_proto::v1::{Datastore, DatastoreHealth, DatastoreState, StorageReport};

use crate::effects::{Mounts, Outcome, Stuck};

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
        let fine = healthy(state) || (ds.exclusive && state == DatastoreState::Unmounted);
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

/// The supervisor of this server's datastores.
#[derive(Debug)]
pub struct Supervisor<M: Mounts> {
    mounts: Arc<M>,
    /// This server's id: the write probe's directory.
    server: u64,
    pub table: Table,
    tasks: HashMap<String, (Datastore, tokio::task::JoinHandle<()>)>,
    owned_path: PathBuf,
    /// name → target of what this supervisor mounted.
    owned: BTreeMap<String, String>,
}

impl<M: Mounts> Supervisor<M> {
    /// `state_dir` keeps `owned.json`.
    pub fn new(mounts: Arc<M>, server: u64, state_dir: PathBuf) -> Supervisor<M> {
        let owned_path = state_dir.join("owned.json");
        let owned = std::fs::read(&owned_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Supervisor {
            mounts,
            server,
            table: Table::default(),
            tasks: HashMap::new(),
            owned_path,
            owned,
        }
    }

    fn save_owned(&self) {
        let data = serde_json::to_vec_pretty(&self.owned).expect("a map of strings serialises");
        if let Err(e) = zone_files::atomic::write(&self.owned_path, &data, 0o600, None) {
            tracing::error!(path = %self.owned_path.display(), error = %e, "cannot record what is mounted; a datastore removed while zone-mounts is down may stay mounted");
        }
    }

    /// Brings the tasks to `declared`: starts one for each new declaration
    /// (or a new revision of one), stops and unmounts what is gone.
    pub fn reconcile(&mut self, declared: &[Datastore]) {
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
            task.abort();
            let hung = self.table.state(&name) == Some(DatastoreState::Hung);
            self.table.forget(&name);
            self.unmount(name, ds.target, hung);
        }
        // Mounted by an earlier run, and no longer declared.
        let stale: Vec<(String, String)> = self
            .owned
            .iter()
            .filter(|(name, target)| {
                !self.tasks.contains_key(name.as_str())
                    && wanted
                        .get(name.as_str())
                        .is_none_or(|w| &w.target != *target)
            })
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        for (name, target) in stale {
            self.unmount(name, target, false);
        }
        for ds in declared {
            if self.tasks.contains_key(&ds.name) {
                continue;
            }
            tracing::info!(datastore = %ds.name, r#type = %ds.r#type, source = %ds.source, target = %ds.target, "following");
            if !ds.exclusive {
                self.owned.insert(ds.name.clone(), ds.target.clone());
            }
            let task = tokio::spawn(supervise(
                self.mounts.clone(),
                ds.clone(),
                self.server,
                self.table.clone(),
            ));
            self.tasks.insert(ds.name.clone(), (ds.clone(), task));
        }
        self.save_owned();
    }

    /// Unmounts `target` in the background: normally first unless `hung`,
    /// then lazily.
    fn unmount(&mut self, name: String, target: String, hung: bool) {
        self.owned.remove(&name);
        let m = self.mounts.clone();
        let table = self.table.clone();
        table.unmounting(&target, true);
        tokio::spawn(async move {
            unmount(&*m, &name, &target, hung).await;
            // Reported until this namespace's mounts no longer show it.
            let still = m.mounted(&target);
            if still {
                tracing::error!(datastore = %name, %target, "still mounted after unmounting");
            }
            table.unmounting(&target, still);
        });
    }
}

/// Unmounts `target` if mounted: normally first unless `hung`, then
/// lazily.
async fn unmount<M: Mounts>(m: &M, name: &str, target: &str, hung: bool) {
    if !m.mounted(target) {
        return;
    }
    tracing::info!(datastore = %name, %target, lazy = hung, "unmounting");
    if !hung {
        match m.unmount(target, false, UNMOUNT_TIMEOUT).await {
            Outcome::Done(_) => return,
            Outcome::Failed(e) => {
                tracing::warn!(datastore = %name, %target, error = %e, "unmount failed; detaching lazily")
            }
            Outcome::Hung(_) => {
                tracing::warn!(datastore = %name, %target, "unmount hung; detaching lazily")
            }
        }
    }
    match m.unmount(target, true, UNMOUNT_TIMEOUT).await {
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
async fn supervise<M: Mounts>(m: Arc<M>, ds: Datastore, server: u64, table: Table) {
    let interval = Duration::from_millis(ds.probe_interval_ms.max(1).into());
    let timeout = Duration::from_millis(ds.probe_timeout_ms.max(1).into());
    table.set(&ds, DatastoreState::Probing, None, String::new());
    if ds.exclusive {
        // Mounting on the lease holder only, after the fence delay, comes
        // with fencing; until then an exclusive datastore is never mounted.
        table.set(
            &ds,
            DatastoreState::Unmounted,
            None,
            "exclusive: mounted only on the lease holder after the fence delay, which this zone-mounts does not do yet".into(),
        );
        std::future::pending::<()>().await;
    }
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
        if !m.mounted(&ds.target) {
            let mount_timeout = timeout.max(MOUNT_TIMEOUT_FLOOR);
            match m.mount(&ds, mount_timeout).await {
                Outcome::Done(d) => {
                    tracing::info!(datastore = %ds.name, target = %ds.target, took = ?d, "mounted");
                }
                Outcome::Failed(e) => {
                    table.set(&ds, DatastoreState::Failed, None, e);
                    tokio::time::sleep(interval).await;
                    continue;
                }
                Outcome::Hung(s) => {
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
        match m.probe(&ds.target, write_as, timeout).await {
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
