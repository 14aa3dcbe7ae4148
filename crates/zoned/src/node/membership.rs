//! Membership: configuration changes proposed and applied, learners
//! promoted, leadership handed over, and the membership table (names and
//! peer addresses) that follows the Raft configuration.

use raft::eraftpb::{ConfChangeType, ConfChangeV2, ConfState};
use raft::StateRole;
use rocksdb::WriteBatch;
use zone_proto::v1::Member;

use super::driver::Driver;
use super::handle::Reply;
use super::proposals::Waiter;
use super::NodeError;
use crate::kv;

impl Driver {
    pub(super) fn propose_conf(&mut self, cc: ConfChangeV2, reply: Reply<()>) {
        if let Some(err) = self.not_leader() {
            let _ = reply.send(Err(err));
            return;
        }
        // raft-rs turns a second concurrent change into an empty entry:
        // refuse it here, with a reason.
        if self.raw.raft.pending_conf_index > self.raw.raft.raft_log.applied {
            let _ = reply.send(Err(NodeError::ConfBusy));
            return;
        }
        let before = self.raw.raft.raft_log.last_index();
        match self.raw.propose_conf_change(Vec::new(), cc) {
            Ok(()) if self.raw.raft.raft_log.last_index() > before => {
                let index = self.raw.raft.raft_log.last_index();
                self.proposals
                    .push(index, self.raw.raft.term, Waiter::Conf(reply));
            }
            Ok(()) => {
                let _ = reply.send(Err(NodeError::Rejected(
                    "the change was not accepted".into(),
                )));
            }
            Err(e) => {
                let _ = reply.send(Err(NodeError::Rejected(format!(
                    "membership change refused: {e}"
                ))));
            }
        }
    }

    pub(super) fn transfer(&mut self, target: u64) -> Result<u64, NodeError> {
        if let Some(err) = self.not_leader() {
            return Err(err);
        }
        let target = if target == 0 {
            let voters = &self.raw.store().conf_state().voters;
            most_caught_up_voter(self.id, voters, &self.matched()).ok_or_else(|| {
                NodeError::Rejected("there is no other voter to hand leadership to".into())
            })?
        } else {
            target
        };
        if target == self.id {
            return Ok(target);
        }
        if !self.raw.store().conf_state().voters.contains(&target) {
            return Err(NodeError::Rejected(format!(
                "server {target} is not a voter of the zone; leadership can only go to a voter"
            )));
        }
        tracing::info!(target, "handing leadership over");
        self.raw.transfer_leader(target);
        Ok(target)
    }

    /// The leader's match index of every server it tracks.
    fn matched(&self) -> Vec<(u64, u64)> {
        self.raw
            .raft
            .prs()
            .iter()
            .map(|(id, pr)| (*id, pr.matched))
            .collect()
    }

    /// On the leader: a learner whose log is close enough to ours becomes a
    /// voter, one change at a time.
    pub(super) fn promote_learners(&mut self) {
        if self.raw.raft.state != StateRole::Leader
            || self.raw.raft.pending_conf_index > self.raw.raft.raft_log.applied
        {
            return;
        }
        let ready = promotable_learner(
            &self.raw.store().conf_state().learners,
            &self.matched(),
            self.raw.raft.raft_log.last_index(),
            self.config.raft.promote_within,
        );
        if let Some(id) = ready {
            tracing::info!(id, "learner caught up: promoting it to voter");
            let mut cc = ConfChangeV2::default();
            cc.mut_changes().push(raft_proto::new_conf_change_single(
                id,
                ConfChangeType::AddNode,
            ));
            if let Err(e) = self.raw.propose_conf_change(Vec::new(), cc) {
                tracing::warn!(id, error = %e, "promotion not proposed");
            }
        }
    }

    /// The leader says this server was removed at `index`. Believed only
    /// from the leader we follow, and not when stale: from before a later
    /// re-admission (we applied past it and are a member).
    pub(super) fn removed_notice(&mut self, index: u64, leader: u64) {
        let cs = self.raw.store().conf_state();
        let member = cs.voters.contains(&self.id) || cs.learners.contains(&self.id);
        let stale = member && self.raw.store().applied() >= index;
        if self.raw.raft.state != StateRole::Leader && leader == self.raw.raft.leader_id && !stale {
            let mut wb = WriteBatch::default();
            self.raw.mut_store().set_removed(&mut wb, index);
            if self.engine.write(wb, true).is_ok() {
                self.removed = Some(index);
            }
        }
    }

    pub(super) fn apply_conf_change(
        &mut self,
        wb: &mut WriteBatch,
        index: u64,
        cc: Result<ConfChangeV2, protobuf::ProtobufError>,
    ) -> Result<(), String> {
        let cc = match cc {
            Ok(cc) => cc,
            Err(e) => {
                tracing::error!(index, error = %e, "skipping an undecodable configuration change");
                return Err(format!("undecodable configuration change: {e}"));
            }
        };
        let before = self.raw.store().conf_state().clone();
        let cs = match self.raw.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(e) => {
                tracing::error!(index, error = %e, "configuration change rejected");
                return Err(format!("configuration change rejected: {e}"));
            }
        };
        tracing::info!(index, voters = ?cs.voters, learners = ?cs.learners, "configuration changed");
        self.raw.mut_store().set_conf_state(wb, &cs);
        // The membership table follows the configuration; a new server's
        // name and address travel in the change's context.
        let added: Option<Member> = prost::Message::decode(&cc.context[..]).ok();
        self.members = members_after(&self.members, &cs, added);
        kv::stage_members(&self.engine, wb, &self.members);
        let was_member = before.voters.contains(&self.id) || before.learners.contains(&self.id);
        let is_member = cs.voters.contains(&self.id) || cs.learners.contains(&self.id);
        if was_member && !is_member {
            self.raw.mut_store().set_removed(wb, index);
            self.removed = Some(index);
        }
        if self.raw.raft.state == StateRole::Leader {
            for gone in before.voters.iter().chain(&before.learners) {
                if !cs.voters.contains(gone) && !cs.learners.contains(gone) && *gone != self.id {
                    self.transport.notify_removed(*gone, self.id, index);
                }
            }
        }
        // After the notices: they still need the removed servers' links.
        self.transport.set_peers(&self.members);
        Ok(())
    }
}

/// The voter other than `me` with the highest match index (the lowest id
/// among equals), from the leader's (id, match index) of every server.
fn most_caught_up_voter(me: u64, voters: &[u64], matched: &[(u64, u64)]) -> Option<u64> {
    matched
        .iter()
        .filter(|(id, _)| *id != me && voters.contains(id))
        .max_by_key(|(id, m)| (*m, std::cmp::Reverse(*id)))
        .map(|(id, _)| *id)
}

/// The first learner (in configuration order) whose log is within `within`
/// entries of the leader's `last` index, and that has acknowledged anything.
fn promotable_learner(
    learners: &[u64],
    matched: &[(u64, u64)],
    last: u64,
    within: u64,
) -> Option<u64> {
    learners.iter().copied().find(|id| {
        matched
            .iter()
            .any(|(m_id, m)| m_id == id && *m > 0 && m + within >= last)
    })
}

/// The membership table after a configuration change: members keep their
/// entry, a new one comes from the change's context, and the learner flag
/// follows the configuration.
pub(super) fn members_after(old: &[Member], cs: &ConfState, added: Option<Member>) -> Vec<Member> {
    let mut out: Vec<Member> = Vec::new();
    for id in cs.voters.iter().chain(&cs.learners) {
        let mut m = old
            .iter()
            .find(|m| m.id == *id)
            .cloned()
            .or_else(|| added.clone().filter(|a| a.id == *id))
            .unwrap_or(Member {
                id: *id,
                ..Member::default()
            });
        if let Some(a) = added.as_ref().filter(|a| a.id == *id) {
            if !a.peer_endpoint.is_empty() {
                m.peer_endpoint = a.peer_endpoint.clone();
            }
            if !a.name.is_empty() {
                m.name = a.name.clone();
            }
        }
        m.learner = cs.learners.contains(id);
        out.push(m);
    }
    out.sort_by_key(|m| m.id);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, name: &str, peer: &str) -> Member {
        Member {
            id,
            name: name.into(),
            peer_endpoint: peer.into(),
            ..Member::default()
        }
    }

    fn conf(voters: &[u64], learners: &[u64]) -> ConfState {
        ConfState {
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            ..ConfState::default()
        }
    }

    #[test]
    fn the_table_follows_the_configuration_and_takes_a_new_member_from_the_change() {
        let old = vec![member(1, "a", "h1:1"), member(2, "b", "h2:1")];
        let added = member(4, "d", "h4:1");
        let after = members_after(&old, &conf(&[1, 2], &[4]), Some(added));
        assert_eq!(
            after,
            vec![
                member(1, "a", "h1:1"),
                member(2, "b", "h2:1"),
                Member {
                    learner: true,
                    ..member(4, "d", "h4:1")
                },
            ]
        );
        // Promoted: the flag follows; removed: the entry goes.
        let after = members_after(&after, &conf(&[1, 4], &[]), None);
        assert_eq!(after, vec![member(1, "a", "h1:1"), member(4, "d", "h4:1")]);
    }

    #[test]
    fn a_change_readding_a_member_updates_its_address_but_keeps_what_it_leaves_empty() {
        let old = vec![member(1, "a", "h1:1"), member(3, "c", "h3:1")];
        let moved = member(3, "", "h3b:1");
        let after = members_after(&old, &conf(&[1, 3], &[]), Some(moved));
        assert_eq!(after[1], member(3, "c", "h3b:1"));
        // A server in the configuration with no entry anywhere still gets one.
        let after = members_after(&[], &conf(&[9], &[]), None);
        assert_eq!(after, vec![member(9, "", "")]);
    }

    #[test]
    fn leadership_goes_to_the_most_caught_up_voter_lowest_id_first() {
        let matched = [(1, 50), (2, 40), (3, 48), (4, 48), (5, 60)];
        assert_eq!(most_caught_up_voter(1, &[1, 2, 3, 4], &matched), Some(3));
        assert_eq!(most_caught_up_voter(5, &[1, 2, 5], &matched), Some(1));
        assert_eq!(
            most_caught_up_voter(1, &[1], &matched),
            None,
            "no other voter"
        );
    }

    #[test]
    fn a_learner_is_promoted_once_close_enough_and_only_after_acknowledging() {
        let matched = [(1, 100), (4, 0), (5, 89), (6, 95)];
        assert_eq!(promotable_learner(&[4, 5, 6], &matched, 100, 10), Some(6));
        assert_eq!(promotable_learner(&[4, 5, 6], &matched, 100, 11), Some(5));
        assert_eq!(
            promotable_learner(&[4], &matched, 5, 10),
            None,
            "never acknowledged"
        );
        assert_eq!(
            promotable_learner(&[7], &matched, 5, 10),
            None,
            "not tracked"
        );
    }
}
