//! Node configuration: one TOML file, then command-line overrides, then
//! validation.
//!
//! Every field has a default, documented on the field and in
//! `Config::example()`, so an empty file is a valid single-node zone. A bad
//! file is rejected before anything is opened, with an error that names the
//! field (`raft.election_ticks`) and the reason. Nothing here touches the
//! disk except reading the file.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A configuration problem, always naming the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {field}: {reason}")]
    Parse {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The whole node configuration (`/etc/zoned/node.toml` in the image).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeSection,
    /// The initial voters of the zone, the same list on every node. Default:
    /// this node alone, at its peer address.
    pub voters: Vec<Voter>,
    pub raft: RaftSection,
    pub limits: LimitsSection,
    pub files: zone_files::settings::FilesSection,
    pub tls: TlsSection,
    pub metrics: MetricsSection,
    pub upgrade: UpgradeSection,
    pub extensions: ExtensionsSection,
}

/// System extensions the zone wants on every server (`zone.v1.Extensions`,
/// `zonectl ext`): installed as `<dir>/NAME.raw`, then merged. Images are
/// kept under `<data_dir>/extensions` (where the other servers fetch them
/// from).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExtensionsSection {
    /// Where extensions are installed, or empty: this server does not
    /// manage extensions (it reports so; the default, so that a zone on a
    /// development machine never merges anything over its /usr). The
    /// appliance's node.toml says `/var/lib/extensions`.
    pub dir: PathBuf,
    /// What merges the extensions in `dir` again after a change. Default
    /// `systemd-sysext refresh`.
    pub refresh_command: Vec<String>,
    /// What runs after a merge, so that systemd sees the extensions' units.
    /// Default `systemctl daemon-reload`.
    pub reload_command: Vec<String>,
    /// After a merge, whether each extension must show its
    /// `/usr/lib/extension-release.d/extension-release.NAME` (systemd-sysext
    /// skips an image whose release does not match the running image).
    /// Default true.
    pub check_merged: bool,
    /// The payloads' defaults for the managed roots (`[files]
    /// managed_roots`): after each merge, `<factory_dir>/etc/mysql` fills in
    /// what the root /etc/mysql lacks, never replacing a file (`cargo xtask
    /// ext build` keeps there what the packages put in /etc). Default
    /// `/usr/share/factory`; empty: nothing is filled.
    pub factory_dir: PathBuf,
}

impl Default for ExtensionsSection {
    fn default() -> Self {
        ExtensionsSection {
            dir: PathBuf::new(),
            refresh_command: vec!["systemd-sysext".into(), "refresh".into()],
            reload_command: vec!["systemctl".into(), "daemon-reload".into()],
            check_merged: true,
            factory_dir: PathBuf::from("/usr/share/factory"),
        }
    }
}

/// Installing update bundles (`zone.v1.Upgrade`, the `zone-upgrade` tool).
/// Bundles are kept under `<data_dir>/upgrade`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpgradeSection {
    /// The minisign public keys a bundle must be signed by (one `.pub`
    /// file each). Default `/usr/share/zoned/keys`, the image's own.
    pub keys_dir: PathBuf,
    /// The EFI system partition's mount point. Default `/boot/efi`.
    pub esp: PathBuf,
    /// The program that writes a bundle into the inactive slot. Default
    /// `zone-upgrade` (on PATH).
    pub tool: PathBuf,
    /// What reboots the server after an install. Default `systemctl
    /// reboot`.
    pub reboot_command: Vec<String>,
}

impl Default for UpgradeSection {
    fn default() -> Self {
        UpgradeSection {
            keys_dir: PathBuf::from("/usr/share/zoned/keys"),
            esp: PathBuf::from("/boot/efi"),
            tool: PathBuf::from("zone-upgrade"),
            reboot_command: vec!["systemctl".into(), "reboot".into()],
        }
    }
}

/// Prometheus metrics on plain HTTP, `GET /metrics` (`crate::metrics`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Address to serve them on, `host:port`, or "off". Default (empty):
    /// the host of `node.client_listen`, port 7402: the server's loopback
    /// address on the local cluster; every address on the appliance (as
    /// the client port, `0.0.0.0`), the VIP included.
    pub listen: String,
}

/// The metrics port when `metrics.listen` is empty.
pub const METRICS_PORT: u16 = 7402;

impl Config {
    /// Where the metrics are served; None when turned off.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        match self.metrics.listen.trim() {
            "off" => None,
            "" => Some(SocketAddr::new(self.node.client_listen.ip(), METRICS_PORT)),
            a => a.parse().ok(),
        }
    }
}

/// The zone's certificates for this server (`zonectl zone init` writes
/// them, one directory per founder). Both ports speak TLS only: there is
/// no plaintext mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// Directory holding `ca.pem` (the zone CA), `node.pem` and `node.key`
    /// (this server's certificate, naming `node.id`). The peer port takes
    /// only the zone's servers, the client port only the zone's user
    /// credentials, each within its role (health excepted). Default
    /// `/etc/zoned/tls`.
    pub dir: PathBuf,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            dir: PathBuf::from("/etc/zoned/tls"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// Raft id of this node, unique in the zone, at least 1. Default 1.
    pub id: u64,
    /// Human name shown by `zonectl show`. Default `zone-<id>`.
    pub name: String,
    /// Where RocksDB keeps the Raft log and the store. Default `/var/lib/zoned`.
    pub data_dir: PathBuf,
    /// gRPC address for clients. Default `0.0.0.0:7400`.
    pub client_listen: SocketAddr,
    /// gRPC address for other servers. Default `0.0.0.0:7401`.
    pub peer_listen: SocketAddr,
    /// Client address (`host:port`) of any member of an existing zone, for a
    /// new server with an empty data directory: it checks there that it was
    /// added (`zonectl server add`) and learns the members, then waits for
    /// the leader. Ignored once the data directory holds Raft state.
    /// Default: none (a founding member, see `voters`).
    pub join: Option<String>,
    /// With `join`: the one-time token `zonectl server add` printed, for a
    /// server without a certificate in `tls.dir` yet (`crate::join`).
    /// Ignored once `tls.dir` holds `node.pem`. Not printed back by
    /// `--check-config` (a secret).
    #[serde(skip_serializing)]
    pub join_token: Option<String>,
    /// Unix socket for local agents (zone-vip): the leader lease. Empty
    /// disables it. Default `/run/zoned/agent.sock`.
    pub agent_socket: PathBuf,
    /// A backup file (`zonectl snapshot save`): at start, when the data
    /// directory holds no store, the store is built from it first, as
    /// `zoned restore --from` does (this server a founder of a new zone of
    /// `voters`; restore every founder from the same file); ignored once a
    /// store is in place. The appliance's identity field `restore_from`
    /// sets it. Default: none.
    pub restore_from: Option<PathBuf>,
    /// A file kept while this server is SERVING (`crate::health`: a
    /// member that knows a leader and has applied what it committed):
    /// written when it becomes SERVING, removed when it stops. The
    /// appliance's boot assessment waits for it (`zone-upgrade check`).
    /// Default: none.
    pub serving_file: Option<PathBuf>,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            id: 1,
            name: String::new(),
            data_dir: PathBuf::from("/var/lib/zoned"),
            client_listen: SocketAddr::from(([0, 0, 0, 0], 7400)),
            peer_listen: SocketAddr::from(([0, 0, 0, 0], 7401)),
            join: None,
            join_token: None,
            agent_socket: PathBuf::from("/run/zoned/agent.sock"),
            restore_from: None,
            serving_file: None,
        }
    }
}

/// One initial voter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Voter {
    pub id: u64,
    /// `host:port` of the voter's peer listener.
    pub peer: String,
    /// Display name; default `zone-<id>` (this node's own is `node.name`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

/// `tick_ms`, `election_ticks` and `lease_margin_ms` are the zone's: fixed
/// in its record when it is founded, the same on every server (a server set
/// otherwise refuses to run in the zone; see `node::zone`). The others are
/// each server's own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSection {
    /// Length of one Raft tick in milliseconds. Default 50: heartbeats
    /// every 100 ms, elections after 0.5-0.75 s of silence, a 350 ms lease.
    pub tick_ms: u64,
    /// Ticks without a leader before a follower campaigns (randomised up to
    /// twice this). Default 10.
    pub election_ticks: usize,
    /// Election timeouts are drawn from [election_ticks,
    /// max_election_ticks). Default 0: one and a half times election_ticks
    /// (a narrower spread than raft-rs's 2x, for a faster worst case).
    pub max_election_ticks: usize,
    /// Ticks between leader heartbeats. Default 2.
    pub heartbeat_ticks: usize,
    /// Applied entries kept in the log before it is compacted. Default 10000.
    pub log_retention: u64,
    /// Largest append message in bytes. Default 1 MiB.
    pub max_size_per_msg: u64,
    /// Append messages in flight to one follower. Default 256.
    pub max_inflight_msgs: usize,
    /// A learner becomes a voter once its log is within this many entries
    /// of the leader's. Default 64.
    pub promote_within: u64,
    /// The leader lease ends this long before any other server could be
    /// elected ((election_ticks - 1) * tick_ms after the last quorum
    /// heartbeat), to absorb clock-rate differences and agent reaction
    /// time. At least tick_ms plus a drift allowance (1% of that span, at
    /// least 5 ms): a busy follower may stop refusing votes a tick early.
    /// Default 100.
    pub lease_margin_ms: u64,
}

impl Default for RaftSection {
    fn default() -> Self {
        RaftSection {
            tick_ms: 50,
            election_ticks: 10,
            max_election_ticks: 0,
            heartbeat_ticks: 2,
            log_retention: 10_000,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            promote_within: 64,
            lease_margin_ms: 100,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest key in bytes. Default 4096.
    pub max_key_bytes: usize,
    /// Largest value in bytes. Default 1 MiB.
    pub max_value_bytes: usize,
    /// Most operations in one transaction (both branches). Default 128.
    pub max_txn_ops: usize,
    /// How long a write or linearizable read may wait for the zone, in
    /// milliseconds. Default 10000.
    pub request_timeout_ms: u64,
    /// Revisions of change history kept for watchers. Default 100000.
    pub watch_history: u64,
    /// Free space, in MiB, kept on the data directory's filesystem. Below
    /// it this server raises the space alarm: the zone refuses writes that
    /// add data (RESOURCE_EXHAUSTED naming this server) while reads,
    /// deletes and compaction go on, until the server has room again
    /// (`crate::space`). Below a quarter of it (the hard floor) the server
    /// takes nothing but alarms and compactions: the store never meets a
    /// full disk in the middle of a write. 0 disables both. Default 256.
    pub min_free_disk_mb: u64,
    /// The store's largest size on disk, in MiB (RocksDB's files and
    /// memtables, the log and history included), like etcd's quota: past
    /// it this server raises the space alarm. Below `max_snapshot_mb` by
    /// default, so that a new server can still take the store as a
    /// snapshot. 0: no quota. Default 2048.
    pub max_store_mb: u64,
    /// Largest Raft snapshot this server takes from another, in MiB: a
    /// snapshot is received whole in memory, and one announced larger is
    /// refused before any of it is read (RESOURCE_EXHAUSTED, naming this
    /// field). Raise it on every server if the store grows near it.
    /// Default 4096.
    pub max_snapshot_mb: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_key_bytes: 4096,
            max_value_bytes: 1 << 20,
            max_txn_ops: 128,
            request_timeout_ms: 10_000,
            watch_history: 100_000,
            min_free_disk_mb: 256,
            max_store_mb: 2048,
            max_snapshot_mb: 4096,
        }
    }
}

impl Config {
    /// The managed-files policy (roots checked by `finish`).
    pub fn files_policy(&self) -> zone_files::policy::Policy {
        self.files
            .policy()
            .expect("the [files] section is checked by Config::finish")
    }
}

/// Command-line values that replace what the file says.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub id: Option<u64>,
    pub name: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub client_listen: Option<SocketAddr>,
    pub peer_listen: Option<SocketAddr>,
    pub voters: Option<Vec<Voter>>,
    pub join: Option<String>,
    pub join_token: Option<String>,
}

impl Config {
    /// Reads `path`, applies `overrides`, fills derived defaults and
    /// validates.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Config::parse(&text).map_err(|(field, reason)| ConfigError::Parse {
                    path: path.to_owned(),
                    field,
                    reason,
                })?
            }
            None => Config::default(),
        };
        config.apply(overrides);
        config.finish()?;
        Ok(config)
    }

    /// Parses TOML text; on error returns the dotted field path and the reason.
    pub fn parse(text: &str) -> Result<Config, (String, String)> {
        let de = toml::Deserializer::new(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let mut reason = inner.message().to_owned();
            if let Some(span) = inner.span() {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                reason.push_str(&format!(" (line {line})"));
            }
            let field = if field == "." || field.is_empty() {
                "(top level)".to_owned()
            } else {
                field
            };
            (field, reason)
        })
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(id) = o.id {
            self.node.id = id;
        }
        if let Some(name) = &o.name {
            self.node.name = name.clone();
        }
        if let Some(dir) = &o.data_dir {
            self.node.data_dir = dir.clone();
        }
        if let Some(addr) = o.client_listen {
            self.node.client_listen = addr;
        }
        if let Some(addr) = o.peer_listen {
            self.node.peer_listen = addr;
        }
        if let Some(voters) = &o.voters {
            self.voters = voters.clone();
        }
        if let Some(join) = &o.join {
            self.node.join = Some(join.clone());
        }
        if let Some(token) = &o.join_token {
            self.node.join_token = Some(token.clone());
        }
    }

    /// Fills the defaults that depend on other fields, then checks every
    /// rule. Public so that tests and embedders can build a config in code.
    pub fn finish(&mut self) -> Result<(), ConfigError> {
        let ext = &self.extensions;
        if !ext.dir.as_os_str().is_empty() && !ext.dir.is_absolute() {
            return Err(invalid(
                "extensions.dir",
                format!("'{}' is not an absolute path", ext.dir.display()),
            ));
        }
        if !ext.factory_dir.as_os_str().is_empty() && !ext.factory_dir.is_absolute() {
            return Err(invalid(
                "extensions.factory_dir",
                format!("'{}' is not an absolute path", ext.factory_dir.display()),
            ));
        }
        for (field, cmd) in [
            ("extensions.refresh_command", &ext.refresh_command),
            ("extensions.reload_command", &ext.reload_command),
        ] {
            if cmd.first().is_none_or(|c| c.is_empty()) {
                return Err(invalid(field, "empty: name the program and its arguments"));
            }
        }
        let listen = self.metrics.listen.trim();
        if !listen.is_empty() && listen != "off" && listen.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "metrics.listen",
                format!("'{listen}' is not an address:port (such as 10.0.0.11:7402) nor \"off\""),
            ));
        }
        if let Some(m) = self.metrics_addr() {
            for (field, addr) in [
                ("node.client_listen", self.node.client_listen),
                ("node.peer_listen", self.node.peer_listen),
            ] {
                if m.port() == addr.port()
                    && (m.ip() == addr.ip()
                        || m.ip().is_unspecified()
                        || addr.ip().is_unspecified())
                {
                    return Err(invalid(
                        "metrics.listen",
                        format!("{m} is {field}'s port ({addr}): give the metrics a port of their own (metrics.listen = \"HOST:PORT\")"),
                    ));
                }
            }
        }
        if self.node.id == 0 {
            return Err(invalid(
                "node.id",
                "must be at least 1 (0 means 'no node' in Raft)",
            ));
        }
        if self.node.name.is_empty() {
            self.node.name = format!("zone-{}", self.node.id);
        }
        if let Some(join) = &self.node.join {
            check_host_port(join).map_err(|r| invalid("node.join", r))?;
            if self.node.restore_from.is_some() {
                return Err(invalid(
                    "node.restore_from",
                    "a restored server founds a new zone: it cannot also join one (node.join)",
                ));
            }
        }
        if self
            .node
            .restore_from
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid("node.restore_from", "must name a backup file"));
        }
        if let Some(token) = &self.node.join_token {
            let token: zone_pki::JoinToken =
                token.parse().map_err(|r| invalid("node.join_token", r))?;
            if self.node.join.is_none() {
                return Err(invalid(
                    "node.join_token",
                    "needs node.join: the client address of the member to join through",
                ));
            }
            if token.server_id != self.node.id {
                return Err(invalid(
                    "node.join_token",
                    format!(
                        "the token is for server {}, and node.id is {}",
                        token.server_id, self.node.id
                    ),
                ));
            }
        }
        let joining = self.node.join.is_some();
        if self.voters.is_empty() && !joining {
            let addr = self.node.peer_listen;
            let host = if addr.ip().is_unspecified() {
                "127.0.0.1".to_owned()
            } else {
                addr.ip().to_string()
            };
            self.voters.push(Voter {
                id: self.node.id,
                peer: format!("{host}:{}", addr.port()),
                name: String::new(),
            });
        }
        self.files.check().map_err(|e| match e {
            zone_files::FileError::Invalid { field, reason } => invalid(field, reason),
            other => invalid("files", other.to_string()),
        })?;
        // A managed root over the certificates would let a reader fetch
        // the zone CA's key (`config diff` reads a server's own copies) and
        // an operator replace them (`config push`).
        for root in &self.files.managed_roots {
            if self.tls.dir.starts_with(root) || Path::new(root).starts_with(&self.tls.dir) {
                return Err(invalid(
                    "files.managed_roots",
                    format!(
                        "{root} overlaps tls.dir {} (the server's keys): managed files must stay out of it",
                        self.tls.dir.display()
                    ),
                ));
            }
        }
        let mut ids = BTreeSet::new();
        for (i, v) in self.voters.iter().enumerate() {
            if v.id == 0 {
                return Err(invalid(format!("voters[{i}].id"), "must be at least 1"));
            }
            if !ids.insert(v.id) {
                return Err(invalid(
                    format!("voters[{i}].id"),
                    format!("id {} is listed twice", v.id),
                ));
            }
            check_host_port(&v.peer).map_err(|r| invalid(format!("voters[{i}].peer"), r))?;
        }
        if !joining && !ids.contains(&self.node.id) {
            return Err(invalid(
                "voters",
                format!(
                    "node.id {} is not among the initial voters ({})",
                    self.node.id,
                    ids.iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if self.node.client_listen == self.node.peer_listen {
            return Err(invalid(
                "node.peer_listen",
                "must differ from node.client_listen",
            ));
        }
        let r = &self.raft;
        if r.tick_ms == 0 || r.tick_ms > 10_000 {
            return Err(invalid("raft.tick_ms", "must be between 1 and 10000"));
        }
        if r.heartbeat_ticks == 0 {
            return Err(invalid("raft.heartbeat_ticks", "must be at least 1"));
        }
        if r.election_ticks <= r.heartbeat_ticks {
            return Err(invalid(
                "raft.election_ticks",
                format!(
                    "must be greater than raft.heartbeat_ticks ({}), or followers campaign against a live leader",
                    r.heartbeat_ticks
                ),
            ));
        }
        if r.max_election_ticks != 0 && r.max_election_ticks <= r.election_ticks {
            return Err(invalid(
                "raft.max_election_ticks",
                format!(
                    "must be greater than raft.election_ticks ({}), or 0 for the default",
                    r.election_ticks
                ),
            ));
        }
        let safe_ms = (r.election_ticks as u64 - 1) * r.tick_ms;
        // Safety (see node::lease): a follower whose driver was busy (in an
        // fsync, say) handles the queued heartbeat and then at once the tick
        // that fell due meanwhile, so it may stop refusing votes one tick
        // sooner than (election_ticks - 1) ticks after the heartbeat. The
        // margin covers that tick, and clock-rate drift on top.
        let drift_ms = (safe_ms / 100).max(5);
        if r.lease_margin_ms < r.tick_ms + drift_ms {
            return Err(invalid(
                "raft.lease_margin_ms",
                format!(
                    "{} ms is too small: it must be at least one tick ({} ms) plus {drift_ms} ms for clock drift, since a busy follower may stop refusing votes a tick early",
                    r.lease_margin_ms, r.tick_ms
                ),
            ));
        }
        if r.lease_margin_ms >= safe_ms {
            return Err(invalid(
                "raft.lease_margin_ms",
                format!(
                    "{} ms leaves no lease: it must be below (election_ticks - 1) * tick_ms = {safe_ms} ms",
                    r.lease_margin_ms
                ),
            ));
        }
        if r.log_retention == 0 {
            return Err(invalid("raft.log_retention", "must be at least 1"));
        }
        if r.max_size_per_msg == 0 {
            return Err(invalid("raft.max_size_per_msg", "must be at least 1"));
        }
        if r.max_inflight_msgs == 0 {
            return Err(invalid("raft.max_inflight_msgs", "must be at least 1"));
        }
        let l = &self.limits;
        if l.max_key_bytes == 0 || l.max_key_bytes > 64 << 10 {
            return Err(invalid(
                "limits.max_key_bytes",
                "must be between 1 and 65536",
            ));
        }
        if l.max_value_bytes == 0 || l.max_value_bytes > 64 << 20 {
            return Err(invalid(
                "limits.max_value_bytes",
                "must be between 1 and 67108864 (64 MiB)",
            ));
        }
        if l.max_txn_ops == 0 {
            return Err(invalid("limits.max_txn_ops", "must be at least 1"));
        }
        if l.request_timeout_ms < 100 {
            return Err(invalid("limits.request_timeout_ms", "must be at least 100"));
        }
        if l.watch_history == 0 {
            return Err(invalid("limits.watch_history", "must be at least 1"));
        }
        if l.min_free_disk_mb > 1 << 20 {
            return Err(invalid(
                "limits.min_free_disk_mb",
                "must be at most 1048576 (1 TiB); 0 turns the check off",
            ));
        }
        if l.max_store_mb > 1 << 24 {
            return Err(invalid(
                "limits.max_store_mb",
                "must be at most 16777216 (16 TiB); 0 turns the quota off",
            ));
        }
        if l.max_snapshot_mb == 0 || l.max_snapshot_mb > 1 << 20 {
            return Err(invalid(
                "limits.max_snapshot_mb",
                "must be between 1 and 1048576 (1 TiB)",
            ));
        }
        Ok(())
    }

    /// The peer address of voter `id`, if it is an initial voter.
    pub fn peer_address(&self, id: u64) -> Option<&str> {
        self.voters
            .iter()
            .find(|v| v.id == id)
            .map(|v| v.peer.as_str())
    }

    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.raft.tick_ms)
    }

    /// The upper bound (exclusive) of randomised election timeouts, in ticks.
    pub fn max_election_ticks(&self) -> usize {
        match self.raft.max_election_ticks {
            0 => (self.raft.election_ticks * 3)
                .div_ceil(2)
                .max(self.raft.election_ticks + 1),
            n => n,
        }
    }

    /// How long a lease lasts after the heartbeat round that renewed it.
    pub fn lease(&self) -> Duration {
        let r = &self.raft;
        Duration::from_millis((r.election_ticks as u64 - 1) * r.tick_ms - r.lease_margin_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.request_timeout_ms)
    }

    /// A commented configuration with every default, for `zoned --print-config`.
    pub fn example() -> &'static str {
        include_str!("../node.example.toml")
    }
}

/// Checks `host:port` with a non-empty host and a port from 1 to 65535.
pub fn check_host_port(s: &str) -> Result<(), String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("'{s}' is not host:port"));
    };
    if host.is_empty() {
        return Err(format!("'{s}' has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("'{s}' has no valid port (1-65535)")),
    }
}

/// Parses one voter of the `--voters` flag: `id=host:port`.
pub fn parse_voter(part: &str) -> Result<Voter, String> {
    let (id, peer) = part
        .split_once('=')
        .ok_or_else(|| format!("'{part}' is not id=host:port"))?;
    let id = id
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("'{}' is not a node id", id.trim()))?;
    let peer = peer.trim().to_owned();
    check_host_port(&peer)?;
    Ok(Voter {
        id,
        peer,
        name: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match Config::parse(text) {
            Err((field, reason)) => format!("{field}: {reason}"),
            Ok(mut c) => match c.finish() {
                Err(e) => e.to_string(),
                Ok(()) => panic!("accepted: {text}"),
            },
        }
    }

    #[test]
    fn empty_file_is_a_single_node_zone() {
        let mut c = Config::parse("").unwrap();
        c.finish().unwrap();
        assert_eq!(c.node.name, "zone-1");
        assert_eq!(
            c.voters,
            vec![Voter {
                id: 1,
                peer: "127.0.0.1:7401".into(),
                name: String::new(),
            }]
        );
        assert_eq!(c.limits.max_key_bytes, 4096);
        assert_eq!(c.limits.max_value_bytes, 1 << 20);
    }

    #[test]
    fn a_managed_root_over_the_certificates_is_refused() {
        for root in ["/etc", "/etc/zoned", "/etc/zoned/tls/x"] {
            let text = format!("[files]\nmanaged_roots = [\"{root}\"]\n");
            let mut c = Config::parse(&text).unwrap();
            let e = c.finish().unwrap_err().to_string();
            assert!(e.starts_with("files.managed_roots: "), "{root}: {e}");
        }
        let mut c = Config::parse("[files]\nmanaged_roots = [\"/etc/one\"]\n").unwrap();
        c.finish().unwrap();
    }

    #[test]
    fn example_file_parses_to_the_defaults() {
        let mut example = Config::parse(Config::example()).unwrap();
        example.finish().unwrap();
        let mut default = Config::default();
        default.finish().unwrap();
        assert_eq!(example, default);
    }

    #[test]
    fn errors_name_the_field() {
        assert!(err("[raft]\ntick_ms = \"fast\"\n").starts_with("raft.tick_ms: invalid type"));
        assert!(err("[node]\nidd = 3\n").starts_with("node.idd: unknown field `idd`"));
        assert!(err("[node]\nclient_listen = \"nowhere\"\n").starts_with("node.client_listen: "));
        assert_eq!(
            err("[raft]\nelection_ticks = 2\nheartbeat_ticks = 2\n"),
            "raft.election_ticks: must be greater than raft.heartbeat_ticks (2), or followers campaign against a live leader"
        );
        assert_eq!(
            err("[node]\nid = 0\n"),
            "node.id: must be at least 1 (0 means 'no node' in Raft)"
        );
        assert_eq!(
            err("[[voters]]\nid = 2\npeer = \"a:1\"\n"),
            "voters: node.id 1 is not among the initial voters (2)"
        );
        assert_eq!(
            err("[[voters]]\nid = 1\npeer = \"a\"\n"),
            "voters[0].peer: 'a' is not host:port"
        );
        assert_eq!(
            err("[[voters]]\nid = 1\npeer = \"a:1\"\n[[voters]]\nid = 1\npeer = \"b:1\"\n"),
            "voters[1].id: id 1 is listed twice"
        );
        assert_eq!(
            err("[limits]\nmax_key_bytes = 0\n"),
            "limits.max_key_bytes: must be between 1 and 65536"
        );
    }

    /// Issue 20, defect 4: the old check accepted any margin below
    /// (election_ticks - 1) * tick_ms, 0 and 50 ms at 100 ms ticks included.
    #[test]
    fn the_lease_margin_covers_a_tick_and_drift() {
        for margin in [0, 50, 100, 108] {
            let e = err(&format!(
                "[raft]\ntick_ms = 100\nlease_margin_ms = {margin}\n"
            ));
            assert_eq!(
                e,
                format!("raft.lease_margin_ms: {margin} ms is too small: it must be at least one tick (100 ms) plus 9 ms for clock drift, since a busy follower may stop refusing votes a tick early")
            );
        }
        let mut ok = Config::parse("[raft]\ntick_ms = 100\nlease_margin_ms = 109\n").unwrap();
        ok.finish().unwrap();
        assert_eq!(ok.lease(), Duration::from_millis(900 - 109));
    }

    #[test]
    fn parse_errors_carry_the_line() {
        let (field, reason) = Config::parse("\n\n[raft]\ntick_ms = -5\n").unwrap_err();
        assert_eq!(field, "raft.tick_ms");
        assert!(reason.ends_with("(line 4)"), "{reason}");
    }

    #[test]
    fn voters_flag() {
        let v: Vec<Voter> = "1=127.0.0.1:7401, 2=127.0.0.2:7401"
            .split(',')
            .map(|p| parse_voter(p).unwrap())
            .collect();
        assert_eq!(
            v[1],
            Voter {
                id: 2,
                peer: "127.0.0.2:7401".into(),
                name: String::new(),
            }
        );
        assert!(parse_voter("x=a:1").is_err());
        assert!(parse_voter("1=a").is_err());
    }
}
