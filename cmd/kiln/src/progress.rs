//! Build progress on the terminal, in BuildKit's `plain` format or as a
//! compact live `tty` view.

use kiln_proto::moby::buildkit::v1::StatusResponse;
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Plain,
    Tty,
    Quiet,
    /// each Status message as one JSON line on stderr, with buildctl's field names
    RawJson,
}

impl Mode {
    pub fn parse(s: &str) -> anyhow::Result<Mode> {
        Ok(match s {
            "plain" => Mode::Plain,
            "tty" => Mode::Tty,
            "quiet" => Mode::Quiet,
            "rawjson" => Mode::RawJson,
            "auto" => {
                if std::io::stderr().is_terminal() {
                    Mode::Tty
                } else {
                    Mode::Plain
                }
            }
            other => {
                anyhow::bail!("unknown progress mode {other:?} (auto, plain, tty, rawjson, quiet)")
            }
        })
    }
}

#[derive(Default, Clone)]
struct VertexState {
    number: usize,
    name: String,
    started: Option<f64>,
    completed: Option<f64>,
    cached: bool,
    error: String,
    printed_header: bool,
    printed_end: bool,
    last_log: String,
}

fn secs(t: &prost_types::Timestamp) -> f64 {
    t.seconds as f64 + t.nanos as f64 / 1e9
}

pub struct Printer {
    mode: Mode,
    vertices: HashMap<String, VertexState>,
    order: Vec<String>,
    current: Option<String>,
    partial: HashMap<String, String>,
    start: Instant,
    drawn_lines: usize,
    /// warnings about the build (build checks, ignored options), counted and
    /// listed at the end as buildx does
    warnings: Vec<String>,
}

impl Printer {
    pub fn new(mode: Mode) -> Self {
        Printer {
            mode,
            vertices: HashMap::new(),
            order: Vec::new(),
            current: None,
            partial: HashMap::new(),
            start: Instant::now(),
            drawn_lines: 0,
            warnings: Vec::new(),
        }
    }

    fn state(&mut self, digest: &str) -> &mut VertexState {
        if !self.vertices.contains_key(digest) {
            self.order.push(digest.to_string());
            let number = self.order.len();
            self.vertices.insert(
                digest.to_string(),
                VertexState {
                    number,
                    ..Default::default()
                },
            );
        }
        self.vertices.get_mut(digest).expect("inserted above")
    }

    fn switch_to(&mut self, out: &mut impl Write, digest: &str) {
        if self.current.as_deref() != Some(digest) {
            if self.current.is_some() {
                let _ = writeln!(out);
            }
            self.current = Some(digest.to_string());
            let v = self.state(digest);
            if v.printed_header {
                let _ = writeln!(out, "#{} {}", v.number, v.name);
            }
        }
    }

    pub fn update(&mut self, msg: StatusResponse) {
        if self.mode == Mode::RawJson {
            eprintln!("{}", raw_json(&msg));
            return;
        }
        for w in &msg.warnings {
            self.warnings
                .push(String::from_utf8_lossy(&w.short).trim_end().to_string());
        }
        for v in msg.vertexes {
            let st = self.state(&v.digest);
            if !v.name.is_empty() {
                st.name = v.name.clone();
            }
            if let Some(t) = &v.started {
                st.started.get_or_insert(secs(t));
            }
            if let Some(t) = &v.completed {
                st.completed = Some(secs(t));
            }
            st.cached |= v.cached;
            if !v.error.is_empty() {
                st.error = v.error.clone();
            }
            if self.mode == Mode::Plain {
                self.plain_vertex(&v.digest);
            }
        }
        if self.mode == Mode::Plain {
            for st in msg.statuses.iter().filter(|s| s.completed.is_some()) {
                let mut err = std::io::stderr().lock();
                self.switch_to(&mut err, &st.vertex);
                let n = self.state(&st.vertex).number;
                let _ = if st.total > 0 {
                    writeln!(
                        err,
                        "#{} {} {} / {} done",
                        n,
                        st.name,
                        human_bytes(st.current),
                        human_bytes(st.total)
                    )
                } else {
                    // a transfer of unknown size: what went over
                    writeln!(err, "#{} {} {} done", n, st.name, human_bytes(st.current))
                };
            }
        }
        for l in msg.logs {
            let text = String::from_utf8_lossy(&l.msg).to_string();
            let buf = self.partial.entry(l.vertex.clone()).or_default();
            buf.push_str(&text);
            let mut lines = Vec::new();
            while let Some(i) = buf.find('\n') {
                lines.push(buf[..i].to_string());
                buf.drain(..=i);
            }
            let ts = secs(
                l.timestamp
                    .as_ref()
                    .unwrap_or(&prost_types::Timestamp::default()),
            );
            for line in lines {
                self.log_line(&l.vertex, ts, &line);
            }
        }
        if self.mode == Mode::Tty {
            self.draw(false);
        }
    }

    fn plain_vertex(&mut self, digest: &str) {
        let mut err = std::io::stderr().lock();
        let v = self.state(digest).clone();
        if v.started.is_none() && !v.cached {
            return;
        }
        if !v.printed_header {
            if self.current.is_some() {
                let _ = writeln!(err);
            }
            let _ = writeln!(err, "#{} {}", v.number, v.name);
            self.current = Some(digest.to_string());
            self.state(digest).printed_header = true;
        }
        if v.completed.is_some() && !v.printed_end {
            self.switch_to(&mut err, digest);
            if v.cached {
                let _ = writeln!(err, "#{} CACHED", v.number);
            } else if !v.error.is_empty() {
                let _ = writeln!(err, "#{} ERROR: {}", v.number, v.error);
            } else {
                let d = v.completed.unwrap_or(0.0) - v.started.unwrap_or(0.0);
                let _ = writeln!(err, "#{} DONE {:.1}s", v.number, d.max(0.0));
            }
            self.state(digest).printed_end = true;
        }
    }

    fn log_line(&mut self, digest: &str, ts: f64, line: &str) {
        let v = self.state(digest);
        v.last_log = line.to_string();
        let started = v.started.unwrap_or(ts);
        if self.mode == Mode::Plain {
            let mut err = std::io::stderr().lock();
            self.switch_to(&mut err, digest);
            let n = self.state(digest).number;
            let _ = writeln!(err, "#{} {:.3} {}", n, (ts - started).max(0.0), line);
        }
    }

    fn draw(&mut self, last: bool) {
        let mut err = std::io::stderr().lock();
        if self.drawn_lines > 0 {
            let _ = write!(err, "\x1b[{}A", self.drawn_lines);
        }
        let done = self
            .vertices
            .values()
            .filter(|v| v.completed.is_some())
            .count();
        let mut lines = vec![format!(
            "[+] Building {:.1}s ({}/{}){}",
            self.start.elapsed().as_secs_f64(),
            done,
            self.vertices.len(),
            if last { " FINISHED" } else { "" }
        )];
        for d in &self.order {
            let v = &self.vertices[d];
            let status = if v.cached {
                "CACHED".to_string()
            } else if !v.error.is_empty() {
                "ERROR".to_string()
            } else if let (Some(s), Some(c)) = (v.started, v.completed) {
                format!("{:.1}s", c - s)
            } else if v.started.is_some() {
                "...".to_string()
            } else {
                continue;
            };
            lines.push(format!(" => {:<60} {}", truncate(&v.name, 60), status));
            if v.completed.is_none() && !v.last_log.is_empty() {
                lines.push(format!(" => => {}", truncate(&v.last_log, 70)));
            }
        }
        for l in &lines {
            let _ = writeln!(err, "\x1b[2K{l}");
        }
        self.drawn_lines = lines.len();
    }

    /// The steps that failed.
    fn failed(&self) -> impl Iterator<Item = &VertexState> {
        self.vertices.values().filter(|v| !v.error.is_empty())
    }

    pub fn finish(&mut self) {
        match self.mode {
            Mode::Tty => {
                self.draw(true);
                for v in self.failed() {
                    eprintln!("------\n > {}:\n------\n{}", v.name, v.error);
                }
            }
            Mode::Plain => {
                for v in self.failed() {
                    eprintln!("------\n > {}:\n------", v.name);
                }
            }
            Mode::Quiet | Mode::RawJson => {}
        }
        if !matches!(self.mode, Mode::RawJson | Mode::Quiet) && !self.warnings.is_empty() {
            eprint!("{}", warnings_summary(&self.warnings));
        }
    }
}

/// `N warnings found:` and one ` - SHORT` line per warning, after a blank line.
fn warnings_summary(warnings: &[String]) -> String {
    let count = match warnings.len() {
        1 => "1 warning found".to_string(),
        n => format!("{n} warnings found"),
    };
    let mut out = format!("\n {count}:\n");
    for w in warnings {
        out.push_str(&format!(" - {w}\n"));
    }
    out
}

/// Sizes as BuildKit prints them: decimal units, two decimals (`1.09MB`).
fn human_bytes(n: i64) -> String {
    let n = n.max(0) as f64;
    for (unit, size) in [("GB", 1e9), ("MB", 1e6), ("kB", 1e3)] {
        if n >= size {
            return format!("{:.2}{unit}", n / size);
        }
    }
    format!("{n}B")
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let t: String = s.chars().take(n.saturating_sub(1)).collect();
        format!("{t}…")
    }
}

fn rfc3339_nanos(t: &prost_types::Timestamp) -> String {
    // prost's Display prints RFC 3339 with the fraction it needs
    t.to_string()
}

/// One Status message as JSON, with the field names buildctl's rawjson uses
/// (`vertexes`, `statuses`, `logs` with base64 `data`, `warnings`).
pub fn raw_json(msg: &StatusResponse) -> serde_json::Value {
    use serde_json::{Map, Value, json};
    let ts = |t: &Option<prost_types::Timestamp>| t.as_ref().map(rfc3339_nanos);
    let mut out = Map::new();
    if !msg.vertexes.is_empty() {
        let v: Vec<Value> = msg
            .vertexes
            .iter()
            .map(|v| {
                let mut o = Map::new();
                o.insert("digest".into(), json!(v.digest));
                if !v.inputs.is_empty() {
                    o.insert("inputs".into(), json!(v.inputs));
                }
                o.insert("name".into(), json!(v.name));
                if let Some(t) = ts(&v.started) {
                    o.insert("started".into(), json!(t));
                }
                if let Some(t) = ts(&v.completed) {
                    o.insert("completed".into(), json!(t));
                }
                if v.cached {
                    o.insert("cached".into(), json!(true));
                }
                if !v.error.is_empty() {
                    o.insert("error".into(), json!(v.error));
                }
                Value::Object(o)
            })
            .collect();
        out.insert("vertexes".into(), Value::Array(v));
    }
    if !msg.statuses.is_empty() {
        let v: Vec<Value> = msg
            .statuses
            .iter()
            .map(|s| {
                json!({"id": s.id, "vertex": s.vertex, "name": s.name, "current": s.current,
                       "total": s.total, "timestamp": ts(&s.timestamp), "started": ts(&s.started),
                       "completed": ts(&s.completed)})
            })
            .collect();
        out.insert("statuses".into(), Value::Array(v));
    }
    if !msg.logs.is_empty() {
        let v: Vec<Value> = msg
            .logs
            .iter()
            .map(|l| json!({"vertex": l.vertex, "stream": l.stream, "data": base64(&l.msg), "timestamp": ts(&l.timestamp)}))
            .collect();
        out.insert("logs".into(), Value::Array(v));
    }
    if !msg.warnings.is_empty() {
        let v: Vec<Value> = msg
            .warnings
            .iter()
            .map(|w| {
                let mut o = Map::new();
                o.insert("vertex".into(), json!(w.vertex));
                o.insert("level".into(), json!(w.level));
                o.insert("short".into(), json!(base64(&w.short)));
                if !w.detail.is_empty() {
                    let d: Vec<String> = w.detail.iter().map(|d| base64(d)).collect();
                    o.insert("detail".into(), json!(d));
                }
                if !w.url.is_empty() {
                    o.insert("url".into(), json!(w.url));
                }
                if let Some(i) = &w.info {
                    o.insert(
                        "sourceInfo".into(),
                        json!({"filename": i.filename, "data": base64(&i.data), "language": i.language}),
                    );
                }
                if !w.ranges.is_empty() {
                    let pos = |p: &Option<kiln_proto::pb::Position>| {
                        p.as_ref().map(|p| json!({"line": p.line, "character": p.character}))
                    };
                    let r: Vec<Value> = w
                        .ranges
                        .iter()
                        .map(|r| json!({"start": pos(&r.start), "end": pos(&r.end)}))
                        .collect();
                    o.insert("range".into(), Value::Array(r));
                }
                Value::Object(o)
            })
            .collect();
        out.insert("warnings".into(), Value::Array(v));
    }
    Value::Object(out)
}

fn base64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::moby::buildkit::v1::{Vertex, VertexLog};

    #[test]
    fn rawjson_uses_buildctl_field_names() {
        let msg = StatusResponse {
            vertexes: vec![Vertex {
                digest: "sha256:ab".into(),
                name: "[1/2] RUN true".into(),
                cached: true,
                started: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 5,
                }),
                ..Default::default()
            }],
            logs: vec![VertexLog {
                vertex: "sha256:ab".into(),
                stream: 1,
                msg: b"hi\n".to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let v = raw_json(&msg);
        assert_eq!(v["vertexes"][0]["digest"], "sha256:ab");
        assert_eq!(v["vertexes"][0]["cached"], true);
        assert!(
            v["vertexes"][0]["started"]
                .as_str()
                .is_some_and(|s| s.starts_with("2023-11-14T22:13:20"))
        );
        assert_eq!(v["logs"][0]["data"], "aGkK");
        assert!(v.get("statuses").is_none());
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(human_bytes(1_088_231), "1.09MB");
        assert_eq!(human_bytes(512), "512B");
    }

    #[test]
    fn warnings_are_counted_then_listed() {
        assert_eq!(
            warnings_summary(&["A: a (line 1)".to_string()]),
            "\n 1 warning found:\n - A: a (line 1)\n"
        );
        assert_eq!(
            warnings_summary(&["A".to_string(), "B".to_string()]),
            "\n 2 warnings found:\n - A\n - B\n"
        );
    }
}
