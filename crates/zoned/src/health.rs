//! Honest gRPC health (`grpc.health.v1.Health` on the client port), for
//! load balancers and for `zonectl health`.
//!
//! A server is SERVING only while its answers are worth having: it is a
//! member of the zone, it knows a leader (a partitioned voter loses it
//! within an election timeout: pre-vote makes it a pre-candidate, with no
//! leader), and a read barrier through the leader finishes within
//! [`BARRIER_TIMEOUT`]: the leader confirmed its leadership with a quorum
//! and this server has applied everything committed before the check. The
//! commit index a server knows is no guide to that: a leader tells a
//! follower only what it has matched, so a server still receiving its
//! snapshot, or a learner cut off from the zone (learners never campaign,
//! and keep their leader), would look caught up. Otherwise NOT_SERVING,
//! with the reason logged once per change. The overall status (service `""`) and
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

/// How long the read barrier of a check may take.
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the driver may take to say how it is.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the verdict is worked out again, besides at every change of
/// the Raft view.
const EVERY: Duration = Duration::from_secs(1);

/// Why this server should not be used now, if it should not, as far as
/// its own Raft state tells (the read barrier is [`run`]'s).
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
    Ok(())
}

/// The whole verdict: the Raft state, then the read barrier; and whether
/// the driver answers at all.
async fn check(node: &NodeHandle) -> (Result<(), String>, bool) {
    let status = match tokio::time::timeout(STATUS_TIMEOUT, node.status()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return (Err(format!("the Raft driver stopped: {e}")), false),
        Err(_) => {
            return (
                Err(format!(
                    "the Raft driver did not answer within {} s (a stalled disk?)",
                    STATUS_TIMEOUT.as_secs()
                )),
                true,
            )
        }
    };
    if let Err(why) = judge(&status) {
        return (Err(why), true);
    }
    match tokio::time::timeout(BARRIER_TIMEOUT, node.read_barrier()).await {
        Ok(Ok(())) => (Ok(()), true),
        Ok(Err(e)) => (
            Err(format!("a read barrier through the leader failed: {e}")),
            true,
        ),
        Err(_) => (
            Err(format!(
                "not caught up with the leader: a read barrier did not finish within {} s",
                BARRIER_TIMEOUT.as_secs()
            )),
            true,
        ),
    }
}

/// The services whose status follows [`judge`]; `zone.v1.Cluster` follows
/// the driver alone.
const NEEDS_LEADER: [&str; 8] = [
    "",
    <zone_proto::v1::kv_server::KvServer<crate::api::KvService> as NamedService>::NAME,
    <zone_proto::v1::config_server::ConfigServer<crate::api::ConfigService> as NamedService>::NAME,
    <zone_proto::v1::storage_server::StorageServer<crate::api::StorageService> as NamedService>::NAME,
    <zone_proto::v1::users_server::UsersServer<crate::api::UsersService> as NamedService>::NAME,
    <zone_proto::v1::join_server::JoinServer<crate::api::JoinService> as NamedService>::NAME,
    <zone_proto::v1::extensions_server::ExtensionsServer<crate::api::ExtensionsService> as NamedService>::NAME,
    <zone_proto::v1::services_server::ServicesServer<crate::api::ServicesService> as NamedService>::NAME,
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

/// Keeps `serving_file` present exactly while the verdict is SERVING (best
/// effort: a failure is logged, the gRPC status is what clients use).
/// Called with false before the server says it is ready, so a file left
/// by a crashed run is gone by then.
pub fn mark(serving_file: Option<&std::path::Path>, serving: bool) {
    let Some(path) = serving_file else { return };
    let result = if serving {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", zone_version::LONG))
            .and_then(|()| std::fs::rename(&tmp, path))
    } else {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    };
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "health: cannot update the serving file");
    }
}

/// Keeps `reporter` (and `serving_file`, if any) in step with this server,
/// until the driver stops (then everything is NOT_SERVING).
pub async fn run(
    node: NodeHandle,
    reporter: HealthReporter,
    serving_file: Option<std::path::PathBuf>,
) {
    mark(serving_file.as_deref(), false);
    let mut view = node.watch_view();
    // What was last set: (overall verdict, driver answering).
    let mut last: Option<(Result<(), String>, bool)> = None;
    loop {
        // A change of leader or role while the read barrier waits (a cut
        // server's barrier waits its whole timeout) starts the check again
        // at once: the verdict follows the view within moments.
        let checked = tokio::select! {
            r = check(&node) => Some(r),
            changed = view.changed() => {
                if changed.is_err() {
                    // The driver is gone: said at the next check.
                    tokio::time::sleep(EVERY).await;
                }
                None
            }
        };
        let Some((verdict, answering)) = checked else {
            continue;
        };
        if last.as_ref() != Some(&(verdict.clone(), answering)) {
            match &verdict {
                Ok(()) => tracing::info!("health: SERVING"),
                Err(why) => tracing::warn!(reason = %why, "health: NOT_SERVING"),
            }
            mark(serving_file.as_deref(), verdict.is_ok());
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
            mark(serving_file.as_deref(), false);
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
            first_index: 0,
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
    fn serving_needs_membership_and_a_leader() {
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
    }
}
