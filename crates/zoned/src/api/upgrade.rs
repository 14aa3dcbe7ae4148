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
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use zone_proto::v1::{
    command, upgrade_server, BootEntry, BootStatus, BundleChunk, BundleInfo, FetchBundleRequest,
    GetRequest, InstallProgress, InstallRequest, PutRequest, RangeRequest, Role, ServerUpgrade,
    UpgradeRecord, UpgradeState, UpgradeStatusRequest, UpgradeStatusResponse,
};

use super::transfer::{self, check_sha};
use super::{ApiError, ServerContext};

/// The zone's upgrade records: `zone/upgrade/<server id>`.
pub const UPGRADE_PREFIX: &[u8] = b"zone/upgrade/";
/// The largest bundle taken (a root image and two kernel images).
pub const MAX_BUNDLE: u64 = 4 << 30;

/// Whose turn it is: the id of the server that last began an install. The
/// turn passes on once that server's record is no longer pending.
pub const TURN_KEY: &[u8] = b"zone/upgrade-turn";

fn record_key(id: u64) -> Vec<u8> {
    let mut k = UPGRADE_PREFIX.to_vec();
    k.extend_from_slice(id.to_string().as_bytes());
    k
}

/// Whether this zoned process runs an install now. A pending record of
/// this boot is under way only while it does: a zoned restarted during an
/// install (systemd stops the tool with it), or an install that gave up
/// after its INSTALLING record was written (a proposal timed out, then
/// committed), leaves a record nothing would ever settle, and the zone's
/// turn held with it.
static UNDER_WAY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Holds [`UNDER_WAY`] for an install task's life.
struct UnderWay;

impl UnderWay {
    fn begin() -> UnderWay {
        UNDER_WAY.store(true, std::sync::atomic::Ordering::SeqCst);
        UnderWay
    }
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        UNDER_WAY.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// This boot's id, as the kernel gives it (a new one each boot).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
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
/// bundle and renames it to `dir/<sha>.bundle`. `asked`: the sha256 a
/// fetch asked for (the holder's first chunk must announce it).
async fn receive<S>(
    zone: &ServerContext,
    mut chunks: S,
    asked: Option<&str>,
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
    let (total, sha) = (first.total_bytes, std::mem::take(&mut first.sha256));
    check_sha("sha256", &sha)?;
    if let Some(asked) = asked {
        if sha != asked {
            return Err(ApiError::FailedPrecondition(format!(
                "the holder sent bundle {sha}, not the {asked} asked for"
            )));
        }
    }
    if total == 0 || total > MAX_BUNDLE {
        return Err(bad(
            "total_bytes",
            format!("{total}: a bundle is 1 byte to {} GiB", MAX_BUNDLE >> 30),
        ));
    }
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ApiError::FailedPrecondition(format!("creating {}: {e}", dir.display())))?;
    let held = std::fs::metadata(bundle_path(&dir, &sha)).map_or(0, |m| m.len());
    if held == 0 {
        transfer::check_room(zone, &dir, total, "the bundle")?;
    }
    let partial = dir.join(format!("{sha}.partial"));
    let fail = |e: std::io::Error| {
        ApiError::FailedPrecondition(format!("writing {}: {e}", partial.display()))
    };
    transfer::receive_into(
        &partial,
        first,
        total,
        &sha,
        chunks,
        "the bundle",
        &mut progress,
    )
    .await?;
    let result = async {
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
        transfer::put_in_place(&partial, &path).map_err(fail)?;
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

pub use super::transfer::FetchStream;

/// The peer side: streams bundle `sha` to a server about to install it.
pub(crate) async fn serve_fetch(
    zone: &ServerContext,
    req: FetchBundleRequest,
) -> Result<FetchStream, ApiError> {
    let path = bundle_path(&bundle_dir(zone), &req.sha256);
    transfer::serve_held(zone, req.sha256, &path, "bundle")
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

/// Whether a record is of an upgrade not yet settled: the server is
/// installing, or rebooting into, or on trial in its new slot.
fn pending(r: &UpgradeRecord) -> bool {
    matches!(
        UpgradeState::try_from(r.state),
        Ok(UpgradeState::Installing | UpgradeState::Installed)
    )
}

/// Refuses while another server's upgrade is not settled: one server at a
/// time, so that a three-server zone never has two down at once (its
/// quorum). Returns the turn key's revision, for [`take_turn`].
async fn check_turn(zone: &ServerContext, me: u64) -> Result<u64, ApiError> {
    let (kv, _) = zone.reader().get(&GetRequest {
        key: TURN_KEY.to_vec(),
        serializable: true,
    })?;
    let Some(kv) = kv else {
        return Ok(0);
    };
    let holder: u64 = String::from_utf8_lossy(&kv.value).parse().unwrap_or(0);
    // A holder that has left the zone (removed, its server replaced)
    // will never settle its record: it does not hold the turn.
    let member = |local: &crate::node::LocalStatus| {
        local.voters.contains(&holder) || local.learners.contains(&holder)
    };
    if holder != 0 && holder != me {
        if let Some((r, _)) = read_record_at(zone, holder) {
            if pending(&r) && zone.local().await.map_or(true, |l| member(&l)) {
                let state = if r.state == UpgradeState::Installing as i32 {
                    "installing"
                } else {
                    "installed, not yet back and marked good"
                };
                return Err(ApiError::FailedPrecondition(format!(
                    "server {holder} is being upgraded to {} ({state}): one server at a time, so that the zone keeps its quorum; wait until it is settled (zonectl upgrade status){}",
                    r.target_version,
                    if r.state == UpgradeState::Installed as i32 {
                        ", or reboot it if it was installed without a reboot"
                    } else {
                        ""
                    }
                )));
            }
        }
    }
    Ok(kv.mod_revision)
}

/// Takes the turn and records INSTALLING in one transaction: of two
/// servers beginning at the same moment, one gets it.
async fn take_turn(zone: &ServerContext, r: &mut UpgradeRecord) -> Result<(), ApiError> {
    use zone_proto::v1::{request_op, RequestOp};
    let seen = check_turn(zone, r.server).await?;
    r.boot_id = boot_id();
    r.updated_unix_ms = now_ms();
    let put = |key: Vec<u8>, value: Vec<u8>| RequestOp {
        request: Some(request_op::Request::Put(PutRequest {
            key,
            value,
            prev_kv: false,
        })),
    };
    let ops = vec![
        put(TURN_KEY.to_vec(), r.server.to_string().into_bytes()),
        put(record_key(r.server), r.encode_to_vec()),
    ];
    match zone
        .write_if_unchanged(TURN_KEY, seen, ops, zone.config().request_timeout())
        .await?
    {
        Some(_) => Ok(()),
        None => Err(ApiError::FailedPrecondition(
            "another server began an upgrade at the same moment: one server at a time; see zonectl upgrade status".into(),
        )),
    }
}

/// Server `id`'s record and its revision, as this server has applied the
/// zone's writes.
fn read_record_at(zone: &ServerContext, id: u64) -> Option<(UpgradeRecord, u64)> {
    let (kv, _) = zone
        .reader()
        .get(&GetRequest {
            key: record_key(id),
            serializable: true,
        })
        .ok()?;
    let kv = kv?;
    Some((
        UpgradeRecord::decode(kv.value.as_slice()).ok()?,
        kv.mod_revision,
    ))
}

/// Writes this server's record, stamped with this boot's id and the time.
async fn write_record(zone: &ServerContext, r: &mut UpgradeRecord) -> Result<(), ApiError> {
    r.boot_id = boot_id();
    r.updated_unix_ms = now_ms();
    let op = command::Op::Put(PutRequest {
        key: record_key(r.server),
        value: r.encode_to_vec(),
        prev_kv: false,
    });
    zone.write(op, zone.config().request_timeout()).await?;
    Ok(())
}

/// Writes the record again until the zone takes it, for up to `limit`
/// (an election, a space alarm: the install's outcome must not be lost).
async fn write_record_until(
    zone: &ServerContext,
    r: &mut UpgradeRecord,
    limit: Duration,
) -> Result<(), ApiError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match write_record(zone, r).await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "could not record the upgrade's state yet");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// How long an install's state may take to be recorded before the install
/// gives up (and does not reboot).
const RECORD_PATIENCE: Duration = Duration::from_secs(120);

/// The longest an install tool may run (a hung disk: the lock is freed).
const TOOL_TIMEOUT: Duration = Duration::from_secs(3600);

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
                receive(&zone, stream, Some(&req.sha256), move |done, total| {
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
            boot_id: String::new(),
        };
        // Recorded before anything is written: the zone knows what this
        // server is about, whatever happens next.
        take_turn(&zone, &mut record).await.map_err(|e| match e {
            ApiError::FailedPrecondition(m) => ApiError::FailedPrecondition(m),
            e => ApiError::Unavailable(format!(
                "the zone could not record the upgrade, so nothing was installed: {e}"
            )),
        })?;
        let cfg = &zone.config().upgrade;
        let path = bundle_path(&bundle_dir(&zone), &info.sha256);
        let outcome = tokio::time::timeout(
            TOOL_TIMEOUT,
            run_tool(&cfg.tool, &cfg.esp, &cfg.keys_dir, &path, &tx),
        )
        .await
        .unwrap_or_else(|_| {
            // Dropped: the child is killed (kill_on_drop); the slot it was
            // writing has no entry, so nothing boots it.
            Err(format!(
                "{} did not end within {} min and was stopped",
                cfg.tool.display(),
                TOOL_TIMEOUT.as_secs() / 60
            ))
        });
        match outcome {
            Ok(said) => {
                record.state = UpgradeState::Installed as i32;
                // No reboot before the zone knows: the next boot's outcome
                // is judged against this record (settle).
                if let Err(e) = write_record_until(&zone, &mut record, RECORD_PATIENCE).await {
                    return Err(ApiError::Unavailable(format!(
                        "slot {target} is installed and boots next on trial, but the zone could not record it within {} s ({e}): not rebooting; reboot server {me} once the zone has a leader again",
                        RECORD_PATIENCE.as_secs()
                    )));
                }
                let said = said.strip_prefix("installed ").unwrap_or(&said).to_owned();
                send(step("installed", said)).await;
            }
            Err(reason) => {
                record.state = UpgradeState::Failed as i32;
                record.reason = reason.clone();
                if let Err(e) = write_record_until(&zone, &mut record, RECORD_PATIENCE).await {
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
        tracing::warn!(slot = %target, version = %record.target_version, "rebooting into the new slot");
        // `systemctl reboot` queues the reboot and returns: its status says
        // whether it was accepted, before this process is stopped.
        let st = match cfg.reboot_command.split_first() {
            Some((prog, args)) => tokio::process::Command::new(prog).args(args).status().await,
            None => Err(std::io::Error::other("upgrade.reboot_command is empty")),
        };
        match st {
            Ok(s) if s.success() => {
                let _ = tx
                    .send(Ok(InstallProgress {
                        step: "rebooting".into(),
                        message: format!("into slot {target} on trial"),
                        done: true,
                        ..InstallProgress::default()
                    }))
                    .await;
                Ok(())
            }
            other => Err(ApiError::FailedPrecondition(format!(
                "slot {target} is installed and boots next on trial, but the reboot command {:?} failed ({other:?}): reboot server {me} by hand",
                cfg.reboot_command
            ))),
        }
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
        .kill_on_drop(true)
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
        let mut chunks = req.into_inner();
        // A bundle this server holds already is not received twice (nor
        // counted twice against the free space).
        let first = chunks
            .message()
            .await?
            .ok_or_else(|| bad("chunks", "the stream ended before the first chunk"))?;
        check_sha("sha256", &first.sha256)?;
        if let Some(info) = held(&self.zone, &first.sha256).await? {
            if info.bytes == first.total_bytes {
                tracing::info!(sha256 = %info.sha256, "an upload of a bundle held already: kept as it is");
                return Ok(Response::new(info));
            }
        }
        use futures::StreamExt as _;
        let chunks = futures::stream::iter([Ok(first)]).chain(chunks);
        let info = receive(&self.zone, chunks, None, |_, _| {}).await?;
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
                    "server {me}'s running slot {running} has no boot entry on {}{}",
                    self.zone.config().upgrade.esp.display(),
                    if boot.error.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", boot.error)
                    }
                ))
                .into())
            }
        }
        // Said before a fetch; checked again when the turn is taken.
        check_turn(&self.zone, me).await?;
        let guard = self.lock()?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let zone = self.zone.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let errs = tx.clone();
            let result = {
                let _under_way = UnderWay::begin();
                UpgradeService::install_task(zone.clone(), req, running, tx).await
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "upgrade install failed");
                let _ = errs.send(Err(e.into())).await;
                // A record it wrote but could not bring to an end (its
                // FAILED write gave up, or the INSTALLING one timed out and
                // committed later) is settled now, not left holding the
                // zone's turn.
                tokio::spawn(settle(zone));
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

/// After a boot: settles this server's record left by an install of an
/// earlier boot (told by the kernel's boot id, not by clocks).
/// - The server runs the target slot: GOOD once its entry is marked good
///   (the boot assessment passed) and it runs the installed image; on
///   trial, wait. This holds for INSTALLING too: the tool finished (only
///   then does the entry exist) but the server stopped before INSTALLED
///   was recorded.
/// - INSTALLED, on the other slot: ROLLED_BACK, with why.
/// - INSTALLING, on the other slot: FAILED (the server stopped while
///   writing the slot, whose entries were removed first: it boots the old
///   slot, and the upgrade may be run again).
///
/// The outcome is written only if the record is still the one judged (a
/// transaction on its revision): a new install's record is never
/// overwritten. Runs until it has written one, or finds nothing to settle
/// once this server is caught up.
pub async fn settle(zone: ServerContext) {
    // One at a time (it is started at boot, and again after an install
    // that failed).
    static SETTLING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    struct Settling;
    impl Drop for Settling {
        fn drop(&mut self) {
            SETTLING.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }
    if SETTLING.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let _settling = Settling;
    let esp = zone.config().upgrade.esp.clone();
    let me = zone.node().id();
    if boot_status(&esp).is_none() {
        return;
    }
    let this_boot = boot_id();
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
        let Some((mut r, seen)) = read_record_at(&zone, me) else {
            return;
        };
        let state = UpgradeState::try_from(r.state);
        let pending = matches!(
            state,
            Ok(UpgradeState::Installed | UpgradeState::Installing)
        );
        if !pending {
            return;
        }
        let earlier_boot = if r.boot_id.is_empty() {
            r.updated_unix_ms < boot_time_ms()
        } else {
            r.boot_id != this_boot
        };
        let under_way = UNDER_WAY.load(std::sync::atomic::Ordering::SeqCst);
        if !earlier_boot && (under_way || state == Ok(UpgradeState::Installed)) {
            // Under way, or installed without a reboot: the next boot
            // judges it.
            tokio::time::sleep(Duration::from_secs(7)).await;
            continue;
        }
        let Some(boot) = boot_status(&esp) else {
            return;
        };
        let target_entry = boot.entries.iter().find(|e| e.slot == r.target_slot);
        if !earlier_boot {
            // INSTALLING, of this boot, and no install runs: it was cut
            // without a reboot. The tool writes the slot's boot entry last,
            // so an entry means the slot is whole and the next boot tries
            // it: that is INSTALLED, waiting for a reboot.
            if let Some(e) = target_entry {
                r.state = UpgradeState::Installed as i32;
                r.reason = format!(
                    "slot {} ({}) was written, but zoned stopped before rebooting into it: reboot server {me} to try it",
                    r.target_slot, e.file
                );
            } else {
                r.state = UpgradeState::Failed as i32;
                r.reason = format!(
                    "the install stopped while writing slot {} (zoned stopped or gave up); the server still runs slot {}; the upgrade may be run again",
                    r.target_slot, boot.running_slot
                );
            }
        } else if boot.running_slot == r.target_slot {
            match target_entry {
                Some(e) if e.assessment == "good" => {
                    let image = zone.host_image();
                    if image == r.target_version {
                        r.state = UpgradeState::Good as i32;
                        r.reason.clear();
                    } else {
                        r.state = UpgradeState::Failed as i32;
                        r.reason = format!(
                            "slot {} runs {image}, not the {} this upgrade installed: the slot was written again since",
                            r.target_slot, r.target_version
                        );
                    }
                }
                // On trial: the assessment is still running.
                _ => continue,
            }
        } else if state == Ok(UpgradeState::Installed) {
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
        } else {
            r.state = UpgradeState::Failed as i32;
            r.reason = format!(
                "the server stopped while writing slot {} (power cut or crash); it booted slot {}; the upgrade may be run again",
                r.target_slot, boot.running_slot
            );
        }
        r.boot_id = this_boot.clone();
        r.updated_unix_ms = now_ms();
        let put = zone_proto::v1::RequestOp {
            request: Some(zone_proto::v1::request_op::Request::Put(PutRequest {
                key: record_key(me),
                value: r.encode_to_vec(),
                prev_kv: false,
            })),
        };
        match zone
            .write_if_unchanged(
                &record_key(me),
                seen,
                vec![put],
                zone.config().request_timeout(),
            )
            .await
        {
            Ok(Some(_)) => {
                tracing::info!(state = r.state().as_str_name(), reason = %r.reason, "upgrade outcome recorded");
                return;
            }
            // A new install wrote its record meanwhile: judge that one.
            Ok(None) => continue,
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
