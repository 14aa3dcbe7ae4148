//! The zone's record: its identity and the Raft timing every server must
//! share, fixed by the zone's first leader and replicated like any command.
//!
//! Safety: the leader lease (see [`super::lease`]) assumes every voter
//! refuses votes for `election_ticks` of `tick_ms` after hearing from the
//! leader, and the leader ends its lease `lease_margin_ms` before that. A
//! voter configured with shorter timing would vote for a rival while the
//! old leader still acts on its lease: two VIP holders. So a server whose
//! configured timing differs from the record's does not run in the zone:
//! it refuses to start once it holds the record, and stops when it applies
//! it (a founder, at the zone's birth; a joiner, from its snapshot, while
//! still a learner that cannot vote). And no leader takes a lease before
//! the record is applied on it: a quorum then holds the record.
//!
//! The id answers "does this zone exist?" for a founder whose data
//! directory is empty (`server::refuse_if_wiped`).

use std::collections::BTreeSet;

use prost::Message as _;
use raft::eraftpb::{Entry, Message, MessageType};
use raft::StateRole;
use zone_proto::v1::{command, Command, ServerIds, ZoneRecord};

use super::driver::Driver;
use crate::config::Config;

/// The highest level of the zone's stored formats this build reads (see
/// `ZoneRecord.format`). A change that an older build could not read (a
/// new command it would skip, a key layout it would misread) raises it;
/// the zone's record then keeps servers of older builds out, and a rolling
/// upgrade must raise the zone's level only once every member runs a build
/// that reads it.
pub const STORE_FORMAT: u32 = 1;

/// Why this server cannot take part in its zone, as the zone's record says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZoneMismatch {
    /// A configured Raft timing differs from the zone's.
    #[error("raft.{field} is {here} in this server's configuration, but zone {zone_id} runs with {zone} (fixed when server {founded_by} founded it; every server of a zone must use the zone's timing, which the leader lease relies on). Set raft.{field} = {zone} and start it again")]
    Timing {
        field: &'static str,
        here: u64,
        zone: u64,
        zone_id: String,
        founded_by: u64,
    },
    /// The zone's data is at a format level this build cannot read.
    #[error("zone {zone_id} keeps its data in format level {zone} (set by zoned {set_by}); this server's zoned {here_version} reads levels up to {here} and cannot take part: install the zone's release on this server first (`zone-upgrade install BUNDLE` and a reboot, or reflash it), then start it again")]
    Format {
        zone: u32,
        here: u32,
        set_by: String,
        here_version: &'static str,
        zone_id: String,
    },
}

/// The record a new zone's first leader proposes: a fresh random id, the
/// voters at that time, and this server's timing.
pub(super) fn new_record(config: &Config, founders: Vec<u64>) -> ZoneRecord {
    ZoneRecord {
        id: format!("{:032x}", rand::random::<u128>()),
        founders,
        founded_by: config.node.id,
        tick_ms: config.raft.tick_ms,
        election_ticks: config.raft.election_ticks as u64,
        lease_margin_ms: config.raft.lease_margin_ms,
        format: STORE_FORMAT,
        format_by: zone_version::LONG.to_owned(),
    }
}

/// Whether this build reads the zone's format level, then the first
/// timing field in which `config` differs from the zone's.
pub fn check(config: &Config, zone: &ZoneRecord) -> Result<(), ZoneMismatch> {
    let level = zone.format.max(1);
    if level > STORE_FORMAT {
        return Err(ZoneMismatch::Format {
            zone: level,
            here: STORE_FORMAT,
            set_by: if zone.format_by.is_empty() {
                "unknown".to_owned()
            } else {
                zone.format_by.clone()
            },
            here_version: zone_version::LONG,
            zone_id: zone.id.clone(),
        });
    }
    let fields = [
        ("tick_ms", config.raft.tick_ms, zone.tick_ms),
        (
            "election_ticks",
            config.raft.election_ticks as u64,
            zone.election_ticks,
        ),
        (
            "lease_margin_ms",
            config.raft.lease_margin_ms,
            zone.lease_margin_ms,
        ),
    ];
    match fields.into_iter().find(|(_, here, zone)| here != zone) {
        None => Ok(()),
        Some((field, here, value)) => Err(ZoneMismatch::Timing {
            field,
            here,
            zone: value,
            zone_id: zone.id.clone(),
            founded_by: zone.founded_by,
        }),
    }
}

impl Driver {
    /// On a leader of a zone without a record (a new zone, or one founded
    /// before records existed): proposes one, once per term, after the
    /// term's first entry is committed (a record from an earlier term
    /// still in the log is then applied, and none is proposed). Two
    /// leaders may each propose one; the first applied wins.
    pub(super) fn found_zone(&mut self) {
        let raft = &self.raw.raft;
        if self.zone_id.is_some()
            || raft.state != StateRole::Leader
            || !raft.commit_to_current_term()
            || self.zone_proposed_term == raft.term
        {
            return;
        }
        let term = raft.term;
        let founders = self.raw.store().conf_state().voters.clone();
        let record = new_record(&self.config, founders);
        let id = record.id.clone();
        match self.propose_own(command::Op::FoundZone(record)) {
            Ok(()) => {
                self.zone_proposed_term = term;
                tracing::info!(zone = %id, term, "proposed the zone's record");
            }
            // Refused while transferring leadership: tried again later.
            Err(e) => tracing::debug!(error = %e, "the zone's record was not proposed"),
        }
    }

    /// On the leader: proposes adding to the servers that took part those
    /// it saw acknowledge an entry past the bootstrap, once per term.
    pub(super) fn record_took_part(&mut self) {
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader || !raft.commit_to_current_term() {
            return;
        }
        let term = raft.term;
        if self.took_part_proposed.0 != term {
            self.took_part_proposed = (term, BTreeSet::new());
        }
        let seen: Vec<u64> = raft
            .prs()
            .iter()
            .filter(|(id, pr)| {
                pr.matched > crate::storage::BOOTSTRAP_INDEX
                    && !self.took_part.contains(id)
                    && !self.took_part_proposed.1.contains(id)
            })
            .map(|(id, _)| *id)
            .collect();
        if seen.is_empty() {
            return;
        }
        let op = command::Op::TookPart(ServerIds { ids: seen.clone() });
        match self.propose_own(op) {
            Ok(()) => {
                tracing::debug!(servers = ?seen, "proposed: these servers took part");
                self.took_part_proposed.1.extend(seen);
            }
            Err(e) => tracing::debug!(error = %e, "took_part not proposed"),
        }
    }

    /// Proposes one of the zone's own commands (no client waits for it).
    fn propose_own(&mut self, op: command::Op) -> raft::Result<()> {
        let data = Command {
            op: Some(op),
            request: None,
        }
        .encode_to_vec();
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgPropose);
        m.from = self.id;
        m.set_entries(
            vec![Entry {
                data: data.into(),
                ..Entry::default()
            }]
            .into(),
        );
        self.raw.raft.step(m)
    }

    /// The zone's record was applied here (a command, or a snapshot).
    pub(super) fn zone_applied(&mut self, record: &ZoneRecord) {
        self.zone_id = Some(record.id.clone());
        match check(&self.config, record) {
            Ok(()) => tracing::info!(
                zone = %record.id,
                founded_by = record.founded_by,
                "this server belongs to zone {}",
                record.id
            ),
            Err(m) => self.mismatch = Some(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_takes_this_servers_timing_and_a_fresh_id() {
        let config = Config::default();
        let a = new_record(&config, vec![1, 2, 3]);
        let b = new_record(&config, vec![1, 2, 3]);
        assert_eq!(a.id.len(), 32);
        assert_ne!(a.id, b.id, "two zones got the same id");
        assert_eq!(check(&config, &a), Ok(()));
    }

    #[test]
    fn a_differing_timing_names_the_field_and_the_zones_value() {
        let mut config = Config::default();
        let zone = new_record(&config, vec![1]);
        config.raft.election_ticks += 2;
        let e = check(&config, &zone).unwrap_err();
        let ZoneMismatch::Timing {
            field, here, zone, ..
        } = e.clone()
        else {
            panic!("{e:?}")
        };
        assert_eq!((field, here, zone), ("election_ticks", 12, 10));
        let text = e.to_string();
        assert!(
            text.starts_with("raft.election_ticks is 12 in this server's configuration, but zone ")
                && text.contains("Set raft.election_ticks = 10"),
            "{text}"
        );
    }

    #[test]
    fn a_zone_at_a_format_level_this_build_cannot_read_is_refused_naming_both_builds() {
        let config = Config::default();
        let mut zone = new_record(&config, vec![1]);
        assert_eq!(zone.format, STORE_FORMAT);
        // A record from before the levels reads as level 1.
        zone.format = 0;
        assert_eq!(check(&config, &zone), Ok(()));
        zone.format = STORE_FORMAT + 1;
        zone.format_by = "9.0.0+0123456789ab".into();
        let e = check(&config, &zone).unwrap_err();
        assert!(matches!(e, ZoneMismatch::Format { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains(&format!("format level {}", STORE_FORMAT + 1))
                && text.contains("set by zoned 9.0.0+0123456789ab")
                && text.contains(&format!("this server's zoned {}", zone_version::LONG))
                && text.contains(&format!("reads levels up to {STORE_FORMAT}")),
            "{text}"
        );
    }
}
