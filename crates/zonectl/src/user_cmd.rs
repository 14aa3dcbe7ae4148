//! `zonectl user`: the zone's client credentials (admin only). `issue`
//! asks a server that holds the zone CA's key to make one and writes it as
//! a credentials directory; `ls` lists what the zone issued; `revoke` ends
//! one, on every server once it has applied the revocation.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};
use tonic::transport::Channel;
use zonectl::v1::{
    users_client::UsersClient, IssueUserRequest, ListUsersRequest, RevokeUserRequest, User,
    UserRole,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    Reader,
    Operator,
    Admin,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Issue a client credential for NAME with ROLE, written to the
    /// directory --out (ca.pem, client.pem, client.key; for `zonectl
    /// --credentials`). The serving server must hold the zone CA's key (a
    /// founder). Roles: reader (reads, watch, status, config get/diff),
    /// operator (and writes, config push/rollback, leader transfer, zone
    /// disable/enable), admin (everything).
    Issue {
        /// The user's name, in the certificate and `user ls`: 1 to 63
        /// lowercase letters, digits or '-'.
        #[arg(long)]
        name: String,
        /// What the credential may do.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// A new (or empty) directory for the credential.
        #[arg(long)]
        out: PathBuf,
    },
    /// List the credentials the zone issued, revoked ones included.
    Ls,
    /// Revoke the credential with SERIAL (hex, as `user ls` prints it):
    /// refused on its next call.
    Revoke {
        serial: String,
        /// Revoke a serial the zone has no record of (zonectl zone init's
        /// admin, a server's local admin).
        #[arg(long)]
        unlisted: bool,
    },
}

fn role_name(r: i32) -> &'static str {
    match UserRole::try_from(r) {
        Ok(UserRole::Reader) => "reader",
        Ok(UserRole::Operator) => "operator",
        Ok(UserRole::Admin) => "admin",
        _ => "-",
    }
}

fn date(unix: u64) -> String {
    if unix == 0 {
        return "-".into();
    }
    i64::try_from(unix)
        .ok()
        .and_then(|u| time::OffsetDateTime::from_unix_timestamp(u).ok())
        .map_or_else(|| "-".into(), |t| t.date().to_string())
}

fn json(u: &User) -> serde_json::Value {
    serde_json::json!({
        "name": u.name,
        "role": role_name(u.role),
        "serial": u.serial,
        "issued_unix": u.issued_unix,
        "expires_unix": u.expires_unix,
        "issued_by": u.issued_by,
        "signed_by_server": u.signed_by_server,
        "revoked": u.revoked,
        "revoked_unix": u.revoked_unix,
        "revoked_by": u.revoked_by,
    })
}

/// Writes the credential into `out`: a new directory (0700), or an empty
/// one; the key readable by its owner alone.
fn write_credential(out: &Path, ca: &str, cert: &str, key: &str) -> anyhow::Result<()> {
    if !crate::pki_cmd::empty_or_absent(out)? {
        bail!("--out {}: not empty; nothing was written", out.display());
    }
    if !out.exists() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(out)
            .with_context(|| format!("--out {}: cannot create it", out.display()))?;
    }
    for (name, text, mode) in [
        ("ca.pem", ca, 0o644),
        ("client.pem", cert, 0o644),
        ("client.key", key, 0o600),
    ] {
        use std::io::Write as _;
        let path = out.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The table `user ls` prints.
pub fn render(users: &[User]) -> String {
    let mut rows = vec![[
        "SERIAL".to_owned(),
        "NAME".into(),
        "ROLE".into(),
        "ISSUED".into(),
        "EXPIRES".into(),
        "BY".into(),
        "STATE".into(),
    ]];
    for u in users {
        rows.push([
            u.serial.clone(),
            if u.name.is_empty() {
                "(unlisted)".into()
            } else {
                u.name.clone()
            },
            role_name(u.role).into(),
            date(u.issued_unix),
            date(u.expires_unix),
            u.issued_by.clone(),
            if u.revoked {
                format!("revoked {} by {}", date(u.revoked_unix), u.revoked_by)
            } else {
                "valid".into()
            },
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub async fn run(
    cmd: UserCommand,
    channel: Channel,
    timeout: std::time::Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut c = UsersClient::new(channel);
    match cmd {
        UserCommand::Issue { name, role, out } => {
            let role = match role {
                RoleArg::Reader => UserRole::Reader,
                RoleArg::Operator => UserRole::Operator,
                RoleArg::Admin => UserRole::Admin,
            };
            // Checked before asking: a credential the zone recorded but
            // that could not be written is one to revoke at once.
            if !crate::pki_cmd::empty_or_absent(&out)? {
                bail!("--out {}: not empty; nothing was issued", out.display());
            }
            let r = c
                .issue(crate::t(
                    IssueUserRequest {
                        name,
                        role: role as i32,
                    },
                    timeout,
                ))
                .await?
                .into_inner();
            let user = r.user.unwrap_or_default();
            write_credential(&out, &r.ca_pem, &r.cert_pem, &r.key_pem).with_context(|| {
                format!(
                    "the credential (serial {}) was issued but not written: revoke it (zonectl user revoke {})",
                    user.serial, user.serial
                )
            })?;
            if as_json {
                let mut v = json(&user);
                v["out"] = serde_json::json!(out);
                crate::print_json(&v);
            } else {
                println!(
                    "issued {} ({}), serial {}, valid until {}, written to {} (use it with zonectl --credentials {})",
                    user.name,
                    role_name(user.role),
                    user.serial,
                    date(user.expires_unix),
                    out.display(),
                    out.display()
                );
            }
        }
        UserCommand::Ls => {
            let r = c
                .list(crate::t(ListUsersRequest {}, timeout))
                .await?
                .into_inner();
            if as_json {
                crate::print_json(&serde_json::json!({
                    "users": r.users.iter().map(json).collect::<Vec<_>>()
                }));
            } else {
                print!("{}", render(&r.users));
            }
        }
        UserCommand::Revoke { serial, unlisted } => {
            let r = c
                .revoke(crate::t(RevokeUserRequest { serial, unlisted }, timeout))
                .await?
                .into_inner();
            let user = r.user.unwrap_or_default();
            if as_json {
                crate::print_json(&json(&user));
            } else {
                println!(
                    "revoked {} (serial {}): refused on its next call",
                    if user.name.is_empty() {
                        "an unlisted credential"
                    } else {
                        &user.name
                    },
                    user.serial
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(date(0), "-");
        assert_eq!(date(86_400), "1970-01-02");
        assert_eq!(date(1_796_496_000), "2026-12-05");
        assert_eq!(date(951_782_400), "2000-02-29");
    }
}
