//! `zonectl services`: the front-end's own services, set once for the zone.
//! `set` names the units run only on the leader (zone-vip starts them after
//! the VIP, the required and exclusive datastores and the fence delay, and
//! stops them when the lease ends) and those run on every server; `clear`
//! goes back to each server's identity (`leader_units`); `status` shows
//! what the zone sets and how each server's systemd says each unit is.

use std::time::Duration;

use clap::Subcommand;
use tonic::transport::Channel;
use zonectl::v1::{
    cluster_client::ClusterClient, services_client::ServicesClient, ClearServicesRequest,
    GetServicesRequest, GetServicesResponse, Role, SetServicesRequest, StatusRequest,
    StatusResponse,
};

#[derive(Debug, Subcommand)]
pub enum ServicesCommand {
    /// Set the zone's services (admin): the units run only on the leader,
    /// in start order (stopped in the reverse), or the units run on every
    /// server, or both; a list not given stays as it is. From then on the
    /// identities' `leader_units` are not used, until `clear`. A unit must
    /// exist on the servers (in the image or a system extension, `zonectl
    /// ext add`).
    #[command(arg_required_else_help = true)]
    Set {
        /// Units run only on the leader (e.g. mariadb.service
        /// opennebula.service), replacing the zone's list.
        #[arg(long, num_args = 1.., value_name = "UNIT", conflicts_with = "no_leader")]
        leader: Vec<String>,
        /// Units run on every server (e.g. opennebula-gate.service),
        /// replacing the zone's list.
        #[arg(long, num_args = 1.., value_name = "UNIT", conflicts_with = "no_everywhere")]
        everywhere: Vec<String>,
        /// No leader-only unit (the identities' `leader_units` stay
        /// unused).
        #[arg(long)]
        no_leader: bool,
        /// No unit on every server.
        #[arg(long)]
        no_everywhere: bool,
    },
    /// Stop setting services for the zone (admin): each server's identity
    /// (`leader_units`) says again which units are leader-only.
    Clear,
    /// What the zone sets, and each server's state of each unit (as its
    /// systemd says, read every 5 s).
    Status,
}

pub async fn run(
    cmd: ServicesCommand,
    channel: Channel,
    timeout: Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut c = ServicesClient::new(channel.clone());
    match cmd {
        ServicesCommand::Set {
            leader,
            everywhere,
            no_leader,
            no_everywhere,
        } => {
            let set_leader = no_leader || !leader.is_empty();
            let set_everywhere = no_everywhere || !everywhere.is_empty();
            let r = c
                .set(crate::t(
                    SetServicesRequest {
                        leader_units: leader,
                        everywhere_units: everywhere,
                        set_leader,
                        set_everywhere,
                    },
                    timeout,
                ))
                .await?
                .into_inner();
            let now = c
                .get(crate::t(GetServicesRequest {}, timeout))
                .await?
                .into_inner()
                .services
                .unwrap_or_default();
            if as_json {
                crate::print_json(&serde_json::json!({
                    "revision": r.revision,
                    "leader_units": now.leader_units,
                    "everywhere_units": now.everywhere_units,
                }));
            } else {
                println!(
                    "the zone's services set at revision {}: leader-only {}; everywhere {}",
                    r.revision,
                    list(&now.leader_units),
                    list(&now.everywhere_units)
                );
            }
        }
        ServicesCommand::Clear => {
            let r = c
                .clear(crate::t(ClearServicesRequest {}, timeout))
                .await?
                .into_inner();
            if as_json {
                crate::print_json(&serde_json::json!({ "revision": r.revision }));
            } else {
                println!(
                    "the zone's services cleared at revision {}: each server's identity says which units are leader-only",
                    r.revision
                );
            }
        }
        ServicesCommand::Status => {
            let set = c
                .get(crate::t(GetServicesRequest {}, timeout))
                .await?
                .into_inner();
            let zone = ClusterClient::new(channel)
                .status(crate::t(StatusRequest {}, timeout))
                .await?
                .into_inner();
            if as_json {
                crate::print_json(&status_json(&set, &zone));
            } else {
                print!("{}", render(&set, &zone));
            }
        }
    }
    Ok(())
}

fn list(units: &[String]) -> String {
    if units.is_empty() {
        "(none)".into()
    } else {
        units.join(" ")
    }
}

/// systemd's word for a unit's state: `active (running)`, `inactive
/// (dead)`, `not-found`, or `?` when the server could not ask.
fn state_word(u: &zonectl::v1::UnitStatus) -> String {
    if u.load_state.is_empty() && u.active_state.is_empty() {
        "?".into()
    } else if u.load_state == "not-found" {
        "not-found".into()
    } else if u.sub_state.is_empty() {
        u.active_state.clone()
    } else {
        format!("{} ({})", u.active_state, u.sub_state)
    }
}

fn status_json(set: &GetServicesResponse, zone: &StatusResponse) -> serde_json::Value {
    let s = set.services.clone().unwrap_or_default();
    serde_json::json!({
        "set": set.set,
        "mod_revision": set.mod_revision,
        "leader_units": s.leader_units,
        "everywhere_units": s.everywhere_units,
        "leader_id": zone.leader_id,
        "servers": zone.servers.iter().map(|srv| serde_json::json!({
            "id": srv.id,
            "name": srv.name,
            "reachable": srv.role != Role::Unreachable as i32,
            "units": srv.units.iter().map(|u| serde_json::json!({
                "name": u.name,
                "role": u.role,
                "load_state": u.load_state,
                "active_state": u.active_state,
                "sub_state": u.sub_state,
                "age_ms": u.age_ms,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn render(set: &GetServicesResponse, zone: &StatusResponse) -> String {
    let mut out = String::new();
    let Some(s) = set.services.as_ref().filter(|_| set.set) else {
        out.push_str("the zone sets no services: each server's identity (`leader_units`) says which units are leader-only (zonectl services set)\n");
        return out;
    };
    out.push_str(&format!(
        "leader-only: {}\neverywhere:  {}\n(set at revision {})\n\n",
        list(&s.leader_units),
        list(&s.everywhere_units),
        set.mod_revision
    ));
    let units: Vec<(&str, &str)> = s
        .leader_units
        .iter()
        .map(|u| (u.as_str(), "leader"))
        .chain(
            s.everywhere_units
                .iter()
                .map(|u| (u.as_str(), "everywhere")),
        )
        .collect();
    if units.is_empty() {
        return out;
    }
    let width = units.iter().map(|(u, _)| u.len()).max().unwrap_or(4).max(4);
    out.push_str(&format!("{:<width$}  {:<10}  SERVERS\n", "UNIT", "ROLE"));
    for (unit, role) in units {
        let per: Vec<String> = zone
            .servers
            .iter()
            .map(|srv| {
                let lead = if srv.id == zone.leader_id { "*" } else { "" };
                let word = if srv.role == Role::Unreachable as i32 {
                    "unreachable".to_owned()
                } else {
                    srv.units
                        .iter()
                        .find(|u| u.name == unit)
                        .map_or_else(|| "not reported yet".to_owned(), state_word)
                };
                format!("{}{lead}: {word}", srv.id)
            })
            .collect();
        out.push_str(&format!("{unit:<width$}  {role:<10}  {}\n", per.join("; ")));
    }
    out.push_str("(* the leader)\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use zonectl::v1::{ServerStatus, UnitStatus, ZoneServices};

    #[test]
    fn status_shows_each_unit_on_each_server() {
        let set = GetServicesResponse {
            set: true,
            services: Some(ZoneServices {
                leader_units: vec!["mariadb.service".into()],
                everywhere_units: vec!["gate.service".into()],
                updated_unix_ms: 0,
            }),
            mod_revision: 12,
        };
        let unit = |name: &str, role: &str, active: &str, sub: &str| UnitStatus {
            name: name.into(),
            role: role.into(),
            load_state: "loaded".into(),
            active_state: active.into(),
            sub_state: sub.into(),
            age_ms: 100,
        };
        let zone = StatusResponse {
            leader_id: 1,
            servers: vec![
                ServerStatus {
                    id: 1,
                    role: Role::Leader as i32,
                    units: vec![
                        unit("mariadb.service", "leader", "active", "running"),
                        unit("gate.service", "everywhere", "active", "running"),
                    ],
                    ..ServerStatus::default()
                },
                ServerStatus {
                    id: 2,
                    role: Role::Follower as i32,
                    units: vec![unit("mariadb.service", "leader", "inactive", "dead")],
                    ..ServerStatus::default()
                },
                ServerStatus {
                    id: 3,
                    role: Role::Unreachable as i32,
                    ..ServerStatus::default()
                },
            ],
            ..StatusResponse::default()
        };
        let text = render(&set, &zone);
        assert!(text.contains("leader-only: mariadb.service\n"), "{text}");
        assert!(
            text.contains("mariadb.service  leader      1*: active (running); 2: inactive (dead); 3: unreachable"),
            "{text}"
        );
        assert!(
            text.contains("gate.service     everywhere  1*: active (running); 2: not reported yet; 3: unreachable"),
            "{text}"
        );
        let none = render(&GetServicesResponse::default(), &zone);
        assert!(none.starts_with("the zone sets no services"), "{none}");
    }
}
