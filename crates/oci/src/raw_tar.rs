//! Layer tars written raw, for tests of what an untrusted layer can do: names and link names
//! go into the header as given, so `..`, absolute names and entries below symlinks survive
//! (the `tar` crate's own `append_path` refuses them). Only with the `raw-tar` feature.

/// One entry of a raw tar; names and link targets are at most 100 bytes.
pub enum RawEntry<'a> {
    /// A directory and its mode.
    Dir(&'a str, u32),
    /// A regular file: name, contents, mode and owner (uid and gid alike).
    File(&'a str, &'a [u8], u32, u64),
    /// A symlink and its target.
    Symlink(&'a str, &'a str),
    /// A hardlink and the entry it links to.
    Hardlink(&'a str, &'a str),
}

/// A tar of `entries` in order, every one with mtime 1000000 and owner 0 unless it says.
pub fn raw_tar(entries: &[RawEntry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o777);
        h.set_uid(0);
        h.set_gid(0);
        let (name, data): (&str, &[u8]) = match e {
            RawEntry::Dir(n, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                (n, b"")
            }
            RawEntry::File(n, d, mode, uid) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*uid);
                (n, d)
            }
            RawEntry::Symlink(n, t) | RawEntry::Hardlink(n, t) => {
                h.set_entry_type(if matches!(e, RawEntry::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
                (n, b"")
            }
        };
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mtime(1_000_000);
        h.set_cksum();
        b.append(&h, data)
            .expect("appending to a tar in memory cannot fail");
    }
    b.into_inner()
        .expect("finishing a tar in memory cannot fail")
}
