//! The boot entries on the EFI system partition: one unified kernel image
//! per root slot in `EFI/Linux/`, named `zoned-<generation>-<slot>.efi`,
//! with systemd-boot's boot counter `+LEFT[-DONE]` before `.efi` while the
//! entry is on trial.
//!
//! systemd-boot (252) boots the first entry in its order: entries with no
//! tries left last, then by file name, highest version first. The kernel
//! images carry no version in their os-release section (PRETTY_NAME only),
//! so the file name alone decides: the highest generation that still has
//! tries boots. An entry installed on trial (`+3`) is tried three times;
//! each boot the loader counts one try (`+2-1`, `+1-2`, `+0-3`);
//! systemd-bless-boot drops the counter once the boot is assessed good. An
//! entry with `+0` sorts last: the previous slot's entry boots again, the
//! rollback.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{io_err, Error, Slot};

/// The directory of the entries under the EFI partition's mount point.
pub const DIR: &str = "EFI/Linux";
/// Boot attempts given to a newly installed entry.
pub const TRIES: u32 = 3;

/// One entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub file: String,
    pub generation: u32,
    pub slot: Slot,
    /// `(left, done)` while on trial; None once marked good (or never
    /// counted).
    pub tries: Option<(u32, u32)>,
}

/// What an entry's counter says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Assessment {
    /// No counter: marked good (or installed good, as the image's first).
    Good,
    /// On trial with tries left.
    Trial { left: u32, done: u32 },
    /// Every try failed: the loader no longer boots it.
    Bad { done: u32 },
}

impl Entry {
    /// Parses `zoned-<generation>-<slot>[+LEFT[-DONE]].efi`; None for any
    /// other file.
    pub fn parse(file: &str) -> Option<Entry> {
        let stem = file.strip_suffix(".efi")?.strip_prefix("zoned-")?;
        let (base, counter) = match stem.split_once('+') {
            Some((b, c)) => (b, Some(c)),
            None => (stem, None),
        };
        let (generation, slot) = base.split_once('-')?;
        if generation.is_empty() || !generation.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let slot = Slot::from_name(slot)?;
        let tries = match counter {
            None => None,
            Some(c) => {
                let (left, done) = match c.split_once('-') {
                    Some((l, d)) => (l.parse().ok()?, d.parse().ok()?),
                    None => (c.parse().ok()?, 0),
                };
                Some((left, done))
            }
        };
        Some(Entry {
            file: file.to_owned(),
            generation: generation.parse().ok()?,
            slot,
            tries,
        })
    }

    /// The file name of generation `generation` for `slot`, on trial.
    pub fn trial_name(generation: u32, slot: Slot) -> String {
        format!("zoned-{generation:04}-{}+{TRIES}.efi", slot.name())
    }

    /// The file name of a good entry (what the image starts with).
    pub fn good_name(generation: u32, slot: Slot) -> String {
        format!("zoned-{generation:04}-{}.efi", slot.name())
    }

    pub fn assessment(&self) -> Assessment {
        match self.tries {
            None => Assessment::Good,
            Some((0, done)) => Assessment::Bad { done },
            Some((left, done)) => Assessment::Trial { left, done },
        }
    }
}

/// The entries in `esp`'s `EFI/Linux`, in the loader's order (the first is
/// what boots next).
pub fn list(esp: &Path) -> Result<Vec<Entry>, Error> {
    let dir = esp.join(DIR);
    let mut v: Vec<Entry> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| Entry::parse(&e.file_name().to_string_lossy().to_lowercase()))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(&dir)(e)),
    };
    v.sort_by(|a, b| {
        let bad = |e: &Entry| matches!(e.assessment(), Assessment::Bad { .. });
        bad(a)
            .cmp(&bad(b))
            .then(b.generation.cmp(&a.generation))
            .then(b.file.cmp(&a.file))
    });
    Ok(v)
}

/// Removes every entry of `slot` (it is about to be overwritten: from here
/// until a new entry is written, nothing boots it), then syncs the
/// directory.
pub fn remove_slot(esp: &Path, slot: Slot) -> Result<Vec<String>, Error> {
    let dir = esp.join(DIR);
    let mut removed = Vec::new();
    for e in list(esp)? {
        if e.slot == slot {
            let p = dir.join(&e.file);
            std::fs::remove_file(&p).map_err(io_err(&p))?;
            removed.push(e.file);
        }
    }
    if !removed.is_empty() {
        sync_dir(&dir)?;
    }
    Ok(removed)
}

/// fsync of a directory: a rename or removal in it is on disk.
pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

/// The path of `file` in the entries' directory.
pub fn path(esp: &Path, file: &str) -> PathBuf {
    esp.join(DIR).join(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_with_and_without_counters() {
        let e = Entry::parse("zoned-0002-b+3.efi").unwrap();
        assert_eq!((e.generation, e.slot, e.tries), (2, Slot::B, Some((3, 0))));
        assert_eq!(e.assessment(), Assessment::Trial { left: 3, done: 0 });
        let e = Entry::parse("zoned-0002-b+1-2.efi").unwrap();
        assert_eq!(e.assessment(), Assessment::Trial { left: 1, done: 2 });
        let e = Entry::parse("zoned-0002-b+0-3.efi").unwrap();
        assert_eq!(e.assessment(), Assessment::Bad { done: 3 });
        let e = Entry::parse("zoned-0001-a.efi").unwrap();
        assert_eq!(e.assessment(), Assessment::Good);
        for other in [
            "BOOTX64.EFI",
            "zoned-x-a.efi",
            "zoned-0001-c.efi",
            "zoned-0001-a+x.efi",
            "zoned-0001-a.efi.tmp",
            "other-0001-a.efi",
        ] {
            assert_eq!(Entry::parse(other), None, "{other}");
        }
        assert_eq!(Entry::trial_name(7, Slot::A), "zoned-0007-a+3.efi");
        assert_eq!(Entry::good_name(1, Slot::A), "zoned-0001-a.efi");
    }

    #[test]
    fn the_order_is_the_loaders_highest_generation_first_bad_ones_last() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(DIR)).unwrap();
        for f in ["zoned-0001-a.efi", "zoned-0002-b+0-3.efi", "README"] {
            std::fs::write(dir.path().join(DIR).join(f), b"x").unwrap();
        }
        let order: Vec<String> = list(dir.path())
            .unwrap()
            .into_iter()
            .map(|e| e.file)
            .collect();
        assert_eq!(order, ["zoned-0001-a.efi", "zoned-0002-b+0-3.efi"]);
        std::fs::write(dir.path().join(DIR).join("zoned-0003-b+2-1.efi"), b"x").unwrap();
        let order: Vec<String> = list(dir.path())
            .unwrap()
            .into_iter()
            .map(|e| e.file)
            .collect();
        assert_eq!(
            order,
            [
                "zoned-0003-b+2-1.efi",
                "zoned-0001-a.efi",
                "zoned-0002-b+0-3.efi"
            ]
        );
        let removed = remove_slot(dir.path(), Slot::B).unwrap();
        assert_eq!(removed.len(), 2);
        let order: Vec<String> = list(dir.path())
            .unwrap()
            .into_iter()
            .map(|e| e.file)
            .collect();
        assert_eq!(order, ["zoned-0001-a.efi"]);
    }
}
