//! Zones of real `zoned` processes on loopback, for the system tests, with
//! their data on disk in a temporary directory.
//!
//! The harness owns every process it starts and kills them all when it is
//! dropped, also when a test panics; it then prints each server's log so a
//! failure can be read from the test output.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use zonectl::v1::cluster_client::ClusterClient;
use zonectl::v1::kv_client::KvClient;
use zonectl::v1::{GetRequest, RangeRequest, RangeResponse, StatusRequest};
use zonectl::ZoneView;

use crate::pki::TestPki;
use crate::ZonedConfig;

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn poll<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A loopback network of its own for one test zone: 127.A.B.0/24, picked
/// at random and checked free. Servers listen on the zone's fixed ports
/// (7400 clients, 7401 peers) at 127.A.B.<id>: no port-0 games, so no race
/// with the ephemeral ports other tests' connections use.
fn loopback_net() -> [u8; 2] {
    loop {
        let net = [rand::random_range(1..=254u8), rand::random_range(0..=255u8)];
        let probe = SocketAddr::from(([127, net[0], net[1], 1], 7400));
        if TcpListener::bind(probe).is_ok() {
            return net;
        }
    }
}

fn addr(net: [u8; 2], id: u64, port: u16) -> SocketAddr {
    SocketAddr::from(([127, net[0], net[1], id as u8], port))
}

#[derive(Debug)]
pub struct Server {
    pub id: u64,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    pub dir: PathBuf,
    pub child: Option<Child>,
}

impl Server {
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("zoned.log")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("node.toml")
    }

    pub fn endpoint(&self) -> String {
        self.client.to_string()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

#[derive(Debug)]
pub struct TestZone {
    pub net: [u8; 2],
    pub servers: Vec<Server>,
    pub root: tempfile::TempDir,
    pub extra_config: String,
    /// The zone's certificates: every server has TLS on both ports, and
    /// the harness's clients are its admin.
    pub pki: TestPki,
}

/// Raft timing for tests: 50 ms ticks, elections after 0.5-1 s.
const TEST_RAFT: &str = "[raft]\ntick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2\n";

/// Stands for the join token in a configuration until it is given.
const TOKEN_PLACEHOLDER: &str = "join-token-to-be-given";

impl TestZone {
    /// Starts `n` servers forming one zone. `extra` is appended to every
    /// config file (a `[limits]` table, say), `{dir}` in it replaced by the
    /// server's own directory.
    pub fn start(n: u64, extra: &str) -> TestZone {
        let mut zone = TestZone::prepare(n, extra);
        for i in 0..zone.servers.len() {
            zone.launch(i);
        }
        zone
    }

    /// As [`TestZone::start`], but starts none of the servers.
    pub fn prepare(n: u64, extra: &str) -> TestZone {
        let root = tempfile::tempdir().unwrap();
        let net = loopback_net();
        let servers: Vec<Server> = (1..=n)
            .map(|id| Server {
                id,
                client: addr(net, id, 7400),
                peer: addr(net, id, 7401),
                dir: root.path().join(format!("node-{id}")),
                child: None,
            })
            .collect();
        let pki = TestPki::new(&root.path().join("pki"));
        let zone = TestZone {
            net,
            servers,
            root,
            extra_config: extra.to_owned(),
            pki,
        };
        let voters: Vec<(u64, String)> = zone
            .servers
            .iter()
            .map(|v| (v.id, v.peer.to_string()))
            .collect();
        for s in &zone.servers {
            std::fs::create_dir_all(&s.dir).unwrap();
            // Founders hold the zone CA's key, as `zonectl zone init` gives.
            zone.pki.founder(s.id);
            let text = ZonedConfig {
                voters: voters.clone(),
                ..zone.config_of(s)
            }
            .render();
            std::fs::write(s.config_path(), text).unwrap();
        }
        zone
    }

    /// Prepares (does not start) a new server that joins the zone through
    /// server index `via`; returns its index. Its certificate is made here,
    /// by the test's CA (see [`TestZone::prepare_token_joiner`] for a
    /// server that gets its own with a join token).
    pub fn prepare_joiner(&mut self, id: u64, via: usize) -> usize {
        self.prepare_joiner_with(id, via, None)
    }

    /// As [`TestZone::prepare_joiner`], for a server that has no
    /// certificate: an empty `[tls] dir` (`tls_dir(index)`); its join
    /// token is given with [`TestZone::give_token`] once the server was
    /// added.
    pub fn prepare_token_joiner(&mut self, id: u64, via: usize) -> usize {
        self.prepare_joiner_with(id, via, Some(TOKEN_PLACEHOLDER))
    }

    /// Writes `token` into the configuration of server index `i`, prepared
    /// with [`TestZone::prepare_token_joiner`].
    pub fn give_token(&self, i: usize, token: &str) {
        let path = self.servers[i].config_path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(TOKEN_PLACEHOLDER), "{}", path.display());
        std::fs::write(&path, text.replace(TOKEN_PLACEHOLDER, token)).unwrap();
    }

    /// Asks server index `via` (as the admin) for a join token for server
    /// `id` (one hour).
    pub async fn join_token(&self, via: usize, id: u64) -> String {
        zonectl::v1::join_client::JoinClient::new(self.channel(via).await)
            .issue_token(zonectl::v1::JoinTokenRequest { id, ttl_seconds: 0 })
            .await
            .unwrap_or_else(|e| panic!("a join token for server {id}: {e:?}"))
            .into_inner()
            .token
    }

    /// Adds server `id` (name `zone-<id>`) at `peer` to the zone, asking
    /// server index `via` as the admin; panics if refused.
    pub async fn add_server(&self, via: usize, id: u64, peer: String) {
        self.cluster(via)
            .await
            .add_server(zonectl::v1::AddServerRequest {
                id,
                name: format!("zone-{id}"),
                peer,
            })
            .await
            .unwrap_or_else(|e| panic!("the admin adds server {id}: {e}"));
    }

    /// Where a server prepared with [`TestZone::prepare_token_joiner`]
    /// keeps the certificates it gets.
    pub fn tls_dir(&self, i: usize) -> PathBuf {
        self.servers[i].dir.join("tls")
    }

    fn prepare_joiner_with(&mut self, id: u64, via: usize, token: Option<&str>) -> usize {
        let s = Server {
            id,
            client: addr(self.net, id, 7400),
            peer: addr(self.net, id, 7401),
            dir: self.root.path().join(format!("node-{id}")),
            child: None,
        };
        std::fs::create_dir_all(&s.dir).unwrap();
        let mut config = ZonedConfig {
            join: Some(self.servers[via].client.to_string()),
            ..self.config_of(&s)
        };
        if let Some(token) = token {
            config.join_token = Some(token.to_owned());
            config.tls = Some(s.dir.join("tls"));
        }
        let text = config.render();
        std::fs::write(s.config_path(), text).unwrap();
        self.servers.push(s);
        self.servers.len() - 1
    }

    /// Server `s`'s configuration, without voters or join: the test Raft
    /// timing, then the zone's extra tables with `{dir}` made `s`'s.
    fn config_of(&self, s: &Server) -> ZonedConfig {
        ZonedConfig {
            id: s.id,
            dir: s.dir.clone(),
            client: s.client.to_string(),
            peer: s.peer.to_string(),
            extra: format!("{TEST_RAFT}\n{}", self.extra_config)
                .replace("{dir}", &s.dir.display().to_string()),
            tls: Some(self.pki.server(s.id)),
            ..ZonedConfig::default()
        }
    }

    /// The lease state server index `i`'s agent socket sends first to a new
    /// agent (one that declares no address), as zone-vip would see it.
    pub async fn lease_state(&self, i: usize) -> zonectl::v1::LeaseState {
        use zonectl::v1::{agent_client::AgentClient, LeaseAck};
        let path = self.servers[i].dir.join("agent.sock");
        // The URI is not used: the connection goes to the unix socket.
        let channel = tonic::transport::Endpoint::from_static("http://zoned.agent")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .expect("connecting to the agent socket");
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(LeaseAck {
            generation: 0,
            holding: false,
            addresses: Vec::new(),
        })
        .await
        .expect("the declaration");
        let mut stream = AgentClient::new(channel)
            .lease(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("the lease stream")
            .into_inner();
        stream
            .message()
            .await
            .expect("a lease state")
            .expect("a lease state before the stream ends")
    }

    /// Waits for server index `i` to exit by itself; returns its status.
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> std::process::ExitStatus {
        let mut c = self.servers[i].child.take().expect("server running");
        let what = format!("server {}", self.servers[i].id);
        crate::wait_exit(&mut c, &what, timeout)
    }

    pub async fn cluster(&self, i: usize) -> ClusterClient<Channel> {
        ClusterClient::new(self.channel(i).await)
    }

    /// The server's own status row, as it reports it.
    pub async fn own_row(&self, i: usize) -> Option<zonectl::ServerRow> {
        let v = self.status(i).await?;
        v.servers.into_iter().find(|s| s.id == self.servers[i].id)
    }

    /// Starts server index `i` (0-based) from its config.
    pub fn launch(&mut self, i: usize) {
        self.launch_under(i, &[]);
    }

    /// Starts server index `i` as the argument of `runner` (a program and
    /// its arguments, e.g. an emulator), or directly if `runner` is empty.
    pub fn launch_under(&mut self, i: usize, runner: &[&str]) {
        self.spawn(i, runner, &[]);
    }

    /// Starts server index `i` with `args` after its `--config`.
    pub fn launch_with(&mut self, i: usize, args: &[&str]) {
        self.spawn(i, &[], args);
    }

    /// Runs `zoned --config <server i's> ARGS` to its end (a subcommand
    /// such as `restore`), the server itself not running.
    pub fn run_zoned(&self, i: usize, args: &[&str]) -> std::process::Output {
        Command::new(crate::binary("zoned"))
            .arg("--config")
            .arg(self.servers[i].config_path())
            .args(args)
            .output()
            .expect("run zoned")
    }

    fn spawn(&mut self, i: usize, runner: &[&str], args: &[&str]) {
        let s = &mut self.servers[i];
        assert!(s.child.is_none(), "server {} already running", s.id);
        let zoned = crate::binary("zoned");
        let mut cmd = match runner.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(zoned);
                c
            }
            None => Command::new(zoned),
        };
        cmd.arg("--config").arg(s.config_path()).args(args);
        let child = crate::spawn_logged(cmd, &s.log_path());
        s.child = Some(child);
    }

    /// Sends `signal` to server `i` (SIGSTOP freezes it: a hung server, a
    /// paused VM; SIGCONT thaws it).
    pub fn signal(&self, i: usize, signal: nix::sys::signal::Signal) {
        let c = self.servers[i].child.as_ref().expect("server running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), signal)
            .unwrap_or_else(|e| panic!("{signal} to server {}: {e}", self.servers[i].id));
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self, i: usize) {
        crate::kill9(self.servers[i].child.take());
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self, i: usize) -> std::process::ExitStatus {
        let mut c = self.servers[i].child.take().expect("server running");
        let what = format!("server {}", self.servers[i].id);
        crate::terminate(&mut c, &what, Duration::from_secs(20))
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.servers.iter().map(Server::endpoint).collect()
    }

    /// A channel to server `i`'s client port, as the zone's admin.
    pub async fn channel(&self, i: usize) -> Channel {
        self.channel_as(i, Some(self.pki.admin()))
    }

    /// A channel to server `i`'s client port with `creds` (None: TLS
    /// without a client certificate, as a load balancer's health check).
    pub fn channel_as(&self, i: usize, creds: Option<&zonectl::Credentials>) -> Channel {
        let ep = match creds {
            Some(c) => zonectl::endpoint(&self.servers[i].endpoint(), Some(c)).unwrap(),
            None => {
                let tls = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(
                        self.pki.ca.cert_pem(),
                    ))
                    .domain_name(zonectl::zone_pki::ANY_SERVER)
                    .timeout(zonectl::credentials::HANDSHAKE_TIMEOUT);
                tonic::transport::Endpoint::from_shared(format!(
                    "https://{}",
                    self.servers[i].client
                ))
                .unwrap()
                .tls_config(tls)
                .unwrap()
            }
        };
        ep.connect_timeout(Duration::from_secs(1)).connect_lazy()
    }

    /// The zonectl binary run with `args` as the admin (give
    /// `--endpoints`: its default is the local cluster's).
    pub fn zonectl(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(crate::binary("zonectl"))
            .args(self.zonectl_credentials())
            .args(args)
            .output()
            .expect("run zonectl")
    }

    /// `--credentials DIR` for the zonectl binary: the admin's.
    pub fn zonectl_credentials(&self) -> [String; 2] {
        [
            "--credentials".to_owned(),
            self.pki.admin_dir().display().to_string(),
        ]
    }

    pub async fn kv(&self, i: usize) -> KvClient<Channel> {
        KvClient::new(self.channel(i).await)
    }

    /// The pairs under `prefix` (every pair if empty) on server `i`: a
    /// linearizable read, or the server's own copy if `serializable`.
    pub async fn range(&self, i: usize, prefix: &[u8], serializable: bool) -> RangeResponse {
        self.kv(i)
            .await
            .range(RangeRequest {
                prefix: prefix.to_vec(),
                serializable,
                ..RangeRequest::default()
            })
            .await
            .unwrap_or_else(|e| panic!("range on server {i}: {e}"))
            .into_inner()
    }

    /// The value of `key` on server `i` (linearizable, or the server's own
    /// copy if `serializable`); None if absent or the read failed.
    pub async fn value(&self, i: usize, key: &str, serializable: bool) -> Option<Vec<u8>> {
        let req = GetRequest {
            key: key.as_bytes().to_vec(),
            serializable,
        };
        let r = self.kv(i).await.get(req).await.ok()?.into_inner();
        r.kv.map(|kv| kv.value)
    }

    /// Each key under `prefix` with its mod revision, as `range` reads them.
    pub async fn mod_revisions(
        &self,
        i: usize,
        prefix: &[u8],
        serializable: bool,
    ) -> BTreeMap<String, u64> {
        let r = self.range(i, prefix, serializable).await;
        r.kvs
            .into_iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    kv.mod_revision,
                )
            })
            .collect()
    }

    /// The store's revision, read linearizably on server `i`.
    pub async fn revision(&self, i: usize) -> u64 {
        let mut kv = self.kv(i).await;
        let r = kv
            .range(RangeRequest {
                limit: 1,
                keys_only: true,
                ..RangeRequest::default()
            })
            .await
            .unwrap_or_else(|e| panic!("range on server {i}: {e}"))
            .into_inner();
        r.header.expect("response header").revision
    }

    pub async fn status(&self, i: usize) -> Option<ZoneView> {
        let mut c = ClusterClient::new(self.channel(i).await);
        let mut req = tonic::Request::new(StatusRequest {});
        req.set_timeout(Duration::from_secs(3));
        let s = c.status(req).await.ok()?.into_inner();
        Some(ZoneView::from_status(&s))
    }

    /// Waits until some running server reports a leader that every running
    /// server agrees on; returns the leader's index in `servers`.
    pub async fn wait_leader(&mut self) -> usize {
        let running: Vec<usize> = (0..self.servers.len())
            .filter(|&i| self.servers[i].is_running())
            .collect();
        let this = &*self;
        poll(
            Duration::from_secs(30),
            "a leader every running server agrees on",
            || {
                let running = running.clone();
                async move {
                    let mut leader = None;
                    for &i in &running {
                        let v = this.status(i).await?;
                        let l = v.leader_id;
                        if l == 0 || leader.is_some_and(|x| x != l) {
                            return None;
                        }
                        leader = Some(l);
                    }
                    let id = leader?;
                    let idx = this.servers.iter().position(|s| s.id == id)?;
                    // A dead leader may still be believed in for a moment.
                    running.contains(&idx).then_some(idx)
                }
            },
        )
        .await
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.servers[i].log_path()).unwrap_or_default()
    }

    pub fn data_dir(&self, i: usize) -> &Path {
        &self.servers[i].dir
    }
}

impl Drop for TestZone {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill9(i);
        }
        if std::thread::panicking() {
            // ZONED_TEST_LOG_LINES: how many of each log's last lines to show.
            let n = std::env::var("ZONED_TEST_LOG_LINES")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(60);
            for s in &self.servers {
                let log = std::fs::read_to_string(s.log_path()).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!("---- zoned {} log (last {n} lines) ----", s.id);
                for l in &lines[lines.len().saturating_sub(n)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// The writer's outcome: acknowledged writes (key -> revision), failures.
pub type WriterTask = tokio::task::JoinHandle<(BTreeMap<String, u64>, u32)>;

/// A client writing continuously (see [`start_writer`]).
#[derive(Debug)]
pub struct Writer {
    pub stop: tokio::sync::watch::Sender<bool>,
    pub task: WriterTask,
    acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Writer {
    /// How many writes were acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `more` writes are acknowledged beyond those so far: the
    /// zone is taking writes (instead of sleeping and hoping it did).
    pub async fn wait_more(&self, more: u64) {
        let target = self.acked() + more;
        poll(
            Duration::from_secs(30),
            &format!("{more} more acknowledged writes"),
            || async { (self.acked() >= target).then_some(()) },
        )
        .await;
    }

    /// Stops the writer: the acknowledged writes and the failures.
    pub async fn finish(self) -> (BTreeMap<String, u64>, u32) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap()
    }
}

/// Writes continuously through whichever endpoint answers (trying the next
/// one on failure), keys `<prefix>000000`, `<prefix>000001`, ..., never
/// reusing the key of a failed write (it may or may not exist). Finished,
/// it returns the acknowledged writes (key -> revision) and the number of
/// failures.
pub fn start_writer(
    endpoints: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    creds: zonectl::Credentials,
    prefix: &'static str,
) -> Writer {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let acked_count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = acked_count.clone();
    let task = tokio::spawn(async move {
        let mut acked = BTreeMap::new();
        let mut errors = 0u32;
        let mut target = 0usize;
        let mut n = 0u64;
        while !*stop_rx.borrow() {
            let ep = {
                let eps = endpoints.lock().unwrap();
                eps[target % eps.len()].clone()
            };
            let ch = zonectl::endpoint(&ep, Some(&creds))
                .unwrap()
                .connect_timeout(Duration::from_millis(300))
                .connect_lazy();
            let mut kv = KvClient::new(ch);
            let key = format!("{prefix}{n:06}");
            n += 1;
            let mut req = tonic::Request::new(zonectl::v1::PutRequest {
                key: key.clone().into_bytes(),
                value: format!("value-{n}").into_bytes(),
                prev_kv: false,
            });
            req.set_timeout(Duration::from_secs(5));
            match kv.put(req).await {
                Ok(r) => {
                    acked.insert(key, r.into_inner().header.unwrap().revision);
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(_) => {
                    errors += 1;
                    target += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        (acked, errors)
    });
    Writer {
        stop: stop_tx,
        task,
        acked: acked_count,
    }
}
