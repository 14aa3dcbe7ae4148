//! Logging: `tracing` everywhere, set up by `zone-log` (per-target filters;
//! journald when started by systemd with its journal on stdout/stderr,
//! stderr otherwise). raft-rs logs through `slog`; [`raft_logger`] bridges
//! it into `tracing`.

use std::fmt::Write as _;

use slog::Drain;

/// Formats an error with its whole `source()` chain on one line, for the one
/// place where the error is handled and logged.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let _ = write!(s, ": {inner}");
        cur = inner.source();
    }
    s
}

/// Installs the process-wide logger (`zone_log::init`): `filter` uses
/// `RUST_LOG` syntax; the default is `info`.
pub fn init(filter: Option<&str>) {
    zone_log::init(filter);
}

/// A slog drain that re-emits raft-rs records as `tracing` events.
struct TracingDrain;

struct KvCollector(String);

impl slog::Serializer for KvCollector {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        // Nothing is formatted for a level nobody listens to: raft-rs logs
        // every message it sends at debug with the whole message as a
        // value, and a snapshot's is its data: formatting 100 MiB of it
        // (into ~500 MB of text) stalled the Raft thread for 1.4 s in a
        // debug build, long enough for followers to elect another leader,
        // which did the same.
        let enabled = match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::enabled!(target: "raft", tracing::Level::ERROR)
            }
            slog::Level::Warning => tracing::enabled!(target: "raft", tracing::Level::WARN),
            slog::Level::Info => tracing::enabled!(target: "raft", tracing::Level::INFO),
            slog::Level::Debug => tracing::enabled!(target: "raft", tracing::Level::DEBUG),
            slog::Level::Trace => tracing::enabled!(target: "raft", tracing::Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
        let mut kv = KvCollector(String::new());
        let _ = slog::KV::serialize(&record.kv(), record, &mut kv);
        let _ = slog::KV::serialize(values, record, &mut kv);
        let msg = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{msg}{}", kv.0)
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Debug => tracing::debug!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Trace => tracing::trace!(target: "raft", "{msg}{}", kv.0),
        }
        Ok(())
    }
}

/// The logger handed to raft-rs.
pub fn raft_logger(id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!("raft_id" => id))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A value that counts how often it is formatted.
    struct Counted<'a>(&'a AtomicUsize);

    impl std::fmt::Debug for Counted<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            self.0.fetch_add(1, Ordering::SeqCst);
            f.write_str("counted")
        }
    }

    #[test]
    fn raft_records_below_the_level_are_not_formatted() {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_writer(std::io::sink)
            .finish();
        let formatted = AtomicUsize::new(0);
        tracing::subscriber::with_default(subscriber, || {
            let logger = super::raft_logger(1);
            // As raft-rs logs each message it sends (a snapshot's included).
            slog::debug!(logger, "Sending from 1 to 2"; "msg" => ?Counted(&formatted));
            assert_eq!(
                formatted.load(Ordering::SeqCst),
                0,
                "a debug record was formatted"
            );
            slog::info!(logger, "became leader"; "msg" => ?Counted(&formatted));
            assert_eq!(formatted.load(Ordering::SeqCst), 1);
        });
    }
}
