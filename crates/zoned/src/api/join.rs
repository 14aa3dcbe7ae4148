//! `zone.v1.Join`: one-time join tokens. An admin gets a token for a server
//! already added (`zonectl server add` does both); the zone keeps only the
//! secret's hash, under `zone/join/<id>` (reserved: client writes there are
//! refused, [`super::validate`]). The new server redeems it on the client
//! port without a certificate ([`crate::tls::needs`]: anyone): a server
//! holding the zone CA's key checks the token and the signing request's
//! signature, marks the token used for that key (a compare-and-swap on the
//! record's revision: two redeemers cannot both win), and only then signs.
//!
//! Each refusal is PERMISSION_DENIED naming why (garbled, another zone's,
//! for another server, unknown or replaced, expired, used), and changes
//! nothing: the token stays as it was.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use tonic::{Request, Response, Status};
use zone_pki::{JoinToken, ZoneCa};
use zone_proto::v1::{
    command, command_result, compare, join_server, request_op, Compare, GetRequest, JoinRequest,
    JoinResponse, JoinTokenRecord, JoinTokenRequest, JoinTokenResponse, PutRequest, RequestOp,
    TxnRequest,
};

use super::error::bad;
use super::users::now_unix;
use super::{ApiError, ServerContext};
use crate::tls::Caller;

/// Where the join tokens' records live.
pub const JOIN_PREFIX: &[u8] = b"zone/join/";

/// A token's life when the admin names none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// The longest a token may live.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

fn token_key(id: u64) -> Vec<u8> {
    [JOIN_PREFIX, id.to_string().as_bytes()].concat()
}

fn denied(why: impl Into<String>) -> Status {
    Status::permission_denied(why)
}

fn when(unix: u64) -> String {
    zone_pki::utc(i64::try_from(unix).unwrap_or(i64::MAX))
}

/// The IP address of a member's peer endpoint (`host:port`), for its
/// certificate; none if the host is a name.
pub(crate) fn ip_of(endpoint: &str) -> Option<IpAddr> {
    let (host, _) = endpoint.rsplit_once(':')?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// `zone.v1.Join`.
#[derive(Clone)]
pub struct JoinService {
    zone: ServerContext,
    /// This zone CA's fingerprint (every server has the certificate).
    fingerprint: String,
    /// The zone CA, if this server holds its key (a founder).
    ca: Option<Arc<ZoneCa>>,
}

impl std::fmt::Debug for JoinService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinService")
            .field("signs", &self.ca.is_some())
            .finish()
    }
}

impl JoinService {
    pub fn new(zone: ServerContext, fingerprint: String, ca: Option<Arc<ZoneCa>>) -> JoinService {
        JoinService {
            zone,
            fingerprint,
            ca,
        }
    }

    /// The record of server `id`'s token, and its revision (0: none).
    fn record(&self, id: u64) -> Result<(Option<JoinTokenRecord>, u64), ApiError> {
        let (kv, _) = self.zone.reader().get(&GetRequest {
            key: token_key(id),
            serializable: true,
        })?;
        let Some(kv) = kv else {
            return Ok((None, 0));
        };
        let record = JoinTokenRecord::decode(kv.value.as_slice()).map_err(|e| {
            ApiError::FailedPrecondition(format!(
                "server {id}'s join token record cannot be decoded: {e}"
            ))
        })?;
        Ok((Some(record), kv.mod_revision))
    }

    /// Writes `record` if server `id`'s record is still at `revision` (0:
    /// absent). Whether it was written, and the store's revision.
    async fn swap(
        &self,
        record: &JoinTokenRecord,
        revision: u64,
        budget: Duration,
    ) -> Result<(bool, u64), ApiError> {
        self.zone.check_enabled()?;
        let key = token_key(record.id);
        let op = command::Op::Txn(TxnRequest {
            compare: vec![Compare {
                key: key.clone(),
                target: compare::Target::ModRevision as i32,
                op: compare::Op::Equal as i32,
                target_value: Some(compare::TargetValue::ModRevision(revision)),
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::Put(PutRequest {
                    key,
                    value: record.encode_to_vec(),
                    prev_kv: false,
                })),
            }],
            failure: vec![],
        });
        match self.zone.write(op, budget).await?.result {
            Some(command_result::Result::Txn(t)) => {
                Ok((t.succeeded, t.header.map_or(0, |h| h.revision)))
            }
            other => Err(ApiError::FailedPrecondition(format!(
                "unexpected answer to a join token's write: {other:?}"
            ))),
        }
    }
}

/// Checks a join request against the token's record; the record to
/// store (marked used) if the request may have its certificate.
fn check(
    token: &JoinToken,
    public_key: &[u8],
    record: Option<&JoinTokenRecord>,
    now: u64,
) -> Result<Option<JoinTokenRecord>, Status> {
    let id = token.server_id;
    let Some(record) = record else {
        return Err(denied(format!(
            "unknown token: no join token was issued for server {id} (`zonectl server token {id}` makes one)"
        )));
    };
    if record.secret_sha256 != token.secret_hash() {
        return Err(denied(format!(
            "unknown token: it is not server {id}'s current join token (a newer one replaced it, or it was never issued); `zonectl server token {id}` makes a new one"
        )));
    }
    let key_hash = zone_pki::sha256(public_key);
    if record.used_unix != 0 {
        if record.used_key_sha256 == key_hash && now < record.expires_unix {
            // The same server asking again within the token's life (its
            // answer was lost): it holds the key the token was spent on.
            return Ok(None);
        }
        return Err(denied(format!(
            "used token: server {id}'s join token was used at {}; each token admits one server once (`zonectl server token {id}` makes a new one)",
            when(record.used_unix)
        )));
    }
    if now >= record.expires_unix {
        return Err(denied(format!(
            "expired token: server {id}'s join token expired at {} (`zonectl server token {id} --ttl ...` makes a new one)",
            when(record.expires_unix)
        )));
    }
    Ok(Some(JoinTokenRecord {
        used_unix: now,
        used_key_sha256: key_hash,
        ..record.clone()
    }))
}

#[tonic::async_trait]
impl join_server::Join for JoinService {
    async fn issue_token(
        &self,
        req: Request<JoinTokenRequest>,
    ) -> Result<Response<JoinTokenResponse>, Status> {
        let budget = self.zone.budget(&req);
        let by = match req.extensions().get::<Caller>() {
            Some(Caller::User { name, .. }) => name.clone(),
            _ => String::new(),
        };
        let r = req.into_inner();
        let ttl = match r.ttl_seconds {
            0 => DEFAULT_TTL,
            s if s > MAX_TTL.as_secs() => {
                return Err(bad("ttl_seconds", "at most 7 days (604800 s)").into())
            }
            s => Duration::from_secs(s),
        };
        self.zone.linearize(budget).await?;
        let members = self.zone.members().await?.members;
        if !members.iter().any(|m| m.id == r.id) {
            return Err(ApiError::NotFound(format!(
                "server {} is not a member of the zone; add it first (`zonectl server add --id {} --name NAME --peer HOST:PORT`)",
                r.id, r.id
            ))
            .into());
        }
        let token = JoinToken::generate(r.id, &self.fingerprint)
            .map_err(|e| ApiError::FailedPrecondition(e.to_string()))?;
        let now = now_unix();
        let record = JoinTokenRecord {
            id: r.id,
            secret_sha256: token.secret_hash(),
            issued_unix: now,
            expires_unix: now + ttl.as_secs(),
            issued_by: by,
            used_unix: 0,
            used_key_sha256: Vec::new(),
        };
        // Replaces any token before it, used or not.
        let (_, revision) = self.record(r.id)?;
        let (written, revision) = self.swap(&record, revision, budget).await?;
        if !written {
            return Err(Status::aborted(format!(
                "server {}'s join token changed while this one was made; ask again",
                r.id
            )));
        }
        tracing::info!(id = r.id, expires = record.expires_unix, by = %record.issued_by, "issued a join token");
        Ok(Response::new(JoinTokenResponse {
            header: self.zone.header(revision),
            token: token.to_string(),
            expires_unix: record.expires_unix,
        }))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let budget = self.zone.budget(&req);
        let r = req.into_inner();
        let token: JoinToken = r.token.parse().map_err(denied)?;
        if token.ca_fingerprint != self.fingerprint {
            return Err(denied(format!(
                "another zone's token: it names the zone CA {}, this zone's is {}",
                token.ca_fingerprint, self.fingerprint
            )));
        }
        if token.server_id != r.id {
            return Err(denied(format!(
                "wrong server: the token was issued for server {}, and this server is {} (node.id)",
                token.server_id, r.id
            )));
        }
        if !zone_pki::check_proof(&r.public_key, &token, &r.proof) {
            return Err(denied(
                "the signing request's signature does not verify with its public key (an ECDSA P-256 signature of the token is expected)",
            ));
        }
        let Some(ca) = &self.ca else {
            return Err(ApiError::FailedPrecondition(format!(
                "server {} does not hold the zone CA's key and {}; join through a founder (node.join)",
                self.zone.node().id(),
                crate::join::FINAL_PRECONDITION
            ))
            .into());
        };
        self.zone.linearize(budget).await?;
        // The token first: only its holder learns anything more (such as
        // whether the server is a member).
        let (record, mut revision) = self.record(r.id)?;
        let mut spend = check(&token, &r.public_key, record.as_ref(), now_unix())?;
        let members = self.zone.members().await?.members;
        let Some(member) = members.iter().find(|m| m.id == r.id) else {
            return Err(ApiError::FailedPrecondition(format!(
                "server {} is not a member of the zone (removed since its token was issued?), so the zone {}",
                r.id,
                crate::join::FINAL_PRECONDITION
            ))
            .into());
        };
        // Spent before anything is signed: of two requests racing, one
        // writes; the other reads the record again and is told what became
        // of the token (used, or replaced).
        let mut attempts = 0;
        while let Some(used) = spend {
            let (written, _) = self.swap(&used, revision, budget).await?;
            if written {
                break;
            }
            attempts += 1;
            if attempts == 3 {
                return Err(Status::aborted(
                    "the join token kept changing while it was checked; try again",
                ));
            }
            // What the write that won did, as this server applies it.
            self.zone.linearize(budget).await?;
            let (record, rev) = self.record(r.id)?;
            revision = rev;
            spend = check(&token, &r.public_key, record.as_ref(), now_unix())?;
        }
        let addresses: Vec<IpAddr> = ip_of(&member.peer_endpoint).into_iter().collect();
        let cert = ca
            .issue_node_for(r.id, &addresses, &r.public_key)
            .map_err(|e| ApiError::FailedPrecondition(e.to_string()))?;
        tracing::info!(id = r.id, serial = %cert.serial, "signed a joining server's node certificate");
        Ok(Response::new(JoinResponse {
            ca_pem: ca.cert_pem().to_owned(),
            cert_pem: cert.cert_pem,
            members,
            signed_by: self.zone.node().id(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_address_gives_the_certificate_its_ip() {
        assert_eq!(ip_of("10.0.0.4:7401"), "10.0.0.4".parse().ok());
        assert_eq!(ip_of("[fd00::4]:7401"), "fd00::4".parse().ok());
        assert_eq!(ip_of("zone-4.example:7401"), None);
    }

    #[test]
    fn each_refusal_names_its_reason_and_a_good_token_is_spent_on_its_key() {
        let ca = ZoneCa::generate().unwrap();
        let token = JoinToken::generate(4, &ca.fingerprint()).unwrap();
        let key = zone_pki::JoinKey::generate().unwrap().public_key();
        let other_key = zone_pki::JoinKey::generate().unwrap().public_key();
        let fresh = JoinTokenRecord {
            id: 4,
            secret_sha256: token.secret_hash(),
            issued_unix: 1000,
            expires_unix: 4600,
            ..JoinTokenRecord::default()
        };
        let refused = |record: Option<&JoinTokenRecord>, key: &[u8], now: u64| {
            let e = check(&token, key, record, now).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            e.message().to_owned()
        };
        assert!(refused(None, &key, 2000).starts_with("unknown token: no join token"));
        let replaced = JoinTokenRecord {
            secret_sha256: zone_pki::sha256(b"another secret"),
            ..fresh.clone()
        };
        assert!(refused(Some(&replaced), &key, 2000).contains("not server 4's current"));
        assert!(refused(Some(&fresh), &key, 4600).starts_with("expired token"));

        let spent = check(&token, &key, Some(&fresh), 2000).unwrap().unwrap();
        assert_eq!(spent.used_unix, 2000);
        assert_eq!(spent.used_key_sha256, zone_pki::sha256(&key));
        assert_eq!(spent.secret_sha256, fresh.secret_sha256);
        // Another key: refused; the same key (an answer lost): signed
        // again, nothing more to store, while the token lives.
        assert!(refused(Some(&spent), &other_key, 2001).starts_with("used token"));
        assert_eq!(check(&token, &key, Some(&spent), 4599).unwrap(), None);
        assert!(refused(Some(&spent), &key, 4600).starts_with("used token"));
    }
}
