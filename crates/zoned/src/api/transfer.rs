//! Large files received and served in chunks of a stream: update bundles
//! ([`super::upgrade`]) and extension images ([`super::extensions`]), from
//! a client's upload or from another server over the peer port.
//!
//! A file is received into a `.partial` file, checked against the size and
//! sha256 its sender announced, and synced; only then does the caller
//! rename it into place. An upload cut short, or bytes that differ from
//! the announcement, leave nothing behind.

use std::path::Path;
use std::pin::Pin;

use futures::Stream;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use zone_proto::v1::BundleChunk;

use super::error::bad;
use super::{ApiError, ServerContext};

/// Bytes per chunk of a file sent between servers.
pub(crate) const CHUNK: usize = 1 << 20;

pub type FetchStream = Pin<Box<dyn Stream<Item = Result<BundleChunk, Status>> + Send>>;

/// `sha` if it is 64 lower-case hex digits.
pub(crate) fn check_sha(field: &str, sha: &str) -> Result<(), ApiError> {
    if sha.len() == 64 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(bad(
            field,
            format!("{sha:?} is not a sha256 (64 lower-case hex digits)"),
        ))
    }
}

/// Refuses a file of `total` bytes (`what`: "the bundle") that would leave
/// less than the zone's free-space floor in `dir`: a received file must
/// never be what raises the space alarm.
pub(crate) fn check_room(
    zone: &ServerContext,
    dir: &Path,
    total: u64,
    what: &str,
) -> Result<(), ApiError> {
    let floor = zone.config().limits.min_free_disk_mb << 20;
    let free = crate::storage::free_bytes(dir).unwrap_or(u64::MAX);
    if free < total.saturating_add(floor) {
        return Err(ApiError::ResourceExhausted(format!(
            "{} has {} MiB free: {what}'s {} MiB would leave less than the {} MiB floor (limits.min_free_disk_mb)",
            dir.display(),
            free >> 20,
            total >> 20,
            floor >> 20
        )));
    }
    Ok(())
}

/// Receives a file into `partial`: `first` (already taken from the
/// stream), then the rest of `chunks`, checked against the announced
/// `total` and `sha`, then synced. `what` names it in errors ("the
/// bundle"). Removes `partial` on any error.
pub(crate) async fn receive_into<S>(
    partial: &Path,
    first: BundleChunk,
    total: u64,
    sha: &str,
    mut chunks: S,
    what: &str,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), ApiError>
where
    S: Stream<Item = Result<BundleChunk, Status>> + Unpin,
{
    use futures::StreamExt as _;
    let fail = |e: std::io::Error| {
        ApiError::FailedPrecondition(format!("writing {}: {e}", partial.display()))
    };
    let result = async {
        let mut file = tokio::fs::File::create(partial).await.map_err(fail)?;
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
                            "{what}'s stream broke after {got} of {total} bytes: {}",
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
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(partial);
    }
    result
}

/// Renames `from` to `to` and syncs the directory, so that the file is in
/// place across a power cut. Once renamed it is in place: a failed sync
/// is said, not returned.
pub(crate) fn put_in_place(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    if let Some(dir) = to.parent() {
        if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not sync a directory after a rename");
        }
    }
    Ok(())
}

/// The peer side of a fetch: streams the file at `path` (`what` of sha256
/// `sha`, checked to be one) to the server that asked for it, or NOT_FOUND.
pub(crate) fn serve_held(
    zone: &ServerContext,
    sha: String,
    path: &Path,
    what: &'static str,
) -> Result<FetchStream, ApiError> {
    check_sha("sha256", &sha)?;
    let file = std::fs::File::open(path).map_err(|e| {
        ApiError::NotFound(format!(
            "server {} does not hold {what} {sha} ({e})",
            zone.node().id()
        ))
    })?;
    Ok(serve(file, sha, what))
}

/// Streams `file` (whose sha256 is `sha`) in [`CHUNK`]s, the first naming
/// its size and sha256.
fn serve(file: std::fs::File, sha: String, what: &'static str) -> FetchStream {
    let total = file.metadata().map_or(0, |m| m.len());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read as _;
        let mut file = file;
        let mut first = true;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = match file.read(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::internal(format!("reading {what}: {e}"))));
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
    Box::pin(ReceiverStream::new(rx))
}
