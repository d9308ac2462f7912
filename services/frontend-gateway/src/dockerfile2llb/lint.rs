//! Build checks: the Dockerfile lint rules of BuildKit's Dockerfile frontend
//! (same names, descriptions, URLs and messages), the `# check=` directive and
//! the `BUILDKIT_DOCKERFILE_CHECK` build arg that configure them.
//!
//! The rules read the parsed Dockerfile (and its text, for what the parser
//! drops); they never resolve images or read the context. Every stage is
//! checked, reachable from the target or not.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kiln_dockerfile::{Dockerfile, Instruction, Stage};

/// One lint rule.
#[derive(Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: &'static str,
    pub description: &'static str,
    pub url: &'static str,
}

macro_rules! rule {
    ($id:ident, $name:literal, $desc:literal, $slug:literal) => {
        pub const $id: Rule = Rule {
            name: $name,
            description: $desc,
            url: concat!("https://docs.docker.com/go/dockerfile/rule/", $slug, "/"),
        };
    };
}

rule!(
    STAGE_NAME_CASING,
    "StageNameCasing",
    "Stage names should be lowercase",
    "stage-name-casing"
);
rule!(
    FROM_AS_CASING,
    "FromAsCasing",
    "The 'as' keyword should match the case of the 'from' keyword",
    "from-as-casing"
);
rule!(
    NO_EMPTY_CONTINUATION,
    "NoEmptyContinuation",
    "Empty continuation lines will become errors in a future release",
    "no-empty-continuation"
);
rule!(
    CONSISTENT_INSTRUCTION_CASING,
    "ConsistentInstructionCasing",
    "All commands within the Dockerfile should use the same casing (either upper or lower)",
    "consistent-instruction-casing"
);
rule!(
    DUPLICATE_STAGE_NAME,
    "DuplicateStageName",
    "Stage names should be unique",
    "duplicate-stage-name"
);
rule!(
    RESERVED_STAGE_NAME,
    "ReservedStageName",
    "Reserved words should not be used as stage names",
    "reserved-stage-name"
);
rule!(
    JSON_ARGS_RECOMMENDED,
    "JSONArgsRecommended",
    "JSON arguments recommended for ENTRYPOINT/CMD to prevent unintended behavior related to OS signals",
    "json-args-recommended"
);
rule!(
    MAINTAINER_DEPRECATED,
    "MaintainerDeprecated",
    "The MAINTAINER instruction is deprecated, use a label instead to define an image author",
    "maintainer-deprecated"
);
rule!(
    UNDEFINED_ARG_IN_FROM,
    "UndefinedArgInFrom",
    "FROM command must use declared ARGs",
    "undefined-arg-in-from"
);
rule!(
    WORKDIR_RELATIVE_PATH,
    "WorkdirRelativePath",
    "Relative workdir without an absolute workdir declared within the build can have unexpected results if the base image changes",
    "workdir-relative-path"
);
rule!(
    MULTIPLE_INSTRUCTIONS_DISALLOWED,
    "MultipleInstructionsDisallowed",
    "Multiple instructions of the same type should not be used in the same stage",
    "multiple-instructions-disallowed"
);
rule!(
    LEGACY_KEY_VALUE_FORMAT,
    "LegacyKeyValueFormat",
    "Legacy key/value format with whitespace separator should not be used",
    "legacy-key-value-format"
);
rule!(
    REDUNDANT_TARGET_PLATFORM,
    "RedundantTargetPlatform",
    "Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the default behavior",
    "redundant-target-platform"
);
rule!(
    SECRETS_USED_IN_ARG_OR_ENV,
    "SecretsUsedInArgOrEnv",
    "Sensitive data should not be used in the ARG or ENV commands",
    "secrets-used-in-arg-or-env"
);
rule!(
    INVALID_DEFAULT_ARG_IN_FROM,
    "InvalidDefaultArgInFrom",
    "Default value for global ARG results in an empty or invalid base image name",
    "invalid-default-arg-in-from"
);
rule!(
    FROM_PLATFORM_FLAG_CONST_DISALLOWED,
    "FromPlatformFlagConstDisallowed",
    "FROM --platform flag should not use a constant value",
    "from-platform-flag-const-disallowed"
);
rule!(
    EXPOSE_PROTO_CASING,
    "ExposeProtoCasing",
    "Protocol in EXPOSE instruction should be lowercase",
    "expose-proto-casing"
);
rule!(
    EXPOSE_INVALID_FORMAT,
    "ExposeInvalidFormat",
    "IP address and host-port mapping should not be used in EXPOSE instruction. This will become an error in a future release",
    "expose-invalid-format"
);

rule!(
    UNDEFINED_VAR,
    "UndefinedVar",
    "Variables should be defined before their use",
    "undefined-var"
);
rule!(
    COPY_IGNORED_FILE,
    "CopyIgnoredFile",
    "Attempting to Copy file that is excluded by .dockerignore",
    "copy-ignored-file"
);

/// Fired while converting, once the base images are resolved; BuildKit gives
/// it no documentation page.
pub const INVALID_BASE_IMAGE_PLATFORM: Rule = Rule {
    name: "InvalidBaseImagePlatform",
    description: "Base image platform does not match expected target platform",
    url: "",
};

/// Every rule kiln checks.
pub const RULES: &[&Rule] = &[
    &STAGE_NAME_CASING,
    &FROM_AS_CASING,
    &NO_EMPTY_CONTINUATION,
    &CONSISTENT_INSTRUCTION_CASING,
    &DUPLICATE_STAGE_NAME,
    &RESERVED_STAGE_NAME,
    &JSON_ARGS_RECOMMENDED,
    &MAINTAINER_DEPRECATED,
    &UNDEFINED_ARG_IN_FROM,
    &WORKDIR_RELATIVE_PATH,
    &MULTIPLE_INSTRUCTIONS_DISALLOWED,
    &LEGACY_KEY_VALUE_FORMAT,
    &REDUNDANT_TARGET_PLATFORM,
    &SECRETS_USED_IN_ARG_OR_ENV,
    &INVALID_DEFAULT_ARG_IN_FROM,
    &FROM_PLATFORM_FLAG_CONST_DISALLOWED,
    &EXPOSE_PROTO_CASING,
    &EXPOSE_INVALID_FORMAT,
    &COPY_IGNORED_FILE,
    &UNDEFINED_VAR,
    &INVALID_BASE_IMAGE_PLATFORM,
];

/// A rule that fired, on Dockerfile lines `start_line..=end_line` (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub rule: &'static Rule,
    /// The rule's message for this case (BuildKit's `detail` of a lint result).
    pub message: String,
    pub start_line: usize,
    pub end_line: usize,
}

impl Warning {
    /// The one-line form shown in a build's progress:
    /// `RuleName: message (line N)`.
    pub fn short(&self) -> String {
        let mut s = format!("{}: {}", self.rule.name, self.message);
        if self.start_line > 0 {
            s.push_str(&format!(" (line {})", self.start_line));
        }
        s
    }
}

/// What `# check=` / `BUILDKIT_DOCKERFILE_CHECK` asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckConfig {
    pub skip_all: bool,
    pub skip: Vec<String>,
    /// `error=true`: a build with any warning fails.
    pub error: bool,
}

impl CheckConfig {
    /// Parses `skip=A,B|all;error=true` (BuildKit's check option syntax).
    pub fn parse(value: &str) -> Result<CheckConfig, String> {
        let value = value.trim();
        let mut out = CheckConfig::default();
        if value.is_empty() {
            return Ok(out);
        }
        for part in value.splitn(3, ';') {
            let Some((k, v)) = part.split_once('=') else {
                return Err(format!("invalid check option {part:?}"));
            };
            let v = v.trim();
            match k.trim() {
                "skip" if v == "all" => out.skip_all = true,
                "skip" => out.skip = v.split(',').map(|r| r.trim().to_string()).collect(),
                // experimental rules: kiln has none, so nothing to enable
                "experimental" => {}
                "error" => {
                    out.error = parse_bool(v).ok_or_else(|| {
                        format!(
                            "failed to parse check option {part:?}: strconv.ParseBool: parsing {v:?}: invalid syntax"
                        )
                    })?;
                }
                other => return Err(format!("invalid check option {other:?}")),
            }
        }
        Ok(out)
    }

    /// The config of a build: the `BUILDKIT_DOCKERFILE_CHECK` build arg when
    /// given, else the Dockerfile's `# check=` directive.
    pub fn of_build(
        directive: Option<&str>,
        build_arg: Option<&str>,
    ) -> Result<CheckConfig, String> {
        match build_arg {
            Some(v) => CheckConfig::parse(v)
                .map_err(|e| format!("failed to parse build-arg:BUILDKIT_DOCKERFILE_CHECK: {e}")),
            None => CheckConfig::parse(directive.unwrap_or_default())
                .map_err(|e| format!("failed to parse check options: {e}")),
        }
    }

    pub fn enabled(&self, rule: &Rule) -> bool {
        !self.skip_all && !self.skip.iter().any(|s| s == rule.name)
    }

    /// With `error=true` and warnings: BuildKit's message failing the build.
    pub fn violation(&self, warnings: &[Warning]) -> Option<String> {
        if !self.error || warnings.is_empty() {
            return None;
        }
        let rules: BTreeSet<&str> = warnings.iter().map(|w| w.rule.name).collect();
        Some(format!(
            "lint violation found for rules: {}",
            rules.into_iter().collect::<Vec<_>>().join(", ")
        ))
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Args every build defines (the platform args and `TARGETSTAGE`).
const BUILTIN_ARGS: &[&str] = &[
    "TARGETSTAGE",
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETOSVERSION",
    "BUILDOSVERSION",
    "TARGETARCH",
    "TARGETVARIANT",
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDARCH",
    "BUILDVARIANT",
];

/// Runs every rule `config` enables over `df` (parsed from `src`), in
/// Dockerfile order. The rules about instructions inside stages look at the
/// stages a build of `target` reaches (`Some("")`: the last stage), as
/// BuildKit checks them while it converts those; `None` checks every stage
/// (a lint request without a target).
pub fn check(
    src: &str,
    df: &Dockerfile,
    config: &CheckConfig,
    target: Option<&str>,
) -> Vec<Warning> {
    let reached = reachable(df, target);
    let mut out = Lints {
        config,
        warnings: Vec::new(),
    };
    empty_continuations(src, &mut out);
    for st in &df.stages {
        from_words(st, &mut out);
    }
    command_casing(df, &mut out);
    stage_names(df, &mut out);
    from_args(df, &mut out);
    let mut shells: HashMap<String, bool> = HashMap::new();
    let mut workdirs: HashMap<String, bool> = HashMap::new();
    for (i, st) in df.stages.iter().enumerate() {
        let parent = |m: &HashMap<String, bool>| m.get(&st.base.to_ascii_lowercase()).copied();
        let mut shell = parent(&shells).unwrap_or(false);
        let mut workdir = parent(&workdirs).unwrap_or(false);
        if reached.get(i).copied().unwrap_or(true) {
            stage_commands(st, &mut shell, &mut workdir, &mut out);
        }
        if let Some(name) = &st.name {
            shells.insert(name.clone(), shell);
            workdirs.insert(name.clone(), workdir);
        }
    }
    out.warnings
        .sort_by_key(|w| (w.start_line, RULES.iter().position(|r| *r == w.rule)));
    out.warnings
}

/// `CopyIgnoredFile`: COPY/ADD sources from the build context that its
/// `.dockerignore` patterns (`excludes`) leave out, in the stages a build of
/// `target` reaches. Patterns with a `!` re-inclusion are too hard to judge
/// statically: then nothing is checked, as in BuildKit.
pub fn check_copies(
    df: &Dockerfile,
    config: &CheckConfig,
    target: &str,
    excludes: &[String],
) -> Vec<Warning> {
    let mut out = Lints {
        config,
        warnings: Vec::new(),
    };
    if excludes.is_empty() || excludes.iter().any(|p| p.starts_with('!')) {
        return out.warnings;
    }
    let matcher = kiln_dockerfile::IgnoreMatcher::new(excludes);
    let root_ignored = excludes
        .iter()
        .any(|p| matches!(p.as_str(), "*" | "**" | "**/*"));
    let reached = reachable(df, Some(target));
    for (i, st) in df.stages.iter().enumerate() {
        if !reached.get(i).copied().unwrap_or(false) {
            continue;
        }
        for c in &st.commands {
            let (cp, cmd) = match &c.instruction {
                Instruction::Copy(cp) => (cp, "Copy"),
                Instruction::Add(cp) => (cp, "Add"),
                _ => continue,
            };
            if cp.from.is_some() {
                continue;
            }
            for src in &cp.sources {
                if src.contains("://") || src.starts_with("git@") || src.contains('$') {
                    continue;
                }
                let cleaned = kiln_dockerfile::clean_path(src);
                let cleaned = cleaned.trim_start_matches('/');
                let cleaned = if cleaned.is_empty() { "." } else { cleaned };
                let hit = if cleaned == "." {
                    root_ignored
                } else {
                    matcher.excluded(cleaned)
                };
                if hit {
                    out.run(
                        &COPY_IGNORED_FILE,
                        (c.location.start_line, c.location.end_line),
                        format!(
                            "Attempting to {cmd} file {cleaned:?} that is excluded by .dockerignore"
                        ),
                    );
                }
            }
        }
    }
    out.warnings
}

/// An env lookup that remembers the names it did not find (BuildKit's
/// unmatched variables of a word expansion).
pub(crate) struct Recording<'e> {
    env: &'e [(String, String)],
    missing: std::cell::RefCell<BTreeSet<String>>,
}

impl<'e> Recording<'e> {
    pub(crate) fn new(env: &'e [(String, String)]) -> Self {
        Recording {
            env,
            missing: std::cell::RefCell::new(BTreeSet::new()),
        }
    }

    pub(crate) fn missing(&self) -> BTreeSet<String> {
        self.missing.borrow().clone()
    }
}

impl kiln_dockerfile::EnvLookup for Recording<'_> {
    fn lookup(&self, key: &str) -> Option<String> {
        let v = self.env.lookup(key);
        if v.is_none() {
            self.missing.borrow_mut().insert(key.to_string());
        }
        v
    }
}

/// `UndefinedVar`: `name`, used by `cmd`, is neither in the stage's env nor
/// a declared ARG; the closest of `keys` is suggested.
pub(crate) fn undefined_var(cmd: &kiln_dockerfile::Command, name: &str, keys: &[&str]) -> Warning {
    let mut message = format!("Usage of undefined variable '${name}'");
    if let Some(s) = suggest(name, keys.iter().copied()) {
        message.push_str(&format!(" (did you mean ${s}?)"));
    }
    Warning {
        rule: &UNDEFINED_VAR,
        message,
        start_line: cmd.location.start_line,
        end_line: cmd.location.end_line,
    }
}

/// `InvalidBaseImagePlatform`: the image `FROM name` resolved to is for
/// `actual` (its config's os and architecture), not the stage's `expected`.
pub(crate) fn base_image_platform(
    name: &str,
    expected: &kiln_oci::Platform,
    actual: &kiln_oci::Platform,
    line: usize,
) -> Option<Warning> {
    if expected.os == actual.os && expected.architecture == actual.architecture {
        return None;
    }
    Some(Warning {
        rule: &INVALID_BASE_IMAGE_PLATFORM,
        message: format!(
            "Base image {name} was pulled with platform \"{}\", expected \"{}\" for current build",
            actual.normalized(),
            expected.normalized()
        ),
        start_line: line,
        end_line: line,
    })
}

/// Which stages a build of `target` reaches: the target, the stages it is
/// based on, and those its `COPY --from` / `RUN --mount=from=` name.
pub(crate) fn reachable(df: &Dockerfile, target: Option<&str>) -> Vec<bool> {
    let n = df.stages.len();
    let Some(target) = target else {
        return vec![true; n];
    };
    let index = |name: &str| {
        let name = name.to_ascii_lowercase();
        df.stages
            .iter()
            .position(|s| s.name.as_deref() == Some(name.as_str()))
            .or_else(|| name.parse::<usize>().ok().filter(|i| *i < n))
    };
    let start = if target.is_empty() {
        n.checked_sub(1)
    } else {
        index(target)
    };
    let mut reached = vec![false; n];
    let mut todo: Vec<usize> = start.into_iter().collect();
    while let Some(i) = todo.pop() {
        if reached[i] {
            continue;
        }
        reached[i] = true;
        let st = &df.stages[i];
        let mut deps: Vec<&str> = vec![st.base.as_str()];
        for c in &st.commands {
            match &c.instruction {
                Instruction::Copy(cp) => deps.extend(cp.from.as_deref()),
                Instruction::Run(run) => {
                    for m in &run.mounts {
                        deps.extend(m.split(',').find_map(|kv| kv.trim().strip_prefix("from=")));
                    }
                }
                _ => {}
            }
        }
        todo.extend(deps.into_iter().filter_map(&index).filter(|d| *d != i));
    }
    reached
}

struct Lints<'a> {
    config: &'a CheckConfig,
    warnings: Vec<Warning>,
}

impl Lints<'_> {
    fn run(&mut self, rule: &'static Rule, lines: (usize, usize), message: String) {
        if self.config.enabled(rule) {
            self.warnings.push(Warning {
                rule,
                message,
                start_line: lines.0,
                end_line: lines.1,
            });
        }
    }
}

/// The keyword of an instruction as written (`from`, `RUN`).
fn keyword(original: &str) -> &str {
    original.split_whitespace().next().unwrap_or_default()
}

fn lines_of(st: &Stage) -> (usize, usize) {
    (st.location.start_line, st.location.end_line)
}

/// Blank lines inside an instruction continued over several lines: one
/// warning per instruction, at its last line.
fn empty_continuations(src: &str, out: &mut Lints) {
    let Ok(ast) = kiln_dockerfile::parse_ast(src) else {
        return;
    };
    let lines: Vec<&str> = src.split('\n').collect();
    for node in ast.nodes.iter().filter(|n| n.heredocs.is_empty()) {
        let blank = (node.start_line + 1..=node.end_line)
            .any(|l| lines.get(l - 1).is_some_and(|s| s.trim().is_empty()));
        if blank {
            out.run(
                &NO_EMPTY_CONTINUATION,
                (node.end_line, node.end_line),
                "Empty continuation line".to_string(),
            );
        }
    }
}

/// `FROM base AS name`: the stage name's and the `AS` keyword's casing.
fn from_words(st: &Stage, out: &mut Lints) {
    let words: Vec<&str> = st
        .original
        .split_whitespace()
        .filter(|w| !w.starts_with("--"))
        .collect();
    let [from, _base, as_, name] = words.as_slice() else {
        return;
    };
    if *name != name.to_lowercase() {
        out.run(
            &STAGE_NAME_CASING,
            lines_of(st),
            format!("Stage name '{name}' should be lowercase"),
        );
    }
    let matches = if *from == from.to_lowercase() {
        *as_ == as_.to_lowercase()
    } else {
        *as_ == as_.to_uppercase()
    };
    if !matches {
        out.run(
            &FROM_AS_CASING,
            lines_of(st),
            format!("'{as_}' and '{from}' keywords' casing do not match"),
        );
    }
}

/// Instruction keywords: each all upper or all lower case, as most of them are.
fn command_casing(df: &Dockerfile, out: &mut Lints) {
    let consistent = |s: &str| s == s.to_lowercase() || s == s.to_uppercase();
    let mut names: Vec<(&str, (usize, usize))> = Vec::new();
    for st in &df.stages {
        names.push((keyword(&st.original), lines_of(st)));
        for c in &st.commands {
            names.push((
                keyword(&c.original),
                (c.location.start_line, c.location.end_line),
            ));
        }
    }
    let (mut lower, mut upper) = (0, 0);
    for (n, _) in &names {
        if consistent(n) {
            if *n == n.to_lowercase() {
                lower += 1;
            } else {
                upper += 1;
            }
        }
    }
    let majority_lower = lower > upper;
    for (n, lines) in names {
        let casing = if majority_lower && n.to_lowercase() != n {
            "lowercase"
        } else if !majority_lower && n.to_uppercase() != n {
            "uppercase"
        } else {
            continue;
        };
        out.run(
            &CONSISTENT_INSTRUCTION_CASING,
            lines,
            format!("Command '{n}' should match the case of the command majority ({casing})"),
        );
    }
}

fn stage_names(df: &Dockerfile, out: &mut Lints) {
    let mut seen = BTreeSet::new();
    for st in &df.stages {
        let Some(name) = &st.name else { continue };
        if name == "context" || name == "scratch" {
            out.run(
                &RESERVED_STAGE_NAME,
                lines_of(st),
                format!("Stage name should not use the same name as reserved stage {name:?}"),
            );
        }
        if !seen.insert(name.clone()) {
            out.run(
                &DUPLICATE_STAGE_NAME,
                lines_of(st),
                format!("Duplicate stage name {name:?}, stage names should be unique"),
            );
        }
    }
}

/// `$NAME` / `${NAME...}` references in `word`, in order.
pub(crate) fn variables(word: &str) -> Vec<String> {
    let b = word.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    while i < b.len() {
        if b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] != b'$' {
            i += 1;
            continue;
        }
        i += 1;
        let braced = b.get(i) == Some(&b'{');
        if braced {
            i += 1;
        }
        let start = i;
        while i < b.len() && ident(b[i]) {
            i += 1;
        }
        if i > start {
            out.push(word[start..i].to_string());
        }
    }
    out
}

/// Levenshtein distance, for "did you mean" suggestions.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest of `options` to `val` (distance under 3), BuildKit's suggestion.
pub(crate) fn suggest<'a>(
    val: &str,
    options: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let mut best = None;
    let mut min = 3;
    for o in options {
        if o == val {
            return None;
        }
        let d = distance(val, o);
        if d < min {
            min = d;
            best = Some(o);
        }
    }
    best
}

/// The global ARGs against the FROM lines: undeclared ones, defaults that
/// leave no valid image name, and `--platform` values.
fn from_args(df: &Dockerfile, out: &mut Lints) {
    let mut declared: BTreeSet<String> = BUILTIN_ARGS.iter().map(|s| s.to_string()).collect();
    let mut defaults: BTreeMap<String, String> = BTreeMap::new();
    let lex = kiln_dockerfile::Lex::new(df.directives.escape);
    for c in &df.meta_args {
        if let Instruction::Arg(decls) = &c.instruction {
            for d in decls {
                declared.insert(d.key.clone());
                if let Some(v) = &d.default {
                    let v = lex.process_word(v, &defaults).unwrap_or_else(|_| v.clone());
                    defaults.insert(d.key.clone(), v);
                }
            }
        }
    }
    for st in &df.stages {
        let lines = lines_of(st);
        for var in variables(&st.base) {
            if declared.contains(&var) {
                continue;
            }
            let mut msg = format!("FROM argument '{var}' is not declared");
            if let Some(s) = suggest(&var, declared.iter().map(String::as_str)) {
                msg.push_str(&format!(" (did you mean {s}?)"));
            }
            out.run(&UNDEFINED_ARG_IN_FROM, lines, msg);
        }
        if st.base.contains('$')
            && let Ok(name) = lex.process_word(&st.base, &defaults)
            && !valid_image_name(&name)
        {
            out.run(
                &INVALID_DEFAULT_ARG_IN_FROM,
                lines,
                format!(
                    "Default value for ARG {} results in empty or invalid base image name",
                    st.base
                ),
            );
        }
        let Some(platform) = &st.platform else {
            continue;
        };
        let vars = variables(platform);
        if vars.is_empty() {
            let Ok(p) = kiln_oci::Platform::parse(platform) else {
                continue;
            };
            let name = st.name.as_deref().unwrap_or_default();
            if !name.contains(p.os.as_str()) && !name.contains(p.architecture.as_str()) {
                out.run(
                    &FROM_PLATFORM_FLAG_CONST_DISALLOWED,
                    lines,
                    format!("FROM --platform flag should not use constant value {platform:?}"),
                );
            }
        } else if vars == ["TARGETPLATFORM"]
            && matches!(platform.as_str(), "$TARGETPLATFORM" | "${TARGETPLATFORM}")
        {
            out.run(
                &REDUNDANT_TARGET_PLATFORM,
                lines,
                format!(
                    "Setting platform to predefined {platform} in FROM is redundant as this is the default behavior"
                ),
            );
        }
    }
}

/// Whether `name` could be an image reference: a lowercase path of
/// non-empty components, a non-empty tag, a digest with its algorithm.
fn valid_image_name(name: &str) -> bool {
    let (rest, digest) = match name.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (name, None),
    };
    if digest.is_some_and(|d| {
        d.split_once(':')
            .is_none_or(|(a, h)| a.is_empty() || h.is_empty())
    }) {
        return false;
    }
    let (path, tag) = match rest.rfind(':') {
        Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    let tag_ok = tag.is_none_or(|t| {
        !t.is_empty()
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    });
    let path_ok = !path.is_empty()
        && path.split('/').all(|c| !c.is_empty())
        && path.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '/' | ':')
        });
    tag_ok && path_ok
}

/// A key of an ARG or ENV that looks like it holds a secret.
fn secret_key(instruction: &str, key: &str, start: usize, end: usize, out: &mut Lints) {
    const DENY: &[&str] = &[
        "apikey",
        "auth",
        "credential",
        "credentials",
        "key",
        "password",
        "pword",
        "passwd",
        "secret",
        "token",
    ];
    const ALLOW: &[&str] = &["public", "file", "version"];
    let lower = key.to_ascii_lowercase();
    let parts: Vec<&str> = lower.split('_').collect();
    // a token as the whole key, its first word or its last word
    let has = |tokens: &[&str]| {
        tokens
            .iter()
            .any(|t| lower == *t || parts.first() == Some(t) || parts.last() == Some(t))
    };
    if has(DENY) && !has(ALLOW) {
        out.run(
            &SECRETS_USED_IN_ARG_OR_ENV,
            (start, end),
            format!(
                "Do not use ARG or ENV instructions for sensitive data ({instruction} {key:?})"
            ),
        );
    }
}

/// The instructions of one stage; `shell` and `workdir` say whether a SHELL
/// or an absolute WORKDIR is in force (from the stage it is based on).
fn stage_commands(st: &Stage, shell: &mut bool, workdir: &mut bool, out: &mut Lints) {
    let mut once: HashMap<&'static str, (usize, usize)> = HashMap::new();
    for c in &st.commands {
        let lines = (c.location.start_line, c.location.end_line);
        let name = keyword(&c.original);
        match &c.instruction {
            Instruction::Maintainer(_) => out.run(
                &MAINTAINER_DEPRECATED,
                lines,
                "Maintainer instruction is deprecated in favor of using label".to_string(),
            ),
            Instruction::Shell(_) => *shell = true,
            Instruction::Cmd(cmd) | Instruction::Entrypoint(cmd) => {
                let kind = if matches!(c.instruction, Instruction::Cmd(_)) {
                    "cmd"
                } else {
                    "entrypoint"
                };
                used_once(kind, name, lines, &mut once, out);
                if matches!(cmd, kiln_dockerfile::CommandLine::Shell(_)) && !*shell {
                    out.run(
                        &JSON_ARGS_RECOMMENDED,
                        lines,
                        format!(
                            "JSON arguments recommended for {name} to prevent unintended behavior related to OS signals"
                        ),
                    );
                }
            }
            Instruction::Healthcheck(_) => used_once("healthcheck", name, lines, &mut once, out),
            Instruction::Env(kvs) | Instruction::Label(kvs) => {
                let is_env = matches!(c.instruction, Instruction::Env(_));
                for kv in kvs {
                    if kv.legacy {
                        out.run(
                            &LEGACY_KEY_VALUE_FORMAT,
                            lines,
                            format!(
                                "\"{name} key=value\" should be used instead of legacy \"{name} key value\" format"
                            ),
                        );
                    }
                    if is_env {
                        secret_key("ENV", &kv.key, lines.0, lines.1, out);
                    }
                }
            }
            Instruction::Arg(decls) => {
                for d in decls {
                    secret_key("ARG", &d.key, lines.0, lines.1, out);
                }
            }
            Instruction::Workdir(path) => {
                if !*workdir && !path.starts_with('/') && !path.starts_with('$') {
                    out.run(
                        &WORKDIR_RELATIVE_PATH,
                        lines,
                        format!(
                            "Relative workdir {path:?} can have unexpected results if the base image changes"
                        ),
                    );
                }
                *workdir = true;
            }
            Instruction::Expose(ports) => {
                for raw in ports {
                    let parts: Vec<&str> = raw.split(':').collect();
                    let container = parts.last().copied().unwrap_or_default();
                    let proto = container.split_once('/').map(|(_, p)| p).unwrap_or("tcp");
                    if proto != proto.to_lowercase() {
                        out.run(
                            &EXPOSE_PROTO_CASING,
                            lines,
                            format!(
                                "Defined protocol '{raw}' in EXPOSE instruction should be lowercase"
                            ),
                        );
                    }
                    if parts.len() > 1 {
                        out.run(
                            &EXPOSE_INVALID_FORMAT,
                            lines,
                            format!(
                                "EXPOSE instruction should not define an IP address or host-port mapping, found '{raw}'"
                            ),
                        );
                    }
                }
            }
            _ => {}
        }
    }
}

/// CMD, ENTRYPOINT and HEALTHCHECK count once per stage: a repeat warns at
/// the earlier one, which is ignored.
fn used_once(
    kind: &'static str,
    name: &str,
    lines: (usize, usize),
    seen: &mut HashMap<&'static str, (usize, usize)>,
    out: &mut Lints,
) {
    if let Some(prev) = seen.insert(kind, lines) {
        out.run(
            &MULTIPLE_INSTRUCTIONS_DISALLOWED,
            prev,
            format!(
                "Multiple {name} instructions should not be used in the same stage because only the last one will be used"
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `RuleName: message (line N)` of every warning `src` gets with `config`.
    fn shorts_with(src: &str, config: &CheckConfig) -> Vec<String> {
        let df = kiln_dockerfile::parse(src).expect("parse");
        check(src, &df, config, None)
            .iter()
            .map(Warning::short)
            .collect()
    }

    fn shorts(src: &str) -> Vec<String> {
        shorts_with(src, &CheckConfig::default())
    }

    #[test]
    fn a_clean_dockerfile_has_no_warnings() {
        let src = "FROM busybox AS base\nWORKDIR /app\nENV A=b\nCMD [\"sh\"]\n";
        assert_eq!(shorts(src), Vec::<String>::new());
    }

    #[test]
    fn stage_name_and_as_casing() {
        assert_eq!(
            shorts("FROM busybox as Base\nRUN true\n"),
            [
                "StageNameCasing: Stage name 'Base' should be lowercase (line 1)",
                "FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 1)",
            ]
        );
        assert_eq!(
            shorts("from busybox AS base\nrun true\n"),
            ["FromAsCasing: 'AS' and 'from' keywords' casing do not match (line 1)"]
        );
    }

    #[test]
    fn instruction_casing_follows_the_majority() {
        assert_eq!(
            shorts("FROM busybox\nrun true\nRUN false\nCopy a /a\n"),
            [
                "ConsistentInstructionCasing: Command 'run' should match the case of the command majority (uppercase) (line 2)",
                "ConsistentInstructionCasing: Command 'Copy' should match the case of the command majority (uppercase) (line 4)",
            ]
        );
    }

    #[test]
    fn duplicate_and_reserved_stage_names() {
        assert_eq!(
            shorts("FROM busybox AS a\nFROM busybox AS a\nFROM busybox AS scratch\n"),
            [
                "DuplicateStageName: Duplicate stage name \"a\", stage names should be unique (line 2)",
                "ReservedStageName: Stage name should not use the same name as reserved stage \"scratch\" (line 3)",
            ]
        );
    }

    #[test]
    fn shell_form_cmd_and_repeats() {
        assert_eq!(
            shorts("FROM busybox\nCMD echo a\nCMD [\"b\"]\nENTRYPOINT run\n"),
            [
                "JSONArgsRecommended: JSON arguments recommended for CMD to prevent unintended behavior related to OS signals (line 2)",
                "MultipleInstructionsDisallowed: Multiple CMD instructions should not be used in the same stage because only the last one will be used (line 2)",
                "JSONArgsRecommended: JSON arguments recommended for ENTRYPOINT to prevent unintended behavior related to OS signals (line 4)",
            ]
        );
        // a SHELL makes the shell form deliberate
        assert_eq!(
            shorts("FROM busybox\nSHELL [\"/bin/sh\", \"-c\"]\nCMD echo a\n"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn maintainer_legacy_env_workdir_secrets() {
        assert_eq!(
            shorts(
                "FROM busybox\nMAINTAINER me\nENV A b\nLABEL x y\nWORKDIR app\nWORKDIR rel\nARG GITHUB_TOKEN\nENV PUBLIC_KEY=x\n"
            ),
            [
                "MaintainerDeprecated: Maintainer instruction is deprecated in favor of using label (line 2)",
                "LegacyKeyValueFormat: \"ENV key=value\" should be used instead of legacy \"ENV key value\" format (line 3)",
                "LegacyKeyValueFormat: \"LABEL key=value\" should be used instead of legacy \"LABEL key value\" format (line 4)",
                "WorkdirRelativePath: Relative workdir \"app\" can have unexpected results if the base image changes (line 5)",
                "SecretsUsedInArgOrEnv: Do not use ARG or ENV instructions for sensitive data (ARG \"GITHUB_TOKEN\") (line 7)",
            ]
        );
    }

    #[test]
    fn from_args_and_platforms() {
        assert_eq!(
            shorts("ARG VERSION=1\nFROM busybox:$VERSON\n"),
            [
                "UndefinedArgInFrom: FROM argument 'VERSON' is not declared (did you mean VERSION?) (line 2)",
                // unset, it leaves `busybox:`
                "InvalidDefaultArgInFrom: Default value for ARG busybox:$VERSON results in empty or invalid base image name (line 2)",
            ]
        );
        assert_eq!(
            shorts("ARG TAG\nFROM busybox:${TAG}\n"),
            [
                "InvalidDefaultArgInFrom: Default value for ARG busybox:${TAG} results in empty or invalid base image name (line 2)"
            ]
        );
        assert_eq!(
            shorts(
                "FROM --platform=$TARGETPLATFORM busybox\nFROM --platform=linux/amd64 busybox AS b\nFROM --platform=linux/amd64 busybox AS amd64\n"
            ),
            [
                "RedundantTargetPlatform: Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the default behavior (line 1)",
                "FromPlatformFlagConstDisallowed: FROM --platform flag should not use constant value \"linux/amd64\" (line 2)",
            ]
        );
    }

    #[test]
    fn empty_continuation_and_expose() {
        assert_eq!(
            shorts("FROM busybox\nRUN echo a \\\n\n  b\nEXPOSE 80/TCP 8080:80\n"),
            [
                "NoEmptyContinuation: Empty continuation line (line 4)",
                "ExposeProtoCasing: Defined protocol '80/TCP' in EXPOSE instruction should be lowercase (line 5)",
                "ExposeInvalidFormat: EXPOSE instruction should not define an IP address or host-port mapping, found '8080:80' (line 5)",
            ]
        );
    }

    #[test]
    fn check_options_skip_and_error() {
        let src = "FROM busybox as Base\nMAINTAINER me\n";
        let skip = CheckConfig::parse("skip=StageNameCasing, FromAsCasing").expect("parse");
        assert_eq!(
            shorts_with(src, &skip),
            [
                "MaintainerDeprecated: Maintainer instruction is deprecated in favor of using label (line 2)"
            ]
        );
        let all = CheckConfig::parse("skip=all;error=true").expect("parse");
        assert_eq!(shorts_with(src, &all), Vec::<String>::new());
        let error = CheckConfig::parse("error=true").expect("parse");
        let df = kiln_dockerfile::parse(src).expect("parse");
        assert_eq!(
            error.violation(&check(src, &df, &error, None)).as_deref(),
            Some(
                "lint violation found for rules: FromAsCasing, MaintainerDeprecated, StageNameCasing"
            )
        );
        assert_eq!(all.violation(&check(src, &df, &all, None)), None);
        assert_eq!(
            CheckConfig::parse("skipp=x"),
            Err("invalid check option \"skipp\"".to_string())
        );
        // the build arg replaces the directive
        let both = CheckConfig::of_build(Some("skip=all"), Some("error=true")).expect("parse");
        assert!(both.error && !both.skip_all);
        assert!(
            CheckConfig::of_build(None, Some("error=maybe")).is_err_and(
                |e| e.starts_with("failed to parse build-arg:BUILDKIT_DOCKERFILE_CHECK")
            )
        );
    }

    #[test]
    fn a_build_checks_the_instructions_of_the_stages_it_reaches() {
        let src = "FROM busybox AS a\nMAINTAINER x\nFROM busybox AS b\nCMD run\nFROM a\nCOPY --from=c /x /x\nFROM busybox AS c\nWORKDIR rel\n";
        let df = kiln_dockerfile::parse(src).expect("parse");
        let rules = |target| {
            check(src, &df, &CheckConfig::default(), target)
                .iter()
                .map(|w| w.rule.name)
                .collect::<Vec<_>>()
        };
        // the last stage: c only
        assert_eq!(rules(Some("")), ["WorkdirRelativePath"]);
        // stage 2 (FROM a) reaches a and c, not b
        assert_eq!(
            rules(Some("2")),
            ["MaintainerDeprecated", "WorkdirRelativePath"]
        );
        assert_eq!(
            rules(None),
            [
                "MaintainerDeprecated",
                "JSONArgsRecommended",
                "WorkdirRelativePath"
            ]
        );
    }

    #[test]
    fn copies_of_ignored_files() {
        let src = "FROM busybox\nCOPY a.txt keep /dst/\nADD ./logs/x.log /\nCOPY --from=busybox /bin /bin\n";
        let df = kiln_dockerfile::parse(src).expect("parse");
        let excludes = vec!["*.txt".to_string(), "logs".to_string()];
        let shorts: Vec<String> = check_copies(&df, &CheckConfig::default(), "", &excludes)
            .iter()
            .map(Warning::short)
            .collect();
        assert_eq!(
            shorts,
            [
                "CopyIgnoredFile: Attempting to Copy file \"a.txt\" that is excluded by .dockerignore (line 2)",
                "CopyIgnoredFile: Attempting to Add file \"logs/x.log\" that is excluded by .dockerignore (line 3)",
            ]
        );
        let with_reinclude = vec!["*.txt".to_string(), "!keep.txt".to_string()];
        assert!(check_copies(&df, &CheckConfig::default(), "", &with_reinclude).is_empty());
    }
}
