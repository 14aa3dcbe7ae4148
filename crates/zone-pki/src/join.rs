//! Joining a zone: one-time join tokens, and the key a new server proves
//! it holds.
//!
//! `zonectl server add` gets a [`JoinToken`] from the zone: a random
//! secret, the id of the server it admits, and the zone CA's fingerprint
//! (as kubeadm's discovery hash: the new server has nothing else to tell
//! the zone's servers from an impostor's). The zone stores only the
//! secret's SHA-256. The new server makes its own key ([`JoinKey`]), dials
//! a member, checks that the member's certificate chains to the CA the
//! token names, and sends the token with its public key and a signature
//! made with the private key over the token ([`JoinKey::prove`]): a
//! signing request. The member checks the token and the signature and
//! signs a node certificate for that public key
//! ([`crate::ZoneCa::issue_node_for`]). The private key never leaves the
//! new server.

use std::fmt;
use std::str::FromStr;

use rcgen::{KeyPair, PublicKeyData, SignatureAlgorithm, SigningKey};
use ring::rand::SecureRandom;

use crate::PkiError;

/// What every join token starts with (and its format's version).
pub const TOKEN_PREFIX: &str = "zjoin1";

/// What a joiner signs: this, then the token.
const PROOF_CONTEXT: &[u8] = b"zoned join v1\n";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// SHA-256, as the zone stores secrets and keys.
pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

/// A one-time join token: `zjoin1.<server id>.<secret: 32 hex>.<the zone
/// CA's SHA-256: 64 hex>`. Its `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub server_id: u64,
    secret: [u8; 16],
    /// `sha256:<hex>`, as [`crate::ZoneCa::fingerprint`].
    pub ca_fingerprint: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("server_id", &self.server_id)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("secret", &"<secret>")
            .finish()
    }
}

impl JoinToken {
    /// A new token for server `server_id` of the zone whose CA has
    /// `ca_fingerprint`.
    pub fn generate(server_id: u64, ca_fingerprint: &str) -> Result<JoinToken, PkiError> {
        let mut secret = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| PkiError::Random)?;
        Ok(JoinToken {
            server_id,
            secret,
            ca_fingerprint: ca_fingerprint.to_owned(),
        })
    }

    /// What the zone stores: the secret's SHA-256.
    pub fn secret_hash(&self) -> Vec<u8> {
        sha256(&self.secret)
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fp = self
            .ca_fingerprint
            .strip_prefix("sha256:")
            .unwrap_or(&self.ca_fingerprint);
        write!(
            f,
            "{TOKEN_PREFIX}.{}.{}.{fp}",
            self.server_id,
            hex(&self.secret)
        )
    }
}

impl FromStr for JoinToken {
    type Err = String;

    /// Reads a token; the error says what is wrong with it, without
    /// repeating it (it may be a mistyped secret).
    fn from_str(s: &str) -> Result<JoinToken, String> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        let [prefix, id, secret, fp] = parts[..] else {
            return Err(format!(
                "not a join token: expected {TOKEN_PREFIX}.<server id>.<32 hex digits>.<64 hex digits>, as `zonectl server add` prints it"
            ));
        };
        if prefix != TOKEN_PREFIX {
            return Err(format!(
                "not a join token: it starts with {prefix:?}, not {TOKEN_PREFIX:?}"
            ));
        }
        let server_id = id
            .parse::<u64>()
            .ok()
            .filter(|&i| i > 0)
            .ok_or_else(|| format!("not a join token: {id:?} is not a server id"))?;
        let secret: [u8; 16] = unhex(secret)
            .and_then(|v| v.try_into().ok())
            .ok_or("not a join token: its secret is not 32 hex digits")?;
        if unhex(fp).is_none_or(|v| v.len() != 32) {
            return Err(
                "not a join token: its CA fingerprint is not 64 hex digits (a SHA-256)".into(),
            );
        }
        Ok(JoinToken {
            server_id,
            secret,
            ca_fingerprint: format!("sha256:{}", fp.to_ascii_lowercase()),
        })
    }
}

/// A joining (or renewing) server's key pair, ECDSA P-256 as every key of
/// the zone.
pub struct JoinKey(KeyPair);

impl fmt::Debug for JoinKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("JoinKey").field(&"<private>").finish()
    }
}

impl JoinKey {
    pub fn generate() -> Result<JoinKey, PkiError> {
        Ok(JoinKey(KeyPair::generate_for(
            &rcgen::PKCS_ECDSA_P256_SHA256,
        )?))
    }

    /// A key from its PKCS#8 PEM (a node key written before); a key of
    /// another kind is refused.
    pub fn from_pem(pem: &str) -> Result<JoinKey, PkiError> {
        let key = KeyPair::from_pem(pem)?;
        if !key.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256) {
            return Err(PkiError::Unreadable {
                what: "the node key".into(),
                why: "not an ECDSA P-256 key".into(),
            });
        }
        Ok(JoinKey(key))
    }

    pub fn key_pem(&self) -> String {
        self.0.serialize_pem()
    }

    /// The public key, as an uncompressed SEC1 point (65 bytes).
    pub fn public_key(&self) -> Vec<u8> {
        self.0.public_key_raw().to_vec()
    }

    /// Signs the join request for `token` with this key.
    pub fn prove(&self, token: &JoinToken) -> Result<Vec<u8>, PkiError> {
        Ok(self.0.sign(&proof_message(token))?)
    }
}

fn proof_message(token: &JoinToken) -> Vec<u8> {
    [PROOF_CONTEXT, token.to_string().as_bytes()].concat()
}

/// Whether `proof` is `public_key`'s signature of the join request for
/// `token` (which also checks that `public_key` is a P-256 point).
pub fn check_proof(public_key: &[u8], token: &JoinToken, proof: &[u8]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public_key)
        .verify(&proof_message(token), proof)
        .is_ok()
}

/// A public key sent by a joiner, to sign a certificate for.
pub(crate) struct P256Public<'a>(pub &'a [u8]);

impl PublicKeyData for P256Public<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{verify, Holder, ZoneCa};

    #[test]
    fn a_token_reads_back_as_written_and_hides_its_secret() {
        let ca = ZoneCa::generate().unwrap();
        let t = JoinToken::generate(4, &ca.fingerprint()).unwrap();
        let text = t.to_string();
        assert!(text.starts_with("zjoin1.4."), "{text}");
        assert_eq!(text.len(), "zjoin1.4.".len() + 32 + 1 + 64);
        let back: JoinToken = text.parse().unwrap();
        assert_eq!(back, t);
        assert_eq!(back.ca_fingerprint, ca.fingerprint());
        let secret = text.split('.').nth(2).unwrap();
        assert!(!format!("{t:?}").contains(secret));
        assert_ne!(
            JoinToken::generate(4, &ca.fingerprint()).unwrap(),
            t,
            "each token has its own secret"
        );
    }

    #[test]
    fn garbage_is_not_a_token_and_the_error_says_why() {
        let fp = "a".repeat(64);
        let secret = "b".repeat(32);
        for (bad, why) in [
            ("", "expected zjoin1."),
            ("hello", "expected zjoin1."),
            (&format!("zjoin2.4.{secret}.{fp}"), "starts with \"zjoin2\""),
            (&format!("zjoin1.0.{secret}.{fp}"), "not a server id"),
            (&format!("zjoin1.x.{secret}.{fp}"), "not a server id"),
            (&format!("zjoin1.4.{}.{fp}", "b".repeat(31)), "secret"),
            (&format!("zjoin1.4.{}.{fp}", "g".repeat(32)), "secret"),
            (
                &format!("zjoin1.4.{secret}.{}", "a".repeat(63)),
                "fingerprint",
            ),
            (&format!("zjoin1.4.{secret}.{fp}.x"), "expected zjoin1."),
        ] {
            let e = bad.parse::<JoinToken>().unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(!e.contains(&secret), "the error repeats the secret: {e}");
        }
    }

    #[test]
    fn a_proof_binds_the_key_to_the_token() {
        let ca = ZoneCa::generate().unwrap();
        let t = JoinToken::generate(4, &ca.fingerprint()).unwrap();
        let other = JoinToken::generate(4, &ca.fingerprint()).unwrap();
        let key = JoinKey::generate().unwrap();
        let proof = key.prove(&t).unwrap();
        assert!(check_proof(&key.public_key(), &t, &proof));
        assert!(!check_proof(&key.public_key(), &other, &proof));
        let thief = JoinKey::generate().unwrap();
        assert!(!check_proof(&thief.public_key(), &t, &proof));
        assert!(!check_proof(b"not a point", &t, &proof));
        let again = JoinKey::from_pem(&key.key_pem()).unwrap();
        assert_eq!(again.public_key(), key.public_key());
    }

    #[test]
    fn a_node_certificate_is_signed_for_the_joiners_key() {
        let ca = ZoneCa::generate().unwrap();
        let key = JoinKey::generate().unwrap();
        let cert = ca
            .issue_node_for(4, &["10.0.0.4".parse().unwrap()], &key.public_key())
            .unwrap();
        assert_eq!(
            verify(ca.cert_pem(), &cert.cert_pem, "node 4").unwrap(),
            Holder::Server(4)
        );
        assert!(cert.key_pem.is_empty(), "the zone never had the key");
        // The certificate carries the joiner's key.
        assert_eq!(
            crate::facts_pem(&cert.cert_pem).unwrap().public_key,
            key.public_key()
        );
    }
}
