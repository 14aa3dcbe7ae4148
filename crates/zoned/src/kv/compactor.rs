//! RocksDB compaction on demand (`zonectl compact --physical`).
//!
//! Deleted keys and trimmed history leave tombstones and old values in
//! RocksDB's files until a compaction rewrites them; RocksDB gets to them
//! in its own time. A physical compaction rewrites every column family now,
//! down to the last level, so the space goes back to the filesystem: what
//! an operator needs when a space alarm stands. It runs on a thread of its
//! own, never on the Raft driver's: the store is read and written as usual
//! meanwhile (RocksDB compacts beside live writes). Requests that arrive
//! while one runs are served by one more run after it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use crate::storage::Engine;

#[derive(Debug, Clone)]
pub struct Compactor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    engine: Engine,
    state: Mutex<State>,
    /// How many requests the last finished run covered (it started after
    /// them), and the bytes it left uncompacted for lack of room.
    done: watch::Sender<(u64, u64)>,
    /// Free bytes a compaction leaves alone: the hard floor.
    keep: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    /// Requests so far.
    requests: u64,
    running: bool,
}

impl Compactor {
    pub fn new(engine: Engine) -> Compactor {
        Compactor {
            inner: Arc::new(Inner {
                engine,
                state: Mutex::default(),
                done: watch::Sender::new((0, 0)),
                keep: AtomicU64::new(0),
            }),
        }
    }

    /// Sets the free bytes a compaction leaves alone (the hard floor).
    pub fn set_keep(&self, bytes: u64) {
        self.inner.keep.store(bytes, Ordering::Relaxed);
    }

    /// Requests so far ([`Compactor::wait`]).
    pub fn requested(&self) -> u64 {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requests
    }

    /// Asks for a compaction of everything written so far; returns at once.
    pub fn request(&self) {
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.requests += 1;
        if st.running {
            return;
        }
        st.running = true;
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new()
            .name("zoned-compact".into())
            .spawn(move || inner.run());
        if let Err(e) = spawned {
            st.running = false;
            tracing::warn!(error = %e, "could not start a compaction thread");
        }
    }

    /// Resolves once a run that started after `target` requests (see
    /// [`Compactor::requested`]) has finished; the bytes it left
    /// uncompacted for lack of room.
    pub async fn wait(&self, target: u64) -> u64 {
        let mut rx = self.inner.done.subscribe();
        let skipped = match rx.wait_for(|&(done, _)| done >= target).await {
            Ok(d) => d.1,
            Err(_) => 0,
        };
        skipped
    }
}

/// Clears `running` if the thread panics, so that a later request starts
/// a new one (the normal end clears it under the lock: [`Inner::finish`]).
struct Running<'a>(&'a Inner);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .running = false;
        }
    }
}

impl Inner {
    fn run(&self) {
        let _running = Running(self);
        loop {
            let target = {
                let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if st.requests <= self.done.borrow().0 {
                    return self.finish(st);
                }
                st.requests
            };
            let before = self.engine.size();
            let started = Instant::now();
            let skipped = self.engine.compact_all(self.keep.load(Ordering::Relaxed));
            let after = self.engine.size();
            tracing::info!(
                before_mib = before >> 20,
                after_mib = after >> 20,
                skipped_mib = skipped >> 20,
                seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
                "store compacted"
            );
            self.done.send_replace((target, skipped));
        }
    }

    /// Ends the run under the lock: `running` cleared before the lock is
    /// let go, so a request after this sees it clear and starts a thread.
    fn finish(&self, mut st: std::sync::MutexGuard<'_, State>) {
        st.running = false;
    }
}
