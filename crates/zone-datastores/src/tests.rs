use super::*;

fn nfs(name: &str, target: &str) -> Datastore {
    Datastore {
        name: name.into(),
        r#type: "nfs4".into(),
        source: "10.0.0.5:/srv/ds".into(),
        target: target.into(),
        write_probe: true,
        ..Default::default()
    }
}

fn refused(mut ds: Datastore, others: &[Datastore]) -> Invalid {
    check(&mut ds, others).expect_err("accepted")
}

#[test]
fn a_good_declaration_gets_the_default_probe_timing() {
    let mut ds = nfs("images", "/var/lib/one/datastores/1");
    check(&mut ds, &[]).unwrap();
    assert_eq!(ds.probe_interval_ms, DEFAULT_INTERVAL_MS);
    assert_eq!(ds.probe_timeout_ms, DEFAULT_TIMEOUT_MS);
    // The same declaration again is not a duplicate.
    let stored = ds.clone();
    check(
        &mut ds,
        &[Datastore {
            revision: 7,
            ..stored
        }],
    )
    .unwrap();
}

#[test]
fn each_bad_field_is_named() {
    let cases: Vec<(Datastore, &str, &str)> = vec![
        (
            nfs("Bad Name", "/srv/a"),
            "datastore.name",
            "not a datastore name",
        ),
        (nfs("", "/srv/a"), "datastore.name", "not a datastore name"),
        (
            Datastore {
                r#type: "fuse.sshfs".into(),
                ..nfs("a", "/srv/a")
            },
            "datastore.type",
            "unknown file system type",
        ),
        (
            nfs("a", "srv/a"),
            "datastore.target",
            "not an absolute path",
        ),
        (nfs("a", "/"), "datastore.target", "root file system"),
        (nfs("a", "/etc"), "datastore.target", "`/etc` is `/etc`"),
        (
            nfs("a", "/var"),
            "datastore.target",
            "`/var` is a file system of the server's own",
        ),
        (
            nfs("a", "/var/lib"),
            "datastore.target",
            "`/var/lib` holds `/var/lib/zoned`",
        ),
        (
            nfs("a", "/tmp"),
            "datastore.target",
            "`/tmp` is a file system",
        ),
        (nfs("a", "/run/x"), "datastore.target", "under `/run`"),
        (nfs("a", "/lib/x"), "datastore.target", "under `/lib`"),
        (nfs("a", "/bin"), "datastore.target", "`/bin` is `/bin`"),
        (nfs("a", "/etc/one"), "datastore.target", "under `/etc`"),
        (nfs("a", "/usr/local/x"), "datastore.target", "under `/usr`"),
        (nfs("a", "/boot/efi"), "datastore.target", "under `/boot`"),
        (
            nfs("a", "/var/lib/zoned"),
            "datastore.target",
            "`/var/lib/zoned`",
        ),
        (
            nfs("a", "/var/lib/zoned/x"),
            "datastore.target",
            "under `/var/lib/zoned`",
        ),
        (nfs("a", "/srv/../etc"), "datastore.target", "normal form"),
        (nfs("a", "/srv/a/"), "datastore.target", "ends with a slash"),
        (nfs("a", "/srv/a b"), "datastore.target", "a space"),
        (nfs("a", "/srv/a,b"), "datastore.target", "a comma"),
        (
            Datastore {
                source: "nas".into(),
                ..nfs("a", "/srv/a")
            },
            "datastore.source",
            "not HOST:/EXPORT",
        ),
        (
            Datastore {
                source: "n_a:/x".into(),
                ..nfs("a", "/srv/a")
            },
            "datastore.source",
            "not a host name",
        ),
        (
            Datastore {
                r#type: "ext4".into(),
                source: "/srv/disk".into(),
                ..nfs("a", "/srv/a")
            },
            "datastore.source",
            "not a block device",
        ),
        (
            Datastore {
                options: "ro,,hard".into(),
                ..nfs("a", "/srv/a")
            },
            "datastore.options",
            "empty",
        ),
        (
            Datastore {
                options: "hard rw".into(),
                ..nfs("a", "/srv/a")
            },
            "datastore.options",
            "lowercase letters",
        ),
        (
            Datastore {
                options: "timeo=600\nrw".into(),
                ..nfs("a", "/srv/a")
            },
            "datastore.options",
            "the value must be",
        ),
        (
            Datastore {
                options: "context=\"a,b\"".into(),
                ..nfs("a", "/srv/a")
            },
            "datastore.options",
            "the value must be",
        ),
        (
            Datastore {
                options: "-o,rw".into(),
                ..nfs("a", "/srv/a")
            },
            "datastore.options",
            "not starting with `-`",
        ),
        (
            Datastore {
                options: "remount".into(),
                ..nfs("a", "/srv/a")
            },
            "datastore.options",
            "changes another mount",
        ),
        (
            Datastore {
                options: "addr=10.9.9.9".into(),
                ..nfs("a", "/srv/a")
            },
            "datastore.options",
            "set by zone-mounts",
        ),
        (
            Datastore {
                options: "ro".into(),
                ..nfs("a", "/srv/a")
            },
            "datastore.write_probe",
            "read-only",
        ),
        (
            Datastore {
                probe_interval_ms: 10,
                ..nfs("a", "/srv/a")
            },
            "datastore.probe_interval_ms",
            "outside",
        ),
        (
            Datastore {
                probe_timeout_ms: 700_000,
                ..nfs("a", "/srv/a")
            },
            "datastore.probe_timeout_ms",
            "outside",
        ),
        (
            Datastore {
                exclusive: true,
                ..nfs("a", "/srv/a")
            },
            "datastore.exclusive",
            "may be mounted on every server at once",
        ),
    ];
    for (ds, field, words) in cases {
        let what = format!("{ds:?}");
        let e = refused(ds, &[]);
        assert_eq!(e.field, field, "{what}: {e}");
        assert!(
            e.reason.contains(words),
            "{what}: `{}` lacks `{words}`",
            e.reason
        );
    }
}

#[test]
fn duplicates_and_nesting_are_refused() {
    let mut one = nfs("one", "/srv/ds/one");
    check(&mut one, &[]).unwrap();
    let others = [one];
    let e = refused(nfs("one", "/srv/ds/other"), &others);
    assert_eq!(e.field, "datastore.name");
    assert!(e.reason.contains("declared already"), "{e}");
    let e = refused(nfs("two", "/srv/ds/one"), &others);
    assert_eq!(e.field, "datastore.target");
    assert!(e.reason.contains("target already"), "{e}");
    for nested in ["/srv/ds/one/inner", "/srv/ds", "/srv"] {
        let e = refused(nfs("two", nested), &others);
        assert!(e.reason.contains("may not nest"), "{nested}: {e}");
    }
    // A sibling whose name only starts the same is not nested.
    check(&mut nfs("two", "/srv/ds/one-b"), &others).unwrap();
}

#[test]
fn options_split_into_flags_and_data() {
    let o = Options::parse("ro,noatime,hard,timeo=600,vers=4.2,rw").unwrap();
    let names: Vec<_> = o.flags.iter().map(|f| f.name).collect();
    assert_eq!(names, ["ro", "noatime", "rw"]);
    assert_eq!(o.data, ["hard", "timeo=600", "vers=4.2"]);
    assert!(!o.read_only(), "the last word is rw");
    assert!(Options::parse("rw,ro").unwrap().read_only());
    assert_eq!(Options::parse("").unwrap(), Options::default());
}

#[test]
fn nfs_sources_split_into_host_and_export() {
    assert_eq!(
        split_nfs("nas.example:/export/a"),
        Some(("nas.example", "/export/a"))
    );
    assert_eq!(split_nfs("[fd00::5]:/x"), Some(("fd00::5", "/x")));
    assert_eq!(split_nfs("10.0.0.5:/"), Some(("10.0.0.5", "/")));
    assert_eq!(split_nfs("nas"), None);
    assert_eq!(split_nfs("[nas]:/x"), None);
}

fn disk(name: &str, target: &str) -> Datastore {
    Datastore {
        name: name.into(),
        r#type: "ext4".into(),
        source: "/dev/disk/by-id/virtio-zoned-shared".into(),
        target: target.into(),
        exclusive: true,
        required: true,
        ..Default::default()
    }
}

#[test]
fn an_exclusive_block_device_is_accepted_and_unmounted_is_its_normal_state() {
    let mut ds = disk("db", "/srv/db");
    check(&mut ds, &[]).unwrap();
    use DatastoreState::*;
    assert!(healthy(Unmounted, true), "away from the holder");
    assert!(!healthy(Unmounted, false));
    for s in [Probing, Hung, Failed, Unspecified] {
        assert!(!healthy(s, true), "{s:?}");
    }
    assert!(healthy(Mounted, true) && healthy(Mounted, false));
}

#[test]
fn an_exclusive_datastore_names_nothing_systemd_would_read_otherwise() {
    let e = refused(disk("db", "/srv/50%"), &[]);
    assert_eq!(e.field, "datastore.target", "{e}");
    let e = refused(
        Datastore {
            source: "/dev/disk/by-id/a%n".into(),
            ..disk("db", "/srv/db")
        },
        &[],
    );
    assert_eq!(e.field, "datastore.source", "{e}");
    let long = format!("/srv/{}", "-".repeat(70));
    let e = refused(disk("db", &long), &[]);
    assert!(e.reason.contains("255 bytes"), "{e}");
    // Not exclusive: mount(2) takes them as they are.
    check(&mut disk_shared("/srv/50%"), &[]).unwrap();
}

fn disk_shared(target: &str) -> Datastore {
    Datastore {
        exclusive: false,
        ..disk("db", target)
    }
}

#[test]
fn mount_unit_names_are_spelled_as_systemd_escape_spells_them() {
    // `systemd-escape --path --suffix=mount PATH`, systemd 252.
    for (target, unit) in [
        ("/srv/db", "srv-db.mount"),
        (
            "/var/lib/one/datastores/0",
            "var-lib-one-datastores-0.mount",
        ),
        ("/srv/my-db", "srv-my\\x2ddb.mount"),
        ("/srv/.hidden/x", "srv-.hidden-x.mount"),
        ("/.db", "\\x2edb.mount"),
        ("/srv/a:b_c.d", "srv-a:b_c.d.mount"),
        ("/srv/caf\u{e9}", "srv-caf\\xc3\\xa9.mount"),
        ("/srv/a+b", "srv-a\\x2bb.mount"),
    ] {
        assert_eq!(mount_unit_name(target), unit, "{target}");
    }
}

#[test]
fn a_mount_unit_names_the_declaration_and_is_never_started_at_boot() {
    let mut ds = Datastore {
        options: "noatime,data=ordered".into(),
        ..disk("db", "/srv/db")
    };
    check(&mut ds, &[]).unwrap();
    let t = mount_unit_text(&ds);
    assert!(t.starts_with(UNIT_HEADER), "{t}");
    for line in [
        "[Mount]",
        "What=/dev/disk/by-id/virtio-zoned-shared",
        "Where=/srv/db",
        "Type=ext4",
        "Options=noatime,data=ordered",
        "AssertPathExists=/run/zone-vip/fenced",
        "TimeoutSec=90",
    ] {
        assert!(t.lines().any(|l| l == line), "no `{line}` in:\n{t}");
    }
    assert!(!t.contains("[Install]"), "{t}");
    let bare = mount_unit_text(&disk("db", "/srv/db"));
    assert!(!bare.contains("Options="), "{bare}");
}
