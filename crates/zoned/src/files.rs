//! The Config service: managed configuration files in the replicated store.
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
use sha2::Digest as _;
use tonic::{Request, Response, Status};
use zone_proto::v1::{
    command, command_result, compare, config_server, request_op, Compare, DeleteFileRequest,
    DeleteFileResponse, DeleteRequest, FileHistoryRequest, FileHistoryResponse, GetFileRequest,
    GetFileResponse, GetRequest, KeyValue, ListFilesRequest, ListFilesResponse, ManagedFile,
    PushFileRequest, PushFileResponse, PutRequest, RangeRequest, ReadLocalRequest,
    ReadLocalResponse, RequestOp, RollbackRequest, RollbackResponse, TxnRequest,
};
use zone_sync::paths::Roots;

use crate::api::{ApiError, ServerContext};

pub use zone_sync::keys::{FILE_PREFIX, GEN_KEY, HIST_PREFIX};

/// How many times a change is retried when another change raced it.
const ATTEMPTS: usize = 5;

fn file_key(path: &str) -> Vec<u8> {
    [FILE_PREFIX, path.as_bytes()].concat()
}

fn hist_prefix(path: &str) -> Vec<u8> {
    [HIST_PREFIX, path.as_bytes(), b"\0"].concat()
}

fn hist_key(path: &str, seq: u64) -> Vec<u8> {
    [hist_prefix(path), format!("{seq:020}").into_bytes()].concat()
}

fn bad(field: &str, reason: impl Into<String>) -> ApiError {
    ApiError::InvalidArgument {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// The `[files]` limits and roots, checked once at start.
#[derive(Debug, Clone)]
pub struct Policy {
    pub roots: Roots,
    pub max_file_bytes: u64,
    pub max_total_bytes: u64,
    pub history_per_file: usize,
    /// Where this server's copies live (`/` on an appliance).
    pub local_root: std::path::PathBuf,
}

fn plausible_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | '\\'))
}

impl Policy {
    /// Checks a pushed file; fills in the defaults it leaves out.
    pub fn check(&self, f: &mut ManagedFile) -> Result<(), ApiError> {
        self.roots
            .check(&f.path)
            .map_err(|e| bad("file.path", e.to_string()))?;
        if f.content.len() as u64 > self.max_file_bytes {
            return Err(bad(
                "file.content",
                format!(
                    "{} bytes, over the limit of {} (files.max_file_bytes)",
                    f.content.len(),
                    self.max_file_bytes
                ),
            ));
        }
        if f.mode == 0 {
            f.mode = 0o644;
        }
        if f.mode > 0o7777 {
            return Err(bad(
                "file.mode",
                format!("{:o} is not a permission mode (at most 7777 octal)", f.mode),
            ));
        }
        for (field, v) in [("file.owner", &f.owner), ("file.group", &f.group)] {
            if !v.is_empty() && !plausible_name(v) {
                return Err(bad(field, format!("`{v}` is not a user or group name")));
            }
        }
        if let Some(u) = f.restart_units.iter().find(|u| !plausible_name(u)) {
            return Err(bad(
                "file.restart_units",
                format!("`{u}` is not a systemd unit name"),
            ));
        }
        if f.template {
            let text = std::str::from_utf8(&f.content)
                .map_err(|_| bad("file.content", "a template must be UTF-8 text"))?;
            zone_sync::template::Template::parse(text)
                .map_err(|e| bad("file.content", e.to_string()))?;
        }
        f.size = f.content.len() as u64;
        f.sha256 = format!("{:x}", sha2::Sha256::digest(&f.content));
        f.revision = 0;
        f.version = 0;
        f.deleted = false;
        Ok(())
    }
}

/// This server's own copy of a managed path, read under `local_root`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalCopy {
    pub exists: bool,
    pub content: Vec<u8>,
    pub mode: u32,
    pub owner: String,
    pub group: String,
}

impl Policy {
    /// Reads `path` from this server's disk: only under a managed root,
    /// never through a symbolic link, only a regular file, at most
    /// `max_file_bytes` (what could not be pushed is not worth reading).
    pub fn read_local(&self, path: &str) -> Result<LocalCopy, ApiError> {
        use std::io::Read as _;
        use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
        zone_sync::paths::check_on_disk(&self.roots, &self.local_root, path)
            .map_err(|e| bad("path", e.to_string()))?;
        let on_disk = self.local_root.join(path.trim_start_matches('/'));
        let file = match std::fs::OpenOptions::new()
            .read(true)
            // The last component too: no link, whatever raced the check.
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&on_disk)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(LocalCopy::default());
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
                return Err(bad(
                    "path",
                    format!("{path} is a symbolic link on this server: refused"),
                ));
            }
            Err(e) => {
                return Err(ApiError::FailedPrecondition(format!(
                    "cannot open {path} on this server: {e}"
                )))
            }
        };
        let meta = file.metadata().map_err(|e| {
            ApiError::FailedPrecondition(format!("cannot stat {path} on this server: {e}"))
        })?;
        if !meta.is_file() {
            return Err(bad(
                "path",
                format!("{path} is not a regular file on this server"),
            ));
        }
        if meta.len() > self.max_file_bytes {
            return Err(bad(
                "path",
                format!(
                    "{path} is {} bytes on this server, over the limit of {} (files.max_file_bytes)",
                    meta.len(),
                    self.max_file_bytes
                ),
            ));
        }
        let mut content = Vec::with_capacity(meta.len() as usize);
        file.take(self.max_file_bytes + 1)
            .read_to_end(&mut content)
            .map_err(|e| {
                ApiError::FailedPrecondition(format!("cannot read {path} on this server: {e}"))
            })?;
        let owner = nix::unistd::User::from_uid(meta.uid().into())
            .ok()
            .flatten()
            .map_or_else(|| meta.uid().to_string(), |u| u.name);
        let group = nix::unistd::Group::from_gid(meta.gid().into())
            .ok()
            .flatten()
            .map_or_else(|| meta.gid().to_string(), |g| g.name);
        Ok(LocalCopy {
            exists: true,
            content,
            mode: meta.mode() & 0o7777,
            owner,
            group,
        })
    }
}

/// The `gen` key as read.
#[derive(Debug, Clone, Copy, Default)]
struct Gen {
    seq: u64,
    total: u64,
    mod_revision: u64,
}

fn parse_gen(kv: Option<&KeyValue>) -> Gen {
    let Some(kv) = kv else {
        return Gen::default();
    };
    let text = String::from_utf8_lossy(&kv.value);
    let mut it = text
        .split_whitespace()
        .map(|s| s.parse::<u64>().unwrap_or(0));
    Gen {
        seq: it.next().unwrap_or(0),
        total: it.next().unwrap_or(0),
        mod_revision: kv.mod_revision,
    }
}

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

/// Same content and settings: pushing it again changes nothing.
fn same(a: &ManagedFile, b: &ManagedFile) -> bool {
    a.path == b.path
        && a.content == b.content
        && a.mode == b.mode
        && a.owner == b.owner
        && a.group == b.group
        && a.restart_units == b.restart_units
        && a.template == b.template
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

/// One change to one path, as a rollback plans it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Write(ManagedFile),
    Remove(String),
}

/// What to change so that every file is as it was right after revision
/// `to`, given the history kept (each version with its revision) and the
/// files now. Fails, naming the oldest revision it could restore, when the
/// history of a file changed since `to` does not reach back far enough.
pub fn plan_rollback(
    history: &[ManagedFile],
    current: &BTreeMap<String, ManagedFile>,
    to: u64,
) -> Result<Vec<Change>, ApiError> {
    let mut by_path: BTreeMap<&str, Vec<&ManagedFile>> = BTreeMap::new();
    for h in history {
        by_path.entry(&h.path).or_default().push(h);
    }
    let mut changes = Vec::new();
    let mut floor = 0;
    let paths: std::collections::BTreeSet<&str> = by_path
        .keys()
        .copied()
        .chain(current.keys().map(String::as_str))
        .collect();
    for path in paths {
        let mut versions = by_path.get(path).cloned().unwrap_or_default();
        versions.sort_by_key(|v| v.revision);
        let now = current.get(path);
        let changed_since = versions.last().is_some_and(|v| v.revision > to);
        if !changed_since {
            continue;
        }
        let then = versions.iter().rev().find(|v| v.revision <= to);
        match then {
            Some(v) if v.deleted => {
                if now.is_some() {
                    changes.push(Change::Remove(path.to_owned()));
                }
            }
            Some(v) => {
                if now.is_none_or(|n| !same(n, v)) {
                    changes.push(Change::Write((*v).clone()));
                }
            }
            None => {
                // Every version kept is newer than `to`: if the oldest is
                // the file's first, it did not exist then.
                let oldest = versions.first().expect("changed_since");
                if oldest.version == 1 {
                    if now.is_some() {
                        changes.push(Change::Remove(path.to_owned()));
                    }
                } else {
                    floor = floor.max(oldest.revision);
                }
            }
        }
    }
    if floor > 0 {
        return Err(ApiError::Compacted(format!(
            "the history kept does not reach back to revision {to}; the oldest revision that can be restored is {floor} (files.history_per_file)"
        )));
    }
    Ok(changes)
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
        Ok(parse_gen(kv.as_ref()))
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
        ops.push(put(GEN_KEY.to_vec(), format!("{seq} {total}").into_bytes()));
        let txn = TxnRequest {
            compare: vec![Compare {
                key: GEN_KEY.to_vec(),
                target: compare::Target::ModRevision as i32,
                op: compare::Op::Equal as i32,
                target_value: Some(compare::TargetValue::ModRevision(gen.mod_revision)),
            }],
            success: ops,
            failure: Vec::new(),
        };
        self.zone.check_enabled()?;
        let r = self.zone.write(command::Op::Txn(txn), budget).await?;
        match r.result {
            Some(command_result::Result::Txn(t)) if t.succeeded => {
                Ok(Some(t.header.map(|h| h.revision).unwrap_or_default()))
            }
            Some(command_result::Result::Txn(_)) => Ok(None),
            other => Err(ApiError::FailedPrecondition(format!(
                "unexpected answer to a configuration change: {other:?}"
            ))),
        }
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
            .map_err(|e| Status::internal(format!("reading the local copy: {e}")))??;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            roots: Roots::new(["/etc/zoned/managed", "/etc/one"]).unwrap(),
            max_file_bytes: 16,
            max_total_bytes: 64,
            history_per_file: 3,
            local_root: "/".into(),
        }
    }

    fn file(path: &str, content: &str) -> ManagedFile {
        ManagedFile {
            path: path.into(),
            content: content.as_bytes().to_vec(),
            ..ManagedFile::default()
        }
    }

    #[test]
    fn a_push_is_checked_field_by_field() {
        let p = policy();
        let mut ok = file("/etc/one/oned.conf", "x");
        p.check(&mut ok).unwrap();
        assert_eq!(ok.mode, 0o644);
        assert_eq!(ok.size, 1);
        assert_eq!(ok.sha256.len(), 64);
        let err = |mut f: ManagedFile| p.check(&mut f).unwrap_err().to_string();
        assert!(err(file("/etc/passwd", "x")).starts_with("file.path: "));
        assert!(err(file("/etc/one/../passwd", "x")).contains("normal form"));
        assert!(err(file("/etc/one/big", "0123456789abcdefX")).contains("files.max_file_bytes"));
        let mut m = file("/etc/one/a", "x");
        m.mode = 0o10000;
        assert!(err(m).starts_with("file.mode: "));
        let mut o = file("/etc/one/a", "x");
        o.owner = "root:root".into();
        assert!(err(o).starts_with("file.owner: "));
        let mut u = file("/etc/one/a", "x");
        u.restart_units = vec!["../x".into()];
        assert!(err(u).starts_with("file.restart_units: "));
        let mut t = file("/etc/one/a", "{{nope}}");
        t.template = true;
        assert!(err(t).contains("template line 1, column 1"));
    }

    fn version(path: &str, content: &str, revision: u64, version: u64) -> ManagedFile {
        let mut f = file(path, content);
        f.revision = revision;
        f.version = version;
        f
    }

    fn tomb(path: &str, revision: u64, version: u64) -> ManagedFile {
        ManagedFile {
            path: path.into(),
            deleted: true,
            revision,
            version,
            ..ManagedFile::default()
        }
    }

    #[test]
    fn rollback_restores_changed_removes_created_and_revives_deleted() {
        let history = vec![
            version("/etc/one/a", "a1", 10, 1),
            version("/etc/one/a", "a2", 20, 2),
            version("/etc/one/b", "b1", 12, 1),
            tomb("/etc/one/b", 22, 2),
            version("/etc/one/c", "c1", 25, 1),
            version("/etc/one/d", "d1", 5, 1),
        ];
        let mut current = BTreeMap::new();
        for f in [
            version("/etc/one/a", "a2", 20, 2),
            version("/etc/one/c", "c1", 25, 1),
            version("/etc/one/d", "d1", 5, 1),
        ] {
            current.insert(f.path.clone(), f);
        }
        let plan = plan_rollback(&history, &current, 15).unwrap();
        assert_eq!(
            plan,
            vec![
                Change::Write(version("/etc/one/a", "a1", 10, 1)),
                Change::Write(version("/etc/one/b", "b1", 12, 1)),
                Change::Remove("/etc/one/c".into()),
            ]
        );
        assert!(plan_rollback(&history, &current, 30).unwrap().is_empty());
    }

    #[test]
    fn rollback_past_the_kept_history_names_the_oldest_revision() {
        // Versions 1 and 2 of a fell out of the history kept.
        let history = vec![
            version("/etc/one/a", "a3", 30, 3),
            version("/etc/one/a", "a4", 40, 4),
        ];
        let current: BTreeMap<String, ManagedFile> =
            [("/etc/one/a".to_string(), version("/etc/one/a", "a4", 40, 4))].into();
        let e = plan_rollback(&history, &current, 20)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("oldest revision that can be restored is 30"),
            "{e}"
        );
        let plan = plan_rollback(&history, &current, 35).unwrap();
        assert_eq!(
            plan,
            vec![Change::Write(version("/etc/one/a", "a3", 30, 3))]
        );
    }

    #[test]
    fn a_local_copy_is_read_only_under_the_roots_and_never_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let p = Policy {
            local_root: dir.path().to_owned(),
            ..policy()
        };
        let one = dir.path().join("etc/one");
        std::fs::create_dir_all(&one).unwrap();
        std::fs::write(one.join("oned.conf"), "SERVER_ID = 0\n").unwrap();
        std::fs::write(dir.path().join("etc/secret"), "no").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(
            one.join("oned.conf"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        let copy = p.read_local("/etc/one/oned.conf").unwrap();
        assert!(copy.exists);
        assert_eq!(copy.content, b"SERVER_ID = 0\n");
        assert_eq!(copy.mode, 0o640);
        let me = nix::unistd::User::from_uid(nix::unistd::getuid())
            .unwrap()
            .unwrap();
        assert_eq!(copy.owner, me.name);

        assert_eq!(
            p.read_local("/etc/one/absent").unwrap(),
            LocalCopy::default()
        );
        let err = |path: &str| p.read_local(path).unwrap_err().to_string();
        assert!(err("/etc/secret").contains("outside the managed roots"));
        assert!(err("/etc/one/../secret").contains("normal form"));
        std::os::unix::fs::symlink(dir.path().join("etc/secret"), one.join("link")).unwrap();
        assert!(
            err("/etc/one/link").contains("symbolic link"),
            "{}",
            err("/etc/one/link")
        );
        std::os::unix::fs::symlink(dir.path().join("etc"), one.join("up")).unwrap();
        assert!(err("/etc/one/up/secret").contains("symbolic link"));
        std::fs::create_dir(one.join("dir")).unwrap();
        assert!(err("/etc/one/dir").contains("not a regular file"));
        std::fs::write(one.join("big"), "0123456789abcdefX").unwrap();
        assert!(err("/etc/one/big").contains("files.max_file_bytes"));
    }
}
