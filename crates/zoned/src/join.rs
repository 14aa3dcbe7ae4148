//! A new server joining with a token (`node.join_token`, `--join-token`):
//! it has no certificate yet, only the token `zonectl server add` printed,
//! which names the zone CA by its SHA-256 fingerprint.
//!
//! 1. It makes its key (`node.key`, written first: a retry after a lost
//!    answer sends the same key, which the zone signs again).
//! 2. It dials the member named by `node.join` on its client port. The
//!    member presents its node certificate and the zone CA's
//!    ([`crate::tls::ZoneTls`]); the handshake is accepted only if one of
//!    the presented certificates has the token's fingerprint and the
//!    member's certificate verifies against it as a server of the zone
//!    ([`ByFingerprint`]). A member of another zone, or a machine in the
//!    middle, fails here, before the token is sent.
//! 3. It sends the token, its public key and its signature (`zone.v1.Join`,
//!    [`crate::api::join`]), and checks the answer: the CA's certificate
//!    has the fingerprint, the node certificate names this server, is
//!    signed by that CA and carries this server's key.
//! 4. It writes `ca.pem`, then `node.pem` (atomically; `node.pem` last, so
//!    that a crash leaves a directory without it, which joins again).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::transport::{Channel, Endpoint};
use zone_pki::{Holder, JoinKey, JoinToken};
use zone_proto::v1::{join_client::JoinClient, JoinRequest, Member};

/// How long the whole join may take (dial, handshake, the member's check
/// and write).
const JOIN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("node.join_token: {0}")]
    BadToken(String),
    #[error("tls.dir: cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tls.dir: {path}: {why}")]
    BadKey { path: PathBuf, why: String },
    #[error("node.join: cannot reach {addr} to join the zone: {reason}")]
    Dial { addr: String, reason: String },
    #[error("tls.dir: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node.join_token: the zone at {addr} refused it: {reason}")]
    Refused { addr: String, reason: String },
    #[error(
        "node.join: {addr} could not answer the join now (tried again at the next start): {reason}"
    )]
    Failed { addr: String, reason: String },
    #[error("node.join: the answer of {addr} is not a certificate for this server: {reason}")]
    BadAnswer { addr: String, reason: String },
}

/// Accepts a server's certificate if it verifies, as a server of the zone
/// ([`zone_pki::ANY_SERVER`]), against the presented certificate whose
/// SHA-256 is the token's: the zone CA, known by its fingerprint alone.
#[derive(Debug)]
pub struct ByFingerprint {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl JoinError {
    /// Whether trying again as it is cannot help (a refused token stays
    /// refused): systemd should not restart the server for it.
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            JoinError::Dial { .. }
                | JoinError::Write { .. }
                | JoinError::Read { .. }
                | JoinError::Failed { .. }
        )
    }
}

impl ByFingerprint {
    pub fn new(fingerprint: &str) -> ByFingerprint {
        ByFingerprint {
            fingerprint: fingerprint.to_owned(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }
}

impl ServerCertVerifier for ByFingerprint {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| zone_pki::fingerprint_der(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the server did not present the zone CA the token names ({}): it is of another zone, or the token is",
                    self.fingerprint
                ))
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A channel to the member at `addr` (`host:port`, its client port),
/// without a client certificate, verified by the zone CA's fingerprint
/// ([`ByFingerprint`]).
pub async fn dial(addr: &str, fingerprint: &str) -> Result<Channel, String> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(ByFingerprint::new(fingerprint)))
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(zone_pki::ANY_SERVER)
        .map_err(|e| e.to_string())?
        .to_owned();
    let target = addr.to_owned();
    let connect = tower::service_fn(move |_: http::Uri| {
        let (connector, name, target) = (connector.clone(), name.clone(), target.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio::time::timeout(
                crate::tls::DIAL_HANDSHAKE_TIMEOUT,
                connector.connect(name, tcp),
            )
            .await
            .map_err(|_| std::io::Error::other("no TLS handshake within 3 s"))??;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    // The scheme is http: TLS is the connector's above, not tonic's.
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(3))
        .connect_with_connector(connect)
        .await
        .map_err(|e| crate::logging::chain(&e))
}

/// What a failed Join call means for the joiner: refused for good (the
/// token, or a `join` that names a member that cannot sign: asking again
/// cannot help), or failed for now (an election, a restart, a timeout:
/// asked again at the next start, and the token, if it was spent on the
/// way, admits the same key again).
fn refusal(addr: &str, s: &tonic::Status) -> JoinError {
    let addr = addr.to_owned();
    let reason = s.message().to_owned();
    match s.code() {
        tonic::Code::PermissionDenied => JoinError::Refused { addr, reason },
        tonic::Code::FailedPrecondition if reason.contains(FINAL_PRECONDITION) => {
            JoinError::Refused { addr, reason }
        }
        _ => JoinError::Failed { addr, reason },
    }
}

/// What the member says when it cannot sign a joiner's certificate at all
/// (`crate::api::join`).
pub const FINAL_PRECONDITION: &str = "cannot sign a joining server's certificate";

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> Result<(), JoinError> {
    let path = dir.join(name);
    zone_files::atomic::write(&path, text.as_bytes(), mode, None)
        .map_err(|source| JoinError::Write { path, source })
}

/// This server's key in `dir`, made (and written) if there is none yet.
fn key_in(dir: &Path) -> Result<JoinKey, JoinError> {
    let path = dir.join("node.key");
    match std::fs::read_to_string(&path) {
        Ok(pem) => JoinKey::from_pem(&pem).map_err(|e| JoinError::BadKey {
            path,
            why: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = JoinKey::generate().map_err(|e| JoinError::BadKey {
                path: path.clone(),
                why: e.to_string(),
            })?;
            write(dir, "node.key", &key.key_pem(), 0o600)?;
            Ok(key)
        }
        Err(source) => Err(JoinError::Read { path, source }),
    }
}

/// Joins through the member at `addr` with `token`, as server `id`, and
/// writes this server's credentials into `dir` (see the module). Answers
/// the membership the member sent.
pub async fn redeem(
    dir: &Path,
    id: u64,
    addr: &str,
    token: &JoinToken,
) -> Result<Vec<Member>, JoinError> {
    std::fs::create_dir_all(dir).map_err(|source| JoinError::Write {
        path: dir.to_owned(),
        source,
    })?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| JoinError::Write {
                path: dir.to_owned(),
                source,
            },
        )?;
    }
    let key = key_in(dir)?;
    let proof = key.prove(token).map_err(|e| JoinError::BadKey {
        path: dir.join("node.key"),
        why: e.to_string(),
    })?;
    tracing::info!(via = addr, ca = %token.ca_fingerprint, "joining the zone with a token");
    let channel = dial(addr, &token.ca_fingerprint)
        .await
        .map_err(|reason| JoinError::Dial {
            addr: addr.to_owned(),
            reason,
        })?;
    let mut req = tonic::Request::new(JoinRequest {
        token: token.to_string(),
        id,
        public_key: key.public_key(),
        proof,
    });
    req.set_timeout(JOIN_TIMEOUT);
    let answer = tokio::time::timeout(JOIN_TIMEOUT, JoinClient::new(channel).join(req))
        .await
        .map_err(|_| JoinError::Failed {
            addr: addr.to_owned(),
            reason: format!("no answer within {} s", JOIN_TIMEOUT.as_secs()),
        })?
        .map_err(|s| refusal(addr, &s))?
        .into_inner();
    let bad = |reason: String| JoinError::BadAnswer {
        addr: addr.to_owned(),
        reason,
    };
    if zone_pki::fingerprint_pem(&answer.ca_pem).as_deref() != Some(&token.ca_fingerprint) {
        return Err(bad(
            "its CA certificate is not the one the token names".into()
        ));
    }
    match zone_pki::verify(&answer.ca_pem, &answer.cert_pem, "the node certificate") {
        Ok(Holder::Server(got)) if got == id => {}
        Ok(other) => return Err(bad(format!("it names {other:?}, not server {id}"))),
        Err(e) => return Err(bad(e.to_string())),
    }
    if zone_pki::facts_pem(&answer.cert_pem).map(|f| f.public_key) != Some(key.public_key()) {
        return Err(bad("it does not carry this server's key".into()));
    }
    write(dir, "ca.pem", &answer.ca_pem, 0o644)?;
    write(dir, "node.pem", &answer.cert_pem, 0o644)?;
    tracing::info!(
        via = addr,
        signed_by = answer.signed_by,
        dir = %dir.display(),
        "joined: this server's node certificate is written"
    );
    Ok(answer.members)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused token stops the joiner for good (exit 2: systemd does
    /// not restart it); anything that may pass is tried again.
    #[test]
    fn only_a_refusal_that_cannot_pass_is_final() {
        use tonic::{Code, Status};
        let fin = |s: Status| refusal("m:7400", &s).is_final();
        assert!(fin(Status::permission_denied("used token: ...")));
        assert!(fin(Status::failed_precondition(format!(
            "server 2 does not hold the zone CA's key and {FINAL_PRECONDITION}"
        ))));
        for passing in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::Internal,
        ] {
            assert!(!fin(Status::new(passing, "x")), "{passing:?}");
        }
        // The zone disabled for maintenance: it will be enabled again.
        assert!(!fin(Status::failed_precondition("the zone is disabled")));
    }
}
