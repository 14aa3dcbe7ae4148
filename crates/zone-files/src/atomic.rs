//! The one atomic file write of everything that writes configuration on a
//! server (zone-provision at boot, zone-sync's managed files and backups).
//!
//! Durability argument: the data goes to a temporary file in the target's
//! directory, created exclusively and never through a symbolic link
//! (`O_EXCL | O_NOFOLLOW`: a link planted at the temporary name cannot
//! redirect the write, and two writers of one file cannot interleave), is
//! given its mode and owner, fsynced, renamed over the target, and the
//! directory is fsynced so the rename itself survives a power loss. A
//! reader sees the old content or the new, never a part; a crash at any
//! step leaves the old file, and at worst the temporary one, which the next
//! write removes first.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// The steps of an atomic write, in order (for fault injection in tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    CreateTemp,
    WriteTemp,
    SyncTemp,
    Rename,
    SyncDir,
}

/// The temporary file a write of `target` goes through: hidden, beside it.
pub fn temp_path(target: &Path) -> std::io::Result<PathBuf> {
    let dir = target
        .parent()
        .ok_or_else(|| std::io::Error::other("a file to write has a directory"))?;
    let name = target
        .file_name()
        .ok_or_else(|| std::io::Error::other("a file to write has a name"))?;
    Ok(dir.join(format!(".{}.tmp", name.to_string_lossy())))
}

/// Replaces `target` with `data` atomically (see the module), creating its
/// directories, with permission bits `mode` and, if given, owner
/// `(uid, gid)`.
pub fn write(
    target: &Path,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    write_with(target, data, mode, owner, &mut |_| Ok(()))
}

/// [`write`], calling `after` after each step: an error from it stops the
/// write there, as a crash would.
pub fn write_with(
    target: &Path,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
    after: &mut dyn FnMut(Step) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let tmp = temp_path(target)?;
    let dir = tmp
        .parent()
        .expect("the temporary file is beside the target");
    std::fs::create_dir_all(dir)?;
    // What a crash left behind at the temporary name (ours alone).
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)?;
    after(Step::CreateTemp)?;
    f.write_all(data)?;
    after(Step::WriteTemp)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    if let Some((uid, gid)) = owner {
        nix::unistd::fchown(
            &f,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(std::io::Error::from)?;
    }
    f.sync_all()?;
    drop(f);
    after(Step::SyncTemp)?;
    std::fs::rename(&tmp, target)?;
    after(Step::Rename)?;
    File::open(dir)?.sync_all()?;
    after(Step::SyncDir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn a_write_replaces_the_file_whole_with_its_mode() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("etc/one/oned.conf");
        write(&target, b"first", 0o640, None).unwrap();
        write(&target, b"second", 0o600, None).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"second");
        assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o7777, 0o600);
        assert!(!temp_path(&target).unwrap().exists());
    }

    #[test]
    fn a_crash_at_any_step_leaves_the_old_content_or_the_new_and_the_next_write_succeeds() {
        for crash in [
            Step::CreateTemp,
            Step::WriteTemp,
            Step::SyncTemp,
            Step::Rename,
            Step::SyncDir,
        ] {
            let d = tempfile::tempdir().unwrap();
            let target = d.path().join("f");
            write(&target, b"old", 0o644, None).unwrap();
            let r = write_with(&target, b"new", 0o644, None, &mut |s| {
                if s == crash {
                    Err(std::io::Error::other("crash"))
                } else {
                    Ok(())
                }
            });
            assert!(r.is_err());
            let now = std::fs::read(&target).unwrap();
            let expected: &[u8] = if crash >= Step::Rename {
                b"new"
            } else {
                b"old"
            };
            assert_eq!(now, expected, "crash after {crash:?}");
            write(&target, b"after", 0o644, None).unwrap();
            assert_eq!(std::fs::read(&target).unwrap(), b"after");
        }
    }

    #[test]
    fn a_link_planted_at_the_temporary_name_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("f");
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        std::os::unix::fs::symlink(&victim, temp_path(&target).unwrap()).unwrap();
        write(&target, b"data", 0o644, None).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(std::fs::read(&target).unwrap(), b"data");
    }
}
