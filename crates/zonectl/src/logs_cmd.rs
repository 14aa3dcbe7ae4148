//! `zonectl logs`: a server's systemd journal, read on that server
//! (`Cluster.Logs`, admin) and printed as journalctl would, or as JSON
//! lines.

use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use anyhow::Context as _;
use zonectl::v1::{cluster_client::ClusterClient, LogEntry, LogsRequest, StatusRequest};

/// What to read.
#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The server whose journal to read, by id (default: the first of
    /// --endpoints that answers). zonectl connects to that server's client
    /// address, as `zonectl show` lists it.
    #[arg(short, long)]
    server: Option<u64>,
    /// Only this unit's entries (`zoned` means zoned.service; globs such
    /// as `zone-*` allowed); repeat for several.
    #[arg(short = 'u', long = "unit", value_name = "UNIT")]
    units: Vec<String>,
    /// The last LINES entries (1 to 100000).
    #[arg(short = 'n', long, default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    lines: u32,
    /// Then print new entries as they come, until interrupted.
    #[arg(short, long)]
    follow: bool,
    /// Only entries this urgent or more: 0 to 7, or emerg, alert, crit,
    /// err, warning, notice, info, debug.
    #[arg(short, long, value_parser = parse_priority)]
    priority: Option<u32>,
}

const PRIORITIES: [&str; 8] = [
    "emerg", "alert", "crit", "err", "warning", "notice", "info", "debug",
];

fn parse_priority(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return if n <= 7 {
            Ok(n)
        } else {
            Err(format!("{n}: from 0 (emerg) to 7 (debug)"))
        };
    }
    PRIORITIES
        .iter()
        .position(|p| p.eq_ignore_ascii_case(s))
        .map(|p| p as u32)
        .ok_or_else(|| format!("{s:?}: 0 to 7, or one of {}", PRIORITIES.join(", ")))
}

/// The channel to server `id`'s own client address, found in the zone's
/// status as asked through `channel`.
async fn server_channel(
    channel: tonic::transport::Channel,
    id: u64,
    timeout: Duration,
) -> anyhow::Result<tonic::transport::Channel> {
    let mut req = tonic::Request::new(StatusRequest {});
    req.set_timeout(timeout);
    let status = ClusterClient::new(channel).status(req).await?.into_inner();
    let Some(s) = status.servers.iter().find(|s| s.id == id) else {
        let ids: Vec<String> = status.servers.iter().map(|s| s.id.to_string()).collect();
        anyhow::bail!(
            "server {id} is not a member of the zone (members: {})",
            ids.join(", ")
        );
    };
    if s.client_endpoint.is_empty() {
        anyhow::bail!(
            "server {id} did not answer the zone's status call ({}): its journal cannot be read through it",
            if s.error.is_empty() { "no client address" } else { &s.error }
        );
    }
    let (channel, _) = crate::connect(std::slice::from_ref(&s.client_endpoint))
        .await
        .with_context(|| format!("server {id}'s client address {}", s.client_endpoint))?;
    Ok(channel)
}

/// One entry as a line: `2026-12-06T12:00:00.123Z zone-1 zoned[412]: text`.
pub fn line(e: &LogEntry) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(e.time_unix_us) * 1000)
        .ok()
        .and_then(|t| {
            let f = time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            );
            t.format(&f).ok()
        })
        .unwrap_or_else(|| "-".into());
    let who = if e.identifier.is_empty() {
        e.unit.trim_end_matches(".service")
    } else {
        &e.identifier
    };
    let pid = if e.pid > 0 {
        format!("[{}]", e.pid)
    } else {
        String::new()
    };
    format!(
        "{at} {} {}{pid}: {}",
        printable(&e.hostname),
        printable(who),
        printable(&e.message)
    )
}

/// Text safe for a terminal: control characters (an escape sequence a
/// process logged, a newline) written as `\x1b`, `\n`; tabs kept.
fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\t' => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn json(e: &LogEntry) -> serde_json::Value {
    serde_json::json!({
        "time_unix_us": e.time_unix_us,
        "hostname": e.hostname,
        "unit": e.unit,
        "identifier": e.identifier,
        "pid": e.pid,
        "priority": PRIORITIES.get(e.priority as usize).copied().unwrap_or("info"),
        "message": e.message,
    })
}

pub async fn run(
    args: LogsArgs,
    channel: tonic::transport::Channel,
    timeout: Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    let channel = match args.server {
        Some(id) => server_channel(channel, id, timeout).await?,
        None => channel,
    };
    let req = LogsRequest {
        units: args.units,
        lines: args.lines,
        follow: args.follow,
        priority: args.priority,
    };
    // No deadline on the stream (it follows, or may be long): only on its
    // start.
    let mut stream = tokio::time::timeout(timeout, ClusterClient::new(channel).logs(req))
        .await
        .map_err(|_| {
            anyhow::anyhow!("the server did not start sending its journal within {timeout:?}")
        })??
        .into_inner();
    let color = std::io::stdout().is_terminal() && !as_json;
    let mut out = std::io::stdout().lock();
    while let Some(e) = stream.message().await? {
        let text = if as_json {
            json(&e).to_string()
        } else {
            line(&e)
        };
        let r = match (color, e.priority) {
            (true, 0..=3) => writeln!(out, "\x1b[1;31m{text}\x1b[0m"),
            (true, 4) => writeln!(out, "\x1b[33m{text}\x1b[0m"),
            _ => writeln!(out, "{text}"),
        };
        match r {
            // Piped into head: stop quietly.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            r => r?,
        }
        if args.follow {
            out.flush()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_print_as_journalctl_would() {
        let e = LogEntry {
            time_unix_us: 1_796_558_400_123_456,
            hostname: "zone-1".into(),
            unit: "zoned.service".into(),
            identifier: "zoned".into(),
            pid: 412,
            priority: 6,
            message: "zoned started".into(),
        };
        assert_eq!(
            line(&e),
            "2026-12-06T12:00:00.123Z zone-1 zoned[412]: zoned started"
        );
        let kernel = LogEntry {
            identifier: String::new(),
            unit: "systemd-networkd.service".into(),
            pid: 0,
            ..e.clone()
        };
        assert!(line(&kernel).ends_with(" zone-1 systemd-networkd: zoned started"));
        let hostile = LogEntry {
            message: "red \x1b[31mtext\nsecond line\u{9b}".into(),
            ..e.clone()
        };
        assert!(
            line(&hostile).ends_with(": red \\x1b[31mtext\\nsecond line\\x9b"),
            "{}",
            line(&hostile)
        );
        assert_eq!(json(&e)["priority"], "info");
        assert_eq!(parse_priority("warning"), Ok(4));
        assert_eq!(parse_priority("ERR"), Ok(3));
        assert_eq!(parse_priority("7"), Ok(7));
        assert!(parse_priority("8").is_err());
        assert!(parse_priority("loud").unwrap_err().contains("emerg"));
    }
}
