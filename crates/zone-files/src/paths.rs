//! Which paths zone-sync may manage.
//!
//! A managed file's path is absolute, in normal form (no `.`, `..`, empty
//! or trailing components), and strictly inside one of the managed roots,
//! compared component by component (`/etc/onevil` is not under `/etc/one`).
//! That is checked on the text alone, wherever a push is accepted. On a
//! server's disk, [`check_on_disk`] also refuses a path that passes through
//! a symbolic link below its root: a link could point the write anywhere.

use std::path::{Component, Path, PathBuf};

/// The managed root every zone has.
pub const DEFAULT_ROOT: &str = "/etc/zoned/managed";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path `{path}` is not absolute")]
    NotAbsolute { path: String },
    #[error("path `{path}` is not in normal form ({why})")]
    NotNormal { path: String, why: &'static str },
    #[error("path `{path}` is outside the managed roots ({roots})")]
    Outside { path: String, roots: String },
    #[error("path `{path}` names a managed root itself, not a file in it")]
    IsRoot { path: String },
    #[error("path `{path}` goes through the symbolic link {link}: refused, it could lead outside the managed roots")]
    Symlink { path: String, link: String },
    #[error("path `{path}`: {link} is not a directory")]
    NotDirectory { path: String, link: String },
    #[error("managed root `{root}` must be absolute and in normal form")]
    BadRoot { root: String },
}

/// The managed roots, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots(Vec<PathBuf>);

impl Roots {
    pub fn new<I, S>(roots: I) -> Result<Roots, PathError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut v = Vec::new();
        for r in roots {
            let r = r.as_ref();
            if normal(r).is_err() || r == "/" {
                return Err(PathError::BadRoot { root: r.to_owned() });
            }
            v.push(PathBuf::from(r));
        }
        Ok(Roots(v))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Path> {
        self.0.iter().map(PathBuf::as_path)
    }

    /// Checks a path's text; returns the root it is under.
    pub fn check(&self, path: &str) -> Result<&Path, PathError> {
        normal(path)?;
        let p = Path::new(path);
        for root in &self.0 {
            if p == root {
                return Err(PathError::IsRoot {
                    path: path.to_owned(),
                });
            }
            if p.starts_with(root) {
                return Ok(root);
            }
        }
        Err(PathError::Outside {
            path: path.to_owned(),
            roots: self
                .0
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

fn normal(path: &str) -> Result<(), PathError> {
    let bad = |why| PathError::NotNormal {
        path: path.to_owned(),
        why,
    };
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute {
            path: path.to_owned(),
        });
    }
    if path.contains('\0') {
        return Err(bad("a NUL byte"));
    }
    if path.len() > 1 && path.ends_with('/') {
        return Err(bad("a trailing slash"));
    }
    if path.contains("//") {
        return Err(bad("an empty component"));
    }
    for c in Path::new(path).components() {
        match c {
            Component::RootDir | Component::Normal(_) => {}
            Component::CurDir => return Err(bad("a `.` component")),
            Component::ParentDir => return Err(bad("a `..` component")),
            Component::Prefix(_) => return Err(bad("a prefix")),
        }
    }
    // `Path::components` drops interior `.`: look at the text too.
    if path.split('/').any(|c| c == "." || c == "..") {
        return Err(bad("a `.` or `..` component"));
    }
    Ok(())
}

/// Checks a path on a server's disk, under the filesystem root `fs_root`
/// (`/` in production, a temporary directory in tests): no component below
/// the managed root may be a symbolic link, and those that exist must be
/// directories (the last one may be a file).
pub fn check_on_disk(roots: &Roots, fs_root: &Path, path: &str) -> Result<(), PathError> {
    let root = roots.check(path)?;
    let rel = Path::new(path)
        .strip_prefix(root)
        .expect("check() proved the prefix");
    let mut at = fs_root.join(root.strip_prefix("/").unwrap_or(root));
    let parts: Vec<_> = rel.components().collect();
    for (i, c) in parts.iter().enumerate() {
        at.push(c);
        let Ok(meta) = std::fs::symlink_metadata(&at) else {
            // Not there yet: nothing further can be a link.
            return Ok(());
        };
        let shown = || {
            Path::new("/")
                .join(at.strip_prefix(fs_root).unwrap_or(&at))
                .display()
                .to_string()
        };
        if meta.file_type().is_symlink() {
            return Err(PathError::Symlink {
                path: path.to_owned(),
                link: shown(),
            });
        }
        if i + 1 < parts.len() && !meta.is_dir() {
            return Err(PathError::NotDirectory {
                path: path.to_owned(),
                link: shown(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots() -> Roots {
        Roots::new([DEFAULT_ROOT, "/etc/one"]).unwrap()
    }

    #[test]
    fn accepts_files_under_a_root() {
        let r = roots();
        assert_eq!(
            r.check("/etc/one/oned.conf").unwrap(),
            Path::new("/etc/one")
        );
        assert!(r.check("/etc/one/auth/ldap_auth.conf").is_ok());
        assert!(r.check("/etc/zoned/managed/x").is_ok());
    }

    #[test]
    fn refuses_escapes_and_odd_forms() {
        let r = roots();
        let cases = [
            ("etc/one/oned.conf", "not absolute"),
            ("/etc/one/../shadow", "normal form"),
            ("/etc/one/./oned.conf", "normal form"),
            ("/etc/one/auth/", "normal form"),
            ("/etc/one//oned.conf", "normal form"),
            ("/etc/one/a\0b", "normal form"),
            ("/etc/onevil/x", "outside"),
            ("/etc/shadow", "outside"),
            ("/etc/one", "managed root itself"),
            ("/", "outside"),
        ];
        for (path, want) in cases {
            let e = r.check(path).unwrap_err().to_string();
            assert!(e.contains(want), "{path}: {e}");
        }
        assert!(Roots::new(["/"]).is_err());
        assert!(Roots::new(["/etc/one/"]).is_err());
        assert!(Roots::new(["relative"]).is_err());
    }

    #[test]
    fn refuses_a_symlink_below_the_root_on_disk() {
        let d = tempfile::tempdir().unwrap();
        let r = roots();
        std::fs::create_dir_all(d.path().join("etc/one/auth")).unwrap();
        std::fs::create_dir_all(d.path().join("outside")).unwrap();
        std::os::unix::fs::symlink(d.path().join("outside"), d.path().join("etc/one/hm")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("etc/one/link.conf")).unwrap();
        std::fs::write(d.path().join("etc/one/plain"), "x").unwrap();
        assert!(check_on_disk(&r, d.path(), "/etc/one/auth/x.conf").is_ok());
        assert!(check_on_disk(&r, d.path(), "/etc/one/new/dir/x.conf").is_ok());
        let e = check_on_disk(&r, d.path(), "/etc/one/hm/hook.sh").unwrap_err();
        assert_eq!(
            e,
            PathError::Symlink {
                path: "/etc/one/hm/hook.sh".into(),
                link: "/etc/one/hm".into()
            }
        );
        assert!(matches!(
            check_on_disk(&r, d.path(), "/etc/one/link.conf"),
            Err(PathError::Symlink { .. })
        ));
        assert!(matches!(
            check_on_disk(&r, d.path(), "/etc/one/plain/x"),
            Err(PathError::NotDirectory { .. })
        ));
    }
}
