//! Rootless mode: kilnd run by an ordinary user as the mapped root of a user namespace
//! (`rootlesskit kilnd --rootless`).
//!
//! Root inside maps to the user, and ids 1.. to the user's subordinate ids
//! (`/etc/subuid`, `/etc/subgid`), so files a step chowns land on disk owned by those.
//! What differs from a root worker, and where:
//! - the OCI spec (`runc.rs`): no `/sys` (sysfs cannot be mounted while the daemon shares
//!   the host's network namespace), no cgroups (none are delegated), and every bind mount
//!   repeats the flags the kernel locks on its source's mount ([`locked_mount_flags`]),
//!   since a mount made in a user namespace may not drop them;
//! - the network (`network.rs`): the daemon's own namespace (what rootlesskit was given:
//!   `--net=host`, or slirp4netns/pasta) or none; never the bridge;
//! - overlays are mounted with `userxattr` (`snapshot/overlay.rs`), so an opaque
//!   directory is marked [`overlay_opaque_xattr`]; where the kernel cannot mount
//!   overlayfs in a user namespace, fuse-overlayfs does (`overlay::choose`);
//! - `security.insecure` is refused: the steps would hold no more than kilnd does;
//! - an owner outside the mapped ids fails naming the range ([`kiln_oci::idmap::lchown`]).

use std::path::Path;

pub use kiln_oci::idmap::{IdMap, IdRange};

/// Whether this process runs in a user namespace other than the initial one (read
/// once: a process does not change user namespace).
pub fn in_user_namespace() -> bool {
    static IN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *IN.get_or_init(|| !IdMap::uids().is_initial())
}

/// The xattr marking an opaque directory in an overlay upper: the kernel's
/// `trusted.overlay.opaque`, or in a user namespace, where `trusted.*` is out of reach
/// and overlays are mounted with `userxattr`, `user.overlay.opaque`.
pub fn overlay_opaque_xattr() -> &'static str {
    if crate::snapshot::overlay::backend() == crate::snapshot::overlay::Backend::Fuse {
        "user.fuseoverlayfs.opaque"
    } else if in_user_namespace() {
        "user.overlay.opaque"
    } else {
        "trusted.overlay.opaque"
    }
}

/// Why kilnd cannot run rootless as it was started, or `None` when it can: it must be
/// root (uid 0) in a user namespace of its own.
pub fn start_problem() -> Option<String> {
    let euid = nix::unistd::geteuid().as_raw();
    const HOW: &str = "start it as `rootlesskit --net=host --copy-up=/etc kilnd --rootless` \
        (Debian's rootlesskit and uidmap, with the user's ranges in /etc/subuid and /etc/subgid)";
    if euid != 0 {
        return Some(format!(
            "rootless mode needs kilnd to be the mapped root of a user namespace, but it runs as uid {euid}; {HOW}"
        ));
    }
    if !in_user_namespace() {
        return Some(format!(
            "--rootless was given, but kilnd runs as the host's root (no user namespace); run kilnd without --rootless, or {HOW}"
        ));
    }
    None
}

/// The mount flags of the mount holding `path` that the kernel locks on a mount copied
/// into a user namespace (`nosuid`, `nodev`, `noexec`, `ro` and the atime ones): a bind
/// mount of `path` made there must repeat them or the kernel refuses it.
pub fn locked_mount_flags(path: &Path) -> Vec<&'static str> {
    use nix::sys::statvfs::FsFlags;
    let Ok(st) = nix::sys::statvfs::statvfs(path) else {
        return Vec::new();
    };
    let f = st.flags();
    [
        (FsFlags::ST_RDONLY, "ro"),
        (FsFlags::ST_NOSUID, "nosuid"),
        (FsFlags::ST_NODEV, "nodev"),
        (FsFlags::ST_NOEXEC, "noexec"),
        (FsFlags::ST_NOATIME, "noatime"),
        (FsFlags::ST_NODIRATIME, "nodiratime"),
        (FsFlags::ST_RELATIME, "relatime"),
    ]
    .into_iter()
    .filter(|(flag, _)| f.contains(*flag))
    .map(|(_, name)| name)
    .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tmpfs mounted `nosuid,nodev,noexec` on a temp dir, unmounted on drop.
    pub(crate) struct LockedMount(pub tempfile::TempDir);

    impl LockedMount {
        pub(crate) fn new() -> LockedMount {
            use nix::mount::MsFlags;
            let dir = tempfile::tempdir().expect("tmp");
            nix::mount::mount(
                Some("tmpfs"),
                dir.path(),
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            )
            .expect("mount tmpfs");
            LockedMount(dir)
        }
    }

    impl Drop for LockedMount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn locked_flags_are_read_from_the_mount_of_the_path() {
        let m = LockedMount::new();
        std::fs::write(m.0.path().join("f"), "x").expect("write");
        let f = locked_mount_flags(&m.0.path().join("f"));
        assert!(
            f.contains(&"nosuid") && f.contains(&"nodev") && f.contains(&"noexec"),
            "{f:?}"
        );
        assert!(!f.contains(&"ro"), "{f:?}");
        assert!(locked_mount_flags(Path::new("/nonexistent/x")).is_empty());
    }
}
