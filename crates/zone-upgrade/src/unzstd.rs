//! A zstd stream decoder behind [`Read`], on the C library (zstd-sys) that
//! zoned links already for RocksDB.
//!
//! It replaced the pure-Rust ruzstd, which decodes the root image 3.3 times
//! slower (480 MiB: 1.89 s against 0.57 s on the build machine; under
//! QEMU's TCG the root slot's write took ~110 s of an upgrade's ~4.5 min per
//! server). zstd-safe is taken without its `std` feature and with none of
//! its defaults: zstd-sys keeps exactly the features RocksDB's build gave
//! it, so this dependency does not rebuild RocksDB's C++.

use std::io::{self, Read};

/// Decodes the zstd frames read from `inner` (one or more, one after the
/// other); a stream that ends inside a frame is an error, never a short
/// read taken for the end.
pub struct Decoder<R> {
    inner: R,
    dctx: zstd_safe::DCtx<'static>,
    input: Vec<u8>,
    pos: usize,
    len: usize,
    /// The input has ended.
    eof: bool,
    /// zstd's last call that did anything ended a frame (its hint was 0),
    /// and no input has been decoded since: the only place the input may
    /// end.
    at_frame_end: bool,
}

impl<R> std::fmt::Debug for Decoder<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("buffered", &(self.len - self.pos))
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Decoder<R> {
    pub fn new(inner: R) -> io::Result<Self> {
        let dctx = zstd_safe::DCtx::try_create()
            .ok_or_else(|| io::Error::other("zstd: cannot allocate a decompression context"))?;
        Ok(Decoder {
            inner,
            dctx,
            input: vec![0; zstd_safe::DCtx::in_size()],
            pos: 0,
            len: 0,
            eof: false,
            at_frame_end: false,
        })
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pos == self.len && !self.eof {
                self.len = self.inner.read(&mut self.input)?;
                self.pos = 0;
                self.eof = self.len == 0;
            }
            let mut src = zstd_safe::InBuffer::around(&self.input[self.pos..self.len]);
            let mut dst = zstd_safe::OutBuffer::around(buf);
            let hint = self
                .dctx
                .decompress_stream(&mut dst, &mut src)
                .map_err(|code| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("zstd: {}", zstd_safe::get_error_name(code)),
                    )
                })?;
            let consumed = src.pos();
            self.pos += consumed;
            let produced = dst.pos();
            // zstd stops at a frame's end with the rest of the input unread;
            // the next frame's first bytes then clear the mark. (A call
            // with no input after a frame's end answers a non-zero hint,
            // the next header's size: that alone does not clear it.)
            if hint == 0 {
                self.at_frame_end = true;
            } else if consumed > 0 {
                self.at_frame_end = false;
            }
            if produced > 0 {
                return Ok(produced);
            }
            if self.eof && self.pos == self.len {
                return if self.at_frame_end {
                    Ok(0)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "zstd: the stream ends inside a frame",
                    ))
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Decoder;
    use std::io::Read as _;

    /// `zstd -q -6` of the 100,000 bytes `i % 251`, made with the zstd
    /// command of Debian 12 (1.5.4): a file of another implementation.
    fn sample() -> (Vec<u8>, Vec<u8>) {
        let plain: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let packed = std::process::Command::new("zstd")
            .args(["-q", "-6", "-c"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin.take().expect("stdin").write_all(&plain)?;
                c.wait_with_output()
            })
            .expect("the zstd command (Debian package zstd, installed by `cargo xtask deps`)");
        assert!(packed.status.success());
        (plain, packed.stdout)
    }

    #[test]
    fn decodes_what_the_zstd_command_wrote_read_by_read() {
        let (plain, packed) = sample();
        // Small reads on both sides: the input arrives 7 bytes at a time.
        struct Trickle<'a>(&'a [u8]);
        impl std::io::Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(7).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut d = Decoder::new(Trickle(&packed)).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 333];
        loop {
            let n = d.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, plain);
    }

    #[test]
    fn a_stream_cut_inside_its_frame_is_an_error_not_an_end() {
        let (plain, packed) = sample();
        let cut = &packed[..packed.len() - 5];
        let mut out = Vec::new();
        let e = Decoder::new(cut)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
        // Two frames, the second cut after its first bytes (within the
        // input chunk that ended the first frame).
        let mut two = packed.clone();
        two.extend_from_slice(&packed[..6]);
        let mut out = Vec::new();
        let e = Decoder::new(&two[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
        // Two whole frames: both decoded.
        let mut two = packed.clone();
        two.extend_from_slice(&packed);
        let mut out = Vec::new();
        Decoder::new(&two[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out.len(), 2 * plain.len());
        assert!(out.starts_with(&plain) && out.ends_with(&plain));
        let mut out = Vec::new();
        assert!(Decoder::new(&b"not zstd at all"[..])
            .unwrap()
            .read_to_end(&mut out)
            .is_err());
    }
}
