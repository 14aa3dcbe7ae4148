//! The `[files]` section of zoned's `node.toml`: zoned enforces it on every
//! push, zone-sync obeys its roots and local root on its server, and both
//! read it with this one definition.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::paths::{Roots, DEFAULT_ROOT};
use crate::policy::Policy;
use crate::{invalid, FileError};

/// Managed configuration files (`zonectl config`, zone-sync).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesSection {
    /// Only files under these directories can be pushed. Default
    /// `["/etc/zoned/managed"]`; add such as `/etc/one`.
    pub managed_roots: Vec<String>,
    /// Largest file in bytes. Default 1 MiB.
    pub max_file_bytes: u64,
    /// All managed files together, in bytes. Default 128 MiB.
    pub max_total_bytes: u64,
    /// Versions kept per file for `history` and `rollback`. Default 20.
    pub history_per_file: usize,
    /// The filesystem the managed paths live in on this server: zone-sync
    /// writes under it (unless given `--root`), and `zonectl config diff`
    /// and `import` read this server's copies under it. Default `/`; tests
    /// and development clusters use a directory of their own.
    pub local_root: PathBuf,
}

impl Default for FilesSection {
    fn default() -> Self {
        FilesSection {
            managed_roots: vec![DEFAULT_ROOT.to_owned()],
            max_file_bytes: 1 << 20,
            max_total_bytes: 128 << 20,
            history_per_file: 20,
            local_root: PathBuf::from("/"),
        }
    }
}

impl FilesSection {
    /// Checks every field; the error names the first bad one
    /// (`files.<field>`).
    pub fn check(&self) -> Result<Roots, FileError> {
        let roots = Roots::new(&self.managed_roots)
            .map_err(|e| invalid("files.managed_roots", e.to_string()))?;
        if self.max_file_bytes == 0 || self.max_file_bytes > 16 << 20 {
            return Err(invalid(
                "files.max_file_bytes",
                "must be between 1 and 16 MiB",
            ));
        }
        if self.max_total_bytes < self.max_file_bytes {
            return Err(invalid(
                "files.max_total_bytes",
                "must be at least files.max_file_bytes",
            ));
        }
        if self.history_per_file == 0 {
            return Err(invalid("files.history_per_file", "must be at least 1"));
        }
        if !self.local_root.is_absolute() {
            return Err(invalid(
                "files.local_root",
                format!("`{}` must be an absolute path", self.local_root.display()),
            ));
        }
        Ok(roots)
    }

    /// The push policy of a checked section.
    pub fn policy(&self) -> Result<Policy, FileError> {
        Ok(Policy {
            roots: self.check()?,
            max_file_bytes: self.max_file_bytes,
            max_total_bytes: self.max_total_bytes,
            history_per_file: self.history_per_file,
            local_root: self.local_root.clone(),
        })
    }
}

/// Why `[files]` could not be read from a `node.toml`.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: FileError,
    },
}

/// The `[files]` section of the `node.toml` at `path`, checked; the
/// defaults when the file does not exist. The rest of the file is zoned's
/// and not looked at here.
pub fn read_node_toml(path: &Path) -> Result<FilesSection, SettingsError> {
    Ok(read_node_file(path)?.files)
}

/// What a local agent of zoned reads of its `node.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeFile {
    /// `[files]`, checked.
    pub files: FilesSection,
    pub node: NodeAgent,
}

/// `[node]`, as far as a local agent needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeAgent {
    /// zoned's unix socket for local agents (`node.agent_socket`; zoned's
    /// default `/run/zoned/agent.sock`).
    pub agent_socket: std::path::PathBuf,
    /// zoned's `node.id` (0 when the file does not say).
    pub id: u64,
}

impl Default for NodeAgent {
    fn default() -> Self {
        NodeAgent {
            agent_socket: default_agent_socket(),
            id: 0,
        }
    }
}

fn default_agent_socket() -> std::path::PathBuf {
    "/run/zoned/agent.sock".into()
}

/// [`read_node_toml`], with the agent socket's path.
pub fn read_node_file(path: &Path) -> Result<NodeFile, SettingsError> {
    #[derive(Deserialize)]
    struct NodeToml {
        #[serde(default)]
        files: FilesSection,
        #[serde(default)]
        node: NodeAgentLoose,
    }
    // zoned's [node] has more fields than an agent reads.
    #[derive(Default, Deserialize)]
    struct NodeAgentLoose {
        agent_socket: Option<std::path::PathBuf>,
        #[serde(default)]
        id: u64,
    }
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(SettingsError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let node: NodeToml = toml::from_str(&text).map_err(|e| SettingsError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    node.files
        .check()
        .map_err(|source| SettingsError::Invalid {
            path: path.to_owned(),
            source,
        })?;
    Ok(NodeFile {
        files: node.files,
        node: NodeAgent {
            agent_socket: node.node.agent_socket.unwrap_or_else(default_agent_socket),
            id: node.node.id,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_read_from_a_whole_node_toml_and_defaults_when_absent() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("node.toml");
        assert_eq!(read_node_toml(&path).unwrap(), FilesSection::default());
        std::fs::write(
            &path,
            "[node]\nid = 2\n\n[files]\nmanaged_roots = [\"/etc/one\"]\nlocal_root = \"/srv\"\n",
        )
        .unwrap();
        let files = read_node_toml(&path).unwrap();
        assert_eq!(files.managed_roots, vec!["/etc/one".to_owned()]);
        assert_eq!(files.local_root, PathBuf::from("/srv"));
        assert_eq!(files.max_file_bytes, 1 << 20, "the rest defaults");
        // zone-sync finds zoned's agent socket in the same file.
        assert_eq!(
            read_node_file(&path).unwrap().node.agent_socket,
            PathBuf::from("/run/zoned/agent.sock")
        );
        std::fs::write(
            &path,
            "[node]\nid = 2\nagent_socket = \"/tmp/a.sock\"\n[tls]\ndir = \"/x\"\n",
        )
        .unwrap();
        assert_eq!(
            read_node_file(&path).unwrap().node.agent_socket,
            PathBuf::from("/tmp/a.sock")
        );
    }

    #[test]
    fn a_bad_field_is_named() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("node.toml");
        let err = |text: &str| {
            std::fs::write(&path, text).unwrap();
            format!("{:#}", anyhow_like(read_node_toml(&path).unwrap_err()))
        };
        assert!(err("[files]\nlocal_root = \"srv\"\n").contains("files.local_root"));
        assert!(err("[files]\nmanaged_roots = [\"etc\"]\n").contains("files.managed_roots"));
        assert!(err("[files]\nhistory_per_file = 0\n").contains("files.history_per_file"));
        assert!(err("[files]\nmax_file_bytes = 0\n").contains("files.max_file_bytes"));
        assert!(err("[files]\nmanaged_roots = 3\n").contains("managed_roots"));
        assert!(err("[files]\nnope = 1\n").contains("nope"));
    }

    /// The error with its sources, as a program prints it.
    fn anyhow_like(e: SettingsError) -> String {
        let mut out = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            out.push_str(": ");
            out.push_str(&s.to_string());
            source = s.source();
        }
        out
    }
}
