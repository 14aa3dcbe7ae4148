//! `zone.v1.Users`: the zone's client credentials. A server that holds the
//! zone CA's key (a founder) issues one to an admin who asks (`zonectl user
//! issue`), and records it under `zone/users/<serial>`; `zonectl user
//! revoke` marks the record revoked, and every server refuses the
//! credential from the moment it has applied that ([`is_revoked`], asked
//! by [`crate::tls::Gate`] on every call). The records are written only
//! here: client writes under `zone/users/` are refused
//! ([`super::validate`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use tonic::{Request, Response, Status};
use zone_pki::{Role, ZoneCa};
use zone_proto::v1::{
    command, command_result, users_server, GetRequest, IssueUserRequest, IssueUserResponse,
    ListUsersRequest, ListUsersResponse, PutRequest, RangeRequest, RevokeUserRequest,
    RevokeUserResponse, User, UserRole,
};

use super::error::bad;
use super::{ApiError, ServerContext};
use crate::tls::Caller;

/// Where the users' records live.
pub const USERS_PREFIX: &[u8] = b"zone/users/";

fn user_key(serial: &str) -> Vec<u8> {
    [USERS_PREFIX, serial.as_bytes()].concat()
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn role_of(r: i32) -> Result<Role, ApiError> {
    match UserRole::try_from(r) {
        Ok(UserRole::Reader) => Ok(Role::Reader),
        Ok(UserRole::Operator) => Ok(Role::Operator),
        Ok(UserRole::Admin) => Ok(Role::Admin),
        _ => Err(bad("role", "must be reader, operator or admin")),
    }
}

fn proto_role(r: Role) -> UserRole {
    match r {
        Role::Reader => UserRole::Reader,
        Role::Operator => UserRole::Operator,
        Role::Admin => UserRole::Admin,
    }
}

/// A serial as the gate sees it (lowercase hex of the certificate's 16
/// bytes), from what an operator may paste: `serial=5F0C...` (openssl),
/// `0x...`, colons. None unless it is 32 hex digits: a serial in another
/// form would be recorded under a key the gate never reads.
fn normal_serial(s: &str) -> Option<String> {
    let s = s.trim();
    let s = s.strip_prefix("serial=").unwrap_or(s);
    let s = s.strip_prefix("0x").unwrap_or(s);
    let hex: String = s
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    (hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit())).then_some(hex)
}

/// The admin making the call, for the record.
fn caller<T>(req: &Request<T>) -> String {
    match req.extensions().get::<Caller>() {
        Some(Caller::User { name, .. }) => name.clone(),
        _ => String::new(),
    }
}

/// Whether the credential with `serial` was revoked, as this server has
/// applied the zone's records (a local read: no round trip, on every call).
/// An unreadable store counts as revoked: refused, not let through.
pub fn is_revoked(zone: &ServerContext, serial: &str) -> bool {
    let read = zone.reader().get(&GetRequest {
        key: user_key(serial),
        serializable: true,
    });
    match read {
        Ok((Some(kv), _)) => User::decode(kv.value.as_slice()).map_or(true, |u| u.revoked),
        Ok((None, _)) => false,
        Err(_) => true,
    }
}

/// `zone.v1.Users`.
#[derive(Clone)]
pub struct UsersService {
    zone: ServerContext,
    /// The zone CA, if this server holds its key.
    ca: Option<Arc<ZoneCa>>,
}

impl std::fmt::Debug for UsersService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsersService")
            .field("signs", &self.ca.is_some())
            .finish()
    }
}

impl UsersService {
    pub fn new(zone: ServerContext, ca: Option<Arc<ZoneCa>>) -> UsersService {
        UsersService { zone, ca }
    }

    fn read(&self, serial: &str) -> Result<Option<User>, ApiError> {
        let (kv, _) = self.zone.reader().get(&GetRequest {
            key: user_key(serial),
            serializable: true,
        })?;
        kv.map(|kv| {
            User::decode(kv.value.as_slice()).map_err(|e| {
                ApiError::FailedPrecondition(format!("user record {serial} cannot be decoded: {e}"))
            })
        })
        .transpose()
    }

    async fn store(&self, user: &User, budget: Duration) -> Result<u64, ApiError> {
        self.zone.check_enabled()?;
        let op = command::Op::Put(PutRequest {
            key: user_key(&user.serial),
            value: user.encode_to_vec(),
            prev_kv: false,
        });
        match self.zone.write(op, budget).await?.result {
            Some(command_result::Result::Put(p)) => Ok(p.header.map_or(0, |h| h.revision)),
            other => Err(ApiError::FailedPrecondition(format!(
                "unexpected answer to a user record's write: {other:?}"
            ))),
        }
    }
}

#[tonic::async_trait]
impl users_server::Users for UsersService {
    async fn issue(
        &self,
        req: Request<IssueUserRequest>,
    ) -> Result<Response<IssueUserResponse>, Status> {
        let budget = self.zone.budget(&req);
        let by = caller(&req);
        let r = req.into_inner();
        let role = role_of(r.role)?;
        let Some(ca) = &self.ca else {
            return Err(ApiError::FailedPrecondition(format!(
                "server {} does not hold the zone CA's key (only founders do); ask one of them (zonectl --endpoints)",
                self.zone.node().id()
            ))
            .into());
        };
        let cred = ca.issue_client(&r.name, role).map_err(|e| match e {
            zone_pki::PkiError::BadName(_) => bad("name", e.to_string()),
            other => ApiError::FailedPrecondition(other.to_string()),
        })?;
        let user = User {
            name: r.name,
            role: proto_role(role) as i32,
            serial: cred.serial.clone(),
            issued_unix: now_unix(),
            expires_unix: u64::try_from(cred.not_after_unix).unwrap_or(0),
            issued_by: by,
            signed_by_server: self.zone.node().id(),
            ..User::default()
        };
        // Recorded before it is handed out: a credential the zone does not
        // list could not be revoked by serial from `zonectl user ls`.
        let revision = self.store(&user, budget).await?;
        tracing::info!(name = %user.name, role = %role, serial = %user.serial, by = %user.issued_by, "issued a client credential");
        Ok(Response::new(IssueUserResponse {
            header: self.zone.header(revision),
            user: Some(user),
            ca_pem: ca.cert_pem().to_owned(),
            cert_pem: cred.cert_pem,
            key_pem: cred.key_pem,
        }))
    }

    async fn revoke(
        &self,
        req: Request<RevokeUserRequest>,
    ) -> Result<Response<RevokeUserResponse>, Status> {
        let budget = self.zone.budget(&req);
        let by = caller(&req);
        let r = req.into_inner();
        let serial = normal_serial(&r.serial).ok_or_else(|| {
            bad(
                "serial",
                "32 hex digits (the zone's serials are 16 bytes), as `zonectl user ls` or `openssl x509 -noout -serial` print it",
            )
        })?;
        self.zone.linearize(budget).await?;
        let mut user = match self.read(&serial)? {
            Some(u) => u,
            None if r.unlisted => User {
                serial: serial.clone(),
                ..User::default()
            },
            None => {
                return Err(ApiError::NotFound(format!(
                    "no credential with serial {serial} was issued by this zone (`zonectl user ls` lists them); to revoke one made outside it (zonectl zone init's admin, a server's local admin), add --unlisted"
                ))
                .into())
            }
        };
        let mut revision = self.zone.reader().revision().map_err(ApiError::from)?;
        if !user.revoked {
            user.revoked = true;
            user.revoked_unix = now_unix();
            user.revoked_by = by;
            revision = self.store(&user, budget).await?;
            // Answered once this server applied it too (a follower's write
            // is answered when the leader applied it): refused here from
            // the next call.
            self.zone.linearize(budget).await?;
            tracing::info!(name = %user.name, serial = %user.serial, by = %user.revoked_by, "revoked a client credential");
        }
        Ok(Response::new(RevokeUserResponse {
            header: self.zone.header(revision),
            user: Some(user),
        }))
    }

    async fn list(
        &self,
        req: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        let budget = self.zone.budget(&req);
        self.zone.linearize(budget).await?;
        let (kvs, _, revision) = self
            .zone
            .reader()
            .range(&RangeRequest {
                prefix: USERS_PREFIX.to_vec(),
                limit: 0,
                serializable: true,
                keys_only: false,
            })
            .map_err(ApiError::from)?;
        let mut users = Vec::with_capacity(kvs.len());
        for kv in kvs {
            users.push(User::decode(kv.value.as_slice()).map_err(|e| {
                ApiError::FailedPrecondition(format!("a user record cannot be decoded: {e}"))
            })?);
        }
        users.sort_by(|a, b| (a.issued_unix, &a.name).cmp(&(b.issued_unix, &b.name)));
        Ok(Response::new(ListUsersResponse {
            header: self.zone.header(revision),
            users,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_taken_as_the_gate_reads_them_or_refused() {
        let gate = "5f0c00112233445566778899aabbccdd";
        assert_eq!(normal_serial(gate).as_deref(), Some(gate));
        assert_eq!(
            normal_serial("serial=5F0C00112233445566778899AABBCCDD").as_deref(),
            Some(gate)
        );
        assert_eq!(
            normal_serial("5f:0c:00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd").as_deref(),
            Some(gate)
        );
        // A leading zero dropped by a tool printing it as a number, or
        // decimal: refused, not recorded where nothing looks.
        assert_eq!(normal_serial("f0c00112233445566778899aabbccdd"), None);
        assert_eq!(normal_serial("12345678901234567890123456789012345"), None);
        assert_eq!(normal_serial("abcdef"), None);
    }
}
