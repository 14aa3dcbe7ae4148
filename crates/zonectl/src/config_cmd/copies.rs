//! `zonectl config diff` and `import`: each server's own copy of a managed
//! file, read through that server, compared with the zone's version
//! rendered for it, or stored as the zone's.

use tonic::transport::Channel;
use zone_files::template::{NodeVars, Template};
use zonectl::v1::{
    config_client::ConfigClient, GetFileRequest, ListFilesRequest, ManagedFile, ReadLocalRequest,
    ReadLocalResponse,
};

use super::{print_json, push_file, t, zone_view, Differ};

/// The zone's version of a file as a server renders it.
fn rendered(f: &ManagedFile, vars: &NodeVars) -> Result<Vec<u8>, String> {
    if !f.template {
        return Ok(f.content.clone());
    }
    let text = std::str::from_utf8(&f.content).map_err(|_| "the template is not UTF-8")?;
    let t = Template::parse(text).map_err(|e| e.to_string())?;
    Ok(t.render(vars).into_bytes())
}

fn owner_name(s: &str) -> &str {
    if s.is_empty() {
        "root"
    } else {
        s
    }
}

/// How a server's copy differs from the zone's version rendered for it;
/// empty when they match. `-` lines are the zone's, `+` lines the disk's.
fn compare(stored: &ManagedFile, vars: &NodeVars, disk: &ReadLocalResponse) -> Vec<String> {
    let who = format!("server {} ({})", vars.id, vars.name);
    let path = &stored.path;
    if !disk.exists {
        return vec![format!("{who}: {path}: missing on disk")];
    }
    let mut out = Vec::new();
    let want_mode = if stored.mode == 0 { 0o644 } else { stored.mode };
    if disk.mode != want_mode {
        out.push(format!(
            "{who}: {path}: mode {:o} on disk, {want_mode:o} in the zone",
            disk.mode
        ));
    }
    for (what, zone, local) in [
        ("owner", owner_name(&stored.owner), disk.owner.as_str()),
        ("group", owner_name(&stored.group), disk.group.as_str()),
    ] {
        if zone != local {
            out.push(format!(
                "{who}: {path}: {what} {local} on disk, {zone} in the zone"
            ));
        }
    }
    let want = match rendered(stored, vars) {
        Ok(w) => w,
        Err(e) => {
            out.push(format!(
                "{who}: {path}: cannot render the zone's version: {e}"
            ));
            return out;
        }
    };
    if want != disk.content {
        match (
            std::str::from_utf8(&want),
            std::str::from_utf8(&disk.content),
        ) {
            (Ok(a), Ok(b)) => out.push(
                similar::TextDiff::from_lines(a, b)
                    .unified_diff()
                    .context_radius(3)
                    .header(
                        &format!(
                            "zone {path} (version {}, rendered for server {})",
                            stored.version, vars.id
                        ),
                        &format!("{who} {path}"),
                    )
                    .to_string(),
            ),
            _ => out.push(format!(
                "{who}: {path}: binary content differs ({} bytes on disk, {} in the zone)",
                disk.content.len(),
                want.len()
            )),
        }
    }
    out
}

async fn read_local(
    endpoint: &str,
    path: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<ReadLocalResponse> {
    let (ch, _) = crate::connect(&[endpoint.to_owned()]).await?;
    Ok(ConfigClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .read_local(t(
            ReadLocalRequest {
                path: path.to_owned(),
            },
            timeout,
        ))
        .await?
        .into_inner())
}

/// `config diff`: every copy of `path` (every managed file) on `server`
/// (every server) against the zone's version.
pub(super) async fn diff(
    c: &mut ConfigClient<Channel>,
    channel: &Channel,
    path: Option<String>,
    server: Option<u64>,
    timeout: std::time::Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    let files = match path {
        Some(p) => vec![c
            .get(t(GetFileRequest { path: p }, timeout))
            .await?
            .into_inner()
            .file
            .unwrap_or_default()],
        None => {
            let list = c.list(t(ListFilesRequest {}, timeout)).await?.into_inner();
            let mut files = Vec::new();
            for f in list.files {
                files.push(
                    c.get(t(GetFileRequest { path: f.path }, timeout))
                        .await?
                        .into_inner()
                        .file
                        .unwrap_or_default(),
                );
            }
            files
        }
    };
    let view = zone_view(channel, timeout).await?;
    let servers: Vec<_> = view
        .servers
        .iter()
        .filter(|s| server.is_none_or(|id| s.id == id))
        .collect();
    if servers.is_empty() {
        anyhow::bail!(
            "--server: {} is not a member of the zone",
            server.unwrap_or_default()
        );
    }
    let mut differ = 0;
    let mut failed = Vec::new();
    let mut rows = Vec::new();
    for s in &servers {
        let vars = NodeVars::from_member(s.id, &s.name, &s.peer_endpoint);
        for f in &files {
            let found = if s.client_endpoint.is_empty() {
                Err(anyhow::anyhow!("unreachable: {}", s.error))
            } else {
                read_local(&s.client_endpoint, &f.path, timeout).await
            };
            let (state, notes) = match found {
                Ok(disk) => {
                    let notes = compare(f, &vars, &disk);
                    (if notes.is_empty() { "same" } else { "differs" }, notes)
                }
                Err(e) => {
                    let e = match e.downcast_ref::<tonic::Status>() {
                        Some(st) => st.message().to_owned(),
                        None => format!("{e:#}"),
                    };
                    failed.push(format!("server {}: {}: {e}", s.id, f.path));
                    (
                        "error",
                        vec![format!("server {} ({}): {}: {e}", s.id, s.name, f.path)],
                    )
                }
            };
            if state == "differs" {
                differ += 1;
            }
            if as_json {
                rows.push(serde_json::json!({
                    "server": s.id, "name": s.name, "path": f.path,
                    "state": state, "notes": notes,
                }));
            } else {
                for n in &notes {
                    print!("{n}");
                    if !n.ends_with('\n') {
                        println!();
                    }
                }
            }
        }
    }
    let checked = files.len() * servers.len();
    if as_json {
        print_json(
            &serde_json::json!({ "copies": rows, "differ": differ, "errors": failed.len() }),
        );
    } else {
        let n =
            |k: usize, one: &str, many: &str| format!("{k} {}", if k == 1 { one } else { many });
        println!(
            "{} checked ({} on {}): {differ} differ, {} could not be read",
            n(checked, "copy", "copies"),
            n(files.len(), "file", "files"),
            n(servers.len(), "server", "servers"),
            failed.len()
        );
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "{} copies could not be read: {}",
            failed.len(),
            failed.join("; ")
        );
    }
    if differ > 0 {
        return Err(Differ(format!("{differ} of {checked} copies differ from the zone")).into());
    }
    Ok(())
}

/// What `config import` is asked.
pub(super) struct Import {
    pub path: String,
    pub from: u64,
    pub restart: Vec<String>,
    pub replace: bool,
}

/// `config import`: server `from`'s copy of `path` stored as the zone's.
pub(super) async fn import(
    c: &mut ConfigClient<Channel>,
    channel: &Channel,
    ask: Import,
    timeout: std::time::Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    let Import {
        path,
        from,
        restart,
        replace,
    } = ask;
    let view = zone_view(channel, timeout).await?;
    let s = view
        .servers
        .iter()
        .find(|s| s.id == from)
        .ok_or_else(|| anyhow::anyhow!("--from: {from} is not a member of the zone"))?;
    if s.client_endpoint.is_empty() {
        anyhow::bail!("--from: server {from} is unreachable: {}", s.error);
    }
    match c.get(t(GetFileRequest { path: path.clone() }, timeout)).await {
        Ok(_) if !replace => anyhow::bail!(
            "{path} is already managed: `zonectl config diff {path}` shows how server {from}'s copy differs; --replace stores server {from}'s copy instead"
        ),
        Ok(_) => {}
        Err(st) if st.code() == tonic::Code::NotFound => {}
        Err(st) => return Err(st.into()),
    }
    let disk = read_local(&s.client_endpoint, &path, timeout).await?;
    if !disk.exists {
        anyhow::bail!("{path} does not exist on server {from} ({})", s.name);
    }
    let canon = |n: String| if n == "root" { String::new() } else { n };
    push_file(
        c,
        ManagedFile {
            path: path.clone(),
            content: disk.content,
            mode: disk.mode,
            owner: canon(disk.owner),
            group: canon(disk.group),
            restart_units: restart,
            ..ManagedFile::default()
        },
        timeout,
        as_json,
        &[("from", from.into())],
        |f, _| {
            format!(
                "{path}: server {from}'s copy ({} bytes, mode {:o}) stored as version {} at revision {}",
                f.size, f.mode, f.version, f.revision
            )
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(content: &str, mode: u32, owner: &str) -> ReadLocalResponse {
        ReadLocalResponse {
            exists: true,
            content: content.as_bytes().to_vec(),
            mode,
            owner: owner.into(),
            group: "root".into(),
            ..ReadLocalResponse::default()
        }
    }

    #[test]
    fn a_copy_is_compared_with_the_version_rendered_for_its_server() {
        let vars = NodeVars::from_member(2, "fe-2", "10.0.0.2:7401");
        let stored = ManagedFile {
            path: "/etc/one/oned.conf".into(),
            content: b"SERVER_ID = {{id0}}\nHOST = {{address}}\n".to_vec(),
            template: true,
            version: 4,
            ..ManagedFile::default()
        };
        // The rendered version, 0644, root: the same.
        let same = disk("SERVER_ID = 1\nHOST = 10.0.0.2\n", 0o644, "root");
        assert!(compare(&stored, &vars, &same).is_empty());
        // Content, mode and owner each named.
        let notes = compare(
            &stored,
            &vars,
            &disk("SERVER_ID = 0\nHOST = 10.0.0.2\n", 0o600, "oneadmin"),
        );
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert_eq!(
            notes[0],
            "server 2 (fe-2): /etc/one/oned.conf: mode 600 on disk, 644 in the zone"
        );
        assert_eq!(
            notes[1],
            "server 2 (fe-2): /etc/one/oned.conf: owner oneadmin on disk, root in the zone"
        );
        assert!(
            notes[2].contains("-SERVER_ID = 1\n+SERVER_ID = 0\n"),
            "{}",
            notes[2]
        );
        assert!(notes[2]
            .starts_with("--- zone /etc/one/oned.conf (version 4, rendered for server 2)\n"));
        let missing = ReadLocalResponse::default();
        assert_eq!(
            compare(&stored, &vars, &missing),
            vec!["server 2 (fe-2): /etc/one/oned.conf: missing on disk".to_owned()]
        );
        let binary = ReadLocalResponse {
            content: vec![0xff, 0xfe],
            ..same.clone()
        };
        assert!(compare(&stored, &vars, &binary)[0].contains("binary content differs"));
    }
}
