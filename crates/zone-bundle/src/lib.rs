//! The appliance's update bundle: what `cargo xtask image` writes beside the
//! disk image and what a server checks before it writes any of it.
//!
//! A bundle is a POSIX tar file (`tar tvf zoned-vm-0.2.0.bundle` lists it):
//!
//! ```text
//! manifest.json            what the bundle is; every file's size and sha256
//! manifest.json.minisig    a minisign signature of manifest.json (ed25519)
//! root.img.zst  ...        the files, in the manifest's order
//! ```
//!
//! The manifest and its signature come first: a reader checks the signature
//! against the keys the running image trusts before it reads a byte of
//! anything else, and [`verify`] checks every file against the signed
//! manifest, reading the whole bundle once, before the caller writes
//! anything anywhere. What is not named by the signed manifest is refused:
//! an unknown file, a missing one, one out of order, a size or a hash that
//! differs, a manifest format newer than this build reads.
//!
//! The signature is minisign's format (prehashed ed25519, the `minisign`
//! tool's default), so an operator makes and keeps keys with the `minisign`
//! command (`minisign -G`) and can check a bundle by hand:
//! `tar -xOf B manifest.json > m; tar -xOf B manifest.json.minisig > m.minisig;
//! minisign -V -p key.pub -m m`, then each file's sha256 against the manifest.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest format this build writes and the newest it reads.
pub const FORMAT: u32 = 1;
/// The tar member holding the manifest (the first).
pub const MANIFEST: &str = "manifest.json";
/// The tar member holding its signature (the second).
pub const SIGNATURE: &str = "manifest.json.minisig";
/// The root filesystem image, zstd-compressed.
pub const ROOT_IMAGE: &str = "root.img.zst";
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
const MAX_SIGNATURE_BYTES: u64 = 4096;
/// What tar may read besides the members' contents, per member (its
/// header blocks, a long name, the padding).
const HEADER_ALLOWANCE: u64 = 64 << 10;

/// A reader that fails once more than the budget in `left` is read: the tar
/// reader keeps extension headers (long names, PAX records) in memory
/// whole, and those are not covered by the signature, so without a budget
/// a crafted bundle could make the server hold gigabytes before anything
/// was checked.
struct Budget<R> {
    inner: R,
    left: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for Budget<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left.get();
        if left == 0 {
            return Err(std::io::Error::other(
                "the bundle holds more than its signed manifest accounts for (oversized tar headers?)",
            ));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left.set(left - n as u64);
        Ok(n)
    }
}

/// The unified kernel image whose command line mounts root slot `slot`
/// (`a` or `b`).
pub fn uki_name(slot: char) -> String {
    format!("zoned-{slot}.efi")
}

/// What a bundle is. Signed: everything a server decides from comes from
/// here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`] when written.
    pub format: u32,
    /// The image it updates (os-release `IMAGE_ID`: `zoned-vm`,
    /// `zoned-metal`): a server refuses a bundle for another.
    pub image_id: String,
    /// os-release `IMAGE_VERSION` of the root it carries.
    pub version: String,
    /// The commit the binaries were built from.
    pub commit: String,
    /// The cargo profile of the binaries (`release`).
    pub binaries_profile: String,
    /// The kernel release in its unified kernel images.
    pub kernel: String,
    /// Every file after the signature, in the order they are packed.
    pub files: Vec<FileEntry>,
}

/// One file of the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    /// Lower-case hex.
    pub sha256: String,
    /// For a compressed file: what it unpacks to, checked again as it is
    /// written out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpacked: Option<Digested>,
}

/// A size and a sha256 (lower-case hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digested {
    pub bytes: u64,
    pub sha256: String,
}

impl Manifest {
    /// The bytes that are signed and packed.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(self).expect("a manifest serializes");
        b.push(b'\n');
        b
    }

    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    /// Sum of the files' sizes.
    pub fn payload_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }

    fn check(&self) -> Result<(), Error> {
        let bad = |reason: String| Err(Error::Manifest { reason });
        if self.format > FORMAT {
            return Err(Error::FormatTooNew {
                found: self.format,
                supported: FORMAT,
            });
        }
        if self.format == 0 {
            return bad("format 0".into());
        }
        if self.image_id.is_empty() || self.version.is_empty() {
            return bad("image_id and version must not be empty".into());
        }
        let mut seen = BTreeSet::new();
        for f in &self.files {
            let plain = !f.name.is_empty()
                && f.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
                && !f.name.starts_with('.');
            if !plain || f.name == MANIFEST || f.name == SIGNATURE {
                return bad(format!("file name {:?} is not a plain file name", f.name));
            }
            if !seen.insert(f.name.as_str()) {
                return bad(format!("file {:?} is listed twice", f.name));
            }
            for h in std::iter::once(&f.sha256).chain(f.unpacked.as_ref().map(|u| &u.sha256)) {
                if h.len() != 64
                    || !h
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return bad(format!(
                        "file {:?}: sha256 {h:?} is not 64 lower-case hex digits",
                        f.name
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Why a bundle was refused or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Zoned update bundle: {reason}")]
    NotABundle { path: PathBuf, reason: String },
    #[error("no trusted key in {dir} (minisign public keys, *.pub)")]
    NoTrustedKeys { dir: PathBuf },
    #[error("trusted key {source_name}: not a minisign public key")]
    BadKey { source_name: String },
    #[error("the bundle is signed by key {key_id}, which this server does not trust (trusted: {trusted})")]
    UnknownKey { key_id: String, trusted: String },
    #[error("the bundle's signature by key {key_id} does not match its manifest: the manifest was changed after signing, or the signature is damaged")]
    BadSignature { key_id: String },
    #[error("the signature file is not a minisign signature")]
    SignatureFormat,
    #[error("bundle manifest: {reason}")]
    Manifest { reason: String },
    #[error("the bundle's manifest is format {found}; this build reads up to format {supported}: install a release between the two first")]
    FormatTooNew { found: u32, supported: u32 },
    #[error("bundle file {name}: {reason}")]
    File { name: String, reason: String },
    #[error("{reason}")]
    Refused { reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// minisign's key id as its tools print it: the 8 bytes, little-endian, in
/// upper-case hex.
fn key_id_text(id: &[u8]) -> String {
    let mut b = [0u8; 8];
    b.copy_from_slice(&id[..8]);
    format!("{:016X}", u64::from_le_bytes(b))
}

/// The key id in the base64 line of a minisign key or signature (after the
/// two algorithm bytes).
fn key_id_of(text: &str) -> Option<String> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))?;
    let bin = base64::engine::general_purpose::STANDARD
        .decode(line)
        .ok()?;
    (bin.len() >= 10).then(|| key_id_text(&bin[2..10]))
}

/// The public keys a server accepts bundles from.
#[derive(Debug, Default, Clone)]
pub struct TrustedKeys {
    keys: Vec<(String, minisign_verify::PublicKey)>,
}

impl TrustedKeys {
    /// Every `*.pub` in `dir` (minisign's public key files); none is an
    /// error.
    pub fn load_dir(dir: &Path) -> Result<Self, Error> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "pub"))
            .collect();
        files.sort();
        let mut keys = TrustedKeys::default();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(io(&f))?;
            keys.add(&f.display().to_string(), &text)?;
        }
        if keys.keys.is_empty() {
            return Err(Error::NoTrustedKeys {
                dir: dir.to_owned(),
            });
        }
        Ok(keys)
    }

    /// One public key, in minisign's file format or as its base64 line.
    pub fn add(&mut self, source_name: &str, text: &str) -> Result<(), Error> {
        let bad = || Error::BadKey {
            source_name: source_name.to_owned(),
        };
        let key = if text.trim_start().starts_with("untrusted comment:") {
            minisign_verify::PublicKey::decode(text.trim())
        } else {
            minisign_verify::PublicKey::from_base64(text.trim())
        }
        .map_err(|_| bad())?;
        let id = key_id_of(text).ok_or_else(bad)?;
        self.keys.push((id, key));
        Ok(())
    }

    /// The ids of the keys, as minisign prints them.
    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|(id, _)| id.clone()).collect()
    }

    /// Checks `signature` (minisign's file format) of `message`; the id of
    /// the key that signed it.
    pub fn check(&self, message: &[u8], signature: &str) -> Result<String, Error> {
        let sig = minisign_verify::Signature::decode(signature.trim())
            .map_err(|_| Error::SignatureFormat)?;
        // The key id is the second to ninth bytes of the signature line.
        let key_id = key_id_of(signature).ok_or(Error::SignatureFormat)?;
        let Some((id, key)) = self.keys.iter().find(|(id, _)| *id == key_id) else {
            return Err(Error::UnknownKey {
                key_id,
                trusted: self.ids().join(", "),
            });
        };
        // Legacy (not prehashed) signatures are refused: minisign has made
        // prehashed ones by default since 0.8.
        key.verify(message, &sig, false)
            .map_err(|_| Error::BadSignature { key_id: id.clone() })?;
        Ok(id.clone())
    }
}

/// A bundle whose signature and files all matched.
#[derive(Debug, Clone)]
pub struct Verified {
    pub manifest: Manifest,
    /// The key that signed it.
    pub key_id: String,
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Copies `from` into `to` (if any) while hashing; (bytes, sha256 hex).
pub fn copy_hashed(
    from: &mut impl Read,
    mut to: Option<&mut dyn Write>,
) -> std::io::Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let got = from.read(&mut buf)?;
        if got == 0 {
            break;
        }
        h.update(&buf[..got]);
        if let Some(w) = to.as_deref_mut() {
            w.write_all(&buf[..got])?;
        }
        n += got as u64;
    }
    Ok((n, hex(&h.finalize())))
}

/// The entry of `name` for the file at `path` (its size and sha256).
pub fn file_entry(name: &str, path: &Path, unpacked: Option<Digested>) -> Result<FileEntry, Error> {
    let mut f = BufReader::new(File::open(path).map_err(io(path))?);
    let (bytes, sha256) = copy_hashed(&mut f, None).map_err(io(path))?;
    Ok(FileEntry {
        name: name.to_owned(),
        bytes,
        sha256,
        unpacked,
    })
}

/// Writes the bundle `out`: the manifest, its `signature` (minisign's file
/// format, made by the caller over [`Manifest::to_bytes`]) and each file of
/// the manifest from the path in `paths` (same order). Written to a
/// temporary name and renamed: a bundle that exists is whole.
pub fn pack(
    out: &Path,
    manifest: &Manifest,
    signature: &str,
    paths: &[PathBuf],
) -> Result<(), Error> {
    manifest.check()?;
    if paths.len() != manifest.files.len() {
        return Err(Error::Manifest {
            reason: format!(
                "{} files listed, {} given",
                manifest.files.len(),
                paths.len()
            ),
        });
    }
    let tmp = out.with_extension("bundle.part");
    let file = File::create(&tmp).map_err(io(&tmp))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    tar.mode(tar::HeaderMode::Deterministic);
    let mut append = |name: &str, bytes: u64, data: &mut dyn Read| -> std::io::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mtime(0);
        tar.append_data(&mut h, name, data)
    };
    let m = manifest.to_bytes();
    append(MANIFEST, m.len() as u64, &mut m.as_slice()).map_err(io(&tmp))?;
    append(SIGNATURE, signature.len() as u64, &mut signature.as_bytes()).map_err(io(&tmp))?;
    for (entry, path) in manifest.files.iter().zip(paths) {
        let f = File::open(path).map_err(io(path))?;
        let len = f.metadata().map_err(io(path))?.len();
        if len != entry.bytes {
            return Err(Error::File {
                name: entry.name.clone(),
                reason: format!(
                    "{} is {len} bytes, the manifest says {}",
                    path.display(),
                    entry.bytes
                ),
            });
        }
        append(&entry.name, len, &mut BufReader::new(f)).map_err(io(&tmp))?;
    }
    let mut w = tar.into_inner().map_err(io(&tmp))?;
    w.flush().map_err(io(&tmp))?;
    w.get_ref().sync_all().map_err(io(&tmp))?;
    drop(w);
    std::fs::rename(&tmp, out).map_err(io(out))
}

fn read_member(
    path: &Path,
    entry: Option<std::io::Result<tar::Entry<'_, impl Read>>>,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>, Error> {
    let not = |reason: String| Error::NotABundle {
        path: path.to_owned(),
        reason,
    };
    let mut e = entry
        .ok_or_else(|| not(format!("it ends before {name}")))?
        .map_err(io(path))?;
    let found = e.path().map_err(io(path))?.to_string_lossy().into_owned();
    if found != name {
        return Err(not(format!("found {found:?} where {name} should be")));
    }
    if e.size() > limit {
        return Err(not(format!(
            "{name} is {} bytes (at most {limit})",
            e.size()
        )));
    }
    let mut b = Vec::new();
    e.read_to_end(&mut b).map_err(io(path))?;
    Ok(b)
}

/// Reads the bundle from `r` (`path` names it in errors): checks the
/// manifest's signature with `keys`, gives the signed manifest to `accept`
/// (which may refuse it: another image, no room), then reads every file in
/// the manifest's order, hashing each while `sink(entry, reader)` consumes
/// it (what it leaves unread is hashed anyway). An error names the first
/// thing that differs from the signed manifest.
///
/// `sink` sees bytes before their file's hash is known: what it writes must
/// not be used unless this returns Ok.
pub fn read<R: Read>(
    path: &Path,
    r: R,
    keys: &TrustedKeys,
    accept: impl FnOnce(&Manifest) -> Result<(), Error>,
    mut sink: impl FnMut(&FileEntry, &mut dyn Read) -> std::io::Result<()>,
) -> Result<Verified, Error> {
    // Until the signature is checked: the manifest, the signature and
    // their headers; then what the signed manifest names.
    let left = std::rc::Rc::new(std::cell::Cell::new(
        MAX_MANIFEST_BYTES + MAX_SIGNATURE_BYTES + 3 * HEADER_ALLOWANCE,
    ));
    let mut archive = tar::Archive::new(Budget {
        inner: r,
        left: left.clone(),
    });
    let mut entries = archive.entries().map_err(io(path))?;
    let Verified { manifest, key_id } = head(path, &mut entries, keys)?;
    accept(&manifest)?;
    left.set(
        left.get()
            + manifest.payload_bytes()
            + (manifest.files.len() as u64 + 1) * HEADER_ALLOWANCE,
    );
    for want in &manifest.files {
        let file_err = |reason: String| Error::File {
            name: want.name.clone(),
            reason,
        };
        let mut e = entries
            .next()
            .ok_or_else(|| file_err("missing: the bundle ends before it".into()))?
            .map_err(io(path))?;
        let name = e.path().map_err(io(path))?.to_string_lossy().into_owned();
        if name != want.name {
            return Err(file_err(format!("expected next, found {name:?} instead")));
        }
        if e.header().entry_type() != tar::EntryType::Regular {
            return Err(file_err("not a regular file".into()));
        }
        if e.size() != want.bytes {
            return Err(file_err(format!(
                "{} bytes, the manifest says {}",
                e.size(),
                want.bytes
            )));
        }
        let mut hashing = HashingReader {
            inner: &mut e,
            hash: Sha256::new(),
            bytes: 0,
        };
        sink(want, &mut hashing).map_err(|e| file_err(e.to_string()))?;
        std::io::copy(&mut hashing, &mut std::io::sink()).map_err(io(path))?;
        let (bytes, sha) = (hashing.bytes, hex(&hashing.hash.finalize()));
        if bytes != want.bytes || sha != want.sha256 {
            return Err(file_err(format!(
                "sha256 {sha} ({bytes} bytes) differs from the signed manifest's {} ({} bytes): the bundle was changed or damaged",
                want.sha256, want.bytes
            )));
        }
    }
    if let Some(extra) = entries.next() {
        let e = extra.map_err(io(path))?;
        let name = e.path().map_err(io(path))?.to_string_lossy().into_owned();
        return Err(Error::File {
            name,
            reason: "not named by the signed manifest".into(),
        });
    }
    Ok(Verified { manifest, key_id })
}

/// The manifest and its signature, the first two members: the signed
/// manifest, once its signature matched one of `keys`.
fn head<R: Read>(
    path: &Path,
    entries: &mut tar::Entries<'_, R>,
    keys: &TrustedKeys,
) -> Result<Verified, Error> {
    let manifest_bytes = read_member(path, entries.next(), MANIFEST, MAX_MANIFEST_BYTES)?;
    let signature = read_member(path, entries.next(), SIGNATURE, MAX_SIGNATURE_BYTES)?;
    let signature = String::from_utf8(signature).map_err(|_| Error::SignatureFormat)?;
    // Nothing in the manifest is looked at before its signature matched.
    let key_id = keys.check(&manifest_bytes, &signature)?;
    let manifest: Manifest =
        serde_json::from_slice(&manifest_bytes).map_err(|e| Error::Manifest {
            reason: e.to_string(),
        })?;
    manifest.check()?;
    Ok(Verified { manifest, key_id })
}

/// The signed manifest of the bundle at `path`, its signature checked with
/// `keys`; the files are not read (a bundle verified whole before, to
/// describe it; [`verify`] or [`read`] before using any file).
pub fn signed_manifest(path: &Path, keys: &TrustedKeys) -> Result<Verified, Error> {
    let f = File::open(path).map_err(io(path))?;
    let left = std::rc::Rc::new(std::cell::Cell::new(
        MAX_MANIFEST_BYTES + MAX_SIGNATURE_BYTES + 3 * HEADER_ALLOWANCE,
    ));
    let mut archive = tar::Archive::new(Budget {
        inner: BufReader::new(f),
        left,
    });
    let mut entries = archive.entries().map_err(io(path))?;
    head(path, &mut entries, keys)
}

struct HashingReader<'a, R: Read> {
    inner: &'a mut R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Checks the whole bundle at `path`: its signature by one of `keys`, then
/// every file against the signed manifest. Reads it once; writes nothing.
pub fn verify(path: &Path, keys: &TrustedKeys) -> Result<Verified, Error> {
    let f = File::open(path).map_err(io(path))?;
    read(
        path,
        BufReader::with_capacity(1 << 20, f),
        keys,
        |_| Ok(()),
        |_, _| Ok(()),
    )
}

#[cfg(test)]
mod tests;
