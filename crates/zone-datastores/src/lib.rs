//! The model of a zone's shared datastores, shared by the three programs
//! that touch them: zoned's Storage service stores the declarations,
//! zone-mounts mounts and probes them on every server, zonectl declares
//! them and shows their health.
//!
//! A declaration is checked entirely here, on its text, before anything is
//! stored ([`check`]): a bad one is refused with the field it is wrong in,
//! and no server mounts anything. What it must never let through is a mount
//! over the system (`/`, `/etc`, `/usr`, `/boot`, `/var/lib/zoned`, the
//! kernel's own trees), one datastore inside another (unmounting the outer
//! one would fail, or hide the inner one), or options that carry a second
//! option list or a second mount (`remount`, `bind`, quotes, spaces,
//! newlines).

use std::path::Path;

use zone_proto::v1::{Datastore, DatastoreState};

/// Where declarations live in the store: `zone/storage/ds/<name>` (prost
/// [`Datastore`]).
pub const DS_PREFIX: &[u8] = b"zone/storage/ds/";
/// Rewritten by every change to the declarations: each change compares its
/// mod revision with the one it read, so two adds racing for one target
/// serialise and the second is refused.
pub const GEN_KEY: &[u8] = b"zone/storage/gen";

/// The key of datastore `name`.
pub fn key(name: &str) -> Vec<u8> {
    [DS_PREFIX, name.as_bytes()].concat()
}

/// Defaults for a probe's timing, and the bounds of each.
pub const DEFAULT_INTERVAL_MS: u32 = 2_000;
pub const DEFAULT_TIMEOUT_MS: u32 = 5_000;
const INTERVAL_MS: std::ops::RangeInclusive<u32> = 200..=600_000;
const TIMEOUT_MS: std::ops::RangeInclusive<u32> = 100..=600_000;

/// The file system types a declaration may name. A fixed list rather than
/// the server's `/proc/filesystems`: the zone's servers must all be able to
/// mount what one accepted, and a type no server knows would only fail
/// later, everywhere.
pub const TYPES: [&str; 10] = [
    "nfs4", "nfs", "ext4", "xfs", "btrfs", "ext3", "ext2", "gfs2", "ocfs2", "bind",
];

/// Paths no datastore may be mounted on or under: the system itself (the
/// merged-/usr links to it included: mount(2) follows them), the zone's own
/// data, the kernel's trees, root's home. Nor on any directory above one
/// of them: a datastore on `/var/lib` would hide `/var/lib/zoned`.
pub const FORBIDDEN: [&str; 15] = [
    "/etc",
    "/usr",
    "/boot",
    "/var/lib/zoned",
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/root",
];

/// File systems of their own on a server, which a datastore may go under
/// but never replace.
pub const MOUNT_POINTS: [&str; 4] = ["/var", "/tmp", "/home", "/var/tmp"];

/// A declaration refused: the field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

fn invalid(field: &str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field: format!("datastore.{field}"),
        reason: reason.into(),
    }
}

/// Checks a declaration against itself and the zone's other datastores
/// (`others`, the stored ones; one of the same name is the one it would
/// replace, and is refused unless identical: see [`same`]). Fills in the
/// defaults (probe timing).
pub fn check(ds: &mut Datastore, others: &[Datastore]) -> Result<(), Invalid> {
    check_name(&ds.name)?;
    if !TYPES.contains(&ds.r#type.as_str()) {
        return Err(invalid(
            "type",
            format!(
                "unknown file system type `{}`; one of: {}",
                ds.r#type,
                TYPES.join(", ")
            ),
        ));
    }
    check_source(&ds.r#type, &ds.source)?;
    check_target(&ds.target)?;
    let opts = Options::parse(&ds.options)?;
    if ds.exclusive {
        check_exclusive(ds)?;
    }
    if ds.r#type == "bind" && !opts.data.is_empty() {
        return Err(invalid(
            "options",
            format!(
                "a bind mount takes only generic options (ro, nosuid, nodev, noexec, ...), not `{}`",
                opts.data.join(",")
            ),
        ));
    }
    if ds.write_probe && opts.read_only() {
        return Err(invalid(
            "write_probe",
            "a read-only datastore (`ro` in the options) cannot be probed by writing; leave the write probe off",
        ));
    }
    if ds.probe_interval_ms == 0 {
        ds.probe_interval_ms = DEFAULT_INTERVAL_MS;
    }
    if ds.probe_timeout_ms == 0 {
        ds.probe_timeout_ms = DEFAULT_TIMEOUT_MS;
    }
    if !INTERVAL_MS.contains(&ds.probe_interval_ms) {
        return Err(invalid(
            "probe_interval_ms",
            format!(
                "{} ms is outside {}..={} ms",
                ds.probe_interval_ms,
                INTERVAL_MS.start(),
                INTERVAL_MS.end()
            ),
        ));
    }
    if !TIMEOUT_MS.contains(&ds.probe_timeout_ms) {
        return Err(invalid(
            "probe_timeout_ms",
            format!(
                "{} ms is outside {}..={} ms",
                ds.probe_timeout_ms,
                TIMEOUT_MS.start(),
                TIMEOUT_MS.end()
            ),
        ));
    }
    for o in others {
        if o.name == ds.name {
            if same(o, ds) {
                continue;
            }
            return Err(invalid(
                "name",
                format!(
                    "a datastore named `{}` is declared already (type {}, source {}, target {}); remove it first to change it",
                    o.name, o.r#type, o.source, o.target
                ),
            ));
        }
        let (a, b) = (Path::new(&ds.target), Path::new(&o.target));
        if a == b {
            return Err(invalid(
                "target",
                format!("`{}` is datastore `{}`'s target already", ds.target, o.name),
            ));
        }
        if a.starts_with(b) || b.starts_with(a) {
            return Err(invalid(
                "target",
                format!(
                    "`{}` and datastore `{}`'s target `{}` are inside one another; datastores may not nest",
                    ds.target, o.name, o.target
                ),
            ));
        }
    }
    Ok(())
}

/// What an exclusive datastore needs besides: a block device (zone-vip
/// mounts it through a systemd mount unit), and names systemd takes as
/// they are.
fn check_exclusive(ds: &Datastore) -> Result<(), Invalid> {
    if matches!(ds.r#type.as_str(), "nfs" | "nfs4" | "bind") {
        return Err(invalid(
            "exclusive",
            format!(
                "a `{}` datastore may be mounted on every server at once; exclusive is for a block device's file system (ext4, xfs, ...), which must never be mounted twice: declare it without --exclusive",
                ds.r#type
            ),
        ));
    }
    for (field, value) in [("source", &ds.source), ("target", &ds.target)] {
        if value.contains('%') {
            return Err(invalid(
                field,
                format!("`{value}` holds `%`, which systemd reads as a specifier in an exclusive datastore's mount unit"),
            ));
        }
    }
    if mount_unit_name(&ds.target).len() > 255 {
        return Err(invalid(
            "target",
            format!(
                "`{}` makes a mount unit name longer than 255 bytes once escaped",
                ds.target
            ),
        ));
    }
    Ok(())
}

/// Whether two declarations say the same (the revision aside).
pub fn same(a: &Datastore, b: &Datastore) -> bool {
    let strip = |d: &Datastore| Datastore {
        revision: 0,
        ..d.clone()
    };
    strip(a) == strip(b)
}

fn check_name(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_lowercase() | name.as_bytes()[0].is_ascii_digit()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "name",
            format!(
                "`{}` is not a datastore name: 1 to 63 of a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit",
                name.escape_debug()
            ),
        ))
    }
}

/// An absolute path in normal form, printable, with no comma (mount
/// options and `/proc/self/mountinfo` could not carry it plainly).
fn normal_path(field: &str, path: &str) -> Result<(), Invalid> {
    let bad = |why: &str| invalid(field, format!("`{}` {why}", path.escape_debug()));
    if !path.starts_with('/') {
        return Err(bad("is not an absolute path"));
    }
    if path.len() > 1024 {
        return Err(bad("is longer than 1024 bytes"));
    }
    if path
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == ',' || c == '\\')
    {
        return Err(bad(
            "holds a space, a comma, a backslash or a control character",
        ));
    }
    if path.len() > 1 && path.ends_with('/') {
        return Err(bad("ends with a slash"));
    }
    if path.contains("//") || path.split('/').any(|c| c == "." || c == "..") {
        return Err(bad(
            "is not in normal form (an empty, `.` or `..` component)",
        ));
    }
    Ok(())
}

fn check_target(target: &str) -> Result<(), Invalid> {
    normal_path("target", target)?;
    if target == "/" {
        return Err(invalid("target", "`/` is the root file system"));
    }
    let t = Path::new(target);
    let elsewhere = "datastores go elsewhere (e.g. /var/lib/one/datastores/NAME)";
    if let Some(f) = FORBIDDEN.iter().find(|f| t.starts_with(f)) {
        let how = if t == Path::new(f) { "" } else { "under " };
        return Err(invalid(
            "target",
            format!("`{target}` is {how}`{f}`, which belongs to the system; {elsewhere}"),
        ));
    }
    if let Some(f) = MOUNT_POINTS.iter().find(|f| Path::new(f) == t) {
        return Err(invalid(
            "target",
            format!("`{target}` is a file system of the server's own (`{f}`): a datastore there would hide it; {elsewhere}"),
        ));
    }
    if let Some(f) = FORBIDDEN
        .iter()
        .chain(MOUNT_POINTS.iter())
        .find(|f| Path::new(f).starts_with(t))
    {
        return Err(invalid(
            "target",
            format!("`{target}` holds `{f}`: a datastore there would hide it; {elsewhere}"),
        ));
    }
    Ok(())
}

fn check_source(ty: &str, source: &str) -> Result<(), Invalid> {
    match ty {
        "nfs" | "nfs4" => {
            let (host, export) = split_nfs(source).ok_or_else(|| {
                invalid(
                    "source",
                    format!(
                        "`{}` is not HOST:/EXPORT (e.g. 10.0.0.5:/srv/datastores or nas.example:/export)",
                        source.escape_debug()
                    ),
                )
            })?;
            let host_ok = host.parse::<std::net::IpAddr>().is_ok()
                || (!host.is_empty()
                    && host.len() <= 253
                    && host.split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && !l.starts_with('-')
                            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    }));
            if !host_ok {
                return Err(invalid(
                    "source",
                    format!(
                        "`{}` is not a host name or an IP address",
                        host.escape_debug()
                    ),
                ));
            }
            normal_path("source", export)
        }
        "bind" => normal_path("source", source),
        _ => {
            normal_path("source", source)?;
            if !Path::new(source).starts_with("/dev") || source == "/dev" {
                return Err(invalid(
                    "source",
                    format!(
                        "`{source}` is not a block device under /dev (e.g. /dev/disk/by-id/...)"
                    ),
                ));
            }
            Ok(())
        }
    }
}

/// `host:/export`, `[v6]:/export`: the host (brackets removed) and the
/// export.
pub fn split_nfs(source: &str) -> Option<(&str, &str)> {
    if let Some(rest) = source.strip_prefix('[') {
        let (host, export) = rest.split_once("]:")?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        return Some((host, export));
    }
    let (host, _) = source.split_once(":/")?;
    // An IPv6 address goes in brackets: `fd00::5:/x` is ambiguous.
    if host.contains(':') {
        return None;
    }
    Some((host, &source[host.len() + 1..]))
}

/// Mount options, split the way mount(8) splits them: the generic ones
/// become `mount(2)` flags, the rest is the file system's data string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Generic options, in order.
    pub flags: Vec<Flag>,
    /// The rest, comma-joined, for the file system.
    pub data: Vec<String>,
}

/// A generic mount option: sets or clears one `MS_*` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag {
    pub name: &'static str,
    /// The flag's bit name, as nix spells `MsFlags`.
    pub bit: &'static str,
    pub set: bool,
}

const FLAGS: [(&str, &str, bool); 16] = [
    ("ro", "MS_RDONLY", true),
    ("rw", "MS_RDONLY", false),
    ("nosuid", "MS_NOSUID", true),
    ("suid", "MS_NOSUID", false),
    ("nodev", "MS_NODEV", true),
    ("dev", "MS_NODEV", false),
    ("noexec", "MS_NOEXEC", true),
    ("exec", "MS_NOEXEC", false),
    ("sync", "MS_SYNCHRONOUS", true),
    ("async", "MS_SYNCHRONOUS", false),
    ("noatime", "MS_NOATIME", true),
    ("nodiratime", "MS_NODIRATIME", true),
    ("relatime", "MS_RELATIME", true),
    ("strictatime", "MS_STRICTATIME", true),
    ("dirsync", "MS_DIRSYNC", true),
    ("lazytime", "MS_LAZYTIME", true),
];

/// Options that would make the mount something else than the declaration
/// says: another mount's change, a bind, or zone-mounts' own business.
const REFUSED: [(&str, &str); 9] = [
    ("remount", "changes another mount"),
    ("bind", "use type `bind`"),
    ("rbind", "use type `bind`"),
    ("move", "moves another mount"),
    (
        "defaults",
        "means nothing to mount(2); leave the options empty",
    ),
    ("auto", "is an fstab option"),
    ("noauto", "is an fstab option"),
    ("user", "is an fstab option"),
    ("addr", "is set by zone-mounts from the source's host"),
];

impl Options {
    /// Parses `a,b=c`; refuses anything that could smuggle a second option
    /// list or a second mount.
    pub fn parse(text: &str) -> Result<Options, Invalid> {
        let mut out = Options::default();
        if text.is_empty() {
            return Ok(out);
        }
        if text.len() > 1024 {
            return Err(invalid("options", "longer than 1024 bytes"));
        }
        for (i, item) in text.split(',').enumerate() {
            let bad = |why: String| {
                invalid(
                    "options",
                    format!("option {} `{}`: {why}", i + 1, item.escape_debug()),
                )
            };
            if item.is_empty() {
                return Err(bad("empty (two commas, or one at an end)".into()));
            }
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (item, None),
            };
            if key.is_empty()
                || !key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b))
                || key.starts_with('-')
            {
                return Err(bad(
                    "the name must be lowercase letters, digits, `_` and `-`, not starting with `-`"
                        .into(),
                ));
            }
            if let Some(v) = value {
                if v.is_empty()
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-:/@+".contains(&b))
                {
                    return Err(bad(
                        "the value must be letters, digits and `._-:/@+` (no spaces, quotes, `=` or commas)"
                            .into(),
                    ));
                }
            }
            if let Some((_, why)) = REFUSED.iter().find(|(k, _)| *k == key) {
                return Err(bad((*why).into()));
            }
            match FLAGS.iter().find(|(k, _, _)| *k == key) {
                Some(&(name, bit, set)) if value.is_none() => {
                    out.flags.push(Flag { name, bit, set })
                }
                Some(_) => return Err(bad("takes no value".into())),
                None => out.data.push(item.to_owned()),
            }
        }
        Ok(out)
    }

    /// Whether the last word on `ro`/`rw` is `ro`.
    pub fn read_only(&self) -> bool {
        self.flags
            .iter()
            .rev()
            .find(|f| f.bit == "MS_RDONLY")
            .is_some_and(|f| f.set)
    }
}

/// Whether a datastore in `state` is as it should be on a server: mounted
/// and answering, or, for an `exclusive` one, also not mounted (it is
/// mounted on the lease holder alone, once fenced; away from it, and on
/// the holder until then, unmounted is its normal state, and zone-mounts
/// reports it failed when its device is missing).
pub fn healthy(state: DatastoreState, exclusive: bool) -> bool {
    state == DatastoreState::Mounted || (exclusive && state == DatastoreState::Unmounted)
}

/// The systemd unit name of a mount on `target` (an absolute path in
/// normal form, as [`check`] lets through), as `systemd-escape --path
/// --suffix=mount` spells it: slashes become `-`; bytes other than ASCII
/// letters, digits, `:`, `_` and `.` (and a leading `.`) become `\xNN`.
pub fn mount_unit_name(target: &str) -> String {
    let trimmed = target.trim_matches('/');
    if trimmed.is_empty() {
        return "-.mount".to_owned();
    }
    let mut out = String::with_capacity(trimmed.len() + 6);
    for (i, b) in trimmed.bytes().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b if b.is_ascii_alphanumeric() || b":_.".contains(&b) => out.push(b as char),
            b => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push_str(".mount");
    out
}

/// The first line of every unit file zone-mounts writes: how it tells its
/// own files from others in the units directory.
pub const UNIT_HEADER: &str = "# Written by zone-mounts: an exclusive datastore of the zone.";

/// A file zone-vip makes on the lease holder once the old holder is
/// fenced, just before it mounts the exclusive datastores, and removes
/// before it unmounts them. Every exclusive datastore's mount unit asserts
/// it: started any other way (a unit's `RequiresMountsFor=`, an operator's
/// `systemctl start`) on a server that is not the fenced holder, the
/// mount fails, and so do the units that require it.
pub const FENCED_FLAG: &str = "/run/zone-vip/fenced";

/// The systemd mount unit of exclusive datastore `ds`: zone-vip starts it
/// on the lease holder once the old holder is fenced, and stops it (after
/// the leader-only units) when the lease ends. Nothing else pulls it in: no
/// `[Install]` section, so it is never mounted at boot.
pub fn mount_unit_text(ds: &Datastore) -> String {
    let mut t = format!(
        "{UNIT_HEADER}\n\
         # Mounted on the lease holder alone, by zone-vip, after the fence delay;\n\
         # not by hand: another server may hold it. `zonectl storage rm {name}` removes it.\n\
         [Unit]\n\
         Description=Zoned exclusive datastore {name} (on the lease holder only)\n\
         AssertPathExists={FENCED_FLAG}\n\
         \n\
         [Mount]\n\
         What={source}\n\
         Where={target}\n\
         Type={ty}\n",
        name = ds.name,
        source = ds.source,
        target = ds.target,
        ty = ds.r#type,
    );
    if !ds.options.is_empty() {
        t.push_str(&format!("Options={}\n", ds.options));
    }
    // Time for a journal replay after the old holder died; an unmount
    // that hangs meanwhile is cut short by the watchdog (zone-vip stops
    // petting it with the lease).
    t.push_str("TimeoutSec=90\n");
    t
}

/// The state's name as zonectl prints it.
pub fn state_name(state: DatastoreState) -> &'static str {
    match state {
        DatastoreState::Mounted => "mounted",
        DatastoreState::Probing => "probing",
        DatastoreState::Hung => "hung",
        DatastoreState::Failed => "failed",
        DatastoreState::Unmounted => "unmounted",
        DatastoreState::Unspecified => "unknown",
    }
}

#[cfg(test)]
mod tests;
