//! Resolving paths inside a root directory without ever leaving it, like
//! `openat2(RESOLVE_IN_ROOT)` / Go's securejoin: symlinks are followed one component at a
//! time, absolute link targets are taken relative to the root, and `..` stops at the root.

use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

const MAX_SYMLINKS: usize = 255;

/// Resolves `path` (absolute or relative to the root) inside `root`.
/// A symlink in the last component is followed only when `follow_final` is set.
/// Missing components are kept literally, so the result may not exist yet.
pub fn resolve(root: &Path, path: &str, follow_final: bool) -> io::Result<PathBuf> {
    let mut resolved: Vec<OsString> = Vec::new();
    let mut pending: Vec<OsString> = components(Path::new(path));
    pending.reverse(); // pop() takes the next component
    let mut links = 0;
    while let Some(comp) = pending.pop() {
        if comp == ".." {
            resolved.pop();
            continue;
        }
        let candidate = join(root, &resolved).join(&comp);
        let is_last = pending.is_empty();
        match std::fs::symlink_metadata(&candidate) {
            Ok(md) if md.file_type().is_symlink() && (!is_last || follow_final) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::other(format!(
                        "too many symlinks resolving {path}"
                    )));
                }
                let target = std::fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                let mut more = components(&target);
                more.reverse();
                pending.extend(more);
            }
            _ => resolved.push(comp),
        }
    }
    Ok(join(root, &resolved))
}

/// The path of `resolved` relative to `root` as an absolute in-root path ("/a/b").
pub fn in_root_display(root: &Path, resolved: &Path) -> String {
    match resolved.strip_prefix(root) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => resolved.display().to_string(),
    }
}

fn components(p: &Path) -> Vec<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

fn join(root: &Path, parts: &[OsString]) -> PathBuf {
    let mut p = root.to_path_buf();
    for c in parts {
        p.push(c);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn dotdot_and_symlinks_stay_inside_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        symlink("/etc", root.join("abs")).expect("symlink");
        symlink("../../../../..", root.join("a/up")).expect("symlink");
        symlink("b", root.join("a/rel")).expect("symlink");
        let r = |p: &str, f: bool| resolve(&root, p, f).expect("resolve");
        assert_eq!(r("../../etc/passwd", true), root.join("etc/passwd"));
        assert_eq!(r("/abs/passwd", true), root.join("etc/passwd"));
        assert_eq!(r("/a/up/x", true), root.join("x"));
        assert_eq!(r("a/rel/c", true), root.join("a/b/c"));
        assert_eq!(r("a/rel", false), root.join("a/rel"));
        assert_eq!(r("a/rel", true), root.join("a/b"));
        assert_eq!(r("/", true), root);
    }

    #[test]
    fn symlink_loops_fail() {
        let tmp = tempfile::tempdir().expect("tempdir");
        symlink("loop", tmp.path().join("loop")).expect("symlink");
        assert!(resolve(tmp.path(), "loop/x", true).is_err());
    }
}
