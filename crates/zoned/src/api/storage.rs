//! The Storage service: the zone's shared datastores, declared once (their
//! model and checks are the `zone-datastores` crate's; zone-mounts mounts
//! them on every server and reports their health to its zoned).
//!
//! Layout in the key space: `zone/storage/ds/<name>` (prost `Datastore`)
//! and `zone/storage/gen`, rewritten by every change. Each change is one
//! transaction comparing `gen`'s mod revision with the one read before the
//! checks, so two declarations racing for one target cannot both pass: the
//! second is checked again against the first, and refused.

use std::time::Duration;

use prost::Message as _;
use tonic::{Request, Response, Status};
use zone_datastores::{DS_PREFIX, GEN_KEY};
use zone_proto::v1::{
    request_op, storage_server, AddDatastoreRequest, AddDatastoreResponse, Datastore,
    DeleteRequest, GetRequest, KeyValue, ListDatastoresRequest, ListDatastoresResponse, PutRequest,
    RangeRequest, RemoveDatastoreRequest, RemoveDatastoreResponse, RequestOp,
};

use super::error::bad;
use super::{ApiError, ServerContext};

/// How many times a change is retried when another change raced it.
const ATTEMPTS: usize = 5;

#[derive(Debug, Clone)]
pub struct StorageService {
    zone: ServerContext,
}

fn decode(kv: &KeyValue) -> Result<Datastore, ApiError> {
    let mut d = Datastore::decode(kv.value.as_slice()).map_err(|e| {
        ApiError::FailedPrecondition(format!(
            "stored datastore {} cannot be decoded: {e}",
            String::from_utf8_lossy(&kv.key)
        ))
    })?;
    d.revision = kv.mod_revision;
    Ok(d)
}

/// Every declared datastore, as this server applied them.
pub(crate) fn declared(reader: &crate::kv::Reader) -> Result<Vec<Datastore>, ApiError> {
    let (kvs, _, _) = reader.range(&RangeRequest {
        prefix: DS_PREFIX.to_vec(),
        limit: 0,
        serializable: true,
        keys_only: false,
    })?;
    kvs.iter().map(decode).collect()
}

impl StorageService {
    pub fn new(zone: ServerContext) -> StorageService {
        StorageService { zone }
    }

    /// The declarations and `gen`'s mod revision (0: never written), read
    /// from this server's applied state.
    fn read(&self) -> Result<(Vec<Datastore>, u64), ApiError> {
        let reader = self.zone.reader();
        let (gen, _) = reader.get(&GetRequest {
            key: GEN_KEY.to_vec(),
            serializable: true,
        })?;
        Ok((declared(reader)?, gen.map_or(0, |g| g.mod_revision)))
    }

    /// Runs `op` and rewrites `gen` if nothing changed the declarations
    /// since `gen` was read at `seen`; the revision, or None when raced.
    async fn commit(
        &self,
        seen: u64,
        op: request_op::Request,
        budget: Duration,
    ) -> Result<Option<u64>, ApiError> {
        let ops = vec![
            RequestOp { request: Some(op) },
            RequestOp {
                request: Some(request_op::Request::Put(PutRequest {
                    key: GEN_KEY.to_vec(),
                    value: Vec::new(),
                    prev_kv: false,
                })),
            },
        ];
        self.zone
            .write_if_unchanged(GEN_KEY, seen, ops, budget)
            .await
    }

    fn raced() -> ApiError {
        ApiError::NotApplied(format!(
            "other datastore changes kept racing this one ({ATTEMPTS} attempts); it was not applied, retry"
        ))
    }

    pub async fn add(
        &self,
        mut ds: Datastore,
        budget: Duration,
    ) -> Result<AddDatastoreResponse, ApiError> {
        ds.revision = 0;
        // The declaration's own fields first, so that a bad one is refused
        // without waiting for the zone.
        zone_datastores::check(&mut ds, &[]).map_err(|e| bad(&e.field, e.reason))?;
        for _ in 0..ATTEMPTS {
            self.zone.linearize(budget).await?;
            let (all, seen) = self.read()?;
            zone_datastores::check(&mut ds, &all).map_err(|e| bad(&e.field, e.reason))?;
            if let Some(cur) = all.iter().find(|d| d.name == ds.name) {
                return Ok(AddDatastoreResponse {
                    header: self.zone.header(self.zone.reader().revision()?),
                    datastore: Some(cur.clone()),
                    changed: false,
                });
            }
            let put = request_op::Request::Put(PutRequest {
                key: zone_datastores::key(&ds.name),
                value: ds.encode_to_vec(),
                prev_kv: false,
            });
            if let Some(revision) = self.commit(seen, put, budget).await? {
                ds.revision = revision;
                return Ok(AddDatastoreResponse {
                    header: self.zone.header(revision),
                    datastore: Some(ds),
                    changed: true,
                });
            }
        }
        Err(Self::raced())
    }

    pub async fn remove(
        &self,
        name: &str,
        budget: Duration,
    ) -> Result<RemoveDatastoreResponse, ApiError> {
        for _ in 0..ATTEMPTS {
            self.zone.linearize(budget).await?;
            let (all, seen) = self.read()?;
            if !all.iter().any(|d| d.name == name) {
                return Err(ApiError::NotFound(format!(
                    "no datastore named `{}` (zonectl storage ls)",
                    name.escape_debug()
                )));
            }
            let del = request_op::Request::Delete(DeleteRequest {
                key: zone_datastores::key(name),
                prefix: false,
                prev_kv: false,
            });
            if let Some(revision) = self.commit(seen, del, budget).await? {
                return Ok(RemoveDatastoreResponse {
                    header: self.zone.header(revision),
                });
            }
        }
        Err(Self::raced())
    }
}

#[tonic::async_trait]
impl storage_server::Storage for StorageService {
    async fn add(
        &self,
        req: Request<AddDatastoreRequest>,
    ) -> Result<Response<AddDatastoreResponse>, Status> {
        let budget = self.zone.budget(&req);
        let ds = req
            .into_inner()
            .datastore
            .ok_or_else(|| bad("datastore", "missing"))?;
        Ok(Response::new(StorageService::add(self, ds, budget).await?))
    }

    async fn remove(
        &self,
        req: Request<RemoveDatastoreRequest>,
    ) -> Result<Response<RemoveDatastoreResponse>, Status> {
        let budget = self.zone.budget(&req);
        let name = req.into_inner().name;
        Ok(Response::new(
            StorageService::remove(self, &name, budget).await?,
        ))
    }

    async fn list(
        &self,
        req: Request<ListDatastoresRequest>,
    ) -> Result<Response<ListDatastoresResponse>, Status> {
        let budget = self.zone.budget(&req);
        self.zone.linearize(budget).await?;
        let revision = self.zone.reader().revision().map_err(ApiError::from)?;
        let (datastores, _) = self.read()?;
        Ok(Response::new(ListDatastoresResponse {
            header: self.zone.header(revision),
            datastores,
        }))
    }
}
