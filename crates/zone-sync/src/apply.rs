//! Bringing one server's disk to what the store says.
//!
//! [`Applier::apply`] takes every managed file as of one store revision,
//! renders each for this server, and writes what differs, atomically, after
//! keeping the old content as a backup. It remembers, in a small state file
//! written atomically after each pass, the revision it applied and the hash
//! of what it wrote for each path. From that it tells apart:
//! - a new version (the rendered content changed): written, and its units
//!   need a restart;
//! - drift (the file on disk was edited by hand while the store did not
//!   change): restored, reported, no restart;
//! - nothing to do, also after a restart of zone-sync: a change is never
//!   applied twice, and a server that was down gets the latest version of
//!   each file, never the ones in between.
//!
//! A path this server's own managed roots do not cover, or that passes
//! through a symbolic link on its disk, is refused and reported; the store
//! checks paths too, this is the server's own line of defence.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use zone_files::paths::{check_on_disk, Roots};
use zone_files::report::LastRestart;
use zone_files::template::{NodeVars, Template};

use crate::disk::{Disk, Drift};

/// One managed file as the store holds it (the fields zone-sync uses).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Wanted {
    pub path: String,
    pub content: Vec<u8>,
    pub mode: u32,
    pub owner: String,
    pub group: String,
    pub restart_units: Vec<String>,
    pub template: bool,
}

/// What zone-sync remembers between passes and restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The store revision last applied.
    pub revision: u64,
    /// SHA-256 (hex) of what was last written, per path.
    pub files: BTreeMap<String, String>,
    /// Units whose files changed and that have not been restarted yet.
    #[serde(default)]
    pub pending_restarts: BTreeSet<String>,
    /// The revision at which units first became pending.
    #[serde(default)]
    pub pending_since: u64,
    /// The restart that failed, stopping the roll, until a new push.
    #[serde(default)]
    pub restart_failed: Option<String>,
    /// The last restart this server did in a roll.
    #[serde(default)]
    pub last_restart: Option<LastRestart>,
    /// Files found edited by hand (and restored), with when, in seconds
    /// since the epoch: reported for a day, or until a new version.
    #[serde(default)]
    pub drift_seen: BTreeMap<String, u64>,
    /// The zone's everywhere units this zone-sync started (stopped when
    /// the zone no longer runs them).
    #[serde(default)]
    pub everywhere: BTreeSet<String>,
}

impl State {
    pub fn load(path: &Path) -> std::io::Result<State> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e),
        }
    }

    /// Atomically (`zone_files::atomic`): a crash leaves the old state or
    /// the new.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        zone_files::atomic::write(path, &bytes, 0o644, None)
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub revision: u64,
    /// Written because the store's version changed.
    pub written: Vec<String>,
    /// Edited by hand on disk, restored.
    pub drift_restored: Vec<String>,
    /// Not written, with the reason.
    pub refused: Vec<(String, String)>,
    /// Units whose files changed in this pass.
    pub restart_units: BTreeSet<String>,
}

#[derive(Debug)]
pub struct Applier<D: Disk> {
    pub disk: D,
    pub roots: Roots,
    /// The filesystem root the disk writes under (`/` in production).
    pub fs_root: PathBuf,
    pub backups_keep: usize,
    pub state: State,
}

fn sha(data: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(data))
}

/// The id of user or group `name` (`kind`) on this server; 0 (root) for
/// an empty name.
fn id_of(
    kind: &str,
    name: &str,
    lookup: impl FnOnce(&str) -> nix::Result<Option<u32>>,
) -> Result<u32, String> {
    if name.is_empty() {
        return Ok(0);
    }
    lookup(name)
        .map_err(|e| format!("looking up {kind} {name}: {e}"))?
        .ok_or_else(|| format!("no {kind} {name} on this server"))
}

fn owner_ids(owner: &str, group: &str) -> Result<Option<(u32, u32)>, String> {
    if owner.is_empty() && group.is_empty() {
        return Ok(None);
    }
    let uid = id_of("user", owner, |n| {
        nix::unistd::User::from_name(n).map(|u| u.map(|u| u.uid.as_raw()))
    })?;
    let gid = id_of("group", group, |n| {
        nix::unistd::Group::from_name(n).map(|g| g.map(|g| g.gid.as_raw()))
    })?;
    Ok(Some((uid, gid)))
}

impl<D: Disk> Applier<D> {
    /// Renders `w` for this server.
    pub fn render(w: &Wanted, node: &NodeVars) -> Result<Vec<u8>, String> {
        if !w.template {
            return Ok(w.content.clone());
        }
        let text =
            std::str::from_utf8(&w.content).map_err(|_| "a template must be UTF-8".to_owned())?;
        let t = Template::parse(text).map_err(|e| e.to_string())?;
        Ok(t.render(node).into_bytes())
    }

    /// One pass over every managed file as of `revision`.
    pub fn apply(&mut self, files: &[Wanted], revision: u64, node: &NodeVars) -> Report {
        let mut report = Report {
            revision,
            ..Report::default()
        };
        let mut next = BTreeMap::new();
        for w in files {
            match self.apply_one(w, node, &mut report) {
                Ok(hash) => {
                    next.insert(w.path.clone(), hash);
                }
                Err(reason) => {
                    tracing::warn!(path = %w.path, %reason, "managed file not written");
                    // Keep what was last written: the next pass retries.
                    if let Some(h) = self.state.files.get(&w.path) {
                        next.insert(w.path.clone(), h.clone());
                    }
                    report.refused.push((w.path.clone(), reason));
                }
            }
        }
        let mut pending = std::mem::take(&mut self.state.pending_restarts);
        let mut since = self.state.pending_since;
        if pending.is_empty() {
            since = revision;
        }
        pending.extend(report.restart_units.iter().cloned());
        // A new version (a fix, say) lets a halted roll go again.
        let failed = if report.written.is_empty() {
            self.state.restart_failed.take()
        } else {
            None
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut drift_seen = std::mem::take(&mut self.state.drift_seen);
        drift_seen
            .retain(|path, at| now.saturating_sub(*at) < 86_400 && !report.written.contains(path));
        for path in &report.drift_restored {
            drift_seen.insert(path.clone(), now);
        }
        self.state = State {
            revision,
            files: next,
            pending_restarts: pending,
            pending_since: since,
            restart_failed: failed,
            last_restart: self.state.last_restart.take(),
            drift_seen,
            everywhere: std::mem::take(&mut self.state.everywhere),
        };
        report
    }

    fn apply_one(
        &self,
        w: &Wanted,
        node: &NodeVars,
        report: &mut Report,
    ) -> Result<String, String> {
        check_on_disk(&self.roots, &self.fs_root, &w.path).map_err(|e| e.to_string())?;
        let rendered = Self::render(w, node)?;
        let hash = sha(&rendered);
        let last = self.state.files.get(&w.path);
        let drift = self
            .disk
            .drift(&w.path, &rendered)
            .map_err(|e| e.to_string())?;
        if drift == Drift::Same {
            return Ok(hash);
        }
        let owner = owner_ids(&w.owner, &w.group)?;
        let is_drift = last == Some(&hash);
        let tag = format!("{:012}", report.revision);
        self.disk
            .backup(&w.path, &tag, self.backups_keep)
            .map_err(|e| format!("backing up: {e}"))?;
        let mode = if w.mode == 0 { 0o644 } else { w.mode };
        self.disk
            .write_atomic(&w.path, &rendered, mode, owner)
            .map_err(|e| format!("writing: {e}"))?;
        if is_drift {
            tracing::warn!(path = %w.path, "managed file was edited on disk: restored");
            report.drift_restored.push(w.path.clone());
        } else {
            tracing::info!(path = %w.path, revision = report.revision, "managed file written");
            report.written.push(w.path.clone());
            report.restart_units.extend(w.restart_units.iter().cloned());
        }
        Ok(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::MemoryDisk;

    fn node(id: u64) -> NodeVars {
        NodeVars {
            id,
            name: format!("zone-{id}"),
            address: format!("10.0.0.{id}"),
        }
    }

    fn applier() -> Applier<MemoryDisk> {
        Applier {
            disk: MemoryDisk::default(),
            roots: Roots::new(["/etc/one"]).unwrap(),
            fs_root: PathBuf::from("/nonexistent-zone-sync-root"),
            backups_keep: 3,
            state: State::default(),
        }
    }

    fn wanted(path: &str, content: &str) -> Wanted {
        Wanted {
            path: path.into(),
            content: content.as_bytes().to_vec(),
            restart_units: vec!["opennebula.service".into()],
            ..Wanted::default()
        }
    }

    #[test]
    fn writes_renders_and_asks_for_restarts_only_on_change() {
        let mut a = applier();
        let mut oned = wanted("/etc/one/oned.conf", "SERVER_ID = {{id0}}\n");
        oned.template = true;
        let r = a.apply(std::slice::from_ref(&oned), 5, &node(3));
        assert_eq!(r.written, vec!["/etc/one/oned.conf"]);
        assert!(r.restart_units.contains("opennebula.service"));
        assert_eq!(
            a.disk.read("/etc/one/oned.conf").unwrap().unwrap(),
            b"SERVER_ID = 2\n"
        );
        // The same revision again (a restart of zone-sync): nothing to do.
        let r = a.apply(std::slice::from_ref(&oned), 5, &node(3));
        assert!(r.written.is_empty() && r.restart_units.is_empty(), "{r:?}");
        // A hand edit is restored without a restart.
        a.disk.edit("/etc/one/oned.conf", b"SERVER_ID = 7\n");
        let r = a.apply(std::slice::from_ref(&oned), 6, &node(3));
        assert_eq!(r.drift_restored, vec!["/etc/one/oned.conf"]);
        assert!(r.restart_units.is_empty());
        assert!(a.state.drift_seen.contains_key("/etc/one/oned.conf"));
        assert_eq!(
            a.disk.backups("/etc/one/oned.conf").unwrap(),
            vec!["000000000006"]
        );
        // A new version.
        oned.content = b"SERVER_ID = {{id0}}\nLOG = 3\n".to_vec();
        let r = a.apply(std::slice::from_ref(&oned), 9, &node(3));
        assert_eq!(r.written, vec!["/etc/one/oned.conf"]);
        assert_eq!(a.state.revision, 9);
        assert!(
            a.state.drift_seen.is_empty(),
            "a new version clears the drift"
        );
    }

    #[test]
    fn refuses_paths_outside_this_servers_roots() {
        let mut a = applier();
        let r = a.apply(&[wanted("/etc/passwd", "x")], 2, &node(1));
        assert_eq!(r.refused.len(), 1);
        assert!(
            r.refused[0].1.contains("outside the managed roots"),
            "{r:?}"
        );
        assert_eq!(a.disk.read("/etc/passwd").unwrap(), None);
    }

    #[test]
    fn a_file_already_right_on_disk_needs_no_restart() {
        let mut a = applier();
        a.disk.edit("/etc/one/sched.conf", b"x\n");
        let r = a.apply(&[wanted("/etc/one/sched.conf", "x\n")], 3, &node(1));
        assert!(r.written.is_empty() && r.restart_units.is_empty(), "{r:?}");
        assert!(a.state.files.contains_key("/etc/one/sched.conf"));
    }

    #[test]
    fn state_survives_a_save_and_load() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        assert_eq!(State::load(&p).unwrap(), State::default());
        let s = State {
            revision: 12,
            files: [("/etc/one/a".to_string(), "ab".to_string())].into(),
            pending_restarts: ["opennebula.service".to_string()].into(),
            pending_since: 11,
            restart_failed: None,
            last_restart: None,
            drift_seen: BTreeMap::new(),
            everywhere: ["opennebula-gate.service".to_string()].into(),
        };
        s.save(&p).unwrap();
        assert_eq!(State::load(&p).unwrap(), s);
    }
}
