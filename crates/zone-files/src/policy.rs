//! What a pushed file must satisfy before anything is stored: the path is
//! under a managed root and in normal form, the size is within the
//! `[files]` limit, the owner, group and unit names are plausible, and a
//! template parses. And a server's own copy of a managed path, read only
//! under the roots and never through a symbolic link.

use sha2::Digest as _;
use zone_proto::v1::ManagedFile;

use crate::paths::Roots;
use crate::{invalid, FileError};

/// The `[files]` limits and roots, checked once at start.
#[derive(Debug, Clone)]
pub struct Policy {
    pub roots: Roots,
    pub max_file_bytes: u64,
    pub max_total_bytes: u64,
    pub history_per_file: usize,
    /// Where this server's copies live (`/` on an appliance).
    pub local_root: std::path::PathBuf,
}

/// A unit, user or group name: letters, digits and `-_.@\`, not starting
/// with `-` (it would read as an option).
fn plausible_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | '\\'))
}

impl Policy {
    /// Checks a pushed file; fills in the defaults it leaves out.
    pub fn check(&self, f: &mut ManagedFile) -> Result<(), FileError> {
        self.roots
            .check(&f.path)
            .map_err(|e| invalid("file.path", e.to_string()))?;
        if f.content.len() as u64 > self.max_file_bytes {
            return Err(invalid(
                "file.content",
                format!(
                    "{} bytes, over the limit of {} (files.max_file_bytes)",
                    f.content.len(),
                    self.max_file_bytes
                ),
            ));
        }
        if f.mode == 0 {
            f.mode = 0o644;
        }
        if f.mode > 0o7777 {
            return Err(invalid(
                "file.mode",
                format!("{:o} is not a permission mode (at most 7777 octal)", f.mode),
            ));
        }
        for (field, v) in [("file.owner", &f.owner), ("file.group", &f.group)] {
            if !v.is_empty() && !plausible_name(v) {
                return Err(invalid(field, format!("`{v}` is not a user or group name")));
            }
        }
        if let Some(u) = f.restart_units.iter().find(|u| !plausible_name(u)) {
            return Err(invalid(
                "file.restart_units",
                format!("`{u}` is not a systemd unit name"),
            ));
        }
        if f.template {
            let text = std::str::from_utf8(&f.content)
                .map_err(|_| invalid("file.content", "a template must be UTF-8 text"))?;
            crate::template::Template::parse(text)
                .map_err(|e| invalid("file.content", e.to_string()))?;
        }
        f.size = f.content.len() as u64;
        f.sha256 = format!("{:x}", sha2::Sha256::digest(&f.content));
        f.revision = 0;
        f.version = 0;
        f.deleted = false;
        Ok(())
    }
}

/// This server's own copy of a managed path, read under `local_root`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalCopy {
    pub exists: bool,
    pub content: Vec<u8>,
    pub mode: u32,
    pub owner: String,
    pub group: String,
}

impl Policy {
    /// Reads `path` from this server's disk: only under a managed root,
    /// never through a symbolic link, only a regular file, at most
    /// `max_file_bytes` (what could not be pushed is not worth reading).
    pub fn read_local(&self, path: &str) -> Result<LocalCopy, FileError> {
        use std::io::Read as _;
        use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
        crate::paths::check_on_disk(&self.roots, &self.local_root, path)
            .map_err(|e| invalid("path", e.to_string()))?;
        let on_disk = self.local_root.join(path.trim_start_matches('/'));
        let file = match std::fs::OpenOptions::new()
            .read(true)
            // The last component too: no link, whatever raced the check.
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&on_disk)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(LocalCopy::default());
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
                return Err(invalid(
                    "path",
                    format!("{path} is a symbolic link on this server: refused"),
                ));
            }
            Err(e) => {
                return Err(FileError::Unavailable(format!(
                    "cannot open {path} on this server: {e}"
                )))
            }
        };
        let meta = file.metadata().map_err(|e| {
            FileError::Unavailable(format!("cannot stat {path} on this server: {e}"))
        })?;
        if !meta.is_file() {
            return Err(invalid(
                "path",
                format!("{path} is not a regular file on this server"),
            ));
        }
        if meta.len() > self.max_file_bytes {
            return Err(invalid(
                "path",
                format!(
                    "{path} is {} bytes on this server, over the limit of {} (files.max_file_bytes)",
                    meta.len(),
                    self.max_file_bytes
                ),
            ));
        }
        let mut content = Vec::with_capacity(meta.len() as usize);
        file.take(self.max_file_bytes + 1)
            .read_to_end(&mut content)
            .map_err(|e| {
                FileError::Unavailable(format!("cannot read {path} on this server: {e}"))
            })?;
        let owner = nix::unistd::User::from_uid(meta.uid().into())
            .ok()
            .flatten()
            .map_or_else(|| meta.uid().to_string(), |u| u.name);
        let group = nix::unistd::Group::from_gid(meta.gid().into())
            .ok()
            .flatten()
            .map_or_else(|| meta.gid().to_string(), |g| g.name);
        Ok(LocalCopy {
            exists: true,
            content,
            mode: meta.mode() & 0o7777,
            owner,
            group,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            roots: Roots::new(["/etc/zoned/managed", "/etc/one"]).unwrap(),
            max_file_bytes: 16,
            max_total_bytes: 64,
            history_per_file: 3,
            local_root: "/".into(),
        }
    }

    fn file(path: &str, content: &str) -> ManagedFile {
        ManagedFile {
            path: path.into(),
            content: content.as_bytes().to_vec(),
            ..ManagedFile::default()
        }
    }

    #[test]
    fn a_push_is_checked_field_by_field() {
        let p = policy();
        let mut ok = file("/etc/one/oned.conf", "x");
        p.check(&mut ok).unwrap();
        assert_eq!(ok.mode, 0o644);
        assert_eq!(ok.size, 1);
        assert_eq!(ok.sha256.len(), 64);
        let err = |mut f: ManagedFile| p.check(&mut f).unwrap_err().to_string();
        assert!(err(file("/etc/passwd", "x")).starts_with("file.path: "));
        assert!(err(file("/etc/one/../passwd", "x")).contains("normal form"));
        assert!(err(file("/etc/one/big", "0123456789abcdefX")).contains("files.max_file_bytes"));
        let mut m = file("/etc/one/a", "x");
        m.mode = 0o10000;
        assert!(err(m).starts_with("file.mode: "));
        let mut o = file("/etc/one/a", "x");
        o.owner = "root:root".into();
        assert!(err(o).starts_with("file.owner: "));
        let mut u = file("/etc/one/a", "x");
        u.restart_units = vec!["../x".into()];
        assert!(err(u).starts_with("file.restart_units: "));
        // Issue 20, defect 11: accepted on the old code.
        let mut u = file("/etc/one/a", "x");
        u.restart_units = vec!["--help".into()];
        assert!(err(u).starts_with("file.restart_units: "));
        let mut o = file("/etc/one/a", "x");
        o.group = "-g".into();
        assert!(err(o).starts_with("file.group: "));
        let mut t = file("/etc/one/a", "{{nope}}");
        t.template = true;
        assert!(err(t).contains("template line 1, column 1"));
    }

    #[test]
    fn a_local_copy_is_read_only_under_the_roots_and_never_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let p = Policy {
            local_root: dir.path().to_owned(),
            ..policy()
        };
        let one = dir.path().join("etc/one");
        std::fs::create_dir_all(&one).unwrap();
        std::fs::write(one.join("oned.conf"), "SERVER_ID = 0\n").unwrap();
        std::fs::write(dir.path().join("etc/secret"), "no").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(
            one.join("oned.conf"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        let copy = p.read_local("/etc/one/oned.conf").unwrap();
        assert!(copy.exists);
        assert_eq!(copy.content, b"SERVER_ID = 0\n");
        assert_eq!(copy.mode, 0o640);
        let me = nix::unistd::User::from_uid(nix::unistd::getuid())
            .unwrap()
            .unwrap();
        assert_eq!(copy.owner, me.name);

        assert_eq!(
            p.read_local("/etc/one/absent").unwrap(),
            LocalCopy::default()
        );
        let err = |path: &str| p.read_local(path).unwrap_err().to_string();
        assert!(err("/etc/secret").contains("outside the managed roots"));
        assert!(err("/etc/one/../secret").contains("normal form"));
        std::os::unix::fs::symlink(dir.path().join("etc/secret"), one.join("link")).unwrap();
        assert!(
            err("/etc/one/link").contains("symbolic link"),
            "{}",
            err("/etc/one/link")
        );
        std::os::unix::fs::symlink(dir.path().join("etc"), one.join("up")).unwrap();
        assert!(err("/etc/one/up/secret").contains("symbolic link"));
        std::fs::create_dir(one.join("dir")).unwrap();
        assert!(err("/etc/one/dir").contains("not a regular file"));
        std::fs::write(one.join("big"), "0123456789abcdefX").unwrap();
        assert!(err("/etc/one/big").contains("files.max_file_bytes"));
    }
}
