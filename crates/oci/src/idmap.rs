//! User-namespace id mappings (`/proc/self/uid_map`), and the one `lchown` every
//! owner kiln sets goes through: in a user namespace (a rootless kilnd) an owner
//! outside the mapped ids fails naming them, not with a bare "Invalid argument".

use std::io;
use std::path::Path;

/// One line of `/proc/self/uid_map` or `gid_map`: `count` ids from `inside` map to
/// `outside` ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

/// The id mapping of this process's user namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMap {
    pub ranges: Vec<IdRange>,
}

impl IdMap {
    /// Parses the text of `/proc/PID/uid_map`.
    pub fn parse(text: &str) -> IdMap {
        let ranges = text
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace().map(|n| n.parse::<u32>().ok());
                Some(IdRange {
                    inside: f.next()??,
                    outside: f.next()??,
                    count: f.next()??,
                })
            })
            .collect();
        IdMap { ranges }
    }

    /// This process's uid mapping.
    pub fn uids() -> IdMap {
        IdMap::parse(&std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default())
    }

    /// Whether this is the initial user namespace's identity mapping.
    pub fn is_initial(&self) -> bool {
        self.ranges
            == [IdRange {
                inside: 0,
                outside: 0,
                count: u32::MAX,
            }]
    }

    /// Whether `id` is mapped.
    pub fn contains(&self, id: u32) -> bool {
        self.ranges
            .iter()
            .any(|r| id >= r.inside && u64::from(id) < u64::from(r.inside) + u64::from(r.count))
    }

    /// The mapped ids, `0-65536` style, for messages.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .ranges
            .iter()
            .map(|r| {
                let last = u64::from(r.inside) + u64::from(r.count) - 1;
                format!("{}-{last}", r.inside)
            })
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

/// Whether this process runs in a user namespace other than the initial one (read
/// once: a process does not change user namespace).
pub fn in_user_namespace() -> bool {
    static IN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *IN.get_or_init(|| !IdMap::uids().is_initial())
}

/// `lchown(path, uid, gid)`; an id the user namespace does not map is an error that
/// says so (the kernel's EINVAL).
pub fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    match std::os::unix::fs::lchown(path, Some(uid), Some(gid)) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && in_user_namespace() => {
            let uids = IdMap::uids();
            let gids =
                IdMap::parse(&std::fs::read_to_string("/proc/self/gid_map").unwrap_or_default());
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "owner {uid}:{gid} is outside the ids kilnd's user namespace maps (rootless: uids {}, gids {}; give the user more subordinate ids in /etc/subuid and /etc/subgid)",
                    uids.describe(),
                    gids.describe()
                ),
            ))
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_maps_parse_and_describe_their_ranges() {
        let m =
            IdMap::parse("         0       1001          1\n         1     100000      65536\n");
        assert!(!m.is_initial());
        assert!(m.contains(0) && m.contains(1000) && m.contains(65536));
        assert!(!m.contains(65537));
        assert_eq!(m.describe(), "0-0, 1-65536");
        let host = IdMap::parse("         0          0 4294967295\n");
        assert!(host.is_initial() && host.contains(u32::MAX - 1));
        assert_eq!(IdMap::parse("").describe(), "none");
    }
}
