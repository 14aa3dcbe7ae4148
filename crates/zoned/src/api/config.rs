//! The Config service: managed configuration files in the replicated store
//! (their model, checks and planning are the `zone-files` crate's).
//!
//! Every push is checked here, on the server, before anything is stored:
//! the path is under a managed root and in normal form, the sizes are
//! within `[files]` limits (per file and in total), the owner, group and
//! unit names are plausible, and a template parses. What is refused changes
//! nothing anywhere.
//!
//! Layout in the key space (the `zone/` prefix is the zone's own):
//! - `zone/config/file<path>`: the current version (prost `ManagedFile`);
//! - `zone/config/hist<path>\0<seq>`: every version, deletions included,
//!   the newest `history_per_file` per path, for `history` and `rollback`;
//! - `zone/config/gen`: `<seq> <total bytes>`, rewritten by every change.
//!   Each change is one transaction that compares `gen`'s mod revision
//!   with the one it read, so concurrent pushes serialise and the totals
//!   stay exact.

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message as _;
use tonic::{Request, Response, Status};
use zone_files::keys::{file_key, hist_key, hist_prefix, Gen, FILE_PREFIX, GEN_KEY, HIST_PREFIX};
use zone_files::paths::Roots;
use zone_files::policy::Policy;
use zone_files::rollback::{plan_rollback, same, Change};
use zone_proto::v1::{
    config_server, request_op, DeleteFileRequest, DeleteFileResponse, DeleteRequest,
    FileHistoryRequest, FileHistoryResponse, GetFileRequest, GetFileResponse, GetRequest, KeyValue,
    ListFilesRequest, ListFilesResponse, ManagedFile, PushFileRequest, PushFileResponse,
    PutRequest, RangeRequest, ReadLocalRequest, ReadLocalResponse, RequestOp, RollbackRequest,
    RollbackResponse,
};

use super::error::bad;
use super::{ApiError, ServerContext};

/// How many times a change is retried when another change raced it.
const ATTEMPTS: usize = 5;

fn decode(kv: &KeyValue) -> Result<ManagedFile, ApiError> {
    let mut f = ManagedFile::decode(kv.value.as_slice()).map_err(|e| {
        ApiError::FailedPrecondition(format!(
            "stored file {} cannot be decoded: {e}",
            String::from_utf8_lossy(&kv.key)
        ))
    })?;
    f.revision = kv.mod_revision;
    Ok(f)
}

fn without_content(mut f: ManagedFile) -> ManagedFile {
    f.content.clear();
    f
}

fn put(key: Vec<u8>, value: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::Put(PutRequest {
            key,
            value,
            prev_kv: false,
        })),
    }
}

fn del(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::Delete(DeleteRequest {
            key,
            prefix: false,
            prev_kv: false,
        })),
    }
}

#[derive(Debug, Clone)]
pub struct ConfigService {
    zone: ServerContext,
    policy: Policy,
}

impl ConfigService {
    pub fn new(zone: ServerContext, policy: Policy) -> ConfigService {
        ConfigService { zone, policy }
    }

    fn read_gen(&self) -> Result<Gen, ApiError> {
        let (kv, _) = self.zone.reader().get(&GetRequest {
            key: GEN_KEY.to_vec(),
            serializable: true,
        })?;
        Ok(Gen::read(kv.as_ref()))
    }

    fn read_file(&self, path: &str) -> Result<Option<ManagedFile>, ApiError> {
        let (kv, _) = self.zone.reader().get(&GetRequest {
            key: file_key(path),
            serializable: true,
        })?;
        kv.as_ref().map(decode).transpose()
    }

    fn read_history(&self, prefix: Vec<u8>) -> Result<Vec<(Vec<u8>, ManagedFile)>, ApiError> {
        let (kvs, _, _) = self.zone.reader().range(&RangeRequest {
            prefix,
            limit: 0,
            serializable: true,
            keys_only: false,
        })?;
        kvs.iter()
            .map(|kv| Ok((kv.key.clone(), decode(kv)?)))
            .collect()
    }

    /// Ops that record `version` in a path's history and drop what falls
    /// out of the kept window.
    fn history_ops(
        &self,
        path: &str,
        seq: u64,
        version: &ManagedFile,
        kept: &[(Vec<u8>, ManagedFile)],
    ) -> Vec<RequestOp> {
        let mut ops = vec![put(hist_key(path, seq), version.encode_to_vec())];
        let keep = self.policy.history_per_file.max(1);
        let excess = (kept.len() + 1).saturating_sub(keep);
        for (key, _) in kept.iter().take(excess) {
            ops.push(del(key.clone()));
        }
        ops
    }

    /// Runs `ops` if nothing changed the managed files since `gen` was read.
    async fn commit(
        &self,
        gen: Gen,
        mut ops: Vec<RequestOp>,
        seq: u64,
        total: u64,
        budget: Duration,
    ) -> Result<Option<u64>, ApiError> {
        ops.push(put(GEN_KEY.to_vec(), Gen::value(seq, total)));
        self.zone
            .write_if_unchanged(GEN_KEY, gen.mod_revision, ops, budget)
            .await
    }

    fn raced() -> ApiError {
        ApiError::NotApplied(format!(
            "other configuration changes kept racing this one ({ATTEMPTS} attempts); it was not applied, retry"
        ))
    }

    pub async fn push(
        &self,
        mut f: ManagedFile,
        budget: Duration,
    ) -> Result<PushFileResponse, ApiError> {
        self.policy.check(&mut f)?;
        for _ in 0..ATTEMPTS {
            self.zone.linearize(budget).await?;
            let gen = self.read_gen()?;
            let current = self.read_file(&f.path)?;
            if let Some(cur) = current.as_ref().filter(|c| same(c, &f)) {
                return Ok(PushFileResponse {
                    header: self.zone.header(self.zone.reader().revision()?),
                    file: Some(without_content(cur.clone())),
                    changed: false,
                });
            }
            let old_size = current.as_ref().map_or(0, |c| c.size);
            let total = gen.total.saturating_sub(old_size) + f.size;
            if total > self.policy.max_total_bytes {
                return Err(bad(
                    "file.content",
                    format!(
                        "the managed files would take {total} bytes, over the limit of {} (files.max_total_bytes)",
                        self.policy.max_total_bytes
                    ),
                ));
            }
            let kept = self.read_history(hist_prefix(&f.path))?;
            let mut stored = f.clone();
            stored.version = kept.last().map_or(0, |(_, v)| v.version) + 1;
            let seq = gen.seq + 1;
            let mut ops = vec![put(file_key(&f.path), stored.encode_to_vec())];
            ops.extend(self.history_ops(&f.path, seq, &stored, &kept));
            if let Some(revision) = self.commit(gen, ops, seq, total, budget).await? {
                stored.revision = revision;
                return Ok(PushFileResponse {
                    header: self.zone.header(revision),
                    file: Some(without_content(stored)),
                    changed: true,
                });
            }
        }
        Err(Self::raced())
    }

    pub async fn delete(
        &self,
        path: &str,
        budget: Duration,
    ) -> Result<DeleteFileResponse, ApiError> {
        // Normal form only: a file stored under a root since dropped from
        // the configuration can still be deleted.
        if Roots::new([path]).is_err() {
            return Err(bad(
                "path",
                format!("`{path}` is not an absolute path in normal form"),
            ));
        }
        for _ in 0..ATTEMPTS {
            self.zone.linearize(budget).await?;
            let gen = self.read_gen()?;
            let Some(current) = self.read_file(path)? else {
                return Ok(DeleteFileResponse {
                    header: self.zone.header(self.zone.reader().revision()?),
                    deleted: false,
                });
            };
            let kept = self.read_history(hist_prefix(path))?;
            let tomb = ManagedFile {
                path: path.to_owned(),
                deleted: true,
                version: kept.last().map_or(0, |(_, v)| v.version) + 1,
                ..ManagedFile::default()
            };
            let seq = gen.seq + 1;
            let total = gen.total.saturating_sub(current.size);
            let mut ops = vec![del(file_key(path))];
            ops.extend(self.history_ops(path, seq, &tomb, &kept));
            if let Some(revision) = self.commit(gen, ops, seq, total, budget).await? {
                return Ok(DeleteFileResponse {
                    header: self.zone.header(revision),
                    deleted: true,
                });
            }
        }
        Err(Self::raced())
    }

    pub async fn rollback(&self, to: u64, budget: Duration) -> Result<RollbackResponse, ApiError> {
        for _ in 0..ATTEMPTS {
            self.zone.linearize(budget).await?;
            let gen = self.read_gen()?;
            let now = self.zone.reader().revision()?;
            if to > now {
                return Err(bad(
                    "to_revision",
                    format!("{to} is in the future: the store is at revision {now}"),
                ));
            }
            let history = self.read_history(HIST_PREFIX.to_vec())?;
            let (kvs, _, _) = self.zone.reader().range(&RangeRequest {
                prefix: FILE_PREFIX.to_vec(),
                limit: 0,
                serializable: true,
                keys_only: false,
            })?;
            let mut current = BTreeMap::new();
            for kv in &kvs {
                let f = decode(kv)?;
                current.insert(f.path.clone(), f);
            }
            let versions: Vec<ManagedFile> = history.iter().map(|(_, v)| v.clone()).collect();
            let changes = plan_rollback(&versions, &current, to)?;
            if changes.is_empty() {
                return Ok(RollbackResponse {
                    header: self.zone.header(now),
                    changed: Vec::new(),
                    removed: Vec::new(),
                });
            }
            let mut ops = Vec::new();
            let mut total = gen.total;
            let mut seq = gen.seq;
            let mut changed = Vec::new();
            let mut removed = Vec::new();
            for change in changes {
                let path = match &change {
                    Change::Write(f) => f.path.clone(),
                    Change::Remove(p) => p.clone(),
                };
                let kept: Vec<(Vec<u8>, ManagedFile)> = history
                    .iter()
                    .filter(|(_, v)| v.path == path)
                    .cloned()
                    .collect();
                let next_version = kept.last().map_or(0, |(_, v)| v.version) + 1;
                let old_size = current.get(&path).map_or(0, |c| c.size);
                seq += 1;
                let version = match change {
                    Change::Write(mut f) => {
                        f.version = next_version;
                        f.revision = 0;
                        total = total.saturating_sub(old_size) + f.size;
                        ops.push(put(file_key(&path), f.encode_to_vec()));
                        f
                    }
                    Change::Remove(_) => {
                        removed.push(path.clone());
                        total = total.saturating_sub(old_size);
                        ops.push(del(file_key(&path)));
                        ManagedFile {
                            path: path.clone(),
                            deleted: true,
                            version: next_version,
                            ..ManagedFile::default()
                        }
                    }
                };
                ops.extend(self.history_ops(&path, seq, &version, &kept));
                changed.push(path);
            }
            if let Some(revision) = self.commit(gen, ops, seq, total, budget).await? {
                return Ok(RollbackResponse {
                    header: self.zone.header(revision),
                    changed,
                    removed,
                });
            }
        }
        Err(Self::raced())
    }
}

#[tonic::async_trait]
impl config_server::Config for ConfigService {
    async fn push(
        &self,
        req: Request<PushFileRequest>,
    ) -> Result<Response<PushFileResponse>, Status> {
        let budget = self.zone.budget(&req);
        let file = req
            .into_inner()
            .file
            .ok_or_else(|| bad("file", "missing"))?;
        Ok(Response::new(
            ConfigService::push(self, file, budget).await?,
        ))
    }

    async fn get(&self, req: Request<GetFileRequest>) -> Result<Response<GetFileResponse>, Status> {
        let budget = self.zone.budget(&req);
        let path = req.into_inner().path;
        self.zone.linearize(budget).await?;
        let revision = self.zone.reader().revision().map_err(ApiError::from)?;
        match self.read_file(&path)? {
            Some(file) => Ok(Response::new(GetFileResponse {
                header: self.zone.header(revision),
                file: Some(file),
            })),
            None => Err(ApiError::NotFound(format!("no managed file {path}")).into()),
        }
    }

    async fn list(
        &self,
        req: Request<ListFilesRequest>,
    ) -> Result<Response<ListFilesResponse>, Status> {
        let budget = self.zone.budget(&req);
        self.zone.linearize(budget).await?;
        let (kvs, _, revision) = self
            .zone
            .reader()
            .range(&RangeRequest {
                prefix: FILE_PREFIX.to_vec(),
                limit: 0,
                serializable: true,
                keys_only: false,
            })
            .map_err(ApiError::from)?;
        let files = kvs
            .iter()
            .map(|kv| decode(kv).map(without_content))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(ListFilesResponse {
            header: self.zone.header(revision),
            files,
        }))
    }

    async fn delete(
        &self,
        req: Request<DeleteFileRequest>,
    ) -> Result<Response<DeleteFileResponse>, Status> {
        let budget = self.zone.budget(&req);
        let path = req.into_inner().path;
        Ok(Response::new(
            ConfigService::delete(self, &path, budget).await?,
        ))
    }

    async fn history(
        &self,
        req: Request<FileHistoryRequest>,
    ) -> Result<Response<FileHistoryResponse>, Status> {
        let budget = self.zone.budget(&req);
        let path = req.into_inner().path;
        self.zone.linearize(budget).await?;
        let revision = self.zone.reader().revision().map_err(ApiError::from)?;
        let prefix = if path.is_empty() {
            HIST_PREFIX.to_vec()
        } else {
            hist_prefix(&path)
        };
        let mut versions: Vec<ManagedFile> = self
            .read_history(prefix)?
            .into_iter()
            .map(|(_, v)| without_content(v))
            .collect();
        versions.sort_by(|a, b| b.revision.cmp(&a.revision).then(a.path.cmp(&b.path)));
        Ok(Response::new(FileHistoryResponse {
            header: self.zone.header(revision),
            versions,
        }))
    }

    async fn rollback(
        &self,
        req: Request<RollbackRequest>,
    ) -> Result<Response<RollbackResponse>, Status> {
        let budget = self.zone.budget(&req);
        let to = req.into_inner().to_revision;
        Ok(Response::new(
            ConfigService::rollback(self, to, budget).await?,
        ))
    }

    async fn read_local(
        &self,
        req: Request<ReadLocalRequest>,
    ) -> Result<Response<ReadLocalResponse>, Status> {
        let path = req.into_inner().path;
        let policy = self.policy.clone();
        let copy = tokio::task::spawn_blocking(move || policy.read_local(&path))
            .await
            .map_err(|e| Status::internal(format!("reading the local copy: {e}")))?
            .map_err(ApiError::from)?;
        let (id, name) = self.zone.identity();
        let revision = self.zone.reader().revision().map_err(ApiError::from)?;
        Ok(Response::new(ReadLocalResponse {
            header: self.zone.header(revision),
            id,
            name: name.to_owned(),
            exists: copy.exists,
            content: copy.content,
            mode: copy.mode,
            owner: copy.owner,
            group: copy.group,
        }))
    }
}
