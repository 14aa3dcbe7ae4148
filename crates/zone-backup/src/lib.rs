//! A zone's backup file (`zonectl snapshot save`), shared by the server
//! that streams it (zoned's `Cluster.Backup`) and the client that writes
//! and checks it (zonectl).
//!
//! Layout: the 8 bytes `ZONEBAK1`, then frames, each a 4-byte big-endian
//! length and a `BackupChunk` (protobuf) of that length: one header
//! (format, zone id, revision, key count, server, time, membership), the
//! keys in batches of about 1 MiB in key order, and one trailer whose
//! SHA-256 covers every frame before it, length prefixes included, and
//! which repeats the key count. Nothing may follow the trailer.
//!
//! The server computes the checksum over the frames it sends; the writer
//! computes it again over what it writes and refuses a stream whose
//! trailer disagrees, so a backup is checked end to end. Reading checks
//! everything again: a truncated file (no trailer), a flipped bit (the
//! checksum, or a frame that does not decode), keys out of order or a
//! count that does not match are each refused with what is wrong and
//! where.

use std::io::{Read, Write};

use prost::Message as _;
use sha2::{Digest, Sha256};
use zone_proto::v1::{backup_chunk::Part, BackupChunk, BackupHeader, BackupTrailer, KeyValue};

/// The first bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"ZONEBAK1";
/// The format this version writes and reads.
pub const FORMAT: u32 = 1;
/// A batch's target size on the wire.
pub const BATCH_BYTES: usize = 1 << 20;
/// The largest frame read back: a batch holds at least one key, and a
/// value may be large (zoned's `limits.max_value_bytes`).
pub const MAX_FRAME: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not a Zoned backup (it does not start with `ZONEBAK1`)")]
    NotABackup,
    #[error("truncated: the file ends at byte {at}, {what}")]
    Truncated { at: u64, what: String },
    #[error("corrupt at byte {at}: {what}")]
    Corrupt { at: u64, what: String },
    #[error("backup format {0}; this version reads format {FORMAT}")]
    Format(u32),
    #[error("checksum mismatch: the trailer says {expected}, the frames hash to {actual}")]
    Checksum { expected: String, actual: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The frame of `chunk`: its length, then its bytes.
pub fn frame(chunk: &BackupChunk) -> Vec<u8> {
    let body = chunk.encode_to_vec();
    let mut f = Vec::with_capacity(4 + body.len());
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(&body);
    f
}

/// What a backup holds, as its frames said and the checks confirmed.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub header: BackupHeader,
    pub keys: u64,
    /// The file's size.
    pub bytes: u64,
    pub sha256: String,
}

/// The server's side: hashes the frames as it sends them, and makes the
/// trailer.
#[derive(Debug, Default)]
pub struct Sealer {
    hash: Sha256,
    keys: u64,
}

impl Sealer {
    /// `chunk` is about to be sent (header or batch).
    pub fn add(&mut self, chunk: &BackupChunk) {
        if let Some(Part::Batch(b)) = &chunk.part {
            self.keys += b.kvs.len() as u64;
        }
        self.hash.update(frame(chunk));
    }

    pub fn trailer(self) -> BackupChunk {
        BackupChunk {
            part: Some(Part::Trailer(BackupTrailer {
                key_count: self.keys,
                sha256: self.hash.finalize().to_vec(),
            })),
        }
    }
}

/// Where a stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Header,
    Batches,
    Done,
}

/// Checks a backup's chunks in order, whether they come off the wire or
/// out of a file: the header first, batches of keys in strictly increasing
/// order, the trailer last with the checksum and count of what came
/// before.
#[derive(Debug)]
pub struct Checker {
    stage: Stage,
    hash: Sha256,
    header: Option<BackupHeader>,
    keys: u64,
    last_key: Option<Vec<u8>>,
    sha256: String,
}

impl Default for Checker {
    fn default() -> Self {
        Checker {
            stage: Stage::Header,
            hash: Sha256::new(),
            header: None,
            keys: 0,
            last_key: None,
            sha256: String::new(),
        }
    }
}

impl Checker {
    /// The next chunk, whose frame is `framed` (as written), at byte `at`
    /// of the file; the keys of a batch, for the caller to use.
    pub fn check<'a>(
        &mut self,
        chunk: &'a BackupChunk,
        framed: &[u8],
        at: u64,
    ) -> Result<&'a [KeyValue], BackupError> {
        let bad = |what: String| BackupError::Corrupt { at, what };
        match (&chunk.part, self.stage) {
            (Some(Part::Header(h)), Stage::Header) => {
                if h.format != FORMAT {
                    return Err(BackupError::Format(h.format));
                }
                self.header = Some(h.clone());
                self.stage = Stage::Batches;
                self.hash.update(framed);
                Ok(&[])
            }
            (Some(Part::Batch(b)), Stage::Batches) => {
                for kv in &b.kvs {
                    if self.last_key.as_deref().is_some_and(|k| k >= &kv.key[..]) {
                        return Err(bad(format!(
                            "key {:?} is not after the one before it",
                            String::from_utf8_lossy(&kv.key)
                        )));
                    }
                    self.last_key = Some(kv.key.clone());
                }
                self.keys += b.kvs.len() as u64;
                self.hash.update(framed);
                Ok(&b.kvs)
            }
            (Some(Part::Trailer(t)), Stage::Batches) => {
                let actual = std::mem::take(&mut self.hash).finalize().to_vec();
                if actual != t.sha256 {
                    return Err(BackupError::Checksum {
                        expected: hex(&t.sha256),
                        actual: hex(&actual),
                    });
                }
                let header = self.header.as_ref().map_or(0, |h| h.key_count);
                if t.key_count != self.keys || header != self.keys {
                    return Err(bad(format!(
                        "{} keys, but the header says {header} and the trailer {}",
                        self.keys, t.key_count
                    )));
                }
                self.sha256 = hex(&actual);
                self.stage = Stage::Done;
                Ok(&[])
            }
            (_, Stage::Done) => Err(bad("something follows the trailer".into())),
            (None, _) => Err(bad("an empty frame".into())),
            (Some(_), Stage::Header) => Err(bad("the first frame is not the header".into())),
            (Some(Part::Header(_)), Stage::Batches) => Err(bad("a second header".into())),
        }
    }

    /// Whether the trailer was checked.
    pub fn done(&self) -> bool {
        self.stage == Stage::Done
    }

    /// Once done: what the backup holds (`bytes`: its size).
    pub fn summary(&self, bytes: u64) -> Option<Summary> {
        self.done().then(|| Summary {
            header: self.header.clone().unwrap_or_default(),
            keys: self.keys,
            bytes,
            sha256: self.sha256.clone(),
        })
    }
}

/// Writes a backup as its chunks arrive, checking each (see [`Checker`]).
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    checker: Checker,
    bytes: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(mut out: W) -> Result<Writer<W>, BackupError> {
        out.write_all(MAGIC)?;
        Ok(Writer {
            out,
            checker: Checker::default(),
            bytes: MAGIC.len() as u64,
        })
    }

    /// Writes `chunk` after checking it; the keys it held.
    pub fn push(&mut self, chunk: &BackupChunk) -> Result<u64, BackupError> {
        let framed = frame(chunk);
        let n = self.checker.check(chunk, &framed, self.bytes)?.len() as u64;
        self.out.write_all(&framed)?;
        self.bytes += framed.len() as u64;
        Ok(n)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The header, once written.
    pub fn header(&self) -> Option<&BackupHeader> {
        self.checker.header.as_ref()
    }

    /// After the trailer: the output, and what was written.
    pub fn finish(self) -> Result<(W, Summary), BackupError> {
        match self.checker.summary(self.bytes) {
            Some(s) => Ok((self.out, s)),
            None => Err(BackupError::Truncated {
                at: self.bytes,
                what: "before its trailer: the stream ended early".into(),
            }),
        }
    }
}

/// Reads a whole backup from `input`, checking everything; `keys` gets
/// each batch's keys in order.
pub fn read(
    mut input: impl Read,
    mut keys: impl FnMut(&[KeyValue]),
) -> Result<Summary, BackupError> {
    let mut magic = [0u8; 8];
    let got = read_full(&mut input, &mut magic)?;
    if got < magic.len() || &magic != MAGIC {
        return Err(BackupError::NotABackup);
    }
    let mut at = MAGIC.len() as u64;
    let mut checker = Checker::default();
    loop {
        let mut len = [0u8; 4];
        match read_full(&mut input, &mut len)? {
            0 => break,
            4 => {}
            _ => {
                return Err(BackupError::Truncated {
                    at,
                    what: "in a frame's length".into(),
                })
            }
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > MAX_FRAME {
            return Err(BackupError::Corrupt {
                at,
                what: format!("a frame of {n} bytes (at most {MAX_FRAME})"),
            });
        }
        let mut framed = Vec::with_capacity(4 + n);
        framed.extend_from_slice(&len);
        framed.resize(4 + n, 0);
        let got = read_full(&mut input, &mut framed[4..])?;
        if got < n {
            return Err(BackupError::Truncated {
                at: at + 4 + got as u64,
                what: format!("inside a frame of {n} bytes"),
            });
        }
        let chunk = BackupChunk::decode(&framed[4..]).map_err(|e| BackupError::Corrupt {
            at,
            what: format!("a frame that does not decode: {e}"),
        })?;
        keys(checker.check(&chunk, &framed, at)?);
        at += framed.len() as u64;
    }
    checker.summary(at).ok_or(BackupError::Truncated {
        at,
        what: "before its trailer".into(),
    })
}

/// Reads until `buf` is full or the input ends; how much was read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests;
