//! A managed root's defaults: the files a payload's packages put under
//! `/etc` are kept in its system extension under `/usr/share/factory/etc`
//! (`cargo xtask ext build`), and fill in what a managed root such as
//! `/etc/mysql` lacks. A file that is there, written by zone-sync or by
//! hand, is never replaced: the zone's version wins, the payload's is only
//! a default.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where the defaults of `root` are: `factory/<root>` (`/usr/share/factory`
/// and `/etc/mysql` give `/usr/share/factory/etc/mysql`).
pub fn defaults_of(factory: &Path, root: &str) -> PathBuf {
    factory.join(root.trim_start_matches('/'))
}

/// Copies into `root` every file, link and directory of `defaults` that
/// `root` lacks, with its mode and owner; returns what it made (relative
/// paths). Nothing is followed: a link in `defaults` is made as a link, and
/// a path in `root` that is a link or not a directory where `defaults` has
/// one is left alone with what is under it. Each file is written whole
/// (temp file, fsync, rename). Missing `defaults`: nothing to do.
pub fn fill(root: &Path, defaults: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut made = Vec::new();
    match std::fs::symlink_metadata(defaults) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Ok(made),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(made),
        Err(e) => return Err(e),
    }
    fill_dir(root, defaults, Path::new(""), &mut made)?;
    Ok(made)
}

fn fill_dir(
    root: &Path,
    defaults: &Path,
    rel: &Path,
    made: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let mut entries: Vec<_> =
        std::fs::read_dir(defaults.join(rel))?.collect::<std::io::Result<Vec<_>>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let rel = rel.join(e.file_name());
        let from = defaults.join(&rel);
        let to = root.join(&rel);
        let m = std::fs::symlink_metadata(&from)?;
        let there = match std::fs::symlink_metadata(&to) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let owner = Some((m.uid(), m.gid()));
        if m.is_dir() {
            match there {
                Some(t) if t.is_dir() => {}
                Some(_) => continue,
                None => {
                    std::fs::create_dir(&to)?;
                    std::fs::set_permissions(
                        &to,
                        std::fs::Permissions::from_mode(m.mode() & 0o7777),
                    )?;
                    std::os::unix::fs::lchown(&to, owner.map(|o| o.0), owner.map(|o| o.1))?;
                    made.push(rel.clone());
                }
            }
            fill_dir(root, defaults, &rel, made)?;
        } else if there.is_some() {
            continue;
        } else if m.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
            std::os::unix::fs::lchown(&to, owner.map(|o| o.0), owner.map(|o| o.1))?;
            made.push(rel);
        } else if m.is_file() {
            crate::atomic::write(&to, &std::fs::read(&from)?, m.mode() & 0o7777, owner)?;
            made.push(rel);
        }
        // Devices, sockets, fifos: not configuration, left out.
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_what_is_missing_and_keeps_what_is_there() {
        let t = tempfile::tempdir().unwrap();
        let defaults = t.path().join("factory/etc/mysql");
        let root = t.path().join("etc/mysql");
        std::fs::create_dir_all(defaults.join("conf.d")).unwrap();
        std::fs::write(defaults.join("my.cnf.fallback"), "fallback\n").unwrap();
        std::fs::set_permissions(
            defaults.join("my.cnf.fallback"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        std::fs::write(defaults.join("conf.d/mysql.cnf"), "[mysql]\n").unwrap();
        std::os::unix::fs::symlink("/etc/mysql/mariadb.cnf", defaults.join("my.cnf")).unwrap();
        std::fs::write(defaults.join("mariadb.cnf"), "default\n").unwrap();
        std::fs::create_dir_all(&root).unwrap();
        // The zone's own version is there: kept.
        std::fs::write(root.join("mariadb.cnf"), "the zone's\n").unwrap();

        let mut made = fill(&root, &defaults).unwrap();
        made.sort();
        assert_eq!(
            made,
            ["conf.d", "conf.d/mysql.cnf", "my.cnf", "my.cnf.fallback"]
                .map(PathBuf::from)
                .to_vec()
        );
        assert_eq!(
            std::fs::read_to_string(root.join("mariadb.cnf")).unwrap(),
            "the zone's\n"
        );
        assert_eq!(
            std::fs::read_link(root.join("my.cnf")).unwrap(),
            Path::new("/etc/mysql/mariadb.cnf")
        );
        assert_eq!(
            std::fs::metadata(root.join("my.cnf.fallback"))
                .unwrap()
                .mode()
                & 0o7777,
            0o640
        );
        assert_eq!(
            std::fs::read_to_string(root.join("conf.d/mysql.cnf")).unwrap(),
            "[mysql]\n"
        );
        // A second fill has nothing to do; a file removed comes back.
        assert!(fill(&root, &defaults).unwrap().is_empty());
        std::fs::remove_file(root.join("conf.d/mysql.cnf")).unwrap();
        assert_eq!(
            fill(&root, &defaults).unwrap(),
            vec![PathBuf::from("conf.d/mysql.cnf")]
        );
    }

    #[test]
    fn never_writes_through_a_link_in_the_root() {
        let t = tempfile::tempdir().unwrap();
        let defaults = t.path().join("factory");
        let root = t.path().join("root");
        let elsewhere = t.path().join("elsewhere");
        std::fs::create_dir_all(defaults.join("conf.d")).unwrap();
        std::fs::write(defaults.join("conf.d/x.cnf"), "x\n").unwrap();
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("conf.d")).unwrap();
        assert!(fill(&root, &defaults).unwrap().is_empty());
        assert!(!elsewhere.join("x.cnf").exists());
    }

    #[test]
    fn no_defaults_is_nothing_to_do() {
        let t = tempfile::tempdir().unwrap();
        assert!(fill(t.path(), &t.path().join("none")).unwrap().is_empty());
        assert_eq!(
            defaults_of(Path::new("/usr/share/factory"), "/etc/mysql"),
            Path::new("/usr/share/factory/etc/mysql")
        );
    }
}
