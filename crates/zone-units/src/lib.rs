//! The one `systemctl` wrapper of Zoned's agents: zone-vip starts and stops
//! the leader-only units, zone-sync restarts the units of changed files.
//! Every call that could hang is bounded in time (a unit's stop job can
//! take minutes; an agent must not block behind it for good).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `systemctl`, or a stand-in taking the same arguments (tests).
#[derive(Debug, Clone)]
pub struct Systemctl {
    pub program: PathBuf,
}

impl Default for Systemctl {
    fn default() -> Systemctl {
        Systemctl {
            program: PathBuf::from("systemctl"),
        }
    }
}

impl Systemctl {
    /// `systemctl VERB OPTIONS... -- UNIT`: after `--`, a unit name that
    /// starts with `-` is a name, never an option.
    fn command(&self, verb_and_options: &[&str], unit: &str) -> Command {
        let mut c = Command::new(&self.program);
        c.args(verb_and_options).arg("--").arg(unit);
        c
    }

    /// Queues a start job and returns (`--no-block`).
    pub fn start_no_block(&self, unit: &str, timeout: Duration) -> Result<(), String> {
        run_with_timeout(self.command(&["start", "--no-block"], unit), timeout)
    }

    /// Starts `unit`, waiting for the start job (a mount unit: until it is
    /// mounted).
    pub fn start(&self, unit: &str, timeout: Duration) -> Result<(), String> {
        run_with_timeout(self.command(&["start"], unit), timeout)
    }

    /// Queues a stop job and returns (`--no-block`).
    pub fn stop_no_block(&self, unit: &str, timeout: Duration) -> Result<(), String> {
        run_with_timeout(self.command(&["stop", "--no-block"], unit), timeout)
    }

    /// Stops `unit`, waiting for the stop job.
    pub fn stop(&self, unit: &str, timeout: Duration) -> Result<(), String> {
        run_with_timeout(self.command(&["stop"], unit), timeout)
    }

    /// `systemctl show -p PROPERTY --value UNIT`; None when it cannot tell.
    pub fn property(&self, unit: &str, property: &str) -> Option<String> {
        let out = self
            .command(&["show", "-p", property, "--value"], unit)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Restarts `unit`, waiting for the job; the error carries systemctl's
    /// own message.
    pub fn restart(&self, unit: &str) -> Result<(), String> {
        let out = self
            .command(&["restart"], unit)
            .output()
            .map_err(|e| format!("running {}: {e}", self.program.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} restart {unit}: {} {}",
                self.program.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    pub fn is_active(&self, unit: &str) -> Result<bool, String> {
        self.command(&["is-active", "--quiet"], unit)
            .status()
            .map(|s| s.success())
            .map_err(|e| format!("running {}: {e}", self.program.display()))
    }

    /// When the unit last became active, as systemd says it; None when it
    /// cannot tell.
    pub fn active_since(&self, unit: &str) -> Option<String> {
        let out = self
            .command(&["show", "-p", "ActiveEnterTimestamp", "--value"], unit)
            .output()
            .ok()?;
        let t = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !t.is_empty()).then_some(t)
    }
}

/// Runs `cmd` (stdin closed) to its end, or kills it after `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<(), String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(format!("{cmd:?} failed: {st}")),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{cmd:?} did not finish within {timeout:?}; killed"));
            }
            Err(e) => return Err(format!("{cmd:?}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// A stand-in systemctl that records its arguments and answers as told.
    fn stand_in(dir: &std::path::Path, body: &str) -> Systemctl {
        let program = dir.join("systemctl");
        std::fs::write(
            &program,
            format!(
                "#!/bin/sh\necho \"$@\" >> {}/calls\n{body}\n",
                dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        Systemctl { program }
    }

    #[test]
    fn each_call_passes_systemctl_its_arguments() {
        let d = tempfile::tempdir().unwrap();
        let s = stand_in(
            d.path(),
            "[ \"$1\" = show ] && echo 'Sat 2026-12-05 01:00:00 UTC'; exit 0",
        );
        s.start_no_block("a.service", Duration::from_secs(5))
            .unwrap();
        s.stop("a.service", Duration::from_secs(5)).unwrap();
        s.restart("a.service").unwrap();
        assert!(s.is_active("a.service").unwrap());
        assert_eq!(
            s.active_since("a.service").as_deref(),
            Some("Sat 2026-12-05 01:00:00 UTC")
        );
        let calls = std::fs::read_to_string(d.path().join("calls")).unwrap();
        assert_eq!(
            calls,
            "start --no-block -- a.service\nstop -- a.service\nrestart -- a.service\n\
             is-active --quiet -- a.service\nshow -p ActiveEnterTimestamp --value -- a.service\n"
        );
    }

    /// Issue 20, defect 11: a unit named like an option (from a pushed
    /// file's restart list, say) reaches systemctl as a name. On the old
    /// code `restart --help` reached it as the option.
    #[test]
    fn a_unit_name_is_never_read_as_an_option() {
        let d = tempfile::tempdir().unwrap();
        let s = stand_in(d.path(), "exit 0");
        s.restart("--help").unwrap();
        s.stop("-H", Duration::from_secs(5)).unwrap();
        let calls = std::fs::read_to_string(d.path().join("calls")).unwrap();
        assert_eq!(calls, "restart -- --help\nstop -- -H\n");
    }

    #[test]
    fn failures_are_reported_and_a_hung_call_is_killed() {
        let d = tempfile::tempdir().unwrap();
        let s = stand_in(
            d.path(),
            "[ \"$1\" = stop ] && exec sleep 5; echo nope >&2; exit 1",
        );
        let e = s.restart("b.service").unwrap_err();
        assert!(e.contains("restart b.service") && e.contains("nope"), "{e}");
        assert!(!s.is_active("b.service").unwrap());
        let t = Instant::now();
        let e = s.stop("b.service", Duration::from_millis(200)).unwrap_err();
        assert!(e.contains("did not finish"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
    }
}
