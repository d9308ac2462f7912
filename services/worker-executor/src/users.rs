//! Users and groups from a root filesystem's /etc/passwd and /etc/group.

use crate::error::{Error, Result};
use crate::rootpath;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Who a process runs as, or who owns a file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// The most of /etc/passwd or /etc/group read: an image decides what is there.
const MAX_USERS_FILE: u64 = 4 << 20;

/// `file` in `root` when it is a regular file of sane size; empty otherwise (an
/// image's /etc/passwd may be a FIFO or a device that never ends).
fn read_in_root(root: &Path, file: &str) -> String {
    use std::io::Read;
    let Ok(p) = rootpath::resolve(root, file, true) else {
        return String::new();
    };
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(&p)
    else {
        return String::new();
    };
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return String::new();
    }
    let mut s = String::new();
    let _ = f.take(MAX_USERS_FILE).read_to_string(&mut s);
    s
}

fn passwd(root: &Path) -> Vec<PasswdEntry> {
    read_in_root(root, "/etc/passwd")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f.get(5).map(|h| h.to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

fn groups(root: &Path) -> Vec<GroupEntry> {
    read_in_root(root, "/etc/group")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 3 {
                return None;
            }
            let members = f.get(3).map(|m| {
                m.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            });
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: members.unwrap_or_default(),
            })
        })
        .collect()
}

/// The home directory of `uid` in `root`'s /etc/passwd, "/" when it has none: what a
/// step's `HOME` is when its environment does not set it (as runc sets it).
pub fn home_of(root: &Path, uid: u32) -> String {
    passwd(root)
        .into_iter()
        .find(|e| e.uid == uid && !e.home.is_empty())
        .map(|e| e.home)
        .unwrap_or_else(|| "/".to_string())
}

/// The ids a file op's `--chown` names get, as BuildKit gives them: a user
/// name is looked up in `root`'s /etc/passwd (uid and its gid), a group name
/// in /etc/group; a name that is not there (or no file) leaves the ids at 0,
/// without an error. Numbers are taken as they are.
pub fn chown_ids(root: &Path, user: Option<&str>, group: Option<&str>) -> (u32, u32) {
    let (mut uid, mut gid) = (0, 0);
    if let Some(name) = user {
        match name.parse::<u32>() {
            Ok(n) => (uid, gid) = (n, n),
            Err(_) => {
                if let Some(e) = passwd(root).into_iter().find(|e| e.name == name) {
                    (uid, gid) = (e.uid, e.gid);
                }
            }
        }
    }
    if let Some(name) = group {
        match name.parse::<u32>() {
            Ok(n) => gid = n,
            Err(_) => {
                if let Some(g) = groups(root).into_iter().find(|g| g.name == name) {
                    gid = g.gid;
                }
            }
        }
    }
    (uid, gid)
}

/// The uid of `name` (a user name or a number) in `root`'s /etc/passwd.
pub fn lookup_uid(root: &Path, name: &str) -> Result<u32> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    passwd(root)
        .into_iter()
        .find(|e| e.name == name)
        .map(|e| e.uid)
        .ok_or_else(|| Error::User {
            user: name.to_string(),
            reason: "no matching entries in passwd file".into(),
        })
}

/// The gid of `name` (a group name or a number) in `root`'s /etc/group.
pub fn lookup_gid(root: &Path, name: &str) -> Result<u32> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    groups(root)
        .into_iter()
        .find(|e| e.name == name)
        .map(|e| e.gid)
        .ok_or_else(|| Error::User {
            user: name.to_string(),
            reason: "no matching entries in group file".into(),
        })
}

/// Resolves an exec user spec: "", "name", "uid", "name:group", "uid:gid". Empty is root.
pub fn resolve_user(root: &Path, spec: &str) -> Result<Identity> {
    if spec.is_empty() {
        // BuildKit's GetUser: the default user is "0", looked up (for its
        // groups) like any other, and root when that fails
        return Ok(resolve_user(root, "0").unwrap_or_default());
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entries = passwd(root);
    let entry = match user.parse::<u32>() {
        Ok(uid) => entries.iter().find(|e| e.uid == uid),
        Err(_) => Some(
            entries
                .iter()
                .find(|e| e.name == user)
                .ok_or_else(|| Error::User {
                    user: user.to_string(),
                    reason: "no matching entries in passwd file".into(),
                })?,
        ),
    };
    let uid = match entry {
        Some(e) => e.uid,
        None => user.parse().unwrap_or(0),
    };
    let mut id = Identity {
        uid,
        gid: entry.map(|e| e.gid).unwrap_or(0),
        additional_gids: Vec::new(),
    };
    match group {
        Some(g) => id.gid = lookup_gid(root, g)?,
        None => {
            if let Some(e) = entry {
                id.additional_gids = groups(root)
                    .into_iter()
                    .filter(|g| g.members.contains(&e.name) && g.gid != id.gid)
                    .map(|g| g.gid)
                    .collect();
            }
        }
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passwd_that_is_a_fifo_is_not_read_forever() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(tmp.path().join("etc")).expect("mkdir");
        nix::unistd::mkfifo(
            &tmp.path().join("etc/passwd"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .expect("mkfifo");
        let t = std::time::Instant::now();
        let e = resolve_user(tmp.path(), "alice").expect_err("no such user");
        assert!(e.to_string().contains("alice"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        // a number needs no file
        assert_eq!(resolve_user(tmp.path(), "1000").expect("uid").uid, 1000);
    }

    #[test]
    fn resolves_names_ids_and_groups() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(tmp.path().join("etc")).expect("mkdir");
        std::fs::write(
            tmp.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1001::/home/alice:/bin/sh\n",
        )
        .expect("write");
        std::fs::write(
            tmp.path().join("etc/group"),
            "root:x:0:\nalice:x:1001:\nwheel:x:10:alice\n",
        )
        .expect("write");
        // --chown: BuildKit's lookups, where a missing name is root
        let c = |u, g| chown_ids(tmp.path(), u, g);
        assert_eq!(c(Some("alice"), None), (1000, 1001));
        assert_eq!(c(Some("alice"), Some("wheel")), (1000, 10));
        assert_eq!(c(Some("nobody-here"), None), (0, 0));
        assert_eq!(c(Some("alice"), Some("nobody-here")), (1000, 1001));
        assert_eq!(c(Some("7"), Some("8")), (7, 8));
        assert_eq!(c(None, Some("wheel")), (0, 10));
        let r = |s: &str| resolve_user(tmp.path(), s);
        assert_eq!(r("").expect("empty"), Identity::default());
        assert_eq!(
            r("alice").expect("alice"),
            Identity {
                uid: 1000,
                gid: 1001,
                additional_gids: vec![10]
            }
        );
        assert_eq!(r("1000").expect("uid").gid, 1001);
        assert_eq!(
            r("2000").expect("unknown uid"),
            Identity {
                uid: 2000,
                gid: 0,
                additional_gids: vec![]
            }
        );
        assert_eq!(
            r("alice:wheel").expect("group"),
            Identity {
                uid: 1000,
                gid: 10,
                additional_gids: vec![]
            }
        );
        assert_eq!(
            r("5:6").expect("ids"),
            Identity {
                uid: 5,
                gid: 6,
                additional_gids: vec![]
            }
        );
        assert!(r("bob").is_err());
    }
}
