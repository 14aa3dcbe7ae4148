//! Mount, unmount, probe, and "is it mounted", behind [`Mounts`]: the real
//! one ([`Children`]) runs each operation in a helper child with a deadline;
//! [`Memory`] keeps mounts in a set and hangs on demand, for the
//! supervisor's unit tests.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt as _;
use zone_proto::v1::Datastore;

/// A child that missed its deadline: killed, but perhaps held by the
/// kernel until the storage answers.
pub trait Stuck: Send + Sync {
    /// True once it has finished (and been reaped).
    fn finished(&mut self) -> bool;
}

/// How an operation ended.
pub enum Outcome {
    /// It worked, in this long.
    Done(Duration),
    /// It failed: why.
    Failed(String),
    /// It did not finish within its deadline; the process doing it.
    Hung(Box<dyn Stuck>),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Done(d) => write!(f, "Done({d:?})"),
            Outcome::Failed(e) => write!(f, "Failed({e})"),
            Outcome::Hung(_) => f.write_str("Hung"),
        }
    }
}

/// A datastore's mount, as far as telling it from other mounts goes; what
/// zone-mounts records of what it mounted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MountId {
    pub target: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub source: String,
}

impl MountId {
    pub fn of(ds: &Datastore) -> MountId {
        MountId {
            target: ds.target.clone(),
            ty: ds.r#type.clone(),
            source: ds.source.clone(),
        }
    }
}

/// What is mounted on a datastore's target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountState {
    Absent,
    /// The datastore itself (its type and source).
    Ours,
    /// Something else (what mountinfo says of it): never used, never
    /// unmounted.
    Other(String),
}

/// How an unmount goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmount {
    /// umount2(0): fails while in use.
    Plain,
    /// MNT_DETACH: gone from the tree now, released once no longer used.
    Lazy,
    /// MNT_FORCE (aborts an NFS mount's requests in flight: processes
    /// stuck on a dead server get an error), then MNT_DETACH. Only for a
    /// datastore known to be hung: on a healthy one it would fail the I/O
    /// of whoever uses it.
    ForcedLazy,
}

/// What the supervisor does to storage.
pub trait Mounts: std::fmt::Debug + Send + Sync + 'static {
    /// What is mounted on `id.target` now (never waits on storage).
    fn state(&self, id: &MountId) -> MountState;
    fn mount(&self, ds: &Datastore, timeout: Duration) -> impl Future<Output = Outcome> + Send;
    fn unmount(
        &self,
        target: &str,
        how: Unmount,
        timeout: Duration,
    ) -> impl Future<Output = Outcome> + Send;
    /// `write_as`: the write probe, as this server.
    fn probe(
        &self,
        target: &str,
        write_as: Option<u64>,
        timeout: Duration,
    ) -> impl Future<Output = Outcome> + Send;
    /// Whether an exclusive datastore's device (`source`, under /dev) is
    /// present on this server. Never waits on storage.
    fn device_present(&self, source: &str) -> bool;
    /// Makes the units directory hold exactly `units` (file name, text) of
    /// the mount units zone-mounts writes, and systemd know them; the ones
    /// it may not write (another file of that name is there), with why.
    /// Blocks: run it off the runtime.
    fn install_units(&self, units: &[(String, String)]) -> Result<Vec<(String, String)>, String>;
}

/// The real thing: `<exe> helper ...` children, and exclusive datastores'
/// mount units written for systemd.
#[derive(Debug, Clone)]
pub struct Children {
    /// This binary (read once at start: an upgrade may replace the file).
    pub exe: PathBuf,
    /// Where the mount units go (`/run/systemd/system`).
    pub units_dir: PathBuf,
    /// Whether to run `systemctl daemon-reload` after a change (not when
    /// the units go somewhere systemd does not read, as in tests).
    pub reload: bool,
}

struct Child(tokio::process::Child);

impl Stuck for Child {
    fn finished(&mut self) -> bool {
        !matches!(self.0.try_wait(), Ok(None))
    }
}

impl Children {
    async fn run(&self, args: Vec<String>, timeout: Duration) -> Outcome {
        let started = Instant::now();
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("helper")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            // A task stopped (its datastore removed) kills its helper: a
            // mount must not complete after the supervisor stopped caring.
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return Outcome::Failed(format!("cannot start {}: {e}", self.exe.display())),
        };
        let mut stderr = child.stderr.take();
        let deadline = tokio::time::Instant::now() + timeout;
        let status = tokio::time::timeout_at(deadline, child.wait()).await;
        match status {
            Ok(Ok(status)) => {
                let mut why = String::new();
                if let Some(e) = stderr.as_mut() {
                    // The child has exited: its stderr ends at once.
                    let _ = tokio::time::timeout(
                        Duration::from_millis(200),
                        e.read_to_string(&mut why),
                    )
                    .await;
                }
                if status.success() {
                    Outcome::Done(started.elapsed())
                } else {
                    let why = why.trim();
                    Outcome::Failed(if why.is_empty() {
                        format!("helper {} ended with {status}", args.join(" "))
                    } else {
                        why.lines().last().unwrap_or(why).to_owned()
                    })
                }
            }
            Ok(Err(e)) => Outcome::Failed(format!("waiting for the helper: {e}")),
            Err(_) => {
                // SIGKILL: NFS waits are killable, but one in a truly
                // uninterruptible sleep finishes only when the server
                // answers. Either way it is never waited for here.
                let _ = child.start_kill();
                Outcome::Hung(Box::new(Child(child)))
            }
        }
    }
}

impl Mounts for Children {
    fn state(&self, id: &MountId) -> MountState {
        crate::mountinfo::state(id)
    }

    fn mount(&self, ds: &Datastore, timeout: Duration) -> impl Future<Output = Outcome> + Send {
        let args = vec![
            "mount".into(),
            "--type".into(),
            ds.r#type.clone(),
            "--source".into(),
            ds.source.clone(),
            "--options".into(),
            ds.options.clone(),
            ds.target.clone(),
        ];
        self.run(args, timeout)
    }

    fn unmount(
        &self,
        target: &str,
        how: Unmount,
        timeout: Duration,
    ) -> impl Future<Output = Outcome> + Send {
        let mut args = vec!["umount".to_owned()];
        match how {
            Unmount::Plain => {}
            Unmount::Lazy => args.push("--lazy".into()),
            Unmount::ForcedLazy => args.extend(["--lazy".into(), "--force".into()]),
        }
        args.push(target.to_owned());
        self.run(args, timeout)
    }

    fn probe(
        &self,
        target: &str,
        write_as: Option<u64>,
        timeout: Duration,
    ) -> impl Future<Output = Outcome> + Send {
        let mut args = vec!["probe".to_owned()];
        if let Some(id) = write_as {
            args.push("--write-as".into());
            args.push(id.to_string());
        }
        args.push(target.to_owned());
        self.run(args, timeout)
    }

    fn device_present(&self, source: &str) -> bool {
        std::fs::metadata(source).is_ok()
    }

    /// New files and removals need no `systemctl daemon-reload`: systemd
    /// loads a unit it does not know from disk when it is first asked for
    /// it (its unit file cache is rebuilt when the directories change), and
    /// forgets one that is gone once nothing refers to it. Only a file
    /// replaced by a different text does (its unit is loaded already).
    /// Avoided otherwise: on a busy server a reload holds systemd for
    /// seconds, and zone-vip's `systemctl stop` on losing the lease waits
    /// behind it (under QEMU's emulation, one reload on the leader cost it
    /// its lease, and its stop waited past the watchdog's timeout).
    fn install_units(&self, units: &[(String, String)]) -> Result<Vec<(String, String)>, String> {
        let dir = &self.units_dir;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".mount") || units.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let first = std::fs::read_to_string(e.path()).unwrap_or_default();
            if first.lines().next() == Some(zone_datastores::UNIT_HEADER) {
                std::fs::remove_file(e.path())
                    .map_err(|err| format!("{}: {err}", e.path().display()))?;
                tracing::info!(unit = %name, "mount unit removed");
            }
        }
        let mut replaced = false;
        let mut refused = Vec::new();
        for (name, text) in units {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(old) if old == *text => continue,
                Ok(old) if old.lines().next() != Some(zone_datastores::UNIT_HEADER) => {
                    refused.push((
                        name.clone(),
                        format!(
                            "{} exists and was not written by zone-mounts; left alone",
                            path.display()
                        ),
                    ));
                    continue;
                }
                Ok(_) => replaced = true,
                Err(_) => {}
            }
            zone_files::atomic::write(&path, text.as_bytes(), 0o644, None)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            tracing::info!(unit = %name, "mount unit written");
        }
        if replaced && self.reload {
            let mut c = std::process::Command::new("systemctl");
            c.arg("daemon-reload");
            zone_units::run_with_timeout(c, Duration::from_secs(60))?;
        }
        Ok(refused)
    }
}

/// Mounts in memory; a target in `hanging` hangs every operation but a
/// lazy unmount until taken out, one in `failing` fails it.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    pub mounted: Arc<Mutex<std::collections::BTreeMap<String, MountId>>>,
    pub hanging: Arc<Mutex<BTreeSet<String>>>,
    pub failing: Arc<Mutex<BTreeSet<String>>>,
    /// Every operation, in order (`mount /x`, `umount -l /x`, `umount -lf
    /// /x`, `probe /x`).
    pub log: Arc<Mutex<Vec<String>>>,
    /// Devices not present.
    pub missing: Arc<Mutex<BTreeSet<String>>>,
    /// The mount units installed, by file name.
    pub units: Arc<Mutex<std::collections::BTreeMap<String, String>>>,
}

struct MemoryStuck {
    target: String,
    hanging: Arc<Mutex<BTreeSet<String>>>,
}

impl Stuck for MemoryStuck {
    fn finished(&mut self) -> bool {
        !self.hanging.lock().unwrap().contains(&self.target)
    }
}

impl Memory {
    fn op(&self, what: String, target: &str, waits: bool, then: impl FnOnce(&Memory)) -> Outcome {
        self.log.lock().unwrap().push(what);
        if waits && self.hanging.lock().unwrap().contains(target) {
            return Outcome::Hung(Box::new(MemoryStuck {
                target: target.to_owned(),
                hanging: self.hanging.clone(),
            }));
        }
        if self.failing.lock().unwrap().contains(target) {
            return Outcome::Failed(format!("{target}: Input/output error"));
        }
        then(self);
        Outcome::Done(Duration::from_micros(100))
    }

    pub fn is_mounted(&self, target: &str) -> bool {
        self.mounted.lock().unwrap().contains_key(target)
    }
}

impl Mounts for Memory {
    fn state(&self, id: &MountId) -> MountState {
        match self.mounted.lock().unwrap().get(&id.target) {
            None => MountState::Absent,
            Some(m) if m == id => MountState::Ours,
            Some(m) => MountState::Other(format!("{} {}", m.ty, m.source)),
        }
    }

    fn mount(&self, ds: &Datastore, _: Duration) -> impl Future<Output = Outcome> + Send {
        let id = MountId::of(ds);
        let o = self.op(
            format!("mount {}", id.target),
            &id.target.clone(),
            true,
            |m| {
                m.mounted.lock().unwrap().insert(id.target.clone(), id);
            },
        );
        std::future::ready(o)
    }

    fn unmount(
        &self,
        target: &str,
        how: Unmount,
        _: Duration,
    ) -> impl Future<Output = Outcome> + Send {
        let t = target.to_owned();
        let what = match how {
            Unmount::Plain => format!("umount {t}"),
            Unmount::Lazy => format!("umount -l {t}"),
            Unmount::ForcedLazy => format!("umount -lf {t}"),
        };
        let o = self.op(what, &t, how == Unmount::Plain, |m| {
            m.mounted.lock().unwrap().remove(&t);
        });
        std::future::ready(o)
    }

    fn probe(
        &self,
        target: &str,
        _: Option<u64>,
        _: Duration,
    ) -> impl Future<Output = Outcome> + Send {
        let o = self.op(format!("probe {target}"), target, true, |_| {});
        std::future::ready(o)
    }

    fn device_present(&self, source: &str) -> bool {
        !self.missing.lock().unwrap().contains(source)
    }

    fn install_units(&self, units: &[(String, String)]) -> Result<Vec<(String, String)>, String> {
        *self.units.lock().unwrap() = units.iter().cloned().collect();
        Ok(Vec::new())
    }
}
