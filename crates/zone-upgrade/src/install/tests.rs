//! Installs of real signed bundles (minisign keys, zstd-compressed root
//! images made by the zstd tool) onto partitions that are plain files, and
//! an EFI partition that is a directory.

use super::*;
use zone_bundle::{file_entry, Digested, FORMAT, ROOT_IMAGE};

const PART: u64 = 8 << 20;

struct Setup {
    dir: tempfile::TempDir,
    pk: minisign::PublicKey,
    sk: minisign::SecretKey,
    target: Target,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let esp = dir.path().join("esp");
    std::fs::create_dir_all(esp.join(entries::DIR)).unwrap();
    std::fs::write(
        esp.join(entries::DIR).join("zoned-0001-a.efi"),
        b"old kernel a",
    )
    .unwrap();
    let mut partitions = Vec::new();
    for s in ["a", "b"] {
        let p = dir.path().join(format!("root-{s}"));
        File::create(&p).unwrap().set_len(PART).unwrap();
        partitions.push(p);
    }
    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    Setup {
        target: Target {
            esp,
            partitions: [partitions[0].clone(), partitions[1].clone()],
            running: Slot::A,
            image_id: "zoned-vm".into(),
        },
        pk: kp.pk,
        sk: kp.sk,
        dir,
    }
}

impl Setup {
    fn keys(&self) -> TrustedKeys {
        let mut t = TrustedKeys::default();
        t.add("test", &self.pk.to_box().unwrap().into_string())
            .unwrap();
        t
    }

    /// A bundle for `image_id` with a root image of `root_bytes` bytes.
    fn bundle(&self, name: &str, image_id: &str, root_bytes: usize) -> (PathBuf, Vec<u8>) {
        let d = self.dir.path().join(format!("{name}.parts"));
        std::fs::create_dir_all(&d).unwrap();
        // Incompressible (xorshift): the bundle is as large as the image,
        // larger than the installer's read buffers.
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ root_bytes as u64;
        let root: Vec<u8> = (0..root_bytes)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let img = d.join("root.img");
        std::fs::write(&img, &root).unwrap();
        let zst = d.join(ROOT_IMAGE);
        let st = std::process::Command::new("zstd")
            .args(["-q", "-f", "-T0"])
            .arg(&img)
            .arg("-o")
            .arg(&zst)
            .status()
            .expect("the zstd tool (cargo xtask deps installs it)");
        assert!(st.success());
        let (a, b) = (d.join("zoned-a.efi"), d.join("zoned-b.efi"));
        std::fs::write(&a, b"new kernel a").unwrap();
        std::fs::write(&b, b"new kernel b").unwrap();
        let (bytes, sha256) =
            zone_bundle::copy_hashed(&mut File::open(&img).unwrap(), None).unwrap();
        let manifest = Manifest {
            format: FORMAT,
            image_id: image_id.into(),
            version: "9.9.9".into(),
            commit: "abc".into(),
            binaries_profile: "release".into(),
            kernel: "6.1".into(),
            files: vec![
                file_entry(ROOT_IMAGE, &zst, Some(Digested { bytes, sha256 })).unwrap(),
                file_entry("zoned-a.efi", &a, None).unwrap(),
                file_entry("zoned-b.efi", &b, None).unwrap(),
            ],
        };
        let sig = minisign::sign(
            Some(&self.pk),
            &self.sk,
            manifest.to_bytes().as_slice(),
            None,
            None,
        )
        .unwrap()
        .into_string();
        let out = self.dir.path().join(format!("{name}.bundle"));
        zone_bundle::pack(&out, &manifest, &sig, &[zst, a, b]).unwrap();
        (out, root)
    }

    fn entries(&self) -> Vec<String> {
        entries::list(&self.target.esp)
            .unwrap()
            .into_iter()
            .map(|e| e.file)
            .collect()
    }

    fn partition_b(&self) -> Vec<u8> {
        std::fs::read(&self.target.partitions[1]).unwrap()
    }
}

#[test]
fn a_bundle_goes_to_the_other_slot_and_its_entry_boots_next_on_trial() {
    let s = setup();
    let (bundle, root) = s.bundle("v2", "zoned-vm", 3 << 20);
    let mut seen = Vec::new();
    let done = install(&bundle, &s.keys(), &s.target, &mut |p| seen.push(p)).unwrap();
    assert_eq!(done.slot, Slot::B);
    assert_eq!(done.entry, "zoned-0002-b+3.efi");
    assert_eq!(done.version, "9.9.9");
    // The loader's order: the new entry first, the running slot's after it.
    assert_eq!(s.entries(), ["zoned-0002-b+3.efi", "zoned-0001-a.efi"]);
    let b = s.partition_b();
    assert_eq!(&b[..root.len()], root.as_slice());
    assert_eq!(
        std::fs::read(entries::path(&s.target.esp, "zoned-0002-b+3.efi")).unwrap(),
        b"new kernel b"
    );
    assert!(!s
        .target
        .esp
        .join(entries::DIR)
        .join(staged_name(2))
        .exists());
    // Slot a (running) untouched.
    assert!(std::fs::read(&s.target.partitions[0])
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    // Progress went through the three phases, ending each at its total.
    for phase in [0, 1, 2] {
        let last = seen
            .iter()
            .filter_map(|p| match (phase, p) {
                (0, Progress::Verifying { done, total })
                | (1, Progress::Writing { done, total })
                | (2, Progress::ReadingBack { done, total }) => Some((*done, *total)),
                _ => None,
            })
            .next_back()
            .unwrap_or_else(|| panic!("no progress of phase {phase}: {seen:?}"));
        assert_eq!(last.0, last.1, "phase {phase}: {seen:?}");
    }
}

#[test]
fn nothing_is_written_for_a_bundle_that_does_not_verify_or_fit() {
    let s = setup();
    // A previous install left an entry for slot b: a refused bundle must
    // leave it as it was.
    std::fs::write(
        s.target.esp.join(entries::DIR).join("zoned-0000-b.efi"),
        b"b",
    )
    .unwrap();
    let before = s.entries();

    let (good, _) = s.bundle("v2", "zoned-vm", 1 << 20);
    let stranger = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let mut other_keys = TrustedKeys::default();
    other_keys
        .add("other", &stranger.pk.to_box().unwrap().into_string())
        .unwrap();
    let e = install(&good, &other_keys, &s.target, &mut |_| {}).unwrap_err();
    assert!(
        matches!(e, Error::Bundle(zone_bundle::Error::UnknownKey { .. })),
        "{e}"
    );

    // One byte of the compressed root image changed.
    let tampered = s.dir.path().join("tampered.bundle");
    let mut bytes = std::fs::read(&good).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&tampered, &bytes).unwrap();
    let e = install(&tampered, &s.keys(), &s.target, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains(ROOT_IMAGE), "{e}");

    let (metal, _) = s.bundle("metal", "zoned-metal", 1 << 20);
    let e = install(&metal, &s.keys(), &s.target, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("this server runs zoned-vm"), "{e}");

    let (big, _) = s.bundle("big", "zoned-vm", (PART + 4096) as usize);
    let e = install(&big, &s.keys(), &s.target, &mut |_| {}).unwrap_err();
    assert!(
        e.to_string().contains("partition zoned-root-b has 8 MiB"),
        "{e}"
    );

    assert_eq!(s.entries(), before);
    assert!(
        s.partition_b().iter().all(|&x| x == 0),
        "slot b was written"
    );
}

#[test]
fn an_install_waits_for_the_running_slot_to_be_good() {
    let s = setup();
    let dir = s.target.esp.join(entries::DIR);
    std::fs::rename(
        dir.join("zoned-0001-a.efi"),
        dir.join("zoned-0001-a+2-1.efi"),
    )
    .unwrap();
    let (bundle, _) = s.bundle("v2", "zoned-vm", 1 << 20);
    let e = install(&bundle, &s.keys(), &s.target, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("is itself on trial"), "{e}");
    std::fs::remove_file(dir.join("zoned-0001-a+2-1.efi")).unwrap();
    let e = install(&bundle, &s.keys(), &s.target, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("nothing to fall back to"), "{e}");
    assert!(s.partition_b().iter().all(|&x| x == 0));
}

/// The bundle is changed on disk while slot b is being written (as a power
/// cut, the install stops there): slot b has no entry, slot a's stays, so
/// the loader boots slot a; a second install of a good bundle succeeds.
#[test]
fn an_install_stopped_while_writing_leaves_only_the_running_slot_bootable() {
    let s = setup();
    std::fs::write(
        s.target.esp.join(entries::DIR).join("zoned-0000-b.efi"),
        b"older b",
    )
    .unwrap();
    let (bundle, _) = s.bundle("v2", "zoned-vm", 3 << 20);
    let original = std::fs::read(&bundle).unwrap();
    let mut changed = false;
    let e = install(&bundle, &s.keys(), &s.target, &mut |p| {
        if matches!(p, Progress::Writing { .. }) && !changed {
            changed = true;
            // The last member is zoned-b.efi: change its last byte.
            let mut b = original.clone();
            let at = b.windows(12).rposition(|w| w == b"new kernel b").unwrap();
            b[at + 11] = b'X';
            std::fs::write(&bundle, &b).unwrap();
        }
    })
    .unwrap_err();
    assert!(changed);
    assert!(e.to_string().contains("zoned-b.efi"), "{e}");
    assert_eq!(
        s.entries(),
        ["zoned-0001-a.efi"],
        "slot b must not be bootable"
    );

    std::fs::write(&bundle, &original).unwrap();
    let done = install(&bundle, &s.keys(), &s.target, &mut |_| {}).unwrap();
    assert_eq!(done.entry, "zoned-0002-b+3.efi");
    assert_eq!(s.entries(), ["zoned-0002-b+3.efi", "zoned-0001-a.efi"]);
}

#[test]
fn one_install_at_a_time() {
    let s = setup();
    let (bundle, _) = s.bundle("v2", "zoned-vm", 1 << 20);
    let held = nix::fcntl::Flock::lock(
        File::open(s.target.esp.join(entries::DIR)).unwrap(),
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .unwrap();
    let e = install(&bundle, &s.keys(), &s.target, &mut |_| {}).unwrap_err();
    assert!(
        e.to_string().contains("another install is under way"),
        "{e}"
    );
    assert!(s.partition_b().iter().all(|&x| x == 0));
    drop(held);
    install(&bundle, &s.keys(), &s.target, &mut |_| {}).unwrap();
}
