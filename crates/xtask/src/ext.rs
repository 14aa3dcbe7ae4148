//! `cargo xtask ext build`: a payload (the front-end's own services) as a
//! systemd-sysext image the appliance merges over its read-only `/usr`.
//!
//! From Debian packages, the extension is what installing them adds to the
//! image's own base: mmdebstrap installs the image's package list (the same
//! suite and apt sources as `cargo xtask image`), a hook notes every file
//! of that base, a second hook installs the payload's packages on top, and
//! the extension keeps what changed or appeared under `/usr` and `/opt`
//! (the only trees systemd 252's sysext merges). The rest of what the
//! packages did is carried in a form the appliance can use:
//! - the system users and groups their scripts made (the root's
//!   `/etc/passwd` is read-only on the appliance) become userdb drop-ins in
//!   `/usr/lib/userdb`, which nss-systemd (in the image) resolves;
//! - the files they put in `/etc` are kept as the payload's defaults under
//!   `/usr/share/factory/etc` (systemd's place for them), for a managed root
//!   to start from; package state under `/var` is left out (a payload's
//!   data lives on a datastore);
//! - links through `/etc/alternatives` point at their final target, as the
//!   appliance has no alternatives of its own for them.
//!
//! `--dir` lays a directory of files (units, drop-ins, scripts) over the
//! result, or is the whole extension without `--packages`.
//!
//! The image carries `usr/lib/extension-release.d/extension-release.NAME`
//! with the image's `ID` and `VERSION_ID`, which systemd-sysext checks
//! against the running os-release before it merges anything.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::image::{self, which};
use crate::run;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// squashfs, zstd-compressed (systemd-sysext's usual format).
    Squashfs,
    /// erofs, lz4hc-compressed.
    Erofs,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub name: String,
    pub packages: Vec<String>,
    pub dir: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub format: Format,
}

/// What `ext snapshot` notes of each file of the base: enough to tell a
/// file the payload's packages replaced or touched from one they left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    kind: char,
    size: u64,
    mtime_ns: i128,
}

fn entry_of(meta: &std::fs::Metadata) -> Entry {
    let t = meta.file_type();
    let kind = if t.is_symlink() {
        'l'
    } else if t.is_dir() {
        'd'
    } else if t.is_file() {
        'f'
    } else {
        'o'
    };
    Entry {
        kind,
        size: meta.len(),
        mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
    }
}

/// Every entry below `root` (paths relative to it), without crossing into
/// other file systems (mmdebstrap's /proc, /sys, /dev in the chroot).
fn walk_tree(root: &Path, under: &str) -> Result<BTreeMap<String, Entry>> {
    let mut out = BTreeMap::new();
    let start = root.join(under);
    let Ok(meta) = std::fs::symlink_metadata(&start) else {
        return Ok(out);
    };
    let dev = std::fs::symlink_metadata(root)?.dev();
    if meta.dev() != dev {
        return Ok(out);
    }
    let mut stack = vec![start];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            let meta = std::fs::symlink_metadata(&p)?;
            if meta.dev() != dev {
                continue;
            }
            let rel = p
                .strip_prefix(root)
                .expect("below the root")
                .to_string_lossy()
                .into_owned();
            if meta.is_dir() {
                stack.push(p);
            }
            out.insert(rel, entry_of(&meta));
        }
    }
    Ok(out)
}

/// The base as the hook sees it, before the payload's packages: its files,
/// users, groups and packages, written to `out`.
pub fn snapshot(root: &Path, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let mut files = BTreeMap::new();
    for top in ["usr", "opt", "etc"] {
        files.extend(walk_tree(root, top)?);
    }
    std::fs::write(out.join("files.json"), serde_json::to_vec(&files)?)?;
    for f in ["etc/passwd", "etc/group", "var/lib/dpkg/status"] {
        let name = Path::new(f).file_name().expect("a file name");
        std::fs::copy(root.join(f), out.join(name))
            .with_context(|| format!("copying the base's /{f}"))?;
    }
    Ok(())
}

/// A valid extension name ([`zone_proto::extension_name_ok`], the rule
/// zoned applies too).
pub fn check_name(name: &str) -> Result<()> {
    if !zone_proto::extension_name_ok(name) {
        bail!("--name {name:?}: {}", zone_proto::EXTENSION_NAME_RULE);
    }
    Ok(())
}

/// `/etc` files that are the package system's own state, or that the
/// appliance makes its own way: not a payload's defaults.
fn etc_skipped(rel: &str) -> bool {
    let Some(p) = rel.strip_prefix("etc/") else {
        return true;
    };
    const FILES: &[&str] = &[
        "passwd",
        "passwd-",
        "group",
        "group-",
        "shadow",
        "shadow-",
        "gshadow",
        "gshadow-",
        "subuid",
        "subuid-",
        "subgid",
        "subgid-",
        ".pwd.lock",
        "ld.so.cache",
        "machine-id",
        "mtab",
    ];
    const DIRS: &[&str] = &[
        "dpkg/",
        "apt/",
        "alternatives/",
        "init.d/",
        "rc0.d/",
        "rc1.d/",
        "rc2.d/",
        "rc3.d/",
        "rc4.d/",
        "rc5.d/",
        "rc6.d/",
        "rcS.d/",
        // Unit enablement: on the appliance the zone starts a payload's
        // units (leader-only or everywhere), not the boot.
        "systemd/system/",
    ];
    FILES.contains(&p) || DIRS.iter().any(|d| p.starts_with(d))
}

/// One line of /etc/passwd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub gecos: String,
    pub home: String,
    pub shell: String,
}

/// One line of /etc/group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

pub fn parse_passwd(text: &str) -> Result<Vec<User>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(':').collect();
        if f.len() != 7 {
            bail!("passwd line {}: {} fields, not 7", n + 1, f.len());
        }
        out.push(User {
            name: f[0].into(),
            uid: f[2]
                .parse()
                .with_context(|| format!("passwd line {}: uid", n + 1))?,
            gid: f[3]
                .parse()
                .with_context(|| format!("passwd line {}: gid", n + 1))?,
            gecos: f[4].into(),
            home: f[5].into(),
            shell: f[6].into(),
        });
    }
    Ok(out)
}

pub fn parse_group(text: &str) -> Result<Vec<Group>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(':').collect();
        if f.len() != 4 {
            bail!("group line {}: {} fields, not 4", n + 1, f.len());
        }
        out.push(Group {
            name: f[0].into(),
            gid: f[2]
                .parse()
                .with_context(|| format!("group line {}: gid", n + 1))?,
            members: f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .collect(),
        });
    }
    Ok(out)
}

/// The userdb drop-ins (file name, content; a content starting with `->`
/// is a symbolic link to the named file) for the users and groups `after`
/// has and `before` had not, and the memberships added. Refuses an id the
/// base already uses: on the appliance it would name two accounts.
pub fn userdb_records(
    before: (&[User], &[Group]),
    after: (&[User], &[Group]),
) -> Result<Vec<(String, String)>> {
    let (bu, bg) = before;
    let (au, ag) = after;
    let mut out = Vec::new();
    let disposition = |id: u32| if id < 1000 { "system" } else { "regular" };
    for u in au.iter().filter(|u| !bu.iter().any(|b| b.name == u.name)) {
        if let Some(b) = bu.iter().find(|b| b.uid == u.uid) {
            bail!(
                "the packages made user {} with uid {}, which the base gives to {}",
                u.name,
                u.uid,
                b.name
            );
        }
        let mut rec = serde_json::json!({
            "userName": u.name,
            "uid": u.uid,
            "gid": u.gid,
            "homeDirectory": u.home,
            "shell": u.shell,
            "disposition": disposition(u.uid),
        });
        let real = u.gecos.split(',').next().unwrap_or("");
        if !real.is_empty() {
            rec["realName"] = real.into();
        }
        out.push((format!("{}.user", u.name), format!("{rec:#}\n")));
        out.push((format!("{}.user", u.uid), format!("->{}.user", u.name)));
    }
    for g in ag.iter() {
        let old = bg.iter().find(|b| b.name == g.name);
        if old.is_none() {
            if let Some(b) = bg.iter().find(|b| b.gid == g.gid) {
                bail!(
                    "the packages made group {} with gid {}, which the base gives to {}",
                    g.name,
                    g.gid,
                    b.name
                );
            }
            let rec = serde_json::json!({
                "groupName": g.name,
                "gid": g.gid,
                "disposition": disposition(g.gid),
            });
            out.push((format!("{}.group", g.name), format!("{rec:#}\n")));
            out.push((format!("{}.group", g.gid), format!("->{}.group", g.name)));
        }
        for m in &g.members {
            if old.is_some_and(|o| o.members.contains(m)) {
                continue;
            }
            out.push((format!("{m}:{}.membership", g.name), String::new()));
        }
    }
    Ok(out)
}

/// `extension-release.NAME`: what systemd-sysext matches against the
/// running image's os-release (ID, then VERSION_ID as the image has no
/// SYSEXT_LEVEL), and what the extension holds, for `zonectl ext ls`.
pub fn extension_release(os_release: &str, packages: &[(String, String)]) -> Result<String> {
    let field = |key: &str| -> Option<String> {
        os_release.lines().find_map(|l| {
            l.strip_prefix(key)
                .and_then(|r| r.strip_prefix('='))
                .map(|v| v.trim().trim_matches('"').to_owned())
        })
    };
    let id = field("ID").context("the base's os-release has no ID")?;
    let version = field("VERSION_ID").context("the base's os-release has no VERSION_ID")?;
    let mut text = format!("ID={id}\nVERSION_ID={version}\nARCHITECTURE=x86-64\n");
    if !packages.is_empty() {
        let list: Vec<String> = packages.iter().map(|(p, v)| format!("{p}={v}")).collect();
        text.push_str(&format!("ZONED_EXT_PACKAGES=\"{}\"\n", list.join(" ")));
    }
    Ok(text)
}

/// Installed packages and versions in a dpkg status file.
fn dpkg_installed(status: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for stanza in status.split("\n\n") {
        let get = |k: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_owned()))
        };
        let (Some(p), Some(v), Some(s)) = (get("Package:"), get("Version:"), get("Status:")) else {
            continue;
        };
        if s.ends_with(" installed") {
            out.insert(p, v);
        }
    }
    out
}

/// The final target of a link that goes through `/etc/alternatives`, read
/// in `full` (the build's tree).
fn through_alternatives(full: &Path, target: &Path) -> Option<PathBuf> {
    let mut t = target.to_owned();
    for _ in 0..8 {
        if !t.starts_with("/etc/alternatives/") {
            return Some(t);
        }
        let rel = t.strip_prefix("/").ok()?;
        t = std::fs::read_link(full.join(rel)).ok()?;
    }
    None
}

/// Copies one entry of `full` (relative path `rel`) to `dest`, with its
/// owner and mode, and the directories above it as in `full`.
fn copy_entry(full: &Path, rel: &str, dest: &Path) -> Result<()> {
    let src = full.join(rel);
    if let Some(parent) = Path::new(rel).parent() {
        let mut so_far = PathBuf::new();
        for c in parent.components() {
            so_far.push(c);
            let d = dest.join(&so_far);
            if !d.exists() {
                let meta = std::fs::metadata(full.join(&so_far))?;
                std::fs::create_dir(&d)?;
                std::os::unix::fs::lchown(&d, Some(meta.uid()), Some(meta.gid()))?;
                std::fs::set_permissions(&d, meta.permissions())?;
            }
        }
    }
    let to = dest.join(rel);
    let meta = std::fs::symlink_metadata(&src)?;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(&src)?;
        let target = through_alternatives(full, &target).unwrap_or(target);
        std::os::unix::fs::symlink(&target, &to)?;
        std::os::unix::fs::lchown(&to, Some(meta.uid()), Some(meta.gid()))?;
    } else if meta.is_dir() {
        if !to.exists() {
            std::fs::create_dir(&to)?;
        }
        std::os::unix::fs::lchown(&to, Some(meta.uid()), Some(meta.gid()))?;
        std::fs::set_permissions(&to, meta.permissions())?;
    } else if meta.is_file() {
        std::fs::copy(&src, &to).with_context(|| format!("copying /{rel}"))?;
        // chown clears set-id bits: the mode goes after it.
        std::os::unix::fs::lchown(&to, Some(meta.uid()), Some(meta.gid()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    } else {
        eprintln!("         left out /{rel}: not a file, directory or link");
    }
    Ok(())
}

fn shell_quote(p: &Path) -> Result<String> {
    let s = p.to_str().context("a path that is not UTF-8")?;
    if s.contains('\'') {
        bail!("{s}: a path with a single quote cannot be passed to mmdebstrap's hooks");
    }
    Ok(format!("'{s}'"))
}

/// The packages' tree: the image's base, noted by `ext snapshot`, then the
/// payload's packages installed over it.
fn debootstrap(opts: &Options, work: &Path) -> Result<(PathBuf, PathBuf)> {
    let root = image::repo_root();
    let base_packages = image::read_list(&root.join("image/packages.txt"))?;
    let full = work.join("full");
    let base = work.join("base");
    let me = std::env::current_exe().context("finding xtask's own binary")?;
    let snapshot_hook = format!(
        "{} ext snapshot \"$1\" {}",
        shell_quote(&me)?,
        shell_quote(&base)?
    );
    // apt on the outside, configured by mmdebstrap for the chroot, as
    // mmdebstrap installs the base itself (the essential variant has no
    // apt inside). That configuration does not name the chroot for dpkg
    // (mmdebstrap passes it on its own command lines): without
    // DPkg::Chroot-Directory, dpkg would install the packages on the
    // build machine. No recommends: an extension holds what the payload
    // needs.
    for p in &opts.packages {
        if p.is_empty()
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.:=~_".contains(&b))
        {
            bail!("--packages: {p:?} is not a Debian package name (or name=version)");
        }
    }
    // Never the build machine's own apt configuration; never a base
    // package removed to make room (the appliance would keep it).
    let install_hook = format!(
        ": \"${{MMDEBSTRAP_APT_CONFIG:?}}\" && APT_CONFIG=\"$MMDEBSTRAP_APT_CONFIG\" apt-get install --yes --no-remove -o DPkg::Chroot-Directory=\"$1\" -o APT::Install-Recommends=false {}",
        opts.packages.join(" ")
    );
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--variant=essential")
        .arg("--mode=root")
        .arg("--format=directory")
        .arg(format!("--include={}", base_packages.join(",")))
        .args(image::EXCLUDES)
        .arg(format!("--customize-hook={snapshot_hook}"))
        .arg(format!("--customize-hook={install_hook}"))
        .arg(image::SUITE)
        .arg(&full)
        .args(image::apt_sources()?)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    run(&mut cmd)?;
    Ok((full, base))
}

pub fn build(opts: &Options, target: &Path) -> Result<PathBuf> {
    check_name(&opts.name)?;
    if opts.packages.is_empty() && opts.dir.is_none() {
        bail!("nothing to build: give --packages, --dir, or both");
    }
    let (tool, pkg) = match opts.format {
        Format::Squashfs => ("mksquashfs", "squashfs-tools"),
        Format::Erofs => ("mkfs.erofs", "erofs-utils"),
    };
    let mut tools = vec![(tool, pkg)];
    if !opts.packages.is_empty() {
        tools.push(("mmdebstrap", "mmdebstrap"));
        if !nix::unistd::geteuid().is_root() {
            bail!("building an extension from packages needs root (mmdebstrap's root mode, and the files' owners): run it as root");
        }
    }
    for (t, p) in tools {
        if which(t).is_none() {
            bail!("{t} is missing (Debian package {p}): run `cargo xtask deps`");
        }
    }
    if let Some(dir) = &opts.dir {
        check_overlay(dir)?;
    }
    let start = Instant::now();
    let step = |what: &str| eprintln!("{:>6.1}s  {what}", start.elapsed().as_secs_f64());
    let out_dir = target.join("ext");
    let work = out_dir.join(format!("work-{}", opts.name));
    remove_work(&work)?;
    let ext = work.join("ext");
    std::fs::create_dir_all(&ext)?;
    std::fs::set_permissions(&ext, std::fs::Permissions::from_mode(0o755))?;
    let mut payload_packages = Vec::new();
    let mut summary = Vec::new();
    let os_release = if opts.packages.is_empty() {
        // No tree to read it from: the image's, from the suite it is made
        // of.
        match image::SUITE {
            "bookworm" => "ID=debian\nVERSION_ID=12\n".to_owned(),
            other => bail!("the os-release VERSION_ID of suite {other} is not known here"),
        }
    } else {
        step(&format!(
            "the image's base and {} (mmdebstrap, {})",
            opts.packages.join(" "),
            image::SUITE
        ));
        let (full, base) = debootstrap(opts, &work)?;
        step("what the packages added");
        let before: BTreeMap<String, Entry> =
            serde_json::from_slice(&std::fs::read(base.join("files.json"))?)?;
        let mut after = BTreeMap::new();
        for top in ["usr", "opt", "etc"] {
            after.extend(walk_tree(&full, top)?);
        }
        let (mut files, mut bytes, mut etc) = (0u64, 0u64, 0u64);
        let factory = ext.join("usr/share/factory");
        for (rel, e) in &after {
            if before.get(rel) == Some(e) {
                continue;
            }
            if rel.starts_with("etc/") {
                if etc_skipped(rel) {
                    continue;
                }
                std::fs::create_dir_all(&factory)?;
                copy_entry(&full, rel, &factory)?;
                etc += 1;
            } else {
                copy_entry(&full, rel, &ext)?;
                files += 1;
                bytes += e.size;
            }
        }
        summary.push(format!(
            "{files} files under /usr and /opt ({:.1} MiB), {etc} default files from /etc in /usr/share/factory/etc",
            bytes as f64 / 1048576.0
        ));
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
        };
        let records = userdb_records(
            (
                &parse_passwd(&read(base.join("passwd"))?)?,
                &parse_group(&read(base.join("group"))?)?,
            ),
            (
                &parse_passwd(&read(full.join("etc/passwd"))?)?,
                &parse_group(&read(full.join("etc/group"))?)?,
            ),
        )?;
        if !records.is_empty() {
            let userdb = ext.join("usr/lib/userdb");
            std::fs::create_dir_all(&userdb)?;
            for (name, content) in &records {
                if let Some(to) = content.strip_prefix("->") {
                    std::os::unix::fs::symlink(to, userdb.join(name))?;
                } else {
                    std::fs::write(userdb.join(name), content)?;
                }
            }
            let named: Vec<&str> = records
                .iter()
                .filter(|(n, c)| !c.starts_with("->") && !n.ends_with(".membership"))
                .map(|(n, _)| n.as_str())
                .collect();
            summary.push(format!("users and groups: {}", named.join(" ")));
        }
        let had = dpkg_installed(&read(base.join("status"))?);
        let now = dpkg_installed(&read(full.join("var/lib/dpkg/status"))?);
        // The base as the image has it: an extension that needs another
        // version of a base package cannot be one (the image keeps its
        // own under the merged /usr only partly).
        let moved: Vec<String> = had
            .iter()
            .filter(|(p, v)| now.get(*p) != Some(*v))
            .map(|(p, v)| {
                format!(
                    "{p} {v} -> {}",
                    now.get(p).map_or("removed", String::as_str)
                )
            })
            .collect();
        if !moved.is_empty() {
            bail!(
                "--packages: installing them changed the image's base packages ({}): an extension can only add to the base",
                moved.join(", ")
            );
        }
        let added: BTreeMap<String, String> = now
            .into_iter()
            .filter(|(p, _)| !had.contains_key(p))
            .collect();
        // The packages asked for, with the versions installed; their
        // dependencies are counted only.
        for p in &opts.packages {
            let name = p.split('=').next().unwrap_or(p);
            match added.get(name) {
                Some(v) => payload_packages.push((name.to_owned(), v.clone())),
                None if had.contains_key(name) => {
                    bail!("--packages: {name} is already in the image's base; an extension cannot hold it")
                }
                None => bail!(
                    "--packages: {name} was not installed (a virtual package? name the real one)"
                ),
            }
        }
        summary.push(format!(
            "{}, with {} dependencies the base lacks",
            payload_packages
                .iter()
                .map(|(p, v)| format!("{p} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            added.len() - payload_packages.len()
        ));
        read(full.join("usr/lib/os-release"))?
    };
    if let Some(dir) = &opts.dir {
        step(&format!("laying {} over it", dir.display()));
        run(Command::new("cp")
            .args(["-a", "--no-preserve=ownership"])
            .arg(format!("{}/.", dir.display()))
            .arg(&ext))?;
    }
    let release_dir = ext.join("usr/lib/extension-release.d");
    std::fs::create_dir_all(&release_dir)?;
    let release = extension_release(&os_release, &payload_packages)?;
    std::fs::write(
        release_dir.join(format!("extension-release.{}", opts.name)),
        &release,
    )?;
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| out_dir.join(format!("{}.raw", opts.name)));
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = out.with_extension("raw.part");
    let _ = std::fs::remove_file(&tmp);
    step(&format!("{tool} {}", out.display()));
    let mut mk = Command::new(tool);
    match opts.format {
        Format::Squashfs => {
            mk.arg(&ext)
                .arg(&tmp)
                .args(["-noappend", "-comp", "zstd", "-quiet", "-no-progress"]);
            if !nix::unistd::geteuid().is_root() {
                mk.arg("-all-root");
            }
        }
        Format::Erofs => {
            mk.arg("-zlz4hc").arg(&tmp).arg(&ext);
            if !nix::unistd::geteuid().is_root() {
                mk.arg("--all-root");
            }
        }
    }
    run(mk.stdout(Stdio::null()))?;
    std::fs::rename(&tmp, &out)?;
    remove_work(&work)?;
    let bytes = std::fs::metadata(&out)?.len();
    let sha256 = image::sha256_file(&out)?;
    step("done");
    for s in summary {
        eprintln!("         {s}");
    }
    eprintln!(
        "         {}: {:.1} MiB, sha256 {sha256}\n         extension-release.{}: {}",
        out.display(),
        bytes as f64 / 1048576.0,
        opts.name,
        release.trim_end().replace('\n', " ")
    );
    println!("{}", out.display());
    Ok(out)
}

/// Removes a work directory of an earlier build. A build killed midway
/// may leave mmdebstrap's mounts in it (/proc, /sys, /dev/pts, /dev/shm of
/// the host): they are unmounted first, and the removal never crosses
/// into another file system.
fn remove_work(work: &Path) -> Result<()> {
    if !work.exists() {
        return Ok(());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut under: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(work))
        .collect();
    // Deepest first.
    under.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in &under {
        eprintln!(
            "         unmounting {} (left by a build that was stopped)",
            m.display()
        );
        run(Command::new("umount").arg("--lazy").arg(m))?;
    }
    run(Command::new("rm")
        .args(["-rf", "--one-file-system"])
        .arg(work))
    .with_context(|| format!("removing the old {}", work.display()))
}

/// An overlay directory holds only what an extension may: `usr/` and `opt/`.
fn check_overlay(dir: &Path) -> Result<()> {
    let meta =
        std::fs::metadata(dir).with_context(|| format!("--dir {}: cannot read", dir.display()))?;
    if !meta.is_dir() {
        bail!("--dir {}: not a directory", dir.display());
    }
    let mut tops = BTreeSet::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name != "usr" && name != "opt" {
            bail!(
                "--dir {}: holds {name:?}; an extension has only usr/ and opt/ (systemd-sysext merges nothing else)",
                dir.display()
            );
        }
        tops.insert(name);
    }
    if tops.is_empty() {
        bail!("--dir {}: empty", dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_what_systemd_sysext_and_a_file_name_accept() {
        for ok in ["mariadb", "one-frontend", "a", "x_1.2"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "-a", ".a", "a/b", "a b", "db.raw", &"x".repeat(65)] {
            let e = check_name(bad).unwrap_err().to_string();
            assert!(e.contains("--name"), "{e}");
        }
    }

    #[test]
    fn new_users_and_groups_become_userdb_records_and_a_taken_id_is_refused() {
        let bu = parse_passwd(
            "root:x:0:0:root:/root:/bin/bash\n_apt:x:42:65534::/nonexistent:/usr/sbin/nologin\n",
        )
        .unwrap();
        let bg = parse_group("root:x:0:\nadm:x:4:\ninput:x:101:\n").unwrap();
        let au = parse_passwd("root:x:0:0:root:/root:/bin/bash\n_apt:x:42:65534::/nonexistent:/usr/sbin/nologin\nmysql:x:100:105:MySQL Server,,,:/nonexistent:/bin/false\n").unwrap();
        let ag = parse_group("root:x:0:\nadm:x:4:mysql\ninput:x:101:\nmysql:x:105:\n").unwrap();
        let r = userdb_records((&bu, &bg), (&au, &ag)).unwrap();
        let names: Vec<&str> = r.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "mysql.user",
                "100.user",
                "mysql:adm.membership",
                "mysql.group",
                "105.group"
            ]
        );
        let user: serde_json::Value = serde_json::from_str(&r[0].1).unwrap();
        assert_eq!(user["userName"], "mysql");
        assert_eq!(user["uid"], 100);
        assert_eq!(user["gid"], 105);
        assert_eq!(user["realName"], "MySQL Server");
        assert_eq!(user["disposition"], "system");
        assert_eq!(r[1].1, "->mysql.user");
        // The packages' group took a gid the base has: refused, by name.
        let ag = parse_group("root:x:0:\ninput:x:101:\nmysql:x:101:\n").unwrap();
        let e = userdb_records((&bu, &bg), (&au, &ag))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mysql") && e.contains("101") && e.contains("input"),
            "{e}"
        );
    }

    #[test]
    fn extension_release_matches_the_images_id_and_version() {
        let os = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_ID=\"12\"\nID=debian\nIMAGE_ID=zoned-vm\n";
        let r = extension_release(
            os,
            &[("mariadb-server".into(), "1:10.11.6-0+deb12u1".into())],
        )
        .unwrap();
        assert_eq!(
            r,
            "ID=debian\nVERSION_ID=12\nARCHITECTURE=x86-64\nZONED_EXT_PACKAGES=\"mariadb-server=1:10.11.6-0+deb12u1\"\n"
        );
        assert!(extension_release("ID=debian\n", &[]).is_err());
    }

    #[test]
    fn package_state_and_unit_enablement_in_etc_are_not_defaults() {
        for skipped in [
            "etc/passwd",
            "etc/ld.so.cache",
            "etc/alternatives/my.cnf",
            "etc/init.d/mariadb",
            "etc/rc2.d/S01mariadb",
            "etc/systemd/system/multi-user.target.wants/mariadb.service",
        ] {
            assert!(etc_skipped(skipped), "{skipped}");
        }
        for kept in [
            "etc/mysql/my.cnf",
            "etc/mysql/mariadb.conf.d/50-server.cnf",
            "etc/logrotate.d/mariadb",
        ] {
            assert!(!etc_skipped(kept), "{kept}");
        }
    }

    #[test]
    fn installed_packages_are_read_from_dpkg_status() {
        let s = "Package: a\nStatus: install ok installed\nVersion: 1\n\nPackage: b\nStatus: deinstall ok config-files\nVersion: 2\n";
        let m = dpkg_installed(s);
        assert_eq!(m.len(), 1);
        assert_eq!(m["a"], "1");
    }

    #[test]
    fn an_overlay_holds_only_usr_and_opt() {
        let d = std::env::temp_dir().join(format!("ext-overlay-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("usr/lib")).unwrap();
        check_overlay(&d).unwrap();
        std::fs::create_dir_all(d.join("etc")).unwrap();
        let e = check_overlay(&d).unwrap_err().to_string();
        assert!(e.contains("\"etc\""), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
