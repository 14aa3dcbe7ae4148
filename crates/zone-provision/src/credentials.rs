//! The server's certificates, carried beside the identity: the files of
//! `zonectl zone init`'s `server-N/` directory (`ca.pem`, `node.pem`,
//! `node.key`, and `ca.key` for a founder), in `zoned/tls/` on the EFI
//! partition or as QEMU `-fw_cfg name=opt/zoned/tls/<file>` entries (the
//! latter win, file by file, as for the identity). They are checked against
//! the identity (the node certificate must name its id), installed where
//! zoned reads them, and, where the CA's key is at hand, used to issue
//! this server's local admin credential for zonectl on the console.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use zone_pki::{Holder, Role, ZoneCa};

/// The files, whether each is required, and its mode once installed.
pub const FILES: [(&str, bool, u32); 4] = [
    ("ca.pem", true, 0o644),
    ("node.pem", true, 0o644),
    ("node.key", true, 0o600),
    ("ca.key", false, 0o600),
];

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("no certificates for this server: copy `zonectl zone init`'s server-<id>/ files (ca.pem, node.pem, node.key, ca.key) to {efi} on the EFI partition, or give each to QEMU as -fw_cfg name=opt/zoned/tls/<file>,file=...; zoned speaks TLS only")]
    Missing { efi: PathBuf },
    #[error("{0}: cannot read: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("the server's certificates are incomplete: {missing} missing ({found} found in {sources}); copy all of `zonectl zone init`'s server-<id>/ directory")]
    Incomplete {
        missing: String,
        found: String,
        sources: String,
    },
    #[error("the server's certificates: {0}")]
    Certificate(#[from] zone_pki::PkiError),
    #[error("the server's certificate node.pem is {found}'s, but the identity says id {id}: copy server-{id}/ from `zonectl zone init`")]
    NotMine { found: String, id: u64 },
    #[error("{0}: cannot write: {1}")]
    Write(PathBuf, std::io::Error),
}

/// The credential files found, by name, and where each came from.
#[derive(Debug, Default)]
pub struct Found {
    pub files: BTreeMap<&'static str, String>,
    pub sources: Vec<String>,
}

fn read_optional(path: &Path) -> Result<Option<String>, CredentialError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CredentialError::Read(path.to_owned(), e)),
    }
}

/// Reads the files from `efi_dir` (`zoned/tls` on the EFI partition), then
/// `fw_cfg_dir` (each file at `<dir>/<name>/raw`). An error names what is
/// missing, none found included.
pub fn gather(efi_dir: &Path, fw_cfg_dir: &Path) -> Result<Found, CredentialError> {
    let mut found = Found::default();
    for (dir, raw, label) in [
        (efi_dir, false, "the EFI partition"),
        (fw_cfg_dir, true, "fw_cfg"),
    ] {
        let mut any = false;
        for (name, _, _) in FILES {
            let path = if raw {
                dir.join(name).join("raw")
            } else {
                dir.join(name)
            };
            if let Some(text) = read_optional(&path)? {
                found.files.insert(name, text);
                any = true;
            }
        }
        if any {
            found.sources.push(label.to_owned());
        }
    }
    if found.files.is_empty() {
        return Err(CredentialError::Missing {
            efi: efi_dir.to_owned(),
        });
    }
    let missing: Vec<&str> = FILES
        .iter()
        .filter(|(name, required, _)| *required && !found.files.contains_key(name))
        .map(|(name, _, _)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(CredentialError::Incomplete {
            missing: missing.join(", "),
            found: found.files.keys().copied().collect::<Vec<_>>().join(", "),
            sources: found.sources.join(" and "),
        });
    }
    Ok(found)
}

impl Found {
    fn get(&self, name: &str) -> &str {
        self.files.get(name).map(String::as_str).unwrap_or_default()
    }

    /// The node certificate must be of the zone CA, valid now, and name
    /// server `id`; the CA's key, if given, must be the CA's.
    pub fn check(&self, id: u64) -> Result<Option<ZoneCa>, CredentialError> {
        match zone_pki::verify(self.get("ca.pem"), self.get("node.pem"), "node.pem")? {
            Holder::Server(found) if found == id => {}
            Holder::Server(found) => {
                return Err(CredentialError::NotMine {
                    found: format!("server {found}"),
                    id,
                })
            }
            Holder::User { name, .. } => {
                return Err(CredentialError::NotMine {
                    found: format!("user {name}"),
                    id,
                })
            }
        }
        match self.files.get("ca.key") {
            Some(key) => Ok(Some(ZoneCa::load(self.get("ca.pem"), key)?)),
            None => Ok(None),
        }
    }
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> Result<(), CredentialError> {
    let path = dir.join(name);
    zone_files::atomic::write(&path, text.as_bytes(), mode, None)
        .map_err(|e| CredentialError::Write(path.clone(), e))
}

fn private_dir(dir: &Path) -> Result<(), CredentialError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| CredentialError::Write(dir.to_owned(), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| CredentialError::Write(dir.to_owned(), e))
}

/// Whether `dir` holds a renewal of the given node certificate: zoned
/// renews it in place ([`install`]'s directory) before it expires, and
/// the files on the EFI partition stay as `zonectl zone init` made them.
/// A renewal is a certificate of the given zone CA for server `id`, for
/// the given key, that expires later.
fn renewed(found: &Found, dir: &Path, id: u64) -> bool {
    let Ok(there) = std::fs::read_to_string(dir.join("node.pem")) else {
        return false;
    };
    let ours = |pem: &str| zone_pki::facts_pem(pem);
    let key = zone_pki::JoinKey::from_pem(found.get("node.key")).map(|k| k.public_key());
    match (ours(&there), ours(found.get("node.pem")), key) {
        (Some(t), Some(g), Ok(key)) => {
            t.public_key == key
                && t.not_after_unix > g.not_after_unix
                && zone_pki::verify(found.get("ca.pem"), &there, "node.pem")
                    .is_ok_and(|h| h == Holder::Server(id))
        }
        _ => false,
    }
}

/// Installs the files into `dir` (made 0700; keys 0600), for zoned's
/// `[tls] dir`: on the data partition, where zoned renews its node
/// certificate. A renewal found there is kept (and said so: true); any
/// other file is replaced by the one given.
pub fn install(found: &Found, dir: &Path, id: u64) -> Result<bool, CredentialError> {
    private_dir(dir)?;
    let keep = renewed(found, dir, id);
    for (name, _, mode) in FILES {
        if keep && name == "node.pem" {
            continue;
        }
        match found.files.get(name) {
            Some(text) => write(dir, name, text, mode)?,
            None => {
                let _ = std::fs::remove_file(dir.join(name));
            }
        }
    }
    Ok(keep)
}

/// Whether `dir` holds a local admin credential of the zone `ca` that is
/// valid for 30 days more: kept, not issued again.
pub fn local_admin_holds(ca: &ZoneCa, dir: &Path) -> bool {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let (Some(cert), Some(_key)) = (read("client.pem"), read("client.key")) else {
        return false;
    };
    let month = 30 * 86_400;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    matches!(
        zone_pki::verify(ca.cert_pem(), &cert, "the local admin credential"),
        Ok(Holder::User {
            role: Role::Admin,
            ..
        })
    ) && zone_pki::facts_pem(&cert).is_some_and(|f| f.not_after_unix > now + month)
}

/// Issues this server's local admin credential (`local-admin-<id>`) into
/// `dir` (`ca.pem`, `client.pem`, `client.key`: where zonectl looks on
/// the appliance). Whoever is root here holds the CA's key already; this
/// only saves them making one by hand.
pub fn issue_local_admin(ca: &ZoneCa, id: u64, dir: &Path) -> Result<(), CredentialError> {
    let c = ca.issue_client(&format!("local-admin-{id}"), Role::Admin)?;
    private_dir(dir)?;
    write(dir, "ca.pem", ca.cert_pem(), 0o644)?;
    write(dir, "client.pem", &c.cert_pem, 0o644)?;
    write(dir, "client.key", &c.key_pem, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn fw_cfg_files_win_and_a_wrong_or_partial_set_is_named() {
        let d = tempfile::tempdir().unwrap();
        let (efi, fw) = (d.path().join("efi"), d.path().join("fw"));
        let e = gather(&efi, &fw).unwrap_err().to_string();
        assert!(e.contains("no certificates for this server"), "{e}");
        let ca = ZoneCa::generate().unwrap();
        let two = ca.issue_node(2, &[]).unwrap();
        let three = ca.issue_node(3, &[]).unwrap();
        put(&efi, "ca.pem", ca.cert_pem());
        put(&efi, "node.pem", &three.cert_pem);
        let e = gather(&efi, &fw).unwrap_err().to_string();
        assert!(e.contains("node.key missing"), "{e}");
        put(&efi, "node.key", &three.key_pem);
        // fw_cfg gives server 2's certificate and key: they win.
        put(&fw.join("node.pem"), "raw", &two.cert_pem);
        put(&fw.join("node.key"), "raw", &two.key_pem);
        let found = gather(&efi, &fw).unwrap();
        assert_eq!(found.sources, ["the EFI partition", "fw_cfg"]);
        assert!(found.check(2).unwrap().is_none(), "no CA key given");
        let e = found.check(3).unwrap_err().to_string();
        assert!(e.contains("server 2's, but the identity says id 3"), "{e}");
        // With the CA's key: installed, and a local admin issued.
        put(&efi, "ca.key", ca.key_pem());
        let found = gather(&efi, &fw).unwrap();
        let ca2 = found.check(2).unwrap().expect("the CA's key");
        let out = d.path().join("run");
        assert!(!install(&found, &out.join("tls"), 2).unwrap());
        assert!(!local_admin_holds(&ca2, &out.join("admin")));
        issue_local_admin(&ca2, 2, &out.join("admin")).unwrap();
        assert!(
            local_admin_holds(&ca2, &out.join("admin")),
            "kept at the next boot"
        );
        assert!(
            !local_admin_holds(&ZoneCa::generate().unwrap(), &out.join("admin")),
            "another zone's: issued again"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out.join("tls")), 0o700);
        assert_eq!(mode(&out.join("tls/node.key")), 0o600);
        assert_eq!(mode(&out.join("tls/ca.key")), 0o600);
        let admin = std::fs::read_to_string(out.join("admin/client.pem")).unwrap();
        assert_eq!(
            zone_pki::verify(ca.cert_pem(), &admin, "admin").unwrap(),
            Holder::User {
                name: "local-admin-2".into(),
                role: Role::Admin
            }
        );
    }

    /// zoned renewed its certificate in the installed directory: the next
    /// boot keeps the renewal, not the older one from the EFI partition;
    /// anything else there is replaced.
    #[test]
    fn a_renewed_node_certificate_survives_the_next_boot() {
        let d = tempfile::tempdir().unwrap();
        let (efi, fw, tls) = (
            d.path().join("efi"),
            d.path().join("fw"),
            d.path().join("tls"),
        );
        let ca = ZoneCa::generate().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let given = ca
            .issue_node_between(
                2,
                now - time::Duration::days(300),
                now + time::Duration::days(65),
            )
            .unwrap();
        put(&efi, "ca.pem", ca.cert_pem());
        put(&efi, "node.pem", &given.cert_pem);
        put(&efi, "node.key", &given.key_pem);
        let found = gather(&efi, &fw).unwrap();
        assert!(!install(&found, &tls, 2).unwrap());
        let key = zone_pki::JoinKey::from_pem(&given.key_pem).unwrap();
        let renewal = ca.issue_node_for(2, &[], &key.public_key()).unwrap();
        std::fs::write(tls.join("node.pem"), &renewal.cert_pem).unwrap();
        assert!(install(&found, &tls, 2).unwrap());
        assert_eq!(
            std::fs::read_to_string(tls.join("node.pem")).unwrap(),
            renewal.cert_pem
        );
        // Not a renewal: another key's certificate, another server's, or
        // another zone's. The given one replaces it.
        let other_key = ca.issue_node(2, &[]).unwrap();
        let other_server = ca.issue_node_for(3, &[], &key.public_key()).unwrap();
        let other_zone = ZoneCa::generate()
            .unwrap()
            .issue_node_for(2, &[], &key.public_key())
            .unwrap();
        for stranger in [other_key, other_server, other_zone] {
            std::fs::write(tls.join("node.pem"), &stranger.cert_pem).unwrap();
            assert!(!install(&found, &tls, 2).unwrap());
            assert_eq!(
                std::fs::read_to_string(tls.join("node.pem")).unwrap(),
                given.cert_pem
            );
        }
    }
}
