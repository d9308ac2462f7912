//! Byte-level mutation shared by every target: bit flips, token insertion,
//! deletion, duplication, splices of other corpus entries, interesting values.

/// xorshift64*: enough randomness for mutation, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    /// True one time in `n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Values that break length, count and index arithmetic, as text.
pub const INTERESTING_TEXT: &[&[u8]] = &[
    b"0",
    b"-1",
    b"1",
    b"255",
    b"256",
    b"65535",
    b"2147483647",
    b"-2147483648",
    b"4294967295",
    b"4294967296",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"18446744073709551615",
    b"99999999999999999999999",
    b"1e308",
    b"NaN",
];

/// Values that break length, count and index arithmetic, as raw bytes
/// (protobuf varints, big-endian and octal tar numbers).
pub const INTERESTING_BYTES: &[&[u8]] = &[
    &[0x00],
    &[0xff],
    &[0x7f],
    &[0x80],
    &[0xff, 0xff, 0xff, 0xff, 0x0f],
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
    &[
        0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01,
    ],
    b"77777777777",
    &[
        0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ],
    &[
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ],
];

/// One round of 1..=8 byte-level mutations of `input`, with `tokens` and
/// splices of `others` (other corpus entries); the result is cut to `max_len`.
pub fn mutate_bytes(
    rng: &mut Rng,
    input: &mut Vec<u8>,
    tokens: &[&[u8]],
    others: &[Vec<u8>],
    max_len: usize,
) {
    for _ in 0..=rng.below(8) {
        let len = input.len();
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 | 2 if !tokens.is_empty() => {
                let tok = *rng.pick(tokens);
                let at = rng.below(len + 1);
                input.splice(at..at, tok.iter().copied());
            }
            3 if len > 0 => {
                let at = rng.below(len);
                let n = rng.below((len - at).min(16) + 1);
                input.drain(at..at + n);
            }
            4 if len > 0 => {
                let a = rng.below(len);
                let b = a + rng.below((len - a).min(64) + 1);
                let chunk = input[a..b].to_vec();
                let at = rng.below(input.len() + 1);
                input.splice(at..at, chunk);
            }
            5 if !others.is_empty() => {
                let other = rng.pick(others);
                if !other.is_empty() {
                    let at = rng.below(len + 1);
                    let from = rng.below(other.len());
                    let to = from + rng.below(other.len() - from + 1);
                    if rng.one_in(2) {
                        // crossover: our head, their tail
                        input.truncate(at);
                        input.extend_from_slice(&other[from..]);
                    } else {
                        input.splice(at..at, other[from..to].iter().copied());
                    }
                }
            }
            6 => {
                let v = if rng.one_in(2) {
                    *rng.pick(INTERESTING_TEXT)
                } else {
                    *rng.pick(INTERESTING_BYTES)
                };
                let at = rng.below(len + 1);
                if rng.one_in(2) && at < len {
                    // overwrite
                    let end = (at + v.len()).min(len);
                    input.splice(at..end, v.iter().copied());
                } else {
                    input.splice(at..at, v.iter().copied());
                }
            }
            7 if len > 1 => {
                let i = rng.below(len);
                input[i] = input[i].wrapping_add(rng.below(3) as u8).wrapping_sub(1);
            }
            8 if len > 0 => {
                // repeat a byte run: long names, deep nesting
                let i = rng.below(len);
                let b = input[i];
                let n = 1 + rng.below(256);
                input.splice(i..i, std::iter::repeat_n(b, n));
            }
            _ => {
                let b = (rng.next() & 0xff) as u8;
                let at = rng.below(len + 1);
                input.insert(at, b);
            }
        }
    }
    input.truncate(max_len);
}
