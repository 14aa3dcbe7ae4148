//! The model of a zone's managed configuration files, shared by the three
//! programs that touch them: zoned's Config service stores them, zone-sync
//! writes them on every server, zonectl pushes, renders and compares them.
//!
//! - [`keys`]: where managed files live in the store, and the generation
//!   key every change rewrites;
//! - [`paths`]: which paths may be managed (under the managed roots, in
//!   normal form, never through a symbolic link on disk);
//! - [`template`]: the per-node parts of a cluster-wide file (`{{id0}}`
//!   for OpenNebula's `SERVER_ID`, per-node blocks);
//! - [`policy`]: what a push must satisfy (the `[files]` limits, plausible
//!   owners and units, a template that parses), and a server's own copy of
//!   a managed path, read safely;
//! - [`rollback`]: what to change to bring every file back to a revision;
//! - [`settings`]: the `[files]` section of `node.toml`, read by zoned and
//!   zone-sync alike;
//! - [`report`]: what zone-sync reports of each pass, for the roll and for
//!   `zonectl config status`;
//! - [`factory`]: a managed root's defaults from the payloads' system
//!   extensions, filling in what the root lacks;
//! - [`atomic`]: the one atomic file write (temp file, fsync, rename,
//!   directory fsync) of everything that writes configuration on a server.

pub mod atomic;
pub mod factory;
pub mod keys;
pub mod paths;
pub mod policy;
pub mod report;
pub mod rollback;
pub mod settings;
pub mod template;

/// Why a request about managed files was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// A field of the request is wrong; nothing was changed.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// This server cannot do it now (a file it cannot read).
    #[error("{0}")]
    Unavailable(String),
    /// The history kept does not reach back far enough.
    #[error("{0}")]
    Compacted(String),
}

/// A [`FileError::Invalid`] naming `field`.
pub fn invalid(field: &str, reason: impl Into<String>) -> FileError {
    FileError::Invalid {
        field: field.to_owned(),
        reason: reason.into(),
    }
}
