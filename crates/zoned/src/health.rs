//! Honest gRPC health (`grpc.health.v1.Health` on the client port), for
//! load balancers and for `zonectl health`.
//!
//! A server is SERVING only while its answers are worth having: it is a
//! member of the zone, it knows a leader (a partitioned server loses it
//! within an election timeout: pre-vote makes it a pre-candidate, with no
//! leader), and it has applied its log up to within [`MAX_APPLY_LAG`]
//! entries of the commit index it knows. Otherwise NOT_SERVING, with the
//! reason logged once per change. The overall status (service `""`) and
//! every service that needs the leader (the key-value store, Config,
//! Storage, Users, Join) follow that; `zone.v1.Cluster` is SERVING while
//! the Raft driver answers at all: its Status is what an operator asks a
//! partitioned server, and it answers there. A driver that stopped (a store
//! error) makes every service NOT_SERVING.

use std::time::Duration;

use tonic::server::NamedService;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::node::{LocalStatus, NodeHandle};

/// Applied entries may trail the known commit index by this many.
pub const MAX_APPLY_LAG: u64 = 1_000;

/// How often the verdict is worked out again, besides at every change of
/// the Raft view.
const EVERY: Duration = Duration::from_millis(500);

/// Why this server should not be used now, if it should not.
pub fn judge(s: &LocalStatus) -> Result<(), String> {
    if !s.voters.contains(&s.id) && !s.learners.contains(&s.id) {
        return Err(format!(
            "server {} is not a member of the zone (voters {:?}, learners {:?})",
            s.id, s.voters, s.learners
        ));
    }
    if s.leader_id == 0 {
        return Err("no leader known: cut off from the zone, or an election under way".to_owned());
    }
    let lag = s.commit.saturating_sub(s.applied);
    if lag > MAX_APPLY_LAG {
        return Err(format!(
            "catching up: applied {} of {} committed ({lag} behind, at most {MAX_APPLY_LAG})",
            s.applied, s.commit
        ));
    }
    Ok(())
}

/// The services whose status follows [`judge`]; `zone.v1.Cluster` follows
/// the driver alone.
const NEEDS_LEADER: [&str; 6] = [
    "",
    <zone_proto::v1::kv_server::KvServer<crate::api::KvService> as NamedService>::NAME,
    <zone_proto::v1::config_server::ConfigServer<crate::api::ConfigService> as NamedService>::NAME,
    <zone_proto::v1::storage_server::StorageServer<crate::api::StorageService> as NamedService>::NAME,
    <zone_proto::v1::users_server::UsersServer<crate::api::UsersService> as NamedService>::NAME,
    <zone_proto::v1::join_server::JoinServer<crate::api::JoinService> as NamedService>::NAME,
];
const CLUSTER: &str =
    <zone_proto::v1::cluster_server::ClusterServer<crate::api::ClusterService> as NamedService>::NAME;

fn status(ok: bool) -> ServingStatus {
    if ok {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Keeps `reporter` in step with this server, until the driver stops
/// (then everything is NOT_SERVING).
pub async fn run(node: NodeHandle, reporter: HealthReporter) {
    let mut view = node.watch_view();
    // What was last set: (overall verdict, driver answering).
    let mut last: Option<(Result<(), String>, bool)> = None;
    loop {
        let (verdict, answering) = match node.status().await {
            Ok(s) => (judge(&s), true),
            Err(e) => (Err(format!("the Raft driver stopped: {e}")), false),
        };
        if last.as_ref() != Some(&(verdict.clone(), answering)) {
            match &verdict {
                Ok(()) => tracing::info!("health: SERVING"),
                Err(why) => tracing::warn!(reason = %why, "health: NOT_SERVING"),
            }
            for service in NEEDS_LEADER {
                reporter
                    .set_service_status(service, status(verdict.is_ok()))
                    .await;
            }
            reporter
                .set_service_status(CLUSTER, status(answering))
                .await;
            last = Some((verdict, answering));
        }
        if !answering {
            return;
        }
        tokio::select! {
            changed = view.changed() => {
                if changed.is_err() {
                    // The driver is gone: said at the next round.
                    tokio::time::sleep(EVERY).await;
                }
            }
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::StateRole;

    fn status(id: u64) -> LocalStatus {
        LocalStatus {
            id,
            role: StateRole::Follower,
            learner: false,
            term: 4,
            vote: 1,
            leader_id: 1,
            last_index: 100,
            commit: 100,
            applied: 100,
            revision: 90,
            voters: vec![1, 2, 3],
            learners: vec![4],
            progress: Vec::new(),
            snapshots_received: 0,
            snapshots_built: 0,
            members: Vec::new(),
            zone_id: String::new(),
            took_part: Vec::new(),
        }
    }

    #[test]
    fn serving_needs_membership_a_leader_and_the_log_applied() {
        assert_eq!(judge(&status(2)), Ok(()));
        assert_eq!(judge(&status(4)), Ok(()), "a learner is a member");
        let e = judge(&status(5)).unwrap_err();
        assert!(e.contains("not a member"), "{e}");
        let e = judge(&LocalStatus {
            leader_id: 0,
            ..status(2)
        })
        .unwrap_err();
        assert!(e.contains("no leader known"), "{e}");
        let behind = LocalStatus {
            commit: 100 + MAX_APPLY_LAG + 1,
            ..status(2)
        };
        let e = judge(&behind).unwrap_err();
        assert!(e.contains("catching up"), "{e}");
        assert_eq!(
            judge(&LocalStatus {
                commit: 100 + MAX_APPLY_LAG,
                ..status(2)
            }),
            Ok(()),
            "within the bound"
        );
    }
}
