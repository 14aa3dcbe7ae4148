//! `zonectl zone init`: a new zone's certificates, made on the operator's
//! machine before the servers are flashed (see README, "Security").
//!
//! Each founder gets the zone CA's certificate and key beside its own node
//! certificate: any server can then sign a joiner's certificate and renew
//! its own, with no machine outside the zone holding a key it depends on.
//! The price, as on a Kubernetes control-plane node: a stolen server disk
//! gives the zone away, and the zone's CA must then be replaced.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use zone_pki::{Role, ZoneCa};

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// How many founding servers: their ids are 1 to N.
    #[arg(long)]
    pub servers: u64,
    /// Directory to write; it must not exist, or be empty. Written whole or
    /// not at all.
    #[arg(long)]
    pub out: PathBuf,
    /// A founder's address, put in its certificate: ID=IP, once per address
    /// (e.g. --address 1=192.0.2.11). Without it, a server is named by its
    /// id alone, which is what peers check.
    #[arg(long = "address", value_name = "ID=IP")]
    pub addresses: Vec<String>,
}

/// The most founders a zone may have (Raft zones of 3 or 5; 7 at most).
const MAX_FOUNDERS: u64 = 7;

fn parse_address(s: &str, servers: u64) -> anyhow::Result<(u64, IpAddr)> {
    let (id, ip) = s
        .split_once('=')
        .with_context(|| format!("--address {s:?}: expected ID=IP, e.g. 1=192.0.2.11"))?;
    let id: u64 = id
        .trim()
        .parse()
        .with_context(|| format!("--address {s:?}: {id:?} is not a server id"))?;
    if id == 0 || id > servers {
        bail!("--address {s:?}: server {id} is not a founder (1 to {servers})");
    }
    let ip: IpAddr = ip
        .trim()
        .parse()
        .with_context(|| format!("--address {s:?}: {ip:?} is not an IP address"))?;
    Ok((id, ip))
}

/// Whether `out` (an `--out` directory) is absent or empty: credentials
/// are never written over anything.
pub fn empty_or_absent(out: &Path) -> anyhow::Result<bool> {
    if !out.exists() {
        return Ok(true);
    }
    Ok(std::fs::read_dir(out)
        .with_context(|| format!("--out {}", out.display()))?
        .next()
        .is_none())
}

/// Writes `text` to `path`, readable by its owner alone if `secret`.
fn write(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn mkdir(path: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

/// What `init` made, for the summary.
#[derive(Debug, serde::Serialize)]
pub struct Made {
    pub out: PathBuf,
    pub ca_fingerprint: String,
    pub servers: Vec<u64>,
}

/// Makes the zone's CA, a node certificate per founder and an admin
/// credential under `args.out`.
pub fn init(args: &InitArgs) -> anyhow::Result<Made> {
    if args.servers == 0 || args.servers > MAX_FOUNDERS {
        bail!(
            "--servers {}: a zone is founded by 1 to {MAX_FOUNDERS} servers (3 or 5 for high availability)",
            args.servers
        );
    }
    let mut addresses: Vec<Vec<IpAddr>> = vec![Vec::new(); args.servers as usize];
    for a in &args.addresses {
        let (id, ip) = parse_address(a, args.servers)?;
        addresses[(id - 1) as usize].push(ip);
    }
    let out = &args.out;
    if !empty_or_absent(out)? {
        bail!(
            "--out {}: not empty; nothing was written (a zone's keys are never overwritten)",
            out.display()
        );
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .with_context(|| format!("--out {}: not a directory name", out.display()))?;
    // Everything goes to a directory beside, renamed into place at the end:
    // an interrupted run leaves no half-made zone under --out.
    let tmp = parent.join(format!(
        ".{}.zonectl-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    mkdir(&tmp)?;
    let made = (|| -> anyhow::Result<String> {
        let ca = ZoneCa::generate()?;
        write(&tmp.join("ca.pem"), ca.cert_pem(), false)?;
        for id in 1..=args.servers {
            let dir = tmp.join(format!("server-{id}"));
            mkdir(&dir)?;
            let node = ca.issue_node(id, &addresses[(id - 1) as usize])?;
            write(&dir.join("ca.pem"), ca.cert_pem(), false)?;
            write(&dir.join("ca.key"), ca.key_pem(), true)?;
            write(&dir.join("node.pem"), &node.cert_pem, false)?;
            write(&dir.join("node.key"), &node.key_pem, true)?;
        }
        let dir = tmp.join("admin");
        mkdir(&dir)?;
        let admin = ca.issue_client("admin", Role::Admin)?;
        write(&dir.join("ca.pem"), ca.cert_pem(), false)?;
        write(&dir.join("client.pem"), &admin.cert_pem, false)?;
        write(&dir.join("client.key"), &admin.key_pem, true)?;
        Ok(ca.fingerprint())
    })();
    let fingerprint = match made {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    // rename(2) replaces an empty directory.
    if let Err(e) = std::fs::rename(&tmp, out) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| format!("cannot move the new zone to {}", out.display()));
    }
    Ok(Made {
        out: out.clone(),
        ca_fingerprint: fingerprint,
        servers: (1..=args.servers).collect(),
    })
}

/// The summary printed after `init`.
pub fn describe(m: &Made) -> String {
    let mut rows = vec![(
        "ca.pem".to_string(),
        "the zone CA's certificate (public)".to_string(),
    )];
    for id in &m.servers {
        rows.push((
            format!("server-{id}/"),
            format!("server {id}: node.pem, node.key, and the zone CA (ca.pem, ca.key)"),
        ));
    }
    rows.push((
        "admin/".into(),
        "zonectl's admin credential: client.pem, client.key, ca.pem".into(),
    ));
    let mut s = format!(
        "zone CA {}\nwritten to {}:\n",
        m.ca_fingerprint,
        m.out.display()
    );
    for (name, what) in rows {
        s.push_str(&format!("  {name:<11}  {what}\n"));
    }
    s.push_str("Keys are readable by their owner alone. Each server-N/ holds the zone CA's key: keep these\ndirectories as secret as the servers' disks, and delete them once the servers have them.\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use zone_pki::{verify, Holder};

    fn args(out: &Path, servers: u64, addresses: &[&str]) -> InitArgs {
        InitArgs {
            servers,
            out: out.to_path_buf(),
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn read(p: PathBuf) -> String {
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn init_writes_a_ca_a_node_per_founder_and_an_admin_with_secret_keys() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("zone");
        let made = init(&args(&out, 3, &["1=10.0.0.11", "2=fd00::12"])).unwrap();
        assert_eq!(made.servers, vec![1, 2, 3]);
        let ca = read(out.join("ca.pem"));
        for id in 1..=3u64 {
            let s = out.join(format!("server-{id}"));
            assert_eq!(read(s.join("ca.pem")), ca);
            assert_eq!(
                verify(&ca, &read(s.join("node.pem")), "node").unwrap(),
                Holder::Server(id)
            );
            let loaded = ZoneCa::load(&ca, &read(s.join("ca.key"))).unwrap();
            assert_eq!(loaded.fingerprint(), made.ca_fingerprint);
        }
        assert_eq!(
            verify(&ca, &read(out.join("admin/client.pem")), "admin").unwrap(),
            Holder::User {
                name: "admin".into(),
                role: Role::Admin
            }
        );
        for secret in ["server-1/ca.key", "server-1/node.key", "admin/client.key"] {
            let mode = std::fs::metadata(out.join(secret))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{secret}");
        }
        let mode = std::fs::metadata(out.join("server-2"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        // Nothing is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("zone")]);
        assert!(describe(&made).contains(&made.ca_fingerprint));
    }

    #[test]
    fn init_refuses_bad_input_and_never_overwrites_a_zone() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("zone");
        let err = |a: InitArgs| format!("{:#}", init(&a).unwrap_err());
        assert!(err(args(&out, 0, &[])).starts_with("--servers 0"));
        assert!(err(args(&out, 8, &[])).starts_with("--servers 8"));
        assert!(err(args(&out, 3, &["4=10.0.0.4"])).contains("server 4 is not a founder"));
        assert!(err(args(&out, 3, &["1"])).contains("expected ID=IP"));
        assert!(err(args(&out, 3, &["1=ten"])).contains("is not an IP address"));
        assert!(!out.exists(), "bad input wrote something");
        // An empty directory is filled; a full one is left alone.
        std::fs::create_dir(&out).unwrap();
        init(&args(&out, 1, &[])).unwrap();
        let before = read(out.join("ca.pem"));
        assert!(err(args(&out, 1, &[])).contains("not empty; nothing was written"));
        assert_eq!(read(out.join("ca.pem")), before);
    }
}
