//! A client credential of a zone, and where zonectl finds one.
//!
//! A credential is three PEM files: the zone CA's certificate (`ca.pem`,
//! what the servers' certificates are checked against), the client
//! certificate (`client.pem`, naming a user and a role) and its key
//! (`client.key`), as `zonectl zone init` writes them under `admin/` and
//! `zonectl user issue` writes them for others.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use zone_pki::Holder;

/// Where zonectl looks for a credential when none is named, in order. The
/// first is the local development zone of `cargo xtask cluster up`, found
/// beside a zonectl built in the same cargo target directory.
pub fn default_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    // A cargo target directory holds CACHEDIR.TAG: an installed zonectl
    // (/usr/bin) looks at no such place.
    if let Some(target) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf))
        .filter(|t| t.join("CACHEDIR.TAG").exists())
    {
        dirs.push(target.join(LOCAL_ZONE).join("admin"));
    }
    if let Some(config) = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
    {
        dirs.push(config.join("zonectl"));
    }
    dirs.push(PathBuf::from("/etc/zoned/admin"));
    dirs
}

/// How long a client waits for a server's side of the TLS handshake.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// The directory under a cargo target directory that holds the local
/// development zone's certificates (`cargo xtask cluster up`).
pub const LOCAL_ZONE: &str = "local-zone";

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{flag}: cannot read {path}: {source}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} needs --cacert too (the zone CA's certificate, to check the servers by)")]
    NoCa(&'static str),
    #[error("--cert and --key go together")]
    Half,
    #[error("the client credential {path} expired (or is not valid yet); ask an admin of the zone for a new one (`zonectl user issue`)")]
    Expired { path: PathBuf },
    #[error("the client credential {path}: {why}")]
    Bad { path: PathBuf, why: String },
}

/// A client credential, checked when loaded (signed by its CA, valid now,
/// naming a user).
#[derive(Clone)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// Where it was read from, for messages.
    pub source: PathBuf,
    /// The user and role it names.
    pub holder: Holder,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("source", &self.source)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

fn read(flag: &'static str, path: &Path) -> Result<String, CredentialError> {
    std::fs::read_to_string(path).map_err(|source| CredentialError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

impl Credentials {
    /// From PEM text already read (tests, tools holding a zone in memory).
    pub fn from_pem(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        source: &Path,
    ) -> Result<Credentials, CredentialError> {
        let holder = match zone_pki::verify(ca_pem, cert_pem, &source.display().to_string()) {
            Ok(h) => h,
            Err(zone_pki::PkiError::Expired(_)) => {
                return Err(CredentialError::Expired {
                    path: source.to_owned(),
                })
            }
            Err(e) => {
                return Err(CredentialError::Bad {
                    path: source.to_owned(),
                    why: e.to_string(),
                })
            }
        };
        Ok(Credentials {
            ca_pem: ca_pem.to_owned(),
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            source: source.to_owned(),
            holder,
        })
    }

    /// `ca.pem`, `client.pem` and `client.key` in `dir`.
    pub fn from_dir(dir: &Path, flag: &'static str) -> Result<Credentials, CredentialError> {
        Credentials::from_files(
            &dir.join("ca.pem"),
            &dir.join("client.pem"),
            &dir.join("client.key"),
            flag,
        )
    }

    pub fn from_files(
        ca: &Path,
        cert: &Path,
        key: &Path,
        flag: &'static str,
    ) -> Result<Credentials, CredentialError> {
        Credentials::from_pem(
            &read(flag, ca)?,
            &read(flag, cert)?,
            &read(flag, key)?,
            cert,
        )
    }

    /// Resolves what the user named, in this order: `--cert`/`--key`
    /// (with `--cacert`), `--credentials DIR`, then the first of
    /// [`default_dirs`] holding a `client.pem`. None if nothing was named
    /// and no default exists.
    pub fn resolve(
        cacert: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        dir: Option<&Path>,
    ) -> Result<Option<Credentials>, CredentialError> {
        match (cert, key) {
            (Some(cert), Some(key)) => {
                let ca = cacert.ok_or(CredentialError::NoCa("--cert"))?;
                return Credentials::from_files(ca, cert, key, "--cert").map(Some);
            }
            (None, None) => {}
            _ => return Err(CredentialError::Half),
        }
        if let Some(dir) = dir {
            return Credentials::from_dir(dir, "--credentials").map(Some);
        }
        for dir in default_dirs() {
            if dir.join("client.pem").exists() {
                return Credentials::from_dir(&dir, "the default credentials").map(Some);
            }
        }
        Ok(None)
    }

    /// TLS toward any server of the zone: its certificate must be signed
    /// by the zone CA and be a server's ([`zone_pki::ANY_SERVER`]). A
    /// server that does not finish the handshake within
    /// [`HANDSHAKE_TIMEOUT`] is given up: a frozen server's kernel accepts
    /// the connection, and nothing else would time the handshake out.
    pub fn tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(zone_pki::ANY_SERVER)
            .timeout(HANDSHAKE_TIMEOUT)
    }
}
