//! Installing a bundle into the slot that is not running.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Serialize;
use zone_bundle::{Manifest, TrustedKeys};

use crate::entries::{self, Assessment, Entry};
use crate::{io_err, Error, Slot};

/// Where an install writes.
#[derive(Debug, Clone)]
pub struct Target {
    /// The EFI partition's mount point (`/boot/efi`).
    pub esp: PathBuf,
    /// The root partition of slot a, then b (block devices on a server).
    pub partitions: [PathBuf; 2],
    pub running: Slot,
    /// os-release IMAGE_ID of the running root: a bundle for another image
    /// (`zoned-metal` on a `zoned-vm` server) is refused.
    pub image_id: String,
}

/// How far an install is, for its caller's progress output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Progress {
    /// The bundle read once to check it, bytes of it so far.
    Verifying { done: u64, total: u64 },
    /// The root image written to the target partition.
    Writing { done: u64, total: u64 },
    /// The partition read back.
    ReadingBack { done: u64, total: u64 },
}

/// What an install did.
#[derive(Debug, Clone, Serialize)]
pub struct Installed {
    pub slot: Slot,
    /// The entry the next boot tries.
    pub entry: String,
    pub version: String,
    pub key_id: String,
    /// Entries of the slot removed before it was written.
    pub removed: Vec<String>,
}

/// The kernel image is written under this name (with the generation)
/// before it is renamed into place; the loader ignores it.
fn staged_name(generation: u32) -> String {
    format!("zoned-staged-{generation:04}.tmp")
}

struct Counting<'a, R> {
    inner: R,
    done: u64,
    total: u64,
    every: u64,
    next: u64,
    report: &'a dyn Fn(Progress),
    kind: fn(u64, u64) -> Progress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done >= self.next || (n == 0 && self.done == self.total) {
            self.next = self.done + self.every;
            (self.report)((self.kind)(self.done, self.total));
        }
        Ok(n)
    }
}

fn size_of(path: &Path) -> Result<u64, Error> {
    // A block device's size is where its end is; a file's, its length.
    File::open(path)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(io_err(path))
}

/// Checks a manifest against this server before anything is read past it.
fn accept(
    m: &Manifest,
    t: &Target,
    slot: Slot,
    partition_bytes: u64,
) -> Result<(), zone_bundle::Error> {
    let refuse = |reason: String| Err(zone_bundle::Error::Refused { reason });
    if m.image_id != t.image_id {
        return refuse(format!(
            "the bundle is for {}, this server runs {}",
            m.image_id, t.image_id
        ));
    }
    let Some(root) = m.file(zone_bundle::ROOT_IMAGE) else {
        return refuse(format!("the bundle has no {}", zone_bundle::ROOT_IMAGE));
    };
    let Some(unpacked) = &root.unpacked else {
        return refuse(format!(
            "the bundle's {} has no unpacked size and sha256",
            root.name
        ));
    };
    if unpacked.bytes > partition_bytes {
        return refuse(format!(
            "the bundle's root filesystem is {} MiB; partition {} has {} MiB",
            unpacked.bytes >> 20,
            slot.partlabel(),
            partition_bytes >> 20
        ));
    }
    if m.file(&zone_bundle::uki_name(slot.letter())).is_none() {
        return refuse(format!(
            "the bundle has no kernel image for slot {slot} ({})",
            zone_bundle::uki_name(slot.letter())
        ));
    }
    Ok(())
}

/// Installs the bundle at `path` into the slot that is not running; the
/// next boot tries it three times (see the crate's doc for the order and
/// why it is safe to cut the power anywhere in it).
pub fn install(
    path: &Path,
    keys: &TrustedKeys,
    t: &Target,
    progress: &mut dyn FnMut(Progress),
) -> Result<Installed, Error> {
    let slot = t.running.other();
    let partition = &t.partitions[match slot {
        Slot::A => 0,
        Slot::B => 1,
    }];
    let uki = zone_bundle::uki_name(slot.letter());
    let dir = t.esp.join(entries::DIR);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    // One install at a time on this EFI partition (zoned's and an
    // operator's): the lock is the entries' directory itself, held until
    // this returns.
    let _lock = nix::fcntl::Flock::lock(
        File::open(&dir).map_err(io_err(&dir))?,
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .map_err(|(_, e)| {
        Error::Refused(format!(
            "another install is under way ({} is locked: {e})",
            dir.display()
        ))
    })?;

    // The running slot must have a good entry: it is what the loader falls
    // back to if the new one fails all its tries.
    let before = entries::list(&t.esp)?;
    match before.iter().find(|e| e.slot == t.running).map(Entry::assessment) {
        Some(Assessment::Good) => {}
        Some(Assessment::Trial { .. }) => {
            return Err(Error::Refused(format!(
                "slot {} (running) is itself on trial, not yet marked good: an upgrade waits until this boot is assessed",
                t.running
            )))
        }
        Some(Assessment::Bad { .. }) | None => {
            return Err(Error::Refused(format!(
                "slot {} (running) has no good boot entry in {}: the server would have nothing to fall back to",
                t.running,
                t.esp.join(entries::DIR).display()
            )))
        }
    }
    let partition_bytes = size_of(partition)?;
    let bundle_bytes = std::fs::metadata(path).map_err(io_err(path))?.len();
    let progress = RefCell::new(progress);
    let report = |p: Progress| (progress.borrow_mut())(p);

    // 1. The whole bundle, checked before anything is written.
    let verified = {
        let r = Counting {
            inner: BufReader::with_capacity(1 << 20, File::open(path).map_err(io_err(path))?),
            done: 0,
            total: bundle_bytes,
            every: 16 << 20,
            next: 0,
            report: &report,
            kind: |done, total| Progress::Verifying { done, total },
        };
        zone_bundle::read(
            path,
            r,
            keys,
            |m| accept(m, t, slot, partition_bytes),
            |_, _| Ok(()),
        )?
    };
    // The tar's trailing padding is never read: the pass is whole here.
    report(Progress::Verifying {
        done: bundle_bytes,
        total: bundle_bytes,
    });
    let manifest = verified.manifest;

    // 2. Nothing boots the target slot from here until step 4: a power cut
    // while it is written leaves the running slot's entry the only one.
    let removed = entries::remove_slot(&t.esp, slot)?;
    // The staged name carries the new generation. On FAT a rename cut by
    // a power loss can leave the old name and the new entry sharing
    // clusters; deleting that old name later would free the clusters of an
    // entry that may be booting by then. So only the staged file of this
    // generation is ever deleted: no entry of this generation exists (it is
    // one above every entry's), so it shares clusters with none. Older
    // leftovers stay (fsck.fat at boot repairs the partition: fstab checks
    // it).
    let generation = before.iter().map(|e| e.generation).max().unwrap_or(0) + 1;
    let staged = dir.join(staged_name(generation));
    let _ = std::fs::remove_file(&staged);
    let result = write_and_stage(
        path, keys, &manifest, &uki, partition, &staged, slot, &report,
    );
    if let Err(e) = result {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }

    // 4. The slot becomes bootable, on trial.
    let name = Entry::trial_name(generation, slot);
    let target = dir.join(&name);
    std::fs::rename(&staged, &target).map_err(io_err(&target))?;
    entries::sync_dir(&dir)?;
    Ok(Installed {
        slot,
        entry: name,
        version: manifest.version,
        key_id: verified.key_id,
        removed,
    })
}

/// Step 3 of [`install`]: the root image onto `partition`, checked as it
/// is written and read back from the device, and the slot's kernel image
/// written to `staged`.
#[allow(clippy::too_many_arguments)]
fn write_and_stage(
    path: &Path,
    keys: &TrustedKeys,
    manifest: &Manifest,
    uki: &str,
    partition: &Path,
    staged: &Path,
    slot: Slot,
    report: &dyn Fn(Progress),
) -> Result<(), Error> {
    let unpacked = manifest
        .file(zone_bundle::ROOT_IMAGE)
        .and_then(|f| f.unpacked.clone())
        .ok_or_else(|| Error::Refused("no unpacked root image in the manifest".into()))?;
    // 3. The root image onto the partition, and the kernel image staged
    // under a name the loader ignores; both checked against the manifest
    // as they are written (the read fails on any difference, and then
    // nothing is renamed into place).
    let written: RefCell<Option<(u64, String)>> = RefCell::new(None);
    zone_bundle::read(
        path,
        BufReader::with_capacity(1 << 20, File::open(path).map_err(io_err(path))?),
        keys,
        |m| {
            if m != manifest {
                return Err(zone_bundle::Error::Refused {
                    reason: "the bundle changed while it was being installed".into(),
                });
            }
            Ok(())
        },
        |entry, r| {
            if entry.name == zone_bundle::ROOT_IMAGE {
                let mut out = BufWriter::with_capacity(
                    4 << 20,
                    OpenOptions::new().write(true).open(partition)?,
                );
                let decoder = crate::unzstd::Decoder::new(r)?;
                let mut counting = Counting {
                    inner: decoder,
                    done: 0,
                    total: unpacked.bytes,
                    every: 32 << 20,
                    next: 0,
                    report,
                    kind: |done, total| Progress::Writing { done, total },
                };
                let got = zone_bundle::copy_hashed(&mut counting, Some(&mut out))?;
                let file = out.into_inner().map_err(|e| e.into_error())?;
                file.sync_all()?;
                *written.borrow_mut() = Some(got);
            } else if entry.name == uki {
                let mut f = File::create(staged)?;
                std::io::copy(r, &mut f)?;
                f.sync_all()?;
            }
            Ok(())
        },
    )?;
    let (bytes, sha) = written
        .into_inner()
        .ok_or_else(|| Error::Refused("the bundle's root image was not written".into()))?;
    if bytes != unpacked.bytes || sha != unpacked.sha256 {
        return Err(Error::Refused(format!(
            "the root image unpacks to {bytes} bytes with sha256 {sha}; the signed manifest says {} bytes, {}",
            unpacked.bytes, unpacked.sha256
        )));
    }
    // Read back from the disk, not the page cache: what boots is what the
    // device kept.
    {
        let f = File::open(partition).map_err(io_err(partition))?;
        drop_cache(&f);
        let mut r = Counting {
            inner: BufReader::with_capacity(4 << 20, f).take(unpacked.bytes),
            done: 0,
            total: unpacked.bytes,
            every: 64 << 20,
            next: 0,
            report,
            kind: |done, total| Progress::ReadingBack { done, total },
        };
        let (_, found) = zone_bundle::copy_hashed(&mut r, None).map_err(io_err(partition))?;
        if found != unpacked.sha256 {
            return Err(Error::ReadBack {
                partition: partition.to_owned(),
                slot,
                expected: unpacked.sha256,
                found,
            });
        }
    }

    Ok(())
}

/// Asks the kernel to forget the file's cached pages (after a sync they
/// are clean), so that reading it again reads the device.
fn drop_cache(f: &File) {
    // Best effort: a file system that ignores the advice only makes the
    // read-back weaker, never wrong.
    let _ = nix::fcntl::posix_fadvise(f, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}

#[cfg(test)]
mod tests;
