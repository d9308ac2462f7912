//! sha256 content digests, the one place kiln computes and checks them:
//! `sha256:<64 lowercase hex>` strings of byte slices and of streams being
//! written or read, and the strict check every digest from outside (a
//! manifest, a client, an LLB definition) passes before it names a file.

use std::io::{self, Write};

use sha2::{Digest as _, Sha256};

/// "sha256:<hex>" of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The 64 lowercase hex characters of the sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The hex part of a "sha256:<hex>" digest, checked to be 64 lowercase hex chars.
pub fn hex_part(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hex)
}

/// A sha256 digest computed piece by piece, with the byte count, for
/// streams read in chunks (a blob downloading, a layer being written).
#[derive(Clone, Default)]
pub struct Hasher {
    sha: Sha256,
    size: u64,
}

impl Hasher {
    pub fn new() -> Self {
        Hasher::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.size += bytes.len() as u64;
    }

    /// Bytes hashed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The "sha256:<hex>" digest of everything hashed.
    pub fn finish(self) -> String {
        format!("sha256:{}", hex::encode(self.sha.finalize()))
    }
}

/// Write adapter that hashes (sha256) and counts everything written through it.
pub struct DigestWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W> DigestWriter<W> {
    pub fn new(inner: W) -> Self {
        DigestWriter {
            inner,
            hasher: Hasher::new(),
        }
    }

    /// Returns the inner writer, the "sha256:<hex>" digest and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        let size = self.hasher.size();
        (self.inner, self.hasher.finish(), size)
    }
}

impl<W: Write> Write for DigestWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Read adapter that hashes (sha256) and counts everything read through it.
pub struct DigestReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: io::Read> DigestReader<R> {
    pub fn new(inner: R) -> Self {
        DigestReader {
            inner,
            hasher: Hasher::new(),
        }
    }

    /// Reads what is left of the stream, then returns the "sha256:<hex>" digest and
    /// the byte count of all of it.
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        let size = self.hasher.size();
        Ok((self.hasher.finish(), size))
    }
}

impl<R: io::Read> io::Read for DigestReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_writer_hashes_and_counts() {
        let mut w = DigestWriter::new(Vec::new());
        w.write_all(b"hello ").expect("write");
        w.write_all(b"world").expect("write");
        let (inner, digest, size) = w.finish();
        assert_eq!(inner, b"hello world");
        assert_eq!(size, 11);
        assert_eq!(
            digest,
            "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        assert_eq!(digest, sha256(b"hello world"));
        assert!(hex_part(&digest).is_some());
        assert!(hex_part("sha256:../../etc").is_none());
    }

    #[test]
    fn digest_reader_hashes_what_was_read_and_the_rest() {
        let mut r = DigestReader::new(&b"hello world"[..]);
        let mut head = [0u8; 5];
        io::Read::read_exact(&mut r, &mut head).expect("read");
        assert_eq!(&head, b"hello");
        let (digest, size) = r.finish().expect("finish");
        assert_eq!(size, 11);
        assert_eq!(digest, sha256(b"hello world"));
    }
}
