//! `/proc/PID/mountinfo` read into mounts (proc(5)): which device each
//! mount is of, where it is, what filesystem, and its propagation (which
//! tells a namespace's own mount from a copy that follows the host's).
//! Pure: a malformed line is skipped, never a panic.

/// A device number, `(major, minor)`.
pub type DevNum = (u32, u32);

/// One line of mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The mount's id (unique among the namespace's current mounts).
    pub id: u64,
    /// `st_dev` of the filesystem: the block device it is on, or an
    /// anonymous `0:N` (tmpfs, btrfs, overlay…).
    pub dev: DevNum,
    /// Where it is mounted, relative to the reading process's root.
    pub mount_point: String,
    /// The filesystem type (`ext4`).
    pub fstype: String,
    /// What was mounted (`/dev/loop5`, `tmpfs`).
    pub source: String,
    /// Peer group it shares mount events with (`shared:N`).
    pub shared: Option<u64>,
    /// Peer group it receives mount events from (`master:N`): a copy of a
    /// mount elsewhere that goes when that one does.
    pub master: Option<u64>,
}

/// Decodes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`,
/// `\134`); anything else is kept as written.
pub fn unescape(field: &str) -> String {
    if !field.contains('\\') {
        return field.to_owned();
    }
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn dev_num(field: &str) -> Option<DevNum> {
    let (major, minor) = field.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// One line, if it is well formed.
pub fn parse_line(line: &str) -> Option<Mount> {
    // id parent major:minor root mount-point options [optional…] - fstype source super-options
    let (before, after) = line.split_once(" - ")?;
    let mut fields = before.split(' ');
    let id = fields.next()?.parse().ok()?;
    let _parent = fields.next()?;
    let dev = dev_num(fields.next()?)?;
    let _root = fields.next()?;
    let mount_point = unescape(fields.next()?);
    let _options = fields.next()?;
    let (mut shared, mut master) = (None, None);
    for tag in fields {
        if let Some(n) = tag.strip_prefix("shared:") {
            shared = n.parse().ok();
        } else if let Some(n) = tag.strip_prefix("master:") {
            master = n.parse().ok();
        }
    }
    let mut rest = after.split(' ');
    let fstype = unescape(rest.next()?);
    let source = unescape(rest.next().unwrap_or(""));
    Some(Mount {
        id,
        dev,
        mount_point,
        fstype,
        source,
        shared,
        master,
    })
}

/// The mounts of block devices only: a device number with a major (ext4,
/// xfs…), or an anonymous one mounted from a `/dev/` path (btrfs). A
/// machine's thousand tmpfs and overlay mounts are skipped without being
/// parsed, so a storm of them costs little to follow.
pub fn parse_block(text: &str) -> Vec<Mount> {
    text.lines()
        .filter(|line| {
            let Some((before, after)) = line.split_once(" - ") else {
                return false;
            };
            let major = before.split(' ').nth(2).and_then(|d| d.split_once(':'));
            match major {
                Some(("0", _)) => after
                    .split(' ')
                    .nth(1)
                    .is_some_and(|s| s.starts_with("/dev/")),
                Some(_) => true,
                None => false,
            }
        })
        .filter_map(parse_line)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_gives_its_device_mount_point_type_and_propagation() {
        let m = parse_line(
            "36 35 7:5 / /srv/my\\040data rw,noatime shared:7 master:1 - ext4 /dev/loop5 rw",
        )
        .expect("a mount");
        assert_eq!(m.id, 36);
        assert_eq!(m.dev, (7, 5));
        assert_eq!(m.mount_point, "/srv/my data");
        assert_eq!(m.fstype, "ext4");
        assert_eq!(m.source, "/dev/loop5");
        assert_eq!((m.shared, m.master), (Some(7), Some(1)));
        let plain = parse_line("22 1 0:21 / /dev/shm rw - tmpfs tmpfs rw").expect("a mount");
        assert_eq!(
            (plain.dev, plain.shared, plain.master),
            ((0, 21), None, None)
        );
    }

    #[test]
    fn only_block_devices_are_kept_by_parse_block() {
        let text = "22 1 0:21 / /dev/shm rw - tmpfs tmpfs rw\n\
                    36 35 7:5 / /srv rw - ext4 /dev/loop5 rw\n\
                    37 35 0:44 / /data rw - btrfs /dev/sdb1 rw\n\
                    38 35 0:45 / /o rw - overlay overlay rw\n\
                    broken line\n";
        let kept: Vec<u64> = parse_block(text).iter().map(|m| m.id).collect();
        assert_eq!(kept, [36, 37]);
    }

    #[test]
    fn malformed_lines_are_skipped_never_a_panic() {
        for bad in [
            "",
            "36",
            "36 35 7:5 / /srv rw ext4 /dev/loop5",
            "x 35 7:5 / /srv rw - ext4 /dev/loop5 rw",
            "36 35 7 / /srv rw - ext4 /dev/loop5 rw",
            "36 35 7:99999999999 / /srv rw - ext4 /dev/loop5 rw",
            "36 35 7:5 / - ext4",
            "\\",
            "36 35 7:5 / /a\\ rw - ext4 /dev/x\\12 rw",
        ] {
            let _ = parse_line(bad);
        }
        assert_eq!(
            parse_block("garbage\n22 1 7:1 / /x rw - ext4 /dev/x rw\n").len(),
            1
        );
    }

    #[test]
    fn escapes_decode_and_odd_backslashes_stay() {
        assert_eq!(unescape("a\\040b\\011c\\012d\\134e"), "a b\tc\nd\\e");
        assert_eq!(unescape("a\\9x"), "a\\9x");
        assert_eq!(unescape("end\\04"), "end\\04");
        assert_eq!(unescape("\\"), "\\");
        assert_eq!(unescape("\\777"), "\\777");
    }
}
