//! The server's disk, as zone-sync touches it: behind [`Disk`], with a real
//! implementation rooted anywhere (`/` in production, a temporary directory
//! in the process tests) and one in memory for the logic's unit tests.
//!
//! Writes are atomic (`zone_files::atomic`: a temporary file in the same
//! directory, written, given its mode and owner, fsynced, renamed over the
//! target, then the directory fsynced). A crash at any step leaves the old
//! content or the new, never a part; a temporary file left behind is
//! removed by the next write. Before a managed file is replaced its current content is
//! kept as a backup, the newest `keep` per file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

/// What is on disk at a managed path compared with what should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drift {
    Same,
    /// Edited by hand (or by anything but zone-sync).
    Changed,
    Missing,
}

pub trait Disk: Send + Sync {
    /// The file's content, or None if there is no file.
    fn read(&self, path: &str) -> std::io::Result<Option<Vec<u8>>>;
    /// Replaces the file atomically (see the module doc), creating its
    /// directories if needed.
    fn write_atomic(
        &self,
        path: &str,
        data: &[u8],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> std::io::Result<()>;
    /// Keeps the current content of `path` as backup `tag` (a zero-padded
    /// revision sorts right), then drops all but the newest `keep`.
    fn backup(&self, path: &str, tag: &str, keep: usize) -> std::io::Result<()>;
    /// The backups of `path`, oldest first.
    fn backups(&self, path: &str) -> std::io::Result<Vec<String>>;

    fn drift(&self, path: &str, expected: &[u8]) -> std::io::Result<Drift> {
        Ok(match self.read(path)? {
            None => Drift::Missing,
            Some(d) if d == expected => Drift::Same,
            Some(_) => Drift::Changed,
        })
    }
}

pub use zone_files::atomic::Step;

/// The real filesystem under `root`.
#[derive(Debug)]
pub struct RootedDisk {
    root: PathBuf,
    backup_dir: PathBuf,
    /// Tests: fail (as a crash would stop) right after this step.
    crash_after: Mutex<Option<Step>>,
}

impl RootedDisk {
    /// Managed paths are written under `root`; backups go to `backup_dir`
    /// (a real path, such as `/var/lib/zone-sync/backups`).
    pub fn new(root: impl Into<PathBuf>, backup_dir: impl Into<PathBuf>) -> RootedDisk {
        let root = root.into();
        let backup_dir = backup_dir.into();
        RootedDisk {
            root,
            backup_dir,
            crash_after: Mutex::new(None),
        }
    }

    pub fn crash_after(&self, step: Option<Step>) {
        *self.crash_after.lock().unwrap_or_else(|e| e.into_inner()) = step;
    }

    fn real(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    fn step(&self, step: Step) -> std::io::Result<()> {
        if *self.crash_after.lock().unwrap_or_else(|e| e.into_inner()) == Some(step) {
            return Err(std::io::Error::other(format!(
                "injected crash after {step:?}"
            )));
        }
        Ok(())
    }

    fn backup_path(&self, path: &str) -> PathBuf {
        self.backup_dir.join(path.trim_start_matches('/'))
    }
}

impl Disk for RootedDisk {
    fn read(&self, path: &str) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.real(path)) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_atomic(
        &self,
        path: &str,
        data: &[u8],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> std::io::Result<()> {
        zone_files::atomic::write_with(&self.real(path), data, mode, owner, &mut |s| self.step(s))
    }

    fn backup(&self, path: &str, tag: &str, keep: usize) -> std::io::Result<()> {
        let Some(current) = self.read(path)? else {
            return Ok(());
        };
        let dir = self.backup_path(path);
        std::fs::create_dir_all(&dir)?;
        zone_files::atomic::write(&dir.join(tag), &current, 0o644, None)?;
        let all = self.backups(path)?;
        for old in &all[..all.len().saturating_sub(keep)] {
            std::fs::remove_file(dir.join(old))?;
        }
        std::fs::File::open(&dir)?.sync_all()
    }

    fn backups(&self, path: &str) -> std::io::Result<Vec<String>> {
        let dir = self.backup_path(path);
        let mut v: Vec<String> = match std::fs::read_dir(&dir) {
            Ok(d) => d
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        v.sort();
        Ok(v)
    }
}

/// A disk in memory: path → (content, mode).
#[derive(Debug, Default)]
pub struct MemoryDisk {
    files: Mutex<BTreeMap<String, (Vec<u8>, u32)>>,
    backups: Mutex<BTreeMap<String, BTreeMap<String, Vec<u8>>>>,
}

impl MemoryDisk {
    pub fn mode(&self, path: &str) -> Option<u32> {
        self.files.lock().ok()?.get(path).map(|f| f.1)
    }

    /// Changes a file behind zone-sync's back (a hand edit).
    pub fn edit(&self, path: &str, data: &[u8]) {
        if let Ok(mut f) = self.files.lock() {
            let mode = f.get(path).map_or(0o644, |x| x.1);
            f.insert(path.to_owned(), (data.to_vec(), mode));
        }
    }
}

impl Disk for MemoryDisk {
    fn read(&self, path: &str) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self
            .files
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .get(path)
            .map(|f| f.0.clone()))
    }

    fn write_atomic(
        &self,
        path: &str,
        data: &[u8],
        mode: u32,
        _owner: Option<(u32, u32)>,
    ) -> std::io::Result<()> {
        self.files
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .insert(path.to_owned(), (data.to_vec(), mode));
        Ok(())
    }

    fn backup(&self, path: &str, tag: &str, keep: usize) -> std::io::Result<()> {
        let Some(current) = self.read(path)? else {
            return Ok(());
        };
        let mut b = self
            .backups
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        let versions = b.entry(path.to_owned()).or_default();
        versions.insert(tag.to_owned(), current);
        while versions.len() > keep {
            let first = versions.keys().next().cloned().unwrap_or_default();
            versions.remove(&first);
        }
        Ok(())
    }

    fn backups(&self, path: &str) -> std::io::Result<Vec<String>> {
        Ok(self
            .backups
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .get(path)
            .map(|v| v.keys().cloned().collect())
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_crash_at_any_step_leaves_the_old_content_or_the_new() {
        let steps = [
            Step::CreateTemp,
            Step::WriteTemp,
            Step::SyncTemp,
            Step::Rename,
            Step::SyncDir,
        ];
        for step in steps {
            let d = tempfile::tempdir().unwrap();
            let disk = RootedDisk::new(d.path(), d.path().join("var/lib/zone-sync/backups"));
            let path = "/etc/one/oned.conf";
            disk.write_atomic(path, b"old content\n", 0o640, None)
                .unwrap();
            disk.crash_after(Some(step));
            let r = disk.write_atomic(path, b"new content, longer than the old\n", 0o640, None);
            assert!(r.is_err(), "{step:?}: the injected crash did not happen");
            let now = disk.read(path).unwrap().unwrap();
            let expect: &[u8] = if step >= Step::Rename {
                b"new content, longer than the old\n"
            } else {
                b"old content\n"
            };
            assert_eq!(now, expect, "after a crash at {step:?}");
            // The next write (after the restart) completes and leaves no
            // temporary file behind.
            disk.crash_after(None);
            disk.write_atomic(path, b"third\n", 0o600, None).unwrap();
            assert_eq!(disk.read(path).unwrap().unwrap(), b"third\n");
            let names: Vec<String> = std::fs::read_dir(d.path().join("etc/one"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names, vec!["oned.conf".to_string()], "after {step:?}");
            let mode = std::fs::metadata(d.path().join("etc/one/oned.conf"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o7777, 0o600);
        }
    }

    #[test]
    fn keeps_the_newest_backups() {
        let d = tempfile::tempdir().unwrap();
        let disk = RootedDisk::new(d.path(), d.path().join("var/lib/zone-sync/backups"));
        let path = "/etc/one/sched.conf";
        disk.backup(path, "000001", 2).unwrap();
        assert!(
            disk.backups(path).unwrap().is_empty(),
            "nothing to back up yet"
        );
        for rev in 1..=4u64 {
            disk.write_atomic(path, format!("v{rev}\n").as_bytes(), 0o644, None)
                .unwrap();
            disk.backup(path, &format!("{rev:012}"), 2).unwrap();
        }
        assert_eq!(
            disk.backups(path).unwrap(),
            vec!["000000000003", "000000000004"]
        );
        let kept = d
            .path()
            .join("var/lib/zone-sync/backups/etc/one/sched.conf/000000000004");
        assert_eq!(std::fs::read(kept).unwrap(), b"v4\n");
    }

    #[test]
    fn drift_is_seen() {
        let d = tempfile::tempdir().unwrap();
        for disk in [
            Box::new(MemoryDisk::default()) as Box<dyn Disk>,
            Box::new(RootedDisk::new(d.path(), d.path().join("backups"))),
        ] {
            let p = "/etc/zoned/managed/a";
            assert_eq!(disk.drift(p, b"x").unwrap(), Drift::Missing);
            disk.write_atomic(p, b"x", 0o644, None).unwrap();
            assert_eq!(disk.drift(p, b"x").unwrap(), Drift::Same);
            disk.write_atomic(p, b"hand edit", 0o644, None).unwrap();
            assert_eq!(disk.drift(p, b"x").unwrap(), Drift::Changed);
        }
    }
}
