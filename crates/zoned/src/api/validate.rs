//! Request checks against the configured limits, before anything reaches
//! Raft: a bad request gets INVALID_ARGUMENT naming the field (`compare[2].key`,
//! `success[0].put.value`) and changes nothing.

use zone_proto::v1::{
    command, compare, request_op, Compare, DeleteRequest, GetRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest,
};

use super::error::{bad, ApiError};

/// The configured limits, and the checks of each request against them.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_key: usize,
    pub max_value: usize,
    pub max_txn_ops: usize,
}

impl Limits {
    /// A command of any kind, as the leader is asked to run it: a client's
    /// write, or one forwarded by another server (the limits are each
    /// server's to enforce).
    pub fn command(&self, op: &command::Op) -> Result<(), ApiError> {
        match op {
            command::Op::Put(r) => self.put("", r),
            command::Op::Delete(r) => self.delete("", r),
            command::Op::Txn(r) => self.txn(r),
            command::Op::SetMaintenance(_)
            | command::Op::RaiseAlarm(_)
            | command::Op::DisarmAlarm(_)
            | command::Op::Compact(_) => Ok(()),
            // Only a leader's own driver proposes the zone's record; one
            // forwarded by a peer is refused.
            command::Op::FoundZone(_) => Err(bad(
                "found_zone",
                "the zone's record is not a write a server may forward",
            )),
            command::Op::TookPart(_) => Err(bad(
                "took_part",
                "the servers that took part are not a write a server may forward",
            )),
        }
    }

    /// Checks the field `at` + `name` (joined only for an error: this is on
    /// every request's path).
    fn key(&self, at: &str, name: &str, key: &[u8]) -> Result<(), ApiError> {
        if key.is_empty() {
            return Err(bad(format!("{at}{name}"), "must not be empty"));
        }
        at_most(at, name, key.len(), self.max_key, "")
    }

    fn prefix(&self, at: &str, prefix: &[u8]) -> Result<(), ApiError> {
        at_most(at, "prefix", prefix.len(), self.max_key, "key ")
    }

    pub fn put(&self, at: &str, r: &PutRequest) -> Result<(), ApiError> {
        self.key(at, "key", &r.key)?;
        at_most(at, "value", r.value.len(), self.max_value, "")?;
        Ok(())
    }

    pub fn delete(&self, at: &str, r: &DeleteRequest) -> Result<(), ApiError> {
        // Even with `prefix`, an empty key (everything) must be meant: it is
        // refused; delete by an explicit prefix instead.
        self.key(at, "key", &r.key)
    }

    pub fn get(&self, at: &str, r: &GetRequest) -> Result<(), ApiError> {
        self.key(at, "key", &r.key)
    }

    pub fn range(&self, at: &str, r: &RangeRequest) -> Result<(), ApiError> {
        self.prefix(at, &r.prefix)
    }

    fn compare(&self, at: &str, c: &Compare) -> Result<(), ApiError> {
        self.key(at, "key", &c.key)?;
        let target = compare::Target::try_from(c.target).map_err(|_| {
            bad(
                format!("{at}target"),
                format!("unknown target {}", c.target),
            )
        })?;
        match compare::Op::try_from(c.op) {
            Ok(compare::Op::Unspecified) | Err(_) => {
                return Err(bad(
                    format!("{at}op"),
                    "must be EQUAL, NOT_EQUAL, LESS or GREATER",
                ))
            }
            Ok(_) => {}
        }
        let value_matches = matches!(
            (target, &c.target_value),
            (compare::Target::Value, Some(compare::TargetValue::Value(_)))
                | (
                    compare::Target::ModRevision,
                    Some(compare::TargetValue::ModRevision(_))
                )
                | (
                    compare::Target::CreateRevision,
                    Some(compare::TargetValue::CreateRevision(_))
                )
                | (
                    compare::Target::Version,
                    Some(compare::TargetValue::Version(_))
                )
        );
        if target == compare::Target::Unspecified {
            return Err(bad(
                format!("{at}target"),
                "must be VALUE, MOD_REVISION, CREATE_REVISION or VERSION",
            ));
        }
        if !value_matches {
            let want = match target {
                compare::Target::Value => "value",
                compare::Target::ModRevision => "mod_revision",
                compare::Target::CreateRevision => "create_revision",
                _ => "version",
            };
            return Err(bad(
                format!("{at}{want}"),
                format!(
                    "target {} needs the field {want} set, and only it",
                    target.as_str_name()
                ),
            ));
        }
        Ok(())
    }

    fn op(&self, at: &str, op: &RequestOp) -> Result<(), ApiError> {
        match &op.request {
            Some(request_op::Request::Put(r)) => self.put(&format!("{at}put."), r),
            Some(request_op::Request::Delete(r)) => self.delete(&format!("{at}delete."), r),
            Some(request_op::Request::Get(r)) => self.get(&format!("{at}get."), r),
            Some(request_op::Request::Range(r)) => self.range(&format!("{at}range."), r),
            None => Err(bad(at.trim_end_matches('.'), "empty operation")),
        }
    }

    pub fn txn(&self, r: &TxnRequest) -> Result<(), ApiError> {
        let ops = r.success.len() + r.failure.len();
        if ops > self.max_txn_ops {
            return Err(bad(
                "success",
                format!(
                    "{ops} operations in both branches is over the limit of {}",
                    self.max_txn_ops
                ),
            ));
        }
        if r.compare.len() > self.max_txn_ops {
            return Err(bad(
                "compare",
                format!("over the limit of {}", self.max_txn_ops),
            ));
        }
        for (i, c) in r.compare.iter().enumerate() {
            self.compare(&format!("compare[{i}]."), c)?;
        }
        for (i, op) in r.success.iter().enumerate() {
            self.op(&format!("success[{i}]."), op)?;
        }
        for (i, op) in r.failure.iter().enumerate() {
            self.op(&format!("failure[{i}]."), op)?;
        }
        Ok(())
    }
}

/// The keys only zoned's own services write: the managed files, their
/// history and the generation key every change compares (Config), and the
/// users' records (Users), the join tokens' (Join) and the datastores'
/// declarations (Storage), each server's last upgrade (Upgrade), the
/// extensions the zone wants and each server's report of them (Extensions,
/// each server's zoned), the zone's services (Services). A client write
/// there would bypass the file checks (paths, sizes, templates), clear a
/// revocation, or plant a token: refused.
/// zone-sync's reports and the roll lock beside them are written through
/// the key-value API, and stay open to it.
const RESERVED: [(&[u8], bool); 12] = [
    (zone_files::keys::FILE_PREFIX, true),
    (zone_files::keys::HIST_PREFIX, true),
    (zone_files::keys::GEN_KEY, false),
    (super::users::USERS_PREFIX, true),
    (super::join::JOIN_PREFIX, true),
    (zone_datastores::DS_PREFIX, true),
    (zone_datastores::GEN_KEY, false),
    (super::upgrade::UPGRADE_PREFIX, true),
    (super::upgrade::TURN_KEY, false),
    (super::extensions::WANT_PREFIX, true),
    (super::extensions::STATE_PREFIX, true),
    (super::services::SERVICES_KEY, false),
];

/// Refuses a client's write that would change a reserved key ([`RESERVED`]),
/// naming the field: a put of one, a delete of one, or a delete by a prefix
/// that covers one.
pub fn writable(op: &command::Op) -> Result<(), ApiError> {
    match op {
        command::Op::Put(r) => put_writable("", &r.key),
        command::Op::Delete(r) => delete_writable("", r),
        command::Op::Txn(t) => {
            let branches = [("success", &t.success), ("failure", &t.failure)];
            for (branch, ops) in branches {
                for (i, op) in ops.iter().enumerate() {
                    match &op.request {
                        Some(request_op::Request::Put(r)) => {
                            put_writable(&format!("{branch}[{i}].put."), &r.key)?
                        }
                        Some(request_op::Request::Delete(r)) => {
                            delete_writable(&format!("{branch}[{i}].delete."), r)?
                        }
                        _ => {}
                    }
                }
            }
            Ok(())
        }
        command::Op::SetMaintenance(_)
        | command::Op::FoundZone(_)
        | command::Op::TookPart(_)
        | command::Op::RaiseAlarm(_)
        | command::Op::DisarmAlarm(_)
        | command::Op::Compact(_) => Ok(()),
    }
}

fn put_writable(at: &str, key: &[u8]) -> Result<(), ApiError> {
    let hit = RESERVED.iter().any(|&(r, is_prefix)| {
        if is_prefix {
            key.starts_with(r)
        } else {
            key == r
        }
    });
    if hit {
        return Err(reserved(at, key));
    }
    Ok(())
}

fn delete_writable(at: &str, r: &DeleteRequest) -> Result<(), ApiError> {
    if !r.prefix {
        return put_writable(at, &r.key);
    }
    // Every key starting with r.key: it meets a reserved prefix if either
    // starts with the other, a reserved key if that key starts with it.
    let hit = RESERVED
        .iter()
        .any(|&(res, is_prefix)| res.starts_with(&r.key) || (is_prefix && r.key.starts_with(res)));
    if hit {
        return Err(reserved(at, &r.key));
    }
    Ok(())
}

fn reserved(at: &str, key: &[u8]) -> ApiError {
    ApiError::PermissionDenied(format!(
        "{at}key: '{}' is or covers zoned's own records (the managed files: `zonectl config push`/`rm`; the users: `zonectl user issue`/`revoke`; the join tokens: `zonectl server add`/`token`; the datastores: `zonectl storage add`/`rm`; the upgrades: `zonectl upgrade`; the extensions: `zonectl ext add`/`rm`; the services: `zonectl services set`/`clear`)",
        String::from_utf8_lossy(key)
    ))
}

/// Field `at` + `name` holds `len` bytes: at most `limit` (the message
/// names the limit `what`: "" or "key ").
fn at_most(at: &str, name: &str, len: usize, limit: usize, what: &str) -> Result<(), ApiError> {
    if len > limit {
        return Err(bad(
            format!("{at}{name}"),
            format!("{len} bytes is over the {what}limit of {limit} bytes"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str) -> command::Op {
        command::Op::Put(PutRequest {
            key: key.into(),
            ..PutRequest::default()
        })
    }

    fn delete(key: &str, prefix: bool) -> command::Op {
        command::Op::Delete(DeleteRequest {
            key: key.into(),
            prefix,
            prev_kv: false,
        })
    }

    #[test]
    fn the_managed_files_records_are_not_for_the_key_value_api() {
        let refused = [
            put("zone/config/file/etc/one/oned.conf"),
            put("zone/config/hist/etc/one/oned.conf\x0000000000000000000001"),
            put("zone/config/gen"),
            delete("zone/config/gen", false),
            delete("zone/config/file/etc/one/oned.conf", false),
            delete("zone/config/f", true),
            delete("zone/config/file/etc", true),
            delete("zone/", true),
            delete("z", true),
            put("zone/storage/ds/images"),
            put("zone/storage/gen"),
            delete("zone/storage/", true),
            delete("zone/storage/ds/images", false),
        ];
        for op in &refused {
            assert!(
                matches!(writable(op), Err(ApiError::PermissionDenied(_))),
                "{op:?}"
            );
        }
        let allowed = [
            put("zone/config/status/2"),
            put("zone/config/roll-lock"),
            put("zone/config/gen2"),
            put("zone/config/fil"),
            delete("zone/config/status/", true),
            delete("zone/config/gen2", true),
            delete("zone/config/fil", false),
            delete("a", true),
        ];
        for op in &allowed {
            assert!(writable(op).is_ok(), "{op:?}");
        }
    }

    #[test]
    fn a_transaction_names_the_operation_that_touches_them() {
        let txn = command::Op::Txn(TxnRequest {
            success: vec![RequestOp {
                request: Some(request_op::Request::Put(PutRequest {
                    key: b"ok".to_vec(),
                    ..PutRequest::default()
                })),
            }],
            failure: vec![
                RequestOp {
                    request: Some(request_op::Request::Range(RangeRequest {
                        prefix: b"zone/".to_vec(),
                        ..RangeRequest::default()
                    })),
                },
                RequestOp {
                    request: Some(request_op::Request::Delete(DeleteRequest {
                        key: b"zone/config/".to_vec(),
                        prefix: true,
                        prev_kv: false,
                    })),
                },
            ],
            ..TxnRequest::default()
        });
        match writable(&txn) {
            Err(ApiError::PermissionDenied(m)) => {
                assert!(
                    m.starts_with("failure[1].delete.key: 'zone/config/'"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
