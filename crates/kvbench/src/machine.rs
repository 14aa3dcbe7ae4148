//! The machine's own limits, for reference: what one durable write and one
//! loopback round trip cost, below which no replicated write can go.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::load::quantile_ms;

/// CPU time (user + system) used so far by process `pid` (all its
/// threads), or by this process for `None`, in ms: /proc/<pid>/stat, in
/// USER_HZ ticks (100 per second on Linux, whatever the kernel's HZ).
pub fn cpu_ms(pid: Option<u32>) -> Result<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name, in parentheses, may hold spaces: count from after it.
    let rest = text
        .rsplit_once(')')
        .with_context(|| format!("{path}: no command name"))?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: field {} is not a number", i + 3))
    };
    // Fields 14 and 15 of the line (utime, stime); the rest starts at 3.
    Ok((tick(11)? + tick(12)?) as f64 * 10.0)
}

/// p50 of `n` appends of 256 bytes each followed by fdatasync, in a file
/// in `dir` (the benchmark's data directory, so the data disk).
pub fn fsync_p50_ms(dir: &Path, n: usize) -> Result<f64> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let block = [b'x'; 256];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        lat.push(t0.elapsed().as_micros() as u32);
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    lat.sort_unstable();
    Ok(quantile_ms(&lat, 0.5))
}

/// p50 of `n` one-byte ping-pongs over a loopback TCP connection (no
/// Nagle), between two threads.
pub fn loopback_rtt_p50_ms(n: usize) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).is_ok() {
            s.write_all(&b)?;
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut lat = Vec::with_capacity(n);
    let mut b = [7u8; 1];
    for _ in 0..n {
        let t0 = Instant::now();
        s.write_all(&b)?;
        s.read_exact(&mut b)?;
        lat.push(t0.elapsed().as_micros().max(1) as u32);
    }
    drop(s);
    let _ = echo.join();
    lat.sort_unstable();
    Ok(quantile_ms(&lat, 0.5))
}
