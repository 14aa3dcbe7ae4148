//! Writable managed roots on the appliance's read-only root filesystem.
//!
//! A managed root under `/etc` that the identity names (such as `/etc/one`
//! or `/etc/mysql`) is a directory of the data partition,
//! `/var/lib/zone-etc/etc/mysql`, bind-mounted on `/etc/mysql` at every
//! boot. Its mount point is made in a volatile overlay of `/etc` (upper
//! layer on the `/run` tmpfs), which is then made read-only again: only the
//! managed roots are writable, and they persist.
//!
//! Why not one persistent overlay of the whole of `/etc` on the data
//! partition: every file written there once (by hand, by a payload's
//! script) would hide the image's version of it for good, and an upgrade's
//! new `/etc` would lose to a stale copy without a word. Here the image's
//! `/etc` is what the image says at every boot, and what persists is only
//! what the zone manages, where zone-sync expects it.
//!
//! A root's directory starts, once, from the image's own `/etc/<root>`
//! when the image has one; at every boot it is filled with what it lacks
//! from the payloads' defaults (`/usr/share/factory/<root>`, from the
//! system extensions merged before this runs), never replacing a file.

use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

/// Where things are (the appliance's paths by default; tests move them).
#[derive(Debug, Clone)]
pub struct Layout {
    /// The read-only tree the managed roots are in.
    pub etc: PathBuf,
    /// The roots' persistent directories (on the data partition).
    pub state: PathBuf,
    /// The volatile overlay's upper and work directories (a tmpfs).
    pub run: PathBuf,
    /// The payloads' defaults, `<factory>/<root>`.
    pub factory: PathBuf,
    /// This process's mount table.
    pub mountinfo: PathBuf,
}

impl Default for Layout {
    fn default() -> Layout {
        Layout {
            etc: "/etc".into(),
            state: "/var/lib/zone-etc".into(),
            run: "/run/zone-etc".into(),
            factory: "/usr/share/factory".into(),
            mountinfo: "/proc/self/mountinfo".into(),
        }
    }
}

/// The source name of the overlay this module mounts on `/etc`.
const OVERLAY_SOURCE: &str = "zone-etc";

/// One mount of the table: (mount point, file system type, source).
fn mounts(mountinfo: &Path) -> std::io::Result<Vec<(PathBuf, String, String)>> {
    let text = std::fs::read_to_string(mountinfo)?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`: the
/// mount point (field 5, octal escapes undone), and after the `-`, the
/// type and the source.
fn parse_mountinfo_line(line: &str) -> Option<(PathBuf, String, String)> {
    let mut fields = line.split(' ');
    let point = fields.nth(4)?;
    let mut rest = fields.skip_while(|f| *f != "-");
    rest.next()?;
    let fstype = rest.next()?.to_owned();
    let source = rest.next().unwrap_or("").to_owned();
    Some((PathBuf::from(unescape(point)), fstype, source))
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let code = (b[i] == b'\\' && i + 3 < b.len())
            .then(|| &b[i + 1..i + 4])
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| {
                u8::try_from(d.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0'))).ok()
            });
        if let Some(c) = code {
            out.push(c);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What became of one managed root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Writable, and where its files persist; how many files and
    /// directories the image's copy and the payloads' defaults gave it.
    Writable { persists_in: PathBuf, filled: usize },
    /// Writable as it is (the default root's link, a root on the data
    /// partition).
    AlreadyWritable,
    /// Inside another managed root: made writable with it.
    Inside(String),
    /// Could not be made writable; zone-sync reports its writes there as
    /// failing.
    Failed(String),
}

/// Makes each of `roots` (absolute, in normal form: the identity's checks)
/// writable as the module says; `skip` are writable by other means (the
/// default root, a link to the data partition). Returns each root's
/// outcome, in `roots`' order. Nothing here stops the boot: a root that
/// fails is reported and the rest go on.
pub fn make_writable(roots: &[String], skip: &[&str], layout: &Layout) -> Vec<(String, Outcome)> {
    let mut out: Vec<(String, Outcome)> = Vec::new();
    let mut under_etc: Vec<String> = Vec::new();
    for r in roots {
        let outcome = if skip.contains(&r.as_str()) {
            Outcome::AlreadyWritable
        } else if let Some(outer) = roots
            .iter()
            .find(|o| *o != r && Path::new(r).starts_with(o) && !skip.contains(&o.as_str()))
        {
            Outcome::Inside(outer.clone())
        } else if Path::new(r).starts_with(&layout.etc) && Path::new(r) != layout.etc {
            under_etc.push(r.clone());
            continue;
        } else {
            // Elsewhere: writable if its file system is (the data
            // partition); the read-only root is not made writable but
            // under /etc.
            match std::fs::create_dir_all(r) {
                Ok(()) if nix::unistd::access(r.as_str(), nix::unistd::AccessFlags::W_OK).is_ok() => {
                    Outcome::AlreadyWritable
                }
                Ok(()) => Outcome::Failed(format!(
                    "{r} is on a read-only file system; only managed roots under {} are made writable (or name a directory on the data partition, under /var)",
                    layout.etc.display()
                )),
                Err(e) => Outcome::Failed(format!(
                    "creating {r}: {e}; only managed roots under {} are made writable (or name a directory on the data partition, under /var)",
                    layout.etc.display()
                )),
            }
        };
        out.push((r.clone(), outcome));
    }
    if !under_etc.is_empty() {
        for (r, o) in under_etc_writable(&under_etc, layout) {
            out.push((r, o));
        }
        out.sort_by_key(|(r, _)| roots.iter().position(|x| x == r));
    }
    out
}

fn under_etc_writable(roots: &[String], layout: &Layout) -> Vec<(String, Outcome)> {
    let table = match mounts(&layout.mountinfo) {
        Ok(t) => t,
        Err(e) => {
            let why = format!("reading {}: {e}", layout.mountinfo.display());
            return roots
                .iter()
                .map(|r| (r.clone(), Outcome::Failed(why.clone())))
                .collect();
        }
    };
    let mounted = |p: &Path| table.iter().any(|(m, _, _)| m == p);
    let ours = table
        .iter()
        .any(|(m, t, s)| *m == layout.etc && t == "overlay" && s == OVERLAY_SOURCE);
    // Mount points are made only in our volatile overlay, writable for as
    // long as that takes.
    let need_points = roots
        .iter()
        .any(|r| !mounted(Path::new(r)) && !Path::new(r).is_dir());
    let need_binds = roots.iter().any(|r| !mounted(Path::new(r)));
    let overlay = if !need_binds {
        Ok(false)
    } else if ours {
        remount(&layout.etc, false).map(|()| true)
    } else if need_points {
        mount_overlay(layout, &table).map(|()| true)
    } else {
        Ok(false)
    };
    if let Err(e) = &overlay {
        let why = format!("making a writable overlay of {}: {e}", layout.etc.display());
        return roots
            .iter()
            .map(|r| (r.clone(), Outcome::Failed(why.clone())))
            .collect();
    }
    let out = roots
        .iter()
        .map(|r| {
            let o = match one_root(r, layout, mounted(Path::new(r))) {
                Ok(filled) => Outcome::Writable {
                    persists_in: persistent(layout, r),
                    filled,
                },
                Err(e) => Outcome::Failed(e),
            };
            (r.clone(), o)
        })
        .collect();
    if matches!(overlay, Ok(true)) {
        if let Err(e) = remount(&layout.etc, true) {
            // The roots are fine; the rest of /etc takes writes until the
            // next boot, which the image's /etc then replaces.
            eprintln!(
                "zone-provision: error: could not make {} read-only again (it takes writes, lost at the next boot): {e}",
                layout.etc.display()
            );
        }
    }
    out
}

fn persistent(layout: &Layout, root: &str) -> PathBuf {
    layout.state.join(root.trim_start_matches('/'))
}

/// Root `r`'s persistent directory, filled, and bound on `r`; how many
/// entries were filled in.
fn one_root(r: &str, layout: &Layout, mounted: bool) -> Result<usize, String> {
    let dir = persistent(layout, r);
    let point = Path::new(r);
    let mut filled = 0;
    if !mounted {
        if let Ok(m) = std::fs::symlink_metadata(point) {
            if !m.is_dir() {
                return Err(format!("{r} is in the image and is not a directory"));
            }
        }
        if !dir.exists() {
            filled += seed(&dir, point)?;
        }
        std::fs::create_dir_all(point).map_err(|e| format!("making the mount point {r}: {e}"))?;
        mount(
            Some(dir.as_path()),
            point,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("binding {} on {r}: {e}", dir.display()))?;
    }
    let defaults = zone_files::factory::defaults_of(&layout.factory, r);
    filled += zone_files::factory::fill(point, &defaults)
        .map_err(|e| format!("filling {r} from {}: {e}", defaults.display()))?
        .len();
    Ok(filled)
}

/// A root's persistent directory, made once: from the image's own copy of
/// the root when it has one (its mode, owner and files), else empty (0755,
/// root's). Made beside its place and renamed into it, so that a copy cut
/// short is made again at the next boot. How many entries it got.
fn seed(dir: &Path, point: &Path) -> Result<usize, String> {
    let parent = dir
        .parent()
        .ok_or_else(|| format!("{} has no parent", dir.display()))?;
    std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let image = std::fs::symlink_metadata(point).ok().filter(|m| m.is_dir());
    let Some(m) = image else {
        std::fs::create_dir(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        return Ok(0);
    };
    let name = dir
        .file_name()
        .ok_or_else(|| format!("{} has no name", dir.display()))?;
    let part = parent.join(format!(".{}.new", name.to_string_lossy()));
    if part.exists() {
        std::fs::remove_dir_all(&part).map_err(|e| format!("removing {}: {e}", part.display()))?;
    }
    std::fs::create_dir(&part).map_err(|e| format!("creating {}: {e}", part.display()))?;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::set_permissions(&part, std::fs::Permissions::from_mode(m.mode() & 0o7777))
        .and_then(|()| std::os::unix::fs::lchown(&part, Some(m.uid()), Some(m.gid())))
        .map_err(|e| format!("giving {} the image's mode and owner: {e}", part.display()))?;
    let n = zone_files::factory::fill(&part, point)
        .map_err(|e| {
            format!(
                "copying the image's {} into {}: {e}",
                point.display(),
                part.display()
            )
        })?
        .len();
    std::fs::rename(&part, dir)
        .map_err(|e| format!("renaming {} to {}: {e}", part.display(), dir.display()))?;
    Ok(n)
}

/// The mounts under `etc` that the overlay would hide (its lower layer is
/// the root file system's own `etc`, which does not show them): the
/// initramfs's bind of `/etc/machine-id`, systemd's own at a first boot.
/// Only the outermost (their own submounts come with them); in the
/// table's order, parents first.
fn submounts(etc: &Path, table: &[(PathBuf, String, String)]) -> Vec<PathBuf> {
    let under: Vec<&PathBuf> = table
        .iter()
        .map(|(p, _, _)| p)
        .filter(|p| p.starts_with(etc) && p.as_path() != etc)
        .collect();
    let mut out: Vec<PathBuf> = Vec::new();
    for p in under {
        if !out.iter().any(|o| p.starts_with(o)) {
            out.push(p.clone());
        }
    }
    out
}

fn mount_overlay(layout: &Layout, table: &[(PathBuf, String, String)]) -> Result<(), String> {
    let upper = layout.run.join("upper");
    let work = layout.run.join("work");
    let keep = layout.run.join("keep");
    for d in [&upper, &work, &keep] {
        std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    // The mounts under /etc are copied aside (a move is refused under a
    // shared mount), and bound again over the overlay.
    let subs = submounts(&layout.etc, table);
    let mut kept = Vec::new();
    for (i, p) in subs.iter().enumerate() {
        let held = keep.join(i.to_string());
        let made = if p.is_dir() {
            std::fs::create_dir_all(&held)
        } else {
            std::fs::write(&held, b"")
        };
        made.map_err(|e| format!("creating {}: {e}", held.display()))?;
        mount(
            Some(p.as_path()),
            &held,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("keeping the mount {} aside: {e}", p.display()))?;
        kept.push((held, p.clone()));
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        layout.etc.display(),
        upper.display(),
        work.display()
    );
    mount(
        Some(OVERLAY_SOURCE),
        &layout.etc,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| format!("mount -t overlay -o {options}: {e}"))?;
    let mut failed = Vec::new();
    for (held, p) in &kept {
        if let Err(e) = mount(
            Some(held.as_path()),
            p,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ) {
            failed.push(format!("binding {} again: {e}", p.display()));
        }
        let _ = nix::mount::umount2(held, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(held).or_else(|_| std::fs::remove_dir(held));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        // Better the image's /etc whole than one without its submounts
        // (an empty machine id): the overlay goes.
        let _ = nix::mount::umount2(&layout.etc, nix::mount::MntFlags::MNT_DETACH);
        Err(failed.join("; "))
    }
}

/// Makes the mount at `point` read-only or writable (this mount only: the
/// roots bound under it keep their own).
fn remount(point: &Path, read_only: bool) -> Result<(), String> {
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, point, None::<&str>, flags, None::<&str>)
        .map_err(|e| format!("remounting {}: {e}", point.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_read() {
        let l =
            "36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 - ext3 /dev/root rw,errors=continue";
        assert_eq!(
            parse_mountinfo_line(l),
            Some(("/mnt two".into(), "ext3".into(), "/dev/root".into()))
        );
        let l = "99 1 0:50 / /etc rw,relatime shared:60 - overlay zone-etc rw,lowerdir=/etc";
        assert_eq!(
            parse_mountinfo_line(l),
            Some(("/etc".into(), "overlay".into(), "zone-etc".into()))
        );
        assert_eq!(parse_mountinfo_line("garbage"), None);
    }

    #[test]
    fn only_the_outermost_mounts_under_etc_are_kept_aside() {
        let m = |p: &str| (PathBuf::from(p), "x".to_owned(), "y".to_owned());
        let table = vec![
            m("/"),
            m("/etc"),
            m("/etc/machine-id"),
            m("/etc/a"),
            m("/etc/a/b"),
            m("/etcetera"),
            m("/var"),
        ];
        assert_eq!(
            submounts(Path::new("/etc"), &table),
            vec![PathBuf::from("/etc/machine-id"), PathBuf::from("/etc/a")]
        );
    }

    #[test]
    fn a_roots_directory_starts_from_the_images_copy_once() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let image = t.path().join("etc/ssl/private");
        std::fs::create_dir_all(&image).unwrap();
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o710)).unwrap();
        std::fs::write(image.join("key.pem"), "k").unwrap();
        let dir = t.path().join("state/etc/ssl/private");
        // A copy cut short before: made again.
        std::fs::create_dir_all(t.path().join("state/etc/ssl/.private.new/junk")).unwrap();
        assert_eq!(seed(&dir, &image).unwrap(), 1);
        assert_eq!(std::fs::read_to_string(dir.join("key.pem")).unwrap(), "k");
        assert!(!dir.join("junk").exists());
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777,
            0o710
        );
        assert!(!t.path().join("state/etc/ssl/.private.new").exists());
        // No copy in the image: an empty directory.
        let other = t.path().join("state/etc/one");
        assert_eq!(seed(&other, &t.path().join("etc/one")).unwrap(), 0);
        assert!(other.is_dir());
    }

    #[test]
    fn roots_elsewhere_and_inside_others_are_not_mounted() {
        let t = tempfile::tempdir().unwrap();
        let layout = Layout {
            etc: t.path().join("etc"),
            state: t.path().join("state"),
            run: t.path().join("run"),
            factory: t.path().join("factory"),
            mountinfo: t.path().join("mountinfo"),
        };
        let data = t.path().join("data/one");
        let roots = vec![
            "/etc/zoned/managed".to_owned(),
            data.display().to_string(),
            format!("{}/sub", data.display()),
        ];
        let out = make_writable(&roots, &["/etc/zoned/managed"], &layout);
        assert_eq!(
            out,
            vec![
                (roots[0].clone(), Outcome::AlreadyWritable),
                (roots[1].clone(), Outcome::AlreadyWritable),
                (roots[2].clone(), Outcome::Inside(roots[1].clone())),
            ]
        );
        assert!(data.is_dir());
    }
}
