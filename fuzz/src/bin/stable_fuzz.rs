//! A libFuzzer-free fuzz loop for the stable toolchain: mutates a corpus of
//! Dockerfile snippets (byte flips, splices of Dockerfile tokens, truncation)
//! and feeds every input to [`kiln_dockerfile_fuzz::exercise`] until the time
//! budget runs out. A panic aborts the run and leaves the input in
//! `crash-<n>.dockerfile` in the current directory.
//!
//! Usage: `stable_fuzz SECONDS [SEED]`.

use std::time::{Duration, Instant};

const SEEDS: &[&str] = &[
    "FROM busybox\nRUN echo hi\n",
    "# syntax=docker/dockerfile:1\n# escape=`\nFROM busybox AS a\nRUN echo `\n  hi\n",
    "ARG BASE=busybox\nFROM ${BASE:-x} AS b\nENV A=1 B=\"two words\" C=${A:+set}\nLABEL \"k\"='v'\n",
    "FROM scratch\nCOPY --from=0 --chown=1:2 --chmod=0755 a* /b/\nADD --checksum=sha256:00 http://x/y /z\n",
    "FROM busybox\nRUN <<EOF cat\nline $A\nEOF\nCOPY <<-\"EOT\" /f\n\tx\n\tEOT\n",
    "FROM busybox\nRUN --mount=type=cache,target=/c,id=x,sharing=locked --network=none [\"sh\",\"-c\",\"x\"]\n",
    "FROM busybox\nHEALTHCHECK --interval=5s CMD [\"true\"]\nONBUILD RUN x\nSHELL [\"/bin/sh\",\"-c\"]\nEXPOSE 80/tcp ${P}\nVOLUME [\"/v\"]\n",
    "FROM busybox\nENV a b c\nUSER 1:1\nWORKDIR rel\nSTOPSIGNAL SIGKILL\nCMD x\nENTRYPOINT [\"y\"]\n",
    "FROM busybox\nRUN echo \\\n# comment\n  more \\\n\n  end\n",
];

const TOKENS: &[&str] = &[
    "\n", " ", "\\", "`", "\\\n", "`\n", "$", "${", "}", ":-", ":+", "-", "+", ":?", "?", "'", "\"",
    "<<", "<<-", "EOF", "\"EOF\"", "'EOF'", "#", "# escape=`\n", "# syntax=x\n", "[", "]", ",",
    "=", "--", "--from=", "--mount=", "FROM ", "RUN ", "COPY ", "ADD ", "ENV ", "ARG ", "ONBUILD ",
    "HEALTHCHECK ", "CMD ", "\t", "\r\n", "é", "\u{0}", "${A:-${B:+$C}}", "\\$", "AS ",
];

/// xorshift64*: enough randomness for mutation, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    for _ in 0..=rng.below(8) {
        let len = input.len();
        match rng.below(6) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 => {
                let tok = TOKENS[rng.below(TOKENS.len())].as_bytes();
                let at = rng.below(len + 1);
                input.splice(at..at, tok.iter().copied());
            }
            2 if len > 0 => {
                let at = rng.below(len);
                let n = rng.below((len - at).min(16) + 1);
                input.drain(at..at + n);
            }
            3 if len > 0 => {
                let a = rng.below(len);
                let b = a + rng.below((len - a).min(32) + 1);
                let chunk = input[a..b].to_vec();
                let at = rng.below(input.len() + 1);
                input.splice(at..at, chunk);
            }
            4 => {
                let other = SEEDS[rng.below(SEEDS.len())].as_bytes();
                let at = rng.below(len + 1);
                let from = rng.below(other.len());
                input.splice(at..at, other[from..].iter().copied());
            }
            _ => {
                let b = (rng.next() & 0xff) as u8;
                let at = rng.below(len + 1);
                input.insert(at, b);
            }
        }
    }
    input.truncate(4096);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(0x9E37_79B9_7F4A_7C15);
    let mut rng = Rng(seed | 1);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut corpus: Vec<Vec<u8>> = SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect();
    let mut runs: u64 = 0;
    let mut current = Vec::new();
    std::panic::set_hook(Box::new(|_| {}));
    while Instant::now() < deadline {
        for _ in 0..1000 {
            current.clear();
            current.extend_from_slice(&corpus[rng.below(corpus.len())]);
            mutate(&mut rng, &mut current);
            let input = current.clone();
            if std::panic::catch_unwind(|| kiln_dockerfile_fuzz::exercise(&input)).is_err() {
                let name = format!("crash-{runs}.dockerfile");
                let _ = std::fs::write(&name, &current);
                let _ = std::panic::take_hook();
                eprintln!("panic after {runs} inputs; input saved to {name}");
                // Re-run with the default hook so the panic message is printed.
                kiln_dockerfile_fuzz::exercise(&current);
                std::process::exit(1);
            }
            runs += 1;
            // Keep some mutated inputs so mutations compound.
            if rng.below(64) == 0 {
                if corpus.len() < 512 {
                    corpus.push(current.clone());
                } else {
                    let i = rng.below(corpus.len());
                    corpus[i] = current.clone();
                }
            }
        }
    }
    println!("ok: {runs} inputs in {secs}s, no panic (seed {seed})");
}
