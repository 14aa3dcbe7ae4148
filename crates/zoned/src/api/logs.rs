//! `Cluster.Logs`: this server's systemd journal, read by `journalctl
//! --output=json` on it and streamed entry by entry (`zonectl logs`).
//!
//! journalctl runs as a child of zoned, killed when the client goes away
//! (the stream's receiver dropped: `kill_on_drop`); at most
//! [`MAX_STREAMS`] run at once. The request's units and priority are
//! checked before anything runs and passed as `--unit=`/`--priority=`
//! arguments (never through a shell).

use std::pin::Pin;
use std::process::Stdio;

use futures::Stream;
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio::sync::Semaphore;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use zone_proto::v1::{LogEntry, LogsRequest};

use super::{ApiError, ServerContext};

pub type LogsStream = Pin<Box<dyn Stream<Item = Result<LogEntry, Status>> + Send>>;

/// Entries sent when the request names no count.
pub const DEFAULT_LINES: u32 = 100;
/// The most entries one request may ask for.
pub const MAX_LINES: u32 = 100_000;
/// journalctl processes a server runs for clients at once.
pub const MAX_STREAMS: usize = 4;
/// A message longer than this is cut (the rest replaced by a note).
const MAX_MESSAGE: usize = 64 * 1024;
/// journalctl's line for one entry is read up to this many bytes; a longer
/// one (a process may log a field of many MiB) is skipped, and said so.
const MAX_LINE: usize = 1 << 20;
/// Units one request may name.
pub const MAX_UNITS: usize = 32;
/// Where journald keeps its files: in memory, and persistent.
const JOURNAL_DIRS: [&str; 2] = ["/run/log/journal", "/var/log/journal"];

static STREAMS: Semaphore = Semaphore::const_new(MAX_STREAMS);

/// Whether journald keeps a journal here: a directory of its own (named by
/// the machine id) in one of [`JOURNAL_DIRS`]. The systemd package makes
/// an empty /var/log/journal on hosts where journald does not run.
pub fn has_journal() -> bool {
    JOURNAL_DIRS
        .iter()
        .any(|d| std::fs::read_dir(d).is_ok_and(|mut entries| entries.next().is_some()))
}

/// journalctl's arguments for `req`, or the field that is wrong.
pub fn journalctl_args(req: &LogsRequest) -> Result<Vec<String>, ApiError> {
    let bad = |field: &str, reason: String| ApiError::InvalidArgument {
        field: field.to_owned(),
        reason,
    };
    let lines = match req.lines {
        0 => DEFAULT_LINES,
        n if n > MAX_LINES => {
            return Err(bad("lines", format!("{n} is more than {MAX_LINES}")));
        }
        n => n,
    };
    let mut args = vec![
        "--output=json".to_owned(),
        // Fields over 4 KiB are sent, not replaced by null.
        "--all".to_owned(),
        "--no-pager".to_owned(),
        "--output-fields=MESSAGE,PRIORITY,_SYSTEMD_UNIT,SYSLOG_IDENTIFIER,_COMM,_PID,_HOSTNAME"
            .to_owned(),
        format!("--lines={lines}"),
    ];
    if req.units.len() > MAX_UNITS {
        return Err(bad(
            "units",
            format!("{} units; at most {MAX_UNITS}", req.units.len()),
        ));
    }
    for u in &req.units {
        // Unit names (journalctl adds .service to a bare name) and glob
        // patterns; nothing else reaches journalctl.
        let ok = !u.is_empty()
            && u.len() <= 256
            && !u.starts_with('-')
            && u.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:@\\*?[]".contains(&b));
        if !ok {
            return Err(bad(
                "units",
                format!("{u:?} is not a unit name (letters, digits, - _ . : @ \\ and * ? [ ])"),
            ));
        }
        args.push(format!("--unit={u}"));
    }
    if let Some(p) = req.priority {
        if p > 7 {
            return Err(bad("priority", format!("{p}: from 0 (emerg) to 7 (debug)")));
        }
        args.push(format!("--priority={p}"));
    }
    if req.follow {
        args.push("--follow".to_owned());
    }
    Ok(args)
}

/// A journal field's value as text: journalctl writes a string, an array
/// of bytes for a value that is not UTF-8, an array of values when the
/// field repeats (the first is kept), null when it was too large.
fn field_text(v: Option<&serde_json::Value>) -> String {
    use serde_json::Value;
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) if items.iter().all(Value::is_u64) => {
            let bytes: Vec<u8> = items
                .iter()
                .filter_map(Value::as_u64)
                .map(|b| b as u8)
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Some(Value::Array(items)) => field_text(items.first()),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

/// How a line of journalctl's output was read.
#[derive(Debug, PartialEq)]
enum Line {
    /// A whole line, in the buffer (without its newline).
    Whole,
    /// A line longer than the cap: skipped; its length.
    Skipped(usize),
    End,
}

/// Reads the next line into `buf`, at most `max` bytes of it kept.
async fn next_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Line> {
    buf.clear();
    let mut total = 0usize;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(match total {
                0 => Line::End,
                n if n > max => Line::Skipped(n),
                _ => Line::Whole,
            });
        }
        let newline = chunk.iter().position(|&b| b == b'\n');
        let part = &chunk[..newline.unwrap_or(chunk.len())];
        total += part.len();
        let room = max.saturating_sub(buf.len());
        buf.extend_from_slice(&part[..part.len().min(room)]);
        let used = newline.map_or(chunk.len(), |i| i + 1);
        r.consume(used);
        if newline.is_some() {
            return Ok(if total > max {
                Line::Skipped(total)
            } else {
                Line::Whole
            });
        }
    }
}

/// One line of `journalctl --output=json` as an entry; None for a line
/// that is not a JSON object.
pub fn entry(line: &str) -> Option<LogEntry> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let obj = v.as_object()?;
    let f = |k: &str| field_text(obj.get(k));
    let mut message = f("MESSAGE");
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        let total = message.len();
        message.truncate(cut);
        message.push_str(&format!(" [cut: {total} bytes in all]"));
    }
    let identifier = match f("SYSLOG_IDENTIFIER") {
        s if s.is_empty() => f("_COMM"),
        s => s,
    };
    Some(LogEntry {
        time_unix_us: f("__REALTIME_TIMESTAMP").parse().unwrap_or(0),
        hostname: f("_HOSTNAME"),
        unit: f("_SYSTEMD_UNIT"),
        identifier,
        pid: f("_PID").parse().unwrap_or(0),
        // journald's default for an entry without one: info.
        priority: f("PRIORITY").parse().unwrap_or(6),
        message,
    })
}

impl ServerContext {
    /// Runs journalctl for `req` and streams its entries; see the module.
    pub(crate) async fn logs(&self, req: LogsRequest) -> Result<LogsStream, ApiError> {
        let args = journalctl_args(&req)?;
        let (id, _) = self.identity();
        if !has_journal() {
            return Err(ApiError::FailedPrecondition(format!(
                "server {id} keeps no systemd journal (nothing in {}): its logs are where its \
                 process writes them (the local cluster: target/cluster/node-<id>/zoned.log)",
                JOURNAL_DIRS.join(" or ")
            )));
        }
        let permit = STREAMS.try_acquire().map_err(|_| {
            ApiError::ResourceExhausted(format!(
                "server {id} runs {MAX_STREAMS} log streams already; try again when one ends"
            ))
        })?;
        let mut child = tokio::process::Command::new("journalctl")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                ApiError::FailedPrecondition(format!("server {id} cannot run journalctl: {e}"))
            })?;
        tracing::info!(units = ?req.units, lines = req.lines, follow = req.follow, "journal stream");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        // What journalctl says on stderr, the first 8 KiB kept for the
        // error; the rest read and dropped (a closed pipe would kill it).
        let said = tokio::spawn(async move {
            let mut stderr = stderr;
            let mut buf = Vec::new();
            let _ = (&mut stderr).take(8192).read_to_end(&mut buf).await;
            let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
            String::from_utf8_lossy(&buf).trim().to_owned()
        });
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let _permit = permit;
            let mut out = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                let line = tokio::select! {
                    // The client went away: journalctl is killed as `child`
                    // drops (with --follow it would wait for entries).
                    _ = tx.closed() => return,
                    line = next_line(&mut out, &mut buf, MAX_LINE) => line,
                };
                let e = match line {
                    Ok(Line::Whole) => entry(&String::from_utf8_lossy(&buf)),
                    Ok(Line::Skipped(n)) => Some(LogEntry {
                        priority: 4,
                        identifier: "zoned".to_owned(),
                        message: format!(
                            "[an entry of {n} bytes, over the {MAX_LINE} this call sends, left out]"
                        ),
                        ..LogEntry::default()
                    }),
                    Ok(Line::End) => break,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!(
                                "reading journalctl's output: {e}"
                            ))))
                            .await;
                        return;
                    }
                };
                if let Some(e) = e {
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
            }
            let status = child.wait().await;
            let said = said.await.unwrap_or_default();
            match status {
                Ok(s) if s.success() => {
                    if !said.is_empty() {
                        tracing::warn!(said, "journalctl warned");
                    }
                }
                Ok(s) => {
                    let _ = tx
                        .send(Err(Status::internal(format!(
                            "journalctl failed ({s}): {said}"
                        ))))
                        .await;
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::internal(format!(
                            "waiting for journalctl: {e}"
                        ))))
                        .await;
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_lines_become_entries() {
        let line = r#"{"__CURSOR":"s=1","__REALTIME_TIMESTAMP":"1765022400123456","__MONOTONIC_TIMESTAMP":"1","_BOOT_ID":"b","MESSAGE":"zoned started","PRIORITY":"6","_SYSTEMD_UNIT":"zoned.service","SYSLOG_IDENTIFIER":"zoned","_PID":"412","_HOSTNAME":"zone-1"}"#;
        let e = entry(line).unwrap();
        assert_eq!(e.time_unix_us, 1_765_022_400_123_456);
        assert_eq!(e.message, "zoned started");
        assert_eq!(
            (e.unit.as_str(), e.identifier.as_str()),
            ("zoned.service", "zoned")
        );
        assert_eq!((e.pid, e.priority, e.hostname.as_str()), (412, 6, "zone-1"));
        // A message that is not UTF-8 comes as bytes; a repeated field as
        // an array of values; a kernel line has no unit, only _COMM.
        let e =
            entry(r#"{"MESSAGE":[104,105,255],"PRIORITY":["3","4"],"_COMM":"kworker"}"#).unwrap();
        assert_eq!(e.message, "hi\u{fffd}");
        assert_eq!(e.priority, 3);
        assert_eq!(e.identifier, "kworker");
        assert_eq!(e.unit, "");
        // Too large (null), missing priority: empty, info.
        let e = entry(r#"{"MESSAGE":null}"#).unwrap();
        assert_eq!((e.message.as_str(), e.priority), ("", 6));
        assert!(entry("not json").is_none());
        assert!(entry("[1,2]").is_none());
        let long = format!(r#"{{"MESSAGE":"{}"}}"#, "é".repeat(MAX_MESSAGE));
        let e = entry(&long).unwrap();
        assert!(e
            .message
            .ends_with(&format!(" [cut: {} bytes in all]", 2 * MAX_MESSAGE)));
        assert!(e.message.len() < MAX_MESSAGE + 40);
    }

    #[tokio::test]
    async fn long_lines_are_skipped_not_held() {
        let text = format!("short\n{}\nafter\nlast", "x".repeat(100));
        let mut r = BufReader::with_capacity(16, text.as_bytes());
        let mut buf = Vec::new();
        let mut got = Vec::new();
        loop {
            let l = next_line(&mut r, &mut buf, 50).await.unwrap();
            if l == Line::End {
                break;
            }
            assert!(buf.len() <= 50);
            got.push((String::from_utf8_lossy(&buf).into_owned(), l));
        }
        assert_eq!(got[0], ("short".into(), Line::Whole));
        assert_eq!(got[1].1, Line::Skipped(100));
        assert_eq!(got[2], ("after".into(), Line::Whole));
        assert_eq!(got[3], ("last".into(), Line::Whole));
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn requests_are_checked_before_journalctl_runs() {
        let args = journalctl_args(&LogsRequest {
            units: vec!["zoned".into(), "zone-*.service".into()],
            lines: 0,
            follow: true,
            priority: Some(4),
        })
        .unwrap();
        assert!(args.contains(&"--lines=100".to_owned()), "{args:?}");
        assert!(args.contains(&"--unit=zoned".to_owned()), "{args:?}");
        assert!(
            args.contains(&"--unit=zone-*.service".to_owned()),
            "{args:?}"
        );
        assert!(args.contains(&"--priority=4".to_owned()), "{args:?}");
        assert_eq!(args.last().unwrap(), "--follow");
        let refused = |r: LogsRequest, field: &str| match journalctl_args(&r) {
            Err(ApiError::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{r:?}: {other:?}"),
        };
        for unit in ["", "--since=yesterday", "a b", "x;rm", &"a".repeat(257)] {
            refused(
                LogsRequest {
                    units: vec![unit.into()],
                    ..Default::default()
                },
                "units",
            );
        }
        refused(
            LogsRequest {
                units: vec!["zoned".into(); MAX_UNITS + 1],
                ..Default::default()
            },
            "units",
        );
        refused(
            LogsRequest {
                lines: MAX_LINES + 1,
                ..Default::default()
            },
            "lines",
        );
        refused(
            LogsRequest {
                priority: Some(8),
                ..Default::default()
            },
            "priority",
        );
    }
}
