//! The upgrade API (issue 24) against a zone of real processes: what a
//! server takes as an update bundle and what it refuses before keeping or
//! writing anything. Installing, rebooting and rolling back run in the
//! QEMU zone (`vm_upgrade`), where servers boot from root slots.

use std::path::{Path, PathBuf};

use testbed::zone::TestZone;
use zone_bundle::{file_entry, Manifest, FORMAT, ROOT_IMAGE};
use zonectl::v1::{upgrade_client::UpgradeClient, BundleChunk, InstallRequest, PutRequest};

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
    fn sign(&self, msg: &[u8]) -> String {
        minisign::sign(Some(&self.pk), &self.sk, msg, Some("test"), None)
            .unwrap()
            .into_string()
    }
    fn id(&self) -> String {
        // The key id as minisign prints it: 16 hex digits, upper case.
        let text = self.pk.to_box().unwrap().into_string();
        let mut t = zone_bundle::TrustedKeys::default();
        t.add("k.pub", &text).unwrap();
        t.ids().remove(0)
    }
}

/// A bundle of a 3 MiB root image and a kernel image, signed by `key`.
fn bundle(dir: &Path, name: &str, key: &Key) -> PathBuf {
    let root = dir.join(format!("{name}-{ROOT_IMAGE}"));
    let uki = dir.join(format!("{name}-zoned-a.efi"));
    std::fs::write(
        &root,
        (0..3 << 20)
            .map(|i: u32| (i % 251) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    std::fs::write(&uki, b"MZ a kernel image").unwrap();
    let files = vec![
        file_entry(ROOT_IMAGE, &root, None).unwrap(),
        file_entry("zoned-a.efi", &uki, None).unwrap(),
    ];
    let manifest = Manifest {
        format: FORMAT,
        image_id: "zoned-vm".into(),
        version: "9.9.9+test".into(),
        commit: "0123456789ab".into(),
        binaries_profile: "release".into(),
        kernel: "6.1.0".into(),
        files,
    };
    let out = dir.join(format!("{name}.bundle"));
    zone_bundle::pack(
        &out,
        &manifest,
        &key.sign(&manifest.to_bytes()),
        &[root, uki],
    )
    .unwrap();
    out
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    zone_bundle::hex(&sha2::Sha256::digest(data))
}

/// The chunks of an upload of `data` announcing `total` and `sha`.
fn chunks(data: &[u8], total: u64, sha: &str) -> Vec<BundleChunk> {
    data.chunks(1 << 20)
        .enumerate()
        .map(|(i, c)| BundleChunk {
            data: c.to_vec(),
            total_bytes: if i == 0 { total } else { 0 },
            sha256: if i == 0 {
                sha.to_owned()
            } else {
                String::new()
            },
        })
        .collect()
}

/// The files in a server's bundle directory.
fn kept(zone: &TestZone, i: usize) -> Vec<String> {
    let dir = zone.servers[i].dir.join("data/upgrade");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Uploads by an admin: a bundle signed by a trusted key is kept (and
/// named by its sha256); a tampered one (one byte of the root image), one
/// signed by an unknown key, one whose bytes differ from the announced
/// sha256, and one cut short are refused, each naming what is wrong, and
/// leave nothing behind; an operator may not upload; a server that did not
/// boot from a root slot refuses to install; the zone's upgrade records
/// are not writable through the key-value API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_keeps_only_a_whole_bundle_signed_by_a_key_it_trusts() {
    let keys_dir = tempfile::tempdir().unwrap();
    let trusted = key();
    let stranger = key();
    std::fs::write(
        keys_dir.path().join(format!("{}.pub", trusted.id())),
        trusted.pk.to_box().unwrap().into_string(),
    )
    .unwrap();
    let extra = format!("[upgrade]\nkeys_dir = \"{}\"\n", keys_dir.path().display());
    let mut zone = TestZone::start(3, &extra);
    zone.wait_leader().await;
    let work = tempfile::tempdir().unwrap();
    let good = std::fs::read(bundle(work.path(), "good", &trusted)).unwrap();
    let foreign = std::fs::read(bundle(work.path(), "foreign", &stranger)).unwrap();
    // One byte of the root image's payload changed (the tar header and
    // manifest come first; 600 KiB in is the root image).
    let mut tampered = good.clone();
    let at = 600 << 10;
    tampered[at] ^= 0x5a;

    let up = UpgradeClient::new(zone.channel(0).await);
    let send = |data: &[u8], total: u64, sha: &str| {
        let c = chunks(data, total, sha);
        let mut up = up.clone();
        async move { up.upload(tokio_stream::iter(c)).await }
    };

    let e = send(&tampered, tampered.len() as u64, &sha256(&tampered))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains(ROOT_IMAGE), "{}", e.message());
    assert!(kept(&zone, 0).is_empty(), "{:?}", kept(&zone, 0));

    let e = send(&foreign, foreign.len() as u64, &sha256(&foreign))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains(&stranger.id()) && e.message().contains(&trusted.id()),
        "the refusal names the signing key and the trusted one: {}",
        e.message()
    );
    assert!(kept(&zone, 0).is_empty(), "{:?}", kept(&zone, 0));

    // The bytes are not the ones announced.
    let e = send(&good, good.len() as u64, &sha256(&foreign))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("announced"), "{}", e.message());
    // Cut short.
    let e = send(&good[..good.len() / 2], good.len() as u64, &sha256(&good))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("cut short"), "{}", e.message());
    assert!(kept(&zone, 0).is_empty(), "{:?}", kept(&zone, 0));

    // An operator may not upload.
    let op = zone.pki.user("olga", zonectl::zone_pki::Role::Operator);
    let mut as_op = UpgradeClient::new(zone.channel_as(0, Some(&op)));
    let e = as_op
        .upload(tokio_stream::iter(chunks(
            &good,
            good.len() as u64,
            &sha256(&good),
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    let sha = sha256(&good);
    let info = send(&good, good.len() as u64, &sha)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.sha256, sha);
    assert_eq!(info.holder, 1);
    assert_eq!(info.version, "9.9.9+test");
    assert_eq!(info.image_id, "zoned-vm");
    assert_eq!(info.key_id, trusted.id());
    assert_eq!(kept(&zone, 0), vec![format!("{sha}.bundle")]);
    assert_eq!(
        std::fs::read(
            zone.servers[0]
                .dir
                .join(format!("data/upgrade/{sha}.bundle"))
        )
        .unwrap(),
        good
    );

    // Server 2 runs from no root slot: it refuses before fetching.
    let e = UpgradeClient::new(zone.channel(1).await)
        .install(InstallRequest {
            sha256: sha.clone(),
            holder: 1,
            no_reboot: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("root slot"), "{}", e.message());
    assert!(kept(&zone, 1).is_empty(), "{:?}", kept(&zone, 1));

    let e = zone
        .kv(0)
        .await
        .put(PutRequest {
            key: b"zone/upgrade/2".to_vec(),
            value: b"forged".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // zonectl: the status lists every server (none booted from a slot), and
    // a roll is refused before anything is sent.
    let ep = zone.servers[0].endpoint();
    let out = zone.zonectl(&["--endpoints", &ep, "upgrade", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("ID"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains("zone-")).count(),
        3,
        "{text}"
    );
    let file = work.path().join("good.bundle");
    let out = zone.zonectl(&[
        "--endpoints",
        &ep,
        "upgrade",
        "--bundle",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("appliance root slot") && err.contains("nothing was changed"),
        "{err}"
    );
}
