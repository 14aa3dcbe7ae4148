//! A client inside the client namespace of the [`crate::Testbed`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::Testbed;

/// A client inside the client namespace. Every attempt runs on a thread of
/// its own moved into the namespace with setns(2), so that probes measure
/// the network and not process start-up, and so that attempts can overlap.
#[derive(Clone)]
pub struct ClientProbe {
    ns_path: PathBuf,
    attempt: std::sync::Arc<AttemptFn>,
}

type AttemptFn = dyn Fn(&str, Duration) -> bool + Send + Sync;

impl std::fmt::Debug for ClientProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientProbe")
            .field("ns_path", &self.ns_path)
            .finish_non_exhaustive()
    }
}

/// How often [`ClientProbe::until_success`] starts a new attempt: the
/// resolution of what it measures.
pub const PROBE_EVERY: Duration = Duration::from_millis(10);

/// How long one attempt of [`ClientProbe::until_success`] may take.
pub const PROBE_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(300);

impl ClientProbe {
    /// `attempt(endpoint, timeout)` runs inside the client namespace and
    /// says whether one request succeeded. Panics when the namespace cannot
    /// be entered.
    pub fn start<F>(tb: &Testbed, attempt: F) -> ClientProbe
    where
        F: Fn(&str, Duration) -> bool + Send + Sync + 'static,
    {
        let probe = ClientProbe {
            ns_path: PathBuf::from(format!("/run/netns/{}", tb.client_ns)),
            attempt: std::sync::Arc::new(attempt),
        };
        if let Err(e) = probe.spawn("", Duration::ZERO, |_| {}).join() {
            panic!("cannot enter the client namespace: {e:?}");
        }
        probe
    }

    /// Runs `attempt` on a new thread in the namespace and hands the
    /// outcome to `done` with the instant it was known. The thread panics
    /// if it cannot enter the namespace; an empty endpoint only enters it.
    fn spawn(
        &self,
        endpoint: &str,
        timeout: Duration,
        done: impl FnOnce((bool, Instant)) + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let (probe, endpoint) = (self.clone(), endpoint.to_owned());
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&probe.ns_path)
                .unwrap_or_else(|e| panic!("{}: {e}", probe.ns_path.display()));
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {}: {e}", probe.ns_path.display()));
            if endpoint.is_empty() {
                return;
            }
            let ok = (probe.attempt)(&endpoint, timeout);
            done((ok, Instant::now()));
        })
    }

    /// One attempt, waited for.
    pub fn attempt(&self, endpoint: &str, timeout: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        let _ = self.spawn(endpoint, timeout, move |r| {
            let _ = tx.send(r.0);
        });
        rx.recv().unwrap_or(false)
    }

    /// Starts an attempt every [`PROBE_EVERY`], overlapping, until one
    /// succeeds; the time from `since` to the first success. A client
    /// retrying in sequence would add up to one attempt timeout to what it
    /// sees; overlapping attempts measure the failover itself to within
    /// [`PROBE_EVERY`].
    pub fn until_success(
        &self,
        endpoint: &str,
        since: Instant,
        give_up: Duration,
    ) -> Option<Duration> {
        let (tx, rx) = std::sync::mpsc::channel::<Instant>();
        let mut next = Instant::now();
        while since.elapsed() < give_up {
            let now = Instant::now();
            if now >= next {
                let tx = tx.clone();
                let _ = self.spawn(endpoint, PROBE_ATTEMPT_TIMEOUT, move |(ok, at)| {
                    if ok {
                        let _ = tx.send(at);
                    }
                });
                next += PROBE_EVERY;
            }
            if let Ok(at) = rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
                return Some(at.duration_since(since));
            }
        }
        None
    }
}
