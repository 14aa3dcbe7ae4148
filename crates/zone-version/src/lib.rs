//! Which build of Zoned this is, for `zonectl version`, `zonectl show` and
//! the `--version` of every binary.

/// The workspace's version (Cargo.toml).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit the binary was built from: 12 hex digits, or `unknown` when
/// it was built outside git without `ZONE_COMMIT` set.
pub const COMMIT: &str = env!("ZONE_COMMIT");

/// `VERSION+COMMIT`, as clap prints for `--version` and as the appliance's
/// os-release writes `IMAGE_VERSION`.
pub const LONG: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("ZONE_COMMIT"));

/// The appliance image this host booted, `IMAGE_ID IMAGE_VERSION` from
/// os-release (`zoned-vm 0.1.0+3f2a1b9c0d1e`); empty off the appliance
/// (os-release without them, or none).
pub fn image() -> String {
    ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|t| image_from(&t))
        .unwrap_or_default()
}

/// [`image`] from the text of an os-release file.
pub fn image_from(os_release: &str) -> String {
    let field = |name: &str| {
        os_release.lines().find_map(|l| {
            let v = l.trim().strip_prefix(name)?.strip_prefix('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (!v.is_empty()).then(|| v.to_owned())
        })
    };
    match (field("IMAGE_ID"), field("IMAGE_VERSION")) {
        (Some(id), Some(v)) => format!("{id} {v}"),
        (None, Some(v)) => v,
        (Some(id), None) => id,
        (None, None) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_is_read_from_os_release() {
        let appliance = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nIMAGE_ID=zoned-vm\nIMAGE_VERSION=0.1.0+3f2a1b9c0d1e\n";
        assert_eq!(image_from(appliance), "zoned-vm 0.1.0+3f2a1b9c0d1e");
        assert_eq!(image_from("ID=debian\nIMAGE_VERSION=\"2\"\n"), "2");
        // IMAGE_ID_LIKE is not IMAGE_ID.
        assert_eq!(image_from("IMAGE_ID_LIKE=x\nVERSION_ID=12\n"), "");
        assert_eq!(image_from(""), "");
    }

    #[test]
    fn the_commit_is_recorded() {
        // git's abbreviation (12 digits, more when needed), `unknown`, or
        // what ZONE_COMMIT said at build time.
        assert!(
            !COMMIT.is_empty() && !COMMIT.contains(char::is_whitespace),
            "{COMMIT:?}"
        );
        if option_env!("ZONE_COMMIT_GIVEN").is_none() && COMMIT != "unknown" {
            assert!(
                COMMIT.len() >= 12 && COMMIT.bytes().all(|b| b.is_ascii_hexdigit()),
                "{COMMIT}"
            );
        }
        assert_eq!(LONG, format!("{VERSION}+{COMMIT}"));
    }
}
