//! systemd units given with the identity: files in `zoned/units/` on the
//! EFI partition, or QEMU `-fw_cfg name=opt/zoned/units/<unit>,file=...`
//! (those win, unit by unit), installed under `/run/systemd/system` at
//! boot. The root is read-only: this is how a server gets the units its
//! identity names in `leader_units` until the front-end comes as system
//! extensions.

use std::path::{Path, PathBuf};

/// The suffixes of the unit types that may be given.
const KINDS: &[&str] = &[
    ".service", ".socket", ".timer", ".path", ".mount", ".target",
];

/// Largest unit file accepted.
const MAX_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("{path}: `{name}` is not a unit file name (letters, digits, `:_.@-`, ending in {kinds})", kinds = KINDS.join(", "))]
    Name { path: PathBuf, name: String },
    #[error("{path}: larger than {MAX_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}: not UTF-8 text")]
    NotText { path: PathBuf },
    #[error("{path}: empty (systemd takes an empty unit file as masked: it would never start)")]
    Empty { path: PathBuf },
    #[error("{path}: read {got} of its {size} bytes, {tries} times")]
    Short {
        path: PathBuf,
        got: usize,
        size: u64,
        tries: u32,
    },
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A unit file to install: its name and text, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub name: String,
    pub text: String,
    pub source: PathBuf,
}

fn valid_name(name: &str) -> bool {
    let stem = KINDS.iter().find_map(|k| name.strip_suffix(k));
    stem.is_some_and(|s| {
        !s.is_empty()
            && name.len() <= 255
            && !s.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ":_.@-".contains(c))
    })
}

fn read(path: &Path, name: &str) -> Result<Unit, UnitError> {
    if !valid_name(name) {
        return Err(UnitError::Name {
            path: path.to_owned(),
            name: name.to_owned(),
        });
    }
    let read_err = |source| UnitError::Read {
        path: path.to_owned(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_err)?.len();
    if size > MAX_BYTES {
        return Err(UnitError::TooLarge {
            path: path.to_owned(),
        });
    }
    // A fw_cfg entry's size is known (sysfs gives it); a read that comes
    // back shorter is read again. Installed short, or empty, a unit is
    // masked or broken until the next boot (seen once in the QEMU zone: a
    // leader-only unit "masked" on one VM, its peers' copies whole).
    const TRIES: u32 = 5;
    let mut bytes = std::fs::read(path).map_err(read_err)?;
    let mut tries = 1;
    while ((bytes.len() as u64) < size || bytes.is_empty()) && tries < TRIES {
        std::thread::sleep(std::time::Duration::from_millis(100));
        bytes = std::fs::read(path).map_err(read_err)?;
        tries += 1;
    }
    if (bytes.len() as u64) < size {
        return Err(UnitError::Short {
            path: path.to_owned(),
            got: bytes.len(),
            size,
            tries,
        });
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(UnitError::Empty {
            path: path.to_owned(),
        });
    }
    let text = String::from_utf8(bytes).map_err(|_| UnitError::NotText {
        path: path.to_owned(),
    })?;
    Ok(Unit {
        name: name.to_owned(),
        text,
        source: path.to_owned(),
    })
}

/// The units in `esp` (files named as units) and in `fw_cfg` (one
/// directory per entry, its content in `raw`), the latter winning. Either
/// directory may be missing.
pub fn gather(esp: &Path, fw_cfg: &Path) -> Result<Vec<Unit>, UnitError> {
    let mut units: std::collections::BTreeMap<String, Unit> = Default::default();
    let entries = |dir: &Path| -> Result<Vec<(String, PathBuf)>, UnitError> {
        match std::fs::read_dir(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(UnitError::Read {
                path: dir.to_owned(),
                source,
            }),
            Ok(rd) => {
                let mut v = Vec::new();
                for e in rd.flatten() {
                    v.push((e.file_name().to_string_lossy().into_owned(), e.path()));
                }
                v.sort();
                Ok(v)
            }
        }
    };
    for (name, path) in entries(esp)? {
        units.insert(name.clone(), read(&path, &name)?);
    }
    for (name, path) in entries(fw_cfg)? {
        units.insert(name.clone(), read(&path.join("raw"), &name)?);
    }
    Ok(units.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_unit_is_refused_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let fw = d.path().join("fw");
        std::fs::create_dir_all(fw.join("w.service")).unwrap();
        std::fs::write(fw.join("w.service/raw"), "\n").unwrap();
        let e = gather(&d.path().join("esp"), &fw).unwrap_err().to_string();
        assert!(e.contains("w.service/raw: empty"), "{e}");
        assert!(e.contains("masked"), "{e}");
    }

    #[test]
    fn fw_cfg_wins_and_bad_names_are_refused_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let esp = d.path().join("esp");
        let fw = d.path().join("fw");
        std::fs::create_dir_all(&esp).unwrap();
        std::fs::create_dir_all(fw.join("a.service")).unwrap();
        std::fs::write(esp.join("a.service"), "[Service]\nExecStart=/bin/true\n").unwrap();
        std::fs::write(esp.join("b@.service"), "[Service]\n").unwrap();
        std::fs::write(
            fw.join("a.service/raw"),
            "[Service]\nExecStart=/bin/false\n",
        )
        .unwrap();
        let units = gather(&esp, &fw).unwrap();
        assert_eq!(units.len(), 2);
        assert_eq!(units[0].name, "a.service");
        assert!(units[0].text.contains("/bin/false"), "{units:?}");
        assert_eq!(units[1].name, "b@.service");
        assert!(gather(&d.path().join("none"), &d.path().join("none"))
            .unwrap()
            .is_empty());

        std::fs::write(esp.join("notes.txt"), "x").unwrap();
        let e = gather(&esp, &fw).unwrap_err().to_string();
        assert!(
            e.contains("notes.txt") && e.contains("not a unit file name"),
            "{e}"
        );
        std::fs::remove_file(esp.join("notes.txt")).unwrap();
        std::fs::write(esp.join("bin.service"), [0xff, 0xfe]).unwrap();
        let e = gather(&esp, &fw).unwrap_err().to_string();
        assert!(e.contains("bin.service: not UTF-8"), "{e}");
        for bad in [".service", "../x.service", "a b.service", ".hidden.service"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
