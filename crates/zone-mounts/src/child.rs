//! What the helper child does (`zone-mounts helper ...`), blocking: it is
//! the part allowed to hang. One operation per child; the exit status says
//! whether it worked, stderr why not.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};
use zone_datastores::{split_nfs, Options};

/// Why a helper's operation failed (its stderr, one line).
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("{0}")]
    Other(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ChildError {
    let what = what.into();
    move |source| ChildError::Io { what, source }
}

fn flag(bit: &str) -> MsFlags {
    match bit {
        "MS_RDONLY" => MsFlags::MS_RDONLY,
        "MS_NOSUID" => MsFlags::MS_NOSUID,
        "MS_NODEV" => MsFlags::MS_NODEV,
        "MS_NOEXEC" => MsFlags::MS_NOEXEC,
        "MS_SYNCHRONOUS" => MsFlags::MS_SYNCHRONOUS,
        "MS_NOATIME" => MsFlags::MS_NOATIME,
        "MS_NODIRATIME" => MsFlags::MS_NODIRATIME,
        "MS_RELATIME" => MsFlags::MS_RELATIME,
        "MS_STRICTATIME" => MsFlags::MS_STRICTATIME,
        "MS_DIRSYNC" => MsFlags::MS_DIRSYNC,
        "MS_LAZYTIME" => MsFlags::MS_LAZYTIME,
        _ => MsFlags::empty(),
    }
}

/// The `mount(2)` call a declaration makes: flags, and the data string with
/// what mount.nfs would have added (the server's address, resolved here;
/// `vers=3` for `nfs` unless given).
pub fn plan(ty: &str, source: &str, options: &str) -> Result<(MsFlags, String), ChildError> {
    let opts = Options::parse(options).map_err(|e| ChildError::Other(e.to_string()))?;
    let mut flags = MsFlags::empty();
    for f in &opts.flags {
        if f.set {
            flags |= flag(f.bit);
        } else {
            flags &= !flag(f.bit);
        }
    }
    let mut data = opts.data.clone();
    if ty == "nfs" || ty == "nfs4" {
        let (host, _) = split_nfs(source)
            .ok_or_else(|| ChildError::Other(format!("`{source}` is not HOST:/EXPORT")))?;
        let addr = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ip,
            Err(_) => std::net::ToSocketAddrs::to_socket_addrs(&(host, 2049))
                .map_err(io(format!("resolving {host}")))?
                .next()
                .ok_or_else(|| ChildError::Other(format!("{host} has no address")))?
                .ip(),
        };
        data.push(format!("addr={addr}"));
        if ty == "nfs"
            && !data
                .iter()
                .any(|d| d.starts_with("vers=") || d.starts_with("nfsvers="))
        {
            data.push("vers=3".into());
        }
    }
    Ok((flags, data.join(",")))
}

/// Mounts `source` on `target` (made if missing).
pub fn mount(ty: &str, source: &str, options: &str, target: &Path) -> Result<(), ChildError> {
    let (flags, data) = plan(ty, source, options)?;
    std::fs::create_dir_all(target).map_err(io(format!("making {}", target.display())))?;
    // mount(2) follows symbolic links: a target through one would land
    // elsewhere (the declared path was checked, not where it leads), and
    // mountinfo would show the other path, so the mount would never be
    // recognised as this datastore's.
    let real =
        std::fs::canonicalize(target).map_err(io(format!("resolving {}", target.display())))?;
    if real != target {
        return Err(ChildError::Other(format!(
            "{} goes through a symbolic link (it is {}): refused; declare the real path",
            target.display(),
            real.display()
        )));
    }
    let what = format!("mount -t {ty} {source} {}", target.display());
    if ty == "bind" {
        nix::mount::mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|source| ChildError::Sys {
            what: what.clone(),
            source,
        })?;
        // A bind mount takes its flags only on a remount.
        if !flags.is_empty() {
            nix::mount::mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags,
                None::<&str>,
            )
            .map_err(|source| ChildError::Sys { what, source })?;
        }
        return Ok(());
    }
    // NFSv4 without a version given: the kernel alone would speak 4.0;
    // mount.nfs would try the newest first. So does this, falling back
    // while the server says the version is not supported.
    let versions: &[&str] = if ty == "nfs4" && !has_version(&data) {
        &["4.2", "4.1", "4.0"]
    } else {
        &[""]
    };
    let mut last = None;
    for v in versions {
        let data = match *v {
            "" => data.clone(),
            v if data.is_empty() => format!("vers={v}"),
            v => format!("vers={v},{data}"),
        };
        let data = (!data.is_empty()).then_some(data.as_str());
        match nix::mount::mount(Some(source), target, Some(ty), flags, data) {
            Ok(()) => return Ok(()),
            Err(e @ (nix::Error::EPROTONOSUPPORT | nix::Error::EINVAL)) if versions.len() > 1 => {
                last = Some(e)
            }
            Err(source) => return Err(ChildError::Sys { what, source }),
        }
    }
    Err(ChildError::Sys {
        what,
        source: last.unwrap_or(nix::Error::EINVAL),
    })
}

fn has_version(data: &str) -> bool {
    data.split(',').any(|o| {
        o.starts_with("vers=") || o.starts_with("nfsvers=") || o.starts_with("minorversion=")
    })
}

/// Unmounts `target`; `lazy`: detach it now, whatever still uses it;
/// `force` (a hung datastore only): first `MNT_FORCE`, which aborts an NFS
/// mount's requests in flight, so that processes stuck on the dead server,
/// an abandoned probe among them, get an error and exit (it fails while
/// they still use it; on a healthy mount it would fail its users' I/O).
pub fn unmount(target: &Path, lazy: bool, force: bool) -> Result<(), ChildError> {
    if force && nix::mount::umount2(target, MntFlags::MNT_FORCE).is_ok() {
        // Nothing used it any more: unmounted.
        return Ok(());
    }
    let flags = if lazy {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    nix::mount::umount2(target, flags).map_err(|source| ChildError::Sys {
        what: format!(
            "umount{} {}",
            if lazy { " -l" } else { "" },
            target.display()
        ),
        source,
    })
}

/// Probes the file system on `target`: `statvfs` (a round trip to an NFS
/// server: its answer is not cached) and `stat`; with `write_as`, a file
/// under `.zoned-probe/<server>` created, fsynced, read back and removed.
pub fn probe(target: &Path, write_as: Option<u64>) -> Result<(), ChildError> {
    nix::sys::statvfs::statvfs(target).map_err(|source| ChildError::Sys {
        what: format!("statvfs {}", target.display()),
        source,
    })?;
    std::fs::metadata(target).map_err(io(format!("stat {}", target.display())))?;
    let Some(server) = write_as else {
        return Ok(());
    };
    let dir = target.join(".zoned-probe").join(server.to_string());
    std::fs::create_dir_all(&dir).map_err(|source| {
        let denied = source.kind() == std::io::ErrorKind::PermissionDenied;
        ChildError::Io {
            what: format!(
                "making {}{}",
                dir.display(),
                if denied {
                    " (an NFS export that maps root to nobody? export it with no_root_squash, or declare the datastore with --no-write-probe)"
                } else {
                    ""
                }
            ),
            source,
        }
    })?;
    let file = dir.join("probe");
    let token = format!(
        "{} {}\n",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&file)
        .map_err(io(format!("creating {}", file.display())))?;
    f.write_all(token.as_bytes())
        .map_err(io(format!("writing {}", file.display())))?;
    f.sync_all()
        .map_err(io(format!("fsync {}", file.display())))?;
    drop(f);
    let mut back = String::new();
    std::fs::File::open(&file)
        .and_then(|mut f| f.read_to_string(&mut back))
        .map_err(io(format!("reading back {}", file.display())))?;
    if back != token {
        return Err(ChildError::Other(format!(
            "{} read back other bytes than written: another server writes the same probe file, or the storage corrupts data",
            file.display()
        )));
    }
    std::fs::remove_file(&file).map_err(io(format!("removing {}", file.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nfs_gets_the_server_address_and_v3_by_default() {
        let (flags, data) = plan("nfs", "10.0.0.5:/srv", "ro,hard,timeo=600").unwrap();
        assert_eq!(flags, MsFlags::MS_RDONLY);
        assert_eq!(data, "hard,timeo=600,addr=10.0.0.5,vers=3");
        let (_, data) = plan("nfs4", "10.0.0.5:/srv", "vers=4.1").unwrap();
        assert_eq!(data, "vers=4.1,addr=10.0.0.5");
        assert!(has_version(&data));
        assert!(!has_version("hard,addr=10.0.0.5"));
        let (flags, data) = plan("ext4", "/dev/vdb", "noatime,rw,discard").unwrap();
        assert_eq!(flags, MsFlags::MS_NOATIME);
        assert_eq!(data, "discard");
    }

    #[test]
    fn a_probe_writes_reads_back_and_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        probe(d.path(), Some(3)).unwrap();
        let dir = d.path().join(".zoned-probe/3");
        assert!(dir.is_dir());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let e = probe(&d.path().join("absent"), None).unwrap_err();
        assert!(e.to_string().contains("statvfs"), "{e}");
    }
}
