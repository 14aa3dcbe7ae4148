//! Bundles packed and signed with real minisign keys, then verified, and
//! changed in each way a bundle can be changed.

use super::*;

struct Key {
    pk: minisign::PublicKey,
    sk: minisign::SecretKey,
}

fn key() -> Key {
    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    Key {
        pk: kp.pk,
        sk: kp.sk,
    }
}

impl Key {
    fn public_file(&self) -> String {
        self.pk.to_box().unwrap().into_string()
    }
    fn sign(&self, msg: &[u8]) -> String {
        minisign::sign(Some(&self.pk), &self.sk, msg, Some("zoned-vm 9.9.9"), None)
            .unwrap()
            .into_string()
    }
    fn trusted(&self) -> TrustedKeys {
        let mut t = TrustedKeys::default();
        t.add("test.pub", &self.public_file()).unwrap();
        t
    }
}

struct Made {
    dir: tempfile::TempDir,
    bundle: PathBuf,
    manifest: Manifest,
    paths: Vec<PathBuf>,
}

/// A bundle of two files (1 MiB + 3 bytes of pattern, and a short one).
fn make(key: &Key) -> Made {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("root.img.zst");
    let b = dir.path().join("zoned-a.efi");
    std::fs::write(
        &a,
        (0..(1 << 20) + 3)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    std::fs::write(&b, b"MZ a kernel").unwrap();
    let manifest = Manifest {
        format: FORMAT,
        image_id: "zoned-vm".into(),
        version: "9.9.9+abc".into(),
        commit: "abc".into(),
        binaries_profile: "release".into(),
        kernel: "6.1.0".into(),
        files: vec![
            file_entry(ROOT_IMAGE, &a, None).unwrap(),
            file_entry("zoned-a.efi", &b, None).unwrap(),
        ],
    };
    let bundle = dir.path().join("x.bundle");
    let paths = vec![a, b];
    pack(&bundle, &manifest, &key.sign(&manifest.to_bytes()), &paths).unwrap();
    Made {
        dir,
        bundle,
        manifest,
        paths,
    }
}

#[test]
fn a_packed_bundle_verifies_and_sinks_see_each_file_whole() {
    let k = key();
    let m = make(&k);
    let v = verify(&m.bundle, &k.trusted()).unwrap();
    assert_eq!(v.manifest, m.manifest);
    assert_eq!(v.key_id, k.trusted().ids()[0]);
    let mut got = Vec::new();
    let f = File::open(&m.bundle).unwrap();
    read(
        &m.bundle,
        f,
        &k.trusted(),
        |_| Ok(()),
        |e, r| {
            let mut b = Vec::new();
            r.read_to_end(&mut b)?;
            got.push((e.name.clone(), b));
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].1, std::fs::read(&m.paths[0]).unwrap());
    assert_eq!(got[1].1, b"MZ a kernel");
    // The standard tar tool reads it (operators inspect bundles with it).
    let out = std::process::Command::new("tar")
        .arg("-tf")
        .arg(&m.bundle)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "manifest.json\nmanifest.json.minisig\nroot.img.zst\nzoned-a.efi\n"
    );
}

#[test]
fn a_bundle_signed_by_an_unknown_key_is_refused_before_its_files_are_read() {
    let signer = key();
    let other = key();
    let m = make(&signer);
    let mut sunk = false;
    let f = File::open(&m.bundle).unwrap();
    let err = read(
        &m.bundle,
        f,
        &other.trusted(),
        |_| Ok(()),
        |_, _| {
            sunk = true;
            Ok(())
        },
    )
    .unwrap_err();
    assert!(!sunk, "no file may be read before the signature matched");
    let text = err.to_string();
    assert!(matches!(err, Error::UnknownKey { .. }), "{text}");
    assert!(text.contains(&signer.trusted().ids()[0]), "{text}");
    assert!(text.contains(&other.trusted().ids()[0]), "{text}");
}

/// Byte offset of `needle` in the bundle file.
fn find(bundle: &[u8], needle: &[u8]) -> usize {
    bundle
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in bundle")
}

#[test]
fn a_changed_payload_byte_is_refused_naming_the_file() {
    let k = key();
    let m = make(&k);
    let mut b = std::fs::read(&m.bundle).unwrap();
    let at = find(&b, b"MZ a kernel");
    b[at + 3] ^= 1;
    std::fs::write(&m.bundle, &b).unwrap();
    let err = verify(&m.bundle, &k.trusted()).unwrap_err();
    assert!(
        matches!(&err, Error::File { name, .. } if name == "zoned-a.efi"),
        "{err}"
    );
    assert!(
        err.to_string().contains("differs from the signed manifest"),
        "{err}"
    );
}

#[test]
fn a_changed_manifest_fails_its_signature() {
    let k = key();
    let m = make(&k);
    let mut b = std::fs::read(&m.bundle).unwrap();
    // Same length, so the tar framing still holds: only the signature can
    // tell.
    let at = find(&b, b"9.9.9+abc");
    b[at] = b'8';
    std::fs::write(&m.bundle, &b).unwrap();
    let err = verify(&m.bundle, &k.trusted()).unwrap_err();
    assert!(matches!(err, Error::BadSignature { .. }), "{err}");
}

#[test]
fn a_file_added_or_missing_or_reordered_is_refused() {
    let k = key();
    let m = make(&k);
    let keys = k.trusted();
    // Missing: the manifest names a third file the bundle lacks.
    let mut man = m.manifest.clone();
    let c = m.dir.path().join("zoned-b.efi");
    std::fs::write(&c, b"b").unwrap();
    man.files.push(file_entry("zoned-b.efi", &c, None).unwrap());
    let short = m.dir.path().join("short.bundle");
    pack(
        &short,
        &man,
        &k.sign(&man.to_bytes()),
        &[m.paths[0].clone(), m.paths[1].clone(), c.clone()],
    )
    .unwrap();
    let mut b = std::fs::read(&short).unwrap();
    let at = find(&b, b"zoned-b.efi\0");
    b.truncate(at); // cut the last member off (its header starts with the name)
    b.extend_from_slice(&[0u8; 1024]);
    std::fs::write(&short, &b).unwrap();
    let err = verify(&short, &keys).unwrap_err();
    assert!(
        matches!(&err, Error::File { name, .. } if name == "zoned-b.efi"),
        "{err}"
    );
    assert!(err.to_string().contains("missing"), "{err}");

    // Added: a member after the signed ones.
    let extra = m.dir.path().join("extra.bundle");
    repack(&m.bundle, &extra, |members| {
        members.push(("evil.sh".into(), b"boom".to_vec()));
    });
    let err = verify(&extra, &keys).unwrap_err();
    assert!(
        matches!(&err, Error::File { name, .. } if name == "evil.sh"),
        "{err}"
    );

    // Reordered: the signed files, packed in another order than signed.
    let swapped = m.dir.path().join("swapped.bundle");
    repack(&m.bundle, &swapped, |members| members.swap(2, 3));
    let err = verify(&swapped, &keys).unwrap_err();
    assert!(
        matches!(&err, Error::File { name, .. } if name == ROOT_IMAGE),
        "{err}"
    );
    assert!(
        err.to_string().contains("found \"zoned-a.efi\" instead"),
        "{err}"
    );
}

/// Copies the members of bundle `from` into `to`, changed by `change`.
fn repack(from: &Path, to: &Path, change: impl FnOnce(&mut Vec<(String, Vec<u8>)>)) {
    let mut members = Vec::new();
    let mut orig = tar::Archive::new(File::open(from).unwrap());
    for e in orig.entries().unwrap() {
        let mut e = e.unwrap();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        members.push((e.path().unwrap().to_string_lossy().into_owned(), data));
    }
    change(&mut members);
    let mut tar = tar::Builder::new(File::create(to).unwrap());
    for (name, data) in members {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        tar.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    tar.finish().unwrap();
}

#[test]
fn accept_may_refuse_the_signed_manifest_before_any_file_is_read() {
    let k = key();
    let m = make(&k);
    let mut sunk = false;
    let err = read(
        &m.bundle,
        File::open(&m.bundle).unwrap(),
        &k.trusted(),
        |man| {
            Err(Error::Refused {
                reason: format!("bundle for {}, this server runs zoned-metal", man.image_id),
            })
        },
        |_, _| {
            sunk = true;
            Ok(())
        },
    )
    .unwrap_err();
    assert!(!sunk);
    assert_eq!(
        err.to_string(),
        "bundle for zoned-vm, this server runs zoned-metal"
    );
}

#[test]
fn manifests_are_checked_after_the_signature() {
    let k = key();
    let m = make(&k);
    for (change, want) in [
        (
            Box::new(|m: &mut Manifest| m.format = FORMAT + 1) as Box<dyn Fn(&mut Manifest)>,
            "format 2; this build reads up to format 1",
        ),
        (
            Box::new(|m: &mut Manifest| m.files[1].name = "../etc/passwd".into()),
            "not a plain file name",
        ),
        (
            Box::new(|m: &mut Manifest| m.files[1].name = ROOT_IMAGE.into()),
            "listed twice",
        ),
        (
            Box::new(|m: &mut Manifest| m.files[1].sha256 = "ABC".into()),
            "lower-case hex",
        ),
    ] {
        let mut man = m.manifest.clone();
        change(&mut man);
        // Packed by hand: pack() itself refuses such a manifest.
        let path = m.dir.path().join("bad.bundle");
        let mut tar = tar::Builder::new(File::create(&path).unwrap());
        let bytes = man.to_bytes();
        let sig = k.sign(&bytes);
        for (name, data) in [(MANIFEST, bytes.as_slice()), (SIGNATURE, sig.as_bytes())] {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            tar.append_data(&mut h, name, data).unwrap();
        }
        tar.finish().unwrap();
        drop(tar);
        let err = verify(&path, &k.trusted()).unwrap_err().to_string();
        assert!(err.contains(want), "{err} (wanted {want})");
    }
}

#[test]
fn trusted_keys_come_from_a_directory_of_minisign_public_keys() {
    let k = key();
    let dir = tempfile::tempdir().unwrap();
    let err = TrustedKeys::load_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::NoTrustedKeys { .. }), "{err}");
    std::fs::write(dir.path().join("release.pub"), k.public_file()).unwrap();
    std::fs::write(dir.path().join("README"), "not a key").unwrap();
    let t = TrustedKeys::load_dir(dir.path()).unwrap();
    assert_eq!(t.ids(), k.trusted().ids());
    // The id is what minisign prints for the key.
    assert!(k.public_file().contains(&t.ids()[0]));
    std::fs::write(
        dir.path().join("broken.pub"),
        "untrusted comment: x\nnot base64\n",
    )
    .unwrap();
    let err = TrustedKeys::load_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("broken.pub"), "{err}");
}

#[test]
fn oversized_tar_headers_are_refused_before_they_fill_memory() {
    let k = key();
    let m = make(&k);
    // A 64 MiB PAX extension header before the manifest: not covered by
    // the signature, and kept in memory whole by the tar reader.
    let evil = m.dir.path().join("evil.bundle");
    {
        let mut out = File::create(&evil).unwrap();
        let record = {
            let value = "x".repeat(64 << 20);
            let body = format!("comment={value}\n");
            // PAX: "<len> <key>=<value>\n" where len counts itself.
            let mut len = body.len() + 1;
            loop {
                let l = format!("{len} {body}").len();
                if l == len {
                    break;
                }
                len = l;
            }
            format!("{len} {body}")
        };
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_path("pax").unwrap();
        h.set_size(record.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        out.write_all(h.as_bytes()).unwrap();
        out.write_all(record.as_bytes()).unwrap();
        let pad = (512 - record.len() % 512) % 512;
        out.write_all(&vec![0u8; pad]).unwrap();
        out.write_all(&std::fs::read(&m.bundle).unwrap()).unwrap();
    }
    let err = verify(&evil, &k.trusted()).unwrap_err();
    let text = format!("{err:#} {:?}", std::error::Error::source(&err));
    assert!(
        text.contains("more than its signed manifest accounts for"),
        "{text}"
    );
}

#[test]
fn the_signed_manifest_alone_is_read_without_the_files_and_still_needs_a_trusted_key() {
    let k = key();
    let m = make(&k);
    let mut b = std::fs::read(&m.bundle).unwrap();
    let at = find(&b, b"MZ a kernel");
    b[at + 3] ^= 1;
    std::fs::write(&m.bundle, &b).unwrap();
    // The files are not read: a changed file is verify's to find.
    let v = signed_manifest(&m.bundle, &k.trusted()).unwrap();
    assert_eq!(v.manifest, m.manifest);
    assert!(verify(&m.bundle, &k.trusted()).is_err());
    let err = signed_manifest(&m.bundle, &key().trusted()).unwrap_err();
    assert!(matches!(err, Error::UnknownKey { .. }), "{err}");
}
