//! This mount namespace's mounts, from `/proc/self/mountinfo`: reading it
//! never waits on a storage server, so the supervisor may do it itself.

use crate::effects::{MountId, MountState};

/// One line of mountinfo, as far as zone-mounts cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountLine {
    pub target: String,
    pub fstype: String,
    pub source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let n = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(n);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo's text.
pub fn parse(text: &str) -> Vec<MountLine> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let target = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = r.next()?;
            Some(MountLine {
                target: unescape(target),
                fstype: fstype.to_owned(),
                source: unescape(source),
            })
        })
        .collect()
}

/// This process's mounts now.
pub fn read() -> std::io::Result<Vec<MountLine>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// What is mounted on `id.target` (the top-most mount there): the
/// datastore itself when its type and source match (a bind mount's source
/// is not in mountinfo: any bind is taken for it). Unreadable mountinfo
/// counts as something else there: nothing is used or unmounted blind.
pub fn state(id: &MountId) -> MountState {
    match read() {
        Ok(lines) => state_in(&lines, id),
        Err(e) => MountState::Other(format!("/proc/self/mountinfo unreadable: {e}")),
    }
}

pub fn state_in(lines: &[MountLine], id: &MountId) -> MountState {
    let Some(l) = lines.iter().rev().find(|l| l.target == id.target) else {
        return MountState::Absent;
    };
    let ours = match id.ty.as_str() {
        "nfs" | "nfs4" => l.fstype.starts_with("nfs") && l.source == id.source,
        "bind" => true,
        ty => l.fstype == ty,
    };
    if ours {
        MountState::Ours
    } else {
        MountState::Other(format!("{} {}", l.fstype, l.source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_give_target_type_and_source() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    120 25 0:52 / /var/lib/one/datastores/1 rw,relatime shared:1 - nfs4 10.0.0.5:/srv/ds rw,vers=4.2,addr=10.0.0.5\n";
        let m = parse(text);
        assert_eq!(m[0].target, "/mnt/with space");
        assert_eq!(m[1].target, "/var/lib/one/datastores/1");
        assert_eq!(m[1].fstype, "nfs4");
        assert_eq!(m[1].source, "10.0.0.5:/srv/ds");
        let id = |ty: &str, source: &str| MountId {
            target: "/var/lib/one/datastores/1".into(),
            ty: ty.into(),
            source: source.into(),
        };
        assert_eq!(
            state_in(&m, &id("nfs4", "10.0.0.5:/srv/ds")),
            MountState::Ours
        );
        assert_eq!(
            state_in(&m, &id("nfs4", "10.0.0.6:/srv/ds")),
            MountState::Other("nfs4 10.0.0.5:/srv/ds".into())
        );
        assert_eq!(
            state_in(&m, &id("ext4", "/dev/vdb")),
            MountState::Other("nfs4 10.0.0.5:/srv/ds".into())
        );
        assert_eq!(
            state_in(
                &m,
                &MountId {
                    target: "/elsewhere".into(),
                    ..id("nfs4", "x")
                }
            ),
            MountState::Absent
        );
    }
}
