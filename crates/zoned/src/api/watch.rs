//! Watches: the history a watcher asks for is replayed from the store, in
//! slices, then live events follow from the driver's broadcast; a watcher
//! that lags behind the broadcast falls back to the history, and one whose
//! revision was compacted (or replaced by a snapshot here) gets OUT_OF_RANGE
//! naming the oldest revision available.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use zone_proto::v1::{Event, RangeRequest, WatchRequest, WatchResponse};

use super::error::bad;
use super::{ApiError, ServerContext};
use crate::kv::HistoryError;
use crate::node::Applied;

/// What a watch sends: responses, then maybe one error that ends it.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

impl ServerContext {
    /// Starts a watch: history from `start_revision` (0: from now on),
    /// then live events.
    pub(crate) fn watch(&self, req: WatchRequest) -> Result<WatchStream, ApiError> {
        self.limits
            .range(
                "",
                &RangeRequest {
                    prefix: req.prefix.clone(),
                    ..Default::default()
                },
            )
            .map_err(|_| {
                bad(
                    "prefix",
                    format!("over the key limit of {} bytes", self.limits.max_key),
                )
            })?;
        // Subscribe before reading the revision: nothing falls in between.
        let live = self.node.subscribe();
        let reader = self.node.reader().clone();
        let current = reader.revision().map_err(ApiError::from)?;
        let floor = reader.history_floor().map_err(ApiError::from)?;
        let start = if req.start_revision == 0 {
            current + 1
        } else {
            req.start_revision
        };
        if start < floor {
            return Err(ApiError::Compacted(format!(
                "start_revision {start} has been compacted; the oldest revision available is {floor}"
            )));
        }
        let (tx, rx) = mpsc::channel(64);
        let zone = self.clone();
        tokio::spawn(async move {
            let _ = tx
                .send(Ok(WatchResponse {
                    header: zone.header(current),
                    events: Vec::new(),
                }))
                .await;
            run_watch(zone, req, start, current, live, tx).await;
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

fn event_revision(e: &Event) -> u64 {
    e.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

/// Replays history from `next`, then follows live events; falls back to
/// history when it lags behind the live channel.
async fn run_watch(
    zone: ServerContext,
    req: WatchRequest,
    mut next: u64,
    mut replay_to: u64,
    mut live: broadcast::Receiver<Arc<Applied>>,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
) {
    let reader = zone.node.reader().clone();
    let shape = |mut e: Event| {
        if !req.prev_kv {
            e.prev_kv = None;
        }
        e
    };
    loop {
        if next <= replay_to {
            // Replay in slices so a long history is never held at once.
            while next <= replay_to {
                let to = replay_to.min(next + 999);
                // Each slice is read from one snapshot and refused whole if
                // history was trimmed past `next` meanwhile: a replay racing
                // a trim ends with OUT_OF_RANGE, and never skips events.
                let events = match reader.history(next, to, &req.prefix) {
                    Ok(ev) => ev,
                    Err(HistoryError::Trimmed { floor, .. }) => {
                        let msg = format!("the watcher fell behind to revision {next}, which has been compacted; the oldest revision available is {floor}");
                        let _ = tx.send(Err(Status::out_of_range(msg))).await;
                        return;
                    }
                    Err(HistoryError::Storage(e)) => {
                        let _ = tx.send(Err(ApiError::from(e).into())).await;
                        return;
                    }
                };
                if !events.is_empty() {
                    let resp = WatchResponse {
                        header: zone.header(to),
                        events: events.into_iter().map(&shape).collect(),
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
                next = to + 1;
            }
        }
        tokio::select! {
            _ = tx.closed() => return,
            got = live.recv() => match got {
                Ok(applied) => {
                    let batch = match &*applied {
                        Applied::Events(events) => events,
                        Applied::Snapshot(rev) if *rev >= next => {
                            let msg = format!(
                                "this server installed a snapshot at revision {rev}: changes from revision {next} are not available here; read the current state and watch from revision {}",
                                rev + 1
                            );
                            let _ = tx.send(Err(Status::out_of_range(msg))).await;
                            return;
                        }
                        Applied::Snapshot(_) => continue,
                    };
                    let Some(last) = batch.last().map(event_revision) else { continue };
                    let events: Vec<Event> = batch
                        .iter()
                        .filter(|e| event_revision(e) >= next)
                        .filter(|e| e.kv.as_ref().is_some_and(|kv| kv.key.starts_with(&req.prefix)))
                        .cloned()
                        .map(&shape)
                        .collect();
                    next = next.max(last + 1);
                    if !events.is_empty() {
                        let resp = WatchResponse { header: zone.header(last), events };
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    replay_to = match reader.revision() {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = tx.send(Err(ApiError::from(e).into())).await;
                            return;
                        }
                    };
                }
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = tx.send(Err(Status::unavailable("server is shutting down"))).await;
                    return;
                }
            }
        }
    }
}
