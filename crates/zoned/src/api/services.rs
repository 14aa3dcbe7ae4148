//! `zone.v1.Services`: the front-end's own services, set once for the zone
//! (`zonectl services set --leader UNIT... --everywhere UNIT...`).
//!
//! The zone keeps them under [`SERVICES_KEY`] (written here only). Every
//! server follows it ([`run`]): its zone-vip gets the leader-only units
//! with each lease state (`LeaseState.leader_units`, in place of its own
//! configuration's while the zone sets them), and its status shows how
//! systemd says each of the zone's units is doing there (`ServerStatus.
//! units`, read every few seconds with `systemctl show`).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use tonic::{Request, Response, Status};
use zone_proto::v1::{
    command, command_result, request_op, services_server, ClearServicesRequest,
    ClearServicesResponse, DeleteRequest, GetRequest, GetServicesRequest, GetServicesResponse,
    PutRequest, RequestOp, SetServicesRequest, SetServicesResponse, UnitStatus, ZoneServices,
};

use super::error::bad;
use super::{ApiError, ServerContext};

/// The zone's services: a [`ZoneServices`].
pub const SERVICES_KEY: &[u8] = b"zone/services";
/// The most units of each kind.
pub const MAX_UNITS: usize = 64;
/// How often each server reads the key it applied (for its zone-vip).
const FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// How often each server asks systemd how the zone's units are doing.
const STATUS_EVERY: Duration = Duration::from_secs(5);
/// The longest `systemctl show` may take.
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(5);

/// The zone's services as this server applied them (None: not set), and
/// the revision they were written at.
pub(crate) fn read(reader: &crate::kv::Reader) -> Result<Option<(ZoneServices, u64)>, ApiError> {
    let (kv, _) = reader
        .get(&GetRequest {
            key: SERVICES_KEY.to_vec(),
            serializable: true,
        })
        .map_err(ApiError::from)?;
    let Some(kv) = kv else {
        return Ok(None);
    };
    let s = ZoneServices::decode(kv.value.as_slice()).map_err(|e| {
        ApiError::FailedPrecondition(format!(
            "the zone's services (zone/services) cannot be decoded: {e}"
        ))
    })?;
    Ok(Some((s, kv.mod_revision)))
}

/// Checks a request's units: each a plausible zone unit, none twice, none
/// both leader-only and everywhere.
fn check(req: &SetServicesRequest) -> Result<(), ApiError> {
    for (field, units) in [
        ("leader_units", &req.leader_units),
        ("everywhere_units", &req.everywhere_units),
    ] {
        if units.len() > MAX_UNITS {
            return Err(bad(
                field,
                format!("{} units: at most {MAX_UNITS}", units.len()),
            ));
        }
        for (i, u) in units.iter().enumerate() {
            if !zone_proto::zone_unit_ok(u) {
                return Err(bad(
                    format!("{field}[{i}]"),
                    format!("`{}`: {}", u.escape_debug(), zone_proto::ZONE_UNIT_RULE),
                ));
            }
            if units[..i].contains(u) {
                return Err(bad(
                    format!("{field}[{i}]"),
                    format!("`{u}` is listed twice"),
                ));
            }
        }
    }
    if let Some(u) = req
        .leader_units
        .iter()
        .find(|u| req.everywhere_units.contains(u))
    {
        return Err(bad(
            "everywhere_units",
            format!("`{u}` is also leader-only: a unit runs on the leader or everywhere, not both"),
        ));
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub struct ServicesService {
    zone: ServerContext,
}

impl std::fmt::Debug for ServicesService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServicesService").finish()
    }
}

impl ServicesService {
    pub fn new(zone: ServerContext) -> ServicesService {
        ServicesService { zone }
    }
}

#[tonic::async_trait]
impl services_server::Services for ServicesService {
    async fn set(
        &self,
        req: Request<SetServicesRequest>,
    ) -> Result<Response<SetServicesResponse>, Status> {
        let budget = self.zone.budget(&req);
        let req = req.into_inner();
        if !req.set_leader && !req.set_everywhere {
            return Err(bad(
                "set_leader",
                "neither list is set: set the leader-only units, the everywhere units, or both",
            )
            .into());
        }
        // The list not given stays as the zone has it.
        self.zone.linearize(budget).await?;
        let (now, seen) = read(self.zone.reader())?.unwrap_or_default();
        let merged = SetServicesRequest {
            leader_units: if req.set_leader {
                req.leader_units
            } else {
                now.leader_units
            },
            everywhere_units: if req.set_everywhere {
                req.everywhere_units
            } else {
                now.everywhere_units
            },
            set_leader: true,
            set_everywhere: true,
        };
        check(&merged)?;
        let value = ZoneServices {
            leader_units: merged.leader_units,
            everywhere_units: merged.everywhere_units,
            updated_unix_ms: now_ms(),
        };
        let put = PutRequest {
            key: SERVICES_KEY.to_vec(),
            value: value.encode_to_vec(),
            prev_kv: false,
        };
        self.zone.check_enabled()?;
        self.zone.check_space(&command::Op::Put(put.clone()))?;
        // Only over what was read: a `services set` in between is not
        // overwritten unseen.
        let op = RequestOp {
            request: Some(request_op::Request::Put(put)),
        };
        let Some(revision) = self
            .zone
            .write_if_unchanged(SERVICES_KEY, seen, vec![op], budget)
            .await?
        else {
            return Err(ApiError::NotApplied(
                "the zone's services changed while they were being set (another `zonectl services set`?): not set; look at `zonectl services status` and retry".into(),
            )
            .into());
        };
        tracing::info!(leader = ?value.leader_units, everywhere = ?value.everywhere_units, revision, "the zone's services set");
        Ok(Response::new(SetServicesResponse { revision }))
    }

    async fn clear(
        &self,
        req: Request<ClearServicesRequest>,
    ) -> Result<Response<ClearServicesResponse>, Status> {
        let budget = self.zone.budget(&req);
        let op = command::Op::Delete(DeleteRequest {
            key: SERVICES_KEY.to_vec(),
            prefix: false,
            prev_kv: false,
        });
        self.zone.check_enabled()?;
        let r = self.zone.write(op, budget).await?;
        let revision = match r.result {
            Some(command_result::Result::Delete(d)) => d.header.map_or(0, |h| h.revision),
            _ => 0,
        };
        tracing::info!(
            revision,
            "the zone's services cleared: each server's identity says again"
        );
        Ok(Response::new(ClearServicesResponse { revision }))
    }

    async fn get(
        &self,
        req: Request<GetServicesRequest>,
    ) -> Result<Response<GetServicesResponse>, Status> {
        let budget = self.zone.budget(&req);
        self.zone.linearize(budget).await?;
        let found = read(self.zone.reader())?;
        Ok(Response::new(match found {
            Some((s, mod_revision)) => GetServicesResponse {
                set: true,
                services: Some(s),
                mod_revision,
            },
            None => GetServicesResponse::default(),
        }))
    }
}

/// systemd's answer for one unit: its LoadState, ActiveState and
/// SubState.
type States = (String, String, String);

/// The zone's units on this server, as its systemd last said.
#[derive(Debug, Default)]
pub struct UnitsSeen {
    /// (name, role) asked about, and systemd's answer for each.
    units: Vec<(String, &'static str, Option<States>)>,
    at: Option<Instant>,
}

impl UnitsSeen {
    /// For `ServerStatus.units`.
    pub fn status(&self) -> Vec<UnitStatus> {
        let age_ms = self.at.map_or(0, |t| t.elapsed().as_millis() as u64);
        self.units
            .iter()
            .map(|(name, role, s)| {
                let (load, active, sub) = s.clone().unwrap_or_default();
                UnitStatus {
                    name: name.clone(),
                    role: (*role).to_owned(),
                    load_state: load,
                    active_state: active,
                    sub_state: sub,
                    age_ms,
                }
            })
            .collect()
    }
}

/// `systemctl show`'s answer for `units`, in their order: each unit's
/// (LoadState, ActiveState, SubState), or why systemd could not be asked.
async fn systemctl_show(units: &[String]) -> Result<Vec<Option<(String, String, String)>>, String> {
    let mut cmd = tokio::process::Command::new("systemctl");
    cmd.args(["show", "--property=Id,LoadState,ActiveState,SubState", "--"])
        .args(units)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(SYSTEMCTL_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("systemctl show took more than {SYSTEMCTL_TIMEOUT:?}"))?
        .map_err(|e| format!("running systemctl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "systemctl show: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(parse_show(
        &String::from_utf8_lossy(&out.stdout),
        units.len(),
    ))
}

/// `systemctl show` prints one block of `KEY=VALUE` lines per unit, in the
/// order asked, separated by blank lines.
fn parse_show(text: &str, n: usize) -> Vec<Option<States>> {
    let mut blocks: Vec<Option<States>> = text
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            let get = |k: &str| {
                b.lines()
                    .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                    .unwrap_or("")
                    .to_owned()
            };
            Some((get("LoadState"), get("ActiveState"), get("SubState")))
        })
        .collect();
    blocks.resize(n, None);
    blocks
}

/// On every server, for as long as zoned runs: the zone's leader-only
/// units for the lease stream (from what this server applied, every
/// second), and how systemd says the zone's units are doing here.
///
/// A server that has just become leader may not have applied the latest
/// `services set` yet: for up to a second its zone-vip may have the list
/// before it (and then swaps, stopping what it dropped). With fencing
/// (the default) nothing starts before the fence delay, long after.
/// Nothing starts from a stale list that a fenced old leader still runs:
/// the delay covers every unit alike.
pub async fn run(zone: ServerContext) {
    let mut last_status: Option<Instant> = None;
    let mut complained = false;
    loop {
        let services = match read(zone.reader()) {
            Ok(s) => s.map(|(s, _)| s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the zone's services");
                tokio::time::sleep(FOLLOW_EVERY).await;
                continue;
            }
        };
        zone.agents
            .set_leader_units(services.as_ref().map(|s| s.leader_units.clone()));
        if last_status.is_none_or(|t| t.elapsed() >= STATUS_EVERY) {
            last_status = Some(Instant::now());
            let asked: Vec<(String, &'static str)> = services
                .iter()
                .flat_map(|s| {
                    s.leader_units
                        .iter()
                        .map(|u| (u.clone(), "leader"))
                        .chain(s.everywhere_units.iter().map(|u| (u.clone(), "everywhere")))
                })
                .collect();
            let answers = if asked.is_empty() {
                Ok(Vec::new())
            } else {
                let names: Vec<String> = asked.iter().map(|(u, _)| u.clone()).collect();
                systemctl_show(&names).await
            };
            let answers = match answers {
                Ok(a) => {
                    complained = false;
                    a
                }
                Err(e) => {
                    if !complained {
                        tracing::warn!(error = %e, "cannot ask systemd how the zone's units are doing");
                        complained = true;
                    }
                    vec![None; asked.len()]
                }
            };
            zone.agents.set_units_seen(UnitsSeen {
                units: asked
                    .into_iter()
                    .zip(answers)
                    .map(|((u, r), a)| (u, r, a))
                    .collect(),
                at: Some(Instant::now()),
            });
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_checked_naming_the_field() {
        let req = |leader: &[&str], everywhere: &[&str]| SetServicesRequest {
            leader_units: leader.iter().map(|s| (*s).to_owned()).collect(),
            everywhere_units: everywhere.iter().map(|s| (*s).to_owned()).collect(),
            set_leader: true,
            set_everywhere: true,
        };
        assert!(check(&req(
            &["mariadb.service", "one.service"],
            &["one-web.service"]
        ))
        .is_ok());
        assert!(check(&req(&[], &[])).is_ok());
        let field = |r| match check(&r) {
            Err(ApiError::InvalidArgument { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(req(&["ok.service", "zoned.service"], &[])),
            "leader_units[1]"
        );
        assert_eq!(
            field(req(&["a.service", "a.service"], &[])),
            "leader_units[1]"
        );
        assert_eq!(field(req(&[], &["--now.service"])), "everywhere_units[0]");
        assert_eq!(
            field(req(&["a.service"], &["a.service"])),
            "everywhere_units"
        );
        let many: Vec<String> = (0..=MAX_UNITS).map(|i| format!("u{i}.service")).collect();
        assert_eq!(
            field(SetServicesRequest {
                leader_units: many,
                ..SetServicesRequest::default()
            }),
            "leader_units"
        );
    }

    #[test]
    fn systemctl_show_blocks_are_read_in_order() {
        let text = "Id=mariadb.service\nLoadState=loaded\nActiveState=active\nSubState=running\n\nId=nope.service\nLoadState=not-found\nActiveState=inactive\nSubState=dead\n";
        assert_eq!(
            parse_show(text, 3),
            vec![
                Some(("loaded".into(), "active".into(), "running".into())),
                Some(("not-found".into(), "inactive".into(), "dead".into())),
                None,
            ]
        );
    }
}
