//! Node certificates renewed before they expire. Every server checks its
//! own a few seconds after it starts, then hourly: once less than a third
//! of its life is left (about four months of a year's), it gets a new one
//! for the same key, valid a year from then:
//! - a server holding the zone CA's key (a founder) signs its own;
//! - another asks the members, one after the other, over the peer port
//!   (`Peer.Renew`): one that holds the CA's key signs for the key of the
//!   certificate presented on that call, and the id it names ([`sign`]).
//!
//! The new certificate is checked, written to `node.pem` atomically, and
//! presented from the next handshake on (no restart,
//! [`crate::tls::ZoneTls::renew`]). A failure is logged and tried again a
//! minute later; `zonectl show` says when each certificate expires, and
//! warns of one that was not renewed in time.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::Status;
use zone_proto::v1::RenewRequest;

use crate::api::{ApiError, ServerContext};
use crate::tls::ZoneTls;

/// The first check, after start: time for the peers' links to come up.
const FIRST_CHECK: Duration = Duration::from_secs(5);
/// Between checks.
const CHECK_EVERY: Duration = Duration::from_secs(3600);
/// After a failed renewal.
const RETRY: Duration = Duration::from_secs(60);
/// How long a member has to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Whether a certificate valid from `not_before` to `not_after` is due for
/// renewal at `now`: less than a third of its life left.
pub fn due(not_before: i64, not_after: i64, now: i64) -> bool {
    let life = (not_after - not_before).max(0);
    not_after - now < life / 3
}

/// The IP of server `id`'s peer address, as the membership has it.
async fn address_of(zone: &ServerContext, id: u64) -> Result<Vec<IpAddr>, ApiError> {
    let members = zone.members().await?.members;
    Ok(members
        .iter()
        .find(|m| m.id == id)
        .and_then(|m| crate::api::join::ip_of(&m.peer_endpoint))
        .into_iter()
        .collect())
}

/// A node certificate for server `id` and `public_key`, signed here if
/// this server holds the zone CA's key. The caller has checked who asks.
pub async fn sign(zone: &ServerContext, id: u64, public_key: &[u8]) -> Result<String, Status> {
    let Some(ca) = zone.transport().tls().zone_ca() else {
        return Err(Status::failed_precondition(format!(
            "server {} does not hold the zone CA's key",
            zone.node().id()
        )));
    };
    let addresses = address_of(zone, id).await?;
    ca.issue_node_for(id, &addresses, public_key)
        .map(|c| c.cert_pem)
        .map_err(|e| Status::internal(e.to_string()))
}

/// Renews this server's certificate if it is due; whether it did.
async fn renew_once(zone: &ServerContext, tls: &ZoneTls) -> Result<bool, String> {
    let me = zone.node().id();
    let facts = zone_pki::facts_pem(&tls.node_cert_pem())
        .ok_or("this server's node certificate cannot be read")?;
    if !due(facts.not_before_unix, facts.not_after_unix, now_unix()) {
        return Ok(false);
    }
    let cert = if tls.zone_ca().is_some() {
        sign(zone, me, &facts.public_key)
            .await
            .map_err(|s| s.message().to_owned())?
    } else {
        ask_members(zone, me).await?
    };
    tls.renew(me, &cert)
        .map_err(|e| crate::logging::chain(&e))?;
    zone.transport().relink();
    let expires = zone_pki::facts_pem(&cert).map_or(0, |f| f.not_after_unix);
    tracing::info!(
        expires = %zone_pki::utc(expires),
        was = %zone_pki::utc(facts.not_after_unix),
        "renewed this server's node certificate"
    );
    Ok(true)
}

/// Asks the other members, in turn, until one that holds the CA's key
/// signs.
async fn ask_members(zone: &ServerContext, me: u64) -> Result<String, String> {
    let members = zone.members().await.map_err(|e| e.to_string())?.members;
    let mut why = Vec::new();
    for m in members.iter().filter(|m| m.id != me) {
        let Some(mut client) = zone.transport().client(m.id) else {
            why.push(format!("server {}: no address", m.id));
            continue;
        };
        let mut req = tonic::Request::new(RenewRequest {});
        req.set_timeout(ASK_TIMEOUT);
        match tokio::time::timeout(ASK_TIMEOUT, client.renew(req)).await {
            Ok(Ok(r)) => return Ok(r.into_inner().cert_pem),
            Ok(Err(s)) => why.push(format!("server {}: {}", m.id, s.message())),
            Err(_) => why.push(format!("server {}: no answer", m.id)),
        }
    }
    Err(format!(
        "no member renewed it ({})",
        if why.is_empty() {
            "no other member".to_owned()
        } else {
            why.join("; ")
        }
    ))
}

/// Keeps this server's node certificate renewed, for as long as it runs.
pub async fn run(zone: ServerContext, tls: ZoneTls) {
    tokio::time::sleep(FIRST_CHECK).await;
    loop {
        let wait = match renew_once(&zone, &tls).await {
            Ok(_) => CHECK_EVERY,
            Err(e) => {
                tracing::warn!(error = %e, "renewing this server's node certificate failed; trying again in a minute");
                RETRY
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_due_with_a_third_of_its_life_left() {
        let year = 365 * 86_400;
        assert!(!due(0, year, 0));
        assert!(!due(0, year, year / 2));
        assert!(!due(0, year, year - year / 3));
        assert!(due(0, year, year - year / 3 + 1));
        assert!(due(0, year, year + 5), "an expired one too");
    }
}
