//! Who may speak to this server, and on which port.
//!
//! Both ports speak TLS only, with the zone's certificates (`zone-pki`;
//! `zonectl zone init` makes them; `[tls] dir`):
//! - **the peer port** asks every caller for a certificate of the zone CA
//!   (the handshake refuses any other, before a byte of gRPC is read), and
//!   [`Gate`] lets in only node certificates: `<id>.server.zoned.invalid`.
//!   What a server may then say is checked where it is said
//!   ([`crate::peer`]): it must be a member, and every Raft message it
//!   sends must be from its own id, so that a server cannot speak for
//!   another;
//! - **the client port** lets the health service answer anyone (load
//!   balancers), and every other call needs a user credential whose role
//!   covers the call ([`needs`]); a call outside the role is refused before
//!   its body is read, and changes nothing. A node certificate may only
//!   read the membership there (a joining server asks it). A joining
//!   server's first call, with its token and no certificate
//!   (`zone.v1.Join/Join`), is let in too: the token is its credential.
//!
//! When this server dials a peer it checks that the peer's certificate
//! names the id it dials (rustls' own name check against
//! `<id>.server.zoned.invalid`); when it dials any member (joining), that
//! the certificate is one of the zone's servers ([`zone_pki::ANY_SERVER`]).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::Either;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic::Status;
use zone_pki::{Holder, Role};

use crate::coalesce::Coalesced;

/// A handshake that takes longer is dropped (a slow peer must not hold a
/// connection slot forever).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long this server waits for a peer's side of a handshake. A frozen
/// peer (SIGSTOP, a paused VM) accepts the TCP connection in its kernel but
/// never answers the TLS hello: without this the dial hangs until it thaws
/// (the connect timeout covers TCP alone, and HTTP/2 keepalive starts only
/// after the handshake).
pub const DIAL_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.dir: cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tls.dir: {0}")]
    Certificate(#[from] zone_pki::PkiError),
    #[error("tls.dir: cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tls.dir: {path} is {found}'s certificate, not this server's (node.id = {id}); each server needs the node certificate `zonectl zone init` made for its id")]
    NotMine {
        path: PathBuf,
        found: String,
        id: u64,
    },
}

/// This server's credentials: the zone CA's certificate, its node
/// certificate and key. The node certificate can be replaced while the
/// server runs ([`ZoneTls::renew`]): the listeners present the new one
/// from their next handshake, and new dials to peers use it.
#[derive(Clone)]
pub struct ZoneTls {
    dir: PathBuf,
    ca_pem: String,
    node: Arc<RwLock<NodeCert>>,
    /// What the listeners present, swapped with `node`.
    presented: Arc<Presented>,
    /// The zone CA, able to sign, if `ca.key` is beside (a founder).
    ca: Option<Arc<zone_pki::ZoneCa>>,
}

#[derive(Clone)]
struct NodeCert {
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for ZoneTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZoneTls").finish_non_exhaustive()
    }
}

fn read(path: PathBuf) -> Result<String, TlsError> {
    std::fs::read_to_string(&path).map_err(|source| TlsError::Read { path, source })
}

/// The certificate chain and key the listeners present, for rustls.
#[derive(Debug)]
struct Presented(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Presented {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().expect("not poisoned").clone())
    }
}

/// The node certificate, then the zone CA's (see [`ZoneTls::acceptor`]),
/// with the node key.
fn certified(cert_pem: &str, ca_pem: &str, key_pem: &str) -> Result<CertifiedKey, TlsError> {
    let bad = |why: String| {
        TlsError::Certificate(zone_pki::PkiError::Unreadable {
            what: "the node certificate and key".into(),
            why,
        })
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .chain(CertificateDer::pem_slice_iter(ca_pem.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let key =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| bad(e.to_string()))?;
    let certified = CertifiedKey::new(chain, key);
    certified.keys_match().map_err(|e| bad(e.to_string()))?;
    Ok(certified)
}

/// Checks that `cert_pem` is a node certificate of the zone (`ca_pem`),
/// valid now, naming server `id`.
fn check_node(ca_pem: &str, cert_pem: &str, path: &Path, id: u64) -> Result<(), TlsError> {
    let what = path.display().to_string();
    match zone_pki::verify(ca_pem, cert_pem, &what)? {
        Holder::Server(found) if found == id => Ok(()),
        Holder::Server(found) => Err(TlsError::NotMine {
            path: path.to_owned(),
            found: format!("server {found}"),
            id,
        }),
        Holder::User { name, .. } => Err(TlsError::NotMine {
            path: path.to_owned(),
            found: format!("user {name}"),
            id,
        }),
    }
}

impl ZoneTls {
    /// Reads `ca.pem`, `node.pem` and `node.key` from `dir` and checks that
    /// the node certificate is of this zone, valid now, and names server
    /// `id`: a mistake here is found at start, not at the first handshake.
    /// `ca.key`, if there, must be the zone CA's.
    pub fn load(dir: &Path, id: u64) -> Result<ZoneTls, TlsError> {
        let ca_pem = read(dir.join("ca.pem"))?;
        let cert_path = dir.join("node.pem");
        let cert_pem = read(cert_path.clone())?;
        let key_pem = read(dir.join("node.key"))?;
        check_node(&ca_pem, &cert_pem, &cert_path, id)?;
        let ca = match std::fs::read_to_string(dir.join("ca.key")) {
            Ok(key) => Some(Arc::new(zone_pki::ZoneCa::load(&ca_pem, &key)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(TlsError::Read {
                    path: dir.join("ca.key"),
                    source,
                })
            }
        };
        let presented = Presented(RwLock::new(Arc::new(certified(
            &cert_pem, &ca_pem, &key_pem,
        )?)));
        Ok(ZoneTls {
            dir: dir.to_owned(),
            ca_pem,
            node: Arc::new(RwLock::new(NodeCert { cert_pem, key_pem })),
            presented: Arc::new(presented),
            ca,
        })
    }

    /// The zone CA, if this server holds its key.
    pub fn zone_ca(&self) -> Option<Arc<zone_pki::ZoneCa>> {
        self.ca.clone()
    }

    fn node(&self) -> NodeCert {
        self.node.read().expect("not poisoned").clone()
    }

    /// This server's node key, to have its certificate renewed.
    pub fn node_key_pem(&self) -> String {
        self.node().key_pem
    }

    /// This server's node certificate (PEM).
    pub fn node_cert_pem(&self) -> String {
        self.node().cert_pem
    }

    /// Replaces the node certificate (same key) with `cert_pem`, which must
    /// be of this zone and name server `id`: written to `node.pem`
    /// atomically, presented from the next handshake, used by new dials.
    pub fn renew(&self, id: u64, cert_pem: &str) -> Result<(), TlsError> {
        let path = self.dir.join("node.pem");
        check_node(&self.ca_pem, cert_pem, &path, id)?;
        let key_pem = self.node().key_pem;
        let certified = certified(cert_pem, &self.ca_pem, &key_pem)?;
        zone_files::atomic::write(&path, cert_pem.as_bytes(), 0o644, None)
            .map_err(|source| TlsError::Write { path, source })?;
        *self.presented.0.write().expect("not poisoned") = Arc::new(certified);
        self.node.write().expect("not poisoned").cert_pem = cert_pem.to_owned();
        Ok(())
    }

    fn identity(&self) -> Identity {
        let node = self.node();
        Identity::from_pem(&node.cert_pem, &node.key_pem)
    }

    fn ca(&self) -> Certificate {
        Certificate::from_pem(&self.ca_pem)
    }

    /// The zone CA's fingerprint (`sha256:<hex>`), as join tokens carry it.
    pub fn ca_fingerprint(&self) -> String {
        zone_pki::fingerprint_pem(&self.ca_pem).unwrap_or_default()
    }

    /// When this server's node certificate expires (Unix seconds).
    pub fn cert_expires_unix(&self) -> i64 {
        zone_pki::facts_pem(&self.node().cert_pem).map_or(0, |f| f.not_after_unix)
    }

    /// The listener's side of the handshake. The server presents its node
    /// certificate, then the zone CA's: a client that knows the CA ignores
    /// the second; a joining server, which knows only the CA's fingerprint
    /// from its token, finds the CA there, checks the fingerprint, and
    /// verifies the node certificate with it (`crate::join`). Callers'
    /// certificates are checked against the zone CA: required on the peer
    /// port; optional at the handshake on the client port (health answers
    /// without one), where [`Gate`] requires one of every other call.
    pub fn acceptor(&self, port: Port) -> Result<TlsAcceptor, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let setup = |why: String| {
            TlsError::Certificate(zone_pki::PkiError::Unreadable {
                what: "the zone CA certificate".into(),
                why,
            })
        };
        let mut roots = rustls::RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots
                .add(der.map_err(|e| setup(e.to_string()))?)
                .map_err(|e| setup(e.to_string()))?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        let verifier = match port {
            Port::Client => verifier.allow_unauthenticated(),
            Port::Peer => verifier,
        }
        .build()
        .map_err(|e| setup(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| setup(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.presented.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Dialling server `id`'s peer port: its certificate must name `id`.
    pub fn to_server(&self, id: u64) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca())
            .identity(self.identity())
            .domain_name(format!("{id}{}", zone_pki::SERVER_SUFFIX))
            .timeout(DIAL_HANDSHAKE_TIMEOUT)
    }

    /// Dialling a member whose id is not known (joining): any server of
    /// the zone.
    pub fn to_any_server(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca())
            .identity(self.identity())
            .domain_name(zone_pki::ANY_SERVER)
            .timeout(DIAL_HANDSHAKE_TIMEOUT)
    }
}

/// A connection whose TLS handshake this server's listener completed
/// ([`incoming`]), with the certificates the caller presented.
pub struct TlsIo {
    inner: tokio_rustls::server::TlsStream<Coalesced<TcpStream>>,
    certs: PeerCerts,
}

/// The certificates a caller presented at the handshake (verified against
/// the zone CA by it), in each request's extensions; None: it sent none.
#[derive(Debug, Clone)]
pub struct PeerCerts(pub Option<Arc<Vec<CertificateDer<'static>>>>);

impl std::fmt::Debug for TlsIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIo")
            .field("certs", &self.certs.0.as_ref().map_or(0, |c| c.len()))
            .finish_non_exhaustive()
    }
}

impl Connected for TlsIo {
    type ConnectInfo = PeerCerts;

    fn connect_info(&self) -> PeerCerts {
        self.certs.clone()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The connections `listener` accepts, once `acceptor`'s handshake is done
/// (each in a task of its own, within [`HANDSHAKE_TIMEOUT`]: a slow or
/// silent caller holds up no other). Nagle's algorithm is off and writes
/// are coalesced per scheduler round ([`Coalesced`]): without that a
/// response's last frames waited for the client's delayed ACK, up to 40 ms
/// on Linux (linearizable reads took 44 ms at p50). The stream ends when
/// the server stops taking connections from it.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> impl tokio_stream::Stream<Item = std::io::Result<TlsIo>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors, say: not this loop's
                        // end; a moment for others to close theirs.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(Coalesced::new(tcp)))
                    .await
                {
                    Ok(Ok(tls)) => {
                        let certs =
                            tls.get_ref().1.peer_certificates().map(|c| {
                                Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())
                            });
                        let _ = tx
                            .send(Ok(TlsIo {
                                inner: tls,
                                certs: PeerCerts(certs),
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "TLS handshake refused")
                    }
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Which of this server's ports a [`Gate`] guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Client,
    Peer,
}

/// Who made a call, as [`Gate`] admitted it; in each request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A server of the zone, by the id its certificate names.
    Server(u64),
    User {
        name: String,
        role: Role,
        /// Hex, for revocation.
        serial: String,
    },
    /// No certificate (health only).
    Anonymous,
}

impl Caller {
    /// The server a peer call came from, as [`Gate`] admitted it. Fails
    /// closed: a call that did not pass the gate as a server is refused.
    pub fn server_of<T>(req: &tonic::Request<T>) -> Result<u64, Status> {
        match req.extensions().get::<Caller>() {
            Some(Caller::Server(id)) => Ok(*id),
            _ => Err(Status::unauthenticated(
                "the peer port takes only the zone's servers",
            )),
        }
    }
}

/// What a call on the client port needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Anyone, with or without a certificate.
    Anyone,
    /// A user credential with this role or a higher one.
    Role(Role),
    /// A reader, or a server of the zone (reads the membership to join).
    ReaderOrServer,
}

/// The role each client call needs. A method not listed needs admin:
/// whatever is added to the API is closed until it is placed here (and a
/// test checks that every method named here exists, so that a rename does
/// not quietly close a call to its readers).
pub fn needs(path: &str) -> Need {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Need::Role(Role::Admin);
    };
    use zone_proto::v1::{
        cluster_server, config_server, extensions_server, join_server, kv_server, services_server,
        storage_server, upgrade_server,
    };
    use Role::*;
    const HEALTH: &str = "grpc.health.v1.Health";
    const REFLECTION: &str = "grpc.reflection.v1.ServerReflection";
    const REFLECTION_ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";
    match (service, method) {
        (HEALTH, _) => Need::Anyone,
        (REFLECTION | REFLECTION_ALPHA, _) => Need::Role(Reader),
        (kv_server::SERVICE_NAME, "Get" | "Range" | "Watch") => Need::Role(Reader),
        (kv_server::SERVICE_NAME, "Put" | "Delete" | "Txn" | "Compact") => Need::Role(Operator),
        (cluster_server::SERVICE_NAME, "Members") => Need::ReaderOrServer,
        (cluster_server::SERVICE_NAME, "Status" | "Alarms") => Need::Role(Reader),
        (cluster_server::SERVICE_NAME, "TransferLeader" | "SetMaintenance" | "DisarmAlarm") => {
            Need::Role(Operator)
        }
        (
            cluster_server::SERVICE_NAME,
            "AddServer" | "RemoveServer" | "ResetServer" | "Backup" | "Logs",
        ) => Need::Role(Admin),
        (config_server::SERVICE_NAME, "Get" | "List" | "History" | "ReadLocal") => {
            Need::Role(Reader)
        }
        (config_server::SERVICE_NAME, "Push" | "Delete" | "Rollback") => Need::Role(Operator),
        (storage_server::SERVICE_NAME, "List") => Need::Role(Reader),
        (storage_server::SERVICE_NAME, "Add" | "Remove") => Need::Role(Operator),
        (upgrade_server::SERVICE_NAME, "Status") => Need::Role(Reader),
        (upgrade_server::SERVICE_NAME, "Upload" | "Install") => Need::Role(Admin),
        (extensions_server::SERVICE_NAME, "List") => Need::Role(Reader),
        (extensions_server::SERVICE_NAME, "Add" | "Remove") => Need::Role(Admin),
        (services_server::SERVICE_NAME, "Get") => Need::Role(Reader),
        // Which units run where, as root on every server: an admin's.
        (services_server::SERVICE_NAME, "Set" | "Clear") => Need::Role(Admin),
        // The token is the credential: a joining server has no other yet.
        (join_server::SERVICE_NAME, "Join") => Need::Anyone,
        (join_server::SERVICE_NAME, "IssueToken") => Need::Role(Admin),
        _ => Need::Role(Admin),
    }
}

/// Whether a call on `port` to `path`, with the certificate the handshake
/// verified (`cert`, DER; None: the caller sent none), is let in, and as
/// whom. The refusal names what the call needs.
pub fn admit(port: Port, path: &str, cert: Option<&[u8]>) -> Result<Caller, Status> {
    let call = path.trim_start_matches('/');
    let presented = match cert {
        None => None,
        Some(der) => Some(zone_pki::presented(der).ok_or_else(|| {
            Status::permission_denied(
                "the client certificate names no server and no user of this zone",
            )
        })?),
    };
    match port {
        Port::Peer => match presented {
            Some(zone_pki::Presented {
                holder: Holder::Server(id),
                ..
            }) => Ok(Caller::Server(id)),
            Some(zone_pki::Presented {
                holder: Holder::User { name, .. },
                ..
            }) => Err(Status::permission_denied(format!(
                "the peer port takes only the zone's servers; user {name}'s credential is refused (use the client port)"
            ))),
            // The handshake asks for a certificate on this port.
            None => Err(Status::unauthenticated(
                "the peer port takes only the zone's servers",
            )),
        },
        Port::Client => {
            let need = needs(path);
            match (need, presented) {
                (Need::Anyone, None) => Ok(Caller::Anonymous),
                (_, None) => Err(Status::unauthenticated(format!(
                    "{call} needs a client credential of this zone (zonectl --cert/--key, or `zonectl user issue`); only grpc.health.v1.Health answers without one"
                ))),
                (_, Some(p)) => match (need, p.holder) {
                    (Need::Anyone | Need::ReaderOrServer, Holder::Server(id)) => {
                        Ok(Caller::Server(id))
                    }
                    (_, Holder::Server(id)) => Err(Status::permission_denied(format!(
                        "{call}: server {id}'s node certificate is not a client credential; the client port takes user credentials (`zonectl user issue`)"
                    ))),
                    (need, Holder::User { name, role }) => {
                        let needed = match need {
                            Need::Anyone => Role::Reader,
                            Need::Role(r) => r,
                            Need::ReaderOrServer => Role::Reader,
                        };
                        if role >= needed || need == Need::Anyone {
                            Ok(Caller::User {
                                name,
                                role,
                                serial: p.serial,
                            })
                        } else {
                            Err(Status::permission_denied(format!(
                                "{call} needs the {needed} role; {name} has {role}"
                            )))
                        }
                    }
                },
            }
        }
    }
}

/// A tower layer on a port's server that admits each call ([`admit`])
/// before it reaches the service, and records the [`Caller`] in the
/// request. A refused call gets its status as the whole answer: its body
/// is never decoded.
#[derive(Clone)]
pub struct Gate {
    pub port: Port,
    /// Whether a user credential (by serial) was revoked; asked on every
    /// call a user makes.
    pub revoked: Revoked,
}

/// See [`Gate::revoked`].
pub type Revoked = Arc<dyn Fn(&str) -> bool + Send + Sync>;

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").field("port", &self.port).finish()
    }
}

impl<S> tower::Layer<S> for Gate {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            gate: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Gated<S> {
    inner: S,
    gate: Gate,
}

impl<S, B> tower::Service<http::Request<B>> for Gated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, std::future::Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let certs = req
            .extensions()
            .get::<PeerCerts>()
            .and_then(|p| p.0.clone());
        let cert = certs.as_deref().and_then(|c| c.first()).map(|c| c.as_ref());
        let admitted = admit(self.gate.port, req.uri().path(), cert).and_then(|caller| match &caller {
            Caller::User { name, serial, .. } if (self.gate.revoked)(serial) => {
                Err(Status::permission_denied(format!(
                    "the credential of {name} (serial {serial}) was revoked; ask an admin of the zone for a new one"
                )))
            }
            _ => Ok(caller),
        });
        match admitted {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Either::Left(self.inner.call(req))
            }
            Err(status) => {
                tracing::debug!(
                    path = req.uri().path(),
                    reason = status.message(),
                    "call refused"
                );
                Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use zone_pki::ZoneCa;

    fn der(pem: &str) -> Vec<u8> {
        rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn each_role_reaches_its_calls_and_no_further() {
        let ca = ZoneCa::generate().unwrap();
        let reader = der(&ca.issue_client("rita", Role::Reader).unwrap().cert_pem);
        let operator = der(&ca.issue_client("otto", Role::Operator).unwrap().cert_pem);
        let admin = der(&ca.issue_client("ada", Role::Admin).unwrap().cert_pem);
        let ok = |path: &str, cert: &[u8]| admit(Port::Client, path, Some(cert)).is_ok();
        assert!(ok("/zone.v1.KV/Get", &reader));
        assert!(ok("/zone.v1.KV/Watch", &reader));
        assert!(!ok("/zone.v1.KV/Put", &reader));
        assert!(!ok("/zone.v1.Config/Push", &reader));
        assert!(ok("/zone.v1.KV/Put", &operator));
        assert!(ok("/zone.v1.Config/Rollback", &operator));
        assert!(!ok("/zone.v1.Cluster/AddServer", &operator));
        assert!(ok("/zone.v1.Cluster/AddServer", &admin));
        // Whatever is not listed needs admin.
        assert!(!ok("/zone.v1.Users/Issue", &operator));
        assert!(ok("/zone.v1.Users/Issue", &admin));
        let e = admit(Port::Client, "/zone.v1.KV/Put", Some(&reader)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            e.message(),
            "zone.v1.KV/Put needs the operator role; rita has reader"
        );
    }

    #[test]
    fn every_method_the_table_opens_exists() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(zone_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods = Vec::new();
        for file in &set.file {
            for service in &file.service {
                let name = format!("{}.{}", file.package(), service.name());
                for m in &service.method {
                    methods.push(format!("/{name}/{}", m.name()));
                }
            }
        }
        use Role::{Admin, Operator, Reader};
        // What each client call needs, written out: a change to `needs`
        // that moves a call to another role fails here.
        let table: [(&str, &str, Need); 42] = [
            ("zone.v1.KV", "Get", Need::Role(Reader)),
            ("zone.v1.KV", "Range", Need::Role(Reader)),
            ("zone.v1.KV", "Watch", Need::Role(Reader)),
            ("zone.v1.KV", "Put", Need::Role(Operator)),
            ("zone.v1.KV", "Delete", Need::Role(Operator)),
            ("zone.v1.KV", "Txn", Need::Role(Operator)),
            ("zone.v1.KV", "Compact", Need::Role(Operator)),
            ("zone.v1.Cluster", "Members", Need::ReaderOrServer),
            ("zone.v1.Cluster", "Status", Need::Role(Reader)),
            ("zone.v1.Cluster", "TransferLeader", Need::Role(Operator)),
            ("zone.v1.Cluster", "SetMaintenance", Need::Role(Operator)),
            ("zone.v1.Cluster", "Alarms", Need::Role(Reader)),
            ("zone.v1.Cluster", "DisarmAlarm", Need::Role(Operator)),
            ("zone.v1.Cluster", "AddServer", Need::Role(Admin)),
            ("zone.v1.Cluster", "RemoveServer", Need::Role(Admin)),
            ("zone.v1.Cluster", "ResetServer", Need::Role(Admin)),
            ("zone.v1.Cluster", "Backup", Need::Role(Admin)),
            ("zone.v1.Cluster", "Logs", Need::Role(Admin)),
            ("zone.v1.Config", "Get", Need::Role(Reader)),
            ("zone.v1.Config", "List", Need::Role(Reader)),
            ("zone.v1.Config", "History", Need::Role(Reader)),
            ("zone.v1.Config", "ReadLocal", Need::Role(Reader)),
            ("zone.v1.Config", "Push", Need::Role(Operator)),
            ("zone.v1.Config", "Delete", Need::Role(Operator)),
            ("zone.v1.Config", "Rollback", Need::Role(Operator)),
            ("zone.v1.Users", "Issue", Need::Role(Admin)),
            ("zone.v1.Users", "Revoke", Need::Role(Admin)),
            ("zone.v1.Users", "List", Need::Role(Admin)),
            ("zone.v1.Join", "Join", Need::Anyone),
            ("zone.v1.Join", "IssueToken", Need::Role(Admin)),
            ("zone.v1.Storage", "List", Need::Role(Reader)),
            ("zone.v1.Storage", "Add", Need::Role(Operator)),
            ("zone.v1.Storage", "Remove", Need::Role(Operator)),
            ("zone.v1.Upgrade", "Status", Need::Role(Reader)),
            ("zone.v1.Upgrade", "Upload", Need::Role(Admin)),
            ("zone.v1.Upgrade", "Install", Need::Role(Admin)),
            ("zone.v1.Extensions", "List", Need::Role(Reader)),
            ("zone.v1.Extensions", "Add", Need::Role(Admin)),
            ("zone.v1.Extensions", "Remove", Need::Role(Admin)),
            ("zone.v1.Services", "Get", Need::Role(Reader)),
            ("zone.v1.Services", "Set", Need::Role(Admin)),
            ("zone.v1.Services", "Clear", Need::Role(Admin)),
        ];
        for (service, m, need) in table {
            let path = format!("/{service}/{m}");
            assert!(
                methods.contains(&path),
                "{path} is in the table but not in the API"
            );
            assert_eq!(needs(&path), need, "{path}");
        }
        // Every client method of the API is in the table above.
        for m in &methods {
            if m.starts_with("/zone.v1.Peer/") || m.starts_with("/zone.v1.Agent/") {
                continue;
            }
            let (service, name) = m[1..].split_once('/').unwrap();
            assert!(
                table.iter().any(|(s, n, _)| *s == service && *n == name),
                "{m} is not in this test's table: place it in `needs`"
            );
        }
        assert_eq!(needs("/grpc.health.v1.Health/Check"), Need::Anyone);
        // Paths that are not exactly a method's fall to admin.
        assert_eq!(needs("/zone.v1.KV/Get/x"), Need::Role(Admin));
        assert_eq!(needs("/zone.v1.kv/Get"), Need::Role(Admin));
    }

    #[test]
    fn health_alone_answers_without_a_certificate() {
        assert_eq!(
            admit(Port::Client, "/grpc.health.v1.Health/Check", None).unwrap(),
            Caller::Anonymous
        );
        let e = admit(Port::Client, "/zone.v1.KV/Get", None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = admit(Port::Peer, "/zone.v1.Peer/Raft", None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn servers_and_users_stay_on_their_own_ports() {
        let ca = ZoneCa::generate().unwrap();
        let node = der(&ca.issue_node(2, &[]).unwrap().cert_pem);
        let admin = der(&ca.issue_client("ada", Role::Admin).unwrap().cert_pem);
        assert_eq!(
            admit(Port::Peer, "/zone.v1.Peer/Raft", Some(&node)).unwrap(),
            Caller::Server(2)
        );
        let e = admit(Port::Peer, "/zone.v1.Peer/Removed", Some(&admin)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let e = admit(Port::Client, "/zone.v1.KV/Put", Some(&node)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("server 2's node certificate"),
            "{}",
            e.message()
        );
        // A joining server reads the membership.
        assert_eq!(
            admit(Port::Client, "/zone.v1.Cluster/Members", Some(&node)).unwrap(),
            Caller::Server(2)
        );
    }
}
