//! A test zone's certificates: a zone CA made for the test, node
//! certificates written where each server's `[tls] dir` points, and client
//! credentials of any role, on disk (for the zonectl binary) or in memory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zonectl::zone_pki::{Role, ZoneCa};
use zonectl::Credentials;

#[derive(Debug)]
pub struct TestPki {
    pub ca: ZoneCa,
    /// Where the files go: `server-<id>/`, `user-<name>/`.
    pub dir: PathBuf,
    admin: Credentials,
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl TestPki {
    /// A new zone CA, its files under `dir`, and an admin credential
    /// (`user-admin/`).
    pub fn new(dir: &Path) -> TestPki {
        let ca = ZoneCa::generate().expect("a zone CA");
        std::fs::create_dir_all(dir).unwrap();
        write(&dir.join("ca.pem"), ca.cert_pem(), 0o644);
        let admin_dir = TestPki::write_user(&ca, dir, "admin", Role::Admin);
        let admin = Credentials::from_dir(&admin_dir, "the test zone's admin").unwrap();
        TestPki {
            ca,
            dir: dir.to_owned(),
            admin,
        }
    }

    fn write_user(ca: &ZoneCa, dir: &Path, name: &str, role: Role) -> PathBuf {
        let c = ca.issue_client(name, role).expect("a client credential");
        let d = dir.join(format!("user-{name}"));
        std::fs::create_dir_all(&d).unwrap();
        write(&d.join("ca.pem"), ca.cert_pem(), 0o644);
        write(&d.join("client.pem"), &c.cert_pem, 0o644);
        write(&d.join("client.key"), &c.key_pem, 0o600);
        d
    }

    /// Writes server `id`'s node certificate (`ca.pem`, `node.pem`,
    /// `node.key`), once; returns its directory, for `[tls] dir`.
    pub fn server(&self, id: u64) -> PathBuf {
        let d = self.dir.join(format!("server-{id}"));
        if d.join("node.pem").exists() {
            return d;
        }
        let c = self.ca.issue_node(id, &[]).expect("a node certificate");
        std::fs::create_dir_all(&d).unwrap();
        write(&d.join("ca.pem"), self.ca.cert_pem(), 0o644);
        write(&d.join("node.pem"), &c.cert_pem, 0o644);
        write(&d.join("node.key"), &c.key_pem, 0o600);
        d
    }

    /// Replaces server `id`'s node certificate (and key) with one valid for
    /// `life` of which only `left` remains; returns its directory.
    pub fn server_expiring(
        &self,
        id: u64,
        left: std::time::Duration,
        life: std::time::Duration,
    ) -> PathBuf {
        let d = self.server(id);
        let now = time::OffsetDateTime::now_utc();
        let c = self
            .ca
            .issue_node_between(id, now + left - life, now + left)
            .expect("a node certificate");
        write(&d.join("node.pem"), &c.cert_pem, 0o644);
        write(&d.join("node.key"), &c.key_pem, 0o600);
        d
    }

    /// [`TestPki::server`], with the zone CA's key beside it, as `zonectl
    /// zone init` gives a founder.
    pub fn founder(&self, id: u64) -> PathBuf {
        let d = self.server(id);
        write(&d.join("ca.key"), self.ca.key_pem(), 0o600);
        d
    }

    /// A client credential for `name` with `role`, on disk: its directory,
    /// for `zonectl --credentials`.
    pub fn user_dir(&self, name: &str, role: Role) -> PathBuf {
        TestPki::write_user(&self.ca, &self.dir, name, role)
    }

    /// A client credential for `name` with `role`.
    pub fn user(&self, name: &str, role: Role) -> Credentials {
        Credentials::from_dir(&self.user_dir(name, role), "a test credential").unwrap()
    }

    /// The admin credential.
    pub fn admin(&self) -> &Credentials {
        &self.admin
    }

    /// The admin credential's directory.
    pub fn admin_dir(&self) -> PathBuf {
        self.dir.join("user-admin")
    }
}
