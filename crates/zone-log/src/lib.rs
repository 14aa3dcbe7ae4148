//! The one logging setup of Zoned's daemons (zoned, zone-vip, zone-sync).
//!
//! Everything logs through `tracing`, filtered by one `EnvFilter`
//! (`RUST_LOG` syntax, per-target directives included: `info,zoned::node=debug`).
//! Under systemd with the journal on stdout/stderr (`JOURNAL_STREAM` set)
//! the events that pass the filter are written to journald by
//! systemd-journal-logger, with their target, file and line as fields;
//! elsewhere they go to stderr. Records of crates that log through `log`
//! join the same filter.

use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

/// The filter: `directive` if given, else `RUST_LOG`, else `info`; a bad
/// directive falls back to `info` (with a warning on stderr).
pub fn filter(directive: Option<&str>) -> EnvFilter {
    let directive = directive
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_owned());
    EnvFilter::try_new(&directive).unwrap_or_else(|e| {
        eprintln!("log filter `{directive}` ignored ({e}); logging at info");
        EnvFilter::new("info")
    })
}

/// Installs the process-wide logger with [`filter`]`(directive)`.
pub fn init(directive: Option<&str>) {
    let filter = filter(directive);
    // `try_init` also makes `log` records tracing events (tracing-log).
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journal) = systemd_journal_logger::JournalLog::new() {
            let _ = tracing_subscriber::registry()
                .with(ToLog(journal).with_filter(filter))
                .try_init();
            return;
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Hands each event that passed the filter to a `log` sink (journald's) as
/// one record: the message, then the event's fields as `key=value`.
struct ToLog<L>(L);

impl<S: Subscriber, L: log::Log + 'static> Layer<S> for ToLog<L> {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        // Events that came from `log` records carry their origin here.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut text = Fields::default();
        event.record(&mut text);
        let level = match *meta.level() {
            tracing::Level::ERROR => log::Level::Error,
            tracing::Level::WARN => log::Level::Warn,
            tracing::Level::INFO => log::Level::Info,
            tracing::Level::DEBUG => log::Level::Debug,
            tracing::Level::TRACE => log::Level::Trace,
        };
        self.0.log(
            &log::Record::builder()
                .args(format_args!("{}{}", text.message, text.fields))
                .level(level)
                .target(meta.target())
                .module_path(meta.module_path())
                .file(meta.file())
                .line(meta.line())
                .build(),
        );
    }
}

/// An event's message and its other fields, `log` style.
#[derive(Default)]
struct Fields {
    message: String,
    fields: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            // What tracing-log adds to events made from `log` records.
            name if name.starts_with("log.") => {}
            name => {
                let _ = write!(self.fields, " {name}={value:?}");
            }
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            name if name.starts_with("log.") => {}
            name => {
                let _ = write!(self.fields, " {name}={value}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A `log` sink that keeps (level, target, text).
    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<Vec<(log::Level, String, String)>>>);

    impl log::Log for Kept {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, r: &log::Record<'_>) {
            self.0
                .lock()
                .unwrap()
                .push((r.level(), r.target().to_owned(), r.args().to_string()));
        }
        fn flush(&self) {}
    }

    #[test]
    fn per_target_directives_hold_on_the_journal_path() {
        let kept = Kept::default();
        let subscriber = tracing_subscriber::registry()
            .with(ToLog(kept.clone()).with_filter(filter(Some("info,zoned::node=debug"))));
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "zoned::node", term = 4, "Raft view changed");
            tracing::debug!(target: "h2::codec", "a frame");
            tracing::info!(target: "zoned::api", "serving");
            tracing::trace!(target: "zoned::node", "a tick");
        });
        let kept = kept.0.lock().unwrap().clone();
        assert_eq!(
            kept,
            vec![
                (
                    log::Level::Debug,
                    "zoned::node".to_owned(),
                    "Raft view changed term=4".to_owned()
                ),
                (
                    log::Level::Info,
                    "zoned::api".to_owned(),
                    "serving".to_owned()
                ),
            ],
            "debug of zoned::node only, info of the rest"
        );
    }

    #[test]
    fn a_bad_directive_falls_back_to_info() {
        assert_eq!(filter(Some("info,[=")).to_string(), "info");
        assert_eq!(filter(Some("warn")).to_string(), "warn");
    }
}
