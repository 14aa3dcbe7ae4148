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

/// p50 of `n` bare replicated writes, the floor under any leader-based
/// replicated store on this machine: a client thread sends a 300-byte
/// record over loopback TCP to a "leader" thread, which passes it on to a
/// "follower" thread over a second connection and meanwhile appends it to
/// its own file with fdatasync; the follower appends and syncs its copy
/// and acknowledges; then the leader answers. Two round trips, two fsyncs
/// in parallel, the thread wake-ups between them, and nothing else: no
/// protocol, no log, no state machine. Files in `dir` (the data disk).
pub fn bare_replicated_write_p50_ms(dir: &Path, n: usize) -> Result<f64> {
    const RECORD: usize = 300;
    let open = |name: &str| -> Result<std::fs::File> {
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))
    };
    let (mut leader_file, mut follower_file) = (open("bare-leader")?, open("bare-follower")?);

    let follower_listener = TcpListener::bind("127.0.0.1:0")?;
    let follower_addr = follower_listener.local_addr()?;
    let follower = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = follower_listener.accept()?;
        s.set_nodelay(true)?;
        let mut rec = [0u8; RECORD];
        while s.read_exact(&mut rec).is_ok() {
            follower_file.write_all(&rec)?;
            follower_file.sync_data()?;
            s.write_all(&[1])?;
        }
        Ok(())
    });

    let leader_listener = TcpListener::bind("127.0.0.1:0")?;
    let leader_addr = leader_listener.local_addr()?;
    let leader = std::thread::spawn(move || -> std::io::Result<()> {
        let mut peer = TcpStream::connect(follower_addr)?;
        peer.set_nodelay(true)?;
        let (mut client, _) = leader_listener.accept()?;
        client.set_nodelay(true)?;
        let mut rec = [0u8; RECORD];
        let mut ack = [0u8; 1];
        while client.read_exact(&mut rec).is_ok() {
            peer.write_all(&rec)?;
            leader_file.write_all(&rec)?;
            leader_file.sync_data()?;
            peer.read_exact(&mut ack)?;
            client.write_all(&ack)?;
        }
        Ok(())
    });

    let mut s = TcpStream::connect(leader_addr)?;
    s.set_nodelay(true)?;
    let rec = [b'r'; RECORD];
    let mut ack = [0u8; 1];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        s.write_all(&rec)?;
        s.read_exact(&mut ack)
            .context("the bare replicated write's leader thread stopped")?;
        lat.push(t0.elapsed().as_micros().max(1) as u32);
    }
    drop(s);
    for (name, t) in [("leader", leader), ("follower", follower)] {
        t.join()
            .map_err(|_| anyhow::anyhow!("the bare write's {name} thread panicked"))?
            .with_context(|| format!("the bare write's {name} thread"))?;
    }
    for name in ["bare-leader", "bare-follower"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    lat.sort_unstable();
    Ok(quantile_ms(&lat, 0.5))
}
