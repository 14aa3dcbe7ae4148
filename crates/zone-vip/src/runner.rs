//! The agent loop: follow the local zoned's lease over its unix socket,
//! feed the [`Machine`], carry out its actions.
//!
//! Addresses are added and removed inline, the moment the decision is made.
//! Announcements repeat in a background task, stopped on step-down. Units
//! and hooks run in order on a worker of their own, so that a slow hook can
//! never delay removing the VIP when the lease ends.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use zone_proto::v1::{agent_client::AgentClient, LeaseAck};

use crate::config::{Config, Vip};
use crate::effects::{Addresses, Announcer, Services};
use crate::machine::{Action, LeaseView, Machine};

pub use zone_proto::monotonic_ns;

/// The side effects the runner uses.
#[derive(Clone)]
pub struct Effects {
    pub addresses: Arc<dyn Addresses>,
    pub announcer: Arc<dyn Announcer>,
    pub services: Arc<dyn Services>,
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
}

impl Executor {
    async fn execute(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::AddVip(vip) => match self.effects.addresses.add(&vip).await {
                    Ok(()) => tracing::info!(%vip, "VIP added"),
                    Err(e) => tracing::error!(%vip, error = %e, "cannot add the VIP"),
                },
                Action::RemoveVip(vip) => match self.effects.addresses.remove(&vip).await {
                    Ok(()) => tracing::info!(%vip, "VIP removed"),
                    Err(e) => tracing::error!(%vip, error = %e, "cannot remove the VIP"),
                },
                Action::Announce(vip) => self.announce(vip),
                Action::StopAnnouncing => {
                    for t in self.announcing.drain(..) {
                        t.abort();
                    }
                }
                other => {
                    let _ = self.services.send(other);
                }
            }
        }
    }

    /// The first announcement at once, the rest in the background.
    fn announce(&mut self, vip: Vip) {
        if let Err(e) = self.effects.announcer.announce(&vip) {
            tracing::warn!(%vip, error = %e, "announcement failed");
        }
        let rest = self.config.announce.count.saturating_sub(1);
        if rest == 0 {
            return;
        }
        let interval = self.config.announce_interval();
        let announcer = self.effects.announcer.clone();
        self.announcing.push(tokio::spawn(async move {
            for _ in 0..rest {
                tokio::time::sleep(interval).await;
                if let Err(e) = announcer.announce(&vip) {
                    tracing::warn!(%vip, error = %e, "announcement failed");
                }
            }
        }));
    }
}

/// Runs units and hooks one after another, off the critical path.
fn start_service_worker(
    config: &Config,
    services: Arc<dyn Services>,
) -> mpsc::UnboundedSender<Action> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Action>();
    let leader_timeout = Duration::from_millis(config.leader.hook_timeout_ms.unwrap_or(30_000));
    let follower_timeout = Duration::from_millis(config.follower.hook_timeout_ms.unwrap_or(30_000));
    tokio::spawn(async move {
        while let Some(action) = rx.recv().await {
            let services = services.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                let r = match &action {
                    Action::StartUnit(u) => services.start_unit(u),
                    Action::StopUnit(u) => services.stop_unit(u),
                    Action::LeaderHook(h) => services.hook(h, "leader", leader_timeout),
                    Action::FollowerHook(h) => services.hook(h, "follower", follower_timeout),
                    _ => Ok(()),
                };
                (action, r)
            })
            .await;
            match outcome {
                Ok((action, Ok(()))) => tracing::info!(?action, "done"),
                Ok((action, Err(e))) => tracing::error!(?action, error = %e, "failed"),
                Err(e) => tracing::error!(error = %e, "service worker task failed"),
            }
        }
    });
    tx
}

/// Follows the lease until `stop` turns true; always steps down on the way
/// out, so the VIP never outlives the agent.
pub async fn run(config: Config, effects: Effects, mut stop: watch::Receiver<bool>) {
    let mut machine = Machine::new(config.clone());
    let services = start_service_worker(&config, effects.services.clone());
    let mut exec = Executor {
        config: config.clone(),
        effects,
        announcing: Vec::new(),
        services,
    };
    exec.execute(machine.startup()).await;
    let mut backoff = Duration::from_millis(50);
    'outer: loop {
        let channel = tokio::select! {
            c = connect(&config.socket) => c,
            _ = stop.changed() => break 'outer,
        };
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(socket = %config.socket.display(), error = %e, "zoned not reachable");
                exec.execute(machine.on_stream_lost()).await;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => break 'outer,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let (ack_tx, ack_rx) = mpsc::channel::<LeaseAck>(16);
        let mut stream = match AgentClient::new(channel)
            .lease(ReceiverStream::new(ack_rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(e) => {
                tracing::warn!(error = %e.message(), "lease stream refused");
                exec.execute(machine.on_stream_lost()).await;
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        tracing::info!(socket = %config.socket.display(), "following the lease");
        loop {
            let deadline = machine.deadline_ns().map(|d| {
                let left = d.saturating_sub(monotonic_ns());
                tokio::time::Instant::now() + Duration::from_nanos(left)
            });
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(s)) => {
                        let view = LeaseView { held: s.held, expires_ns: s.expires_monotonic_ns, generation: s.generation };
                        exec.execute(machine.on_lease(view, monotonic_ns())).await;
                        let _ = ack_tx.try_send(LeaseAck { generation: s.generation, holding: machine.is_leader() });
                    }
                    Ok(None) | Err(_) => {
                        tracing::warn!("lease stream ended; stepping down");
                        exec.execute(machine.on_stream_lost()).await;
                        break;
                    }
                },
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    tracing::warn!("lease expired without renewal; stepping down");
                    exec.execute(machine.on_tick(monotonic_ns())).await;
                }
                _ = stop.changed() => break 'outer,
            }
        }
    }
    tracing::info!("stopping: releasing everything");
    exec.execute(machine.on_stream_lost()).await;
    // Make sure the VIPs are gone even if we never held them this run.
    exec.execute(machine.startup()).await;
}
