//! The source lines a failed build points at, printed as buildctl prints
//! them: the daemon sends them as BuildKit's `errdefs.Source` status details
//! (file, its bytes, the ranges of the failing instruction), and the client
//! shows the ranges marked `>>>` with a few lines of context around them.

use kiln_proto::status::{Details, SourceLocation};

/// The most lines printed of one source (a hostile daemon could send any range).
const MAX_LINES: usize = 50;
/// The most bytes printed of one line.
const MAX_LINE_BYTES: usize = 512;

/// Every source location `status` carries, rendered.
pub fn render_all(status: &tonic::Status) -> Vec<String> {
    Details::of(status)
        .sources
        .iter()
        .filter_map(render)
        .collect()
}

/// BuildKit's `Source.Print`: `FILE:LINE`, a rule, the lines of the ranges
/// marked `>>>` padded with context (two lines around a range, four around a
/// single line), a rule.
pub fn render(s: &SourceLocation) -> Option<String> {
    let text = String::from_utf8_lossy(&s.info.data);
    let lines: Vec<&str> = text.split('\n').collect();
    let line = |p: &Option<kiln_proto::pb::Position>| p.as_ref().map_or(0, |p| p.line);
    let bounds: Vec<(i64, i64)> = s
        .ranges
        .iter()
        .map(|r| {
            let start = i64::from(line(&r.start));
            (start, i64::from(line(&r.end)).max(start))
        })
        .collect();
    let mut start = bounds.iter().map(|b| b.0).min()?;
    let mut end = bounds.iter().map(|b| b.1).max()?;
    let count = lines.len() as i64;
    if start < 1 || start > count {
        return None;
    }
    end = end.min(count);
    let pad = if start == end { 4 } else { 2 };
    let first_line = start;
    let mut p = 0;
    while p < pad {
        if start > 1 {
            start -= 1;
            p += 1;
        }
        if end != count {
            end += 1;
            p += 1;
        }
        p += 1;
    }
    let mut out = format!("{}:{first_line}\n--------------------\n", s.info.filename);
    for (shown, n) in (start..=end).enumerate() {
        if shown == MAX_LINES {
            out.push_str(&format!("     | ... ({} more lines)\n", end - n + 1));
            break;
        }
        let text = lines[(n - 1) as usize];
        let mut cut = text.len().min(MAX_LINE_BYTES);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let marked = bounds.iter().any(|(a, b)| *a <= n && n <= *b);
        let mark = if marked { ">>>" } else { "   " };
        out.push_str(&format!(" {n:>3} | {mark} {}\n", &text[..cut]));
    }
    out.push_str("--------------------");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::pb;

    fn source(data: &str, start: i32, end: i32) -> SourceLocation {
        SourceLocation {
            info: pb::SourceInfo {
                filename: "Dockerfile".into(),
                data: data.as_bytes().to_vec(),
                ..Default::default()
            },
            ranges: vec![pb::Range {
                start: Some(pb::Position {
                    line: start,
                    character: 0,
                }),
                end: Some(pb::Position {
                    line: end,
                    character: 0,
                }),
            }],
        }
    }

    #[test]
    fn prints_like_buildctl() {
        let df = "FROM busybox\nRUN true\nRUN false\nRUN echo\n";
        assert_eq!(
            render(&source(df, 3, 3)).expect("rendered"),
            "Dockerfile:3\n\
             --------------------\n\
             \x20  1 |     FROM busybox\n\
             \x20  2 |     RUN true\n\
             \x20  3 | >>> RUN false\n\
             \x20  4 |     RUN echo\n\
             \x20  5 |     \n\
             --------------------"
        );
    }

    #[test]
    fn hostile_ranges_print_nothing_or_little() {
        let df = "FROM busybox\n".repeat(1000);
        assert!(render(&source(&df, 0, 3)).is_none());
        assert!(render(&source(&df, 5000, 5001)).is_none());
        let long = render(&source(&df, 1, i32::MAX)).expect("rendered");
        assert!(long.lines().count() < MAX_LINES + 5, "{long}");
    }
}
