//! A real NFS server for the tests: nfs-ganesha (the host kernel has no
//! nfsd), run in the foreground inside a network namespace, exporting a
//! directory of the test's over NFSv4 (and v3) on TCP, with no grace period
//! (a fresh server with no clients to reclaim) and everything under a
//! directory of its own, so that several can run at once.
//!
//! It can be stopped and continued (SIGSTOP, SIGCONT: a server that stops
//! answering, with its connections open) or killed and started again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// An nfs-ganesha server in a namespace. Killed on drop.
#[derive(Debug)]
pub struct Ganesha {
    pub ns: String,
    pub addr: String,
    /// The exported directory (`<addr>:/export`).
    pub export: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    /// The rpcbind this server registers with, if it had to start one.
    rpcbind: Option<Child>,
}

/// The export's path in NFS terms.
pub const PSEUDO: &str = "/export";

fn config(dir: &Path, addr: &str, export: &Path) -> String {
    format!(
        r#"NFS_CORE_PARAM {{
    Bind_addr = {addr};
    NFS_Port = 2049;
    Protocols = 4;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Mount_Path_Pseudo = true;
}}
NFS_KRB5 {{ Active_krb5 = false; }}
NFSv4 {{
    Graceless = true;
    Lease_Lifetime = 10;
    Grace_Period = 10;
    RecoveryBackend = fs;
    RecoveryRoot = "{recov}";
    Minor_Versions = 0, 1, 2;
}}
EXPORT {{
    Export_Id = 1;
    Path = "{export}";
    Pseudo = "{PSEUDO}";
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    Protocols = 4;
    Transports = TCP;
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = EVENT; }}
"#,
        recov = dir.join("recov").display(),
        export = export.display(),
    )
}

impl Ganesha {
    /// Starts ganesha in namespace `ns`, listening on `addr` (one of the
    /// namespace's), state and export under `dir`; waits until it serves.
    pub fn start(ns: &str, addr: &str, dir: &Path) -> Result<Ganesha> {
        let bin = Path::new("/usr/bin/ganesha.nfsd");
        if !bin.exists() {
            bail!("nfs-ganesha is not installed (cargo xtask deps installs nfs-ganesha and nfs-ganesha-vfs): the storage tests need a real NFS server");
        }
        let export = dir.join("export");
        for d in [dir.join("recov"), dir.join("run"), export.clone()] {
            std::fs::create_dir_all(&d).with_context(|| d.display().to_string())?;
        }
        std::fs::write(dir.join("ganesha.conf"), config(dir, addr, &export))?;
        let mut g = Ganesha {
            ns: ns.to_owned(),
            addr: addr.to_owned(),
            export,
            dir: dir.to_owned(),
            child: None,
            rpcbind: None,
        };
        // ganesha registers with rpcbind at start, NFSv4 alone included,
        // and exits when it cannot. Its socket is a path: one rpcbind
        // already answering on this host serves every namespace.
        const RPCBIND_SOCKET: &str = "/run/rpcbind.sock";
        if std::os::unix::net::UnixStream::connect(RPCBIND_SOCKET).is_err() {
            let child = Command::new("ip")
                .args(["netns", "exec", ns, "rpcbind", "-f"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("starting rpcbind (nfs-ganesha's dependency)")?;
            g.rpcbind = Some(child);
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::os::unix::net::UnixStream::connect(RPCBIND_SOCKET).is_err() {
                if Instant::now() > deadline {
                    bail!("rpcbind did not answer on {RPCBIND_SOCKET} within 10 s");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        g.launch()?;
        Ok(g)
    }

    /// `<addr>:/export`, as a datastore's source.
    pub fn source(&self) -> String {
        format!("{}:{PSEUDO}", self.addr)
    }

    fn launch(&mut self) -> Result<()> {
        let d = &self.dir;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("ganesha.out"))?;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "/usr/bin/ganesha.nfsd",
                "-F",
                "-f",
            ])
            .arg(d.join("ganesha.conf"))
            .arg("-L")
            .arg(d.join("ganesha.log"))
            .arg("-p")
            .arg(d.join("run/ganesha.pid"))
            .args(["-N", "NIV_EVENT"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting ganesha.nfsd")?;
        self.child = Some(child);
        // Serving once its NFS port accepts a connection.
        let deadline = Instant::now() + Duration::from_secs(30);
        let probe = format!("{}:2049", self.addr);
        loop {
            let ok = Command::new("ip")
                .args(["netns", "exec", &self.ns, "timeout", "2", "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/{}", probe.replace(':', "/")))
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!(
                        "ganesha.nfsd exited ({status}); its log: {}",
                        std::fs::read_to_string(d.join("ganesha.log")).unwrap_or_default()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("ganesha.nfsd did not listen on {probe} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn pid(&self) -> nix::unistd::Pid {
        // `ip netns exec` execs ganesha: the child is ganesha itself.
        nix::unistd::Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// SIGSTOP: the server stops answering, its connections stay open.
    pub fn pause(&self) {
        let _ = nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT.
    pub fn resume(&self) {
        let _ = nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGCONT);
    }

    /// Drops (or lets through again) what `client` sends to the server:
    /// that client alone loses its path to it (an nftables rule in the
    /// server's namespace).
    pub fn cut(&self, client: &str, cut: bool) -> Result<()> {
        let nft = |script: &str| -> Result<()> {
            let st = Command::new("ip")
                .args(["netns", "exec", &self.ns, "nft", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write as _;
                    c.stdin
                        .take()
                        .expect("piped")
                        .write_all(script.as_bytes())?;
                    c.wait()
                })
                .context("running nft")?;
            if !st.success() {
                bail!("nft failed ({st}) on:\n{script}");
            }
            Ok(())
        };
        let table = format!("zoned_nfs_{}", client.replace(['.', ':'], "_"));
        if cut {
            nft(&format!(
                "table inet {table} {{\n  chain input {{\n    type filter hook input priority 0;\n    ip saddr {client} tcp dport 2049 drop\n  }}\n}}\n"
            ))
        } else {
            nft(&format!("delete table inet {table}\n"))
        }
    }

    /// SIGKILL, then started again with the same export.
    pub fn restart(&mut self) -> Result<()> {
        crate::kill9(self.child.take());
        self.launch()
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.resume();
        }
        crate::kill9(self.child.take());
        crate::kill9(self.rpcbind.take());
    }
}
