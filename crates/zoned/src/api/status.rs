//! `zonectl show`'s figures: this server's own status line, and the zone's
//! table, gathered from every member with a short deadline (a member that
//! does not answer is listed as unreachable, with the reason).

use std::collections::BTreeSet;
use std::time::Duration;

use raft::StateRole;
use tonic::{Request, Response};
use zone_proto::v1::{
    NodeStatusRequest, NodeStatusResponse, Progress, Role, ServerStatus, StatusResponse,
};

use super::{ApiError, ServerContext};
use crate::node::LocalStatus;

impl ServerContext {
    /// This server's own status line plus the leader's progress view.
    pub(crate) async fn node_status(&self) -> Result<NodeStatusResponse, ApiError> {
        let local = self.local().await?;
        Ok(NodeStatusResponse {
            server: Some(self.server_status(&local)),
            progress: progress(&local),
            took_part: local.took_part.clone(),
            members: local.members.clone(),
        })
    }

    fn server_status(&self, s: &LocalStatus) -> ServerStatus {
        let role = if s.learner {
            Role::Learner
        } else {
            match s.role {
                StateRole::Leader => Role::Leader,
                StateRole::Follower => Role::Follower,
                StateRole::Candidate => Role::Candidate,
                StateRole::PreCandidate => Role::PreCandidate,
            }
        };
        ServerStatus {
            id: s.id,
            name: self.info.name.clone(),
            peer_endpoint: self.info.peer_endpoint.clone(),
            client_endpoint: self.info.client_endpoint.clone(),
            role: role as i32,
            term: s.term,
            last_index: s.last_index,
            commit: s.commit,
            applied: s.applied,
            vote: s.vote,
            match_index: 0,
            last_contact_ms: None,
            voter: s.voters.contains(&s.id),
            error: String::new(),
            leader_id: s.leader_id,
            revision: s.revision,
            snapshots_received: s.snapshots_received,
            host: Some(self.host.figures(&self.config.node.data_dir)),
            zone_id: s.zone_id.clone(),
            cert_expires_unix: self.transport.cert_expires_unix(),
            storage: Some(self.agents.storage()),
            version: zone_version::VERSION.to_owned(),
            build_commit: zone_version::COMMIT.to_owned(),
            image_version: self.host.image_version().to_owned(),
            vips_held: self.agents.vips_held(),
            features: crate::space::FEATURES
                .iter()
                .map(|f| (*f).to_owned())
                .collect(),
            boot: super::upgrade::boot_status(&self.config.upgrade.esp),
            extensions_dir: self.config.extensions.dir.display().to_string(),
            units: self.agents.units_status(),
        }
    }

    /// Asks every member for its own figures, concurrently, with a short
    /// deadline; a member that does not answer is listed as unreachable.
    pub(crate) async fn zone_status(&self) -> Result<StatusResponse, ApiError> {
        let local = self.local().await?;
        let members: BTreeSet<u64> = local
            .voters
            .iter()
            .chain(local.learners.iter())
            .copied()
            .collect();
        let mine = NodeStatusResponse {
            server: Some(self.server_status(&local)),
            progress: Vec::new(),
            took_part: Vec::new(),
            members: Vec::new(),
        };
        let calls = members.iter().map(|&id| {
            let me = self.node.id();
            let client = self.transport.client(id);
            let mine = mine.clone();
            async move {
                if id == me {
                    return (id, Ok(mine));
                }
                let Some(mut client) = client else {
                    return (id, Err("no address known".to_owned()));
                };
                let mut req = Request::new(NodeStatusRequest {});
                req.set_timeout(Duration::from_millis(1000));
                let r = client
                    .node_status(req)
                    .await
                    .map(Response::into_inner)
                    .map_err(|s| s.message().to_owned());
                (id, r)
            }
        });
        let answers = futures::future::join_all(calls).await;
        let leader_progress: Vec<Progress> = if local.role == StateRole::Leader {
            progress(&local)
        } else {
            answers
                .iter()
                .find(|(id, _)| *id == local.leader_id)
                .and_then(|(_, r)| r.as_ref().ok())
                .map(|r| r.progress.clone())
                .unwrap_or_default()
        };
        let servers = answers
            .into_iter()
            .map(|(id, r)| {
                let mut s = match r {
                    Ok(resp) => resp.server.unwrap_or_default(),
                    Err(reason) => ServerStatus {
                        id,
                        name: String::new(),
                        peer_endpoint: self.config.peer_address(id).unwrap_or_default().to_owned(),
                        role: Role::Unreachable as i32,
                        voter: local.voters.contains(&id),
                        error: reason,
                        ..ServerStatus::default()
                    },
                };
                if let Some(p) = leader_progress.iter().find(|p| p.id == id) {
                    s.match_index = p.match_index;
                    s.last_contact_ms = p.last_contact_ms;
                }
                s
            })
            .collect();
        Ok(StatusResponse {
            member_id: local.id,
            leader_id: local.leader_id,
            term: local.term,
            servers,
            disabled: self.node.reader().disabled(),
            alarms: self.node.reader().alarms(),
        })
    }
}

/// The leader's view of each member's progress (empty on a follower).
fn progress(local: &LocalStatus) -> Vec<Progress> {
    local
        .progress
        .iter()
        .map(|p| Progress {
            id: p.id,
            match_index: p.matched,
            last_contact_ms: p.last_contact_ms,
            voter: p.voter,
        })
        .collect()
}
