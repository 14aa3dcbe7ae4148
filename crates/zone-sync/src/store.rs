//! What zone-sync needs of the zone, behind [`Store`]: the local zoned over
//! gRPC ([`Grpc`]) on a server, a map in memory ([`Memory`]) in the unit
//! tests of the daemon's logic.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use prost::Message as _;
use tonic::transport::Channel;
use zone_files::keys::{FILE_PREFIX, ROLL_LOCK, STATUS_PREFIX};
use zone_files::report::SyncReport;
use zone_files::template::NodeVars;
use zone_proto::v1::{
    cluster_client::ClusterClient, compare, kv_client::KvClient, request_op, Compare,
    DeleteRequest, GetRequest, ManagedFile, MembersRequest, PutRequest, RangeRequest, RequestOp,
    StatusRequest, TxnRequest,
};

use crate::apply::Wanted;

/// An error from the store (the local zoned is gone, a call failed).
pub type StoreError = anyhow::Error;

/// The zone as the roll needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ZoneNow {
    /// 0 while no leader is known.
    pub leader: u64,
    /// The servers that answer now.
    pub reachable: BTreeSet<u64>,
}

/// The managed files as read, at one revision, by one server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Files {
    pub wanted: Vec<Wanted>,
    pub revision: u64,
    /// The server that answered: this one.
    pub me: u64,
}

/// What zone-sync asks of the zone.
#[allow(async_fn_in_trait)]
pub trait Store {
    /// Every managed file, read linearizably by the local server.
    async fn files(&mut self) -> Result<Files, StoreError>;
    /// Server `id` as the membership lists it (a local read, no fan-out).
    async fn member(&mut self, id: u64) -> Result<NodeVars, StoreError>;
    /// Stores this server's report.
    async fn report(&mut self, report: &SyncReport) -> Result<(), StoreError>;
    /// Every server's last report.
    async fn reports(&mut self) -> Result<Vec<SyncReport>, StoreError>;
    /// The leader and who answers: asked only when restarts wait.
    async fn zone(&mut self) -> Result<ZoneNow, StoreError>;
    /// The roll's lock, if held.
    async fn lock(&mut self) -> Result<Option<Held>, StoreError>;
    /// Writes `value` into the lock if it is still as read (`held`; None:
    /// free); whether it was.
    async fn swap_lock(&mut self, held: Option<&Held>, value: Vec<u8>) -> Result<bool, StoreError>;
    /// Releases the lock, if it still holds `mine`.
    async fn release_lock(&mut self, mine: Vec<u8>) -> Result<(), StoreError>;
    /// The zone's services (`zonectl services set`), read linearizably:
    /// its leader-only units and the units it runs on every server; both
    /// empty while the zone sets none.
    async fn services(&mut self) -> Result<(Vec<String>, Vec<String>), StoreError> {
        Ok((Vec::new(), Vec::new()))
    }
}

/// The zone's services (`zone.v1.Services`; written by zoned alone).
pub const SERVICES_KEY: &[u8] = b"zone/services";

/// The roll's lock as read: `<holder> <unix seconds>`, and the revision
/// it was written at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub value: Vec<u8>,
    pub revision: u64,
}

/// Takes the roll's lock for `me` at `now_unix` (seconds): free, held by
/// `me`, or held longer than `stale` by a server that must have died with
/// it; and only if nobody changed it since it was read. The value to
/// release it with, or None.
pub async fn take_lock<S: Store>(
    store: &mut S,
    me: u64,
    now_unix: u64,
    stale: Duration,
) -> Result<Option<Vec<u8>>, StoreError> {
    let held = store.lock().await?;
    if !may_take(held.as_ref().map(|h| &h.value[..]), me, now_unix, stale) {
        tracing::debug!("the roll lock is held");
        return Ok(None);
    }
    if let Some(h) = &held {
        tracing::warn!(held = %String::from_utf8_lossy(&h.value), "taking over a stale roll lock");
    }
    let mine = lock_value(me, now_unix);
    Ok(store
        .swap_lock(held.as_ref(), mine.clone())
        .await?
        .then_some(mine))
}

/// The lock's value: `<holder> <unix seconds>`.
fn lock_value(me: u64, now_unix: u64) -> Vec<u8> {
    format!("{me} {now_unix}").into_bytes()
}

/// Whether `me` may take a lock whose value is `held` (None: free).
pub fn may_take(held: Option<&[u8]>, me: u64, now_unix: u64, stale: Duration) -> bool {
    let Some(held) = held else {
        return true;
    };
    let text = String::from_utf8_lossy(held);
    let mut it = text.split_whitespace();
    let holder: u64 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    let since: u64 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    holder == me || now_unix.saturating_sub(since) >= stale.as_secs()
}

fn wanted(f: ManagedFile) -> Wanted {
    Wanted {
        path: f.path,
        content: f.content,
        mode: f.mode,
        owner: f.owner,
        group: f.group,
        restart_units: f.restart_units,
        template: f.template,
    }
}

/// The local zoned, over gRPC.
#[derive(Debug, Clone)]
pub struct Grpc {
    channel: Channel,
}

impl Grpc {
    pub fn new(channel: Channel) -> Grpc {
        Grpc { channel }
    }

    fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel.clone()).max_decoding_message_size(256 << 20)
    }

    fn lock_txn(compare: Compare, op: request_op::Request) -> TxnRequest {
        TxnRequest {
            compare: vec![compare],
            success: vec![RequestOp { request: Some(op) }],
            failure: Vec::new(),
        }
    }
}

impl Store for Grpc {
    async fn services(&mut self) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let r = self
            .kv()
            .range(RangeRequest {
                prefix: SERVICES_KEY.to_vec(),
                limit: 0,
                serializable: false,
                keys_only: false,
            })
            .await?
            .into_inner();
        let Some(kv) = r.kvs.into_iter().find(|kv| kv.key == SERVICES_KEY) else {
            return Ok((Vec::new(), Vec::new()));
        };
        let s = zone_proto::v1::ZoneServices::decode(kv.value.as_slice())
            .map_err(|e| anyhow::anyhow!("decoding the zone's services: {e}"))?;
        Ok((s.leader_units, s.everywhere_units))
    }

    async fn files(&mut self) -> Result<Files, StoreError> {
        let r = self
            .kv()
            .range(RangeRequest {
                prefix: FILE_PREFIX.to_vec(),
                limit: 0,
                serializable: false,
                keys_only: false,
            })
            .await?
            .into_inner();
        let header = r.header.unwrap_or_default();
        let mut out = Vec::new();
        for kv in r.kvs {
            let f = ManagedFile::decode(kv.value.as_slice()).map_err(|e| {
                anyhow::anyhow!("decoding {}: {e}", String::from_utf8_lossy(&kv.key))
            })?;
            out.push(wanted(f));
        }
        Ok(Files {
            wanted: out,
            revision: header.revision,
            me: header.member_id,
        })
    }

    async fn member(&mut self, id: u64) -> Result<NodeVars, StoreError> {
        let members = ClusterClient::new(self.channel.clone())
            .members(MembersRequest {})
            .await?
            .into_inner()
            .members;
        let me = members
            .iter()
            .find(|m| m.id == id)
            .ok_or_else(|| anyhow::anyhow!("server {id} is not in the zone's membership"))?;
        Ok(NodeVars::from_member(me.id, &me.name, &me.peer_endpoint))
    }

    async fn report(&mut self, report: &SyncReport) -> Result<(), StoreError> {
        self.kv()
            .put(PutRequest {
                key: [STATUS_PREFIX, report.id.to_string().as_bytes()].concat(),
                value: report.encode(),
                prev_kv: false,
            })
            .await?;
        Ok(())
    }

    async fn reports(&mut self) -> Result<Vec<SyncReport>, StoreError> {
        let kvs = self
            .kv()
            .range(RangeRequest {
                prefix: STATUS_PREFIX.to_vec(),
                limit: 0,
                serializable: false,
                keys_only: false,
            })
            .await?
            .into_inner()
            .kvs;
        Ok(kvs
            .iter()
            .filter_map(|kv| SyncReport::decode(&kv.value))
            .collect())
    }

    async fn zone(&mut self) -> Result<ZoneNow, StoreError> {
        let s = ClusterClient::new(self.channel.clone())
            .status(StatusRequest {})
            .await?
            .into_inner();
        Ok(ZoneNow {
            leader: s.leader_id,
            reachable: s
                .servers
                .iter()
                .filter(|s| s.error.is_empty())
                .map(|s| s.id)
                .collect(),
        })
    }

    async fn lock(&mut self) -> Result<Option<Held>, StoreError> {
        let held = self
            .kv()
            .get(GetRequest {
                key: ROLL_LOCK.to_vec(),
                serializable: false,
            })
            .await?
            .into_inner()
            .kv;
        Ok(held.map(|kv| Held {
            value: kv.value,
            revision: kv.mod_revision,
        }))
    }

    async fn swap_lock(&mut self, held: Option<&Held>, value: Vec<u8>) -> Result<bool, StoreError> {
        let compare = match held {
            None => Compare {
                key: ROLL_LOCK.to_vec(),
                target: compare::Target::Version as i32,
                op: compare::Op::Equal as i32,
                target_value: Some(compare::TargetValue::Version(0)),
            },
            Some(h) => Compare {
                key: ROLL_LOCK.to_vec(),
                target: compare::Target::ModRevision as i32,
                op: compare::Op::Equal as i32,
                target_value: Some(compare::TargetValue::ModRevision(h.revision)),
            },
        };
        let put = request_op::Request::Put(PutRequest {
            key: ROLL_LOCK.to_vec(),
            value,
            prev_kv: false,
        });
        let r = self
            .kv()
            .txn(Self::lock_txn(compare, put))
            .await?
            .into_inner();
        Ok(r.succeeded)
    }

    async fn release_lock(&mut self, mine: Vec<u8>) -> Result<(), StoreError> {
        self.kv()
            .txn(Self::lock_txn(
                Compare {
                    key: ROLL_LOCK.to_vec(),
                    target: compare::Target::Value as i32,
                    op: compare::Op::Equal as i32,
                    target_value: Some(compare::TargetValue::Value(mine)),
                },
                request_op::Request::Delete(DeleteRequest {
                    key: ROLL_LOCK.to_vec(),
                    prefix: false,
                    prev_kv: false,
                }),
            ))
            .await?;
        Ok(())
    }
}

/// A zone in memory, as the unit tests set it up.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    pub files: Vec<Wanted>,
    pub revision: u64,
    /// The server these calls reach.
    pub me: u64,
    pub members: BTreeMap<u64, NodeVars>,
    pub reports: BTreeMap<u64, SyncReport>,
    /// How many reports were written.
    pub reports_written: usize,
    pub zone: ZoneNow,
    pub lock: Option<Held>,
}

impl Store for Memory {
    async fn files(&mut self) -> Result<Files, StoreError> {
        Ok(Files {
            wanted: self.files.clone(),
            revision: self.revision,
            me: self.me,
        })
    }

    async fn member(&mut self, id: u64) -> Result<NodeVars, StoreError> {
        self.members
            .get(&id)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("server {id} is not in the zone's membership"))
    }

    async fn report(&mut self, report: &SyncReport) -> Result<(), StoreError> {
        self.reports.insert(report.id, report.clone());
        self.reports_written += 1;
        Ok(())
    }

    async fn reports(&mut self) -> Result<Vec<SyncReport>, StoreError> {
        Ok(self.reports.values().cloned().collect())
    }

    async fn zone(&mut self) -> Result<ZoneNow, StoreError> {
        Ok(self.zone.clone())
    }

    async fn lock(&mut self) -> Result<Option<Held>, StoreError> {
        Ok(self.lock.clone())
    }

    async fn swap_lock(&mut self, held: Option<&Held>, value: Vec<u8>) -> Result<bool, StoreError> {
        if self.lock.as_ref() != held {
            return Ok(false);
        }
        self.revision += 1;
        self.lock = Some(Held {
            value,
            revision: self.revision,
        });
        Ok(true)
    }

    async fn release_lock(&mut self, mine: Vec<u8>) -> Result<(), StoreError> {
        if self.lock.as_ref().is_some_and(|h| h.value == mine) {
            self.lock = None;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_is_taken_when_free_mine_or_stale_only() {
        let stale = Duration::from_secs(480);
        assert!(may_take(None, 2, 1000, stale));
        assert!(may_take(Some(b"2 900"), 2, 1000, stale), "mine");
        assert!(
            !may_take(Some(b"3 900"), 2, 1000, stale),
            "another's, fresh"
        );
        assert!(may_take(Some(b"3 500"), 2, 1000, stale), "another's, stale");
        assert!(
            may_take(Some(b"garbage"), 2, 1000, stale),
            "unreadable: stale"
        );
    }
}
