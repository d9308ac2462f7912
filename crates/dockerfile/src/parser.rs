//! Line-level parsing: parser directives, comments, continuation lines,
//! instruction keywords, leading `--flags` and heredoc bodies. The result is a
//! flat list of [`Node`]s; typing them is `instructions.rs`'s job.

use crate::Error;

/// Parser directives from the top of the file (`# syntax=`, `# escape=`, `# check=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directives {
    pub syntax: Option<String>,
    /// The line of the `# syntax=` directive (0 when there is none).
    pub syntax_line: usize,
    /// The escape character: `\` (default) or `` ` ``.
    pub escape: char,
    pub check: Option<String>,
}

impl Default for Directives {
    fn default() -> Self {
        Directives {
            syntax: None,
            syntax_line: 0,
            escape: '\\',
            check: None,
        }
    }
}

/// A here-document attached to a RUN/COPY/ADD line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter word (`EOF` in `<<EOF`), quotes removed.
    pub name: String,
    /// The body exactly as written, one `\n` after every line.
    pub data: String,
    /// False when the delimiter was quoted (`<<"EOF"`, `<<'EOF'`): no expansion.
    pub expand: bool,
    /// `<<-EOF`: leading tabs are stripped from body lines.
    pub chomp: bool,
}

impl Heredoc {
    /// The body with `<<-` tab stripping applied.
    pub fn content(&self) -> String {
        if !self.chomp {
            return self.data.clone();
        }
        let mut out = String::with_capacity(self.data.len());
        for line in self.data.split_inclusive('\n') {
            out.push_str(line.trim_start_matches('\t'));
        }
        out
    }
}

/// One instruction as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The instruction keyword, lowercased (`run`, `copy`, ...).
    pub keyword: String,
    /// The keyword as written (for error messages).
    pub keyword_original: String,
    /// Leading `--name[=value]` words with quotes removed, in order.
    pub flags: Vec<String>,
    /// Everything after the keyword and flags, trimmed.
    pub args: String,
    /// The logical line (continuations joined, heredoc bodies excluded).
    pub original: String,
    pub heredocs: Vec<Heredoc>,
    /// 1-based first line of the instruction.
    pub start_line: usize,
    /// 1-based last line (including continuation lines and heredoc bodies).
    pub end_line: usize,
    /// The comment lines above the instruction (after the previous one), as
    /// BuildKit keeps them: `#` and the line's first character dropped,
    /// trimmed; a `#` line with no text starts the list over; blank lines
    /// and parser directives are not in it, nor comments between continuation
    /// lines.
    pub comments: Vec<String>,
}

/// A parsed Dockerfile before typing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ast {
    pub directives: Directives,
    pub nodes: Vec<Node>,
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

fn is_blank(line: &str) -> bool {
    line.trim().is_empty()
}

/// If `line` ends with the escape char followed only by spaces/tabs, return it
/// without that tail. As in BuildKit, an escaped escape (`\\` at the end) is
/// not a continuation.
fn strip_continuation(line: &str, escape: char) -> Option<&str> {
    let trimmed = line.trim_end_matches([' ', '\t']);
    trimmed
        .strip_suffix(escape)
        .filter(|rest| !rest.ends_with(escape))
}

/// Parses `# key=value`; None when the line is not directive-shaped.
fn parse_directive(line: &str) -> Option<(String, String)> {
    let rest = line.trim_start().strip_prefix('#')?;
    let (key, value) = rest.split_once('=')?;
    let key = key.trim();
    // BuildKit's directive pattern needs a value: `# escape=` is a comment.
    if value.is_empty()
        || key.is_empty()
        || !key.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        || !key.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return None;
    }
    Some((key.to_ascii_lowercase(), value.trim().to_string()))
}

/// The parser directives at the top of a Dockerfile (`# syntax=`, `# escape=`,
/// `# check=`), read without parsing the rest, as a frontend is chosen before
/// the Dockerfile is parsed.
pub fn parse_directives(src: &str) -> Result<Directives, Error> {
    let lines: Vec<&str> = src
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    directives_of(&lines, false).map(|(d, _)| d)
}

/// The directives as BuildKit reads them to pick a frontend (`DetectSyntax`):
/// never an error, a repeated directive ends them and an invalid escape token
/// is left for the frontend to report.
pub fn detect_directives(src: &str) -> Directives {
    let lines: Vec<&str> = src
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    match directives_of(&lines, true) {
        Ok((d, _)) => d,
        Err(_) => Directives::default(),
    }
}

/// The directives of `lines` and how many lines they take.
fn directives_of(lines: &[&str], lenient: bool) -> Result<(Directives, usize), Error> {
    let mut directives = Directives::default();
    let mut i = 0;
    // Directives: only at the very top; the first other line ends them.
    let mut seen: Vec<String> = Vec::new();
    while i < lines.len() {
        let Some((key, value)) = parse_directive(lines[i]) else {
            break;
        };
        let line = i + 1;
        match key.as_str() {
            "syntax" | "escape" | "check" => {}
            _ => break,
        }
        if seen.contains(&key) {
            if lenient {
                break;
            }
            return Err(Error::InvalidDirective {
                line,
                name: key.clone(),
                reason: format!("only one {key} parser directive can be used"),
            });
        }
        match key.as_str() {
            "syntax" => {
                directives.syntax = Some(value);
                directives.syntax_line = line;
            }
            "check" => directives.check = Some(value),
            _ => {
                directives.escape = match value.as_str() {
                    "\\" => '\\',
                    "`" => '`',
                    _ if lenient => directives.escape,
                    _ => {
                        return Err(Error::InvalidDirective {
                            line,
                            name: key.clone(),
                            reason: format!(
                                "invalid escape token '{value}' does not match ` or \\"
                            ),
                        });
                    }
                }
            }
        }
        seen.push(key);
        i += 1;
    }
    Ok((directives, i))
}

/// Parses `src` into directives and nodes.
pub fn parse_ast(src: &str) -> Result<Ast, Error> {
    let lines: Vec<&str> = src
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let (directives, mut i) = directives_of(&lines, false)?;

    let escape = directives.escape;
    let mut nodes = Vec::new();
    let mut comments: Vec<String> = Vec::new();
    while i < lines.len() {
        let first = lines[i];
        if is_comment(first) {
            // BuildKit drops the line's first byte, not the `#` (the same
            // unless the line is indented)
            let text = first.char_indices().nth(1).map_or("", |(n, _)| &first[n..]);
            let text = text.trim();
            if text.is_empty() {
                comments.clear();
            } else {
                comments.push(text.to_string());
            }
        }
        if is_blank(first) || is_comment(first) {
            i += 1;
            continue;
        }
        let start_line = i + 1;
        let mut end_line = start_line;
        let mut logical = String::new();
        let first = first.trim_start();
        match strip_continuation(first, escape) {
            Some(head) => {
                logical.push_str(head);
                i += 1;
                // Continuation: comments and blank lines are skipped.
                while let Some(line) = lines.get(i) {
                    if is_comment(line) || is_blank(line) {
                        i += 1;
                        continue;
                    }
                    end_line = i + 1;
                    i += 1;
                    match strip_continuation(line, escape) {
                        Some(part) => logical.push_str(part),
                        None => {
                            logical.push_str(line);
                            break;
                        }
                    }
                }
            }
            None => {
                logical.push_str(first);
                i += 1;
            }
        }
        let logical = logical.trim().to_string();
        if logical.is_empty() {
            continue;
        }
        let (keyword_original, rest) = match logical.find(char::is_whitespace) {
            Some(pos) => (&logical[..pos], logical[pos..].trim_start()),
            None => (logical.as_str(), ""),
        };
        let keyword = keyword_original.to_ascii_lowercase();
        let (flags, args) = if keyword == "onbuild" {
            (Vec::new(), rest.to_string())
        } else {
            extract_flags(rest)
        };

        let mut heredocs = Vec::new();
        if matches!(keyword.as_str(), "run" | "copy" | "add") {
            for (name, expand, chomp) in heredoc_markers(&args) {
                let mut data = String::new();
                let mut found = false;
                while i < lines.len() {
                    let line = lines[i];
                    i += 1;
                    end_line = i;
                    let cmp = if chomp {
                        line.trim_start_matches('\t')
                    } else {
                        line
                    };
                    if cmp == name {
                        found = true;
                        break;
                    }
                    data.push_str(line);
                    data.push('\n');
                }
                if !found {
                    return Err(Error::UnterminatedHeredoc {
                        line: start_line,
                        delimiter: name,
                    });
                }
                heredocs.push(Heredoc {
                    name,
                    data,
                    expand,
                    chomp,
                });
            }
        }

        nodes.push(Node {
            keyword,
            keyword_original: keyword_original.to_string(),
            flags,
            args,
            original: logical.clone(),
            heredocs,
            start_line,
            end_line,
            comments: std::mem::take(&mut comments),
        });
    }
    Ok(Ast { directives, nodes })
}

/// Splits leading `--flag[=value]` words (quotes removed) off `rest`.
/// A bare `--` ends the flags and is dropped.
fn extract_flags(rest: &str) -> (Vec<String>, String) {
    let mut flags = Vec::new();
    let mut s = rest.trim_start();
    while s.starts_with("--") {
        let mut word = String::new();
        let mut quote: Option<char> = None;
        let mut end = s.len();
        for (idx, c) in s.char_indices() {
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => word.push(c),
                None if c == '"' || c == '\'' => quote = Some(c),
                None if c.is_whitespace() => {
                    end = idx;
                    break;
                }
                None => word.push(c),
            }
        }
        s = s[end..].trim_start();
        if word == "--" {
            break;
        }
        flags.push(word);
    }
    (flags, s.to_string())
}

/// Finds `<<EOF`, `<<-EOF`, `<<"EOF"`, `<<'EOF'` words in order:
/// (name, expand, chomp).
pub(crate) fn heredoc_markers(args: &str) -> Vec<(String, bool, bool)> {
    let mut out = Vec::new();
    for word in args.split_whitespace() {
        if let Some(m) = heredoc_marker(word) {
            out.push(m);
        }
    }
    out
}

/// Parses one word as a heredoc marker; a file descriptor may come first
/// (`3<<EOF`: the shell gives the body to fd 3).
pub(crate) fn heredoc_marker(word: &str) -> Option<(String, bool, bool)> {
    let rest = word
        .trim_start_matches(|c: char| c.is_ascii_digit())
        .strip_prefix("<<")?;
    if rest.starts_with('<') {
        return None;
    }
    let (chomp, rest) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let (name, expand) = if let Some(inner) = rest
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .or_else(|| rest.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')))
    {
        (inner, false)
    } else {
        (rest, true)
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        return None;
    }
    Some((name.to_string(), expand, chomp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heredoc_markers_may_name_a_file_descriptor() {
        assert_eq!(
            heredoc_markers("<<EOF 3<<IN1 4<<-'IN2' awk -f - 2>&1 <<<x"),
            [
                ("EOF".to_string(), true, false),
                ("IN1".to_string(), true, false),
                ("IN2".to_string(), false, true),
            ]
        );
        let ast =
            parse_ast("FROM a\nRUN <<EOF 3<<IN cat - /proc/self/fd/3\nx\nEOF\ny\nIN\nRUN z\n")
                .expect("parse");
        assert_eq!(ast.nodes[1].heredocs.len(), 2);
        assert_eq!(ast.nodes[1].heredocs[1].data, "y\n");
        assert_eq!(ast.nodes[2].args, "z");
    }

    #[test]
    fn lines_flags_and_continuations() {
        let ast = parse_ast(
            "# syntax=docker/dockerfile:1\n\nFROM busybox\n# c\nRUN a \\\n  # inner\n\n  b\ncopy --from=x --chown=\"1:2\" a b\n",
        )
        .expect("parse");
        assert_eq!(
            ast.directives.syntax.as_deref(),
            Some("docker/dockerfile:1")
        );
        assert_eq!(ast.nodes.len(), 3);
        assert_eq!(ast.nodes[1].args, "a   b");
        assert_eq!((ast.nodes[1].start_line, ast.nodes[1].end_line), (5, 8));
        assert_eq!(ast.nodes[2].keyword, "copy");
        assert_eq!(ast.nodes[2].flags, vec!["--from=x", "--chown=1:2"]);
        assert_eq!(ast.nodes[2].args, "a b");
    }

    #[test]
    fn doubled_escape_at_end_is_not_a_continuation() {
        let ast = parse_ast("FROM a\nRUN a \\\\\nRUN b \\  \n c\n").expect("parse");
        assert_eq!(ast.nodes.len(), 3);
        assert_eq!(ast.nodes[1].args, "a \\\\");
        assert_eq!(ast.nodes[2].args, "b  c");
        let tick = parse_ast("# escape=`\nFROM a\nRUN a ``\nRUN b\n").expect("parse");
        assert_eq!(tick.nodes.len(), 3);
    }

    #[test]
    fn directive_without_value_is_a_comment() {
        let ast = parse_ast("# escape=\n# escape=`\nFROM a\nRUN b \\\n c\n").expect("parse");
        assert_eq!(ast.directives.escape, '\\');
        assert_eq!(ast.nodes.len(), 2);
        assert_eq!(ast.nodes[1].args, "b  c");
    }

    #[test]
    fn detect_directives_is_lenient() {
        let src = "# syntax=example.com/fe\n# escape=x\n# escape=`\n# check=skip=all\nFROM a\n";
        assert!(parse_directives(src).is_err());
        let d = detect_directives(src);
        assert_eq!(d.syntax.as_deref(), Some("example.com/fe"));
        assert_eq!(d.syntax_line, 1);
        assert_eq!(d.escape, '\\');
        assert_eq!(d.check, None);
    }

    #[test]
    fn heredoc_bodies() {
        let ast = parse_ast("FROM a\nRUN <<-EOT cat\n\techo hi\n\tEOT\nRUN x\n").expect("parse");
        let run = &ast.nodes[1];
        assert_eq!(run.heredocs[0].data, "\techo hi\n");
        assert_eq!(run.heredocs[0].content(), "echo hi\n");
        assert!(run.heredocs[0].chomp && run.heredocs[0].expand);
        assert_eq!((run.start_line, run.end_line), (2, 4));
        assert_eq!(ast.nodes[2].start_line, 5);
    }
}
