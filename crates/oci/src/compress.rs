//! Turning an uncompressed layer tar into a (compressed) layer blob: gzip (block-parallel,
//! pigz style), zstd (multi-threaded) or none, streamed, with the diff id and the blob digest
//! computed on the way.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use crate::digest::DigestWriter;
use crate::{Descriptor, Error, media_types};

/// The gzip level when none is asked for. BuildKit uses Go's `DefaultCompression` (6);
/// zlib's level 6 lazy matching runs at a third of level 4's speed for a few percent
/// smaller blobs, so kiln defaults to 4 (`compression-level=6` gives the old ratio).
pub const DEFAULT_GZIP_LEVEL: i32 = 4;

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    Gzip,
    Zstd,
    Uncompressed,
}

impl Compression {
    /// Parse a compression name as used by BuildKit attrs ("gzip", "zstd", "uncompressed").
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "" | "gzip" => Some(Compression::Gzip),
            "zstd" => Some(Compression::Zstd),
            "uncompressed" | "none" => Some(Compression::Uncompressed),
            _ => None,
        }
    }

    /// The attr name of this compression.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Uncompressed => "uncompressed",
        }
    }

    /// The compression a layer media type says its blob has.
    pub fn from_media_type(media_type: &str) -> Self {
        if media_type.ends_with("gzip") {
            Compression::Gzip
        } else if media_type.ends_with("zstd") {
            Compression::Zstd
        } else {
            Compression::Uncompressed
        }
    }

    /// The OCI layer media type of a blob compressed this way.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Compression::Gzip => media_types::OCI_LAYER_GZIP,
            Compression::Zstd => media_types::OCI_LAYER_ZSTD,
            Compression::Uncompressed => media_types::OCI_LAYER,
        }
    }

    /// The Docker layer media type of a blob compressed this way (Docker has no zstd type;
    /// BuildKit uses the OCI one there too).
    pub fn docker_media_type(self) -> &'static str {
        match self {
            Compression::Gzip => media_types::DOCKER_LAYER_GZIP,
            Compression::Zstd => media_types::OCI_LAYER_ZSTD,
            Compression::Uncompressed => media_types::DOCKER_LAYER,
        }
    }

    fn default_level(self) -> i32 {
        match self {
            Compression::Gzip => DEFAULT_GZIP_LEVEL,
            Compression::Zstd => 3,
            Compression::Uncompressed => 0,
        }
    }
}

/// Everything that decides the bytes of a layer blob built from a snapshot diff.
///
/// Travels between services as a short spec string (`LayerOptions::spec`), e.g.
/// `zstd;level=9;force;epoch=1700000000`, and names memoized blobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LayerOptions {
    pub compression: Compression,
    /// Compression level (gzip 0-9, zstd 1-22); `None` = the default (gzip
    /// [`DEFAULT_GZIP_LEVEL`], zstd 3).
    pub level: Option<i32>,
    /// Recompress layers that already have a blob (base image layers) when their
    /// compression differs (`force-compression=true`).
    pub force: bool,
    /// Clamp file mtimes in new layers to this time (`rewrite-timestamp=true` with
    /// `SOURCE_DATE_EPOCH`).
    pub clamp_mtime: Option<u64>,
}

impl LayerOptions {
    pub fn new(compression: Compression) -> Self {
        LayerOptions {
            compression,
            ..Default::default()
        }
    }

    /// The layer options of an image, oci or docker export from its attrs (BuildKit's
    /// names): `compression` (default gzip), `compression-level`, `force-compression`,
    /// and `rewrite-timestamp` with `source-date-epoch` (else the forwarded
    /// `build-arg:SOURCE_DATE_EPOCH`). The error is the key whose value is invalid.
    pub fn from_export_attrs(
        attrs: &std::collections::BTreeMap<String, String>,
    ) -> Result<LayerOptions, String> {
        let name = attrs
            .get("compression")
            .map(String::as_str)
            .unwrap_or("gzip");
        let compression = Compression::from_name(name).ok_or("compression")?;
        let mut o = LayerOptions::new(compression);
        if let Some(l) = attrs.get("compression-level").filter(|l| !l.is_empty()) {
            o.level = Some(l.parse().map_err(|_| "compression-level")?);
        }
        o.force = bool_attr(attrs, "force-compression", false);
        if bool_attr(attrs, "rewrite-timestamp", false) {
            o.clamp_mtime = source_date_epoch(attrs)?;
        }
        // the same validation a worker applies to the spec
        LayerOptions::parse(&o.spec()).map_err(|_| "compression-level")?;
        Ok(o)
    }

    /// The level actually used.
    pub fn effective_level(&self) -> i32 {
        self.level
            .unwrap_or_else(|| self.compression.default_level())
    }

    /// The spec string: the compression name, then `;level=N`, `;force`, `;epoch=N`.
    pub fn spec(&self) -> String {
        let mut s = self.compression.name().to_string();
        if let Some(l) = self.level {
            s.push_str(&format!(";level={l}"));
        }
        if self.force {
            s.push_str(";force");
        }
        if let Some(e) = self.clamp_mtime {
            s.push_str(&format!(";epoch={e}"));
        }
        s
    }

    /// Parse a spec string; a bare compression name ("gzip", "") is a spec too.
    pub fn parse(spec: &str) -> Result<Self, Error> {
        let bad = || Error::InvalidLayerSpec {
            spec: spec.to_string(),
        };
        let mut parts = spec.split(';');
        let compression = Compression::from_name(parts.next().unwrap_or("")).ok_or_else(bad)?;
        let mut o = LayerOptions::new(compression);
        for part in parts {
            match part.split_once('=') {
                Some(("level", v)) => o.level = Some(v.parse().map_err(|_| bad())?),
                Some(("epoch", v)) => o.clamp_mtime = Some(v.parse().map_err(|_| bad())?),
                None if part == "force" => o.force = true,
                _ => return Err(bad()),
            }
        }
        if let Some(l) = o.level {
            let ok = match compression {
                Compression::Gzip => (0..=9).contains(&l),
                Compression::Zstd => (1..=22).contains(&l),
                Compression::Uncompressed => true,
            };
            if !ok {
                return Err(bad());
            }
        }
        Ok(o)
    }
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Compress the uncompressed layer tar at `uncompressed` into a blob.
///
/// When `out` is an existing directory the blob is written there as `<hex>` of its digest,
/// otherwise to the file `out`. Returns the diff id (digest of the uncompressed tar) and the
/// blob's descriptor (OCI media type). Synchronous: async callers use `spawn_blocking`.
pub fn compress_layer(
    uncompressed: &Path,
    out: &Path,
    compression: Compression,
) -> Result<(String, Descriptor), Error> {
    let err = |source: io::Error| Error::CompressLayer {
        path: uncompressed.to_path_buf(),
        source,
    };
    let mut src = File::open(uncompressed).map_err(err)?;
    write_layer_blob(out, &LayerOptions::new(compression), |w| {
        io::copy(&mut src, w).map(|_| ()).map_err(err)
    })
}

/// Recompress a blob (gzip, zstd or plain, detected) with `options`, into `out` as
/// [`compress_layer`] does. The diff id is unchanged by construction and returned.
pub fn recompress_blob(
    blob: &Path,
    out: &Path,
    options: &LayerOptions,
) -> Result<(String, Descriptor), Error> {
    let err = |source: io::Error| Error::CompressLayer {
        path: blob.to_path_buf(),
        source,
    };
    let f = File::open(blob).map_err(err)?;
    let mut plain = crate::layer::decompress(f)?;
    write_layer_blob(out, options, |w| {
        io::copy(&mut plain, w).map(|_| ()).map_err(err)
    })
}

/// Stream an uncompressed layer tar, written by `produce`, into a compressed blob.
///
/// `out` is a directory (blob named by its digest hex, renamed into place when complete) or a
/// file path. The blob is not synced to disk: a caller that records it somewhere durable
/// makes sure it is on disk first, which it can do off its critical path.
/// gzip is block-parallel and zstd multi-threaded over all cores; the output does not depend
/// on the number of cores. Returns (diff id, blob descriptor with the OCI media type).
pub fn write_layer_blob(
    out: &Path,
    options: &LayerOptions,
    produce: impl FnOnce(&mut dyn Write) -> Result<(), Error>,
) -> Result<(String, Descriptor), Error> {
    let err = |source: io::Error| Error::CompressLayer {
        path: out.to_path_buf(),
        source,
    };
    let into_dir = out.is_dir();
    let tmp: PathBuf = if into_dir {
        out.join(format!(
            ".tmp-layer-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ))
    } else {
        out.to_path_buf()
    };
    let result = (|| {
        let file = File::create(&tmp).map_err(err)?;
        let blob = BlobWriter::spawn(file);
        let (blob, diff_id) = match options.compression {
            Compression::Gzip => {
                let level = u32::try_from(options.effective_level()).unwrap_or(6);
                let mut diff = DigestWriter::new(ParallelGzEncoder::new(blob, level));
                produce(&mut diff)?;
                let (gz, diff_id, _) = diff.finish();
                (gz.finish().map_err(err)?, Some(diff_id))
            }
            Compression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(blob, options.effective_level())
                    .map_err(err)?;
                let threads = threads();
                if threads > 1 {
                    enc.multithread(threads as u32).map_err(err)?;
                }
                let mut diff = DigestWriter::new(enc);
                produce(&mut diff)?;
                let (enc, diff_id, _) = diff.finish();
                (enc.finish().map_err(err)?, Some(diff_id))
            }
            Compression::Uncompressed => {
                let mut blob = blob;
                produce(&mut blob)?;
                (blob, None)
            }
        };
        let (file, digest, size) = blob.finish().map_err(err)?;
        let diff_id = diff_id.unwrap_or_else(|| digest.clone());
        drop(file);
        Ok::<_, Error>((digest, size, diff_id))
    })();
    let (digest, size, diff_id) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if into_dir {
        let hex = digest.trim_start_matches("sha256:");
        fs::rename(&tmp, out.join(hex)).map_err(err)?;
    }
    let desc = Descriptor {
        media_type: options.compression.oci_media_type().to_string(),
        digest,
        size,
        ..Default::default()
    };
    Ok((diff_id, desc))
}

/// Bytes handed to the blob writer thread at a time.
const BLOB_CHUNK: usize = 1 << 20;

/// A `Write` handing 1 MiB chunks to a thread that hashes them and writes them to the blob
/// file, so the blob digest and the file writes overlap with compression.
struct BlobWriter {
    buf: Vec<u8>,
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    handle: Option<JoinHandle<io::Result<(File, String, u64)>>>,
}

impl BlobWriter {
    fn spawn(file: File) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let handle = std::thread::spawn(move || {
            let mut w = DigestWriter::new(file);
            for chunk in rx {
                w.write_all(&chunk)?;
            }
            Ok(w.finish())
        });
        BlobWriter {
            buf: Vec::with_capacity(BLOB_CHUNK),
            tx: Some(tx),
            handle: Some(handle),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(BLOB_CHUNK));
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(chunk).is_ok());
        if sent {
            return Ok(());
        }
        // the writer stopped: its error says why
        self.tx = None;
        match self.join() {
            Err(e) => Err(e),
            Ok(_) => Err(io::Error::other("blob writer stopped")),
        }
    }

    fn join(&mut self) -> io::Result<(File, String, u64)> {
        match self.handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| io::Error::other("blob writer thread panicked"))?,
            None => Err(io::Error::other("blob writer already finished")),
        }
    }

    /// Write what is left; returns the file, the blob's digest and size.
    fn finish(mut self) -> io::Result<(File, String, u64)> {
        self.send()?;
        self.tx = None;
        self.join()
    }
}

impl Write for BlobWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(BLOB_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= BLOB_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Input bytes per independently compressed gzip block.
const GZ_BLOCK: usize = 1 << 20;

/// A gzip writer that deflates fixed-size blocks on worker threads, as pigz does.
///
/// Each block is a raw deflate stream ended by a sync flush (byte aligned, not final); the
/// blocks are written in order, followed by an empty final block and the gzip trailer. Block
/// boundaries depend only on the input, so the output is the same on any number of cores.
pub struct ParallelGzEncoder<W: Write> {
    inner: W,
    level: u32,
    block: Vec<u8>,
    inflight: VecDeque<JoinHandle<io::Result<Vec<u8>>>>,
    max_inflight: usize,
    crc: flate2::Crc,
    header_written: bool,
}

impl<W: Write> ParallelGzEncoder<W> {
    pub fn new(inner: W, level: u32) -> Self {
        ParallelGzEncoder {
            inner,
            level: level.min(9),
            block: Vec::with_capacity(GZ_BLOCK),
            inflight: VecDeque::new(),
            max_inflight: threads() * 2,
            crc: flate2::Crc::new(),
            header_written: false,
        }
    }

    fn write_header(&mut self) -> io::Result<()> {
        if !self.header_written {
            // magic, deflate, no flags, mtime 0, no extra flags, OS unknown (as Go writes)
            self.inner
                .write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff])?;
            self.header_written = true;
        }
        Ok(())
    }

    fn drain_one(&mut self) -> io::Result<()> {
        if let Some(h) = self.inflight.pop_front() {
            let data = h
                .join()
                .map_err(|_| io::Error::other("gzip worker thread panicked"))??;
            self.write_header()?;
            self.inner.write_all(&data)?;
        }
        Ok(())
    }

    fn submit_block(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        while self.inflight.len() >= self.max_inflight {
            self.drain_one()?;
        }
        let block = std::mem::replace(&mut self.block, Vec::with_capacity(GZ_BLOCK));
        self.crc.update(&block);
        let level = self.level;
        self.inflight
            .push_back(std::thread::spawn(move || deflate_block(&block, level)));
        Ok(())
    }

    /// Write the remaining blocks and the trailer; returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.submit_block()?;
        while !self.inflight.is_empty() {
            self.drain_one()?;
        }
        self.write_header()?;
        // an empty final block with fixed codes
        self.inner.write_all(&[0x03, 0x00])?;
        self.inner.write_all(&self.crc.sum().to_le_bytes())?;
        self.inner.write_all(&self.crc.amount().to_le_bytes())?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for ParallelGzEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(GZ_BLOCK - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        if self.block.len() >= GZ_BLOCK {
            self.submit_block()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Bytes of each sample [`looks_incompressible`] deflates.
const PROBE_LEN: usize = 16 * 1024;

/// Whether deflate would not shrink `input`: three samples (start, middle, end) deflated at
/// the fastest level come out at 97% of their size or more (random or already compressed
/// data). Depends only on the input, so the blob stays reproducible.
fn looks_incompressible(input: &[u8]) -> bool {
    if input.len() < 4 * PROBE_LEN {
        return false;
    }
    let mid = input.len() / 2 - PROBE_LEN / 2;
    let (mut inn, mut out) = (0usize, 0usize);
    for start in [0, mid, input.len() - PROBE_LEN] {
        let sample = &input[start..start + PROBE_LEN];
        let mut c = flate2::Compress::new(flate2::Compression::fast(), false);
        let mut buf = Vec::with_capacity(PROBE_LEN + PROBE_LEN / 8 + 64);
        if c.compress_vec(sample, &mut buf, flate2::FlushCompress::Finish)
            .is_err()
        {
            return false;
        }
        inn += sample.len();
        out += usize::try_from(c.total_out()).unwrap_or(usize::MAX);
    }
    out >= inn / 100 * 97
}

/// `input` as raw deflate stored blocks (no final bit), starting and ending byte aligned.
fn stored_blocks(input: &[u8]) -> Vec<u8> {
    const MAX: usize = 65535;
    let mut out = Vec::with_capacity(input.len() + input.len() / MAX * 5 + 5);
    for chunk in input.chunks(MAX) {
        let len = chunk.len() as u16;
        out.push(0); // BFINAL=0, BTYPE=00, padded to the byte
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// One block as raw deflate ending byte aligned (a sync flush), stored as is when deflate
/// would not shrink it.
fn deflate_block(input: &[u8], level: u32) -> io::Result<Vec<u8>> {
    if level == 0 || looks_incompressible(input) {
        return Ok(stored_blocks(input));
    }
    let mut c = flate2::Compress::new(flate2::Compression::new(level), false);
    let mut out = Vec::with_capacity(input.len() / 2 + 1024);
    loop {
        if out.capacity() - out.len() < 64 * 1024 {
            out.reserve(256 * 1024);
        }
        let consumed = usize::try_from(c.total_in()).unwrap_or(usize::MAX);
        c.compress_vec(&input[consumed..], &mut out, flate2::FlushCompress::Sync)
            .map_err(io::Error::other)?;
        if c.total_in() as usize == input.len() && out.len() < out.capacity() {
            return Ok(out);
        }
    }
}

/// Compress everything from `r` into `w` the way layer blobs are compressed (benchmarks,
/// tools). Returns the number of compressed bytes.
pub fn compress_stream(
    mut r: impl Read,
    w: impl Write,
    options: &LayerOptions,
) -> Result<u64, Error> {
    let err = |source: io::Error| Error::CompressLayer {
        path: PathBuf::from("<stream>"),
        source,
    };
    let counted = DigestWriter::new(w);
    let counted = match options.compression {
        Compression::Gzip => {
            let level = u32::try_from(options.effective_level()).unwrap_or(6);
            let mut gz = ParallelGzEncoder::new(counted, level);
            io::copy(&mut r, &mut gz).map_err(err)?;
            gz.finish().map_err(err)?
        }
        Compression::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(counted, options.effective_level())
                .map_err(err)?;
            if threads() > 1 {
                enc.multithread(threads() as u32).map_err(err)?;
            }
            io::copy(&mut r, &mut enc).map_err(err)?;
            enc.finish().map_err(err)?
        }
        Compression::Uncompressed => {
            let mut c = counted;
            io::copy(&mut r, &mut c).map_err(err)?;
            c
        }
    };
    Ok(counted.finish().2)
}

/// A boolean export attr: `true`, `1` or empty (present) is true, `false` or `0` false,
/// anything else (or absent) `default`.
pub fn bool_attr(
    attrs: &std::collections::BTreeMap<String, String>,
    key: &str,
    default: bool,
) -> bool {
    match attrs.get(key).map(String::as_str) {
        Some("true" | "1" | "") => true,
        Some("false" | "0") => false,
        _ => default,
    }
}

/// `SOURCE_DATE_EPOCH` of an export: the attr `source-date-epoch`, else the frontend's
/// `build-arg:SOURCE_DATE_EPOCH`. The error is the key whose value is not a number.
pub fn source_date_epoch(
    attrs: &std::collections::BTreeMap<String, String>,
) -> Result<Option<u64>, String> {
    for key in ["source-date-epoch", "build-arg:SOURCE_DATE_EPOCH"] {
        if let Some(v) = attrs.get(key).filter(|v| !v.is_empty()) {
            return v.trim().parse().map(Some).map_err(|_| key.to_string());
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample(len: usize) -> Vec<u8> {
        // half pseudo-random, half text
        let mut v = Vec::with_capacity(len);
        let mut x: u64 = 0x9e3779b97f4a7c15;
        while v.len() < len / 2 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push(x as u8);
        }
        let text = b"the quick brown fox jumps over the lazy dog 0123456789\n";
        while v.len() < len {
            v.push(text[v.len() % text.len()]);
        }
        v
    }

    fn unpack(blob: Vec<u8>) -> Vec<u8> {
        let mut plain = Vec::new();
        crate::layer::decompress(std::io::Cursor::new(blob))
            .expect("detect")
            .read_to_end(&mut plain)
            .expect("decompress");
        plain
    }

    #[test]
    fn gzip_layer_digests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tar_path = dir.path().join("layer.tar");
        let data = b"not really a tar but bytes".repeat(100);
        fs::write(&tar_path, &data).expect("write");
        let blobs = dir.path().join("blobs");
        fs::create_dir(&blobs).expect("mkdir");
        let (diff_id, desc) =
            compress_layer(&tar_path, &blobs, Compression::Gzip).expect("compress");
        assert_eq!(diff_id, crate::digest::sha256(&data));
        let blob_path = blobs.join(desc.digest.trim_start_matches("sha256:"));
        let blob = fs::read(&blob_path).expect("blob");
        assert_eq!(desc.size, blob.len() as u64);
        assert_eq!(desc.digest, crate::digest::sha256(&blob));
        assert_eq!(desc.media_type, media_types::OCI_LAYER_GZIP);
        assert_eq!(unpack(blob), data);
        assert_eq!(
            fs::read_dir(&blobs).expect("ls").count(),
            1,
            "no temp files left"
        );

        let (diff_id2, desc2) = compress_layer(
            &tar_path,
            &dir.path().join("u.blob"),
            Compression::Uncompressed,
        )
        .expect("uncompressed");
        assert_eq!(diff_id2, diff_id);
        assert_eq!(desc2.digest, diff_id);
    }

    #[test]
    fn parallel_gzip_round_trips_through_gunzip_over_many_blocks() {
        let data = sample(GZ_BLOCK * 3 + 12345);
        let mut gz = ParallelGzEncoder::new(Vec::new(), 1);
        for chunk in data.chunks(70_000) {
            gz.write_all(chunk).expect("write");
        }
        let blob = gz.finish().expect("finish");
        assert!(blob.len() < data.len(), "text half compresses");
        // a plain (single-member) gzip decoder reads it: it is one member, not several
        assert_gunzips_to(&blob, &data);
        // deterministic
        let mut again = ParallelGzEncoder::new(Vec::new(), 1);
        again.write_all(&data).expect("write");
        assert_eq!(again.finish().expect("finish"), blob);
        // empty input is a valid empty gzip
        let empty = ParallelGzEncoder::new(Vec::new(), 6)
            .finish()
            .expect("empty");
        assert_eq!(unpack(empty), Vec::<u8>::new());
    }

    /// `blob` is one gzip stream of `data` for a single-member decoder and for GNU gzip
    /// (`gzip -t` accepts it, `gzip -dc` gives `data` back).
    fn assert_gunzips_to(blob: &[u8], data: &[u8]) {
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(blob)
            .read_to_end(&mut plain)
            .expect("gunzip");
        assert_eq!(plain, data);
        if Path::new("/usr/bin/gzip").exists() {
            let dir = tempfile::tempdir().expect("tempdir");
            let p = dir.path().join("x.gz");
            fs::write(&p, blob).expect("write");
            let gzip = |flag: &str| {
                std::process::Command::new("/usr/bin/gzip")
                    .arg(flag)
                    .arg(&p)
                    .output()
                    .expect("gzip")
            };
            assert!(gzip("-t").status.success(), "gzip -t accepts the stream");
            let out = gzip("-dc");
            assert!(out.status.success(), "gzip reads it");
            assert_eq!(out.stdout, data);
        }
    }

    #[test]
    fn incompressible_blocks_are_stored_and_still_valid_gzip() {
        // random data: every block stored, a few bytes of framing per 64 KiB
        let mut data = sample(GZ_BLOCK * 4);
        data.truncate(GZ_BLOCK * 2);
        data.extend_from_slice(&sample(GZ_BLOCK * 2)[GZ_BLOCK..]); // then text
        let mut gz = ParallelGzEncoder::new(Vec::new(), 6);
        gz.write_all(&data).expect("write");
        let blob = gz.finish().expect("finish");
        let random_half = GZ_BLOCK * 2;
        assert!(
            blob.len() < random_half + random_half / 65535 * 5 + 1024 + GZ_BLOCK / 4,
            "random blocks stored without expansion: {}",
            blob.len()
        );
        assert!(looks_incompressible(&data[..GZ_BLOCK]));
        assert!(!looks_incompressible(
            &data[random_half..random_half + GZ_BLOCK]
        ));
        assert_gunzips_to(&blob, &data);
        // same input, same bytes
        let mut again = ParallelGzEncoder::new(Vec::new(), 6);
        again.write_all(&data).expect("write");
        assert_eq!(again.finish().expect("finish"), blob);
    }

    #[test]
    fn zstd_blob_with_level_and_spec_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = sample(3 << 20);
        let opts = LayerOptions::parse("zstd;level=9").expect("spec");
        assert_eq!(opts.compression, Compression::Zstd);
        assert_eq!(opts.effective_level(), 9);
        let (diff_id, desc) = write_layer_blob(dir.path(), &opts, |w| {
            w.write_all(&data).map_err(|source| Error::CompressLayer {
                path: PathBuf::new(),
                source,
            })
        })
        .expect("zstd");
        assert_eq!(diff_id, crate::digest::sha256(&data));
        assert_eq!(desc.media_type, media_types::OCI_LAYER_ZSTD);
        let blob_path = dir.path().join(&desc.digest[7..]);
        let blob = fs::read(&blob_path).expect("blob");
        assert!(blob.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]));
        assert_eq!(unpack(blob), data);

        // force-recompress the zstd blob to gzip: same diff id, gzip media type
        let gz_dir = dir.path().join("gz");
        fs::create_dir(&gz_dir).expect("mkdir");
        let (diff2, desc2) =
            recompress_blob(&blob_path, &gz_dir, &LayerOptions::new(Compression::Gzip))
                .expect("recompress");
        assert_eq!(diff2, diff_id);
        assert_eq!(desc2.media_type, media_types::OCI_LAYER_GZIP);

        let full = LayerOptions {
            compression: Compression::Gzip,
            level: Some(1),
            force: true,
            clamp_mtime: Some(1_700_000_000),
        };
        assert_eq!(full.spec(), "gzip;level=1;force;epoch=1700000000");
        assert_eq!(LayerOptions::parse(&full.spec()).expect("parse"), full);
        assert_eq!(
            LayerOptions::parse("").expect("empty"),
            LayerOptions::default()
        );
        for bad in [
            "brotli",
            "gzip;level=10",
            "zstd;level=0",
            "gzip;what",
            "gzip;epoch=x",
        ] {
            assert!(LayerOptions::parse(bad).is_err(), "{bad}");
        }
    }
}
