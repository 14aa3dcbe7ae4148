//! `zone-provision`: run once per boot, before the network and zoned.
//!
//! Reads the node identity from the EFI partition, QEMU fw_cfg and the
//! kernel command line (see the library), and writes zoned's node.toml,
//! zone-vip's vip.toml, resolv.conf and a networkd unit under /run, then
//! sets the host name. The server's certificates come the same ways but
//! the command line (`credentials`), and are installed under /run/zoned.
//! The root filesystem is read-only: nothing here writes to it, but the
//! managed roots under /etc the identity names, made writable by bind
//! mounts from the data partition (the library's `roots`). Exit code 2: no
//! usable identity (the message says which field and where to set it).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use zone_provision::{render_network, render_node, render_resolv, render_vip, Identity, Interface};

#[derive(Parser, Debug, Clone)]
#[command(version, about, long_about = None)]
struct Args {
    /// The identity file on the mounted EFI partition.
    #[arg(long, default_value = "/boot/efi/zoned/identity.toml")]
    identity: PathBuf,
    /// Where QEMU's `-fw_cfg name=opt/zoned/identity.toml` appears (needs
    /// the qemu_fw_cfg module).
    #[arg(
        long,
        default_value = "/sys/firmware/qemu_fw_cfg/by_name/opt/zoned/identity.toml/raw"
    )]
    fw_cfg: PathBuf,
    /// The server's certificates on the EFI partition: `zonectl zone
    /// init`'s server-<id>/ files (ca.pem, node.pem, node.key, ca.key).
    #[arg(long, default_value = "/boot/efi/zoned/tls")]
    tls: PathBuf,
    /// zoned's `[tls] dir`, on the data partition: the certificates given
    /// are installed there at every boot (keeping a node certificate zoned
    /// renewed there since), and a server given none but a join token
    /// keeps there those zoned gets with it.
    #[arg(long, default_value = "/var/lib/zoned/tls")]
    tls_dir: PathBuf,
    /// Where QEMU's `-fw_cfg name=opt/zoned/tls/<file>` entries appear.
    #[arg(
        long,
        default_value = "/sys/firmware/qemu_fw_cfg/by_name/opt/zoned/tls"
    )]
    fw_cfg_tls: PathBuf,
    /// systemd units given with the identity on the EFI partition
    /// (`leader_units` the image lacks), installed in --units-dir.
    #[arg(long, default_value = "/boot/efi/zoned/units")]
    units: PathBuf,
    /// Where QEMU's `-fw_cfg name=opt/zoned/units/<unit>` entries appear
    /// (they win over the EFI partition's, unit by unit).
    #[arg(
        long,
        default_value = "/sys/firmware/qemu_fw_cfg/by_name/opt/zoned/units"
    )]
    fw_cfg_units: PathBuf,
    /// Where the units given are installed (then systemd reloads).
    #[arg(long, default_value = "/run/systemd/system")]
    units_dir: PathBuf,
    /// The kernel command line, for zoned.KEY=VALUE words.
    #[arg(long, default_value = "/proc/cmdline")]
    cmdline: PathBuf,
    /// Directory for node.toml, vip.toml and resolv.conf.
    #[arg(long, default_value = "/run/zoned")]
    out: PathBuf,
    /// A founder's local admin credential for zonectl (/etc/zoned/admin
    /// links there), on the data partition: issued once and kept across
    /// boots (its serial stays the same, so a revocation of it lasts), and
    /// issued again only when it no longer verifies or expires within 30
    /// days (delete it to have a new one issued at the next boot).
    #[arg(long, default_value = "/var/lib/zoned/admin")]
    admin_dir: PathBuf,
    /// Where managed roots under /etc (the identity's `managed_roots`, such
    /// as /etc/mysql) keep their files, on the data partition: each is
    /// bound on its root at every boot, the rest of /etc staying read-only.
    #[arg(long, default_value = "/var/lib/zone-etc")]
    roots_state: PathBuf,
    /// The payloads' defaults for managed roots (from system extensions):
    /// `<DIR>/etc/mysql` fills in what /etc/mysql lacks, never replacing a
    /// file.
    #[arg(long, default_value = "/usr/share/factory")]
    factory: PathBuf,
    /// Directory for the systemd-networkd unit.
    #[arg(long, default_value = "/run/systemd/network")]
    network_dir: PathBuf,
    /// /sys/class/net, to find the interface (by MAC, or to wait for it).
    #[arg(long, default_value = "/sys/class/net")]
    sys_net: PathBuf,
    /// How long to wait for the interface to appear, in seconds.
    #[arg(long, default_value_t = 30)]
    wait_interface: u64,
    /// Leave the host name as it is.
    #[arg(long)]
    keep_hostname: bool,
    /// Print what would be written, write nothing, leave the host name.
    #[arg(long)]
    dry_run: bool,
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("zone-provision: {e:#}");
            let code = if e.downcast_ref::<zone_provision::Error>().is_some()
                || e.downcast_ref::<zone_provision::credentials::CredentialError>()
                    .is_some()
            {
                2
            } else {
                1
            };
            std::process::exit(code);
        }
    }
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn run(args: &Args) -> Result<()> {
    let mut identity = Identity::default();
    let mut sources = Vec::new();
    if let Some(text) = read_optional(&args.identity)? {
        let name = args.identity.display().to_string();
        identity = identity.merge(Identity::from_toml(&text, &name)?);
        sources.push(name);
    }
    if let Some(text) = read_optional(&args.fw_cfg)? {
        identity = identity.merge(Identity::from_toml(
            &text,
            "fw_cfg opt/zoned/identity.toml",
        )?);
        sources.push("fw_cfg".to_owned());
    }
    if let Some(text) = read_optional(&args.cmdline)? {
        let from_cmdline = Identity::from_cmdline(&text)?;
        if !from_cmdline.is_empty() {
            identity = identity.merge(from_cmdline);
            sources.push("kernel command line".to_owned());
        }
    }
    let r = identity.resolve()?;
    println!(
        "identity from {}: id {} name {} address {}",
        if sources.is_empty() {
            "nowhere".to_owned()
        } else {
            sources.join(", ")
        },
        r.id,
        r.name,
        r.address
    );
    // The certificates: given (EFI partition, fw_cfg), got with the join
    // token on an earlier boot (the data partition), or to be got with it
    // by zoned at this boot.
    let given = zone_provision::credentials::gather(&args.tls, &args.fw_cfg_tls);
    let joined = args.tls_dir.join("node.pem").exists();
    let (tls_dir, with_token) = match (given, &r.join_token) {
        (Err(zone_provision::credentials::CredentialError::Missing { .. }), Some(_)) if joined => {
            println!(
                "certificates: this server's own, got with its join token, in {}",
                args.tls_dir.display()
            );
            (args.tls_dir.clone(), false)
        }
        (Err(zone_provision::credentials::CredentialError::Missing { .. }), Some(_)) => {
            println!(
                "certificates: none given; zoned gets them with the join token, into {}",
                args.tls_dir.display()
            );
            (args.tls_dir.clone(), true)
        }
        (given, _) => {
            let creds = given?;
            let tls_dir = args.tls_dir.clone();
            let ca = creds.check(r.id)?;
            println!(
                "certificates from {}: server {}{}{}",
                creds.sources.join(" and "),
                r.id,
                if ca.is_some() {
                    ", and the zone CA's key"
                } else {
                    ""
                },
                if r.join_token.is_some() {
                    " (join_token not used)"
                } else {
                    ""
                }
            );
            if !args.dry_run {
                let kept = zone_provision::credentials::install(&creds, &tls_dir, r.id)?;
                println!(
                    "installed {}{}",
                    tls_dir.display(),
                    if kept {
                        " (keeping the node certificate zoned renewed there)"
                    } else {
                        ""
                    }
                );
                if let Some(ca) = &ca {
                    let admin = &args.admin_dir;
                    if zone_provision::credentials::local_admin_holds(ca, admin) {
                        println!("the local admin credential in {} holds", admin.display());
                    } else {
                        zone_provision::credentials::issue_local_admin(ca, r.id, admin)?;
                        println!("issued the local admin credential in {}", admin.display());
                    }
                }
            }
            (tls_dir, false)
        }
    };
    let iface = find_interface(
        &r.interface,
        &args.sys_net,
        Duration::from_secs(args.wait_interface),
    )?;
    let mut files = vec![
        (
            args.out.join("node.toml"),
            render_node(&r, &tls_dir, with_token),
        ),
        (args.out.join("resolv.conf"), render_resolv(&r)),
        (
            args.network_dir.join("10-zoned.network"),
            render_network(&r, &iface),
        ),
    ];
    let vip_path = args.out.join("vip.toml");
    match render_vip(&r, &iface) {
        Some(v) => files.push((vip_path, v)),
        None => {
            if !args.dry_run {
                let _ = std::fs::remove_file(&vip_path);
            }
            println!("no VIP in the identity: zone-vip stays off");
        }
    }
    let node_toml = args.out.join("node.toml");
    for (path, text) in &files {
        if args.dry_run {
            let shown = match &r.join_token {
                Some(t) if *path == node_toml => text.replace(t.as_str(), "<the join token>"),
                _ => text.clone(),
            };
            println!("---- {}\n{shown}", path.display());
        } else {
            // node.toml is root's alone (it may hold the join token); the
            // others are read by other users (resolv.conf by every
            // program, the network unit by systemd-networkd's user).
            let mode = if *path == node_toml { 0o600 } else { 0o644 };
            // Atomic: a reader sees the old file or the new, never a part.
            zone_files::atomic::write(path, text.as_bytes(), mode, None)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    install_units(args)?;
    writable_roots(args, &r.managed_roots);
    if !args.dry_run && !args.keep_hostname {
        nix::unistd::sethostname(&r.name).context("setting the host name")?;
    }
    Ok(())
}

/// The managed roots made writable (see the library's `roots`). A root that
/// cannot be is said on the console and the boot goes on: zone-sync reports
/// its writes there as failing, and the rest of the zone works.
fn writable_roots(args: &Args, roots: &[String]) {
    use zone_provision::roots::{make_writable, Layout, Outcome};
    let skip = [zone_provision::DEFAULT_MANAGED_ROOT];
    if args.dry_run {
        for r in roots.iter().filter(|r| !skip.contains(&r.as_str())) {
            println!(
                "managed root {r}: would be made writable (under /etc: kept in {})",
                args.roots_state.join(r.trim_start_matches('/')).display()
            );
        }
        return;
    }
    let layout = Layout {
        state: args.roots_state.clone(),
        factory: args.factory.clone(),
        ..Layout::default()
    };
    for (r, outcome) in make_writable(roots, &skip, &layout) {
        match outcome {
            Outcome::Writable {
                persists_in,
                filled,
            } => println!(
                "managed root {r}: writable, kept in {}{}",
                persists_in.display(),
                if filled > 0 {
                    format!(" ({filled} defaults filled in)")
                } else {
                    String::new()
                }
            ),
            Outcome::AlreadyWritable => {}
            Outcome::Inside(outer) => println!("managed root {r}: writable with {outer}"),
            Outcome::Failed(why) => {
                eprintln!("zone-provision: managed root {r}: not writable: {why}")
            }
        }
    }
}

/// The units given with the identity, into --units-dir; systemd reloads
/// when there are any (zone-vip, which starts them, runs after this).
fn install_units(args: &Args) -> Result<()> {
    let units = zone_provision::units::gather(&args.units, &args.fw_cfg_units)?;
    if units.is_empty() {
        return Ok(());
    }
    for u in &units {
        let path = args.units_dir.join(&u.name);
        if args.dry_run {
            println!(
                "---- {} (from {})\n{}",
                path.display(),
                u.source.display(),
                u.text
            );
            continue;
        }
        zone_files::atomic::write(&path, u.text.as_bytes(), 0o644, None)
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "installed unit {} ({} bytes) from {}",
            path.display(),
            u.text.len(),
            u.source.display()
        );
    }
    if !args.dry_run {
        let status = std::process::Command::new("systemctl")
            .arg("daemon-reload")
            .status()
            .context("running systemctl daemon-reload")?;
        if !status.success() {
            anyhow::bail!(
                "systemctl daemon-reload failed ({status}): the units given are not loaded"
            );
        }
    }
    Ok(())
}

/// The kernel name of the interface: waited for (drivers load late on some
/// servers), and looked up by MAC address when the identity gives one.
fn find_interface(want: &Interface, sys_net: &Path, wait: Duration) -> Result<String> {
    let deadline = Instant::now() + wait;
    loop {
        match want {
            Interface::Name(n) if sys_net.join(n).exists() => return Ok(n.clone()),
            Interface::Mac(mac) => {
                if let Ok(dir) = std::fs::read_dir(sys_net) {
                    for e in dir.flatten() {
                        let addr =
                            std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
                        if addr.trim().eq_ignore_ascii_case(mac) {
                            return Ok(e.file_name().to_string_lossy().into_owned());
                        }
                    }
                }
            }
            Interface::Name(_) => {}
        }
        if Instant::now() >= deadline {
            let present: Vec<String> = std::fs::read_dir(sys_net)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            anyhow::bail!(
                "identity field `interface`: no interface {} after {} s (present: {})",
                match want {
                    Interface::Name(n) => n.clone(),
                    Interface::Mac(m) => format!("with MAC {m}"),
                },
                wait.as_secs(),
                present.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_an_interface_by_mac() {
        let d = tempfile::tempdir().unwrap();
        for (name, mac) in [("lo", "00:00:00:00:00:00"), ("eth1", "52:54:00:aa:bb:02")] {
            std::fs::create_dir(d.path().join(name)).unwrap();
            std::fs::write(d.path().join(name).join("address"), format!("{mac}\n")).unwrap();
        }
        let got = find_interface(
            &Interface::Mac("52:54:00:aa:bb:02".into()),
            d.path(),
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(got, "eth1");
        let e = find_interface(&Interface::Name("eth7".into()), d.path(), Duration::ZERO)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no interface eth7") && e.contains("eth1"), "{e}");
    }

    #[test]
    fn writes_the_configuration_and_reports_errors_with_code_two() {
        let d = tempfile::tempdir().unwrap();
        let net = d.path().join("net");
        std::fs::create_dir_all(net.join("eth0")).unwrap();
        let cmdline = d.path().join("cmdline");
        std::fs::write(
            &cmdline,
            "ro zoned.id=2 zoned.interface=eth0 zoned.address=10.9.0.2/24 \
             zoned.peers=1@10.9.0.1,2@10.9.0.2,3@10.9.0.3 zoned.vip=10.9.0.100/24\n",
        )
        .unwrap();
        // The server's certificates, by fw_cfg.
        let ca = zone_pki::ZoneCa::generate().unwrap();
        let node = ca.issue_node(2, &[]).unwrap();
        let fw_tls = d.path().join("fw-tls");
        for (name, text) in [
            ("ca.pem", ca.cert_pem()),
            ("node.pem", node.cert_pem.as_str()),
            ("node.key", node.key_pem.as_str()),
        ] {
            std::fs::create_dir_all(fw_tls.join(name)).unwrap();
            std::fs::write(fw_tls.join(name).join("raw"), text).unwrap();
        }
        let args = Args {
            identity: d.path().join("missing.toml"),
            fw_cfg: d.path().join("missing-fw"),
            tls: d.path().join("missing-tls"),
            tls_dir: d.path().join("var-lib-zoned-tls"),
            admin_dir: d.path().join("var-lib-zoned-admin"),
            fw_cfg_tls: fw_tls.clone(),
            units: d.path().join("missing-units"),
            fw_cfg_units: d.path().join("missing-fw-units"),
            units_dir: d.path().join("units-out"),
            cmdline: cmdline.clone(),
            out: d.path().join("run"),
            network_dir: d.path().join("network"),
            roots_state: d.path().join("var-lib-zone-etc"),
            factory: d.path().join("factory"),
            sys_net: net,
            wait_interface: 0,
            keep_hostname: true,
            dry_run: true,
        };
        run(&args).unwrap();
        assert!(!args.out.exists(), "a dry run writes nothing");
        let args = Args {
            dry_run: false,
            ..args
        };
        run(&args).unwrap();
        let node = std::fs::read_to_string(args.out.join("node.toml")).unwrap();
        assert!(node.contains("id = 2"), "{node}");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(args.out.join("node.toml")), 0o600);
        for readable in [
            args.out.join("resolv.conf"),
            args.out.join("vip.toml"),
            args.network_dir.join("10-zoned.network"),
        ] {
            assert_eq!(mode(readable), 0o644, "read by other users");
        }
        assert!(args.tls_dir.join("node.key").exists());
        assert!(!args.admin_dir.exists(), "no CA key, no local admin");
        assert!(args.out.join("vip.toml").exists());
        assert!(args.network_dir.join("10-zoned.network").exists());
        // Without certificates, nothing starts (code 2: the message says
        // where to put them).
        let e = run(&Args {
            fw_cfg_tls: d.path().join("missing-fw-tls"),
            units: d.path().join("missing-units"),
            fw_cfg_units: d.path().join("missing-fw-units"),
            units_dir: d.path().join("units-out"),
            ..args.clone()
        })
        .unwrap_err();
        assert!(
            e.downcast_ref::<zone_provision::credentials::CredentialError>()
                .is_some(),
            "{e:#}"
        );
        std::fs::write(&cmdline, "zoned.id=2\n").unwrap();
        let e = run(&args).unwrap_err();
        assert!(e.downcast_ref::<zone_provision::Error>().is_some(), "{e:#}");
    }

    #[test]
    fn a_joiner_with_a_token_and_no_certificates_gets_them_on_the_data_partition() {
        let d = tempfile::tempdir().unwrap();
        let net = d.path().join("net");
        std::fs::create_dir_all(net.join("eth0")).unwrap();
        let ca = zone_pki::ZoneCa::generate().unwrap();
        let token = zone_pki::JoinToken::generate(4, &ca.fingerprint()).unwrap();
        let identity = d.path().join("identity.toml");
        std::fs::write(
            &identity,
            format!(
                "id = 4\ninterface = \"eth0\"\naddress = \"10.9.0.4/24\"\njoin = \"10.9.0.1\"\njoin_token = \"{token}\"\n"
            ),
        )
        .unwrap();
        let args = Args {
            identity,
            fw_cfg: d.path().join("missing-fw"),
            tls: d.path().join("missing-tls"),
            tls_dir: d.path().join("var-lib-zoned-tls"),
            admin_dir: d.path().join("var-lib-zoned-admin"),
            fw_cfg_tls: d.path().join("missing-fw-tls"),
            units: d.path().join("missing-units"),
            fw_cfg_units: d.path().join("missing-fw-units"),
            units_dir: d.path().join("units-out"),
            cmdline: d.path().join("missing-cmdline"),
            out: d.path().join("run"),
            network_dir: d.path().join("network"),
            roots_state: d.path().join("var-lib-zone-etc"),
            factory: d.path().join("factory"),
            sys_net: net,
            wait_interface: 0,
            keep_hostname: true,
            dry_run: false,
        };
        run(&args).unwrap();
        let path = args.out.join("node.toml");
        let node: toml::Value = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        assert_eq!(
            node["node"]["join_token"].as_str(),
            Some(&*token.to_string())
        );
        assert_eq!(
            node["tls"]["dir"].as_str(),
            Some(&*args.tls_dir.display().to_string())
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the token is root's alone");
        // Once joined (zoned wrote node.pem there), the token is left out.
        std::fs::create_dir_all(&args.tls_dir).unwrap();
        std::fs::write(args.tls_dir.join("node.pem"), "joined").unwrap();
        run(&args).unwrap();
        let node: toml::Value = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        assert_eq!(node["node"].get("join_token"), None);
        assert_eq!(
            node["tls"]["dir"].as_str(),
            Some(&*args.tls_dir.display().to_string())
        );
    }
}
