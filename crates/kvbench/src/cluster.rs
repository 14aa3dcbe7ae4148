//! Three-server clusters of zoned and of etcd on one loopback network of
//! their own, data in one directory (so on one disk), fsync on for both,
//! and TLS on both ports of both, with client certificates required (one
//! CA for the run, [`Pki`]). Every process is killed when its cluster is
//! dropped.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tonic::transport::{Channel, Endpoint};
use zone_proto::v1::{cluster_client::ClusterClient, StatusRequest};

/// The run's certificates: one CA (zone-pki's), a node certificate per
/// server of either system (with its address, as etcd checks its peers'),
/// and one client credential. Made once, before the clusters start.
pub struct Pki {
    ca: zonectl::zone_pki::ZoneCa,
    dir: PathBuf,
    client: zonectl::Credentials,
}

static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();

/// Makes the run's certificates under `dir`.
pub fn init_pki(dir: &Path) -> Result<()> {
    use zonectl::zone_pki::{Role, ZoneCa};
    let ca = ZoneCa::generate()?;
    std::fs::create_dir_all(dir)?;
    let c = ca.issue_client("kvbench", Role::Admin)?;
    let client = zonectl::Credentials::from_pem(ca.cert_pem(), &c.cert_pem, &c.key_pem, dir)?;
    let _ = PKI.set(Pki {
        ca,
        dir: dir.to_owned(),
        client,
    });
    Ok(())
}

fn pki() -> &'static Pki {
    PKI.get()
        .expect("cluster::init_pki runs before the clusters")
}

/// Writes a node certificate for `id` at `ip` into `<pki>/<name>/`:
/// `ca.pem`, `node.pem`, `node.key`; returns the directory. It also names
/// 127.0.0.1: etcd checks a peer's certificate against the address the
/// connection came from, and on loopback that is 127.0.0.1 whatever
/// address the peer listens on.
fn node_certs(name: &str, id: u64, ip: &str) -> Result<PathBuf> {
    let p = pki();
    let c = p.ca.issue_node(id, &[ip.parse()?, "127.0.0.1".parse()?])?;
    let d = p.dir.join(name);
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("ca.pem"), p.ca.cert_pem())?;
    std::fs::write(d.join("node.pem"), &c.cert_pem)?;
    std::fs::write(d.join("node.key"), &c.key_pem)?;
    Ok(d)
}

/// TLS for etcd's clients: the run's CA and client credential.
pub fn etcd_tls() -> etcd_client::TlsOptions {
    let c = &pki().client;
    etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(&c.ca_pem))
        .identity(etcd_client::Identity::from_pem(&c.cert_pem, &c.key_pem))
        .timeout(zonectl::credentials::HANDSHAKE_TIMEOUT)
}

/// A loopback /24 of our own, 127.A.B.0, checked free on the ports used.
pub fn loopback_net() -> [u8; 2] {
    loop {
        let net = [rand::random_range(1..=254u8), rand::random_range(0..=255u8)];
        let free = [(1, 7400), (11, 2379)].iter().all(|&(h, p)| {
            TcpListener::bind(SocketAddr::from(([127, net[0], net[1], h], p))).is_ok()
        });
        if free {
            return net;
        }
    }
}

fn ip(net: [u8; 2], host: u8) -> String {
    format!("127.{}.{}.{host}", net[0], net[1])
}

/// Processes killed on drop, each with its log.
struct Procs(Vec<(String, Child, PathBuf)>);

impl Procs {
    fn spawn(&mut self, name: String, cmd: &mut Command, log: PathBuf) -> Result<()> {
        let f =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        self.0.push((name, child, log));
        Ok(())
    }

    /// CPU time all these processes have used so far, ms.
    fn cpu_ms(&self) -> Result<f64> {
        let mut sum = 0.0;
        for (_, child, _) in &self.0 {
            sum += crate::machine::cpu_ms(Some(child.id()))?;
        }
        Ok(sum)
    }

    /// Fails, with the log's tail, if a process has exited.
    fn check(&mut self) -> Result<()> {
        for (name, child, log) in &mut self.0 {
            if let Some(st) = child.try_wait()? {
                let text = std::fs::read_to_string(&*log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "{name} exited ({st}); {}:\n{}",
                    log.display(),
                    tail.join("\n")
                );
            }
        }
        Ok(())
    }

    /// `probe`'s answer, asked every 100 ms; fails if a process exits or
    /// no answer comes within `timeout`.
    async fn until<T, F, Fut>(&mut self, what: &str, timeout: Duration, mut probe: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            self.check()?;
            // A probe whose connection hangs (a TLS handshake refused by
            // a peer that keeps the socket) is given up, not waited for.
            if let Ok(Some(v)) = tokio::time::timeout(Duration::from_secs(5), probe()).await {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("no {what} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c, _) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct Zoned {
    procs: Procs,
    /// Client endpoints (host:port), by server.
    pub endpoints: Vec<String>,
}

impl Zoned {
    /// CPU time the three servers have used so far, ms.
    pub fn cpu_ms(&self) -> Result<f64> {
        self.procs.cpu_ms()
    }
}

pub async fn zoned(
    bin: &Path,
    dir: &Path,
    net: [u8; 2],
    timeout: Duration,
) -> Result<(Zoned, Leader)> {
    if !bin.exists() {
        bail!(
            "{} is missing: build it first (cargo build --bin zoned), or give --zoned",
            bin.display()
        );
    }
    let mut procs = Procs(Vec::new());
    let mut endpoints = Vec::new();
    for id in 1..=3u8 {
        let d = dir.join(format!("zoned-{id}"));
        std::fs::create_dir_all(&d)?;
        let tls = node_certs(&format!("zoned-{id}"), u64::from(id), &ip(net, id))?;
        let mut text = format!(
            "[node]\nid = {id}\nname = \"zoned-{id}\"\ndata_dir = \"{}\"\nagent_socket = \"\"\nclient_listen = \"{}:7400\"\npeer_listen = \"{}:7401\"\n\n[tls]\ndir = \"{}\"\n",
            d.join("data").display(),
            ip(net, id),
            ip(net, id),
            tls.display()
        );
        for v in 1..=3u8 {
            text.push_str(&format!(
                "\n[[voters]]\nid = {v}\npeer = \"{}:7401\"\n",
                ip(net, v)
            ));
        }
        let config = d.join("node.toml");
        std::fs::write(&config, text)?;
        procs.spawn(
            format!("zoned {id}"),
            Command::new(bin)
                .arg("--config")
                .arg(&config)
                .env("RUST_LOG", "warn"),
            d.join("zoned.log"),
        )?;
        endpoints.push(format!("{}:7400", ip(net, id)));
    }
    let mut z = Zoned { procs, endpoints };
    let leader = z.wait_leader(timeout).await?;
    Ok((z, leader))
}

/// A cluster's leader as the benchmark found it: where its clients go, and
/// the Raft term it leads in (a new term is a new election).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub endpoint: String,
    pub term: u64,
}

impl Zoned {
    /// The leader, once every server follows it and has applied what it
    /// has (give or take one entry), retried for up to `timeout`.
    pub async fn wait_leader(&mut self, timeout: Duration) -> Result<Leader> {
        let endpoints = &self.endpoints;
        self.procs
            .until("zoned leader", timeout, || Self::leader(endpoints))
            .await
    }

    async fn leader(endpoints: &[String]) -> Option<Leader> {
        let mut c = ClusterClient::new(channel(&endpoints[0]).await.ok()?);
        let s = c.status(StatusRequest {}).await.ok()?.into_inner();
        let leader = s.servers.iter().find(|x| x.id == s.leader_id)?;
        let all = s.servers.len() == 3
            && s.servers.iter().all(|x| {
                x.leader_id == s.leader_id && x.applied >= leader.applied.saturating_sub(1)
            });
        (s.leader_id != 0 && all).then(|| Leader {
            endpoint: leader.client_endpoint.clone(),
            term: leader.term,
        })
    }

    /// The term `endpoint` is in now, if it answers.
    pub async fn term(&self, endpoint: &str) -> Option<u64> {
        let mut c = ClusterClient::new(channel(endpoint).await.ok()?);
        Some(c.status(StatusRequest {}).await.ok()?.into_inner().term)
    }
}

/// A channel to a zoned server of the run, with its client credential.
pub async fn channel(endpoint: &str) -> Result<Channel> {
    Ok(zonectl::endpoint(endpoint, Some(&pki().client))?
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await?)
}

/// A plaintext channel (the floor's probe servers).
pub async fn plain_channel(endpoint: &str) -> Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{endpoint}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await?)
}

pub struct Etcd {
    procs: Procs,
    pub endpoints: Vec<String>,
    pub version: String,
}

impl Etcd {
    /// CPU time the three servers have used so far, ms.
    pub fn cpu_ms(&self) -> Result<f64> {
        self.procs.cpu_ms()
    }
}

pub async fn etcd(
    bin: &Path,
    dir: &Path,
    net: [u8; 2],
    timeout: Duration,
) -> Result<(Etcd, Leader)> {
    let version = Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| {
            format!(
                "cannot run {}: install Debian's etcd-server (cargo xtask deps does), or give --etcd",
                bin.display()
            )
        })?;
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or("etcd")
        .to_owned();
    let peer = |id: u8| format!("https://{}:2380", ip(net, 10 + id));
    let initial: Vec<String> = (1..=3u8)
        .map(|id| format!("etcd-{id}={}", peer(id)))
        .collect();
    let mut procs = Procs(Vec::new());
    let mut endpoints = Vec::new();
    for id in 1..=3u8 {
        let d = dir.join(format!("etcd-{id}"));
        std::fs::create_dir_all(&d)?;
        let client = format!("https://{}:2379", ip(net, 10 + id));
        let tls = node_certs(&format!("etcd-{id}"), u64::from(10 + id), &ip(net, 10 + id))?;
        let (ca, cert, key) = (
            tls.join("ca.pem"),
            tls.join("node.pem"),
            tls.join("node.key"),
        );
        procs.spawn(
            format!("etcd {id}"),
            Command::new(bin)
                .arg(format!("--name=etcd-{id}"))
                // TLS on both ports, client certificates required, as
                // zoned's.
                .arg(format!("--cert-file={}", cert.display()))
                .arg(format!("--key-file={}", key.display()))
                .arg(format!("--trusted-ca-file={}", ca.display()))
                .arg("--client-cert-auth")
                .arg(format!("--peer-cert-file={}", cert.display()))
                .arg(format!("--peer-key-file={}", key.display()))
                .arg(format!("--peer-trusted-ca-file={}", ca.display()))
                .arg("--peer-client-cert-auth")
                .arg(format!("--data-dir={}", d.join("data").display()))
                .arg(format!("--listen-client-urls={client}"))
                .arg(format!("--advertise-client-urls={client}"))
                .arg(format!("--listen-peer-urls={}", peer(id)))
                .arg(format!("--initial-advertise-peer-urls={}", peer(id)))
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .arg("--initial-cluster-state=new")
                .arg("--initial-cluster-token=kvbench")
                .arg("--logger=zap")
                .arg("--log-level=warn"),
            d.join("etcd.log"),
        )?;
        endpoints.push(format!("{}:2379", ip(net, 10 + id)));
    }
    let mut e = Etcd {
        procs,
        endpoints,
        version,
    };
    let leader = e.wait_leader(timeout).await?;
    Ok((e, leader))
}

fn etcd_options() -> etcd_client::ConnectOptions {
    etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(2))
        .with_tls(etcd_tls())
}

impl Etcd {
    /// The leader, once every member knows one, retried for up to `timeout`.
    pub async fn wait_leader(&mut self, timeout: Duration) -> Result<Leader> {
        let endpoints = &self.endpoints;
        self.procs
            .until("etcd leader", timeout, || Self::leader(endpoints))
            .await
    }

    async fn leader(endpoints: &[String]) -> Option<Leader> {
        let mut leader = None;
        for ep in endpoints {
            let mut c = etcd_client::Client::connect([ep], Some(etcd_options()))
                .await
                .ok()?;
            let s = c.status().await.ok()?;
            if s.leader() == 0 {
                return None;
            }
            if s.header()?.member_id() == s.leader() {
                leader = Some(Leader {
                    endpoint: ep.clone(),
                    term: s.raft_term(),
                });
            }
        }
        leader
    }

    /// The term `endpoint` is in now, if it answers.
    pub async fn term(&self, endpoint: &str) -> Option<u64> {
        let mut c = etcd_client::Client::connect([endpoint], Some(etcd_options()))
            .await
            .ok()?;
        Some(c.status().await.ok()?.raft_term())
    }
}
