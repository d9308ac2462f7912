//! Typed instructions and build stages, built from parser [`Node`]s.
//!
//! Values are kept as written (unexpanded); [`Instruction::expand`] applies
//! shell-word expansion for the instructions BuildKit expands, given the
//! environment in effect at that point of the build.

use crate::Error;
use crate::parser::{Directives, Heredoc, Node, heredoc_marker, parse_ast};
use crate::shell::{EnvLookup, Lex};

/// Where an instruction sits in the Dockerfile (1-based, inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Location {
    pub start_line: usize,
    pub end_line: usize,
}

/// `CMD`/`ENTRYPOINT`/`RUN` argument forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLine {
    /// JSON array form: run exactly these args.
    Exec(Vec<String>),
    /// Shell form: wrapped in the stage's shell.
    Shell(String),
}

/// `KEY=VALUE` from ENV or LABEL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    /// Written in the legacy `ENV key value` form.
    pub legacy: bool,
}

/// One name of an `ARG` instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    pub key: String,
    /// The default as written (unexpanded), if any.
    pub default: Option<String>,
    /// From the comment above the ARG: the text after `KEY ` on the first
    /// comment line starting so (empty when none), as BuildKit describes args.
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub cmd: CommandLine,
    pub heredocs: Vec<Heredoc>,
    /// Raw `--mount=` values, in order.
    pub mounts: Vec<String>,
    pub network: Option<String>,
    pub security: Option<String>,
    pub devices: Vec<String>,
}

/// COPY and ADD.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Copy {
    pub sources: Vec<String>,
    /// Heredoc sources (`COPY <<EOF /dest`).
    pub source_contents: Vec<Heredoc>,
    pub dest: String,
    pub from: Option<String>,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
    pub parents: bool,
    pub exclude: Vec<String>,
    /// ADD only.
    pub checksum: Option<String>,
    /// ADD only.
    pub keep_git_dir: bool,
    /// ADD only: `--unpack=bool`.
    pub unpack: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", args...]` or `["CMD-SHELL", cmd]`.
    pub test: Vec<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub start_period: Option<String>,
    pub start_interval: Option<String>,
    pub retries: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    Run(Run),
    Copy(Copy),
    Add(Copy),
    Env(Vec<KeyValue>),
    Arg(Vec<ArgDecl>),
    Workdir(String),
    User(String),
    Cmd(CommandLine),
    Entrypoint(CommandLine),
    Label(Vec<KeyValue>),
    Expose(Vec<String>),
    Shell(Vec<String>),
    Volume(Vec<String>),
    StopSignal(String),
    Maintainer(String),
    Healthcheck(Healthcheck),
    /// The trigger expression as written, and its parsed form.
    Onbuild(String, Box<Instruction>),
}

impl Instruction {
    /// The instruction keyword, uppercase.
    pub fn keyword(&self) -> &'static str {
        match self {
            Instruction::Run(_) => "RUN",
            Instruction::Copy(_) => "COPY",
            Instruction::Add(_) => "ADD",
            Instruction::Env(_) => "ENV",
            Instruction::Arg(_) => "ARG",
            Instruction::Workdir(_) => "WORKDIR",
            Instruction::User(_) => "USER",
            Instruction::Cmd(_) => "CMD",
            Instruction::Entrypoint(_) => "ENTRYPOINT",
            Instruction::Label(_) => "LABEL",
            Instruction::Expose(_) => "EXPOSE",
            Instruction::Shell(_) => "SHELL",
            Instruction::Volume(_) => "VOLUME",
            Instruction::StopSignal(_) => "STOPSIGNAL",
            Instruction::Maintainer(_) => "MAINTAINER",
            Instruction::Healthcheck(_) => "HEALTHCHECK",
            Instruction::Onbuild(..) => "ONBUILD",
        }
    }

    /// Expands variables in place for the instructions BuildKit expands
    /// (ENV, LABEL, COPY/ADD sources/dest/--chown/--chmod/--checksum, WORKDIR, USER,
    /// EXPOSE, VOLUME, STOPSIGNAL). RUN, CMD, ENTRYPOINT, SHELL, ARG, ONBUILD,
    /// HEALTHCHECK and MAINTAINER are left alone (ARG defaults are expanded by
    /// the converter, which knows whether a build arg overrides them).
    pub fn expand(&mut self, lex: &Lex, env: &(impl EnvLookup + ?Sized)) -> Result<(), Error> {
        match self {
            Instruction::Env(kvs) | Instruction::Label(kvs) => {
                for kv in kvs {
                    kv.key = lex.process_word(&kv.key, env)?;
                    kv.value = lex.process_word(&kv.value, env)?;
                }
            }
            Instruction::Copy(c) | Instruction::Add(c) => {
                for s in &mut c.sources {
                    *s = lex.process_word(s, env)?;
                }
                c.dest = lex.process_word(&c.dest, env)?;
                if let Some(v) = &mut c.chown {
                    *v = lex.process_word(v, env)?;
                }
                if let Some(v) = &mut c.chmod {
                    *v = lex.process_word(v, env)?;
                }
                if let Some(v) = &mut c.checksum {
                    *v = lex.process_word(v, env)?;
                }
                for s in &mut c.exclude {
                    *s = lex.process_word(s, env)?;
                }
            }
            Instruction::Workdir(s) | Instruction::User(s) | Instruction::StopSignal(s) => {
                *s = lex.process_word(s, env)?;
            }
            Instruction::Volume(v) => {
                for s in v.iter_mut() {
                    *s = lex.process_word(s, env)?;
                }
            }
            Instruction::Expose(ports) => {
                let mut out = Vec::new();
                for p in ports.iter() {
                    out.extend(lex.process_words(p, env)?);
                }
                *ports = out;
            }
            _ => {}
        }
        Ok(())
    }
}

/// One instruction with its source text and location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub instruction: Instruction,
    /// The logical line as written, e.g. `COPY --from=builder /a /b`.
    pub original: String,
    pub location: Location,
}

/// A build stage: `FROM base [AS name]` and its instructions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// Lowercased `AS` name.
    pub name: Option<String>,
    /// The base as written (may contain `$VAR` from global ARGs).
    pub base: String,
    /// `--platform=` as written.
    pub platform: Option<String>,
    /// The FROM line as written.
    pub original: String,
    pub location: Location,
    pub commands: Vec<Command>,
    /// From the comment above the FROM: the text after `NAME ` on the first
    /// comment line starting so (empty when none or unnamed).
    pub description: String,
}

/// A typed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    pub directives: Directives,
    /// ARG instructions before the first FROM (global scope).
    pub meta_args: Vec<Command>,
    pub stages: Vec<Stage>,
}

/// Parses and types a whole Dockerfile. Fails on an empty file (no FROM).
pub fn parse(src: &str) -> Result<Dockerfile, Error> {
    let ast = parse_ast(src)?;
    if ast.nodes.is_empty() {
        return Err(Error::NoInstructions);
    }
    let mut meta_args = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    for node in &ast.nodes {
        let location = Location {
            start_line: node.start_line,
            end_line: node.end_line,
        };
        if node.keyword == "from" {
            stages.push(parse_from(node, location)?);
            continue;
        }
        let instruction = parse_instruction(node, ast.directives.escape)?;
        let command = Command {
            instruction,
            original: node.original.clone(),
            location,
        };
        match stages.last_mut() {
            Some(stage) => stage.commands.push(command),
            None if matches!(command.instruction, Instruction::Arg(_)) => meta_args.push(command),
            None => {
                return Err(Error::InstructionBeforeFrom {
                    line: node.start_line,
                    instruction: node.keyword.to_ascii_uppercase(),
                });
            }
        }
    }
    if stages.is_empty() {
        return Err(Error::NoStages);
    }
    Ok(Dockerfile {
        directives: ast.directives,
        meta_args,
        stages,
    })
}

/// Parses a single non-FROM instruction, e.g. an ONBUILD trigger (`RUN echo hi`).
pub fn parse_command(src: &str, escape: char) -> Result<Command, Error> {
    let ast = parse_ast(src)?;
    let [node] = ast.nodes.as_slice() else {
        return Err(Error::InvalidInstruction {
            line: 1,
            instruction: "ONBUILD".to_string(),
            reason: "trigger should be a single expression".to_string(),
        });
    };
    if node.keyword == "from" {
        return Err(invalid(node, "FROM isn't allowed as an ONBUILD trigger"));
    }
    Ok(Command {
        instruction: parse_instruction(node, escape)?,
        original: node.original.clone(),
        location: Location {
            start_line: node.start_line,
            end_line: node.end_line,
        },
    })
}

fn invalid(node: &Node, reason: impl Into<String>) -> Error {
    Error::InvalidInstruction {
        line: node.start_line,
        instruction: node.keyword.to_ascii_uppercase(),
        reason: reason.into(),
    }
}

/// Parsed flags of one instruction.
struct Flags<'a> {
    node: &'a Node,
    values: Vec<(String, Option<String>)>,
}

impl<'a> Flags<'a> {
    fn parse(node: &'a Node, allowed: &[&str]) -> Result<Self, Error> {
        let mut values = Vec::new();
        for raw in &node.flags {
            let body = raw.trim_start_matches('-');
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (body.to_string(), None),
            };
            if !allowed.contains(&name.as_str()) {
                return Err(Error::UnknownFlag {
                    line: node.start_line,
                    instruction: node.keyword.to_ascii_uppercase(),
                    flag: name,
                });
            }
            values.push((name, value));
        }
        Ok(Flags { node, values })
    }

    fn string(&self, name: &str) -> Result<Option<String>, Error> {
        let mut out = None;
        for (n, v) in &self.values {
            if n == name {
                match v {
                    Some(v) => out = Some(v.clone()),
                    None => {
                        return Err(invalid(
                            self.node,
                            format!("missing a value on flag: {name}"),
                        ));
                    }
                }
            }
        }
        Ok(out)
    }

    fn strings(&self, name: &str) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        for (n, v) in &self.values {
            if n == name {
                match v {
                    Some(v) => out.push(v.clone()),
                    None => {
                        return Err(invalid(
                            self.node,
                            format!("missing a value on flag: {name}"),
                        ));
                    }
                }
            }
        }
        Ok(out)
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, Error> {
        let mut out = None;
        for (n, v) in &self.values {
            if n == name {
                out = Some(match v.as_deref() {
                    None | Some("true") | Some("1") | Some("") => true,
                    Some("false") | Some("0") => false,
                    Some(other) => {
                        return Err(invalid(
                            self.node,
                            format!("expecting boolean value for flag {name}, not: {other}"),
                        ));
                    }
                });
            }
        }
        Ok(out)
    }
}

fn no_flags(node: &Node) -> Result<(), Error> {
    Flags::parse(node, &[]).map(|_| ())
}

fn parse_from(node: &Node, location: Location) -> Result<Stage, Error> {
    let flags = Flags::parse(node, &["platform"])?;
    let words: Vec<&str> = node.args.split_whitespace().collect();
    let (base, name) = match words.as_slice() {
        [base] => (*base, None),
        [base, as_, name] if as_.eq_ignore_ascii_case("as") => {
            (*base, Some(name.to_ascii_lowercase()))
        }
        _ => return Err(invalid(node, "FROM requires either one or three arguments")),
    };
    if let Some(name) = &name {
        let mut chars = name.chars();
        let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(invalid(
                node,
                format!(
                    "invalid name for build stage: {name:?}, name can't start with a number or contain symbols"
                ),
            ));
        }
    }
    let description = name
        .as_deref()
        .map(|n| doc_comment(&node.comments, n))
        .unwrap_or_default();
    Ok(Stage {
        name,
        base: base.to_string(),
        platform: flags.string("platform")?,
        original: node.original.clone(),
        location,
        commands: Vec::new(),
        description,
    })
}

/// BuildKit's getDocComment: the rest of the first comment line that starts
/// with `name` and a space.
fn doc_comment(comments: &[String], name: &str) -> String {
    if name.is_empty() {
        return String::new();
    }
    comments
        .iter()
        .find_map(|c| c.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_default()
        .to_string()
}

/// Splits on unquoted whitespace, keeping quotes and escapes (BuildKit's parseWords).
fn split_words(s: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == escape {
            cur.push(c);
            if let Some(n) = chars.next() {
                cur.push(n);
            }
            continue;
        }
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                }
                cur.push(c);
            }
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                cur.push(c);
            }
            None if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            None => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

fn parse_json_array(s: &str) -> Option<Vec<String>> {
    let t = s.trim();
    if !t.starts_with('[') {
        return None;
    }
    json_string_array(t)
}

/// A tiny JSON parser for `["a", "b"]` (strings only), enough for exec form.
fn json_string_array(s: &str) -> Option<Vec<String>> {
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    skip_ws(&mut i);
    if chars.get(i) != Some(&'[') {
        return None;
    }
    i += 1;
    let mut out = Vec::new();
    skip_ws(&mut i);
    if chars.get(i) == Some(&']') {
        i += 1;
        skip_ws(&mut i);
        return (i == chars.len()).then_some(out);
    }
    loop {
        skip_ws(&mut i);
        if chars.get(i) != Some(&'"') {
            return None;
        }
        i += 1;
        let mut v = String::new();
        loop {
            let c = *chars.get(i)?;
            i += 1;
            match c {
                '"' => break,
                '\\' => {
                    let e = *chars.get(i)?;
                    i += 1;
                    match e {
                        '"' => v.push('"'),
                        '\\' => v.push('\\'),
                        '/' => v.push('/'),
                        'b' => v.push('\u{8}'),
                        'f' => v.push('\u{c}'),
                        'n' => v.push('\n'),
                        'r' => v.push('\r'),
                        't' => v.push('\t'),
                        'u' => {
                            let hex: String = chars.get(i..i + 4)?.iter().collect();
                            i += 4;
                            let code = u32::from_str_radix(&hex, 16).ok()?;
                            v.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                        }
                        _ => return None,
                    }
                }
                c if (c as u32) < 0x20 => return None,
                c => v.push(c),
            }
        }
        out.push(v);
        skip_ws(&mut i);
        match chars.get(i) {
            Some(',') => i += 1,
            Some(']') => {
                i += 1;
                skip_ws(&mut i);
                return (i == chars.len()).then_some(out);
            }
            _ => return None,
        }
    }
}

fn command_line(args: &str) -> CommandLine {
    match parse_json_array(args) {
        Some(v) => CommandLine::Exec(v),
        None => CommandLine::Shell(args.to_string()),
    }
}

/// ENV/LABEL pairs: `k=v k2=v2` or legacy `k v`.
fn parse_key_values(node: &Node, escape: char) -> Result<Vec<KeyValue>, Error> {
    let kw = node.keyword.to_ascii_uppercase();
    let words = split_words(&node.args, escape);
    let Some(first) = words.first() else {
        return Err(invalid(
            node,
            format!("{kw} requires at least one argument"),
        ));
    };
    if !first.contains('=') {
        let rest = node.args.trim_start()[first.len()..].trim().to_string();
        if rest.is_empty() {
            return Err(invalid(node, format!("{kw} must have two arguments")));
        }
        return Ok(vec![KeyValue {
            key: first.clone(),
            value: rest,
            legacy: true,
        }]);
    }
    let mut out = Vec::new();
    for w in &words {
        let Some((k, v)) = w.split_once('=') else {
            return Err(invalid(
                node,
                format!("Syntax error - can't find = in {w:?}. Must be of the form: name=value"),
            ));
        };
        if k.is_empty() {
            return Err(invalid(node, format!("{kw} names can not be blank")));
        }
        out.push(KeyValue {
            key: k.to_string(),
            value: v.to_string(),
            legacy: false,
        });
    }
    Ok(out)
}

fn require_args(node: &Node) -> Result<(), Error> {
    if node.args.trim().is_empty() {
        return Err(invalid(
            node,
            format!(
                "{} requires at least one argument",
                node.keyword.to_ascii_uppercase()
            ),
        ));
    }
    Ok(())
}

fn parse_copy(node: &Node, is_add: bool) -> Result<Copy, Error> {
    let allowed: &[&str] = if is_add {
        &[
            "chown",
            "chmod",
            "link",
            "exclude",
            "checksum",
            "keep-git-dir",
            "unpack",
            "parents",
        ]
    } else {
        &["from", "chown", "chmod", "link", "parents", "exclude"]
    };
    let flags = Flags::parse(node, allowed)?;
    let words: Vec<String> = match parse_json_array(&node.args) {
        Some(v) => v,
        None => node.args.split_whitespace().map(str::to_string).collect(),
    };
    let kw = node.keyword.to_ascii_uppercase();
    if words.len() < 2 {
        return Err(invalid(
            node,
            format!(
                "{kw} requires at least two arguments, but only one was provided. \
                 Destination could not be determined"
            ),
        ));
    }
    let (dest, srcs) = words
        .split_last()
        .map(|(d, s)| (d.clone(), s.to_vec()))
        .unwrap_or_default();
    let mut sources = Vec::new();
    let mut source_contents = Vec::new();
    let mut heredocs = node.heredocs.iter();
    for s in srcs {
        if heredoc_marker(&s).is_some()
            && let Some(h) = heredocs.next()
        {
            source_contents.push(h.clone());
            continue;
        }
        sources.push(s);
    }
    Ok(Copy {
        sources,
        source_contents,
        dest,
        from: flags.string("from")?,
        chown: flags.string("chown")?,
        chmod: flags.string("chmod")?,
        link: flags.bool("link")?.unwrap_or(false),
        parents: flags.bool("parents")?.unwrap_or(false),
        exclude: flags.strings("exclude")?,
        checksum: flags.string("checksum")?,
        keep_git_dir: flags.bool("keep-git-dir")?.unwrap_or(false),
        unpack: flags.bool("unpack")?,
    })
}

fn parse_healthcheck(node: &Node) -> Result<Healthcheck, Error> {
    let flags = Flags::parse(
        node,
        &[
            "interval",
            "timeout",
            "start-period",
            "start-interval",
            "retries",
        ],
    )?;
    let args = node.args.trim();
    let (kw, rest) = match args.find(char::is_whitespace) {
        Some(p) => (&args[..p], args[p..].trim()),
        None => (args, ""),
    };
    let test = if kw.eq_ignore_ascii_case("none") {
        if !rest.is_empty() {
            return Err(invalid(node, "HEALTHCHECK NONE takes no arguments"));
        }
        if !node.flags.is_empty() {
            return Err(invalid(
                node,
                "options cannot be specified with HEALTHCHECK NONE",
            ));
        }
        vec!["NONE".to_string()]
    } else if kw.eq_ignore_ascii_case("cmd") {
        if rest.is_empty() {
            return Err(invalid(node, "missing command after HEALTHCHECK CMD"));
        }
        match command_line(rest) {
            CommandLine::Exec(v) => std::iter::once("CMD".to_string()).chain(v).collect(),
            CommandLine::Shell(s) => vec!["CMD-SHELL".to_string(), s],
        }
    } else {
        return Err(invalid(
            node,
            format!("unknown type {kw:?} in HEALTHCHECK (try CMD)"),
        ));
    };
    let retries = match flags.string("retries")? {
        Some(r) => Some(
            r.parse::<u32>()
                .map_err(|_| invalid(node, format!("invalid retries {r:?}")))?,
        ),
        None => None,
    };
    Ok(Healthcheck {
        test,
        interval: flags.string("interval")?,
        timeout: flags.string("timeout")?,
        start_period: flags.string("start-period")?,
        start_interval: flags.string("start-interval")?,
        retries,
    })
}

/// Types one non-FROM node. The escape character is needed to split ENV/LABEL/ARG words.
fn parse_instruction(node: &Node, escape: char) -> Result<Instruction, Error> {
    let args = node.args.trim();
    Ok(match node.keyword.as_str() {
        "run" => {
            let flags = Flags::parse(node, &["mount", "network", "security", "device"])?;
            require_args(node)?;
            Instruction::Run(Run {
                cmd: command_line(args),
                heredocs: node.heredocs.clone(),
                mounts: flags.strings("mount")?,
                network: flags.string("network")?,
                security: flags.string("security")?,
                devices: flags.strings("device")?,
            })
        }
        "copy" => Instruction::Copy(parse_copy(node, false)?),
        "add" => Instruction::Add(parse_copy(node, true)?),
        "env" => {
            no_flags(node)?;
            Instruction::Env(parse_key_values(node, escape)?)
        }
        "label" => {
            no_flags(node)?;
            Instruction::Label(parse_key_values(node, escape)?)
        }
        "arg" => {
            no_flags(node)?;
            require_args(node)?;
            let mut decls = Vec::new();
            for w in split_words(args, escape) {
                let (key, default) = match w.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (w.clone(), None),
                };
                if key.is_empty() {
                    return Err(invalid(node, "ARG names can not be blank"));
                }
                let description = doc_comment(&node.comments, &key);
                decls.push(ArgDecl {
                    key,
                    default,
                    description,
                });
            }
            Instruction::Arg(decls)
        }
        "workdir" => {
            no_flags(node)?;
            require_args(node)?;
            Instruction::Workdir(args.to_string())
        }
        "user" => {
            no_flags(node)?;
            require_args(node)?;
            Instruction::User(args.to_string())
        }
        "stopsignal" => {
            no_flags(node)?;
            require_args(node)?;
            Instruction::StopSignal(args.to_string())
        }
        "maintainer" => {
            no_flags(node)?;
            require_args(node)?;
            Instruction::Maintainer(args.to_string())
        }
        "cmd" => {
            no_flags(node)?;
            Instruction::Cmd(command_line(args))
        }
        "entrypoint" => {
            no_flags(node)?;
            Instruction::Entrypoint(command_line(args))
        }
        "expose" => {
            no_flags(node)?;
            require_args(node)?;
            // BuildKit sorts the words as written, before expanding them
            let mut ports: Vec<String> = args.split_whitespace().map(str::to_string).collect();
            ports.sort();
            Instruction::Expose(ports)
        }
        "shell" => {
            no_flags(node)?;
            match parse_json_array(args) {
                Some(v) if !v.is_empty() => Instruction::Shell(v),
                _ => {
                    return Err(invalid(
                        node,
                        "SHELL requires the arguments to be in JSON form",
                    ));
                }
            }
        }
        "volume" => {
            no_flags(node)?;
            let v = match parse_json_array(args) {
                Some(v) => v,
                None => args.split_whitespace().map(str::to_string).collect(),
            };
            if v.is_empty() || v.iter().any(|s| s.trim().is_empty()) {
                return Err(invalid(node, "VOLUME specified can not be an empty string"));
            }
            Instruction::Volume(v)
        }
        "healthcheck" => Instruction::Healthcheck(parse_healthcheck(node)?),
        "onbuild" => {
            require_args(node)?;
            let inner_ast = parse_ast(args).map_err(|e| invalid(node, e.to_string()))?;
            let [inner] = inner_ast.nodes.as_slice() else {
                return Err(invalid(
                    node,
                    "ONBUILD trigger should be a single expression",
                ));
            };
            match inner.keyword.as_str() {
                "onbuild" => {
                    return Err(invalid(
                        node,
                        "chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
                    ));
                }
                "from" | "maintainer" => {
                    return Err(invalid(
                        node,
                        format!(
                            "{} isn't allowed as an ONBUILD trigger",
                            inner.keyword.to_ascii_uppercase()
                        ),
                    ));
                }
                _ => {}
            }
            let mut inner = inner.clone();
            inner.start_line = node.start_line;
            inner.end_line = node.end_line;
            Instruction::Onbuild(
                args.to_string(),
                Box::new(parse_instruction(&inner, escape)?),
            )
        }
        _ => {
            return Err(Error::UnknownInstruction {
                line: node.start_line,
                instruction: node.keyword_original.to_ascii_uppercase(),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn single_commands() {
        let c = parse_command("COPY trigger.txt /t", '\\').expect("parse");
        assert_eq!(
            crate::tests::render(&c.instruction),
            "COPY trigger.txt -> /t"
        );
        assert_eq!(c.original, "COPY trigger.txt /t");
        assert!(parse_command("RUN a\nRUN b", '\\').is_err());
        assert!(parse_command("FROM x", '\\').is_err());
        assert!(parse_command("", '\\').is_err());
    }

    #[test]
    fn stages_and_lines() {
        let df = parse(
            "# escape=`\nARG V=1\nFROM --platform=$BUILDPLATFORM busybox:$V AS Build\nRUN a `\n  b\n\nfrom build\nCOPY --from=build /x /y\n",
        )
        .expect("parse");
        assert_eq!(df.directives.escape, '`');
        assert_eq!(df.meta_args.len(), 1);
        assert_eq!(df.stages.len(), 2);
        let s0 = &df.stages[0];
        assert_eq!(s0.name.as_deref(), Some("build"));
        assert_eq!(s0.base, "busybox:$V");
        assert_eq!(s0.platform.as_deref(), Some("$BUILDPLATFORM"));
        assert_eq!(
            s0.location,
            Location {
                start_line: 3,
                end_line: 3
            }
        );
        assert_eq!(
            s0.commands[0].location,
            Location {
                start_line: 4,
                end_line: 5
            }
        );
        assert_eq!(s0.commands[0].original, "RUN a   b");
        assert_eq!(df.stages[1].base, "build");
        assert_eq!(df.stages[1].commands[0].location.start_line, 8);
    }

    #[test]
    fn whole_file_errors() {
        let cases: &[(&str, &str)] = &[
            ("", "file with no instructions"),
            ("# only comments\n", "file with no instructions"),
            ("ARG x\n", "dockerfile contains no stages to build"),
            (
                "RUN x\nFROM a",
                "Dockerfile:1: no build stage in current context: RUN before FROM",
            ),
            (
                "FROM",
                "Dockerfile:1: FROM: FROM requires either one or three arguments",
            ),
            (
                "FROM a b",
                "Dockerfile:1: FROM: FROM requires either one or three arguments",
            ),
            (
                "FROM a AS 1x",
                "Dockerfile:1: FROM: invalid name for build stage: \"1x\", name can't start with a number or contain symbols",
            ),
            ("FROM --foo=x a", "Dockerfile:1: unknown flag: foo for FROM"),
            (
                "# escape=x\nFROM a",
                "Dockerfile:1: invalid parser directive escape: invalid escape token 'x' does not match ` or \\",
            ),
            (
                "# syntax=a\n# syntax=b\nFROM a",
                "Dockerfile:2: invalid parser directive syntax: only one syntax parser directive can be used",
            ),
        ];
        for (input, want) in cases {
            let got = parse(input).map(|_| ()).map_err(|e| e.to_string());
            assert_eq!(got, Err(want.to_string()), "input {input:?}");
        }
    }

    #[test]
    fn descriptions_come_from_the_comments_above() {
        let src = "# syntax=docker/dockerfile:1\n# check=skip=all\n# VERSION the version\nARG VERSION=1 OTHER\n\n# nope\n#\n# build builds it\n# build the second line is not it\n\nFROM a AS Build\n# test runs tests\nRUN x \\\n# test between continuation lines\n y\nFROM b AS test\n  # release indented\nFROM c AS release\n# whatever\nFROM d\n";
        let df = parse(src).expect("parse");
        let Instruction::Arg(decls) = &df.meta_args[0].instruction else {
            panic!("not an ARG: {:?}", df.meta_args[0]);
        };
        let descs: Vec<&str> = decls.iter().map(|d| d.description.as_str()).collect();
        assert_eq!(descs, ["the version", ""]);
        let descs: Vec<&str> = df.stages.iter().map(|s| s.description.as_str()).collect();
        // `  # release ...` keeps its `#` (BuildKit drops the line's first byte)
        assert_eq!(descs, ["builds it", "", "", ""]);
    }

    #[test]
    fn directives_only_at_top() {
        let df = parse("FROM a\n# escape=`\nRUN a `\n").expect("parse");
        assert_eq!(df.directives.escape, '\\');
        let df = parse("# comment\n# escape=`\nFROM a\n").expect("parse");
        assert_eq!(df.directives.escape, '\\');
        let df = parse("# SYNTAX = docker/dockerfile:1.7\n#escape=`\nFROM a\n").expect("parse");
        assert_eq!(
            df.directives.syntax.as_deref(),
            Some("docker/dockerfile:1.7")
        );
        assert_eq!(df.directives.escape, '`');
    }

    #[test]
    fn expand_instructions() {
        let env: BTreeMap<String, String> = [("A", "1"), ("DIR", "/srv"), ("P", "80 443")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lex = Lex::new('\\');
        let cases: &[(&str, &str)] = &[
            (r#"ENV x=$A y="${A} z""#, r#"ENV x="1" y="1 z""#),
            ("ENV x ${A:-d} $B", r#"ENV ~x="1 ""#),
            ("LABEL v=${A}", r#"LABEL v="1""#),
            ("WORKDIR $DIR/www", "WORKDIR /srv/www"),
            ("USER ${U:-nobody}", "USER nobody"),
            (
                "COPY --chown=$A:$A $DIR/a ${DIR}/b",
                "COPY /srv/a -> /srv/b chown=1:1",
            ),
            ("COPY --from=$A a b", "COPY a -> b from=$A"),
            (
                "ADD --checksum=sha256:$A https://x/y /y",
                "ADD https://x/y -> /y checksum=sha256:1",
            ),
            ("EXPOSE $P", r#"EXPOSE ["80", "443"]"#),
            ("VOLUME $DIR", r#"VOLUME ["/srv"]"#),
            ("STOPSIGNAL ${SIG:-SIGKILL}", "STOPSIGNAL SIGKILL"),
            ("RUN echo $A", "RUN shell:echo $A"),
            ("CMD echo $A", "CMD shell:echo $A"),
            ("ARG x=$A", r#"ARG x="$A""#),
        ];
        for (input, want) in cases {
            let df = parse(&format!("FROM a\n{input}")).expect("parse");
            let mut i = df.stages[0].commands[0].instruction.clone();
            i.expand(&lex, &env).expect("expand");
            crate::tests::expect_rendering(input, &crate::tests::render(&i), want);
        }
    }

    /// Parsing and expanding arbitrary input never panics.
    #[test]
    fn never_panics() {
        let sample = "# syntax=x\n# escape=`\nARG A=1\nFROM --platform=$P a:${A:-x} AS b\nRUN <<-EOF `\n  cat\n\tx $A\n\tEOF\nCOPY [\"a\", \"b\"]\nENV a=\"b c\" d='e' f=${g:+h}\nONBUILD RUN x\nHEALTHCHECK --retries=1 CMD [\"x\"]\n";
        let lex = Lex::new('\\');
        let env: Vec<(String, String)> = vec![("A".into(), "1".into())];
        let run = |src: &str| {
            if let Ok(df) = parse(src) {
                for st in &df.stages {
                    for c in &st.commands {
                        let _ = c.instruction.clone().expand(&lex, &env);
                    }
                }
            }
            let _ = lex.process_word(src, &env);
            let _ = lex.process_words(src, &env);
        };
        let chars: Vec<char> = sample.chars().collect();
        for i in 0..=chars.len() {
            run(&chars[..i].iter().collect::<String>());
            let mut without: Vec<char> = chars.clone();
            if i < without.len() {
                without.remove(i);
            }
            run(&without.iter().collect::<String>());
        }
        let alphabet: Vec<char> = "FROMRUN COPY\\`'\"${}:-+?<<EOF\n\t#=[],--x"
            .chars()
            .collect();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut s = String::new();
            for _ in 0..(seed % 64) {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                s.push(alphabet[(seed >> 33) as usize % alphabet.len()]);
            }
            run(&format!("FROM a\n{s}"));
            run(&s);
        }
    }
}
