//! `dockerignore`: `.dockerignore` files and the paths they are matched against.
//!
//! The input is the ignore file, a line `---`, then one path a line. The
//! patterns go through `kiln_dockerfile::parse_dockerignore` and every
//! matcher kiln builds from them: the frontend's `IgnoreMatcher` (which
//! tells a user a COPY source is excluded), the client's file sender filter
//! (`kiln_session::filesync::Filter`, as excludes and as includes; each path
//! is matched against each, as a file and as a dir) and the worker's copy
//! filter (`worker_executor::fscopy::Filter`, built only: its matching is
//! reached through copies).

use crate::Target;

pub fn target() -> Target {
    Target {
        name: "dockerignore",
        about: ".dockerignore: parse_dockerignore, IgnoreMatcher, the file sender's Filter, the worker's copy Filter",
        run,
        seeds: || {
            vec![b"*.md\n!README.md\n**/*.tmp\n/logs/\n---\nREADME.md\na/b.tmp\nlogs/x\n".to_vec()]
        },
        tokens: TOKENS,
        mutate: None,
        max_len: 4096,
    }
}

const TOKENS: &[&[u8]] = &[
    b"\n",
    b"\n---\n",
    b"*",
    b"**",
    b"**/",
    b"/**",
    b"?",
    b"[",
    b"]",
    b"[!",
    b"[^",
    b"[a-z]",
    b"\\",
    b"!",
    b"#",
    b"/",
    b"./",
    b"../",
    b"..",
    b".",
    b"{",
    b"}",
    b",",
    b"{a,b}",
    b" ",
    b"\t",
    b"\r",
    b"\xef\xbb\xbf",
    b"a",
    b"a/b/c",
    b"**/**/**/**/**/**/**/**/**/**/**/**/x",
    b"*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b",
    b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
];

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (ignore, paths) = text.split_once("\n---\n").unwrap_or((&text, ""));
    let patterns = kiln_dockerfile::parse_dockerignore(ignore);
    let matcher = kiln_dockerfile::IgnoreMatcher::new(&patterns);
    let sender = kiln_session::filesync::Filter::new(&[], &patterns).ok();
    let includes = kiln_session::filesync::Filter::new(&patterns, &[]).ok();
    // COPY --exclude and include patterns reach the worker's copy filter
    let _ = worker_executor::fscopy::Filter::new(&patterns, &patterns);
    for path in paths.split('\n') {
        let _ = matcher.excluded(path);
        let _ = matcher.may_reinclude_below(path);
        for is_dir in [false, true] {
            if let Some(f) = &sender {
                let _ = f.matches(path, is_dir);
            }
            if let Some(f) = &includes {
                let _ = f.matches(path, is_dir);
            }
        }
    }
}
