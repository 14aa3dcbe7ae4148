//! How a request fails: [`ApiError`], and the one place each failure gets
//! its gRPC code ([`From<ApiError> for Status`]) and each driver error its
//! meaning for the caller ([`From<NodeError> for ApiError`]).
//!
//! What matters most is whether a failed write may have been applied: only
//! [`ApiError::NotApplied`] promises it was not, so it is retried (by this
//! server, or by a server that forwarded the request here, which reads the
//! promise from the [`NOT_APPLIED`] metadata key). A client write is also
//! retried when its outcome is unknown ([`ApiError::Retry`]): it carries a
//! request id, and the zone applies it at most once.

use std::time::Duration;

use tonic::Status;

use crate::node::NodeError;
use crate::storage::StorageFailure;

/// Metadata key set on errors that guarantee the write was not applied, so
/// a forwarding server may retry it.
pub(crate) const NOT_APPLIED: &str = "zone-not-applied";

/// Every way a request can fail, each with its gRPC code chosen on purpose.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or over a limit; nothing changed.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// No leader, or the leader changed: the write was not applied; retry.
    #[error("{0}")]
    NotApplied(String),
    /// The outcome of a write is unknown (a forwarding hop failed).
    #[error("{0}")]
    Unavailable(String),
    /// The outcome of an attempt is unknown, but the write may be sent
    /// again: it carries a request id, so the zone applies it at most once
    /// (`kv::sessions`). Retried like [`ApiError::NotApplied`]; never
    /// sent to a client as such.
    #[error("{0}")]
    Retry(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Compacted(String),
    /// The zone's state forbids it (maintenance, last voter).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The request may not change what it names; nothing changed.
    #[error("{0}")]
    PermissionDenied(String),
    /// The leader's disk is below its free-space floor; nothing was
    /// proposed. Not retried on another server: the leader is the same.
    #[error("{0}")]
    ResourceExhausted(String),
    /// An error from the server the request was forwarded to, passed on.
    #[error("{}", .0.message())]
    Remote(Status),
    #[error("storage failure")]
    Storage(#[from] StorageFailure),
}

impl From<zone_files::FileError> for ApiError {
    fn from(e: zone_files::FileError) -> ApiError {
        use zone_files::FileError;
        match e {
            FileError::Invalid { field, reason } => ApiError::InvalidArgument { field, reason },
            FileError::Unavailable(m) => ApiError::FailedPrecondition(m),
            FileError::Compacted(m) => ApiError::Compacted(m),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match &e {
            ApiError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
            ApiError::NotApplied(m) => {
                let mut s = Status::unavailable(m.clone());
                s.metadata_mut()
                    .insert(NOT_APPLIED, "1".parse().expect("ascii"));
                s
            }
            ApiError::Unavailable(m) | ApiError::Retry(m) => Status::unavailable(m.clone()),
            ApiError::Timeout(m) => Status::deadline_exceeded(m.clone()),
            ApiError::Compacted(m) => Status::out_of_range(m.clone()),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m.clone()),
            ApiError::NotFound(m) => Status::not_found(m.clone()),
            ApiError::AlreadyExists(m) => Status::already_exists(m.clone()),
            ApiError::PermissionDenied(m) => Status::permission_denied(m.clone()),
            ApiError::ResourceExhausted(m) => Status::resource_exhausted(m.clone()),
            ApiError::Remote(status) => status.clone(),
            ApiError::Storage(inner) => {
                tracing::error!(error = %crate::logging::chain(inner), "storage failure serving a request");
                Status::internal(format!("storage failure: {}", crate::logging::chain(inner)))
            }
        }
    }
}

/// What a driver error means for the caller. The driver refused before
/// proposing, or another entry was applied at the proposal's index (see
/// `node::proposals`): not applied, try again (at the new leader). Leadership changed after the
/// entry was appended: it may yet be committed by the new leader, so the
/// outcome is unknown and nothing may retry it.
impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> ApiError {
        match e {
            NodeError::NotLeader { .. }
            | NodeError::NoLeader
            | NodeError::Dropped
            | NodeError::ConfBusy => ApiError::NotApplied(e.to_string()),
            NodeError::LeadershipChanged => ApiError::Unavailable(
                "leadership changed while the request was in flight; it may or may not have been applied"
                    .into(),
            ),
            NodeError::Stopped => ApiError::Unavailable("server is shutting down".into()),
            NodeError::Rejected(m) => ApiError::FailedPrecondition(m),
            NodeError::NoSpace { .. } => ApiError::ResourceExhausted(e.to_string()),
        }
    }
}

impl ApiError {
    /// The leader's answer to a request this server forwarded: retried if
    /// the leader promised it was not applied, else passed on as it is.
    pub(crate) fn from_leader(status: Status) -> ApiError {
        if status.metadata().get(NOT_APPLIED).is_some() {
            ApiError::NotApplied(status.message().to_owned())
        } else {
            ApiError::Remote(status)
        }
    }
}

/// A bad field of a request.
pub(crate) fn bad(field: impl Into<String>, reason: impl Into<String>) -> ApiError {
    ApiError::InvalidArgument {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A write that was proposed but not confirmed within `budget`.
pub(crate) fn write_timeout(budget: Duration) -> ApiError {
    ApiError::Timeout(format!(
        "the write was not confirmed within {} ms; it may or may not have been applied",
        budget.as_millis()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_was_not_proposed_or_lost_its_index_is_retried() {
        let retried = [
            NodeError::NotLeader { leader: 2 },
            NodeError::NoLeader,
            NodeError::Dropped,
            NodeError::ConfBusy,
        ];
        for e in retried {
            let api = ApiError::from(e.clone());
            assert!(matches!(api, ApiError::NotApplied(_)), "{e:?} -> {api:?}");
            let status = Status::from(api);
            assert_eq!(status.code(), tonic::Code::Unavailable);
            assert!(status.metadata().get(NOT_APPLIED).is_some(), "{e:?}");
        }
        for e in [NodeError::LeadershipChanged, NodeError::Stopped] {
            let status = Status::from(ApiError::from(e.clone()));
            assert_eq!(status.code(), tonic::Code::Unavailable, "{e:?}");
            assert!(status.metadata().get(NOT_APPLIED).is_none(), "{e:?}");
        }
        let status = Status::from(ApiError::from(NodeError::Rejected("no".into())));
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    }

    #[test]
    fn a_forwarded_answer_keeps_the_leaders_promise() {
        let not_applied = Status::from(ApiError::NotApplied("moved".into()));
        assert!(matches!(
            ApiError::from_leader(not_applied),
            ApiError::NotApplied(m) if m == "moved"
        ));
        let other = Status::invalid_argument("key: must not be empty");
        match ApiError::from_leader(other) {
            ApiError::Remote(s) => assert_eq!(s.code(), tonic::Code::InvalidArgument),
            e => panic!("{e:?}"),
        }
    }
}
