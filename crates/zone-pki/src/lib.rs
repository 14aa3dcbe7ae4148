//! The zone's certificates: one zone CA, node certificates that name their
//! server, and client credentials that carry a role.
//!
//! - **The zone CA**: ECDSA P-256, valid 10 years, path length 0 (it signs
//!   only end certificates). Its SHA-256 fingerprint names the zone to a
//!   joiner, as kubeadm's discovery hash does.
//! - **Node certificates**: the server's Raft id as a DNS name,
//!   `<id>.server.zoned.invalid`, so that a peer can check that the sender
//!   of a Raft message is the server it claims to be (with rustls' own
//!   name check); its addresses as IP names; both server and client
//!   authentication (servers dial each other); valid 1 year.
//! - **Client credentials**: `<name>.user.zoned.invalid` and
//!   `<role>.role.zoned.invalid` (admin, operator, reader); client
//!   authentication only; valid 1 year.
//!
//! The names end in `.invalid` (RFC 6761): no DNS name of the real world
//! can be mistaken for them. Serial numbers are 16 random bytes. Private
//! keys are PKCS#8 PEM; whoever writes them to disk makes them readable by
//! their owner alone.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use time::{Duration, OffsetDateTime};

mod join;
pub use join::{check_proof, sha256, JoinKey, JoinToken, TOKEN_PREFIX};

/// Name suffixes in the zone's certificates.
pub const SERVER_SUFFIX: &str = ".server.zoned.invalid";
pub const USER_SUFFIX: &str = ".user.zoned.invalid";
pub const ROLE_SUFFIX: &str = ".role.zoned.invalid";
/// A name every node certificate carries besides its own: what a client
/// checks when any server of the zone will do (zonectl, a joiner), as the
/// zone's CA is the zone's alone. It does not end in [`SERVER_SUFFIX`], so
/// it names no server.
pub const ANY_SERVER: &str = "server.zoned.invalid";
/// The zone CA's common name.
const CA_NAME: &str = "Zoned zone CA";

/// How long the zone CA is valid.
pub const CA_VALIDITY: Duration = Duration::days(3650);
/// How long node certificates and client credentials are valid.
pub const LEAF_VALIDITY: Duration = Duration::days(365);
/// Certificates are valid from this long before they were made, for
/// servers whose clocks are a little behind.
const BACKDATE: Duration = Duration::hours(1);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{what} is not a PEM certificate this zone can read: {why}")]
    Unreadable { what: String, why: String },
    #[error("{0} was not signed by this zone's CA")]
    NotSigned(String),
    #[error("{0} is not valid now (expired, or not yet valid)")]
    Expired(String),
    #[error("the zone CA's key does not belong to its certificate")]
    KeyMismatch,
    #[error("{0} names no server and no user of a zone")]
    NoHolder(String),
    #[error("no randomness from the system")]
    Random,
    #[error("user name {0:?}: use 1 to 63 lowercase letters, digits or '-', not at either end")]
    BadName(String),
}

/// What a client credential may do (see the client port's roles).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Reader,
    Operator,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::Operator, Role::Reader];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Reader => "reader",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a role: admin, operator or reader"))
    }
}

/// A certificate and its private key, PEM, with its serial (hex) and
/// the end of its validity (Unix seconds).
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub cert_pem: String,
    pub key_pem: String,
    pub serial: String,
    pub not_after_unix: i64,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("cert_pem", &self.cert_pem)
            .field("serial", &self.serial)
            .field("not_after_unix", &self.not_after_unix)
            .field("key_pem", &"<private>")
            .finish()
    }
}

/// Whom a certificate of the zone names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Server(u64),
    User { name: String, role: Role },
}

/// The zone CA, able to sign.
pub struct ZoneCa {
    cert_pem: String,
    cert_der: Vec<u8>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for ZoneCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZoneCa")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    // Positive, as DER integers for serials must be.
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn params(cn: &str, validity: Duration) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - BACKDATE;
    p.not_after = now + validity;
    p.serial_number = Some(random_serial()?);
    Ok(p)
}

fn dns(s: String) -> Result<SanType, PkiError> {
    Ok(SanType::DnsName(s.try_into()?))
}

/// The zone CA's parameters, all but its validity and serial: the same
/// whenever the CA signs, as the certificates it signs name it.
fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut p = params(CA_NAME, CA_VALIDITY)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

/// The SHA-256 fingerprint of a DER certificate, `sha256:<hex>`.
pub fn fingerprint_der(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The SHA-256 fingerprint of the first certificate in a PEM text.
pub fn fingerprint_pem(pem: &str) -> Option<String> {
    der_of("a certificate", pem)
        .ok()
        .map(|d| fingerprint_der(d.as_ref()))
}

pub(crate) fn der_of(what: &str, pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Unreadable {
        what: what.into(),
        why: e.to_string(),
    })
}

impl ZoneCa {
    /// A new zone CA with a fresh key.
    pub fn generate() -> Result<ZoneCa, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let p = ca_params()?;
        let cert = p.self_signed(&key)?;
        Ok(ZoneCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(p, key),
        })
    }

    /// The zone CA from its certificate and key (PEM). A certificate is
    /// signed with it and checked against the CA's certificate, so that a
    /// key of another zone is refused here, not at the first handshake.
    /// `cert_pem` may hold more CA certificates after the first (while the
    /// zone CA is replaced): the key must be the first's, which is the
    /// zone CA's fingerprint; the whole bundle is what clients are given.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<ZoneCa, PkiError> {
        let first = der_of("the zone CA certificate", cert_pem)?;
        let cert_der = first.to_vec();
        let key = KeyPair::from_pem(key_pem)?;
        let ca = ZoneCa {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            key_pem: key_pem.to_owned(),
            issuer: Issuer::new(ca_params()?, key),
        };
        let probe = ca.issue_client("probe", Role::Reader)?;
        match verify_with(&[first], &probe.cert_pem, "a probe") {
            Ok(_) => Ok(ca),
            Err(PkiError::NotSigned(_)) => Err(PkiError::KeyMismatch),
            Err(e) => Err(e),
        }
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The CA certificate's SHA-256 fingerprint: what a joiner checks.
    pub fn fingerprint(&self) -> String {
        fingerprint_der(&self.cert_der)
    }

    fn sign(&self, p: &CertificateParams) -> Result<Credential, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut cred = self.sign_for(p, &key)?;
        cred.key_pem = key.serialize_pem();
        Ok(cred)
    }

    /// Signs a certificate for a public key whose private key is
    /// elsewhere: the credential's `key_pem` is empty.
    fn sign_for(
        &self,
        p: &CertificateParams,
        key: &impl rcgen::PublicKeyData,
    ) -> Result<Credential, PkiError> {
        let cert = p.signed_by(key, &self.issuer)?;
        let serial = p
            .serial_number
            .as_ref()
            .map(|s| s.as_ref().iter().map(|b| format!("{b:02x}")).collect())
            .unwrap_or_default();
        Ok(Credential {
            cert_pem: cert.pem(),
            key_pem: String::new(),
            serial,
            not_after_unix: p.not_after.unix_timestamp(),
        })
    }

    /// A node certificate for server `id`, reachable at `addresses`.
    pub fn issue_node(&self, id: u64, addresses: &[IpAddr]) -> Result<Credential, PkiError> {
        self.sign(&node_params(id, addresses)?)
    }

    /// A node certificate for server `id` valid from `not_before` to
    /// `not_after` (tests of expiry and renewal; servers are given
    /// [`LEAF_VALIDITY`]).
    pub fn issue_node_between(
        &self,
        id: u64,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Credential, PkiError> {
        let mut p = node_params(id, &[])?;
        p.not_before = not_before;
        p.not_after = not_after;
        self.sign(&p)
    }

    /// A node certificate for server `id` and the P-256 public key
    /// (uncompressed SEC1 point) that server made and keeps ([`JoinKey`]):
    /// what a joining or renewing server gets. The key must have been
    /// checked ([`check_proof`]).
    pub fn issue_node_for(
        &self,
        id: u64,
        addresses: &[IpAddr],
        public_key: &[u8],
    ) -> Result<Credential, PkiError> {
        self.sign_for(&node_params(id, addresses)?, &join::P256Public(public_key))
    }

    /// A client credential for `name` with `role`.
    pub fn issue_client(&self, name: &str, role: Role) -> Result<Credential, PkiError> {
        // One DNS label.
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        if name.is_empty()
            || name.len() > 63
            || !name.chars().all(ok)
            || name.starts_with('-')
            || name.ends_with('-')
        {
            return Err(PkiError::BadName(name.into()));
        }
        let mut p = params(&format!("{name} ({role})"), LEAF_VALIDITY)?;
        p.subject_alt_names = vec![
            dns(format!("{name}{USER_SUFFIX}"))?,
            dns(format!("{role}{ROLE_SUFFIX}"))?,
        ];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        self.sign(&p)
    }
}

/// A node certificate's parameters.
fn node_params(id: u64, addresses: &[IpAddr]) -> Result<CertificateParams, PkiError> {
    let mut p = params(&format!("zoned server {id}"), LEAF_VALIDITY)?;
    p.subject_alt_names = vec![
        dns(format!("{id}{SERVER_SUFFIX}"))?,
        dns(ANY_SERVER.to_owned())?,
    ];
    p.subject_alt_names
        .extend(addresses.iter().map(|a| SanType::IpAddress(*a)));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// Checks that `cert_pem` was signed by the zone CA `ca_pem`, is valid
/// now and for client authentication (every certificate of the zone is),
/// and says whom it names. The same verifier as rustls' handshakes; this is
/// for tools and tests that look at a credential on disk.
///
/// `ca_pem` may hold more than one CA certificate (while the zone CA is
/// replaced, README: rotating the zone CA): any of them will do.
pub fn verify(ca_pem: &str, cert_pem: &str, what: &str) -> Result<Holder, PkiError> {
    let ca_ders: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| PkiError::Unreadable {
            what: "the zone CA certificate".into(),
            why: e.to_string(),
        })?;
    if ca_ders.is_empty() {
        der_of("the zone CA certificate", ca_pem)?;
    }
    verify_with(&ca_ders, cert_pem, what)
}

/// [`verify`] against these CA certificates (DER).
fn verify_with(
    ca_ders: &[CertificateDer<'static>],
    cert_pem: &str,
    what: &str,
) -> Result<Holder, PkiError> {
    let der = der_of(what, cert_pem)?;
    let unreadable = |why: String| PkiError::Unreadable {
        what: what.into(),
        why,
    };
    let anchors = ca_ders
        .iter()
        .map(|d| webpki::anchor_from_trusted_cert(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(format!("the CA: {e}")))?;
    let cert = webpki::EndEntityCert::try_from(&der).map_err(|e| unreadable(e.to_string()))?;
    let checked = cert.verify_for_usage(
        &[webpki::ring::ECDSA_P256_SHA256],
        &anchors,
        &[],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    );
    match checked {
        Ok(_) => {}
        Err(webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. }) => {
            return Err(PkiError::Expired(what.into()))
        }
        Err(webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey) => {
            return Err(PkiError::NotSigned(what.into()))
        }
        Err(e) => return Err(unreadable(e.to_string())),
    }
    holder_of(cert.valid_dns_names()).ok_or_else(|| PkiError::NoHolder(what.into()))
}

/// A certificate as a TLS handshake presented it (already checked
/// against the zone CA by the handshake): whom it names, its serial
/// (hex, for revocation) and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    pub holder: Holder,
    pub serial: String,
}

/// Reads a certificate that a handshake verified. None if it names no
/// holder (the zone's CA signs no such certificate).
pub fn presented(der: &[u8]) -> Option<Presented> {
    let der = CertificateDer::from(der);
    let cert = webpki::EndEntityCert::try_from(&der).ok()?;
    let serial = cert.serial().iter().map(|b| format!("{b:02x}")).collect();
    let holder = holder_of(cert.valid_dns_names())?;
    Some(Presented { holder, serial })
}

/// The fields of a certificate that rustls' verifier does not expose:
/// when it expires, and the public key it certifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// Its validity (Unix seconds).
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    /// The subject's public key (for P-256, the uncompressed SEC1 point).
    pub public_key: Vec<u8>,
}

/// Reads [`Facts`] from a DER certificate (RFC 5280 section 4.1, read with
/// yasna, the DER crate rcgen writes with). None if it is not one.
pub fn facts(der: &[u8]) -> Option<Facts> {
    use yasna::tags::{TAG_GENERALIZEDTIME, TAG_UTCTIME};
    use yasna::{BERReader, Tag};
    fn time(r: BERReader) -> yasna::ASN1Result<i64> {
        let tag = r.lookahead_tag()?;
        if tag == TAG_UTCTIME {
            Ok(r.read_utctime()?.datetime().unix_timestamp())
        } else if tag == TAG_GENERALIZEDTIME {
            Ok(r.read_generalized_time()?.datetime().unix_timestamp())
        } else {
            Err(yasna::ASN1Error::new(yasna::ASN1ErrorKind::Invalid))
        }
    }
    yasna::parse_der(der, |r| {
        r.read_sequence(|r| {
            let facts = r.next().read_sequence(|r| {
                // version [0] EXPLICIT, serial, signature algorithm, issuer
                r.read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_u8()))?;
                r.next().read_der()?;
                r.next().read_der()?;
                r.next().read_der()?;
                let (not_before, not_after) = r
                    .next()
                    .read_sequence(|r| Ok((time(r.next())?, time(r.next())?)))?;
                r.next().read_der()?; // subject
                let public_key = r.next().read_sequence(|r| {
                    r.next().read_der()?;
                    Ok(r.next().read_bitvec_bytes()?.0)
                })?;
                // Unique ids and extensions.
                while r.read_optional(|r| r.read_der())?.is_some() {}
                Ok(Facts {
                    not_before_unix: not_before,
                    not_after_unix: not_after,
                    public_key,
                })
            })?;
            r.next().read_der()?; // signature algorithm
            r.next().read_bitvec_bytes()?; // signature
            Ok(facts)
        })
    })
    .ok()
}

/// [`facts`] of the first certificate in a PEM text.
pub fn facts_pem(pem: &str) -> Option<Facts> {
    facts(der_of("a certificate", pem).ok()?.as_ref())
}

/// A moment for people: `2026-12-05 21:47:06 UTC`.
pub fn utc(unix: i64) -> String {
    match OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{} {:02}:{:02}:{:02} UTC",
            t.date(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{unix} (Unix time)"),
    }
}

/// Whom the DNS names of a certificate of the zone name.
pub fn holder_of<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<Holder> {
    let names: Vec<&str> = names.into_iter().collect();
    let before = |suffix: &str| names.iter().find_map(|n| n.strip_suffix(suffix));
    if let Some(id) = before(SERVER_SUFFIX) {
        return id.parse().ok().map(Holder::Server);
    }
    let name = before(USER_SUFFIX)?;
    let role = before(ROLE_SUFFIX)?.parse().ok()?;
    Some(Holder::User {
        name: name.to_owned(),
        role,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_names_its_server_and_verifies_against_its_zone_only() {
        let ca = ZoneCa::generate().unwrap();
        let node = ca
            .issue_node(
                3,
                &["10.0.0.3".parse().unwrap(), "fd00::3".parse().unwrap()],
            )
            .unwrap();
        assert_eq!(
            verify(ca.cert_pem(), &node.cert_pem, "node").unwrap(),
            Holder::Server(3)
        );
        let other = ZoneCa::generate().unwrap();
        assert!(matches!(
            verify(other.cert_pem(), &node.cert_pem, "node"),
            Err(PkiError::NotSigned(_))
        ));
        assert_ne!(ca.fingerprint(), other.fingerprint());
        assert!(ca.fingerprint().starts_with("sha256:") && ca.fingerprint().len() == 7 + 64);
    }

    #[test]
    fn a_client_credential_carries_its_role() {
        let ca = ZoneCa::generate().unwrap();
        for role in Role::ALL {
            let c = ca.issue_client("alice", role).unwrap();
            assert_eq!(
                verify(ca.cert_pem(), &c.cert_pem, "alice").unwrap(),
                Holder::User {
                    name: "alice".into(),
                    role
                }
            );
        }
        for bad in ["", "a b", "../x", "Alice", "a.b", "-a", &"x".repeat(64)] {
            assert!(matches!(
                ca.issue_client(bad, Role::Reader),
                Err(PkiError::BadName(_))
            ));
        }
    }

    #[test]
    fn a_loaded_ca_signs_as_the_generated_one() {
        let ca = ZoneCa::generate().unwrap();
        let again = ZoneCa::load(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
        let c = again.issue_client("bob", Role::Operator).unwrap();
        assert!(verify(ca.cert_pem(), &c.cert_pem, "bob").is_ok());
        assert!(matches!(
            ZoneCa::load("not a certificate", ca.key_pem()),
            Err(PkiError::Unreadable { .. })
        ));
        let other = ZoneCa::generate().unwrap();
        assert!(matches!(
            ZoneCa::load(ca.cert_pem(), other.key_pem()),
            Err(PkiError::KeyMismatch)
        ));
    }

    #[test]
    fn an_expired_credential_is_told_apart() {
        let ca = ZoneCa::generate().unwrap();
        let mut p = params("old (reader)", LEAF_VALIDITY).unwrap();
        p.not_before = OffsetDateTime::now_utc() - Duration::days(400);
        p.not_after = OffsetDateTime::now_utc() - Duration::days(35);
        p.subject_alt_names = vec![
            dns(format!("old{USER_SUFFIX}")).unwrap(),
            dns(format!("reader{ROLE_SUFFIX}")).unwrap(),
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let old = ca.sign(&p).unwrap();
        let err = verify(ca.cert_pem(), &old.cert_pem, "old's credential").unwrap_err();
        assert!(matches!(err, PkiError::Expired(_)), "{err}");
        assert_eq!(
            err.to_string(),
            "old's credential is not valid now (expired, or not yet valid)"
        );
    }

    #[test]
    fn facts_read_the_expiry_and_key_the_certificate_was_made_with() {
        let ca = ZoneCa::generate().unwrap();
        let node = ca.issue_node(2, &["10.0.0.2".parse().unwrap()]).unwrap();
        let f = facts_pem(&node.cert_pem).unwrap();
        assert_eq!(f.not_after_unix, node.not_after_unix);
        assert_eq!(
            f.not_after_unix - f.not_before_unix,
            (LEAF_VALIDITY + BACKDATE).whole_seconds()
        );
        let key = KeyPair::from_pem(&node.key_pem).unwrap();
        assert_eq!(f.public_key, key.public_key_raw());
        // The CA's own (no extensions of a leaf; ten years).
        let ca_facts = facts_pem(ca.cert_pem()).unwrap();
        let ten_years = OffsetDateTime::now_utc() + CA_VALIDITY;
        assert!((ca_facts.not_after_unix - ten_years.unix_timestamp()).abs() < 60);
        assert_eq!(facts(b"not a certificate"), None);
        let mut der = der_of("n", &node.cert_pem).unwrap().to_vec();
        der.truncate(der.len() - 10);
        assert_eq!(facts(&der), None);
    }

    #[test]
    fn while_the_ca_is_replaced_either_ca_of_the_bundle_verifies() {
        let old = ZoneCa::generate().unwrap();
        let new = ZoneCa::generate().unwrap();
        let bundle = format!("{}{}", old.cert_pem(), new.cert_pem());
        for ca in [&old, &new] {
            let node = ca.issue_node(1, &[]).unwrap();
            assert_eq!(
                verify(&bundle, &node.cert_pem, "node").unwrap(),
                Holder::Server(1)
            );
        }
        let stranger = ZoneCa::generate().unwrap().issue_node(1, &[]).unwrap();
        assert!(matches!(
            verify(&bundle, &stranger.cert_pem, "node"),
            Err(PkiError::NotSigned(_))
        ));
        // A founder's key is the first certificate's.
        assert_eq!(
            ZoneCa::load(&bundle, old.key_pem()).unwrap().fingerprint(),
            old.fingerprint()
        );
        assert!(matches!(
            ZoneCa::load(&bundle, new.key_pem()),
            Err(PkiError::KeyMismatch)
        ));
    }

    #[test]
    fn moments_are_said_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_796_507_226), "2026-12-05 21:47:06 UTC");
    }

    #[test]
    fn names_say_whom_and_nothing_else() {
        assert_eq!(
            holder_of(["7.server.zoned.invalid"]),
            Some(Holder::Server(7))
        );
        assert_eq!(
            holder_of(["bob.user.zoned.invalid", "reader.role.zoned.invalid"]),
            Some(Holder::User {
                name: "bob".into(),
                role: Role::Reader
            })
        );
        assert_eq!(holder_of(["bob.user.zoned.invalid"]), None, "no role");
        assert_eq!(
            holder_of(["bob.user.zoned.invalid", "root.role.zoned.invalid"]),
            None
        );
        assert_eq!(holder_of(["x.server.zoned.invalid"]), None);
        assert_eq!(holder_of(["zoned.example.com"]), None);
    }

    #[test]
    fn roles_parse_and_name_themselves() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("root"
            .parse::<Role>()
            .unwrap_err()
            .contains("admin, operator or reader"));
    }
}
