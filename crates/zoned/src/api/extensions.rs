//! `zone.v1.Extensions`: system extension images (a payload's files, for
//! systemd-sysext) that the zone wants on every server.
//!
//! An upload is received whole by the server the client reached, checked
//! against its announced size and sha256 and for a squashfs or erofs
//! image, and kept in `<data_dir>/extensions/<sha256>.raw`; only then is
//! `zone/ext/want/<name>` written, naming that server as its holder.
//!
//! Every server then acts on the wants it has applied ([`follow`]): it
//! fetches an image it lacks over the peer port (from the holder, or any
//! server that reported it merged), links it into `[extensions] dir` as
//! `NAME.raw` (a rename: the directory never shows half an image), removes
//! the extensions the zone no longer wants (only those it installed
//! itself: it keeps a list), runs `refresh_command` and `reload_command`,
//! checks that each extension is merged, fills in what the managed roots
//! lack from the payloads' defaults, and reports under
//! `zone/ext/state/<id>`. What fails is reported with why and tried again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use tonic::{Request, Response, Status, Streaming};
use zone_proto::v1::{
    command, command_result, extensions_server, request_op, AddExtensionResponse, BundleChunk,
    DeleteRequest, Extension, ExtensionChunk, ExtensionOnServer, ExtensionReport, ExtensionState,
    FetchExtensionRequest, GetRequest, ListExtensionsRequest, ListExtensionsResponse, PutRequest,
    RangeRequest, RemoveExtensionRequest, RemoveExtensionResponse, RequestOp, ServerExtensions,
};

use super::error::bad;
use super::transfer::{self, check_sha, FetchStream};
use super::{ApiError, ServerContext};

/// What the zone wants: `zone/ext/want/<name>`, an [`Extension`].
pub const WANT_PREFIX: &[u8] = b"zone/ext/want/";
/// Each server's report: `zone/ext/state/<id>`, an [`ExtensionReport`].
pub const STATE_PREFIX: &[u8] = b"zone/ext/state/";
/// The largest image taken.
pub const MAX_EXTENSION: u64 = 4 << 30;
/// How often a server looks at the wants it has applied, and tries again
/// what failed.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);
const RETRY_FAILED: Duration = Duration::from_secs(30);
/// The longest a refresh or reload command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

fn want_key(name: &str) -> Vec<u8> {
    [WANT_PREFIX, name.as_bytes()].concat()
}

fn state_key(id: u64) -> Vec<u8> {
    [STATE_PREFIX, id.to_string().as_bytes()].concat()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An extension's name ([`zone_proto::extension_name_ok`]).
pub fn check_name(name: &str) -> Result<(), ApiError> {
    if zone_proto::extension_name_ok(name) {
        Ok(())
    } else {
        Err(bad(
            "name",
            format!(
                "`{}`: {}",
                name.escape_debug(),
                zone_proto::EXTENSION_NAME_RULE
            ),
        ))
    }
}

/// The image's format by its magic: squashfs (`hsqs` at 0) or erofs
/// (0xE0F5E1E2, little-endian, at 1024), the two systemd-sysext merges as
/// plain file system images.
pub fn format_of(path: &Path) -> std::io::Result<Option<&'static str>> {
    use std::io::{Read as _, Seek as _};
    let mut f = std::fs::File::open(path)?;
    let mut head = [0u8; 4];
    if f.read_exact(&mut head).is_ok() && &head == b"hsqs" {
        return Ok(Some("squashfs"));
    }
    if f.seek(std::io::SeekFrom::Start(1024)).is_ok()
        && f.read_exact(&mut head).is_ok()
        && u32::from_le_bytes(head) == 0xE0F5_E1E2
    {
        return Ok(Some("erofs"));
    }
    Ok(None)
}

/// Where this server keeps images: the source of the others' fetches.
fn store_dir(zone: &ServerContext) -> PathBuf {
    zone.config().node.data_dir.join("extensions")
}

fn image_path(store: &Path, sha: &str) -> PathBuf {
    store.join(format!("{sha}.raw"))
}

/// The zone's wants, as this server has applied them, the revision read
/// at, and the latest revision that wrote one of them.
fn wants(zone: &ServerContext) -> Result<(Vec<Extension>, u64, u64), ApiError> {
    let (kvs, _, revision) = zone.reader().range(&RangeRequest {
        prefix: WANT_PREFIX.to_vec(),
        serializable: true,
        ..RangeRequest::default()
    })?;
    let latest = kvs.iter().map(|kv| kv.mod_revision).max().unwrap_or(0);
    let list = kvs
        .iter()
        .filter_map(|kv| Extension::decode(kv.value.as_slice()).ok())
        .collect();
    Ok((list, revision, latest))
}

fn reports(zone: &ServerContext) -> Result<Vec<ExtensionReport>, ApiError> {
    let (kvs, _, _) = zone.reader().range(&RangeRequest {
        prefix: STATE_PREFIX.to_vec(),
        serializable: true,
        ..RangeRequest::default()
    })?;
    Ok(kvs
        .iter()
        .filter_map(|kv| ExtensionReport::decode(kv.value.as_slice()).ok())
        .collect())
}

pub struct ExtensionsService {
    zone: ServerContext,
}

impl std::fmt::Debug for ExtensionsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtensionsService").finish()
    }
}

impl ExtensionsService {
    pub fn new(zone: ServerContext) -> ExtensionsService {
        ExtensionsService { zone }
    }

    /// Receives an upload into the store; its format.
    async fn receive(
        &self,
        first: ExtensionChunk,
        rest: Streaming<ExtensionChunk>,
    ) -> Result<(String, &'static str), ApiError> {
        let sha = first.sha256.clone();
        let total = first.total_bytes;
        if total == 0 || total > MAX_EXTENSION {
            return Err(bad(
                "total_bytes",
                format!(
                    "{total}: an extension image is 1 byte to {} GiB",
                    MAX_EXTENSION >> 30
                ),
            ));
        }
        let store = store_dir(&self.zone);
        tokio::fs::create_dir_all(&store).await.map_err(|e| {
            ApiError::FailedPrecondition(format!("creating {}: {e}", store.display()))
        })?;
        let path = image_path(&store, &sha);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == total) {
            if let Ok(Some(format)) = format_of(&path) {
                tracing::info!(sha256 = %sha, "an upload of an extension image held already: kept as it is");
                return Ok((sha, format));
            }
        }
        transfer::check_room(&self.zone, &store, total, "the extension image")?;
        // Not one upload of the same image into the same partial file at
        // once: a name of its own for each.
        static UPLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = UPLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let partial = store.join(format!("{sha}.upload-{n}.partial"));
        let first = BundleChunk {
            data: first.data,
            total_bytes: total,
            sha256: sha.clone(),
        };
        use futures::StreamExt as _;
        let rest = rest.map(|c| {
            c.map(|c| BundleChunk {
                data: c.data,
                total_bytes: 0,
                sha256: String::new(),
            })
        });
        transfer::receive_into(
            &partial,
            first,
            total,
            &sha,
            rest,
            "the extension image",
            |_, _| {},
        )
        .await?;
        let format = match format_of(&partial) {
            Ok(Some(f)) => f,
            Ok(None) => {
                let _ = std::fs::remove_file(&partial);
                return Err(bad(
                    "data",
                    "not a squashfs or erofs image (cargo xtask ext build makes one)",
                ));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(ApiError::FailedPrecondition(format!(
                    "reading {}: {e}",
                    partial.display()
                )));
            }
        };
        transfer::put_in_place(&partial, &path).map_err(|e| {
            let _ = std::fs::remove_file(&partial);
            ApiError::FailedPrecondition(format!("writing {}: {e}", path.display()))
        })?;
        Ok((sha, format))
    }
}

#[tonic::async_trait]
impl extensions_server::Extensions for ExtensionsService {
    async fn add(
        &self,
        req: Request<Streaming<ExtensionChunk>>,
    ) -> Result<Response<AddExtensionResponse>, Status> {
        let budget = self.zone.budget(&req);
        let started = std::time::Instant::now();
        let mut chunks = req.into_inner();
        let first = chunks
            .message()
            .await?
            .ok_or_else(|| bad("chunks", "the stream ended before the first chunk"))?;
        check_name(&first.name)?;
        check_sha("sha256", &first.sha256)?;
        // Said before the upload is taken, not after (checked again at the
        // write).
        self.zone.check_enabled()?;
        // Kept in the store from its first byte until its want is written.
        let _adding = Adding::new(&first.sha256);
        let name = first.name.clone();
        let bytes = first.total_bytes;
        let (sha, format) = self.receive(first, chunks).await?;
        let ext = Extension {
            name: name.clone(),
            sha256: sha.clone(),
            bytes,
            holder: self.zone.node().id(),
            added_unix_ms: now_ms(),
            format: format.into(),
        };
        let op = command::Op::Put(PutRequest {
            key: want_key(&name),
            value: ext.encode_to_vec(),
            prev_kv: false,
        });
        self.zone.check_enabled()?;
        self.zone.check_space(&op)?;
        let r = self.zone.write(op, budget).await?;
        let revision = match r.result {
            Some(command_result::Result::Put(p)) => p.header.map_or(0, |h| h.revision),
            _ => 0,
        };
        tracing::info!(name = %name, sha256 = %sha, bytes, format, took = ?started.elapsed(), revision, "the zone wants an extension");
        Ok(Response::new(AddExtensionResponse {
            extension: Some(ext),
            revision,
        }))
    }

    async fn remove(
        &self,
        req: Request<RemoveExtensionRequest>,
    ) -> Result<Response<RemoveExtensionResponse>, Status> {
        let budget = self.zone.budget(&req);
        let name = req.into_inner().name;
        check_name(&name)?;
        self.zone.linearize(budget).await?;
        let (kv, _) = self
            .zone
            .reader()
            .get(&GetRequest {
                key: want_key(&name),
                serializable: true,
            })
            .map_err(ApiError::from)?;
        let Some(kv) = kv else {
            return Err(ApiError::NotFound(format!(
                "the zone has no extension named `{}` (zonectl ext ls)",
                name.escape_debug()
            ))
            .into());
        };
        // Only the want it found: an `ext add` of a new image in between
        // is not removed unseen.
        let del = RequestOp {
            request: Some(request_op::Request::Delete(DeleteRequest {
                key: want_key(&name),
                prefix: false,
                prev_kv: false,
            })),
        };
        let Some(revision) = self
            .zone
            .write_if_unchanged(&want_key(&name), kv.mod_revision, vec![del], budget)
            .await?
        else {
            return Err(ApiError::NotApplied(format!(
                "extension {name} changed while it was being removed (another `zonectl ext add`?): not removed; look at `zonectl ext ls` and retry"
            ))
            .into());
        };
        tracing::info!(name = %name, revision, "the zone no longer wants an extension");
        Ok(Response::new(RemoveExtensionResponse { revision }))
    }

    async fn list(
        &self,
        req: Request<ListExtensionsRequest>,
    ) -> Result<Response<ListExtensionsResponse>, Status> {
        let budget = self.zone.budget(&req);
        self.zone.linearize(budget).await?;
        let (extensions, revision, _) = wants(&self.zone)?;
        let reports = reports(&self.zone)?;
        let local = self.zone.local().await?;
        // Names, and which servers manage extensions, from the servers
        // themselves (one that does not answer is assumed to).
        let statuses: BTreeMap<u64, (String, bool)> = self
            .zone
            .zone_status()
            .await
            .map(|zs| {
                zs.servers
                    .into_iter()
                    .map(|s| {
                        let unmanaged = s.error.is_empty() && s.extensions_dir.is_empty();
                        (s.id, (s.name, unmanaged))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut ids: Vec<u64> = local
            .voters
            .iter()
            .chain(local.learners.iter())
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let servers = ids
            .into_iter()
            .map(|id| {
                let (name, unmanaged) = statuses.get(&id).cloned().unwrap_or_default();
                ServerExtensions {
                    id,
                    name,
                    report: reports.iter().find(|r| r.server_id == id).cloned(),
                    unmanaged: if unmanaged {
                        "its zoned has no [extensions] dir".into()
                    } else {
                        String::new()
                    },
                }
            })
            .collect();
        Ok(Response::new(ListExtensionsResponse {
            extensions,
            servers,
            revision,
        }))
    }
}

/// The peer side: streams image `sha` to a server about to install it.
pub(crate) async fn serve_fetch(
    zone: &ServerContext,
    req: FetchExtensionRequest,
) -> Result<FetchStream, ApiError> {
    let path = image_path(&store_dir(zone), &req.sha256);
    transfer::serve_held(zone, req.sha256, &path, "extension image")
}

/// What this server installed in the extensions directory: name to sha256
/// (`<data_dir>/extensions/installed.json`). Only these are ever replaced
/// or removed there.
fn installed_path(store: &Path) -> PathBuf {
    store.join("installed.json")
}

fn read_installed(store: &Path) -> BTreeMap<String, String> {
    std::fs::read(installed_path(store))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_installed(store: &Path, m: &BTreeMap<String, String>) -> std::io::Result<()> {
    let tmp = store.join("installed.json.tmp");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(m).expect("a map of strings"))?;
        f.sync_all()?;
    }
    transfer::put_in_place(&tmp, &installed_path(store))
}

/// Fetches image `ext` into the store from the holder, or else from a
/// server that reported it merged.
async fn fetch(zone: &ServerContext, ext: &Extension, store: &Path) -> Result<(), String> {
    let me = zone.node().id();
    let mut sources = vec![ext.holder];
    if let Ok(reports) = reports(zone) {
        for r in reports {
            let has = r.extensions.iter().any(|e| {
                e.sha256 == ext.sha256 && e.state == ExtensionState::ExtensionMerged as i32
            });
            if has && !sources.contains(&r.server_id) {
                sources.push(r.server_id);
            }
        }
    }
    sources.retain(|&id| id != me);
    let mut errors = Vec::new();
    for id in sources {
        let Some(mut client) = zone.transport().client(id) else {
            errors.push(format!("server {id}: no address known"));
            continue;
        };
        let stream = match client
            .fetch_extension(FetchExtensionRequest {
                sha256: ext.sha256.clone(),
            })
            .await
        {
            Ok(s) => s.into_inner(),
            Err(s) => {
                errors.push(format!("server {id}: {}", s.message()));
                continue;
            }
        };
        let mut stream = Box::pin(stream);
        use futures::StreamExt as _;
        let first = match stream.next().await {
            Some(Ok(c)) => c,
            Some(Err(s)) => {
                errors.push(format!("server {id}: {}", s.message()));
                continue;
            }
            None => {
                errors.push(format!("server {id}: sent nothing"));
                continue;
            }
        };
        if first.sha256 != ext.sha256 || first.total_bytes != ext.bytes {
            errors.push(format!(
                "server {id} sent {} ({} bytes), not the {} ({} bytes) asked for",
                first.sha256, first.total_bytes, ext.sha256, ext.bytes
            ));
            continue;
        }
        if let Err(e) = transfer::check_room(zone, store, ext.bytes, "the extension image") {
            return Err(e.to_string());
        }
        let partial = store.join(format!("{}.fetch.partial", ext.sha256));
        match transfer::receive_into(
            &partial,
            first,
            ext.bytes,
            &ext.sha256,
            stream,
            "the extension image",
            |_, _| {},
        )
        .await
        {
            Ok(()) => {
                transfer::put_in_place(&partial, &image_path(store, &ext.sha256)).map_err(|e| {
                    let _ = std::fs::remove_file(&partial);
                    format!("keeping the image: {e}")
                })?;
                tracing::info!(name = %ext.name, sha256 = %ext.sha256, from = id, "fetched an extension image");
                return Ok(());
            }
            Err(e) => errors.push(format!("server {id}: {e}")),
        }
    }
    if errors.is_empty() {
        errors.push("no other server has it".into());
    }
    Err(format!("fetching it: {}", errors.join("; ")))
}

/// Puts the store's image in `dir` as `NAME.raw`: a hard link (the same
/// file system on the appliance: /var), else a copy; renamed into place.
fn install(store: &Path, dir: &Path, ext: &Extension) -> std::io::Result<()> {
    let from = image_path(store, &ext.sha256);
    let tmp = dir.join(format!(".{}.raw.tmp", ext.name));
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(&from, &tmp).is_err() {
        std::fs::copy(&from, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
    }
    transfer::put_in_place(&tmp, &dir.join(format!("{}.raw", ext.name)))
}

/// Runs `argv` to its end, within [`COMMAND_TIMEOUT`]; its stderr's last
/// lines on failure.
async fn run_command(argv: &[String]) -> Result<(), String> {
    let Some((prog, args)) = argv.split_first() else {
        return Err("no command".into());
    };
    let child = tokio::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(COMMAND_TIMEOUT, child).await {
        Err(_) => Err(format!(
            "`{}` did not finish within {} s",
            argv.join(" "),
            COMMAND_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(format!("cannot run `{}`: {e}", argv.join(" "))),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(3).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(format!(
                "`{}` exited with {}: {}",
                argv.join(" "),
                out.status,
                tail.join("; ")
            ))
        }
    }
}

/// What a server's follower carries from one pass to the next.
#[derive(Debug, Default)]
struct Follower {
    /// A merge (or the unmerge of a removed extension) failed: tried again
    /// until one succeeds, but not when nothing else asks for it (a fetch
    /// that failed is not mended by merging again).
    merge_pending: bool,
    /// Extensions removed whose unmerge is owed (a merge failed since):
    /// name to sha256, reported failed until a merge succeeds.
    unmerged: BTreeMap<String, String>,
    /// The first pass of this process is done: a boot merged what is
    /// installed already (systemd-sysext.service), and a start merges
    /// again only if that does not show.
    started: bool,
}

/// Whether `a` and `b` are the same file (a hard link of it): how an
/// installed extension is told to be the zone's image.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// A partial file older than this is a transfer that died.
const PARTIAL_GRACE: Duration = Duration::from_secs(3600);

/// The images an Add on this server is receiving, or has received and not
/// yet named in a want: the store keeps them whatever the wants say.
static ADDING: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());

/// Holds an image in [`ADDING`] while it lives.
struct Adding(String);

impl Adding {
    fn new(sha: &str) -> Adding {
        ADDING
            .lock()
            .expect("ADDING poisoned")
            .insert(sha.to_owned());
        Adding(sha.to_owned())
    }
}

impl Drop for Adding {
    fn drop(&mut self) {
        ADDING.lock().expect("ADDING poisoned").remove(&self.0);
    }
}

/// Removes from the store the images no want names (read again now: a
/// pass may have taken long) and no Add holds, and the partial files of
/// transfers that died.
fn clean_store(zone: &ServerContext, store: &Path) {
    let Ok((want, _, _)) = wants(zone) else {
        return;
    };
    let Ok(rd) = std::fs::read_dir(store) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let age = e
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        let sha = name.split('.').next().unwrap_or_default();
        if ADDING.lock().expect("ADDING poisoned").contains(sha) {
            continue;
        }
        let gone = if name.ends_with(".raw") {
            !want.iter().any(|w| w.sha256 == sha)
        } else {
            name.ends_with(".partial") && age > PARTIAL_GRACE
        };
        if gone {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::info!(file = %e.path().display(), "removed an extension image no want names")
                }
                Err(err) => {
                    tracing::warn!(file = %e.path().display(), error = %err, "could not remove an extension image")
                }
            }
        }
    }
}

/// One pass: makes this server's extensions what `want` says; its report.
async fn reconcile(
    zone: &ServerContext,
    want: &[Extension],
    revision: u64,
    f: &mut Follower,
) -> ExtensionReport {
    let cfg = &zone.config().extensions;
    let dir = cfg.dir.clone();
    let store = store_dir(zone);
    let mut report = ExtensionReport {
        server_id: zone.node().id(),
        extensions: Vec::new(),
        wanted_revision: revision,
        updated_unix_ms: now_ms(),
    };
    // Why a wanted extension is not merged here, by name.
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    // A fetch that failed, tried again (the holder may be back): why, by
    // name.
    let mut fetching: BTreeMap<String, String> = BTreeMap::new();
    // A removal that failed: (sha256, why), by name.
    let mut not_removed: BTreeMap<String, (String, String)> = BTreeMap::new();
    if let Err(e) = std::fs::create_dir_all(&store).and_then(|()| std::fs::create_dir_all(&dir)) {
        for w in want {
            failed.insert(
                w.name.clone(),
                format!("creating {} or {}: {e}", store.display(), dir.display()),
            );
        }
    }
    let mut installed = read_installed(&store);
    let record = |installed: &BTreeMap<String, String>| {
        write_installed(&store, installed).map_err(|e| {
            tracing::error!(error = %e, "could not record the installed extensions");
            format!("recording it in {}: {e}", installed_path(&store).display())
        })
    };
    // An extension in the directory that is the same file as an image of
    // the store is the zone's, recorded or not (a stop between the rename
    // and the record, or a record lost): adopted, then kept or removed as
    // the wants say.
    if let (Ok(rd), Ok(images)) = (std::fs::read_dir(&dir), std::fs::read_dir(&store)) {
        let images: Vec<(String, PathBuf)> = images
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                let sha = n.strip_suffix(".raw")?.to_owned();
                check_sha("sha256", &sha).ok()?;
                Some((sha, e.path()))
            })
            .collect();
        let mut adopted = false;
        for e in rd.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".raw") else {
                continue;
            };
            if installed.contains_key(name) || check_name(name).is_err() {
                continue;
            }
            if let Some((sha, _)) = images.iter().find(|(_, p)| same_file(&e.path(), p)) {
                tracing::info!(name, sha256 = %sha, "an extension of the zone's that was not recorded: recorded");
                installed.insert(name.to_owned(), sha.clone());
                adopted = true;
            }
        }
        if adopted {
            let _ = record(&installed);
        }
    }
    let mut changed = false;
    for w in want {
        if failed.contains_key(&w.name) {
            continue;
        }
        // Checked at Add; again here, as they become paths.
        if let Err(e) = check_name(&w.name).and_then(|()| check_sha("sha256", &w.sha256)) {
            failed.insert(w.name.clone(), format!("the zone's want is malformed: {e}"));
            continue;
        }
        let target = dir.join(format!("{}.raw", w.name));
        let image = image_path(&store, &w.sha256);
        if same_file(&target, &image) {
            // In place; recorded too (a stop between the rename and the
            // record leaves it unrecorded).
            if installed.get(&w.name) != Some(&w.sha256) {
                installed.insert(w.name.clone(), w.sha256.clone());
                if let Err(e) = record(&installed) {
                    failed.insert(w.name.clone(), e);
                }
            }
            continue;
        }
        if target.exists() && !installed.contains_key(&w.name) {
            failed.insert(
                w.name.clone(),
                format!(
                    "{} is there and was not installed by the zone: left as it is",
                    target.display()
                ),
            );
            continue;
        }
        if !image.exists() {
            if let Err(e) = fetch(zone, w, &store).await {
                fetching.insert(w.name.clone(), format!("{e} (tried again)"));
                continue;
            }
        }
        match install(&store, &dir, w) {
            Ok(()) => {
                installed.insert(w.name.clone(), w.sha256.clone());
                changed = true;
                tracing::info!(name = %w.name, sha256 = %w.sha256, dir = %dir.display(), "installed an extension");
                if let Err(e) = record(&installed) {
                    failed.insert(w.name.clone(), e);
                }
            }
            Err(e) => {
                failed.insert(w.name.clone(), format!("installing it: {e}"));
            }
        }
    }
    let gone: Vec<(String, String)> = installed
        .iter()
        .filter(|(n, _)| !want.iter().any(|w| &w.name == *n))
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect();
    let mut removed = Vec::new();
    for (name, sha) in gone {
        if check_name(&name).is_err() {
            // Not a name this server would have installed: the record is
            // damaged, and nothing is removed by it.
            installed.remove(&name);
            continue;
        }
        let target = dir.join(format!("{name}.raw"));
        match std::fs::remove_file(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %target.display(), error = %e, "could not remove an extension");
                not_removed.insert(
                    name,
                    (sha, format!("could not remove {}: {e}", target.display())),
                );
                continue;
            }
        }
        installed.remove(&name);
        changed = true;
        tracing::info!(name = %name, "removed an extension");
        if let Err(e) = record(&installed) {
            not_removed.insert(name.clone(), (sha.clone(), e));
        }
        removed.push((name, sha));
    }
    clean_store(zone, &store);
    // Merges when something changed, while a merge is owed, and at the
    // first pass of a start unless every installed extension shows merged
    // already (the boot merged them).
    let shows = |name: &str| !cfg.check_merged || merged_release(name);
    let boot_merged = cfg.check_merged && installed.keys().all(|n| shows(n));
    let merge = changed || f.merge_pending || !(f.started || boot_merged);
    f.started = true;
    let mut merge_error = None;
    if merge {
        let merged = async {
            run_command(&cfg.refresh_command).await?;
            run_command(&cfg.reload_command).await
        }
        .await;
        match merged {
            Ok(()) => {
                tracing::info!(extensions = installed.len(), "merged the extensions");
                f.merge_pending = false;
                fill_roots(zone);
            }
            Err(e) => {
                tracing::error!(error = %e, "could not merge the extensions");
                f.merge_pending = true;
                merge_error = Some(e);
            }
        }
    }
    // Removed now or before, and not unmerged yet: owed until a merge
    // succeeds and the release file is gone.
    for (name, sha) in removed {
        f.unmerged.insert(name, sha);
    }
    let owed: Vec<(String, String)> = f
        .unmerged
        .iter()
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect();
    for (name, sha) in owed {
        if want.iter().any(|w| w.name == name) {
            // Wanted again: its own state says the rest.
            f.unmerged.remove(&name);
        } else if let Some(e) = &merge_error {
            f.merge_pending = true;
            not_removed.insert(name, (sha, format!("removed, but not unmerged: {e}")));
        } else if f.merge_pending {
            not_removed.insert(
                name,
                (sha, "removed, but not unmerged yet: a merge is owed".into()),
            );
        } else if cfg.check_merged && merged_release(&name) {
            f.merge_pending = true;
            not_removed.insert(
                name.clone(),
                (
                    sha,
                    format!("removed, but /usr/lib/extension-release.d/extension-release.{name} still shows after the refresh"),
                ),
            );
        } else {
            f.unmerged.remove(&name);
        }
    }
    for w in want {
        let (state, message) = if let Some(why) = failed.get(&w.name) {
            (ExtensionState::ExtensionFailed, why.clone())
        } else if let Some(why) = fetching.get(&w.name) {
            (ExtensionState::ExtensionFetching, why.clone())
        } else if let Some(e) = &merge_error {
            (ExtensionState::ExtensionFailed, e.clone())
        } else if f.merge_pending {
            (
                ExtensionState::ExtensionFailed,
                "not merged yet: a merge is owed".into(),
            )
        } else if !shows(&w.name) {
            (
                ExtensionState::ExtensionFailed,
                format!(
                    "installed, but systemd-sysext did not merge it: /usr/lib/extension-release.d/extension-release.{} is not there (does the image's extension-release match this server's os-release? `systemd-sysext list`)",
                    w.name
                ),
            )
        } else {
            (ExtensionState::ExtensionMerged, String::new())
        };
        report.extensions.push(ExtensionOnServer {
            name: w.name.clone(),
            sha256: w.sha256.clone(),
            state: state as i32,
            message,
        });
    }
    for (name, (sha, why)) in not_removed {
        report.extensions.push(ExtensionOnServer {
            name,
            sha256: sha,
            state: ExtensionState::ExtensionFailed as i32,
            message: why,
        });
    }
    report
}

/// After a merge: the payloads' defaults (`[extensions] factory_dir`) fill
/// in what each managed root lacks, never replacing a file: zone-sync's
/// and the operator's versions win (`zone_files::factory`). zone-provision
/// does the same at boot.
fn fill_roots(zone: &ServerContext) {
    let cfg = zone.config();
    let factory = &cfg.extensions.factory_dir;
    if factory.as_os_str().is_empty() {
        return;
    }
    for root in &cfg.files.managed_roots {
        let defaults = zone_files::factory::defaults_of(factory, root);
        if !defaults.is_dir() {
            continue;
        }
        let target = cfg.files.local_root.join(root.trim_start_matches('/'));
        match zone_files::factory::fill(&target, &defaults) {
            Ok(made) if made.is_empty() => {}
            Ok(made) => tracing::info!(
                root = %root,
                from = %defaults.display(),
                entries = made.len(),
                "filled in the payloads' defaults"
            ),
            Err(e) => tracing::warn!(
                root = %root,
                from = %defaults.display(),
                error = %e,
                "could not fill in the payloads' defaults"
            ),
        }
    }
}

/// Whether extension `name` is merged: its release file shows in /usr.
fn merged_release(name: &str) -> bool {
    Path::new("/usr/lib/extension-release.d")
        .join(format!("extension-release.{name}"))
        .exists()
}

async fn write_report(zone: &ServerContext, report: &ExtensionReport) -> Result<(), ApiError> {
    let op = command::Op::Put(PutRequest {
        key: state_key(report.server_id),
        value: report.encode_to_vec(),
        prev_kv: false,
    });
    zone.write(op, zone.config().request_timeout()).await?;
    Ok(())
}

/// What a pass acted on: each want's name and sha256, and the latest
/// revision that wrote one.
type WantsSeen = Vec<(String, String, u64)>;

/// The longest wait between two tries of what failed.
const RETRY_MAX: Duration = Duration::from_secs(300);

/// Keeps this server's extensions as the zone wants them, for as long as
/// zoned runs (spawned at start).
pub async fn follow(zone: ServerContext) {
    if zone.config().extensions.dir.as_os_str().is_empty() {
        // Not managed here (the zone's status says so: `extensions_dir`);
        // images uploaded to this server are still kept only while wanted.
        // Nothing to wait for before leader-only units start.
        zone.agents.set_extensions_ready(true);
        let store = store_dir(&zone);
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            clean_store(&zone, &store);
        }
    }
    let mut f = Follower::default();
    let mut acted_on: Option<(WantsSeen, std::time::Instant)> = None;
    let mut retry = RETRY_FAILED;
    // The last report the zone has, and one made since that it has not
    // taken yet (the zone disabled, no leader): only the write is tried
    // again, not the pass.
    let mut reported: Option<ExtensionReport> = None;
    let mut unsent: Option<ExtensionReport> = None;
    let mut ticker = tokio::time::interval(FOLLOW_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // Acts only once caught up with the zone: wants applied late would
        // only be acted on twice.
        if zone
            .linearize(zone.config().request_timeout())
            .await
            .is_err()
        {
            continue;
        }
        let Ok((want, revision, latest)) = wants(&zone) else {
            continue;
        };
        // The same image added again is a new want to answer (`zonectl ext
        // add` waits for a report of a revision at least its own).
        let key: WantsSeen = want
            .iter()
            .map(|w| (w.name.clone(), w.sha256.clone(), latest))
            .collect();
        let failing = reported.iter().chain(unsent.iter()).any(|r| {
            r.extensions
                .iter()
                .any(|e| e.state != ExtensionState::ExtensionMerged as i32)
        }) || f.merge_pending;
        let due = match &acted_on {
            None => true,
            Some((k, _)) if *k != key => true,
            // What failed is tried again, less and less often.
            Some((_, at)) => failing && at.elapsed() >= retry,
        };
        if due {
            let fresh = acted_on.as_ref().is_none_or(|(k, _)| *k != key);
            if fresh {
                // A want this server has not acted on: leader-only units
                // that have not started yet wait for this pass (they may
                // come from the extension).
                zone.agents.set_extensions_ready(false);
            }
            let report = reconcile(&zone, &want, revision, &mut f).await;
            let ok = report
                .extensions
                .iter()
                .all(|e| e.state == ExtensionState::ExtensionMerged as i32)
                && !f.merge_pending;
            zone.agents.set_extensions_ready(ok);
            retry = if ok || fresh {
                RETRY_FAILED
            } else {
                (retry * 2).min(RETRY_MAX)
            };
            acted_on = Some((key, std::time::Instant::now()));
            let same = reported.as_ref().is_some_and(|l| {
                l.extensions == report.extensions && l.wanted_revision == report.wanted_revision
            });
            unsent = (!same).then_some(report);
        }
        if let Some(report) = unsent.take() {
            match write_report(&zone, &report).await {
                Ok(()) => reported = Some(report),
                Err(e) => {
                    tracing::warn!(error = %e, "could not report this server's extensions yet");
                    unsent = Some(report);
                }
            }
        }
    }
}
