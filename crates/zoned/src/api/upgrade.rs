//! `zone.v1.Upgrade`: update bundles received, handed between servers, and
//! installed into the inactive root slot by the `zone-upgrade` tool; each
//! server's boot entries; and each server's last upgrade, recorded in the
//! zone under [`UPGRADE_PREFIX`] by that server alone.
//!
//! A bundle lives in `<data_dir>/upgrade/<sha256>.bundle`, written there
//! only once its bytes match the sha256 the sender announced and it
//! verified (signature by a key of `upgrade.keys_dir`, every file): an
//! upload cut short, or a tampered or foreign bundle, leaves nothing but a
//! removed `.partial` file. One upload, fetch or install runs at a time on
//! a server.
//!
//! The record's life: INSTALLING (before the tool writes anything) then
//! INSTALLED or FAILED; after the reboot, [`settle`] on the server that
//! installed writes GOOD once the loader's entry of the new slot was marked
//! good (the boot assessment passed), or ROLLED_BACK when the server runs
//! the old slot again. `zonectl upgrade` waits for those.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::Stream;
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use zone_proto::v1::{
    command, upgrade_server, BootEntry, BootStatus, BundleChunk, BundleInfo, FetchBundleRequest,
    GetRequest, InstallProgress, InstallRequest, PutRequest, RangeRequest, Role, ServerUpgrade,
    UpgradeRecord, UpgradeState, UpgradeStatusRequest, UpgradeStatusResponse,
};

use super::{ApiError, ServerContext};

/// The zone's upgrade records: `zone/upgrade/<server id>`.
pub const UPGRADE_PREFIX: &[u8] = b"zone/upgrade/";
/// Bytes per chunk of a bundle sent between servers.
const CHUNK: usize = 1 << 20;
/// The largest bundle taken (a root image and two kernel images).
pub const MAX_BUNDLE: u64 = 4 << 30;

fn record_key(id: u64) -> Vec<u8> {
    let mut k = UPGRADE_PREFIX.to_vec();
    k.extend_from_slice(id.to_string().as_bytes());
    k
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn bad(field: &str, reason: impl Into<String>) -> ApiError {
    ApiError::InvalidArgument {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// `sha` if it is 64 lower-case hex digits.
fn check_sha(field: &str, sha: &str) -> Result<(), ApiError> {
    if sha.len() == 64 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(bad(
            field,
            format!("{sha:?} is not a sha256 (64 lower-case hex digits)"),
        ))
    }
}

/// How this server boots, for the status: None off the appliance (no root
/// slot on the kernel command line).
pub(crate) fn boot_status(esp: &Path) -> Option<BootStatus> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let running = zone_upgrade::Slot::from_cmdline(&cmdline)?;
    let dir = esp.join(zone_upgrade::entries::DIR);
    let (entries, error) = if !dir.is_dir() {
        // Unmounted (the server is shutting down), or not an EFI boot.
        (Vec::new(), format!("{} is absent", dir.display()))
    } else {
        match zone_upgrade::entries::list(esp) {
            Ok(v) => (v, String::new()),
            Err(e) => (Vec::new(), e.to_string()),
        }
    };
    Some(BootStatus {
        running_slot: running.name().to_owned(),
        entries: entries
            .iter()
            .map(|e| {
                let (assessment, tries_left, tries_done) = match e.assessment() {
                    zone_upgrade::Assessment::Good => ("good", 0, 0),
                    zone_upgrade::Assessment::Trial { left, done } => ("trial", left, done),
                    zone_upgrade::Assessment::Bad { done } => ("bad", 0, done),
                };
                BootEntry {
                    file: e.file.clone(),
                    generation: e.generation,
                    slot: e.slot.name().to_owned(),
                    assessment: assessment.to_owned(),
                    tries_left,
                    tries_done,
                }
            })
            .collect(),
        error,
    })
}

/// `zone.v1.Upgrade`.
#[derive(Clone)]
pub struct UpgradeService {
    zone: ServerContext,
    /// One upload, fetch or install at a time.
    busy: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for UpgradeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpgradeService").finish()
    }
}

/// Where bundles are kept.
pub(crate) fn bundle_dir(zone: &ServerContext) -> PathBuf {
    zone.config().node.data_dir.join("upgrade")
}

fn bundle_path(dir: &Path, sha: &str) -> PathBuf {
    dir.join(format!("{sha}.bundle"))
}

/// Removes every bundle and partial file in `dir` but `keep`.
fn remove_others(dir: &Path, keep: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p != keep {
            match std::fs::remove_file(&p) {
                Ok(()) => tracing::info!(file = %p.display(), "removed an older bundle"),
                Err(e) => {
                    tracing::warn!(file = %p.display(), error = %e, "could not remove an older bundle")
                }
            }
        }
    }
}

/// Receives a bundle's bytes from `chunks` into `dir/<sha>.partial`,
/// checking them against the announced size and sha256, then verifies the
/// bundle and renames it to `dir/<sha>.bundle`. `expect`: the size and
/// sha256 if already known (a fetch); else the first chunk's.
async fn receive<S>(
    zone: &ServerContext,
    mut chunks: S,
    expect: Option<(u64, String)>,
    mut progress: impl FnMut(u64, u64),
) -> Result<BundleInfo, ApiError>
where
    S: Stream<Item = Result<BundleChunk, Status>> + Unpin,
{
    use futures::StreamExt as _;
    let dir = bundle_dir(zone);
    let mut first = chunks
        .next()
        .await
        .transpose()
        .map_err(|s| ApiError::Unavailable(format!("receiving the bundle: {}", s.message())))?
        .ok_or_else(|| bad("chunks", "the stream ended before the first chunk"))?;
    let (total, sha) = match expect {
        Some(e) => e,
        None => (first.total_bytes, std::mem::take(&mut first.sha256)),
    };
    check_sha("sha256", &sha)?;
    if total == 0 || total > MAX_BUNDLE {
        return Err(bad(
            "total_bytes",
            format!("{total}: a bundle is 1 byte to {} GiB", MAX_BUNDLE >> 30),
        ));
    }
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ApiError::FailedPrecondition(format!("creating {}: {e}", dir.display())))?;
    // Room for the bundle above the zone's free-space floor: a bundle must
    // never be what raises the space alarm.
    let floor = zone.config().limits.min_free_disk_mb << 20;
    let free = crate::storage::free_bytes(&dir).unwrap_or(u64::MAX);
    let held = std::fs::metadata(bundle_path(&dir, &sha)).map_or(0, |m| m.len());
    if held == 0 && free < total.saturating_add(floor) {
        return Err(ApiError::ResourceExhausted(format!(
            "{} has {} MiB free: the bundle's {} MiB would leave less than the {} MiB floor (limits.min_free_disk_mb)",
            dir.display(),
            free >> 20,
            total >> 20,
            floor >> 20
        )));
    }
    let partial = dir.join(format!("{sha}.partial"));
    let fail = |e: std::io::Error| {
        ApiError::FailedPrecondition(format!("writing {}: {e}", partial.display()))
    };
    let result = async {
        let mut file = tokio::fs::File::create(&partial).await.map_err(fail)?;
        let mut hash = Sha256::new();
        let mut got = 0u64;
        let mut next = Some(first);
        loop {
            let chunk = match next.take() {
                Some(c) => c,
                None => match chunks.next().await {
                    None => break,
                    Some(Ok(c)) => c,
                    Some(Err(s)) => {
                        return Err(ApiError::Unavailable(format!(
                            "the bundle's stream broke after {got} of {total} bytes: {}",
                            s.message()
                        )))
                    }
                },
            };
            got += chunk.data.len() as u64;
            if got > total {
                return Err(bad(
                    "data",
                    format!("more bytes than the {total} announced"),
                ));
            }
            hash.update(&chunk.data);
            file.write_all(&chunk.data).await.map_err(fail)?;
            progress(got, total);
        }
        if got != total {
            return Err(bad(
                "data",
                format!("{got} bytes received, {total} announced: the upload was cut short"),
            ));
        }
        let found = zone_bundle::hex(&hash.finalize());
        if found != sha {
            return Err(bad(
                "data",
                format!("the bytes received hash to sha256 {found}, not the {sha} announced"),
            ));
        }
        file.sync_all().await.map_err(fail)?;
        drop(file);
        let keys_dir = zone.config().upgrade.keys_dir.clone();
        let path = partial.clone();
        let verified = tokio::task::spawn_blocking(move || {
            let keys = zone_bundle::TrustedKeys::load_dir(&keys_dir)?;
            zone_bundle::verify(&path, &keys)
        })
        .await
        .map_err(|e| ApiError::Unavailable(format!("verifying the bundle: {e}")))?
        .map_err(|e| bad("bundle", e.to_string()))?;
        let m = &verified.manifest;
        let image = zone.host_image();
        let running_id = image.split_whitespace().next().unwrap_or("");
        if !running_id.is_empty() && m.image_id != running_id {
            return Err(bad(
                "bundle",
                format!(
                    "it updates {}, and this server runs {running_id}",
                    m.image_id
                ),
            ));
        }
        let path = bundle_path(&dir, &sha);
        std::fs::rename(&partial, &path).map_err(fail)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        remove_others(&dir, &path);
        Ok(BundleInfo {
            sha256: sha.clone(),
            bytes: total,
            holder: zone.node().id(),
            image_id: m.image_id.clone(),
            version: m.version.clone(),
            commit: m.commit.clone(),
            binaries_profile: m.binaries_profile.clone(),
            key_id: verified.key_id.clone(),
        })
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// The bundle `sha` as this server holds it (verified whole when it was
/// received; `zone-upgrade install` verifies it whole again before writing
/// anything): its signed manifest.
async fn held(zone: &ServerContext, sha: &str) -> Result<Option<BundleInfo>, ApiError> {
    let path = bundle_path(&bundle_dir(zone), sha);
    let Ok(meta) = std::fs::metadata(&path) else {
        return Ok(None);
    };
    let keys_dir = zone.config().upgrade.keys_dir.clone();
    let p = path.clone();
    let verified = tokio::task::spawn_blocking(move || {
        let keys = zone_bundle::TrustedKeys::load_dir(&keys_dir)?;
        zone_bundle::signed_manifest(&p, &keys)
    })
    .await
    .map_err(|e| ApiError::Unavailable(format!("reading the bundle: {e}")))?
    .map_err(|e| bad("bundle", format!("{}: {e}", path.display())))?;
    Ok(Some(BundleInfo {
        sha256: sha.to_owned(),
        bytes: meta.len(),
        holder: zone.node().id(),
        image_id: verified.manifest.image_id,
        version: verified.manifest.version,
        commit: verified.manifest.commit,
        binaries_profile: verified.manifest.binaries_profile,
        key_id: verified.key_id,
    }))
}

pub type FetchStream = Pin<Box<dyn Stream<Item = Result<BundleChunk, Status>> + Send>>;

/// The peer side: streams bundle `sha` to a server about to install it.
pub(crate) async fn serve_fetch(
    zone: &ServerContext,
    req: FetchBundleRequest,
) -> Result<FetchStream, ApiError> {
    check_sha("sha256", &req.sha256)?;
    let path = bundle_path(&bundle_dir(zone), &req.sha256);
    let file = std::fs::File::open(&path).map_err(|e| {
        ApiError::NotFound(format!(
            "server {} does not hold bundle {} ({e})",
            zone.node().id(),
            req.sha256
        ))
    })?;
    let total = file.metadata().map_or(0, |m| m.len());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let sha = req.sha256;
    tokio::task::spawn_blocking(move || {
        use std::io::Read as _;
        let mut file = file;
        let mut first = true;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = match file.read(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    let _ =
                        tx.blocking_send(Err(Status::internal(format!("reading the bundle: {e}"))));
                    return;
                }
            };
            if n == 0 {
                return;
            }
            buf.truncate(n);
            let chunk = BundleChunk {
                data: buf,
                total_bytes: if first { total } else { 0 },
                sha256: if first { sha.clone() } else { String::new() },
            };
            first = false;
            if tx.blocking_send(Ok(chunk)).is_err() {
                return;
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

impl UpgradeService {
    pub fn new(zone: ServerContext) -> UpgradeService {
        UpgradeService {
            zone,
            busy: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn lock(&self) -> Result<tokio::sync::OwnedMutexGuard<()>, ApiError> {
        self.busy.clone().try_lock_owned().map_err(|_| {
            ApiError::FailedPrecondition(format!(
                "server {} is already receiving or installing a bundle; wait for it to end",
                self.zone.node().id()
            ))
        })
    }
}

/// This server's record, as it has applied the zone's writes.
pub(crate) fn read_record(zone: &ServerContext, id: u64) -> Option<UpgradeRecord> {
    let (kv, _) = zone
        .reader()
        .get(&GetRequest {
            key: record_key(id),
            serializable: true,
        })
        .ok()?;
    UpgradeRecord::decode(kv?.value.as_slice()).ok()
}

async fn write_record(zone: &ServerContext, r: &UpgradeRecord) -> Result<(), ApiError> {
    let op = command::Op::Put(PutRequest {
        key: record_key(r.server),
        value: r.encode_to_vec(),
        prev_kv: false,
    });
    zone.write(op, zone.config().request_timeout()).await?;
    Ok(())
}

type InstallStream = Pin<Box<dyn Stream<Item = Result<InstallProgress, Status>> + Send>>;

fn step(step: &str, message: impl Into<String>) -> InstallProgress {
    InstallProgress {
        step: step.to_owned(),
        message: message.into(),
        ..InstallProgress::default()
    }
}

impl UpgradeService {
    /// Fetches, installs, records, hands over and reboots; progress goes to
    /// `tx` (a client that went away does not stop it: an install cut
    /// halfway leaves the slot unbootable, safe but useless).
    async fn install_task(
        zone: ServerContext,
        req: InstallRequest,
        running: zone_upgrade::Slot,
        tx: tokio::sync::mpsc::Sender<Result<InstallProgress, Status>>,
    ) -> Result<(), ApiError> {
        let me = zone.node().id();
        let send = |p: InstallProgress| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Ok(p)).await;
            }
        };
        let info = match held(&zone, &req.sha256).await? {
            Some(i) => i,
            None => {
                if req.holder == 0 || req.holder == me {
                    return Err(ApiError::NotFound(format!(
                        "server {me} does not hold bundle {}: upload it (zonectl upgrade --bundle) or name the server holding it",
                        req.sha256
                    )));
                }
                let mut client = zone.transport().client(req.holder).ok_or_else(|| {
                    ApiError::NotFound(format!(
                        "server {} is not a member this server can reach",
                        req.holder
                    ))
                })?;
                send(step("fetching", format!("from server {}", req.holder))).await;
                let stream = client
                    .fetch_bundle(FetchBundleRequest {
                        sha256: req.sha256.clone(),
                    })
                    .await
                    .map_err(|s| {
                        ApiError::Unavailable(format!(
                            "fetching the bundle from server {}: {}",
                            req.holder,
                            s.message()
                        ))
                    })?
                    .into_inner();
                let mut last = 0;
                let txp = tx.clone();
                receive(&zone, stream, None, move |done, total| {
                    let pct = (done * 100).checked_div(total).unwrap_or(100);
                    if pct / 10 != last / 10 || done == total {
                        last = pct;
                        let _ = txp.try_send(Ok(InstallProgress {
                            step: "fetching".into(),
                            done_bytes: done,
                            total_bytes: total,
                            ..InstallProgress::default()
                        }));
                    }
                })
                .await?
            }
        };
        let from_version = zone.host_image();
        let target = running.other();
        let mut record = UpgradeRecord {
            server: me,
            state: UpgradeState::Installing as i32,
            target_version: format!("{} {}", info.image_id, info.version),
            from_version,
            target_slot: target.name().to_owned(),
            from_slot: running.name().to_owned(),
            sha256: info.sha256.clone(),
            reason: String::new(),
            updated_unix_ms: now_ms(),
            started_unix_ms: now_ms(),
        };
        // Recorded before anything is written: the zone knows what this
        // server is about, whatever happens next.
        write_record(&zone, &record).await.map_err(|e| {
            ApiError::Unavailable(format!(
                "the zone could not record the upgrade, so nothing was installed: {e}"
            ))
        })?;
        let cfg = &zone.config().upgrade;
        let path = bundle_path(&bundle_dir(&zone), &info.sha256);
        let outcome = run_tool(&cfg.tool, &cfg.esp, &cfg.keys_dir, &path, &tx).await;
        record.updated_unix_ms = now_ms();
        match outcome {
            Ok(said) => {
                record.state = UpgradeState::Installed as i32;
                if let Err(e) = write_record(&zone, &record).await {
                    tracing::warn!(error = %e, "could not record the install; the server's status after the reboot will tell");
                }
                let said = said.strip_prefix("installed ").unwrap_or(&said).to_owned();
                send(step("installed", said)).await;
            }
            Err(reason) => {
                record.state = UpgradeState::Failed as i32;
                record.reason = reason.clone();
                if let Err(e) = write_record(&zone, &record).await {
                    tracing::warn!(error = %e, "could not record the failed install");
                }
                return Err(ApiError::FailedPrecondition(format!(
                    "installing {} on server {me} failed: {reason}",
                    record.target_version
                )));
            }
        }
        if req.no_reboot {
            let _ = tx
                .send(Ok(InstallProgress {
                    step: "installed".into(),
                    message: format!("slot {target} boots next, on trial; not rebooting (asked)"),
                    done: true,
                    ..InstallProgress::default()
                }))
                .await;
            return Ok(());
        }
        if zone.node().view().role == raft::StateRole::Leader {
            send(step("handing over", "this server leads: leadership first")).await;
            zone.hand_over_leadership().await;
        }
        let _ = tx
            .send(Ok(InstallProgress {
                step: "rebooting".into(),
                message: format!("into slot {target} on trial"),
                done: true,
                ..InstallProgress::default()
            }))
            .await;
        // Let the last message reach the client before the reboot stops
        // this process.
        tokio::time::sleep(Duration::from_millis(500)).await;
        tracing::warn!(slot = %target, version = %record.target_version, "rebooting into the new slot");
        let Some((prog, args)) = cfg.reboot_command.split_first() else {
            return Ok(());
        };
        let st = tokio::process::Command::new(prog).args(args).status().await;
        if !matches!(st, Ok(s) if s.success()) {
            tracing::error!(status = ?st, "the reboot command failed: the new slot boots at the next reboot");
        }
        Ok(())
    }
}

/// Runs `zone-upgrade install`, passing its progress lines on; its last
/// output line on success, or why it failed.
async fn run_tool(
    tool: &Path,
    esp: &Path,
    keys: &Path,
    bundle: &Path,
    tx: &tokio::sync::mpsc::Sender<Result<InstallProgress, Status>>,
) -> Result<String, String> {
    use tokio::io::AsyncBufReadExt as _;
    let mut child = tokio::process::Command::new(tool)
        .arg("--esp")
        .arg(esp)
        .arg("install")
        .arg(bundle)
        .arg("--keys")
        .arg(keys)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", tool.display()))?;
    let stdout = child.stdout.take();
    let out_task = tokio::spawn(async move {
        let mut s = String::new();
        if let Some(mut o) = stdout {
            use tokio::io::AsyncReadExt as _;
            let _ = o.read_to_string(&mut s).await;
        }
        s
    });
    let mut last_err = Vec::new();
    if let Some(err) = child.stderr.take() {
        let mut lines = tokio::io::BufReader::new(err).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(tool = %tool.display(), "{line}");
            let (what, rest) = line.split_once(':').unwrap_or(("install", &line));
            let _ = tx.try_send(Ok(step(what, rest.trim())));
            last_err.push(line);
            if last_err.len() > 5 {
                last_err.remove(0);
            }
        }
    }
    let st = child
        .wait()
        .await
        .map_err(|e| format!("waiting for {}: {e}", tool.display()))?;
    let out = out_task.await.unwrap_or_default();
    if st.success() {
        Ok(out.trim().to_owned())
    } else {
        Err(format!(
            "{} exited with {st}: {}",
            tool.display(),
            last_err.join("; ")
        ))
    }
}

#[tonic::async_trait]
impl upgrade_server::Upgrade for UpgradeService {
    async fn upload(
        &self,
        req: Request<Streaming<BundleChunk>>,
    ) -> Result<Response<BundleInfo>, Status> {
        let _guard = self.lock()?;
        let started = std::time::Instant::now();
        let info = receive(&self.zone, req.into_inner(), None, |_, _| {}).await?;
        tracing::info!(sha256 = %info.sha256, version = %info.version, bytes = info.bytes, took = ?started.elapsed(), key = %info.key_id, "received an update bundle");
        Ok(Response::new(info))
    }

    type InstallStream = InstallStream;

    async fn install(
        &self,
        req: Request<InstallRequest>,
    ) -> Result<Response<Self::InstallStream>, Status> {
        let req = req.into_inner();
        check_sha("sha256", &req.sha256)?;
        let me = self.zone.node().id();
        let Some(boot) = boot_status(&self.zone.config().upgrade.esp) else {
            return Err(ApiError::FailedPrecondition(format!(
                "server {me} did not boot from a root slot (no root=PARTLABEL=zoned-root-a|b on its kernel command line): only the appliance installs bundles"
            ))
            .into());
        };
        let running = zone_upgrade::Slot::from_name(&boot.running_slot)
            .ok_or_else(|| Status::internal("the running slot has no name"))?;
        // The running slot must itself be marked good: installing over the
        // other slot while this one is on trial would leave no slot known
        // to boot (zone-upgrade refuses it too; said here before a fetch).
        match boot.entries.iter().find(|e| e.slot == boot.running_slot) {
            Some(e) if e.assessment == "good" => {}
            Some(e) => {
                return Err(ApiError::FailedPrecondition(format!(
                    "server {me}'s running slot {running} is not marked good yet ({}: {}): wait until its boot is assessed",
                    e.file, e.assessment
                ))
                .into())
            }
            None => {
                return Err(ApiError::FailedPrecondition(format!(
                    "server {me}'s running slot {running} has no boot entry on {}",
                    self.zone.config().upgrade.esp.display()
                ))
                .into())
            }
        }
        let guard = self.lock()?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let zone = self.zone.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let errs = tx.clone();
            if let Err(e) = UpgradeService::install_task(zone, req, running, tx).await {
                tracing::error!(error = %e, "upgrade install failed");
                let _ = errs.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(
        &self,
        _req: Request<UpgradeStatusRequest>,
    ) -> Result<Response<UpgradeStatusResponse>, Status> {
        let zs = self.zone.zone_status().await?;
        let (records, _, _) = self
            .zone
            .reader()
            .range(&RangeRequest {
                prefix: UPGRADE_PREFIX.to_vec(),
                serializable: true,
                ..RangeRequest::default()
            })
            .map_err(ApiError::from)?;
        let records: Vec<UpgradeRecord> = records
            .iter()
            .filter_map(|kv| UpgradeRecord::decode(kv.value.as_slice()).ok())
            .collect();
        let servers = zs
            .servers
            .into_iter()
            .map(|s| ServerUpgrade {
                id: s.id,
                record: records.iter().find(|r| r.server == s.id).cloned(),
                leader: s.role == Role::Leader as i32,
                name: s.name,
                image_version: s.image_version,
                boot: s.boot,
                error: s.error,
            })
            .collect();
        Ok(Response::new(UpgradeStatusResponse {
            servers,
            leader_id: zs.leader_id,
            member_id: zs.member_id,
        }))
    }
}

/// After a boot: settles this server's record left by an install before
/// the reboot. INSTALLED: GOOD once the new slot's entry is marked good
/// (the boot assessment passed), ROLLED_BACK if the server came back on
/// the other slot. INSTALLING: FAILED (the server stopped while writing
/// the slot, whose entries were removed first: it boots the old slot, and
/// the upgrade may be run again). Runs until it has written one, or finds
/// nothing to settle once this server is caught up.
pub async fn settle(zone: ServerContext) {
    let esp = zone.config().upgrade.esp.clone();
    let me = zone.node().id();
    if boot_status(&esp).is_none() {
        return;
    }
    let booted_ms = boot_time_ms();
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let member = match zone.local().await {
            Ok(l) => crate::health::judge(&l).is_ok(),
            Err(_) => return,
        };
        // Caught up: the records read below are the zone's latest.
        if !member || zone.linearize(Duration::from_secs(2)).await.is_err() {
            continue;
        }
        let Some(mut r) = read_record(&zone, me) else {
            return;
        };
        let before_this_boot = r.updated_unix_ms < booted_ms;
        let Some(boot) = boot_status(&esp) else {
            return;
        };
        let target_entry = boot.entries.iter().find(|e| e.slot == r.target_slot);
        match UpgradeState::try_from(r.state) {
            Ok(UpgradeState::Installed) if before_this_boot => {
                if boot.running_slot == r.target_slot {
                    match target_entry {
                        Some(e) if e.assessment == "good" => r.state = UpgradeState::Good as i32,
                        // On trial: the assessment is still running.
                        _ => continue,
                    }
                } else {
                    r.state = UpgradeState::RolledBack as i32;
                    r.reason = match target_entry {
                        Some(e) if e.assessment == "bad" => format!(
                            "slot {} ({}) was not marked good within its {} tries; the loader booted slot {} again",
                            r.target_slot, e.file, e.tries_done, boot.running_slot
                        ),
                        Some(e) => format!(
                            "the server booted slot {} while slot {} ({}) was on trial",
                            boot.running_slot, r.target_slot, e.file
                        ),
                        None => format!(
                            "slot {} has no boot entry; the server booted slot {}",
                            r.target_slot, boot.running_slot
                        ),
                    };
                }
            }
            Ok(UpgradeState::Installing) if before_this_boot => {
                r.state = UpgradeState::Failed as i32;
                r.reason = format!(
                    "the server stopped while writing slot {} (power cut or crash); it booted slot {}; the upgrade may be run again",
                    r.target_slot, boot.running_slot
                );
            }
            // Installed or installing during this boot: the next boot
            // judges it.
            Ok(UpgradeState::Installed | UpgradeState::Installing) => {
                tokio::time::sleep(Duration::from_secs(7)).await;
                continue;
            }
            _ => return,
        }
        r.updated_unix_ms = now_ms();
        match write_record(&zone, &r).await {
            Ok(()) => {
                tracing::info!(state = r.state().as_str_name(), reason = %r.reason, "upgrade outcome recorded");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "could not record the upgrade's outcome yet"),
        }
    }
}

/// When this boot began (Unix ms), from /proc/stat's btime; 0 if unknown.
fn boot_time_ms() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())
        })
        .map_or(0, |s| s * 1000)
}
