//! Content digests of trees: what makes two local-source snapshots the same
//! for the cache, and what an op reading only some paths of its input
//! depends on ([`paths`]). Covers paths, file types, permission bits,
//! owners, sizes, file contents and symlink targets; not timestamps.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// `sha256:<hex>` over every entry under `root`, in sorted order.
pub fn tree(root: &Path) -> Result<String> {
    let mut h = Sha256::new();
    hash_tree(&mut h, root, 1)?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// A path an op reads inside a root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    /// absolute, or relative to the root
    pub path: String,
    /// expand `*`, `?` and `[...]` in each component
    pub wildcard: bool,
    /// follow a symlink in the last component
    pub follow_links: bool,
}

/// `sha256:<hex>` over what `selectors` reach under `root`: per selector,
/// the matched paths (a wildcard's expansion, in sorted order) and for each
/// the entry itself and everything below it (type, mode, owner, size,
/// content, symlink target; not mtime). A missing path counts as missing,
/// so creating it changes the digest. Never leaves `root`.
pub fn paths(root: &Path, selectors: &[Selector]) -> Result<String> {
    let mut h = Sha256::new();
    for sel in selectors {
        let full = if sel.path.starts_with('/') {
            sel.path.clone()
        } else {
            format!("/{}", sel.path)
        };
        h.update(b"selector\0");
        h.update(full.as_bytes());
        h.update([0, sel.wildcard as u8, sel.follow_links as u8]);
        let matches = if sel.wildcard && has_glob(&full) {
            glob(root, &full)?
        } else {
            vec![full]
        };
        for m in matches {
            h.update(b"match\0");
            h.update(m.as_bytes());
            h.update([0]);
            let p = crate::rootpath::resolve(root, &m, sel.follow_links)
                .map_err(Error::io("resolve", &m))?;
            match p.symlink_metadata() {
                Ok(_) => hash_tree(&mut h, &p, 0)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => h.update(b"missing\0"),
                Err(e) => return Err(Error::io("stat", &p)(e)),
            }
        }
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Expands a wildcard path inside `root` one component at a time (as the
/// file op's copy does); returns in-root absolute paths, sorted.
fn glob(root: &Path, pattern: &str) -> Result<Vec<String>> {
    let mut bases = vec![String::new()];
    for comp in pattern.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if !has_glob(comp) {
            bases = bases.into_iter().map(|b| format!("{b}/{comp}")).collect();
            continue;
        }
        let m = globset::GlobBuilder::new(comp)
            .literal_separator(true)
            .build()
            .map_err(|e| Error::InvalidOp(format!("checksum pattern {pattern:?}: {e}")))?
            .compile_matcher();
        let mut next = Vec::new();
        for b in &bases {
            let dir = crate::rootpath::resolve(root, if b.is_empty() { "/" } else { b }, true)
                .map_err(Error::io("resolve", b))?;
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut names: Vec<String> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| m.is_match(n))
                .collect();
            names.sort();
            next.extend(names.into_iter().map(|n| format!("{b}/{n}")));
        }
        bases = next;
    }
    let mut out: Vec<String> = bases
        .into_iter()
        .map(|b| if b.is_empty() { "/".to_string() } else { b })
        .collect();
    out.sort();
    Ok(out)
}

/// Feeds every entry at and below `root` (from `min_depth`) into `h`.
fn hash_tree(h: &mut Sha256, root: &Path, min_depth: usize) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    for entry in walkdir::WalkDir::new(root)
        .min_depth(min_depth)
        .follow_root_links(false)
        .sort_by_file_name()
    {
        let entry = entry.map_err(|e| {
            let path = e
                .path()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| root.to_path_buf());
            Error::io("walk", path)(
                e.into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("walk loop")),
            )
        })?;
        let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
        let md = entry
            .path()
            .symlink_metadata()
            .map_err(Error::io("stat", entry.path()))?;
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update([0]);
        h.update(
            format!(
                "{:o} {} {} {}",
                md.mode(),
                md.uid(),
                md.gid(),
                if md.is_file() { md.len() } else { 0 }
            )
            .as_bytes(),
        );
        h.update([0]);
        if md.file_type().is_symlink() {
            let t =
                std::fs::read_link(entry.path()).map_err(Error::io("readlink", entry.path()))?;
            h.update(t.as_os_str().as_encoded_bytes());
        } else if md.is_file() {
            let mut f =
                std::fs::File::open(entry.path()).map_err(Error::io("open", entry.path()))?;
            loop {
                let n = f.read(&mut buf).map_err(Error::io("read", entry.path()))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
        h.update([0xff]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(path: &str, wildcard: bool) -> Selector {
        Selector {
            path: path.into(),
            wildcard,
            follow_links: true,
        }
    }

    #[test]
    fn paths_digest_covers_only_the_selected_paths() {
        use std::os::unix::fs::PermissionsExt;
        let a = tempfile::tempdir().expect("tmp");
        let write = |p: &str, s: &str| std::fs::write(a.path().join(p), s).expect("write");
        write("a.txt", "a");
        write("b.txt", "b");
        write("c.md", "c");
        let one = |s: &[Selector]| paths(a.path(), s).expect("checksum");
        let k = one(&[sel("/a.txt", false)]);
        let kw = one(&[sel("*.txt", true)]);
        // another file changes: the digest of a.txt stays
        write("c.md", "changed");
        assert_eq!(one(&[sel("/a.txt", false)]), k);
        assert_eq!(one(&[sel("*.txt", true)]), kw);
        // same content rewritten (new mtime): unchanged
        write("a.txt", "a");
        assert_eq!(
            one(&[sel("a.txt", false)]),
            k,
            "relative and absolute paths agree"
        );
        // mode change: changed
        std::fs::set_permissions(
            a.path().join("a.txt"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        let k2 = one(&[sel("/a.txt", false)]);
        assert_ne!(k2, k);
        // a new match of the wildcard: changed
        write("d.txt", "d");
        assert_ne!(one(&[sel("*.txt", true)]), kw);
        // a symlink counts by its target unless followed
        std::os::unix::fs::symlink("a.txt", a.path().join("l")).expect("symlink");
        let nofollow = Selector {
            path: "/l".into(),
            wildcard: false,
            follow_links: false,
        };
        assert_eq!(one(&[sel("/l", false)]), one(&[sel("/l", false)]));
        assert_ne!(
            one(std::slice::from_ref(&nofollow)),
            one(&[sel("/a.txt", false)])
        );
        // a missing path has a digest, and creating it changes it
        let missing = one(&[sel("/nope", false)]);
        write("nope", "");
        assert_ne!(one(&[sel("/nope", false)]), missing);
        // paths cannot escape the root: the link resolves inside it
        std::os::unix::fs::symlink("/../../etc/hostname", a.path().join("esc")).expect("symlink");
        let outside = one(&[sel("/esc", false)]);
        std::fs::create_dir(a.path().join("etc")).expect("mkdir");
        write("etc/hostname", "inside");
        assert_ne!(
            one(&[sel("/esc", false)]),
            outside,
            "reads <root>/etc/hostname"
        );
    }

    #[test]
    fn content_not_mtime_decides() {
        let a = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(a.path().join("d")).expect("mkdir");
        std::fs::write(a.path().join("d/f"), "one").expect("write");
        let k1 = tree(a.path()).expect("hash");
        // touching (same content) keeps the key
        std::fs::write(a.path().join("d/f"), "one").expect("write");
        assert_eq!(tree(a.path()).expect("hash"), k1);
        // a content change changes it
        std::fs::write(a.path().join("d/f"), "two").expect("write");
        assert_ne!(tree(a.path()).expect("hash"), k1);
        // so does a new file
        std::fs::write(a.path().join("d/f"), "one").expect("write");
        std::fs::write(a.path().join("g"), "").expect("write");
        assert_ne!(tree(a.path()).expect("hash"), k1);
    }
}
