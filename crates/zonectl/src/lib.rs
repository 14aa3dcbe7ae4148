//! The `zonectl` library: connect to a zone through whichever endpoint
//! answers, and render zone status for people (a table in the spirit of
//! `onezone show`) and machines (JSON).
//!
//! Used by the `zonectl` binary, by `cargo xtask cluster`, and by tests as
//! their gRPC client. It never retries a write on its own: whether to retry
//! an unacknowledged write is the caller's decision.

use std::time::Duration;

use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use zone_proto::v1::{Alarm, AlarmKind, Role, StatusResponse};

pub use zone_pki;
pub use zone_proto::v1;

pub mod credentials;
pub use credentials::Credentials;

/// The local three-node cluster `cargo xtask cluster up` starts, and on an
/// appliance the local server (127.0.0.1:7400) answers first.
pub const DEFAULT_ENDPOINTS: &str = "127.0.0.1:7400,127.0.0.2:7400,127.0.0.3:7400";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoint given")]
    NoEndpoints,
    #[error("invalid endpoint '{0}'")]
    BadEndpoint(String, #[source] tonic::transport::Error),
    #[error("no endpoint answered ({0})")]
    Unreachable(String),
    #[error("endpoint '{0}': the zone speaks TLS only; give host:port or https://host:port")]
    Plaintext(String),
}

/// An endpoint for `addr` (`host:port`), over TLS with `creds` (plaintext
/// without).
pub fn endpoint(addr: &str, creds: Option<&Credentials>) -> Result<Endpoint, ClientError> {
    let scheme = if creds.is_some() { "https" } else { "http" };
    if creds.is_some() && addr.contains("://") && !addr.starts_with("https://") {
        return Err(ClientError::Plaintext(addr.to_owned()));
    }
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("{scheme}://{addr}")
    };
    let bad = |e| ClientError::BadEndpoint(addr.to_owned(), e);
    let mut ep = Endpoint::from_shared(uri).map_err(bad)?;
    if let Some(c) = creds {
        ep = ep.tls_config(c.tls()).map_err(bad)?;
    }
    Ok(ep.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true))
}

/// Says in a sentence why a TLS connection failed, where the error's
/// chain would print the alert.
fn explain_tls(text: &str, creds: Option<&Credentials>) -> Option<String> {
    let source = creds.map(|c| c.source.display().to_string());
    let source = source.as_deref().unwrap_or("the credential");
    if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        Some(format!("the server's certificate is not signed by the zone CA of {source}: another zone, or the wrong ca.pem"))
    } else if text.contains("NotValidForName") {
        Some("the server's certificate is not a zone server's".to_owned())
    } else if text.contains("CertificateExpired") || text.contains("Expired") {
        Some(
            "a certificate has expired (the server's, or the credential's as the server sees it)"
                .to_owned(),
        )
    } else if text.contains("UnknownCA")
        || text.contains("BadCertificate")
        || text.contains("DecryptError")
    {
        Some(format!(
            "the server refused {source}: not a credential of this zone"
        ))
    } else if text.contains("InvalidContentType") || text.contains("CorruptMessage") {
        Some("the server does not speak TLS: not a server of a zone".to_owned())
    } else {
        None
    }
}

/// Splits a comma-separated endpoint list.
pub fn parse_endpoints(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Connects to the first endpoint that accepts a connection, in order.
/// Returns the channel and the endpoint it reached.
pub async fn connect(
    endpoints: &[String],
    creds: Option<&Credentials>,
) -> Result<(Channel, String), ClientError> {
    if endpoints.is_empty() {
        return Err(ClientError::NoEndpoints);
    }
    let mut failures = Vec::new();
    for addr in endpoints {
        match endpoint(addr, creds)?.connect().await {
            Ok(ch) => return Ok((ch, addr.clone())),
            Err(e) => {
                let text = source_text(&e);
                let said = explain_tls(&text, creds).unwrap_or(text);
                failures.push(format!("{addr}: {said}"))
            }
        }
    }
    Err(ClientError::Unreachable(failures.join("; ")))
}

/// A sentence for a call that failed at the TLS layer (the server refused
/// the credential after the handshake seemed done), or None.
pub fn explain_status(status: &tonic::Status, creds: Option<&Credentials>) -> Option<String> {
    if !matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown
    ) {
        return None;
    }
    let text = match std::error::Error::source(status) {
        Some(e) => format!("{}: {}", status.message(), source_text(e)),
        None => status.message().to_owned(),
    };
    explain_tls(&text, creds)
}

fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s = format!("{s}: {inner}");
        cur = inner.source();
    }
    s
}

/// One server as `zonectl show` presents it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerRow {
    pub id: u64,
    pub name: String,
    pub state: String,
    pub voter: bool,
    pub term: u64,
    pub index: u64,
    pub commit: u64,
    pub applied: u64,
    pub vote: u64,
    /// Leader's last index minus this server's match index, as the leader
    /// sees it; `None` when unknown.
    pub lag: Option<u64>,
    pub last_contact_ms: Option<u64>,
    pub revision: u64,
    pub peer_endpoint: String,
    pub client_endpoint: String,
    pub snapshots_received: u64,
    /// The zone the server belongs to; empty when unknown.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub zone_id: String,
    /// When the server's node certificate expires (Unix seconds); `None`
    /// when it did not say.
    pub cert_expires_unix: Option<i64>,
    /// Host figures the server reported; `None` when it did not answer.
    pub host: Option<HostRow>,
    /// The server's datastores as its zone-mounts reported them; `None`
    /// when the server did not answer.
    pub storage: Option<StorageRow>,
    /// The server's zoned build (`0.1.0`, 12 hex digits) and the appliance
    /// image it booted (`zoned-vm 0.1.0+...`); empty when it did not say
    /// (unreachable, a zoned that predates them, not an appliance).
    pub version: String,
    pub build_commit: String,
    pub image_version: String,
    /// The addresses zone-vip holds on the server (`address/prefix`), as
    /// it last told the server's zoned.
    pub vips_held: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl ServerRow {
    /// The VERSION column: `0.1.0+3f2a1b9` (the commit cut to 7 digits),
    /// `-` when unknown.
    pub fn build(&self) -> String {
        match (self.version.as_str(), self.build_commit.as_str()) {
            ("", _) => "-".into(),
            (v, "" | "unknown") => v.to_owned(),
            (v, c) => format!("{v}+{}", c.chars().take(7).collect::<String>()),
        }
    }

    /// The VIP column: the addresses without their prefix, `-` for none.
    pub fn vips(&self) -> String {
        if self.vips_held.is_empty() {
            return "-".into();
        }
        self.vips_held
            .iter()
            .map(|a| a.split('/').next().unwrap_or(a))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A server's datastores, as its zone-mounts last reported them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StorageRow {
    /// False when zone-mounts has not reported lately (not running, or
    /// stuck): the datastores are then its last word.
    pub reported: bool,
    pub age_ms: u64,
    pub datastores: Vec<DatastoreRow>,
    /// Targets of removed datastores still mounted on the server.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unmounting: Vec<String>,
}

/// One datastore on one server.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatastoreRow {
    pub name: String,
    /// mounted, probing, hung, failed, unmounted.
    pub state: String,
    pub healthy: bool,
    pub required: bool,
    pub exclusive: bool,
    /// The last probe's latency; 0 when none finished yet.
    pub latency_us: u64,
    /// How long it has been unhealthy; 0 while healthy.
    pub unhealthy_ms: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl StorageRow {
    fn from_health(h: &zone_proto::v1::StorageHealth) -> StorageRow {
        StorageRow {
            reported: h.reported,
            age_ms: h.age_ms,
            unmounting: h.unmounting.clone(),
            datastores: h
                .datastores
                .iter()
                .map(|d| {
                    let state = d.state();
                    DatastoreRow {
                        name: d.name.clone(),
                        state: zone_datastores::state_name(state).to_owned(),
                        healthy: zone_datastores::healthy(state, d.exclusive),
                        required: d.required,
                        exclusive: d.exclusive,
                        latency_us: d.latency_us,
                        unhealthy_ms: d.unhealthy_ms,
                        error: d.error.clone(),
                    }
                })
                .collect(),
        }
    }

    /// The STORAGE column: `-` (no datastores, nothing reported), `ok 2/2`,
    /// the worst state and how many are fine (`hung 1/2`), or `stale`.
    pub fn summary(&self) -> String {
        if self.datastores.is_empty() {
            return if self.reported {
                "none".into()
            } else {
                "-".into()
            };
        }
        if !self.reported {
            return "stale".into();
        }
        let fine = self.datastores.iter().filter(|d| d.healthy).count();
        let total = self.datastores.len();
        let worst = ["hung", "failed", "probing", "unmounted"]
            .into_iter()
            .find(|w| self.datastores.iter().any(|d| !d.healthy && d.state == *w));
        match worst {
            None => format!("ok {fine}/{total}"),
            Some(w) => format!("{w} {fine}/{total}"),
        }
    }
}

/// A server's host, as it reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostRow {
    pub load1: f64,
    pub cpus: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    /// The store's checksums run from lookup tables: the CPU has no SSE4.2
    /// or no PCLMULQDQ.
    pub software_checksums: bool,
}

/// The zone as `zonectl show` presents it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ZoneView {
    /// Server that answered.
    pub member_id: u64,
    pub leader_id: u64,
    pub term: u64,
    /// True while the zone is disabled for maintenance (writes refused).
    pub disabled: bool,
    /// Space alarms standing (writes that add data refused).
    pub alarms: Vec<AlarmRow>,
    pub servers: Vec<ServerRow>,
}

/// A space alarm as zonectl prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlarmRow {
    pub server: u64,
    pub name: String,
    /// `no-space` (free space below the floor) or `store-quota`.
    pub kind: &'static str,
    pub free_bytes: u64,
    pub store_bytes: u64,
    pub limit_bytes: u64,
    pub raised_unix_ms: u64,
}

impl AlarmRow {
    pub fn from_alarm(a: &Alarm) -> AlarmRow {
        AlarmRow {
            server: a.server,
            name: a.name.clone(),
            kind: match AlarmKind::try_from(a.kind) {
                Ok(AlarmKind::NoSpace) => "no-space",
                Ok(AlarmKind::StoreQuota) => "store-quota",
                _ => "unknown",
            },
            free_bytes: a.free_bytes,
            store_bytes: a.store_bytes,
            limit_bytes: a.limit_bytes,
            raised_unix_ms: a.raised_unix_ms,
        }
    }

    /// One line: who, what it measured, against which limit.
    pub fn describe(&self) -> String {
        let who = if self.name.is_empty() {
            format!("server {}", self.server)
        } else {
            format!("server {} ({})", self.server, self.name)
        };
        match self.kind {
            "store-quota" => format!(
                "{who}: store {} over its quota of {} (limits.max_store_mb), {} free",
                human_bytes(self.store_bytes),
                human_bytes(self.limit_bytes),
                human_bytes(self.free_bytes)
            ),
            _ => format!(
                "{who}: {} free on its data directory, below {} (limits.min_free_disk_mb)",
                human_bytes(self.free_bytes),
                human_bytes(self.limit_bytes)
            ),
        }
    }
}

/// `zonectl alarm ls`: a table of the alarms, or a line saying there are
/// none.
pub fn render_alarms(alarms: &[AlarmRow], now_unix_ms: u64) -> String {
    if alarms.is_empty() {
        return "no alarm: writes are accepted\n".to_owned();
    }
    let rows = alarms
        .iter()
        .map(|a| {
            vec![
                a.server.to_string(),
                a.name.clone(),
                a.kind.to_owned(),
                human_bytes(a.free_bytes),
                human_bytes(a.store_bytes),
                human_bytes(a.limit_bytes),
                if a.raised_unix_ms == 0 {
                    "-".to_owned()
                } else {
                    let age = now_unix_ms.saturating_sub(a.raised_unix_ms) / 1000;
                    format!("{} ago", human_secs(age))
                },
            ]
        })
        .collect();
    let mut out = columns(
        &[
            "SERVER", "NAME", "ALARM", "FREE", "STORE", "LIMIT", "RAISED",
        ],
        rows,
    );
    out.push_str(
        "writes that add data are refused until every alarm clears: delete what is not needed, then zonectl compact REV --physical\n",
    );
    out
}

/// 45s, 12m, 3h, 2d.
fn human_secs(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

pub fn role_name(role: i32) -> &'static str {
    match Role::try_from(role).unwrap_or(Role::Unspecified) {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
        Role::PreCandidate => "pre-candidate",
        Role::Learner => "learner",
        Role::Unreachable => "unreachable",
        Role::Unspecified => "unknown",
    }
}

impl ZoneView {
    pub fn from_status(s: &StatusResponse) -> ZoneView {
        let leader_last = s
            .servers
            .iter()
            .find(|x| x.id == s.leader_id)
            .map(|x| x.last_index);
        let mut servers: Vec<ServerRow> = s
            .servers
            .iter()
            .map(|x| {
                let reachable = x.role != Role::Unreachable as i32;
                let lag = if x.id == s.leader_id {
                    Some(0)
                } else if x.match_index > 0 || (reachable && x.last_contact_ms.is_some()) {
                    leader_last.map(|l| l.saturating_sub(x.match_index))
                } else {
                    None
                };
                ServerRow {
                    id: x.id,
                    name: x.name.clone(),
                    state: role_name(x.role).to_owned(),
                    voter: x.voter,
                    term: x.term,
                    index: x.last_index,
                    commit: x.commit,
                    applied: x.applied,
                    vote: x.vote,
                    lag,
                    last_contact_ms: x.last_contact_ms,
                    revision: x.revision,
                    peer_endpoint: x.peer_endpoint.clone(),
                    client_endpoint: x.client_endpoint.clone(),
                    snapshots_received: x.snapshots_received,
                    zone_id: x.zone_id.clone(),
                    cert_expires_unix: Some(x.cert_expires_unix).filter(|&t| t > 0),
                    host: x.host.as_ref().filter(|_| reachable).map(|h| HostRow {
                        load1: h.load1,
                        cpus: h.cpus,
                        memory_total_bytes: h.memory_total_bytes,
                        memory_available_bytes: h.memory_available_bytes,
                        disk_total_bytes: h.disk_total_bytes,
                        disk_free_bytes: h.disk_free_bytes,
                        software_checksums: h.software_checksums,
                    }),
                    storage: x
                        .storage
                        .as_ref()
                        .filter(|_| reachable)
                        .map(StorageRow::from_health),
                    version: x.version.clone(),
                    build_commit: x.build_commit.clone(),
                    image_version: x.image_version.clone(),
                    vips_held: x.vips_held.clone(),
                    error: x.error.clone(),
                }
            })
            .collect();
        servers.sort_by_key(|r| r.id);
        ZoneView {
            member_id: s.member_id,
            leader_id: s.leader_id,
            term: s.term,
            disabled: s.disabled,
            alarms: s.alarms.iter().map(AlarmRow::from_alarm).collect(),
            servers,
        }
    }

    pub fn leader(&self) -> Option<&ServerRow> {
        self.servers.iter().find(|s| s.state == "leader")
    }
}

/// Bytes for people: 1023B, 1.5K, 20M, 3.2G, 1.1T.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else if v < 10.0 {
        format!("{v:.1}{}", UNITS[unit])
    } else {
        format!("{v:.0}{}", UNITS[unit])
    }
}

/// `zonectl show` warns of a node certificate that expires within this
/// long: servers renew theirs when a third of its life is left (about four
/// months), so one this close was not renewed.
pub const CERT_WARNING_SECS: i64 = 30 * 86_400;

/// A date for people: `2027-12-05`.
fn day(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map_or_else(|_| "-".into(), |t| t.date().to_string())
}

/// Rows under headers, each column as wide as its widest cell, two spaces
/// between columns, no trailing blanks.
pub fn columns(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

/// The `zonectl show` table. Unknown figures print as `-`; an unreachable
/// server keeps its row, with the reason below the table.
pub fn render_table(v: &ZoneView) -> String {
    let headers = [
        "ID",
        "NAME",
        "STATE",
        "VIP",
        "TERM",
        "INDEX",
        "COMMIT",
        "APPLIED",
        "VOTE",
        "LAG",
        "CONTACT",
        "LOAD",
        "MEM-FREE",
        "DISK-FREE",
        "CERT-EXPIRES",
        "STORAGE",
        "VERSION",
    ];
    let dash = |reachable: bool, n: u64| if reachable { n.to_string() } else { "-".into() };
    let rows: Vec<Vec<String>> = v
        .servers
        .iter()
        .map(|s| {
            let ok = s.state != "unreachable";
            let host = s.host.as_ref();
            vec![
                s.id.to_string(),
                if s.name.is_empty() {
                    "-".into()
                } else {
                    s.name.clone()
                },
                s.state.clone(),
                s.vips(),
                dash(ok, s.term),
                dash(ok, s.index),
                dash(ok, s.commit),
                dash(ok, s.applied),
                dash(ok, s.vote),
                s.lag.map_or("-".into(), |l| l.to_string()),
                s.last_contact_ms.map_or("-".into(), |ms| format!("{ms}ms")),
                host.map_or("-".into(), |h| format!("{:.2}/{}", h.load1, h.cpus)),
                host.map_or("-".into(), |h| {
                    format!(
                        "{}/{}",
                        human_bytes(h.memory_available_bytes),
                        human_bytes(h.memory_total_bytes)
                    )
                }),
                host.map_or("-".into(), |h| {
                    format!(
                        "{}/{}",
                        human_bytes(h.disk_free_bytes),
                        human_bytes(h.disk_total_bytes)
                    )
                }),
                s.cert_expires_unix.map_or("-".into(), day),
                s.storage.as_ref().map_or("-".into(), StorageRow::summary),
                s.build(),
            ]
        })
        .collect();
    let mut out = columns(&headers, rows);
    for s in v.servers.iter().filter(|s| !s.error.is_empty()) {
        out.push_str(&format!("server {} unreachable: {}\n", s.id, s.error));
    }
    for s in v
        .servers
        .iter()
        .filter(|s| s.host.as_ref().is_some_and(|h| h.software_checksums))
    {
        out.push_str(&format!(
            "server {}: store checksums from lookup tables (its CPU has no SSE4.2 or no PCLMULQDQ)\n",
            s.id
        ));
    }
    for s in &v.servers {
        let Some(st) = &s.storage else { continue };
        if !st.reported && !st.datastores.is_empty() {
            out.push_str(&format!(
                "server {}: zone-mounts has not reported for {}s (is it running?)\n",
                s.id,
                st.age_ms / 1000
            ));
        }
        for t in &st.unmounting {
            out.push_str(&format!(
                "server {}: {t} is still mounted (its datastore was removed)\n",
                s.id
            ));
        }
        for d in st.datastores.iter().filter(|d| !d.healthy) {
            out.push_str(&format!(
                "server {}: datastore {}{} {} for {}s{}\n",
                s.id,
                d.name,
                if d.required { " (required)" } else { "" },
                d.state,
                d.unhealthy_ms / 1000,
                if d.error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", d.error)
                }
            ));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for s in &v.servers {
        if let Some(t) = s.cert_expires_unix.filter(|&t| t - now < CERT_WARNING_SECS) {
            let days = (t - now).div_euclid(86_400);
            out.push_str(&if t <= now {
                format!(
                    "server {}: its node certificate EXPIRED on {}; other servers refuse it (README, Security: certificate lifetime)\n",
                    s.id,
                    day(t)
                )
            } else {
                format!(
                    "server {}: its node certificate expires on {} (in {days} days) and was not renewed\n",
                    s.id,
                    day(t)
                )
            });
        }
    }
    let holders: Vec<u64> = v
        .servers
        .iter()
        .filter(|s| !s.vips_held.is_empty())
        .map(|s| s.id)
        .collect();
    if holders.len() > 1 {
        out.push_str(&format!(
            "servers {} each say their zone-vip holds a VIP (a lease handover in progress, or a fence that failed)\n",
            holders.iter().map(u64::to_string).collect::<Vec<_>>().join(" and ")
        ));
    }
    if let Some(note) = mixed_builds(v) {
        out.push_str(&note);
    }
    if v.leader_id == 0 {
        out.push_str("no leader elected\n");
    }
    if v.disabled {
        out.push_str("zone DISABLED for maintenance: writes are refused (zonectl zone enable)\n");
    }
    for a in &v.alarms {
        out.push_str(&format!(
            "ALARM {}: writes that add data are refused (zonectl alarm ls)\n",
            a.describe()
        ));
    }
    let zones: std::collections::BTreeSet<&str> = v
        .servers
        .iter()
        .map(|s| s.zone_id.as_str())
        .filter(|z| !z.is_empty())
        .collect();
    match zones.len() {
        0 => {}
        1 => out.push_str(&format!("zone {}\n", zones.first().expect("one zone"))),
        _ => {
            out.push_str("servers disagree on the zone (a server holds another zone's data):\n");
            for s in v.servers.iter().filter(|s| !s.zone_id.is_empty()) {
                out.push_str(&format!("  server {}: zone {}\n", s.id, s.zone_id));
            }
        }
    }
    out
}

/// A line naming the builds when the servers that said run more than one
/// (a rolling upgrade under way, or one left behind); None otherwise.
fn mixed_builds(v: &ZoneView) -> Option<String> {
    let mut builds: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for s in v.servers.iter().filter(|s| !s.version.is_empty()) {
        builds
            .entry(format!("{}+{}", s.version, s.build_commit))
            .or_default()
            .push(s.id);
    }
    if builds.len() < 2 {
        return None;
    }
    let each: Vec<String> = builds
        .iter()
        .map(|(b, ids)| {
            let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
            format!("{b} on {}", ids.join(","))
        })
        .collect();
    Some(format!(
        "servers run {} builds: {}\n",
        builds.len(),
        each.join("; ")
    ))
}

/// `zonectl version`'s table (below the client's own line): each server's
/// zoned build (BUILD: the commit) and appliance image.
pub fn render_versions(v: &ZoneView) -> String {
    let mut out = String::new();
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let rows = v
        .servers
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                dash(&s.name),
                dash(&s.version),
                dash(&s.build_commit),
                dash(&s.image_version),
            ]
        })
        .collect();
    out.push_str(&columns(&["ID", "NAME", "VERSION", "BUILD", "IMAGE"], rows));
    for s in v.servers.iter().filter(|s| !s.error.is_empty()) {
        out.push_str(&format!("server {} unreachable: {}\n", s.id, s.error));
    }
    for s in v
        .servers
        .iter()
        .filter(|s| s.error.is_empty() && s.version.is_empty())
    {
        out.push_str(&format!(
            "server {}: its zoned does not report its version (older than this field)\n",
            s.id
        ));
    }
    if let Some(note) = mixed_builds(v) {
        out.push_str(&note);
    }
    out
}

/// This zonectl's build, `0.1.0+3f2a1b9c0d1e`.
pub const CLIENT_BUILD: &str = zone_version::LONG;

/// `zonectl storage status`: one row per server and datastore.
pub fn render_storage(v: &ZoneView) -> String {
    let headers = [
        "SERVER",
        "DATASTORE",
        "STATE",
        "REQUIRED",
        "LATENCY",
        "FOR",
        "ERROR",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut notes = String::new();
    for s in &v.servers {
        let who = if s.name.is_empty() {
            s.id.to_string()
        } else {
            format!("{} {}", s.id, s.name)
        };
        let Some(st) = &s.storage else {
            notes.push_str(&format!("server {}: did not answer\n", s.id));
            continue;
        };
        if !st.reported {
            notes.push_str(&format!(
                "server {}: zone-mounts has not reported{} (is it running?)\n",
                s.id,
                if st.datastores.is_empty() {
                    String::new()
                } else {
                    format!(" for {}s; its last word is shown", st.age_ms / 1000)
                }
            ));
        }
        for t in &st.unmounting {
            notes.push_str(&format!(
                "server {}: {t} is still mounted (its datastore was removed)\n",
                s.id
            ));
        }
        for d in &st.datastores {
            rows.push(vec![
                who.clone(),
                d.name.clone(),
                d.state.clone(),
                if d.required { "yes" } else { "no" }.into(),
                // The last probe's latency means nothing once one hangs.
                if d.latency_us == 0 || !d.healthy {
                    "-".into()
                } else if d.latency_us < 10_000 {
                    format!("{:.1}ms", d.latency_us as f64 / 1000.0)
                } else {
                    format!("{}ms", d.latency_us / 1000)
                },
                if d.healthy {
                    "-".into()
                } else {
                    format!("{}s", d.unhealthy_ms / 1000)
                },
                if d.error.is_empty() {
                    "-".into()
                } else {
                    d.error.clone()
                },
            ]);
        }
    }
    let mut out = if rows.is_empty() {
        "no datastore is mounted or probed on any server (zonectl storage ls)\n".to_owned()
    } else {
        columns(&headers, rows)
    };
    out.push_str(&notes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use zone_proto::v1::ServerStatus;

    #[test]
    fn a_certificate_near_its_end_is_named_below_the_table() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let status = |expires: i64| StatusResponse {
            member_id: 1,
            leader_id: 1,
            term: 2,
            servers: vec![ServerStatus {
                id: 1,
                role: Role::Leader as i32,
                cert_expires_unix: expires,
                ..ServerStatus::default()
            }],
            disabled: false,
            alarms: Vec::new(),
        };
        let table = render_table(&ZoneView::from_status(&status(now + 10 * 86_400 + 60)));
        assert!(
            table.contains("server 1: its node certificate expires on")
                && table.contains("(in 10 days) and was not renewed"),
            "{table}"
        );
        let table = render_table(&ZoneView::from_status(&status(now + 200 * 86_400)));
        assert!(!table.contains("node certificate"), "{table}");
        let table = render_table(&ZoneView::from_status(&status(0)));
        assert!(!table.contains("node certificate"), "unknown: {table}");
    }
}
