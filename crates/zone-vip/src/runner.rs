//! The agent loop: follow the local zoned's lease over its unix socket,
//! feed the [`Machine`], carry out its actions.
//!
//! Addresses are added and removed inline, the moment the decision is made.
//! Announcements repeat in a background task, stopped on step-down. Units
//! and hooks run in order on a worker of their own, so that a slow hook can
//! never delay removing the VIP when the lease ends.
//!
//! Safety: the VIP is held only within the lease. Every side effect that
//! acts as leader (adding or renewing the address, each announcement) first
//! checks that the lease has not run out, and the check is made again after
//! each one: a netlink call or a host stall that outlasts the lease ends in
//! a step-down, not in an address installed or announced after the lease.
//! The address carries a kernel lifetime renewed with each lease, so that it
//! goes even if this process never runs again; zoned removes it itself if
//! this agent does not acknowledge letting go (see zoned's `agent::fence`);
//! and the lease loop feeds systemd's watchdog, so a hung agent is restarted
//! and `ExecStopPost` removes the address.
//!
//! A VM paused by its hypervisor resumes with every clock it keeps frozen,
//! its lease seemingly running while the zone has moved on. Nothing this
//! agent sends for the VIP rests on that clock alone: each repeated
//! announcement and each answer (ARP, neighbour advertisement) waits for a
//! renewal from a heartbeat round sent after it came due (no quorum
//! answers a deposed leader's), the kernel is kept from answering for the
//! VIP ([`crate::neighbours`]), and the RTC, which a pause does not stop,
//! is read against CLOCK_BOOTTIME before each of them ([`crate::rtc`]): a
//! pause seen makes this agent step down and ignore renewals from rounds
//! sent before it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use zone_proto::v1::{agent_client::AgentClient, HeldAddress, LeaseAck};

use crate::config::{Config, Vip};
use crate::effects::{Addresses, Announcer, Services};
use crate::machine::{Action, LeaseView, Machine};
use crate::neighbours::Question;
use crate::rtc::{Pause, Rtc};
use crate::watchdog::Watchdog;

pub use zone_proto::boottime_ns;
use zone_proto::BootTimer;

/// The side effects the runner uses.
#[derive(Clone)]
pub struct Effects {
    pub addresses: Arc<dyn Addresses>,
    pub announcer: Arc<dyn Announcer>,
    pub services: Arc<dyn Services>,
    /// The RTC, to tell a VM pause (`None`: no such check).
    pub rtc: Option<Arc<Rtc>>,
    /// The watchdog that fences the leader-only units.
    pub watchdog: Arc<dyn Watchdog>,
}

impl std::fmt::Debug for Effects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Effects")
    }
}

async fn connect(path: &std::path::Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    // The URI is not used: every connection goes to the unix socket.
    Endpoint::from_static("http://zoned.agent")
        .connect_timeout(Duration::from_secs(1))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

struct Executor {
    config: Config,
    effects: Effects,
    announcing: Vec<tokio::task::JoinHandle<()>>,
    services: mpsc::UnboundedSender<Action>,
    /// The lease's end (CLOCK_BOOTTIME ns) while leading, 0 otherwise;
    /// shared with the announcement tasks.
    valid_until: Arc<AtomicU64>,
    /// While leading: when the heartbeat round behind the latest renewal
    /// was sent (CLOCK_BOOTTIME ns); 0 otherwise. The announcement tasks
    /// and the answers to questions for the VIP wait on it.
    fresh: watch::Sender<u64>,
    /// When the round behind the lease state being applied was sent.
    round_sent: u64,
    /// The watchdog is required and could not be armed for this
    /// leadership: no leader-only unit or leader hook may start.
    units_blocked: bool,
    /// The watchdog was armed for the current leadership: exclusive
    /// datastores may be mounted.
    watchdog_armed: bool,
    /// The mount units last recorded as possibly mounted.
    recorded_mounts: Vec<String>,
    /// The leader-only units last recorded as possibly started.
    recorded_units: Vec<String>,
    /// Where a fence hook's success is told, with its epoch.
    fenced: mpsc::UnboundedSender<u64>,
}

/// How long a repeated announcement waits for a lease round sent after it
/// came due (one comes every heartbeat, 100 ms by default) before the
/// remaining ones are given up.
const FRESH_ROUND_WAIT: Duration = Duration::from_secs(1);

/// Whether a lease valid until `valid_until` still holds.
fn lease_valid(valid_until: &AtomicU64) -> bool {
    boottime_ns() < valid_until.load(Ordering::Acquire)
}

/// How long, at least, the clocks stood still since `since_ns` (a VM
/// pause), if they did: a lease counted on them cannot be trusted.
fn stood_still(rtc: &Option<Arc<Rtc>>, since_ns: u64) -> Option<Duration> {
    rtc.as_ref().and_then(|r| r.stood_still_since(since_ns))
}

/// At most this many questions (ARP, neighbour solicitations) wait for a
/// fresh lease round at once; more are dropped (the asker asks again).
const MAX_WAITING_QUESTIONS: usize = 64;

/// Answers the neighbours' questions about the VIPs while leading.
async fn answer_questions(
    mut questions: mpsc::Receiver<Question>,
    announcer: Arc<dyn Announcer>,
    valid_until: Arc<AtomicU64>,
    fresh: watch::Receiver<u64>,
    rtc: Option<Arc<Rtc>>,
) {
    let waiting = Arc::new(AtomicUsize::new(0));
    while let Some(q) = questions.recv().await {
        if valid_until.load(Ordering::Acquire) == 0
            || waiting.load(Ordering::Relaxed) >= MAX_WAITING_QUESTIONS
        {
            continue;
        }
        waiting.fetch_add(1, Ordering::Relaxed);
        let (announcer, valid_until, mut fresh, rtc, waiting) = (
            announcer.clone(),
            valid_until.clone(),
            fresh.clone(),
            rtc.clone(),
            waiting.clone(),
        );
        tokio::spawn(async move {
            // Safety: the answer tells the asker that the VIP lives here.
            // It is sent only under a renewal from a heartbeat round sent
            // after the question arrived: a quorum still followed this
            // server after that, which no deposed leader gets, whatever its
            // clocks say (a resumed VM's have not counted the pause). And
            // not if the RTC says the clocks stood still since the question
            // came: the round's answers may have waited out a pause in this
            // VM's queues.
            let renewed =
                tokio::time::timeout(FRESH_ROUND_WAIT, fresh.wait_for(|&sent| sent >= q.at_ns))
                    .await;
            waiting.fetch_sub(1, Ordering::Relaxed);
            if !matches!(renewed, Ok(Ok(_))) || !lease_valid(&valid_until) {
                return;
            }
            if let Some(gap) = stood_still(&rtc, q.at_ns) {
                tracing::warn!(vip = %q.vip, stood_still = ?gap, "the clocks stood still since a question for the VIP came (a paused VM?): not answered");
                return;
            }
            if let Err(e) = announcer.answer(&q) {
                tracing::debug!(vip = %q.vip, error = %e, "cannot answer a question for the VIP");
            }
        });
    }
}

/// What zone-vip counts for zoned's metrics (`Agent.ReportFigures`).
#[derive(Debug)]
pub struct Figures {
    /// VIP addresses added and not removed since.
    pub held: AtomicU64,
    /// VIPs added or removed.
    pub transitions: AtomicU64,
    /// Announcements sent (each a gratuitous ARP or unsolicited NA burst).
    pub announcements: AtomicU64,
}

pub static FIGURES: Figures = Figures {
    held: AtomicU64::new(0),
    transitions: AtomicU64::new(0),
    announcements: AtomicU64::new(0),
};

/// How often the figures go to zoned.
const FIGURES_EVERY: Duration = Duration::from_secs(5);

impl Figures {
    fn report(&self) -> zone_proto::v1::AgentFigures {
        let f = |name: &str, v: &AtomicU64| zone_proto::v1::AgentFigure {
            name: name.to_owned(),
            value: v.load(Ordering::Relaxed) as f64,
        };
        zone_proto::v1::AgentFigures {
            agent: "zone-vip".into(),
            figures: vec![
                f("vip_held", &self.held),
                f("vip_transitions", &self.transitions),
                f("vip_announcements", &self.announcements),
            ],
        }
    }
}

/// Sends [`FIGURES`] to zoned every [`FIGURES_EVERY`], forever, on a
/// connection of its own: nothing here waits on the lease loop, nor it on
/// this (a zoned that does not know the call is asked again later).
async fn report_figures(socket: std::path::PathBuf) {
    let mut every = tokio::time::interval(FIGURES_EVERY);
    let mut client = None;
    loop {
        every.tick().await;
        if client.is_none() {
            client = connect(&socket).await.ok().map(AgentClient::new);
        }
        if let Some(c) = client.as_mut() {
            let mut req = tonic::Request::new(FIGURES.report());
            req.set_timeout(Duration::from_secs(2));
            if let Err(e) = c.report_figures(req).await {
                tracing::debug!(error = %e.message(), "cannot report figures to zoned");
                client = None;
            }
        }
    }
}

/// The next pause the RTC sampler sees (never, without an RTC).
async fn next_pause(pauses: &mut Option<watch::Receiver<Pause>>) -> Pause {
    if let Some(rx) = pauses {
        if rx.changed().await.is_ok() {
            return *rx.borrow_and_update();
        }
    }
    std::future::pending().await
}

impl Executor {
    /// Carries out `actions` in order. Returns false, with the rest left
    /// undone, if the lease ran out before or during a side effect that acts
    /// as leader: the caller must step down at once.
    async fn execute(&mut self, actions: Vec<Action>) -> bool {
        for action in actions {
            match action {
                Action::AddVip(ref vip) | Action::RenewVip(ref vip) => {
                    let until = self.valid_until.load(Ordering::Acquire);
                    let now = boottime_ns();
                    if now >= until {
                        return false;
                    }
                    // Taking the VIP (not each renewal: the RTC is slow
                    // to read on some hardware; a pause seen by the sampler
                    // steps down within its period).
                    if matches!(action, Action::AddVip(_)) && self.paused() {
                        return false;
                    }
                    let lifetime = Duration::from_nanos(until - now);
                    let r = self.effects.addresses.add(vip, lifetime).await;
                    if !lease_valid(&self.valid_until) {
                        tracing::warn!(%vip, "the lease ran out while the VIP was being added");
                        return false;
                    }
                    let first = matches!(action, Action::AddVip(_));
                    match r {
                        Ok(()) if first => {
                            FIGURES.held.fetch_add(1, Ordering::Relaxed);
                            FIGURES.transitions.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(%vip, "VIP added")
                        }
                        Ok(()) => {}
                        Err(e) => tracing::error!(%vip, error = %e, "cannot add the VIP"),
                    }
                }
                Action::ResetConnections(vip) => {
                    // A few netlink round trips, each bounded: the removal
                    // that follows must not wait long (see the safety note
                    // in `Machine::on_lease`).
                    match self.effects.addresses.reset_connections(&vip) {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(%vip, connections = n, "reset the clients' connections to the VIP before it leaves: they connect again, to the next holder")
                        }
                        Err(e) => {
                            tracing::warn!(%vip, error = %e, "cannot reset the clients' connections to the VIP; a client waiting on one hears nothing until its own deadline")
                        }
                    }
                }
                Action::RemoveVip(vip) => match self.effects.addresses.remove(&vip).await {
                    Ok(()) => {
                        let _ =
                            FIGURES
                                .held
                                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                                    Some(h.saturating_sub(1))
                                });
                        FIGURES.transitions.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%vip, "VIP removed")
                    }
                    Err(e) => tracing::error!(%vip, error = %e, "cannot remove the VIP"),
                },
                Action::Announce(vip) => {
                    if !lease_valid(&self.valid_until) || self.paused() {
                        return false;
                    }
                    self.announce(vip);
                }
                Action::ArmWatchdog { epoch } => {
                    // Arming pets: only within the lease.
                    if !lease_valid(&self.valid_until) {
                        return false;
                    }
                    self.arm(epoch);
                }
                Action::PetWatchdog => {
                    // Safety: the last pet comes before the lease ends
                    // (see crate::watchdog).
                    if !lease_valid(&self.valid_until) {
                        return false;
                    }
                    if let Err(e) = self.effects.watchdog.pet() {
                        tracing::warn!(error = %e, "cannot pet the watchdog");
                    }
                }
                Action::FenceHook {
                    command,
                    epoch,
                    target,
                } => {
                    // On its own task: a BMC slow to answer must hold up
                    // neither the units stopping nor the delay's end.
                    let services = self.effects.services.clone();
                    let fenced = self.fenced.clone();
                    let timeout = self.config.fence.hook_timeout;
                    tokio::task::spawn_blocking(move || {
                        match services.fence(&command, target, timeout) {
                            Ok(()) => {
                                tracing::info!(target, "the fence hook succeeded");
                                let _ = fenced.send(epoch);
                            }
                            Err(e) => {
                                tracing::warn!(target, error = %e, "the fence hook failed: leader-only units wait out the fence delay");
                            }
                        }
                    });
                }
                Action::Mount(ref u) => {
                    if !lease_valid(&self.valid_until) {
                        return false;
                    }
                    // Safety: a shared block device mounted on two servers
                    // is corrupted. Only under a watchdog armed for this
                    // leadership, which resets this server should it fail
                    // to unmount once the lease is gone; whatever
                    // fence.watchdog_mode says. Else the units that would
                    // use it do not start either.
                    if self.units_blocked || !self.watchdog_armed {
                        tracing::error!(unit = %u, mode = ?self.config.fence.watchdog_mode, "exclusive datastore not mounted: no watchdog armed for this leadership (a shared disk is never mounted unfenced); leader-only units not started");
                        self.units_blocked = true;
                    } else {
                        let _ = self.services.send(Action::Mount(u.clone()));
                    }
                }
                Action::StopAnnouncing => {
                    for t in self.announcing.drain(..) {
                        t.abort();
                    }
                    // The step-down: this leadership's watchdog is left to
                    // the worker's disarm.
                    self.watchdog_armed = false;
                }
                Action::StartUnit(ref u) if self.units_blocked => {
                    tracing::error!(unit = %u, "not started: the watchdog is required (fence.watchdog_mode) and could not be armed");
                }
                Action::LeaderHook(_) if self.units_blocked => {
                    tracing::error!("leader hook not run: the watchdog is required (fence.watchdog_mode) and could not be armed");
                }
                other => {
                    let _ = self.services.send(other);
                }
            }
        }
        true
    }

    /// Arms the watchdog for leadership `epoch`; without it, blocks the
    /// units if it is required.
    fn arm(&mut self, epoch: u64) {
        let fence = &self.config.fence;
        self.units_blocked = false;
        self.watchdog_armed = false;
        match self.effects.watchdog.arm(epoch, fence.watchdog_timeout) {
            Ok(t) => {
                tracing::info!(timeout = ?t, "watchdog armed");
                self.watchdog_armed = true;
            }
            Err(e) if fence.watchdog_mode == crate::config::WatchdogMode::Required => {
                tracing::error!(error = %e, "cannot arm the watchdog, which fence.watchdog_mode requires: leader-only units will not start on this server");
                self.units_blocked = true;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot arm the watchdog: leader-only units still start after the fence delay, but should this server fail to stop them after losing the lease, nothing resets it");
            }
        }
    }

    /// Whether the clocks stood still since the round behind the lease
    /// being applied was sent: then it cannot be acted on.
    fn paused(&self) -> bool {
        let Some(gap) = stood_still(&self.effects.rtc, self.round_sent) else {
            return false;
        };
        tracing::warn!(stood_still = ?gap, "the clocks stood still since the lease's round was sent (a paused VM?): stepping down");
        true
    }

    /// The first announcement at once, the rest in the background.
    fn announce(&mut self, vip: Vip) {
        match self.effects.announcer.announce(&vip) {
            Ok(()) => {
                FIGURES.announcements.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(%vip, error = %e, "announcement failed"),
        }
        let rest = self.config.announce.count.saturating_sub(1);
        if rest == 0 {
            return;
        }
        let interval = self.config.announce_interval();
        let announcer = self.effects.announcer.clone();
        let valid_until = self.valid_until.clone();
        let rtc = self.effects.rtc.clone();
        let mut fresh = self.fresh.subscribe();
        self.announcing.push(tokio::spawn(async move {
            for _ in 0..rest {
                tokio::time::sleep(interval).await;
                // Safety: after a stall this task may run before the lease
                // loop learns that the lease ended, and its clock may not
                // say so either: a VM paused by its hypervisor resumes with
                // its clocks frozen, the lease seemingly still running
                // while another server holds the VIP (seen in the QEMU
                // pause test: an announcement 50 ms after the resume). So
                // each repeat waits for a renewal from a heartbeat round
                // sent after it came due, which no quorum answers once the
                // zone has moved on (and the step-down then stops this
                // task). The first announcement, at takeover, follows a
                // renewal just received. A pause that falls between such a
                // round's sending and its answers (which wait in this VM's
                // queues, read on resume) is told by the RTC.
                let due = boottime_ns();
                let renewed = tokio::time::timeout(
                    FRESH_ROUND_WAIT,
                    fresh.wait_for(|&sent| sent >= due),
                )
                .await;
                if !matches!(renewed, Ok(Ok(_))) {
                    tracing::debug!(%vip, "no lease round since the announcement came due: the rest given up");
                    return;
                }
                if !lease_valid(&valid_until) {
                    return;
                }
                if let Some(gap) = stood_still(&rtc, due) {
                    tracing::warn!(%vip, stood_still = ?gap, "the clocks stood still since the announcement came due (a paused VM?): the rest given up");
                    return;
                }
                match announcer.announce(&vip) {
                    Ok(()) => {
                        FIGURES.announcements.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(%vip, error = %e, "announcement failed"),
                }
            }
        }));
    }
}

/// Runs units and hooks one after another, off the critical path; the
/// watchdog is disarmed there too, after the units stopped before it.
fn start_service_worker(
    config: &Config,
    services: Arc<dyn Services>,
    watchdog: Arc<dyn Watchdog>,
) -> (mpsc::UnboundedSender<Action>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Action>();
    let leader_timeout = Duration::from_millis(config.leader.hook_timeout_ms.unwrap_or(30_000));
    let follower_timeout = Duration::from_millis(config.follower.hook_timeout_ms.unwrap_or(30_000));
    let worker = tokio::spawn(async move {
        // A unit failed to stop since the last disarm: the watchdog must
        // stay armed, and reset this server.
        let mut stop_failed = false;
        // An exclusive datastore did not mount in this leadership: the
        // units that would run on it are not started (they would write
        // under the empty mount point).
        let mut mount_failed: Option<String> = None;
        while let Some(action) = rx.recv().await {
            let services = services.clone();
            let watchdog = watchdog.clone();
            let failed_before = stop_failed;
            // A new leadership mounts again. Not at any stop: a unit the
            // zone dropped stops mid-leadership, and the units added after
            // it must not start over a mount point left empty.
            if matches!(action, Action::DisarmWatchdog { .. }) {
                mount_failed = None;
            }
            if let (Some(m), Action::StartUnit(_) | Action::LeaderHook(_)) =
                (&mount_failed, &action)
            {
                tracing::error!(?action, mount = %m, "not started: an exclusive datastore did not mount");
                continue;
            }
            let outcome = tokio::task::spawn_blocking(move || {
                let r = match &action {
                    Action::Mount(u) => services.mount(u),
                    Action::Release(u) => services.release(u),
                    Action::StartUnit(u) => services.start_unit(u),
                    Action::StopUnit(u) => services.stop_unit(u),
                    Action::LeaderHook(h) => services.hook(h, "leader", leader_timeout),
                    Action::FollowerHook(h) => services.hook(h, "follower", follower_timeout),
                    Action::DisarmWatchdog { .. } if failed_before => Err(
                        "a leader-only unit did not stop: the watchdog stays armed and will reset this server"
                            .to_owned(),
                    ),
                    Action::DisarmWatchdog { epoch } => match watchdog.disarm(*epoch) {
                        Ok(true) => {
                            tracing::info!("leader-only units stopped: watchdog disarmed");
                            Ok(())
                        }
                        Ok(false) => Ok(()),
                        Err(e) => Err(format!("cannot disarm the watchdog: {e}")),
                    },
                    _ => Ok(()),
                };
                (action, r)
            })
            .await;
            match outcome {
                Ok((Action::DisarmWatchdog { .. }, r)) => {
                    stop_failed = false;
                    if let Err(e) = r {
                        tracing::error!(error = %e, "watchdog left armed");
                    }
                }
                Ok((action @ Action::StopUnit(_), Err(e))) => {
                    stop_failed = true;
                    tracing::error!(?action, error = %e, "failed");
                }
                Ok((Action::Release(u), Err(e))) => {
                    // Still mounted: stopped again when the lease ends, after
                    // the units, under the failed-stop rule.
                    tracing::warn!(unit = %u, error = %e, "a removed exclusive datastore is still in use: unmounted when the lease ends");
                }
                Ok((Action::Mount(u), Err(e))) => {
                    tracing::error!(unit = %u, error = %e, "the exclusive datastore did not mount: the leader-only units are not started");
                    mount_failed = Some(u);
                }
                Ok((action, Ok(()))) => tracing::info!(?action, "done"),
                Ok((action, Err(e))) => tracing::error!(?action, error = %e, "failed"),
                Err(e) => {
                    // Perhaps a stop: the watchdog stays armed.
                    stop_failed = true;
                    tracing::error!(error = %e, "service worker task failed");
                }
            }
        }
    });
    (tx, worker)
}

/// How often zone-mounts' list of exclusive datastores is read.
const EXCLUSIVE_UNITS_EVERY: Duration = Duration::from_secs(1);

/// The mount units in zone-mounts' list (`[storage] exclusive_units`): one
/// unit name per line; none when the file is missing. A line that is not a
/// mount unit's name is skipped, loudly.
fn read_exclusive_units(path: &std::path::Path) -> Option<Vec<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(Vec::new()),
        Err(e) => {
            // Not "none": the mounts listed before stay known.
            tracing::warn!(path = %path.display(), error = %e, "cannot read the exclusive datastores' units; keeping the last list");
            return None;
        }
    };
    let units = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| {
            let ok = l.ends_with(".mount") && !l.contains('/') && !l.starts_with('-');
            if !ok {
                tracing::warn!(path = %path.display(), line = %l, "not a mount unit's name; skipped");
            }
            ok
        })
        .map(str::to_owned)
        .collect();
    Some(units)
}

/// Reads what a previous run recorded as mounted ([`record_mounts`]).
fn read_recorded_mounts(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| l.ends_with(".mount"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Records the mount units this agent may have mounted (on /run: mounts
/// do not outlive a boot), so that a restart stops them even once they
/// have left zone-mounts' list.
fn record_mounts(path: &std::path::Path, units: &[String]) {
    record_list(path, units, "cannot record the mounted exclusive datastores; a restart may not unmount one removed meanwhile");
}

/// Writes `units`, one per line, whole (on /run); says `failure` if it
/// cannot.
fn record_list(path: &std::path::Path, units: &[String], failure: &str) {
    let text: String = units.iter().map(|u| format!("{u}\n")).collect();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = zone_files::atomic::write(path, text.as_bytes(), 0o644, None) {
        tracing::error!(path = %path.display(), error = %e, "{failure}");
    }
}

/// Reads what a previous run recorded as possibly started
/// ([`record_units`]); a line that is not a zone unit's name is skipped.
fn read_recorded_units(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('-') && !l.contains('/'))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Records the leader-only units this agent may have started (on /run:
/// units do not outlive a boot), so that a restart stops them even once
/// the zone's list has changed.
fn record_units(path: &std::path::Path, units: &[String]) {
    record_list(path, units, "cannot record the leader-only units; a restart may not stop one the zone removed meanwhile");
}

/// Feeds systemd's watchdog (`WatchdogSec=`) from the lease loop itself,
/// so that a loop stuck in a system call stops feeding it.
#[derive(Debug)]
struct SdWatchdog {
    every: Option<Duration>,
    last: tokio::time::Instant,
}

impl SdWatchdog {
    fn new() -> SdWatchdog {
        SdWatchdog {
            // Fed twice per period.
            every: sd_notify::watchdog_enabled().map(|p| p / 2),
            last: tokio::time::Instant::now(),
        }
    }

    /// Tells systemd that start-up is over (its watchdog runs from now)
    /// and feeds the watchdog once.
    fn ready(&mut self) {
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Watchdog,
        ]);
        self.last = tokio::time::Instant::now();
    }

    fn feed(&mut self) {
        if self.every.is_some_and(|e| self.last.elapsed() >= e) {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            self.last = tokio::time::Instant::now();
        }
    }

    /// When it must be fed next (far away when there is no watchdog).
    fn due(&self) -> tokio::time::Instant {
        self.last + self.every.unwrap_or(Duration::from_secs(3600))
    }
}

/// The addresses this agent holds when it acts as leader, as every
/// acknowledgement declares them (see the proto).
fn declared(config: &Config) -> Vec<HeldAddress> {
    config
        .vips
        .iter()
        .map(|v| HeldAddress {
            interface: v.interface.clone(),
            address: v.address.to_string(),
            prefix: v.prefix.into(),
        })
        .collect()
}

/// Carries out `actions`; if the lease ran out meanwhile, steps down at
/// once.
async fn apply(exec: &mut Executor, machine: &mut Machine, actions: Vec<Action>) {
    // Recorded before the mounts are done (by the worker, later).
    let mounted = machine.mounted_units();
    if mounted != exec.recorded_mounts {
        record_mounts(&exec.config.storage.mounted_record, &mounted);
        exec.recorded_mounts = mounted;
    }
    // Before the units start (the worker starts them later).
    let units = machine.units_to_record();
    if units != exec.recorded_units {
        record_units(&exec.config.units_record, &units);
        exec.recorded_units = units;
    }
    let deadline = machine.deadline_ns().unwrap_or(0);
    exec.valid_until.store(deadline, Ordering::Release);
    if !machine.is_leader() {
        exec.fresh.send_replace(0);
    }
    if exec.execute(actions).await {
        return;
    }
    let down = machine.on_tick(boottime_ns().max(deadline));
    exec.valid_until.store(0, Ordering::Release);
    exec.fresh.send_replace(0);
    exec.execute(down).await;
}

/// Follows the lease until `stop` turns true; always steps down on the way
/// out, so the VIP never outlives the agent.
pub async fn run(config: Config, effects: Effects, mut stop: watch::Receiver<bool>) {
    let mut machine = Machine::new(config.clone());
    let (fenced_tx, mut fenced) = mpsc::unbounded_channel();
    let (services, worker) =
        start_service_worker(&config, effects.services.clone(), effects.watchdog.clone());
    let mut exec = Executor {
        config: config.clone(),
        effects,
        announcing: Vec::new(),
        services,
        valid_until: Arc::new(AtomicU64::new(0)),
        fresh: watch::channel(0).0,
        round_sent: 0,
        units_blocked: false,
        watchdog_armed: false,
        recorded_mounts: Vec::new(),
        recorded_units: Vec::new(),
        fenced: fenced_tx,
    };
    let (questions_tx, questions) = mpsc::channel(256);
    match exec.effects.announcer.listen(&config.vips, questions_tx) {
        Ok(()) => {
            tokio::spawn(answer_questions(
                questions,
                exec.effects.announcer.clone(),
                exec.valid_until.clone(),
                exec.fresh.subscribe(),
                exec.effects.rtc.clone(),
            ));
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for questions for the VIP: no neighbour will learn it from this server but by its announcements")
        }
    }
    let mut pauses = exec.effects.rtc.as_ref().map(|r| r.pauses());
    if pauses.is_none() {
        tracing::warn!(
            "no RTC to read (/sys/class/rtc/rtc0): a VM pause is told only by the lease rounds"
        );
    }
    let mut watchdog = SdWatchdog::new();
    // Lease deadlines on CLOCK_BOOTTIME: one that passed while the host was
    // suspended ends the wait at once on resume.
    let timer = BootTimer::new();
    if !timer.is_boottime() {
        tracing::warn!("no CLOCK_BOOTTIME timer: lease deadlines wait on the monotonic clock");
    }
    let addresses = declared(&config);
    let ack = |holding: bool, generation: u64| LeaseAck {
        generation,
        holding,
        addresses: addresses.clone(),
    };
    // The exclusive datastores first: a previous run may have left them
    // mounted, and startup stops them.
    let mut exclusive_every = tokio::time::interval(EXCLUSIVE_UNITS_EVERY);
    exclusive_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    machine.on_recorded_mounts(read_recorded_mounts(&config.storage.mounted_record));
    machine.on_recorded_units(read_recorded_units(&config.units_record));
    let listed = read_exclusive_units(&config.storage.exclusive_units).unwrap_or_default();
    let none = machine.on_exclusive_units(listed, boottime_ns());
    debug_assert!(none.is_empty(), "a follower at start");
    let stale = machine.startup();
    apply(&mut exec, &mut machine, stale).await;
    // Ready (Type=notify): systemd's watchdog counts from here, not from
    // the exec. Before this, at boot, the gate's `nft` loads the kernel's
    // nf_tables modules and the first netlink calls wait on a busy system:
    // counted from the exec, that took more than WatchdogSec= in the QEMU
    // zone, and systemd killed every VM's zone-vip once while booting.
    watchdog.ready();
    tokio::spawn(report_figures(config.socket.clone()));
    let mut backoff = Duration::from_millis(50);
    'outer: loop {
        watchdog.feed();
        let channel = tokio::select! {
            c = connect(&config.socket) => c,
            _ = stop.changed() => break 'outer,
        };
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(socket = %config.socket.display(), error = %e, "zoned not reachable");
                let down = machine.on_stream_lost();
                apply(&mut exec, &mut machine, down).await;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => break 'outer,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let (ack_tx, ack_rx) = mpsc::channel::<LeaseAck>(16);
        // The declaration: zoned learns the addresses before this agent can
        // hold any, so it can remove them should this agent freeze.
        let _ = ack_tx.try_send(ack(false, 0));
        // Bounded: a frozen zoned must not stop this loop (and its
        // watchdog) here.
        let opened = tokio::time::timeout(
            Duration::from_secs(2),
            AgentClient::new(channel).lease(ReceiverStream::new(ack_rx)),
        )
        .await;
        let mut stream = match opened {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e.message(), "lease stream refused");
                let down = machine.on_stream_lost();
                apply(&mut exec, &mut machine, down).await;
                tokio::time::sleep(backoff).await;
                continue;
            }
            Err(_) => {
                tracing::warn!("zoned did not open the lease stream within 2 s");
                let down = machine.on_stream_lost();
                apply(&mut exec, &mut machine, down).await;
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        tracing::info!(socket = %config.socket.display(), "following the lease");
        let mut generation = 0;
        loop {
            watchdog.feed();
            let deadline = machine.deadline_ns();
            // One timer: the lease's end or the fence delay's, the sooner.
            let wake = match (deadline, machine.fence_due_ns()) {
                (Some(d), Some(f)) => Some(d.min(f)),
                (d, f) => d.or(f),
            };
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(s)) => {
                        generation = s.generation;
                        // A round sent before a pause seen since: its
                        // answers waited out the pause, and the zone may
                        // have moved on meanwhile.
                        let last_pause = pauses.as_ref().map_or(0, |p| p.borrow().seen_ns);
                        if s.held && s.round_sent_boottime_ns < last_pause {
                            let _ = ack_tx.try_send(ack(machine.is_leader(), generation));
                            continue;
                        }
                        exec.round_sent = s.round_sent_boottime_ns;
                        // The zone's leader-only units before a lease that
                        // makes this agent leader (it starts those), after
                        // one that ends its leadership (the step-down is
                        // not held up by them).
                        let zone_units = s.leader_units_set.then(|| s.leader_units.clone());
                        let view = LeaseView { held: s.held, expires_ns: s.expires_boottime_ns, generation: s.generation, storage_ready: !s.storage_not_ready, extensions_ready: !s.extensions_not_ready, leader_id: s.leader_id, server_id: s.server_id };
                        if s.held {
                            let actions = machine.on_leader_units(zone_units, boottime_ns());
                            apply(&mut exec, &mut machine, actions).await;
                            let actions = machine.on_lease(view, boottime_ns());
                            apply(&mut exec, &mut machine, actions).await;
                        } else {
                            let actions = machine.on_lease(view, boottime_ns());
                            apply(&mut exec, &mut machine, actions).await;
                            let actions = machine.on_leader_units(zone_units, boottime_ns());
                            apply(&mut exec, &mut machine, actions).await;
                        }
                        if machine.is_leader() {
                            exec.fresh.send_replace(s.round_sent_boottime_ns);
                        }
                        let _ = ack_tx.try_send(ack(machine.is_leader(), generation));
                    }
                    Ok(None) | Err(_) => {
                        tracing::warn!("lease stream ended; stepping down");
                        let down = machine.on_stream_lost();
                        apply(&mut exec, &mut machine, down).await;
                        break;
                    }
                },
                _ = timer.sleep_until(wake.unwrap_or(0)), if wake.is_some() => {
                    let now = boottime_ns();
                    let expired = deadline.is_some_and(|d| now >= d);
                    if expired {
                        tracing::warn!("lease expired without renewal; stepping down");
                    }
                    let actions = machine.on_tick(now);
                    apply(&mut exec, &mut machine, actions).await;
                    if expired {
                        // Tell zoned at once that the VIP is gone, so that
                        // its fence has nothing to do.
                        let _ = ack_tx.try_send(ack(machine.is_leader(), generation));
                    }
                }
                Some(epoch) = fenced.recv() => {
                    // Only within the lease (else the timer steps down).
                    if machine.deadline_ns().is_some_and(|d| boottime_ns() < d) {
                        let actions = machine.on_fence_hook(epoch);
                        apply(&mut exec, &mut machine, actions).await;
                    }
                }
                pause = next_pause(&mut pauses) => {
                    if machine.is_leader() {
                        tracing::warn!(stood_still = ?pause.at_least, "the clocks stood still (a paused VM?): the lease, counted on them, cannot be trusted; stepping down");
                        let down = machine.on_tick(u64::MAX);
                        apply(&mut exec, &mut machine, down).await;
                        let _ = ack_tx.try_send(ack(machine.is_leader(), generation));
                    }
                }
                _ = exclusive_every.tick() => {
                    if let Some(listed) = read_exclusive_units(&config.storage.exclusive_units) {
                        let actions = machine.on_exclusive_units(listed, boottime_ns());
                        apply(&mut exec, &mut machine, actions).await;
                    }
                }
                _ = tokio::time::sleep_until(watchdog.due()) => {}
                _ = stop.changed() => break 'outer,
            }
        }
    }
    tracing::info!("stopping: releasing everything");
    let down = machine.on_stream_lost();
    apply(&mut exec, &mut machine, down).await;
    // Make sure the VIPs are gone even if we never held them this run.
    let all = machine.startup();
    apply(&mut exec, &mut machine, all).await;
    // The units stop (and the watchdog is disarmed after them) before the
    // process exits: left to the runtime's end, they would not run, and
    // the watchdog, closed without being disarmed, would reset the server.
    drop(exec);
    if let Err(e) = worker.await {
        tracing::error!(error = %e, "service worker task failed");
    }
}
