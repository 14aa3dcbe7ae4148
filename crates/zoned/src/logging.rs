//! Logging: `tracing` everywhere; journald when started by systemd with its
//! journal on stdout/stderr (`JOURNAL_STREAM` set), stderr otherwise. raft-rs
//! logs through `slog`; [`raft_logger`] bridges it into `tracing`.

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

/// Installs the process-wide logger. `filter` uses `RUST_LOG` syntax; the
/// default is `info`.
pub fn init(filter: Option<&str>) {
    let directive = filter
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_owned());
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // Without a tracing subscriber, `tracing` events become `log`
        // records (its `log` feature); systemd-journal-logger sends those
        // to journald with structured fields.
        if let Ok(journal) = systemd_journal_logger::JournalLog::new() {
            if journal.install().is_ok() {
                log::set_max_level(level_of(&directive));
                return;
            }
        }
    }
    let env = tracing_subscriber::EnvFilter::try_new(&directive)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(env)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn level_of(directive: &str) -> log::LevelFilter {
    // The journal path takes only a global level: the most verbose named.
    let d = directive.to_ascii_lowercase();
    for (name, level) in [
        ("trace", log::LevelFilter::Trace),
        ("debug", log::LevelFilter::Debug),
        ("info", log::LevelFilter::Info),
        ("warn", log::LevelFilter::Warn),
        ("error", log::LevelFilter::Error),
    ] {
        if d.contains(name) {
            return level;
        }
    }
    log::LevelFilter::Info
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
