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

/// The gzip level when none is asked for. BuildKit uses Go's `DefaultCompression` (6).
/// kiln deflates with libdeflate, whose level 4 makes smaller blobs than zlib-rs's level 4
/// (on a tar of /usr: 0.334 of the input against 0.343) for about 10% less CPU in this
/// encoder; level 2 saves only 5% more and makes repetitive text blobs bigger.
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
                let enc = zstd_encoder(blob, options.effective_level(), threads()).map_err(err)?;
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

/// A zstd encoder on `threads` worker threads (at least one). zstd's multi-threaded mode
/// cuts the input into jobs by the level's job size alone, so its output is the same for
/// any number of workers; it differs from the single-threaded mode's, which is never used.
fn zstd_encoder<W: Write>(
    w: W,
    level: i32,
    threads: usize,
) -> io::Result<zstd::stream::write::Encoder<'static, W>> {
    let mut enc = zstd::stream::write::Encoder::new(w, level)?;
    enc.multithread(u32::try_from(threads.max(1)).unwrap_or(1))?;
    Ok(enc)
}

/// Input bytes per independently compressed gzip block.
const GZ_BLOCK: usize = 1 << 20;

/// A gzip writer that deflates fixed-size blocks on worker threads, as pigz does.
///
/// Each block is deflated by libdeflate into a raw deflate stream ended by a sync flush
/// (byte aligned, not final; see [`deflate_block`]); the blocks are written in order,
/// followed by an empty final block and the gzip trailer: one gzip member. Block boundaries
/// depend only on the input, so the output is the same on any number of cores.
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
    /// Twice as many blocks in flight as there are cores.
    pub fn new(inner: W, level: u32) -> Self {
        Self::with_threads(inner, level, threads() * 2)
    }

    /// At most `threads` blocks deflated at once (the output does not depend on it).
    pub fn with_threads(inner: W, level: u32, threads: usize) -> Self {
        ParallelGzEncoder {
            inner,
            level: level.min(9),
            block: Vec::with_capacity(GZ_BLOCK),
            inflight: VecDeque::new(),
            max_inflight: threads.max(1),
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
///
/// libdeflate compresses whole buffers into complete streams, whose last block is final;
/// the block's stream is walked to that last block ([`final_block`]), its final bit cleared
/// and an empty stored block appended, which is what zlib's sync flush ends a block with.
fn deflate_block(input: &[u8], level: u32) -> io::Result<Vec<u8>> {
    if level == 0 || looks_incompressible(input) {
        return Ok(stored_blocks(input));
    }
    let level = i32::try_from(level).unwrap_or(6);
    let mut scratch = Scratch::take(level)?;
    let result = scratch.deflate(input);
    scratch.give_back();
    result
}

/// What deflating a block needs besides its input, kept for the next block (each block runs
/// on a thread of its own): a compressor for one level, the output buffer libdeflate writes
/// into (zeroed once, not per block) and the walk's Huffman tables.
struct Scratch {
    level: i32,
    compressor: libdeflater::Compressor,
    out: Vec<u8>,
    lit: Huffman,
    dist: Huffman,
}

/// Idle [`Scratch`]es; at most [`SCRATCH_KEPT`] are kept.
static SCRATCH: std::sync::Mutex<Vec<Scratch>> = std::sync::Mutex::new(Vec::new());
const SCRATCH_KEPT: usize = 16;

impl Scratch {
    fn take(level: i32) -> io::Result<Scratch> {
        {
            let mut pool = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = pool.iter().position(|s| s.level == level) {
                return Ok(pool.swap_remove(i));
            }
        }
        let lvl = libdeflater::CompressionLvl::new(level)
            .map_err(|e| io::Error::other(format!("deflate level {level}: {e:?}")))?;
        Ok(Scratch {
            level,
            compressor: libdeflater::Compressor::new(lvl),
            out: Vec::new(),
            lit: Huffman::empty(),
            dist: Huffman::empty(),
        })
    }

    fn give_back(self) {
        let mut pool = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < SCRATCH_KEPT {
            pool.push(self);
        }
    }

    /// `input` as raw deflate ending with a sync flush (see [`deflate_block`]).
    fn deflate(&mut self, input: &[u8]) -> io::Result<Vec<u8>> {
        let bound = self.compressor.deflate_compress_bound(input.len()) + 8;
        if self.out.len() < bound {
            self.out.resize(bound, 0);
        }
        let n = self
            .compressor
            .deflate_compress(input, &mut self.out)
            .map_err(|e| io::Error::other(format!("deflate: {e:?}")))?;
        let (header, end) = walk_to_final_block(&self.out[..n], &mut self.lit, &mut self.dist)?;
        let mut out = Vec::with_capacity(n + 8);
        out.extend_from_slice(&self.out[..n]);
        Ok(sync_flushed(out, header, end))
    }
}

/// The complete deflate stream `out`, whose final block starts at bit `header` and ends at
/// bit `end`, made not final and ended by an empty stored block (byte aligned).
fn sync_flushed(mut out: Vec<u8>, header: usize, end: usize) -> Vec<u8> {
    out[header / 8] &= !(1u8 << (header % 8));
    if !end.is_multiple_of(8) {
        out[end / 8] &= (1u8 << (end % 8)) - 1;
    }
    // an empty stored block: three zero header bits from `end`, padding, LEN 0, NLEN !0
    out.resize((end + 3).div_ceil(8), 0);
    out.extend_from_slice(&[0, 0, 0xff, 0xff]);
    out
}

/// A bit reader over a raw deflate stream, least significant bit first, holding up to 64
/// bits at a time; reads past the end see zeros (callers check [`Bits::past_end`]).
struct Bits<'a> {
    data: &'a [u8],
    /// the next byte to load
    next: usize,
    buf: u64,
    /// valid bits in `buf`
    n: u32,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8]) -> Self {
        Bits {
            data,
            next: 0,
            buf: 0,
            n: 0,
        }
    }

    /// The position of the next unread bit.
    fn pos(&self) -> usize {
        self.next * 8 - self.n as usize
    }

    /// At least 56 bits in `buf`.
    fn refill(&mut self) {
        if self.n > 56 {
            return;
        }
        if let Some(b) = self.data.get(self.next..self.next + 8) {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            // the bytes past the counted ones land where the next refill puts them again
            self.buf |= u64::from_le_bytes(a) << self.n;
            let take = (63 - self.n) / 8;
            self.next += take as usize;
            self.n += take * 8;
        } else {
            while self.n <= 56 {
                let b = self.data.get(self.next).copied().unwrap_or(0);
                self.buf |= u64::from(b) << self.n;
                self.next += 1;
                self.n += 8;
            }
        }
    }

    /// Drop `k` bits (at most what `buf` holds).
    fn consume(&mut self, k: u32) {
        self.buf >>= k;
        self.n -= k;
    }

    /// The next `k` (at most 32) bits.
    fn read(&mut self, k: u32) -> u64 {
        self.refill();
        let v = self.buf & ((1u64 << k) - 1);
        self.consume(k);
        v
    }

    /// Skip `bits`, then make the reader hold bits again.
    fn skip(&mut self, bits: usize) {
        let target = self.pos() + bits;
        self.next = target / 8;
        self.buf = 0;
        self.n = 0;
        self.refill();
        self.consume((target % 8) as u32);
    }

    fn past_end(&self) -> bool {
        self.pos() > self.data.len() * 8
    }
}

/// A canonical Huffman code as a table indexed by the next `mask` input bits: each entry
/// is `symbol << 8 | extra bits << 4 | length`, 0 where no code matches.
struct Huffman {
    mask: u64,
    table: Vec<u32>,
}

fn bad_deflate(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("deflate stream: {what}"),
    )
}

impl Huffman {
    fn empty() -> Huffman {
        Huffman {
            mask: 1,
            table: vec![0; 2],
        }
    }

    /// Build the code of `lengths`; `extra(symbol)` is the number of extra bits that
    /// follow the symbol.
    fn build(&mut self, lengths: &[u8], extra: impl Fn(usize) -> u32) -> io::Result<()> {
        let bits = u32::from(lengths.iter().copied().max().unwrap_or(0)).max(1);
        if bits > 15 {
            return Err(bad_deflate("code longer than 15 bits"));
        }
        let mut count = [0u32; 16];
        for &l in lengths {
            count[usize::from(l)] += 1;
        }
        count[0] = 0;
        let mut next = [0u32; 16];
        let mut code = 0u32;
        for len in 1..16 {
            code = (code + count[len - 1]) << 1;
            next[len] = code;
        }
        let size = 1usize << bits;
        self.mask = (size - 1) as u64;
        self.table.clear();
        self.table.resize(size, 0);
        for (sym, &len) in lengths.iter().enumerate() {
            if len == 0 {
                continue;
            }
            let len = u32::from(len);
            let code = next[len as usize];
            next[len as usize] += 1;
            if code >= 1 << len {
                return Err(bad_deflate("oversubscribed code"));
            }
            let rev = (code.reverse_bits() >> (32 - len)) as usize;
            let entry = ((sym as u32) << 8) | (extra(sym) << 4) | len;
            let mut i = rev;
            while i < size {
                self.table[i] = entry;
                i += 1 << len;
            }
        }
        Ok(())
    }

    /// The next symbol's entry, its code consumed; `r` holds at least 15 bits.
    fn decode(&self, r: &mut Bits) -> io::Result<u32> {
        let e = self
            .table
            .get((r.buf & self.mask) as usize)
            .copied()
            .unwrap_or(0);
        if e & 15 == 0 {
            return Err(bad_deflate("no such code"));
        }
        r.consume(e & 15);
        Ok(e)
    }
}

/// Extra bits of a literal/length symbol (257..=285 are lengths).
fn length_extra(sym: usize) -> u32 {
    match sym {
        265..=284 => ((sym - 261) / 4) as u32,
        _ => 0,
    }
}

/// Extra bits of a distance symbol.
fn distance_extra(sym: usize) -> u32 {
    match sym {
        4..=29 => (sym / 2 - 1) as u32,
        _ => 0,
    }
}

/// The order code length code lengths are sent in.
const CLEN_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// Skip the symbols of one Huffman-coded block, up to and with its end-of-block code.
fn skip_symbols(r: &mut Bits, lit: &Huffman, dist: &Huffman) -> io::Result<()> {
    loop {
        if r.next > r.data.len() + 8 {
            return Err(bad_deflate("truncated block"));
        }
        // 56 bits: a length code, its extra bits, a distance code and its extra bits
        r.refill();
        let e = lit.decode(r)?;
        let sym = e >> 8;
        if sym < 256 {
            continue;
        }
        if sym == 256 {
            return Ok(());
        }
        if sym > 285 {
            return Err(bad_deflate("bad length symbol"));
        }
        r.consume((e >> 4) & 15);
        let d = dist.decode(r)?;
        if d >> 8 >= 30 {
            return Err(bad_deflate("bad distance symbol"));
        }
        r.consume((d >> 4) & 15);
    }
}

/// Read a dynamic block's code lengths and build its codes into `lit` and `dist`.
fn dynamic_codes(r: &mut Bits, lit: &mut Huffman, dist: &mut Huffman) -> io::Result<()> {
    let hlit = r.read(5) as usize + 257;
    let hdist = r.read(5) as usize + 1;
    let hclen = r.read(4) as usize + 4;
    let mut clen = [0u8; 19];
    for &i in &CLEN_ORDER[..hclen] {
        clen[i] = r.read(3) as u8;
    }
    // the code length code goes in `dist` until the lengths are read
    dist.build(&clen, |_| 0)?;
    let mut lengths = Vec::with_capacity(hlit + hdist + 138);
    while lengths.len() < hlit + hdist {
        if r.past_end() {
            return Err(bad_deflate("truncated code lengths"));
        }
        r.refill();
        match dist.decode(r)? >> 8 {
            l @ 0..=15 => lengths.push(l as u8),
            16 => {
                let prev = *lengths
                    .last()
                    .ok_or_else(|| bad_deflate("repeat without a length"))?;
                let n = 3 + r.read(2) as usize;
                lengths.extend(std::iter::repeat_n(prev, n));
            }
            17 => {
                let n = 3 + r.read(3) as usize;
                lengths.extend(std::iter::repeat_n(0, n));
            }
            _ => {
                let n = 11 + r.read(7) as usize;
                lengths.extend(std::iter::repeat_n(0, n));
            }
        }
    }
    if lengths.len() != hlit + hdist {
        return Err(bad_deflate("code lengths overrun"));
    }
    lit.build(&lengths[..hlit], length_extra)?;
    dist.build(&lengths[hlit..], distance_extra)
}

/// Where the final block of the complete raw deflate stream `data` starts and where it
/// ends, in bits from the start.
#[cfg(test)]
fn final_block(data: &[u8]) -> io::Result<(usize, usize)> {
    walk_to_final_block(data, &mut Huffman::empty(), &mut Huffman::empty())
}

/// [`final_block`] with the tables to build the codes in.
fn walk_to_final_block(
    data: &[u8],
    lit: &mut Huffman,
    dist: &mut Huffman,
) -> io::Result<(usize, usize)> {
    let mut r = Bits::new(data);
    loop {
        let header = r.pos();
        let last = r.read(1) == 1;
        match r.read(2) {
            0 => {
                let pad = r.pos().next_multiple_of(8) - r.pos();
                r.skip(pad);
                let len = r.read(16);
                let nlen = r.read(16);
                if len != !nlen & 0xffff {
                    return Err(bad_deflate("stored length mismatch"));
                }
                r.skip(len as usize * 8);
            }
            1 => {
                let mut fixed = [8u8; 288];
                fixed[144..256].fill(9);
                fixed[256..280].fill(7);
                lit.build(&fixed, length_extra)?;
                dist.build(&[5u8; 30], distance_extra)?;
                skip_symbols(&mut r, lit, dist)?;
            }
            2 => {
                dynamic_codes(&mut r, lit, dist)?;
                skip_symbols(&mut r, lit, dist)?;
            }
            _ => return Err(bad_deflate("reserved block type")),
        }
        if r.past_end() {
            return Err(bad_deflate("truncated"));
        }
        if last {
            return Ok((header, r.pos()));
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
            let mut enc =
                zstd_encoder(counted, options.effective_level(), threads()).map_err(err)?;
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

    /// Compress `data` with `threads` threads as a layer blob would be.
    fn compressed_with(
        data: &[u8],
        compression: Compression,
        level: i32,
        threads: usize,
    ) -> Vec<u8> {
        match compression {
            Compression::Gzip => {
                let level = u32::try_from(level).expect("level");
                let mut gz = ParallelGzEncoder::with_threads(Vec::new(), level, threads);
                for chunk in data.chunks(100_003) {
                    gz.write_all(chunk).expect("write");
                }
                gz.finish().expect("finish")
            }
            Compression::Zstd => {
                let mut enc = zstd_encoder(Vec::new(), level, threads).expect("zstd");
                for chunk in data.chunks(100_003) {
                    enc.write_all(chunk).expect("write");
                }
                enc.finish().expect("finish")
            }
            Compression::Uncompressed => data.to_vec(),
        }
    }

    #[test]
    fn same_bytes_on_one_thread_and_many_and_standard_decoders_read_them() {
        // text, random and zeros, over many gzip blocks and several zstd jobs
        let mut data = sample(GZ_BLOCK * 6 + 4321);
        data.extend(std::iter::repeat_n(0u8, GZ_BLOCK * 2));
        data.extend_from_slice(&sample(GZ_BLOCK * 2)[..GZ_BLOCK]);
        for level in [1, 4, 6, 9] {
            let one = compressed_with(&data, Compression::Gzip, level, 1);
            for threads in [2, 4, 8] {
                assert!(
                    compressed_with(&data, Compression::Gzip, level, threads) == one,
                    "gzip level {level}: the same bytes on 1 and {threads} threads"
                );
            }
            assert_gunzips_to(&one, &data);
        }
        for level in [1, 3, 9] {
            let one = compressed_with(&data, Compression::Zstd, level, 1);
            for threads in [2, 4] {
                assert!(
                    compressed_with(&data, Compression::Zstd, level, threads) == one,
                    "zstd level {level}: the same bytes on 1 and {threads} threads"
                );
            }
            let plain = zstd::stream::decode_all(one.as_slice()).expect("zstd -d");
            assert!(plain == data, "zstd level {level} round trip");
            if Path::new("/usr/bin/zstd").exists() {
                let dir = tempfile::tempdir().expect("tempdir");
                let p = dir.path().join("x.zst");
                fs::write(&p, &one).expect("write");
                let out = std::process::Command::new("/usr/bin/zstd")
                    .arg("-dc")
                    .arg(&p)
                    .output()
                    .expect("zstd");
                assert!(
                    out.status.success() && out.stdout == data,
                    "zstd -dc reads it"
                );
            }
        }
    }

    #[test]
    fn deflated_blocks_are_sync_flushed_not_final() {
        // every kind of block libdeflate makes: tiny (fixed codes), text (dynamic), long
        let text = sample(GZ_BLOCK)[GZ_BLOCK / 2..].to_vec();
        for input in [&b"a"[..], b"abcabcabcabcabc", &text, &sample(GZ_BLOCK)] {
            for level in [1, 6, 9] {
                let raw = deflate_block(input, level).expect("deflate");
                assert!(raw.ends_with(&[0, 0, 0xff, 0xff]), "ends with a sync flush");
                // not final: a raw inflater needs more after it; add a final empty block
                let mut whole = raw.clone();
                whole.extend_from_slice(&[0x03, 0x00]);
                let mut plain = Vec::new();
                flate2::read::DeflateDecoder::new(whole.as_slice())
                    .read_to_end(&mut plain)
                    .expect("inflate");
                assert!(plain == input, "level {level}, {} bytes", input.len());
                let (_, end) = final_block(&whole).expect("walk");
                assert_eq!(
                    end.div_ceil(8),
                    whole.len(),
                    "the added block is the final one"
                );
            }
        }
        assert!(final_block(&[0x05, 0xff]).is_err(), "garbage is an error");
        assert!(final_block(&[]).is_err(), "an empty stream is an error");
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
