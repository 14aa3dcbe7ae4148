//! Getting a zone back after losing it: `zoned restore --from FILE` builds
//! a new zone's founder from a backup (`zonectl snapshot save`), like
//! `etcdutl snapshot restore`; `zoned --force-new-zone` makes the survivor
//! of a quorum loss the single voter of its zone, keeping its data, like
//! etcd's `--force-new-cluster`.
//!
//! Safety. A restored founder holds exactly the backup's keys at the
//! bootstrap point, so founders restored from the same file with the same
//! voters start identical, as blank founders do; each must be restored (a
//! blank founder beside restored ones would not hold the keys). Forcing is
//! the one operation that steps outside Raft: the survivor decides alone
//! what was committed. It keeps every entry of its log (an acknowledged
//! write whose commit it had not heard yet is among them) and refuses,
//! unless forced twice, when it knows of entries committed beyond its log
//! (a leader's append said so) or when another server of the zone still
//! answers (its old quorum may be alive: forcing would make two zones).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rocksdb::WriteBatch;
use zone_proto::v1::Member;

use crate::config::Config;
use crate::kv;
use crate::storage::{Engine, Forced, RaftStorage, StorageFailure};
use crate::tls::ZoneTls;

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("--from {path}: {source}")]
    Backup {
        path: PathBuf,
        #[source]
        source: zone_backup::BackupError,
    },
    #[error("--from {path}: cannot open it")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--from {path}: the file changed while it was restored (SHA-256 {first} on the check, {second} on the copy); nothing was written")]
    Changed {
        path: PathBuf,
        first: String,
        second: String,
    },
    #[error("node.data_dir: {db} exists: a restore builds a new store and never overwrites one. Move it away first (mv {db} {db}.old) if this server's data is to be replaced")]
    StoreExists { db: String },
    #[error("voters: this server ({id}) is not among the voters of the new zone ({voters}); a restore builds a founder: list every founder, this one included, with [[voters]] or --voters")]
    NotAVoter { id: u64, voters: String },
    #[error("node.data_dir {dir}: {what}")]
    Io {
        dir: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the restored store could not be written")]
    Storage(#[source] StorageFailure),
    #[error("--force-new-zone: {dir} holds no zone (no Raft configuration): there is nothing to force; found a zone or join one")]
    NoZone { dir: String },
    #[error("--force-new-zone refused: {evidence}. Forcing now could lose committed writes or leave two zones. Force on the server that holds the most (the one with the highest commit), stop every other server of the zone, or give --force-new-zone twice to force anyway")]
    Refused { evidence: String },
    #[error("--force-new-zone: this server was removed from the zone (at entry {index}): it holds no part of the zone to force; force another survivor")]
    Removed { index: u64 },
    #[error("--force-new-zone: cannot read this server's state")]
    State(#[source] StorageFailure),
}

/// What [`restore`] built.
#[derive(Debug)]
pub struct Restored {
    pub summary: zone_backup::Summary,
    pub db: PathBuf,
    pub voters: Vec<u64>,
}

/// Builds `config.node.data_dir`'s store from the backup at `from`, as a
/// founder of a new zone of `config.voters`: the whole file is checked
/// first, the store is built beside the data directory's and moved into
/// place only once complete and synced; on any failure nothing is left.
/// `progress` gets the keys written so far.
pub fn restore(
    config: &Config,
    from: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<Restored, RecoveryError> {
    let voters: Vec<u64> = config.voters.iter().map(|v| v.id).collect();
    if !voters.contains(&config.node.id) {
        return Err(RecoveryError::NotAVoter {
            id: config.node.id,
            voters: voters
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let open = || {
        std::fs::File::open(from)
            .map(std::io::BufReader::new)
            .map_err(|source| RecoveryError::Open {
                path: from.to_owned(),
                source,
            })
    };
    let bad = |source| RecoveryError::Backup {
        path: from.to_owned(),
        source,
    };
    // 1. The whole file, checked before anything is written.
    let checked = zone_backup::read(open()?, |_| {}).map_err(bad)?;

    let dir = &config.node.data_dir;
    let io = |what| {
        let dir = dir.display().to_string();
        move |source| RecoveryError::Io { dir, what, source }
    };
    let db = dir.join("db");
    if db.exists() {
        return Err(RecoveryError::StoreExists {
            db: db.display().to_string(),
        });
    }
    std::fs::create_dir_all(dir).map_err(io("cannot create it"))?;
    sweep_scratch(dir);
    // A name no earlier restore used (a pid alone repeats: pid 1 in a
    // container), created here: a leftover store is never built upon.
    let scratch = dir.join(format!(
        "{SCRATCH}{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir(&scratch).map_err(io("cannot create the restore's scratch directory"))?;
    let built = build(
        config,
        &scratch,
        from,
        &checked,
        &voters,
        &mut progress,
        open,
        bad,
    );
    let result = built.and_then(|()| {
        std::fs::rename(scratch.join("db"), &db)
            .map_err(io("cannot move the restored store into place"))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("cannot sync it"))
    });
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    Ok(Restored {
        summary: checked,
        db,
        voters,
    })
}

/// The scratch directories of restores, `<data_dir>/.restore-<pid>-<ns>`.
const SCRATCH: &str = ".restore-";

/// Removes what interrupted restores (Ctrl-C, a crash) left in `dir`:
/// scratch directories whose process is gone.
fn sweep_scratch(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(SCRATCH)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            tracing::info!(path = %e.path().display(), "removing an interrupted restore's scratch directory");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Writes the store into `scratch` (its `db`), from a second read of the
/// file that must match the first.
#[allow(clippy::too_many_arguments)]
fn build<R: std::io::Read>(
    config: &Config,
    scratch: &Path,
    from: &Path,
    checked: &zone_backup::Summary,
    voters: &[u64],
    progress: &mut impl FnMut(u64, u64),
    open: impl Fn() -> Result<R, RecoveryError>,
    bad: impl Fn(zone_backup::BackupError) -> RecoveryError,
) -> Result<(), RecoveryError> {
    let engine = Engine::open(scratch).map_err(RecoveryError::Storage)?;
    let mut failed = None;
    let mut written = 0u64;
    let second = zone_backup::read(open()?, |kvs| {
        if failed.is_some() {
            return;
        }
        let mut wb = WriteBatch::default();
        kv::stage_restored_keys(&engine, &mut wb, kvs);
        match engine.write(wb, false) {
            Ok(()) => {
                written += kvs.len() as u64;
                progress(written, checked.keys);
            }
            Err(e) => failed = Some(e),
        }
    })
    .map_err(&bad)?;
    if let Some(e) = failed {
        return Err(RecoveryError::Storage(e));
    }
    if second.sha256 != checked.sha256 {
        return Err(RecoveryError::Changed {
            path: from.to_owned(),
            first: checked.sha256.clone(),
            second: second.sha256,
        });
    }
    let members = crate::server::founders(config);
    let mut wb = WriteBatch::default();
    kv::stage_restored_meta(
        &engine,
        &mut wb,
        checked.header.revision,
        checked.header.disabled,
        &members,
    );
    engine.write(wb, true).map_err(RecoveryError::Storage)?;
    // The Raft state last, synced: the restore point of every founder.
    RaftStorage::found_restored(&engine, voters).map_err(RecoveryError::Storage)?;
    drop(engine);
    Ok(())
}

/// How long each other server of the zone is given to answer before a
/// force.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Makes this server the single voter of its zone (`--force-new-zone`,
/// given `times` times), or refuses (see the module's safety note).
/// Returns what changed, or None when it already is the single voter.
pub async fn force_new_zone(
    engine: &Engine,
    config: &Config,
    tls: &ZoneTls,
    times: u8,
) -> Result<Option<Forced>, RecoveryError> {
    let me = config.node.id;
    let dir = config.node.data_dir.display().to_string();
    if !RaftStorage::has_configuration(engine).map_err(RecoveryError::State)? {
        return Err(RecoveryError::NoZone { dir });
    }
    if let Some(index) = RaftStorage::removed(engine).map_err(RecoveryError::State)? {
        return Err(RecoveryError::Removed { index });
    }
    let mut storage =
        RaftStorage::open(engine.clone(), &[], kv::snapshot_data).map_err(RecoveryError::State)?;
    let cs = storage.conf_state();
    if cs.voters == [me] && cs.learners.is_empty() && cs.voters_outgoing.is_empty() {
        tracing::warn!(
            "--force-new-zone: this server is already the single voter of its zone; nothing \
             forced. Remove --force-new-zone from its command line"
        );
        return Ok(None);
    }
    let members = kv::read_members(engine)
        .map_err(RecoveryError::State)?
        .unwrap_or_default();
    let told = RaftStorage::leader_commit(engine).map_err(RecoveryError::State)?;
    let answers = ask_others(&members, me, tls).await;
    let mut evidence = evidence(told, storage.hard_state().commit, storage.last(), &answers);
    let cs = storage.conf_state();
    if !cs.voters.contains(&me) {
        evidence.push(format!(
            "this server is not a voter (voters {:?}): a learner may lag far behind them",
            cs.voters
        ));
    }
    if let Some(at) = RaftStorage::forced(engine).map_err(RecoveryError::State)? {
        evidence.push(format!(
            "this server was forced already (at entry {at}) and the zone has grown since (voters {:?}): was --force-new-zone left on its command line?",
            cs.voters
        ));
    }
    if !evidence.is_empty() {
        if times < 2 {
            return Err(RecoveryError::Refused {
                evidence: evidence.join("; "),
            });
        }
        for e in &evidence {
            tracing::warn!(evidence = %e, "--force-new-zone given twice: forcing regardless");
        }
    }
    let own = members
        .iter()
        .find(|m| m.id == me)
        .cloned()
        .unwrap_or_else(|| Member {
            id: me,
            name: config.node.name.clone(),
            peer_endpoint: config.node.peer_listen.to_string(),
            learner: false,
        });
    let mut wb = WriteBatch::default();
    kv::stage_members(
        engine,
        &mut wb,
        &[Member {
            learner: false,
            ..own
        }],
    );
    let forced = storage
        .force_single_voter(me, wb)
        .map_err(RecoveryError::State)?;
    Ok(Some(forced))
}

/// Why forcing would be unsafe: a leader's commit beyond what this server
/// knows committed (`told` against its `commit`; its own entries past that
/// may not be the committed ones: a leader whose appends it refused), or
/// other servers that answer.
fn evidence(
    told: u64,
    commit: u64,
    last: u64,
    answers: &[(u64, zone_proto::v1::ServerStatus)],
) -> Vec<String> {
    let mut evidence = Vec::new();
    if told > commit {
        evidence.push(format!(
            "a leader told this server that entries up to {told} were committed, and it holds them only up to {commit} (its log ends at {last}): entries {}..={told} would be lost or replaced",
            commit + 1
        ));
    }
    for (id, answer) in answers {
        evidence.push(format!(
            "server {id} answers on its peer port (commit {}, last entry {}; this server's last entry is {last})",
            answer.commit, answer.last_index,
        ));
    }
    evidence
}

/// The other members that answer `NodeStatus` within [`ASK_TIMEOUT`].
async fn ask_others(
    members: &[Member],
    me: u64,
    tls: &ZoneTls,
) -> Vec<(u64, zone_proto::v1::ServerStatus)> {
    let asks = members.iter().filter(|m| m.id != me).map(|m| async move {
        let r = crate::transport::ask_node_status(m.id, &m.peer_endpoint, tls, ASK_TIMEOUT).await?;
        Some((m.id, r.server.unwrap_or_default()))
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_beyond_the_log_or_a_server_that_answers_is_evidence() {
        assert!(evidence(120, 120, 125, &[]).is_empty());
        assert!(evidence(0, 120, 125, &[]).is_empty());
        // Its log reaches past what the leader said: its entries there may
        // be a deposed leader's, not the committed ones.
        let e = evidence(123, 120, 125, &[]);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].contains("entries 121..=123 would be lost or replaced"),
            "{e:?}"
        );
        let answer = zone_proto::v1::ServerStatus {
            commit: 140,
            last_index: 141,
            ..Default::default()
        };
        let e = evidence(100, 120, 120, &[(2, answer)]);
        assert_eq!(e.len(), 1);
        assert!(e[0].contains("server 2 answers"), "{e:?}");
        assert!(e[0].contains("commit 140, last entry 141"), "{e:?}");
    }
}
