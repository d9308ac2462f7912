//! Tar seeds and a tar-aware mutator (header fields with a fixed checksum),
//! shared by the `layer` and `untar` targets.

use std::io::{Read, Write};

use crate::{Rng, mutate};

/// A raw entry: names are written byte for byte, so `..` and absolute names survive.
pub struct E<'a> {
    pub kind: u8,
    pub name: &'a str,
    pub link: &'a str,
    pub data: &'a [u8],
    pub mode: u32,
}

pub fn entry<'a>(kind: u8, name: &'a str, link: &'a str, data: &'a [u8]) -> E<'a> {
    E {
        kind,
        name,
        link,
        data,
        mode: if kind == b'5' { 0o755 } else { 0o644 },
    }
}

fn octal(field: &mut [u8], v: u64) {
    let w = field.len() - 1;
    let s = format!("{v:0w$o}");
    let s = &s.as_bytes()[s.len().saturating_sub(w)..];
    field[..s.len()].copy_from_slice(s);
    field[w] = 0;
}

/// Sets a ustar header's checksum field from its bytes.
pub fn fix_checksum(h: &mut [u8]) {
    h[148..156].fill(b' ');
    let sum: u64 = h[..512].iter().map(|&b| b as u64).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
}

fn header(e: &E) -> [u8; 512] {
    let mut h = [0u8; 512];
    let n = e.name.len().min(100);
    h[..n].copy_from_slice(&e.name.as_bytes()[..n]);
    octal(&mut h[100..108], e.mode as u64);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], e.data.len() as u64);
    octal(&mut h[136..148], 1_600_000_000);
    h[156] = e.kind;
    let l = e.link.len().min(100);
    h[157..157 + l].copy_from_slice(&e.link.as_bytes()[..l]);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    fix_checksum(&mut h);
    h
}

/// A tar of `entries` (two zero blocks at the end).
pub fn tar(entries: &[E]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(&header(e));
        out.extend_from_slice(e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// A pax extended header entry carrying `records` (`key=value`), then `e`.
pub fn with_pax(records: &[(&str, &[u8])], e: E) -> Vec<E<'static>> {
    let mut body = Vec::new();
    for (k, v) in records {
        let rest = format!(" {k}=").len() + v.len() + 1;
        let mut len = rest + 1;
        while len.to_string().len() + rest != len {
            len += 1;
        }
        body.extend_from_slice(format!("{len} {k}=").as_bytes());
        body.extend_from_slice(v);
        body.push(b'\n');
    }
    let body: &'static [u8] = Box::leak(body.into_boxed_slice());
    let name: &'static str = Box::leak(e.name.to_string().into_boxed_str());
    let link: &'static str = Box::leak(e.link.to_string().into_boxed_str());
    let data: &'static [u8] = Box::leak(e.data.to_vec().into_boxed_slice());
    vec![
        entry(b'x', "PaxHeaders/x", "", body),
        E {
            kind: e.kind,
            name,
            link,
            data,
            mode: e.mode,
        },
    ]
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 1).expect("zstd")
}

/// Layer-like tars: plain ones, whiteouts, and every escape we know of.
pub fn seeds() -> Vec<Vec<u8>> {
    let f = |n: &'static str| entry(b'0', n, "", b"hello\n");
    let d = |n: &'static str| entry(b'5', n, "", b"");
    let sym = |n: &'static str, t: &'static str| entry(b'2', n, t, b"");
    let hard = |n: &'static str, t: &'static str| entry(b'1', n, t, b"");
    let mut out = vec![
        tar(&[
            d("etc/"),
            f("etc/hosts"),
            sym("etc/l", "hosts"),
            hard("etc/h", "etc/hosts"),
        ]),
        tar(&[
            f("./a"),
            entry(b'0', ".wh.a", "", b""),
            d("x/"),
            f("x/.wh..wh..opq"),
            f("x/y"),
        ]),
        tar(&[f(".wh.dir"), f("dir/.wh.file"), f(".wh..wh..opq")]),
        tar(&[f("../escape"), f("/abs"), f("a/../../b")]),
        tar(&[sym("s", "/tmp/kiln-fuzz-outside"), f("s/victim")]),
        tar(&[sym("s", "../sibling"), f("s/victim"), d("s/dir/x")]),
        tar(&[f("link/victim")]),
        tar(&[f("abs/dir/new"), hard("h", "abs/victim")]),
        tar(&[
            hard("h", "../sibling/victim"),
            hard("h2", "/tmp/kiln-fuzz-outside/victim"),
        ]),
        tar(&[
            hard("h", "victim"),
            hard("h3", "rel_victim"),
            hard("h4", "dir/up/sibling/victim"),
        ]),
        tar(&[sym("victim", "x"), f("victim")]),
        tar(&[d("dir/up/x/"), f("dir/up/sibling/new")]),
        tar(&[
            entry(b'3', "dev", "", b""),
            entry(b'4', "blk", "", b""),
            entry(b'6', "fifo", "", b""),
        ]),
        tar(&[
            f(".wh.link"),
            f(".wh.abs"),
            f("link/.wh.victim"),
            f("abs/.wh..wh..opq"),
        ]),
        tar(&[f(".wh.."), f(".wh."), f("dir/.wh..")]),
        tar(&[
            d("dir"),
            sym("dir", "/tmp/kiln-fuzz-outside"),
            f("dir/victim"),
        ]),
    ];
    out.push(tar(&with_pax(
        &[("path", b"pax/../../escape"), ("SCHILY.xattr.user.x", b"v")],
        f("plain"),
    )));
    out.push(tar(&with_pax(
        &[("linkpath", b"/tmp/kiln-fuzz-outside/victim")],
        hard("hl", "x"),
    )));
    out.push(tar(&with_pax(
        &[("SCHILY.xattr.trusted.overlay.opaque", b"y")],
        d("o/"),
    )));
    // GNU long name
    let long = "d/".repeat(80) + "file";
    let long: &'static str = Box::leak(long.into_boxed_str());
    out.push(tar(&[
        entry(b'L', "././@LongLink", "", long.as_bytes()),
        f("short"),
    ]));
    let first = out[0].clone();
    out.push(gzip(&first));
    out.push(zstd(&first));
    out
}

/// Offsets of the headers in a tar (up to the first zero block or the end),
/// and where the entries end.
fn headers(t: &[u8]) -> (Vec<usize>, usize) {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 512 <= t.len() && out.len() < 256 {
        let h = &t[off..off + 512];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        out.push(off);
        let size = std::str::from_utf8(&h[124..136])
            .ok()
            .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' '))
            .and_then(|s| u64::from_str_radix(s, 8).ok())
            .unwrap_or(0);
        let Some(next) = size
            .checked_add(511)
            .map(|s| s / 512 * 512)
            .and_then(|s| s.checked_add(512))
            .and_then(|s| s.checked_add(off as u64))
        else {
            break;
        };
        off = next as usize;
    }
    (out, off.min(t.len()))
}

const KINDS: &[u8] = b"01234567xgLKSD\0";

/// Tar-aware mutation: one header field set to a token or number (checksum
/// fixed), an entry added, removed or repeated, or (de)compression.
pub fn mutate_tar(rng: &mut Rng, data: &mut Vec<u8>, tokens: &[&'static [u8]]) {
    // work on the plain tar; compress again afterwards (sometimes)
    let gz = data.starts_with(&[0x1f, 0x8b]);
    let zs = data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
    let mut t = Vec::new();
    if gz {
        let _ = flate2::read::MultiGzDecoder::new(data.as_slice())
            .take(1 << 20)
            .read_to_end(&mut t);
    } else if zs {
        if let Ok(d) = zstd::stream::read::Decoder::new(data.as_slice()) {
            let _ = d.take(1 << 20).read_to_end(&mut t);
        }
    } else {
        t = std::mem::take(data);
    }
    let (hs, end) = headers(&t);
    match rng.below(8) {
        0..=3 if !hs.is_empty() => {
            let off = *rng.pick(&hs);
            let h = &mut t[off..off + 512];
            let (start, len) = *rng.pick(&[
                (0usize, 100usize),
                (100, 8),
                (108, 8),
                (116, 8),
                (124, 12),
                (136, 12),
                (156, 1),
                (157, 100),
                (257, 8),
                (329, 8),
                (337, 8),
                (345, 155),
            ]);
            let field = &mut h[start..start + len];
            if len == 1 {
                field[0] = *rng.pick(KINDS);
            } else {
                let v: Vec<u8> = if rng.one_in(2) {
                    let mut s = Vec::new();
                    for _ in 0..=rng.below(3) {
                        s.extend_from_slice(*rng.pick::<&[u8]>(tokens));
                    }
                    s
                } else {
                    rng.pick(mutate::INTERESTING_BYTES).to_vec()
                };
                if rng.one_in(2) {
                    field.fill(0);
                }
                let n = v.len().min(len);
                field[..n].copy_from_slice(&v[..n]);
            }
            if !rng.one_in(16) {
                fix_checksum(h);
            }
        }
        4 => {
            // a new entry at a header boundary
            let name = String::from_utf8_lossy(*rng.pick::<&[u8]>(tokens)).into_owned()
                + &String::from_utf8_lossy(*rng.pick::<&[u8]>(tokens));
            let link = String::from_utf8_lossy(*rng.pick::<&[u8]>(tokens)).into_owned();
            let kind = *rng.pick(KINDS);
            let e = tar(&[entry(kind, &name, &link, b"x\n")]);
            let e = &e[..e.len() - 1024];
            let at = if hs.is_empty() || rng.one_in(2) {
                end / 512 * 512
            } else {
                *rng.pick(&hs)
            };
            t.splice(at..at, e.iter().copied());
        }
        5 if hs.len() > 1 => {
            let k = rng.below(hs.len());
            let end = hs.get(k + 1).copied().unwrap_or(t.len());
            let chunk: Vec<u8> = t[hs[k]..end].to_vec();
            if rng.one_in(2) {
                t.drain(hs[k]..end);
            } else {
                let at = *rng.pick(&hs);
                t.splice(at..at, chunk);
            }
        }
        _ => mutate::mutate_bytes(rng, &mut t, tokens, &[], 256 * 1024),
    }
    *data = match rng.below(16) {
        0 => gzip(&t),
        1 => zstd(&t),
        _ if gz && rng.below(4) != 0 => gzip(&t),
        _ if zs && rng.below(4) != 0 => zstd(&t),
        _ => t,
    };
}
