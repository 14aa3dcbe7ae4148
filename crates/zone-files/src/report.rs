//! What zone-sync reports of each pass, under `zone/config/status/<id>`
//! (JSON): the roll reads the other servers' reports to take its turn, and
//! `zonectl config status` prints them. Every field has a default, so a
//! report from an older or newer zone-sync still reads.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// One server's state of its managed files, as of its last pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SyncReport {
    /// The reporting server's id: the key's suffix too.
    pub id: u64,
    /// Its name in the membership.
    pub name: String,
    /// The store revision the server's disk was brought to.
    pub applied_revision: u64,
    /// How many managed files the server keeps.
    pub files: u64,
    /// Written in the last pass because the store's version changed.
    pub written: Vec<String>,
    /// Found edited by hand and restored (reported for a day).
    pub drift_restored: Vec<String>,
    /// Not written: (path, reason).
    pub refused: Vec<(String, String)>,
    /// Units whose files changed, waiting for this server's turn.
    pub pending_restarts: BTreeSet<String>,
    /// Why the roll stopped here: a restarted unit did not come back.
    pub restart_failed: Option<String>,
    /// The last restart this server did in a roll.
    pub last_restart: Option<LastRestart>,
    /// Why this server's pending restarts wait, as it last decided:
    /// `waiting: <why>` (not its turn yet) or `halted: <why>` (a restart
    /// failed somewhere). None when nothing waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roll_wait: Option<String>,
    /// The server's wall clock when it reported, seconds since the epoch
    /// (0 in a report not yet stamped).
    #[serde(skip_serializing_if = "is_zero")]
    pub updated_unix: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// One server's turn in a roll.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LastRestart {
    pub units: Vec<String>,
    /// This server's wall clock, milliseconds since the epoch.
    pub started_unix_ms: u64,
    pub done_unix_ms: u64,
    /// Per unit, when the service manager saw it active again.
    pub active_since: BTreeMap<String, String>,
    pub ok: bool,
}

impl SyncReport {
    /// A report as stored; `None` for bytes that are not one.
    pub fn decode(bytes: &[u8]) -> Option<SyncReport> {
        serde_json::from_slice(bytes).ok()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a report always encodes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_reads_back_with_its_field_names() {
        let r = SyncReport {
            id: 2,
            name: "fe2".into(),
            applied_revision: 40,
            files: 3,
            refused: vec![("/etc/x".into(), "outside the managed roots".into())],
            pending_restarts: ["opennebula.service".to_owned()].into(),
            updated_unix: 1_800_000_000,
            ..SyncReport::default()
        };
        let bytes = r.encode();
        assert_eq!(SyncReport::decode(&bytes), Some(r));
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["applied_revision"], 40);
        assert_eq!(v["refused"][0][0], "/etc/x");
        assert_eq!(v["pending_restarts"][0], "opennebula.service");
    }

    #[test]
    fn a_report_missing_fields_or_with_unknown_ones_still_reads() {
        let r = SyncReport::decode(br#"{"id": 3, "applied_revision": 9, "future": true}"#).unwrap();
        assert_eq!((r.id, r.applied_revision, r.files), (3, 9, 0));
        assert_eq!(SyncReport::decode(b"not json"), None);
    }
}
