//! Content digests of trees: what makes two local-source snapshots the same
//! for the cache. Covers paths, file types, permission bits, owners, sizes,
//! file contents and symlink targets; not timestamps.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// `sha256:<hex>` over every entry under `root`, in sorted order.
pub fn tree(root: &Path) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    for entry in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let entry = entry.map_err(|e| {
            let path = e.path().map(Path::to_path_buf).unwrap_or_else(|| root.to_path_buf());
            Error::io("walk", path)(e.into_io_error().unwrap_or_else(|| std::io::Error::other("walk loop")))
        })?;
        let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
        let md = entry.path().symlink_metadata().map_err(Error::io("stat", entry.path()))?;
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update([0]);
        h.update(format!("{:o} {} {} {}", md.mode(), md.uid(), md.gid(), if md.is_file() { md.len() } else { 0 }).as_bytes());
        h.update([0]);
        if md.file_type().is_symlink() {
            let t = std::fs::read_link(entry.path()).map_err(Error::io("readlink", entry.path()))?;
            h.update(t.as_os_str().as_encoded_bytes());
        } else if md.is_file() {
            let mut f = std::fs::File::open(entry.path()).map_err(Error::io("open", entry.path()))?;
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
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

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
