//! Frontend subrequests (the `requestid` option): `frontend.targets`,
//! `frontend.lint` and `frontend.subrequests.describe`. Each answers with
//! result metadata instead of a build: `result.json` (the structure BuildKit's
//! clients decode), `result.txt` (the same as text), `version`, and for
//! `frontend.lint` `result.statuscode` (1 when anything was found).

use std::collections::BTreeMap;

use kiln_dockerfile::Dockerfile;

use crate::dockerfile2llb::lint::{self, Warning};

pub const DESCRIBE: &str = "frontend.subrequests.describe";
pub const TARGETS: &str = "frontend.targets";
pub const LINT: &str = "frontend.lint";
pub const OUTLINE: &str = "frontend.outline";
/// The version every subrequest answers with.
const VERSION: &str = "1.0.0";

pub type Metadata = BTreeMap<String, Vec<u8>>;

/// A JSON value whose object keys keep their order, printed as Go's
/// `json.MarshalIndent(v, "", "  ")` prints (HTML characters escaped).
#[derive(Debug, Clone)]
pub enum Json {
    Null,
    Bool(bool),
    Num(i64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(&'static str, Json)>),
}

impl Json {
    pub fn pretty(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out
    }

    fn write(&self, out: &mut String, depth: usize) {
        let pad = |n: usize| "  ".repeat(n);
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) => out.push_str(&n.to_string()),
            Json::Str(s) => out.push_str(&quote(s)),
            Json::Arr(items) if items.is_empty() => out.push_str("[]"),
            Json::Obj(fields) if fields.is_empty() => out.push_str("{}"),
            Json::Arr(items) => {
                out.push_str("[\n");
                for (i, it) in items.iter().enumerate() {
                    out.push_str(&pad(depth + 1));
                    it.write(out, depth + 1);
                    out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
                }
                out.push_str(&pad(depth));
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push_str("{\n");
                for (i, (k, v)) in fields.iter().enumerate() {
                    out.push_str(&pad(depth + 1));
                    out.push_str(&quote(k));
                    out.push_str(": ");
                    v.write(out, depth + 1);
                    out.push_str(if i + 1 < fields.len() { ",\n" } else { "\n" });
                }
                out.push_str(&pad(depth));
                out.push('}');
            }
        }
    }
}

fn quote(s: &str) -> String {
    serde_json::Value::String(s.to_string())
        .to_string()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

/// Standard base64, as Go encodes `[]byte` in JSON.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Fields of an object, those with Go's zero value left out (`omitempty`).
fn omit_empty(fields: Vec<(&'static str, Json)>) -> Json {
    Json::Obj(
        fields
            .into_iter()
            .filter(|(_, v)| match v {
                Json::Null | Json::Bool(false) | Json::Num(0) => false,
                Json::Str(s) => !s.is_empty(),
                Json::Arr(a) => !a.is_empty(),
                Json::Obj(_) | Json::Bool(true) | Json::Num(_) => true,
            })
            .collect(),
    )
}

/// A `pb.Location` of lines `start..=end` in source 0.
fn location(start: usize, end: usize) -> Json {
    let pos = |line: usize| omit_empty(vec![("line", Json::Num(line as i64))]);
    omit_empty(vec![(
        "ranges",
        Json::Arr(vec![Json::Obj(vec![
            ("start", pos(start)),
            ("end", pos(end)),
        ])]),
    )])
}

fn definition(
    name: &str,
    description: &str,
    opts: Option<Vec<(&str, &str)>>,
    metadata: &[&str],
) -> Json {
    let named = |n: &str, d: &str| {
        Json::Obj(vec![
            ("name", Json::Str(n.to_string())),
            ("description", Json::Str(d.to_string())),
        ])
    };
    Json::Obj(vec![
        ("name", Json::Str(name.to_string())),
        ("version", Json::Str(VERSION.to_string())),
        ("type", Json::Str("rpc".to_string())),
        ("description", Json::Str(description.to_string())),
        (
            "opts",
            opts.map_or(Json::Null, |o| {
                Json::Arr(o.into_iter().map(|(n, d)| named(n, d)).collect())
            }),
        ),
        ("inputs", Json::Null),
        (
            "metadata",
            Json::Arr(metadata.iter().map(|m| named(m, "")).collect()),
        ),
        ("refs", Json::Null),
    ])
}

/// Rows as Go's tabwriter aligns them (padding 1, spaces): every column but
/// the last padded to its widest cell plus one.
fn table(rows: &[Vec<String>]) -> String {
    table_padded(rows, 1)
}

/// [`table`] with `padding` spaces after each column's widest cell.
fn table_padded(rows: &[Vec<String>], padding: usize) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols.saturating_sub(1)) {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            out.push_str(c);
            if i + 1 < r.len() {
                out.push_str(&" ".repeat(widths[i] + padding - c.chars().count()));
            }
        }
        out.push('\n');
    }
    out
}

fn result(json: String, txt: String) -> Metadata {
    BTreeMap::from([
        ("result.json".to_string(), json.into_bytes()),
        ("result.txt".to_string(), txt.into_bytes()),
        ("version".to_string(), VERSION.as_bytes().to_vec()),
    ])
}

/// `frontend.subrequests.describe`: the subrequests this frontend answers.
pub fn describe() -> Metadata {
    let all = [
        (
            OUTLINE,
            "List all parameters current build target supports",
            Some(vec![("target", "Target build stage")]),
            &["result.json", "result.txt"][..],
        ),
        (
            TARGETS,
            "List all targets current build supports",
            Some(vec![]),
            &["result.json", "result.txt"][..],
        ),
        (
            DESCRIBE,
            "List available subrequest types",
            None,
            &["result.json", "result.txt"][..],
        ),
    ];
    let json = Json::Arr(
        all.iter()
            .map(|(n, d, o, m)| definition(n, d, o.clone(), m))
            .collect(),
    );
    let mut rows = vec![vec![
        "NAME".to_string(),
        "VERSION".to_string(),
        "DESCRIPTION".to_string(),
    ]];
    for (n, d, _, _) in &all {
        rows.push(vec![
            n.trim_start_matches("frontend.").to_string(),
            VERSION.to_string(),
            d.to_string(),
        ]);
    }
    result(json.pretty(), table(&rows))
}

/// `frontend.targets`: the stages of the Dockerfile, the last one the default.
pub fn targets(src: &[u8], df: &Dockerfile) -> Metadata {
    let last = df.stages.len().saturating_sub(1);
    let mut items = Vec::new();
    let mut rows = vec![vec!["TARGET".to_string(), "DESCRIPTION".to_string()]];
    for (i, st) in df.stages.iter().enumerate() {
        let name = st.name.clone().unwrap_or_default();
        items.push(omit_empty(vec![
            ("name", Json::Str(name.clone())),
            ("default", Json::Bool(i == last)),
            ("description", Json::Str(st.description.clone())),
            ("base", Json::Str(st.base.clone())),
            (
                "platform",
                Json::Str(st.platform.clone().unwrap_or_default()),
            ),
            (
                "location",
                location(st.location.start_line, st.location.end_line),
            ),
        ]));
        let shown = match (name.is_empty(), i == last) {
            (true, true) => "(default)".to_string(),
            (false, true) => format!("{name} (default)"),
            _ => name,
        };
        rows.push(vec![shown, st.description.clone()]);
    }
    let json = Json::Obj(vec![
        ("targets", Json::Arr(items)),
        ("sources", Json::Arr(vec![Json::Str(base64(src))])),
    ]);
    result(json.pretty(), table(&rows))
}

/// `frontend.outline`: the build args, secrets and SSH agents a build of
/// `target` (the last stage when empty) uses, from the stages it reaches.
pub fn outline(
    src: &[u8],
    df: &Dockerfile,
    target: &str,
    build_args: &BTreeMap<String, String>,
) -> Result<Metadata, String> {
    use kiln_dockerfile::{Instruction, MountType};
    let stage = if target.is_empty() {
        df.stages.last()
    } else {
        let t = target.to_ascii_lowercase();
        df.stages
            .iter()
            .find(|s| s.name.as_deref() == Some(t.as_str()))
    };
    let Some(stage) = stage else {
        return Err(format!("target stage {target:?} could not be found"));
    };
    let reached = lint::reachable(df, Some(target));
    let lex = kiln_dockerfile::Lex::new(df.directives.escape);
    // global ARGs: value (build arg, else default), line, the ARGs their default uses
    struct ArgInfo {
        value: Option<String>,
        line: (usize, usize),
        deps: Vec<String>,
        description: String,
    }
    let mut globals: BTreeMap<String, ArgInfo> = BTreeMap::new();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for c in &df.meta_args {
        let kiln_dockerfile::Instruction::Arg(decls) = &c.instruction else {
            continue;
        };
        for d in decls {
            let (value, deps) = match (build_args.get(&d.key), &d.default) {
                (Some(v), _) => (Some(v.clone()), Vec::new()),
                (None, Some(v)) => {
                    let deps = lint::variables(v)
                        .into_iter()
                        .filter(|k| env.contains_key(k))
                        .collect();
                    (
                        Some(lex.process_word(v, &env).unwrap_or_else(|_| v.clone())),
                        deps,
                    )
                }
                (None, None) => (None, Vec::new()),
            };
            if let Some(v) = &value {
                env.insert(d.key.clone(), v.clone());
            }
            globals.insert(
                d.key.clone(),
                ArgInfo {
                    value,
                    line: (c.location.start_line, c.location.end_line),
                    deps,
                    description: d.description.clone(),
                },
            );
        }
    }
    // (value, lines, description) of every ARG used, keyed by name
    type ArgUse = (Option<String>, (usize, usize), String);
    let mut args: BTreeMap<String, ArgUse> = BTreeMap::new();
    let mut used_globals: Vec<String> = Vec::new();
    let mut secrets: BTreeMap<String, (bool, usize, usize)> = BTreeMap::new();
    let mut ssh: BTreeMap<String, (bool, usize, usize)> = BTreeMap::new();
    for (i, st) in df.stages.iter().enumerate() {
        if !reached.get(i).copied().unwrap_or(false) {
            continue;
        }
        for word in [Some(&st.base), st.platform.as_ref()].into_iter().flatten() {
            used_globals.extend(lint::variables(word));
        }
        for c in &st.commands {
            let lines = (c.location.start_line, c.location.end_line);
            match &c.instruction {
                Instruction::Arg(decls) => {
                    for d in decls {
                        let given = build_args.get(&d.key).cloned();
                        if given.is_none() && d.default.is_none() && globals.contains_key(&d.key) {
                            used_globals.push(d.key.clone());
                            continue;
                        }
                        let value = given.or_else(|| {
                            d.default
                                .as_ref()
                                .map(|v| lex.process_word(v, &env).unwrap_or_else(|_| v.clone()))
                        });
                        args.insert(d.key.clone(), (value, lines, d.description.clone()));
                    }
                }
                Instruction::Run(run) => {
                    for m in run
                        .mounts
                        .iter()
                        .filter_map(|m| kiln_dockerfile::parse_mount(m).ok())
                    {
                        let entry = (m.required, lines.0, lines.1);
                        match m.kind {
                            MountType::Secret => {
                                let id = m.id.clone().or_else(|| {
                                    m.target
                                        .as_deref()
                                        .and_then(|t| t.rsplit('/').next())
                                        .map(str::to_string)
                                });
                                if let Some(id) = id {
                                    secrets.entry(id).or_insert(entry);
                                }
                            }
                            MountType::Ssh => {
                                let id = m.id.clone().unwrap_or_else(|| "default".to_string());
                                ssh.entry(id).or_insert(entry);
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
    while let Some(k) = used_globals.pop() {
        if args.contains_key(&k) {
            continue;
        }
        if let Some(g) = globals.get(&k) {
            args.insert(k.clone(), (g.value.clone(), g.line, g.description.clone()));
            used_globals.extend(g.deps.iter().cloned());
        }
    }
    type ArgRow = (String, Option<String>, (usize, usize), String);
    let mut args: Vec<ArgRow> = args
        .into_iter()
        .map(|(k, (v, l, d))| (k, v, l, d))
        .collect();
    args.sort_by_key(|a| a.2.0);
    let by_line = |m: BTreeMap<String, (bool, usize, usize)>| {
        let mut v: Vec<(String, bool, usize, usize)> =
            m.into_iter().map(|(k, (r, a, b))| (k, r, a, b)).collect();
        v.sort_by_key(|e| e.2);
        v
    };
    let secrets = by_line(secrets);
    let ssh = by_line(ssh);
    let name = stage.name.clone().unwrap_or_default();
    let needs = |items: &[(String, bool, usize, usize)]| {
        Json::Arr(
            items
                .iter()
                .map(|(n, r, a, b)| {
                    omit_empty(vec![
                        ("name", Json::Str(n.clone())),
                        ("required", Json::Bool(*r)),
                        ("location", location(*a, *b)),
                    ])
                })
                .collect(),
        )
    };
    let json = omit_empty(vec![
        ("name", Json::Str(name.clone())),
        ("description", Json::Str(stage.description.clone())),
        (
            "args",
            Json::Arr(
                args.iter()
                    .map(|(k, v, l, d)| {
                        omit_empty(vec![
                            ("name", Json::Str(k.clone())),
                            ("description", Json::Str(d.clone())),
                            ("value", Json::Str(v.clone().unwrap_or_default())),
                            ("location", location(l.0, l.1)),
                        ])
                    })
                    .collect(),
            ),
        ),
        ("secrets", needs(&secrets)),
        ("ssh", needs(&ssh)),
        ("sources", Json::Arr(vec![Json::Str(base64(src))])),
    ]);
    let mut txt = String::new();
    // BuildKit's PrintOutline: a nameless target with a description is `(default)`
    if !name.is_empty() || !stage.description.is_empty() {
        let shown = if name.is_empty() {
            "(default)".to_string()
        } else {
            name
        };
        let mut rows = vec![vec!["TARGET:".to_string(), shown]];
        if !stage.description.is_empty() {
            rows.push(vec!["DESCRIPTION:".to_string(), stage.description.clone()]);
        }
        txt.push_str(&table(&rows));
        txt.push('\n');
    }
    if !args.is_empty() {
        let mut rows = vec![vec![
            "BUILD ARG".to_string(),
            "VALUE".to_string(),
            "DESCRIPTION".to_string(),
        ]];
        for (k, v, _, d) in &args {
            rows.push(vec![k.clone(), v.clone().unwrap_or_default(), d.clone()]);
        }
        txt.push_str(&table_padded(&rows, 3));
        txt.push('\n');
    }
    for (title, items) in [("SECRET", &secrets), ("SSH", &ssh)] {
        if items.is_empty() {
            continue;
        }
        let mut rows = vec![vec![title.to_string(), "REQUIRED".to_string()]];
        for (n, r, _, _) in items {
            rows.push(vec![n.clone(), if *r { "true" } else { "" }.to_string()]);
        }
        txt.push_str(&table_padded(&rows, 3));
        txt.push('\n');
    }
    Ok(result(json.pretty(), txt))
}

/// The source excerpt BuildKit prints around lines `start..=end`:
/// `Dockerfile:N`, a rule, the lines with `>>>` on the ones meant, a rule.
pub fn print_source(filename: &str, data: &[u8], start: usize, end: usize) -> String {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<&str> = text.split('\n').collect();
    let end = end.max(start);
    if start < 1 || start > lines.len() {
        return String::new();
    }
    let (mut from, mut to) = (start, end.min(lines.len()));
    let pad = if to == from { 4 } else { 2 };
    let mut p = 0;
    while p < pad {
        if from > 1 {
            from -= 1;
            p += 1;
        }
        if to != lines.len() {
            to += 1;
            p += 1;
        }
        p += 1;
    }
    let mut out = format!("{filename}:{start}\n--------------------\n");
    for i in from..=to {
        let mark = if i >= start && i <= end { ">>>" } else { "   " };
        out.push_str(&format!(" {i:>3} | {mark} {}\n", lines[i - 1]));
    }
    out.push_str("--------------------\n");
    out
}

/// `frontend.lint`: the checks' warnings, or why the Dockerfile does not parse.
pub fn lint(
    src: &[u8],
    filename: &str,
    parsed: Result<&Dockerfile, (String, Option<usize>)>,
    config: &lint::CheckConfig,
    target: Option<&str>,
) -> Metadata {
    let text = String::from_utf8_lossy(src);
    let warnings: Vec<Warning> = match parsed {
        Ok(df) => lint::check(&text, df, config, target),
        Err(_) => Vec::new(),
    };
    let items = warnings
        .iter()
        .map(|w| {
            omit_empty(vec![
                ("ruleName", Json::Str(w.rule.name.to_string())),
                ("description", Json::Str(w.rule.description.to_string())),
                ("url", Json::Str(w.rule.url.to_string())),
                ("detail", Json::Str(w.message.clone())),
                ("location", location(w.start_line, w.end_line)),
            ])
        })
        .collect();
    let mut fields = vec![
        ("warnings", Json::Arr(items)),
        (
            "sources",
            Json::Arr(vec![omit_empty(vec![
                ("filename", Json::Str(filename.to_string())),
                ("data", Json::Str(base64(src))),
                ("language", Json::Str("Dockerfile".to_string())),
            ])]),
        ),
    ];
    // `error=true` and a check fired: the conversion would fail with this
    let parsed = match parsed {
        Ok(_) => match config.violation(&warnings) {
            Some(message) => Err((message, None)),
            None => Ok(()),
        },
        Err(e) => Err(e),
    };
    let failed = parsed.is_err();
    if let Err((message, line)) = parsed {
        fields.push((
            "buildError",
            Json::Obj(vec![
                ("message", Json::Str(message)),
                (
                    "location",
                    line.map_or(Json::Obj(Vec::new()), |l| location(l, l)),
                ),
            ]),
        ));
    }
    let mut txt = String::new();
    for w in &warnings {
        txt.push_str(&format!(
            "\nWARNING: {} - {}\n{}\n",
            w.rule.name, w.rule.url, w.message
        ));
        txt.push_str(&print_source(filename, src, w.start_line, w.end_line));
    }
    let mut out = result(Json::Obj(fields).pretty(), txt);
    let status = if warnings.is_empty() && !failed {
        "0"
    } else {
        "1"
    };
    out.insert("result.statuscode".to_string(), status.as_bytes().to_vec());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metadata, k: &str) -> String {
        String::from_utf8_lossy(m.get(k).map_or(&[][..], Vec::as_slice)).into_owned()
    }

    #[test]
    fn base64_as_go_encodes_bytes() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"FROM a\n"), "RlJPTSBhCg==");
    }

    #[test]
    fn targets_lists_stages_with_the_last_the_default() {
        let src = b"FROM busybox AS build\nRUN true\nFROM --platform=linux/amd64 alpine\n";
        let df = kiln_dockerfile::parse(&String::from_utf8_lossy(src)).expect("parse");
        let m = targets(src, &df);
        assert_eq!(
            text(&m, "result.txt"),
            "TARGET    DESCRIPTION\nbuild     \n(default) \n"
        );
        let json = text(&m, "result.json");
        assert!(
            json.starts_with(
                "{\n  \"targets\": [\n    {\n      \"name\": \"build\",\n      \"base\": \"busybox\",\n      \"location\": {\n        \"ranges\": [\n          {\n            \"start\": {\n              \"line\": 1\n            },"
            ),
            "{json}"
        );
        assert!(json.contains("\"default\": true,\n      \"base\": \"alpine\",\n      \"platform\": \"linux/amd64\""), "{json}");
        assert_eq!(text(&m, "version"), "1.0.0");
    }

    #[test]
    fn targets_and_outline_carry_descriptions() {
        let src = b"# BASE the base image name\nARG BASE=busybox\n# base the base image\nFROM ${BASE} AS base\n# release what ships\nFROM base AS release\n# V a version\nARG V\nRUN echo $V\n";
        let df = kiln_dockerfile::parse(&String::from_utf8_lossy(src)).expect("parse");
        let m = targets(src, &df);
        assert_eq!(
            text(&m, "result.txt"),
            "TARGET            DESCRIPTION\nbase              the base image\nrelease (default) what ships\n"
        );
        let json: serde_json::Value = serde_json::from_str(&text(&m, "result.json")).expect("json");
        assert_eq!(json["targets"][0]["description"], "the base image");
        let m = outline(src, &df, "", &BTreeMap::new()).expect("outline");
        assert_eq!(
            text(&m, "result.txt"),
            "TARGET:      release\nDESCRIPTION: what ships\n\n\
             BUILD ARG   VALUE     DESCRIPTION\n\
             BASE        busybox   the base image name\n\
             V                     a version\n\n"
        );
        let json: serde_json::Value = serde_json::from_str(&text(&m, "result.json")).expect("json");
        assert_eq!(json["description"], "what ships");
        assert_eq!(json["args"][0]["description"], "the base image name");
        let src = b"# x not a stage name\nFROM busybox\n";
        let df = kiln_dockerfile::parse(&String::from_utf8_lossy(src)).expect("parse");
        let m = outline(src, &df, "", &BTreeMap::new()).expect("outline");
        assert_eq!(text(&m, "result.txt"), "");
    }

    #[test]
    fn lint_reports_warnings_with_their_source() {
        let src = b"FROM busybox as base\nRUN true\n";
        let df = kiln_dockerfile::parse(&String::from_utf8_lossy(src)).expect("parse");
        let m = lint(
            src,
            "Dockerfile",
            Ok(&df),
            &lint::CheckConfig::default(),
            None,
        );
        assert_eq!(text(&m, "result.statuscode"), "1");
        assert_eq!(
            text(&m, "result.txt"),
            "\nWARNING: FromAsCasing - https://docs.docker.com/go/dockerfile/rule/from-as-casing/\n\
             'as' and 'FROM' keywords' casing do not match\n\
             Dockerfile:1\n--------------------\n   1 | >>> FROM busybox as base\n   2 |     RUN true\n   3 |     \n--------------------\n"
        );
        let json: serde_json::Value = serde_json::from_str(&text(&m, "result.json")).expect("json");
        assert_eq!(json["warnings"][0]["ruleName"], "FromAsCasing");
        assert_eq!(
            json["warnings"][0]["location"]["ranges"][0]["end"]["line"],
            1
        );
        assert_eq!(json["sources"][0]["filename"], "Dockerfile");
        assert_eq!(json["sources"][0]["language"], "Dockerfile");
        let clean = kiln_dockerfile::parse("FROM busybox\n").expect("parse");
        let m = lint(
            b"FROM busybox\n",
            "Dockerfile",
            Ok(&clean),
            &lint::CheckConfig::default(),
            None,
        );
        assert_eq!(text(&m, "result.statuscode"), "0");
        assert!(text(&m, "result.json").starts_with("{\n  \"warnings\": [],\n"));
        let m = lint(
            b"FROM\n",
            "Dockerfile",
            Err(("bad".into(), Some(1))),
            &lint::CheckConfig::default(),
            None,
        );
        assert_eq!(text(&m, "result.statuscode"), "1");
        assert!(text(&m, "result.json").contains("\"buildError\": {\n    \"message\": \"bad\""));
    }

    #[test]
    fn describe_lists_the_subrequests() {
        let m = describe();
        assert_eq!(
            text(&m, "result.txt"),
            "NAME                 VERSION DESCRIPTION\noutline              1.0.0   List all parameters current build target supports\ntargets              1.0.0   List all targets current build supports\nsubrequests.describe 1.0.0   List available subrequest types\n"
        );
        let json: serde_json::Value = serde_json::from_str(&text(&m, "result.json")).expect("json");
        assert_eq!(json[0]["name"], "frontend.outline");
        assert_eq!(json[0]["opts"][0]["name"], "target");
        assert_eq!(json[1]["name"], "frontend.targets");
        assert_eq!(json[1]["opts"], serde_json::json!([]));
        assert_eq!(json[2]["opts"], serde_json::Value::Null);
    }

    #[test]
    fn outline_lists_what_the_target_uses() {
        let src = b"ARG BASE=busybox\nARG UNUSED=x\nARG TAG=1.${BASE}\nFROM ${BASE} AS base\nARG GREETING=hi\nRUN --mount=type=secret,id=tok,required true\nFROM busybox AS other\nARG NOPE\nFROM base AS final\nRUN --mount=type=ssh true\n";
        let df = kiln_dockerfile::parse(&String::from_utf8_lossy(src)).expect("parse");
        let args = BTreeMap::from([("GREETING".to_string(), "hello".to_string())]);
        let m = outline(src, &df, "", &args).expect("outline");
        assert_eq!(
            text(&m, "result.txt"),
            "TARGET: final\n\n\
             BUILD ARG   VALUE     DESCRIPTION\n\
             BASE        busybox   \n\
             GREETING    hello     \n\n\
             SECRET   REQUIRED\n\
             tok      true\n\n\
             SSH       REQUIRED\n\
             default   \n\n"
        );
        let json: serde_json::Value = serde_json::from_str(&text(&m, "result.json")).expect("json");
        assert_eq!(json["name"], "final");
        assert_eq!(json["args"][0]["location"]["ranges"][0]["start"]["line"], 1);
        assert_eq!(json["secrets"][0]["required"], true);
        assert!(outline(src, &df, "nope", &args).is_err());
    }

    #[test]
    fn lint_with_error_true_reports_the_violation_as_build_error() {
        let src = b"FROM busybox as base\n";
        let df = kiln_dockerfile::parse(&String::from_utf8_lossy(src)).expect("parse");
        let config = lint::CheckConfig::parse("error=true").expect("config");
        let m = lint(src, "Dockerfile", Ok(&df), &config, None);
        let json: serde_json::Value = serde_json::from_str(&text(&m, "result.json")).expect("json");
        assert_eq!(
            json["buildError"],
            serde_json::json!({"message": "lint violation found for rules: FromAsCasing", "location": {}})
        );
        assert_eq!(json["warnings"][0]["ruleName"], "FromAsCasing");
    }
}
