//! Records the commit the binaries are built from (`ZONE_COMMIT`): the
//! environment's `ZONE_COMMIT` if set (a build outside git), else git's
//! HEAD, else `unknown`. Cargo reruns this when HEAD moves.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=ZONE_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    let commit = match std::env::var("ZONE_COMMIT") {
        Ok(c) if !c.trim().is_empty() => {
            println!("cargo:rustc-env=ZONE_COMMIT_GIVEN=1");
            c.trim().to_owned()
        }
        _ => {
            // HEAD, the branch it names (a loose file, or in packed-refs
            // after a clone, until a commit writes the loose one under
            // refs/heads), and HEAD's reflog: a commit, a pull or a
            // checkout changes one of them.
            let mut watched = vec![
                "HEAD".to_owned(),
                "packed-refs".to_owned(),
                "logs/HEAD".to_owned(),
                "refs/heads".to_owned(),
            ];
            watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
            for name in watched {
                if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
                    if std::path::Path::new(&path).exists() {
                        println!("cargo:rerun-if-changed={path}");
                    }
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
        }
    };
    println!("cargo:rustc-env=ZONE_COMMIT={commit}");
}
