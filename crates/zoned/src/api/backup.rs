//! `Cluster.Backup`: the store streamed from one RocksDB snapshot on this
//! server, for `zonectl snapshot save` (see `kv::backup` and the
//! `zone_backup` crate for what is sent).

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use zone_proto::v1::BackupChunk;

use super::{ApiError, ServerContext};

pub type BackupStream = Pin<Box<dyn Stream<Item = Result<BackupChunk, Status>> + Send>>;

impl ServerContext {
    /// With `linearizable`, first waits (within `budget`) until this server
    /// has applied everything committed when the call arrived; then the
    /// scan runs on a blocking thread, a few chunks ahead of the client
    /// (it waits for a slow one: the RocksDB snapshot it holds keeps the
    /// store's files as of it meanwhile).
    pub(crate) async fn backup(
        &self,
        linearizable: bool,
        budget: Duration,
    ) -> Result<BackupStream, ApiError> {
        if linearizable {
            self.linearize(budget).await?;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let zone = self.clone();
        let (id, _) = self.identity();
        tokio::task::spawn_blocking(move || {
            let taken = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let started = std::time::Instant::now();
            let mut chunks = 0u64;
            let mut gone = false;
            let r = zone.reader().backup(id, taken, |c| {
                chunks += 1;
                gone = tx.blocking_send(Ok(c)).is_err();
                !gone
            });
            match r {
                Ok(()) if gone => {
                    tracing::warn!(chunks, "backup abandoned: the client went away")
                }
                Ok(()) => tracing::info!(chunks, took = ?started.elapsed(), "backup streamed"),
                Err(e) => {
                    tracing::error!(error = %e, "backup failed");
                    let _ = tx.blocking_send(Err(Status::internal(format!(
                        "reading the store for the backup: {e}"
                    ))));
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}
