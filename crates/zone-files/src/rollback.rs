//! Rollback planning: what to change so that every managed file is as it
//! was right after a revision, from the history kept.

use std::collections::BTreeMap;

use zone_proto::v1::ManagedFile;

use crate::FileError;

/// Same content and settings: pushing it again changes nothing.
pub fn same(a: &ManagedFile, b: &ManagedFile) -> bool {
    a.path == b.path
        && a.content == b.content
        && a.mode == b.mode
        && a.owner == b.owner
        && a.group == b.group
        && a.restart_units == b.restart_units
        && a.template == b.template
}

/// One change to one path, as a rollback plans it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Write(ManagedFile),
    Remove(String),
}

/// What to change so that every file is as it was right after revision
/// `to`, given the history kept (each version with its revision) and the
/// files now. Fails, naming the oldest revision it could restore, when the
/// history of a file changed since `to` does not reach back far enough.
pub fn plan_rollback(
    history: &[ManagedFile],
    current: &BTreeMap<String, ManagedFile>,
    to: u64,
) -> Result<Vec<Change>, FileError> {
    let mut by_path: BTreeMap<&str, Vec<&ManagedFile>> = BTreeMap::new();
    for h in history {
        by_path.entry(&h.path).or_default().push(h);
    }
    let mut changes = Vec::new();
    let mut floor = 0;
    let paths: std::collections::BTreeSet<&str> = by_path
        .keys()
        .copied()
        .chain(current.keys().map(String::as_str))
        .collect();
    for path in paths {
        let mut versions = by_path.get(path).cloned().unwrap_or_default();
        versions.sort_by_key(|v| v.revision);
        let now = current.get(path);
        let changed_since = versions.last().is_some_and(|v| v.revision > to);
        if !changed_since {
            continue;
        }
        let then = versions.iter().rev().find(|v| v.revision <= to);
        match then {
            Some(v) if v.deleted => {
                if now.is_some() {
                    changes.push(Change::Remove(path.to_owned()));
                }
            }
            Some(v) => {
                if now.is_none_or(|n| !same(n, v)) {
                    changes.push(Change::Write((*v).clone()));
                }
            }
            None => {
                // Every version kept is newer than `to`: if the oldest is
                // the file's first, it did not exist then.
                let oldest = versions.first().expect("changed_since");
                if oldest.version == 1 {
                    if now.is_some() {
                        changes.push(Change::Remove(path.to_owned()));
                    }
                } else {
                    floor = floor.max(oldest.revision);
                }
            }
        }
    }
    if floor > 0 {
        return Err(FileError::Compacted(format!(
            "the history kept does not reach back to revision {to}; the oldest revision that can be restored is {floor} (files.history_per_file)"
        )));
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &str) -> ManagedFile {
        ManagedFile {
            path: path.into(),
            content: content.as_bytes().to_vec(),
            ..ManagedFile::default()
        }
    }

    fn version(path: &str, content: &str, revision: u64, version: u64) -> ManagedFile {
        let mut f = file(path, content);
        f.revision = revision;
        f.version = version;
        f
    }

    fn tomb(path: &str, revision: u64, version: u64) -> ManagedFile {
        ManagedFile {
            path: path.into(),
            deleted: true,
            revision,
            version,
            ..ManagedFile::default()
        }
    }

    #[test]
    fn rollback_restores_changed_removes_created_and_revives_deleted() {
        let history = vec![
            version("/etc/one/a", "a1", 10, 1),
            version("/etc/one/a", "a2", 20, 2),
            version("/etc/one/b", "b1", 12, 1),
            tomb("/etc/one/b", 22, 2),
            version("/etc/one/c", "c1", 25, 1),
            version("/etc/one/d", "d1", 5, 1),
        ];
        let mut current = BTreeMap::new();
        for f in [
            version("/etc/one/a", "a2", 20, 2),
            version("/etc/one/c", "c1", 25, 1),
            version("/etc/one/d", "d1", 5, 1),
        ] {
            current.insert(f.path.clone(), f);
        }
        let plan = plan_rollback(&history, &current, 15).unwrap();
        assert_eq!(
            plan,
            vec![
                Change::Write(version("/etc/one/a", "a1", 10, 1)),
                Change::Write(version("/etc/one/b", "b1", 12, 1)),
                Change::Remove("/etc/one/c".into()),
            ]
        );
        assert!(plan_rollback(&history, &current, 30).unwrap().is_empty());
    }

    #[test]
    fn rollback_past_the_kept_history_names_the_oldest_revision() {
        // Versions 1 and 2 of a fell out of the history kept.
        let history = vec![
            version("/etc/one/a", "a3", 30, 3),
            version("/etc/one/a", "a4", 40, 4),
        ];
        let current: BTreeMap<String, ManagedFile> =
            [("/etc/one/a".to_string(), version("/etc/one/a", "a4", 40, 4))].into();
        let e = plan_rollback(&history, &current, 20)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("oldest revision that can be restored is 30"),
            "{e}"
        );
        let plan = plan_rollback(&history, &current, 35).unwrap();
        assert_eq!(
            plan,
            vec![Change::Write(version("/etc/one/a", "a3", 30, 3))]
        );
    }
}
