//! The update bundle `cargo xtask image` writes beside the disk image
//! (`zoned-<profile>-<version>.bundle`, the format in the zone-bundle
//! crate): the root filesystem image, zstd-compressed, a unified kernel
//! image per root slot, and a manifest signed with a minisign key.
//!
//! The key: `--signing-key FILE` (a minisign secret key, e.g. made with
//! `minisign -G -W`; an encrypted one takes its password from
//! ZONED_SIGNING_KEY_PASSWORD), else a throwaway test key kept in
//! target/image/signing/ and made on first use. The image trusts the
//! signing key's public key and those given with `--trust-key`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use zone_bundle::{Digested, FileEntry, Manifest};

use crate::run;

/// The secret key signing bundles and its public half.
pub struct SigningKey {
    sk: minisign::SecretKey,
    pk: minisign::PublicKey,
    pub path: PathBuf,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// The key at `given`, else the test key under `image_dir/signing`,
    /// made if absent.
    pub fn load(given: Option<&Path>, image_dir: &Path) -> Result<SigningKey> {
        let path = match given {
            Some(p) => p.to_owned(),
            None => {
                let dir = image_dir.join("signing");
                let path = dir.join("zoned-test.key");
                if !path.exists() {
                    std::fs::create_dir_all(&dir)?;
                    let kp = minisign::KeyPair::generate_unencrypted_keypair()
                        .map_err(|e| anyhow::anyhow!("cannot make a signing key: {e}"))?;
                    let sk = kp
                        .sk
                        .to_box(Some(
                            "zoned test signing key (throwaway, made by cargo xtask image)",
                        ))
                        .map_err(|e| anyhow::anyhow!("{e}"))?
                        .into_string();
                    write_private(&path, &sk)?;
                    eprintln!(
                        "made a throwaway bundle signing key: {} (pass --signing-key for a real one)",
                        path.display()
                    );
                }
                eprintln!(
                    "the bundle is signed with the throwaway test key {} and the image trusts it: for servers you run, pass --signing-key",
                    path.display()
                );
                path
            }
        };
        let password = std::env::var("ZONED_SIGNING_KEY_PASSWORD").ok();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("--signing-key {}", path.display()))?;
        // An unencrypted key (`minisign -G -W`, the test key), else one
        // protected by a password.
        let sk = minisign::SecretKeyBox::from_string(&text)
            .and_then(|b| b.into_unencrypted_secret_key())
            .or_else(|_| {
                minisign::SecretKeyBox::from_string(&text).and_then(|b| b.into_secret_key(password))
            })
            .map_err(|e| {
                anyhow::anyhow!(
                    "--signing-key {}: not a usable minisign secret key: {e}",
                    path.display()
                )
            })?;
        let pk = minisign::PublicKey::from_secret_key(&sk)
            .map_err(|e| anyhow::anyhow!("--signing-key {}: {e}", path.display()))?;
        Ok(SigningKey { sk, pk, path })
    }

    /// The public key, in minisign's file format.
    pub fn public_file(&self) -> Result<String> {
        Ok(self
            .pk
            .to_box()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .into_string())
    }

    /// The key id, as minisign prints it.
    pub fn id(&self) -> Result<String> {
        let mut t = zone_bundle::TrustedKeys::default();
        t.add("signing key", &self.public_file()?)?;
        Ok(t.ids().remove(0))
    }

    fn sign(&self, message: &[u8], trusted_comment: &str) -> Result<String> {
        Ok(minisign::sign(
            Some(&self.pk),
            &self.sk,
            message,
            Some(trusted_comment),
            None,
        )
        .map_err(|e| anyhow::anyhow!("signing the bundle's manifest: {e}"))?
        .into_string())
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| path.display().to_string())?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// What goes into a bundle.
#[derive(Debug)]
pub struct Parts<'a> {
    pub image_id: String,
    pub version: &'a str,
    pub commit: &'a str,
    pub kernel: &'a str,
    /// The root filesystem image (ext4), as written to a root partition.
    pub root_img: &'a Path,
    /// The unified kernel image of each slot, `a` then `b`.
    pub ukis: [&'a Path; 2],
}

/// Writes `dir/zoned-<profile>-<version>.bundle`; its path and manifest.
pub fn write(
    dir: &Path,
    name: &str,
    parts: &Parts,
    key: &SigningKey,
) -> Result<(PathBuf, Manifest)> {
    let work = dir.join(format!("{name}.bundle.work"));
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let root_zst = work.join(zone_bundle::ROOT_IMAGE);
    let unpacked = {
        let mut f = std::io::BufReader::new(std::fs::File::open(parts.root_img)?);
        let (bytes, sha256) = zone_bundle::copy_hashed(&mut f, None)?;
        Digested { bytes, sha256 }
    };
    run(Command::new("zstd")
        .args(["-q", "-T0", "-6", "-f"])
        .arg(parts.root_img)
        .arg("-o")
        .arg(&root_zst))?;
    let mut files: Vec<FileEntry> = vec![zone_bundle::file_entry(
        zone_bundle::ROOT_IMAGE,
        &root_zst,
        Some(unpacked),
    )?];
    let mut paths = vec![root_zst.clone()];
    for (slot, uki) in ['a', 'b'].into_iter().zip(parts.ukis) {
        let n = zone_bundle::uki_name(slot);
        files.push(zone_bundle::file_entry(&n, uki, None)?);
        paths.push(uki.to_owned());
    }
    let manifest = Manifest {
        format: zone_bundle::FORMAT,
        image_id: parts.image_id.clone(),
        version: parts.version.to_owned(),
        commit: parts.commit.to_owned(),
        binaries_profile: crate::PROFILE.to_owned(),
        kernel: parts.kernel.to_owned(),
        files,
    };
    let signature = key.sign(
        &manifest.to_bytes(),
        &format!(
            "{} {} (commit {})",
            parts.image_id, parts.version, parts.commit
        ),
    )?;
    let out = dir.join(format!("{name}-{}.bundle", parts.version));
    zone_bundle::pack(&out, &manifest, &signature, &paths)?;
    std::fs::remove_dir_all(&work)?;
    // What a server will do first: check it with the key it trusts.
    let mut trusted = zone_bundle::TrustedKeys::default();
    trusted.add("signing key", &key.public_file()?)?;
    zone_bundle::verify(&out, &trusted)
        .with_context(|| format!("the bundle just written does not verify: {}", out.display()))?;
    Ok((out, manifest))
}

/// A version string fit for os-release and a file name.
pub fn check_version(v: &str) -> Result<()> {
    if v.is_empty()
        || v.len() > 64
        || !v.starts_with(|c: char| c.is_ascii_digit())
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-' | '~' | '_'))
    {
        bail!("--version {v:?}: a version starts with a digit and has only letters, digits and . + - ~ _ (at most 64)");
    }
    Ok(())
}
