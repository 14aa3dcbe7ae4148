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
    /// them).
    done: watch::Sender<u64>,
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
                done: watch::Sender::new(0),
            }),
        }
    }

    /// Requests so far: a run that finishes covering more than this many
    /// started after this call ([`Compactor::wait`]).
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

    /// Resolves once a run that started after more than `seen` requests
    /// (see [`Compactor::requested`]) has finished.
    pub async fn wait(&self, seen: u64) {
        let mut rx = self.inner.done.subscribe();
        let _ = rx.wait_for(|&done| done > seen).await;
    }
}

impl Inner {
    fn run(&self) {
        loop {
            let target = {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if st.requests <= *self.done.borrow() {
                    st.running = false;
                    return;
                }
                st.requests
            };
            let before: u64 = self.engine.sizes().iter().map(|(_, b)| b).sum();
            let started = Instant::now();
            self.engine.compact_all();
            let after: u64 = self.engine.sizes().iter().map(|(_, b)| b).sum();
            tracing::info!(
                before_mib = before >> 20,
                after_mib = after >> 20,
                seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
                "store compacted"
            );
            self.done.send_replace(target);
        }
    }
}
