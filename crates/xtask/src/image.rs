//! `cargo xtask image --profile vm|metal`: the appliance's disk image.
//!
//! Built from files only, as root, with no loop device and no mount:
//! mmdebstrap makes the Debian root tree (cached as a tarball keyed by what
//! goes into it), `rootfs/` and the workspace's binaries are laid over it,
//! `mke2fs -d` turns the trees into ext4 images, mtools fills the FAT EFI
//! partition, objcopy makes the unified kernel image, sfdisk writes the GPT
//! onto a plain file and the partitions are copied into place.
//!
//! Layout (GPT, partition names are what fstab and the kernel mount):
//! `zoned-esp` (FAT32: EFI/BOOT/BOOTX64.EFI is systemd-boot,
//! EFI/Linux/zoned-0001-a.efi the unified kernel image of slot a,
//! loader/loader.conf, zoned/identity.toml), `zoned-root-a` (ext4,
//! read-only at run time), `zoned-root-b` (empty: an upgrade writes the
//! next release there, zone-upgrade), `zoned-data` (ext4, mounted on
//! /var). Also written: the signed update bundle (`crate::bundle`).
//!
//! Outputs in target/image/: zoned-<profile>.raw, .qcow2, the kernel and
//! initrd (for QEMU's direct kernel boot), and manifest.json.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::run;

const MIB: u64 = 1024 * 1024;
const ESP_MIB: u64 = 256;
const DATA_MIB: u64 = 1024;
pub(crate) const SUITE: &str = "bookworm";
/// What dpkg leaves out of the root (and of an extension): no manuals,
/// docs or translations on an appliance.
pub(crate) const EXCLUDES: &[&str] = &[
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-include=/usr/share/locale/locale.alias",
    "--dpkgopt=path-exclude=/usr/share/lintian/*",
];
/// GPT partition type GUIDs (UEFI spec; Discoverable Partitions Spec).
const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const TYPE_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
const TYPE_LINUX_DATA: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";
/// The boot loader (systemd-boot, same package and version as the stub).
const SD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// systemd-boot's configuration: boot the first entry at once (hold a key
/// at power-on for the menu); no editing of the kernel command line from
/// the console (it would give a root shell to anyone at the keyboard); no
/// entries but Zoned's.
const LOADER_CONF: &str =
    "timeout 0\neditor no\nauto-entries no\nauto-firmware no\nconsole-mode keep\n";
/// Host tools the build runs, and the Debian package that has each.
const TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("mke2fs", "e2fsprogs"),
    ("mkfs.vfat", "dosfstools"),
    ("mcopy", "mtools"),
    ("sfdisk", "fdisk"),
    ("objcopy", "binutils"),
    ("objdump", "binutils"),
    ("qemu-img", "qemu-utils"),
    ("zstd", "zstd"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Debian's cloud kernel and a small virtio-only initramfs.
    Vm,
    /// Debian's generic kernel with hardware drivers, for real servers.
    Metal,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Vm => "vm",
            Profile::Metal => "metal",
        }
    }
}

struct Progress {
    start: Instant,
    step: usize,
    steps: usize,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.step += 1;
        eprintln!(
            "[{}/{}] {:>6.1}s  {what}",
            self.step,
            self.steps,
            self.start.elapsed().as_secs_f64()
        );
    }
}

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn read_list(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// The host's own apt sources: the image comes from the same archive as
/// the machine that builds it.
pub(crate) fn apt_sources() -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut files: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sources" || x == "list"))
            .collect();
        files.sort();
        found.extend(files);
    }
    let list = Path::new("/etc/apt/sources.list");
    if std::fs::metadata(list).is_ok_and(|m| m.len() > 0) {
        found.push(list.to_owned());
    }
    if found.is_empty() {
        bail!("no apt sources on this machine (/etc/apt/sources.list[.d]): mmdebstrap needs one");
    }
    Ok(found)
}

/// coreutils' sha256sum: native speed on multi-GiB images.
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let out = output(Command::new("sha256sum").arg(path))?;
    out.split_whitespace()
        .next()
        .map(str::to_owned)
        .context("sha256sum printed nothing")
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let out = output(Command::new("du").args(["-sb"]).arg(dir))?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du printed no size")
}

/// The Debian root tree as a tarball, built by mmdebstrap unless a cached
/// one made from the same inputs exists. Returns (path, built now).
fn root_tarball(profile: Profile, cache: &Path, fresh: bool) -> Result<(PathBuf, bool)> {
    let root = repo_root();
    let image = root.join("image");
    let mut packages = read_list(&image.join("packages.txt"))?;
    packages.extend(read_list(&image.join(profile.name()).join("packages.txt"))?);
    // Files put in place before any package installs (initramfs settings
    // and scripts): every profile's, then this profile's.
    let early = [image.join("root"), image.join(profile.name()).join("root")];
    let sources = apt_sources()?;
    let excludes = EXCLUDES;
    // The key covers everything that shapes the tree.
    let mut key_input = format!("{SUITE}\n{packages:?}\n{excludes:?}\n");
    for dir in &early {
        for f in walk(dir)? {
            // Relative: a clone elsewhere has the same tree (keyed by the
            // absolute path, every clone path built and kept one more).
            // The mode too: mkinitramfs skips a script that is not
            // executable, without a word.
            use std::os::unix::fs::PermissionsExt;
            key_input.push_str(&format!(
                "{} {:o}\n{}\n",
                f.strip_prefix(&image).unwrap_or(&f).display(),
                std::fs::metadata(&f)?.permissions().mode(),
                std::fs::read_to_string(&f)?
            ));
        }
    }
    for s in &sources {
        key_input.push_str(&std::fs::read_to_string(s)?);
    }
    let key = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(key_input.as_bytes()))
    };
    let tar = cache.join(format!("root-{}-{}.tar", profile.name(), &key[..16]));
    if tar.exists() && !fresh {
        eprintln!("         cached root tree {}", tar.display());
        return Ok((tar, false));
    }
    std::fs::create_dir_all(cache)?;
    let tmp = tar.with_extension("tar.part");
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--variant=essential")
        .arg("--mode=root")
        .arg("--format=tar")
        .arg(format!("--include={}", packages.join(",")))
        .args(excludes)
        // The initramfs settings must be in place before the kernel's
        // package builds the initramfs.
        .args(
            early
                .iter()
                .filter(|d| d.exists())
                .map(|d| format!("--setup-hook=sync-in '{}' /", d.display())),
        )
        .arg(SUITE)
        .arg(&tmp)
        .args(&sources)
        .stdin(Stdio::null());
    run(&mut cmd)?;
    std::fs::rename(&tmp, &tar)?;
    // One tree per profile is kept (860 MB for both): those of older
    // inputs go.
    let prefix = format!("root-{}-", profile.name());
    for e in std::fs::read_dir(cache)? {
        let p = e?.path();
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        if p != tar && name.starts_with(&prefix) && name.ends_with(".tar") {
            let _ = std::fs::remove_file(&p);
        }
    }
    Ok((tar, true))
}

/// A file of kernel command-line arguments: its lines joined, `#` comments
/// and blank lines left out.
fn read_args(path: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join(" "))
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// A unified kernel image: the systemd EFI stub with the kernel, initrd,
/// command line and os-release as PE sections (ukify is not in bookworm).
fn make_uki(
    dir: &Path,
    file_name: &str,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    osrel: &str,
) -> Result<PathBuf> {
    let p = output(Command::new("objdump").args(["-p", STUB]))?;
    let align = p
        .lines()
        .find_map(|l| l.strip_prefix("SectionAlignment"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .context("no SectionAlignment in the EFI stub")?;
    let h = output(Command::new("objdump").args(["-h", STUB]))?;
    // Section lines: Idx Name Size VMA LMA File-off Algn.
    let end = h
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 7 && f[0].parse::<u32>().is_ok()).then(|| {
                let size = u64::from_str_radix(f[2], 16).unwrap_or(0);
                let vma = u64::from_str_radix(f[3], 16).unwrap_or(0);
                size + vma
            })
        })
        .max()
        .context("no sections in the EFI stub")?;
    let up = |x: u64| x.div_ceil(align) * align;
    let osrel_path = dir.join("os-release");
    let cmdline_path = dir.join("cmdline");
    std::fs::write(&osrel_path, osrel)?;
    std::fs::write(&cmdline_path, format!("{}\0", cmdline.trim()))?;
    let mut offset = up(end);
    let mut cmd = Command::new("objcopy");
    for (name, file) in [
        (".osrel", osrel_path.as_path()),
        (".cmdline", cmdline_path.as_path()),
        (".linux", kernel),
        (".initrd", initrd),
    ] {
        cmd.arg("--add-section")
            .arg(format!("{name}={}", file.display()))
            .arg("--change-section-vma")
            .arg(format!("{name}={offset:#x}"));
        offset = up(offset + std::fs::metadata(file)?.len());
    }
    let uki = dir.join(file_name);
    cmd.arg(STUB).arg(&uki);
    run(&mut cmd)?;
    Ok(uki)
}

/// The QEMU upgrade test's bundles (`--test-bundles`): the same tree under
/// another version, and one whose zoned never starts.
pub const TEST_BUNDLES: [(&str, bool); 2] = [
    ("99.0.0-upgrade-test", false),
    ("99.0.1-never-healthy", true),
];

/// What `cargo xtask image` builds.
#[derive(Debug, Clone)]
pub struct Options {
    pub profile: Profile,
    /// Rebuild the cached Debian root tree.
    pub fresh_root: bool,
    /// os-release IMAGE_VERSION (and the bundle's version); default
    /// `<workspace version>+<commit>`.
    pub version: Option<String>,
    /// The minisign secret key signing the bundle; default a throwaway
    /// test key in target/image/signing/.
    pub signing_key: Option<PathBuf>,
    /// More public keys the image trusts bundles from.
    pub trust_keys: Vec<PathBuf>,
    /// Write the update bundle only (no disk image).
    pub bundle_only: bool,
    /// Test only: the root's zoned.service exits at once, so a server
    /// booted from it is never healthy (the rollback test). Bundle only.
    pub never_healthy: bool,
}

impl Options {
    pub fn new(profile: Profile) -> Options {
        Options {
            profile,
            fresh_root: false,
            version: None,
            signing_key: None,
            trust_keys: Vec::new(),
            bundle_only: false,
            never_healthy: false,
        }
    }
}

/// What a build took and made, for `bench qemu`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub profile: &'static str,
    pub seconds: f64,
    pub root_tree_built: bool,
    pub root_tree_seconds: f64,
    pub raw_bytes: u64,
    pub raw_allocated_bytes: u64,
    pub qcow2_bytes: u64,
}

/// The disk image (and its update bundle); what it took.
pub fn build(opts: &Options, target: &Path) -> Result<Stats> {
    build_with(opts, target)?.context("--bundle-only builds no disk image")
}

/// The disk image and the update bundle, or with `bundle_only` the bundle
/// alone (then None).
pub fn build_with(opts: &Options, target: &Path) -> Result<Option<Stats>> {
    let (profile, fresh_root) = (opts.profile, opts.fresh_root);
    if let Some(v) = &opts.version {
        crate::bundle::check_version(v)?;
    }
    if opts.never_healthy && (!opts.bundle_only || opts.version.is_none()) {
        bail!("--never-healthy makes a test bundle whose zoned never starts: give it with --bundle-only and a --version of its own");
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("building the image needs root (mmdebstrap, and file ownership in the root tree): run it as root");
    }
    for (tool, package) in TOOLS {
        if which(tool).is_none() {
            bail!("`{tool}` is missing (Debian package {package}): run `cargo xtask deps`");
        }
    }
    if !Path::new(STUB).exists() || !Path::new(SD_BOOT).exists() {
        bail!("{STUB} or {SD_BOOT} is missing (Debian package systemd-boot-efi): run `cargo xtask deps`");
    }
    let started = Instant::now();
    let mut progress = Progress {
        start: started,
        step: 0,
        steps: if opts.bundle_only { 6 } else { 11 },
    };
    let out = target.join("image");
    std::fs::create_dir_all(&out)?;
    let key = crate::bundle::SigningKey::load(opts.signing_key.as_deref(), &out)?;
    let mut trusted = vec![(format!("{}.pub", key.id()?), key.public_file()?)];
    for p in &opts.trust_keys {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("--trust-key {}", p.display()))?;
        let mut t = zone_bundle::TrustedKeys::default();
        t.add(&p.display().to_string(), &text)?;
        trusted.push((format!("{}.pub", t.ids().remove(0)), text));
    }
    let work = out.join(format!("work-{}", profile.name()));
    let name = format!("zoned-{}", profile.name());

    progress
        .step("building zoned, zone-vip, zone-sync, zone-mounts, zonectl, zone-provision (release, as the tests)");
    let bins = [
        "zoned",
        "zone-vip",
        "zone-sync",
        "zone-mounts",
        "zonectl",
        "zone-provision",
        "zone-upgrade",
    ];
    // The same build as the test suite's (cargo nextest builds tests and
    // binaries together): one profile, one set of features, so RocksDB and
    // the binaries are compiled once for the tests and the image.
    run(&mut crate::cargo_build(&[
        "--workspace",
        "--tests",
        "--bins",
    ]))?;

    progress.step("Debian root tree (mmdebstrap, cached)");
    let root_started = Instant::now();
    let (tarball, built_root) = root_tarball(profile, &out.join("cache"), fresh_root)?;
    let root_secs = root_started.elapsed().as_secs_f64();

    progress.step("unpacking the root tree, laying rootfs/ and the binaries over it");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    let root = work.join("root");
    std::fs::create_dir_all(&root)?;
    run(Command::new("tar")
        .args(["-xpf"])
        .arg(&tarball)
        .arg("-C")
        .arg(&root)
        .arg("--numeric-owner"))?;
    run(Command::new("cp")
        .args(["-a", "--remove-destination"])
        .arg(repo_root().join("rootfs").join("."))
        .arg(&root))?;
    for b in bins {
        let src = target.join(crate::PROFILE).join(b);
        let dst = root.join("usr/bin").join(b);
        // Debug info (if any) stays on the build machine; the code is the
        // tests'.
        run(Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&src)
            .arg(&dst))?;
    }
    // Every shared library the binaries load must be in the tree.
    for b in bins {
        let ldd = Command::new("chroot")
            .arg(&root)
            .args(["/usr/bin/ldd", &format!("/usr/bin/{b}")])
            .output()
            .context("cannot run ldd in the root tree")?;
        let text = String::from_utf8_lossy(&ldd.stdout);
        if !ldd.status.success() || text.contains("not found") {
            bail!(
                "{b} cannot run in the image (add the package with the missing library to image/packages.txt):\n{text}"
            );
        }
    }
    // zonectl's man pages and bash completion, as zonectl makes them.
    let zonectl = target.join(crate::PROFILE).join("zonectl");
    run(Command::new(&zonectl)
        .args(["manpage", "--dir"])
        .arg(root.join("usr/share/man/man1")))?;
    let completions = root.join("usr/share/bash-completion/completions");
    std::fs::create_dir_all(&completions)?;
    let script = Command::new(&zonectl)
        .args(["completion", "bash"])
        .output()
        .context("cannot run zonectl completion")?;
    if !script.status.success() || script.stdout.is_empty() {
        bail!("zonectl completion bash failed: {script:?}");
    }
    std::fs::write(completions.join("zonectl"), &script.stdout)?;
    let share = root.join("usr/share/zoned");
    std::fs::create_dir_all(&share)?;
    for (src, dst) in [
        ("crates/zoned/node.example.toml", "node.example.toml"),
        ("crates/zone-vip/vip.example.toml", "vip.example.toml"),
        (
            "crates/zone-provision/identity.example.toml",
            "identity.example.toml",
        ),
    ] {
        std::fs::copy(repo_root().join(src), share.join(dst))?;
    }
    // The keys update bundles must be signed with (zone-bundle).
    let keys_dir = share.join("keys");
    std::fs::create_dir_all(&keys_dir)?;
    for (name, text) in &trusted {
        std::fs::write(keys_dir.join(name), text)?;
    }
    run(Command::new("systemctl")
        .arg(format!("--root={}", root.display()))
        .args([
            "enable",
            "--quiet",
            "zone-provision.service",
            "zoned.service",
            "zone-vip.service",
            "zone-sync.service",
            "zone-mounts.service",
            "zone-ports.service",
            "systemd-networkd.service",
            "systemd-timesyncd.service",
            "zone-boot-check.service",
            "zone-boot-deadline.service",
            "zone-machine-id.service",
            // Merges the extensions in /var/lib/extensions (the data
            // partition) over /usr and /opt before sysinit.target: a
            // payload's units, tmpfiles and users are there from the
            // start of each boot. It does nothing while there are none.
            "systemd-sysext.service",
        ]))?;
    // A read-only root: no first-boot questions; the machine id is the
    // data partition's, put in place by the initramfs
    // (image/root/etc/initramfs-tools/scripts/init-bottom/zoned-machine-id),
    // so there is nothing to commit to /etc. The boot loader on the EFI
    // partition is the image's, not bootctl's.
    run(Command::new("systemctl")
        .arg(format!("--root={}", root.display()))
        .args([
            "mask",
            "--quiet",
            "systemd-firstboot.service",
            "systemd-boot-update.service",
            "systemd-machine-id-commit.service",
        ]))?;
    std::fs::write(root.join("etc/machine-id"), "")?;
    let _ = std::fs::remove_file(root.join("etc/hostname"));
    if opts.never_healthy {
        // Exit status 2 is zoned's "needs an operator": systemd does not
        // restart it, the unit fails, and the boot assessment fails at once.
        let dropin = root.join("etc/systemd/system/zoned.service.d");
        std::fs::create_dir_all(&dropin)?;
        std::fs::write(
            dropin.join("never-healthy.conf"),
            "# A test bundle (cargo xtask image --never-healthy): zoned never starts.\n[Service]\nExecStart=\nExecStart=/bin/sh -c 'echo \"zoned does not start: this root was built with --never-healthy, a test bundle\" >&2; exit 2'\n",
        )?;
    }
    let commit = output(
        Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .current_dir(repo_root()),
    )
    .map(|s| s.trim().to_owned())
    .unwrap_or_else(|_| "unknown".into());
    let image_version = opts
        .version
        .clone()
        .unwrap_or_else(|| format!("{}+{commit}", env!("CARGO_PKG_VERSION")));
    let osrel_file = root.join("usr/lib/os-release");
    let mut osrel = std::fs::read_to_string(&osrel_file)?;
    osrel.push_str(&format!(
        "IMAGE_ID=zoned-{}\nIMAGE_VERSION={image_version}\n",
        profile.name()
    ));
    std::fs::write(&osrel_file, &osrel)?;

    // The kernel and initrd the kernel package installed.
    let boot = root.join("boot");
    let find = |prefix: &str| -> Result<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&boot)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .collect();
        v.sort();
        v.pop()
            .with_context(|| format!("no {prefix}* in the root tree's /boot"))
    };
    let vmlinuz = find("vmlinuz-")?;
    let initrd = find("initrd.img-")?;
    let kernel_version = vmlinuz
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_owned();
    let kernel_out = out.join(format!("{name}.vmlinuz"));
    let initrd_out = out.join(format!("{name}.initrd"));
    std::fs::copy(&vmlinuz, &kernel_out)?;
    std::fs::copy(&initrd, &initrd_out)?;

    // /var goes to the data partition; the root keeps an empty mount point.
    let data = work.join("data");
    std::fs::rename(root.join("var"), &data)?;
    std::fs::create_dir(root.join("var"))?;
    std::fs::create_dir_all(data.join("lib/zoned"))?;
    std::fs::create_dir_all(root.join("boot/efi"))?;

    progress.step("unified kernel image (EFI stub + kernel + initrd + command line)");
    // Every profile's arguments, then the profile's consoles: the last
    // `console=` is /dev/console, where systemd's and journald's messages
    // go (the kernel's go to each).
    let cmdline = format!(
        "{} {}",
        read_args(&repo_root().join("image/cmdline.txt"))?,
        read_args(
            &repo_root()
                .join("image")
                .join(profile.name())
                .join("console.txt")
        )?
    );
    // The kernel images' own os-release names the release for the loader's
    // menu but carries no version field: systemd-boot would order entries
    // by it before their file names, and the file names (the generation
    // an upgrade gives them, zone-upgrade) must decide which boots.
    let uki_osrel = format!(
        "ID=zoned\nNAME=Zoned\nPRETTY_NAME=\"Zoned {image_version} ({name})\"\nIMAGE_ID={name}\n"
    );
    let uki = make_uki(
        &work,
        "zoned-a.efi",
        &vmlinuz,
        &initrd,
        &cmdline,
        &uki_osrel,
    )?;
    // The same for root slot b (what an upgrade installs there).
    if cmdline.matches("root=PARTLABEL=zoned-root-a").count() != 1 {
        bail!("image/cmdline.txt must name the root once as root=PARTLABEL=zoned-root-a");
    }
    let cmdline_b = cmdline.replace("root=PARTLABEL=zoned-root-a", "root=PARTLABEL=zoned-root-b");
    let uki_b = make_uki(
        &work,
        "zoned-b.efi",
        &vmlinuz,
        &initrd,
        &cmdline_b,
        &uki_osrel,
    )?;

    progress.step("root filesystem (mke2fs -d)");
    let root_bytes = dir_bytes(&root)?;
    // The root filesystem is sized to its tree (an upgrade writes it into
    // the other slot: the smaller, the likelier it fits); the partitions
    // leave room for later releases to grow, slot B the same size.
    let root_fs_mib = ((root_bytes as f64 * 1.2) as u64 / MIB + 64).next_multiple_of(16);
    let root_mib = ((root_bytes as f64 * 1.4) as u64 / MIB + 128).next_multiple_of(64);
    let mkfs = |label: &str, src: &Path, file: &Path, mib: u64| -> Result<()> {
        let f = std::fs::File::create(file)?;
        f.set_len(mib * MIB)?;
        drop(f);
        run(Command::new("mke2fs")
            .args([
                "-q",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-L",
                label,
                "-E",
                "root_owner=0:0",
                "-d",
            ])
            .arg(src)
            .arg(file))
        .with_context(|| format!("{label}: {mib} MiB too small for {}?", src.display()))
    };
    let root_img = work.join("root.img");
    mkfs("zoned-root", &root, &root_img, root_fs_mib)?;

    progress.step("update bundle (root image, a kernel image per slot, signed manifest)");
    let (bundle, bundle_manifest) = crate::bundle::write(
        &out,
        &name,
        &crate::bundle::Parts {
            image_id: name.clone(),
            version: &image_version,
            commit: &commit,
            kernel: &kernel_version,
            root_img: &root_img,
            ukis: [&uki, &uki_b],
        },
        &key,
    )?;
    eprintln!(
        "  {}  {:.0} MiB, signed by key {} ({})",
        bundle.display(),
        bundle_manifest.payload_bytes() as f64 / MIB as f64,
        key.id()?,
        key.path.display()
    );
    if opts.bundle_only {
        std::fs::remove_dir_all(&work)?;
        return Ok(None);
    }
    // A full build keeps only its own bundle of this profile (each is
    // 100-250 MiB, one per version or commit built).
    for e in std::fs::read_dir(&out)?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&format!("{name}-")) && n.ends_with(".bundle") && e.path() != bundle {
            std::fs::remove_file(e.path())?;
        }
    }

    progress.step("EFI system partition (FAT32)");
    let esp = work.join("esp.img");
    run(Command::new("mkfs.vfat")
        .args(["-F", "32", "-n", "ZONED-ESP", "-C"])
        .arg(&esp)
        .arg((ESP_MIB * 1024).to_string())
        .stdout(Stdio::null()))?;
    let mtools = |args: &[&str]| {
        let mut c = Command::new(args[0]);
        c.arg("-i").arg(&esp).args(&args[1..]);
        c
    };
    run(&mut mtools(&[
        "mmd",
        "::/EFI",
        "::/EFI/BOOT",
        "::/EFI/Linux",
        "::/loader",
        "::/zoned",
    ]))?;
    // Firmware starts systemd-boot (the removable-media path: no boot
    // variable to set); it boots the first entry of EFI/Linux, slot a's
    // kernel image, generation 1, known good (no boot counter).
    run(mtools(&["mcopy"])
        .arg(SD_BOOT)
        .arg("::/EFI/BOOT/BOOTX64.EFI"))?;
    run(mtools(&["mcopy"])
        .arg(&uki)
        .arg("::/EFI/Linux/zoned-0001-a.efi"))?;
    let loader_conf = work.join("loader.conf");
    std::fs::write(&loader_conf, LOADER_CONF)?;
    run(mtools(&["mcopy"])
        .arg(&loader_conf)
        .arg("::/loader/loader.conf"))?;
    run(mtools(&["mcopy"])
        .arg(share.join("identity.example.toml"))
        .arg("::/zoned/identity.example.toml"))?;

    progress.step("data filesystem (mke2fs -d)");
    let data_img = work.join("data.img");
    mkfs("zoned-data", &data, &data_img, DATA_MIB)?;

    progress.step("GPT disk image (sfdisk on a file)");
    let parts = [
        ("zoned-esp", TYPE_ESP, ESP_MIB, Some(&esp)),
        ("zoned-root-a", TYPE_ROOT_X86_64, root_mib, Some(&root_img)),
        ("zoned-root-b", TYPE_ROOT_X86_64, root_mib, None),
        ("zoned-data", TYPE_LINUX_DATA, DATA_MIB, Some(&data_img)),
    ];
    let total_mib = 1 + parts.iter().map(|p| p.2).sum::<u64>() + 1;
    let raw = out.join(format!("{name}.raw"));
    let raw_tmp = out.join(format!("{name}.raw.part"));
    {
        let f = std::fs::File::create(&raw_tmp)?;
        f.set_len(total_mib * MIB)?;
    }
    let mut script = String::from("label: gpt\nunit: sectors\nfirst-lba: 2048\n");
    let mut start_mib = 1;
    let mut layout = Vec::new();
    for (label, ty, mib, _) in &parts {
        script.push_str(&format!(
            "start={}, size={}, type={ty}, name=\"{label}\"\n",
            start_mib * 2048,
            mib * 2048
        ));
        layout.push(serde_json::json!({
            "name": label, "type": ty, "start_bytes": start_mib * MIB, "size_bytes": mib * MIB,
        }));
        start_mib += mib;
    }
    let mut sfdisk = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(&raw_tmp)
        .stdin(Stdio::piped())
        .spawn()
        .context("cannot run sfdisk")?;
    {
        use std::io::Write;
        sfdisk
            .stdin
            .take()
            .context("sfdisk stdin")?
            .write_all(script.as_bytes())?;
    }
    if !sfdisk.wait()?.success() {
        bail!("sfdisk failed on {}", raw_tmp.display());
    }
    let mut start_mib = 1;
    for (_, _, mib, img) in &parts {
        if let Some(img) = img {
            run(Command::new("dd")
                .arg(format!("if={}", img.display()))
                .arg(format!("of={}", raw_tmp.display()))
                .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
                .arg(format!("seek={start_mib}")))?;
        }
        start_mib += mib;
    }
    std::fs::rename(&raw_tmp, &raw)?;

    progress.step("qcow2 (compressed)");
    let qcow2 = out.join(format!("{name}.qcow2"));
    let qcow2_tmp = out.join(format!("{name}.qcow2.part"));
    run(Command::new("qemu-img")
        .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2_tmp))?;
    std::fs::rename(&qcow2_tmp, &qcow2)?;

    progress.step("manifest.json");
    let mut files = BTreeMap::new();
    for p in [&raw, &qcow2, &kernel_out, &initrd_out] {
        let meta = std::fs::metadata(p)?;
        let allocated = {
            use std::os::unix::fs::MetadataExt;
            meta.blocks() * 512
        };
        files.insert(
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            serde_json::json!({
                "bytes": meta.len(),
                "allocated_bytes": allocated,
                "sha256": sha256_file(p)?,
            }),
        );
    }
    let manifest = serde_json::json!({
        "profile": profile.name(),
        // The cargo profile of the binaries in the root (README's figures
        // are measured on the same build).
        "binaries_profile": crate::PROFILE,
        "version": env!("CARGO_PKG_VERSION"),
        "image_version": image_version,
        "bundle": {
            "file": bundle.file_name().unwrap_or_default().to_string_lossy(),
            "sha256": sha256_file(&bundle)?,
            "signing_key": key.id()?,
            "trusted_keys": trusted.iter().map(|(n, _)| n.trim_end_matches(".pub").to_owned()).collect::<Vec<_>>(),
        },
        "commit": commit,
        "debian": SUITE,
        "kernel": kernel_version,
        "kernel_cmdline": cmdline.trim(),
        "root_tree": {
            "tarball": tarball.file_name().unwrap_or_default().to_string_lossy(),
            "built_now": built_root,
            "seconds": root_secs,
            "bytes": root_bytes,
        },
        "partitions": layout,
        "files": files,
        "build_seconds": started.elapsed().as_secs_f64(),
    });
    let manifest_path = out.join(format!("manifest-{}.json", profile.name()));
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&manifest)?)?;
    // The last profile built is also manifest.json.
    std::fs::copy(&manifest_path, out.join("manifest.json"))?;
    std::fs::remove_dir_all(&work)?;
    let mib = |p: &Path| std::fs::metadata(p).map(|m| m.len() as f64 / MIB as f64);
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "image built in {seconds:.0} s (root tree {}: {root_secs:.0} s)\n  {}  {:.0} MiB\n  {}  {:.0} MiB\n  {}",
        if built_root { "built" } else { "cached" },
        raw.display(),
        mib(&raw)?,
        qcow2.display(),
        mib(&qcow2)?,
        manifest_path.display()
    );
    let raw_meta = std::fs::metadata(&raw)?;
    Ok(Some(Stats {
        profile: profile.name(),
        seconds,
        root_tree_built: built_root,
        root_tree_seconds: root_secs,
        raw_bytes: raw_meta.len(),
        raw_allocated_bytes: {
            use std::os::unix::fs::MetadataExt;
            raw_meta.blocks() * 512
        },
        qcow2_bytes: std::fs::metadata(&qcow2)?.len(),
    }))
}

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}
