//! Data-driven parser tests: one Dockerfile line (or a few) per case, after
//! `FROM scratch`, rendered compactly, or the error it must raise.

use crate::{CommandLine, Copy, Instruction, parse};

fn render_cmd(c: &CommandLine) -> String {
    match c {
        CommandLine::Exec(v) => format!("exec:{v:?}"),
        CommandLine::Shell(s) => format!("shell:{s}"),
    }
}

fn render_copy(kw: &str, c: &Copy) -> String {
    let mut s = format!("{kw} {} -> {}", c.sources.join(","), c.dest);
    if !c.source_contents.is_empty() {
        let docs: Vec<String> = c
            .source_contents
            .iter()
            .map(|d| format!("{}={:?}", d.name, d.content()))
            .collect();
        s.push_str(&format!(" docs=[{}]", docs.join(",")));
    }
    for (k, v) in [
        ("from", &c.from),
        ("chown", &c.chown),
        ("chmod", &c.chmod),
        ("checksum", &c.checksum),
    ] {
        if let Some(v) = v {
            s.push_str(&format!(" {k}={v}"));
        }
    }
    if c.link {
        s.push_str(" link");
    }
    if c.parents {
        s.push_str(" parents");
    }
    if c.keep_git_dir {
        s.push_str(" keep-git-dir");
    }
    if let Some(u) = c.unpack {
        s.push_str(&format!(" unpack={u}"));
    }
    if !c.exclude.is_empty() {
        s.push_str(&format!(" exclude={}", c.exclude.join(",")));
    }
    s
}

/// A compact one-line rendering of an instruction (`ENV ~k="v"`: the legacy
/// `ENV k v` form; `doc:NAME="…" noexpand chomp`: a heredoc and its flags).
pub(crate) fn render(i: &Instruction) -> String {
    match i {
        Instruction::Run(r) => {
            let mut s = format!("RUN {}", render_cmd(&r.cmd));
            for m in &r.mounts {
                s.push_str(&format!(" mount={m}"));
            }
            if let Some(n) = &r.network {
                s.push_str(&format!(" network={n}"));
            }
            if let Some(n) = &r.security {
                s.push_str(&format!(" security={n}"));
            }
            for h in &r.heredocs {
                s.push_str(&format!(" doc:{}={:?}", h.name, h.content()));
                if !h.expand {
                    s.push_str(" noexpand");
                }
                if h.chomp {
                    s.push_str(" chomp");
                }
            }
            s
        }
        Instruction::Copy(c) => render_copy("COPY", c),
        Instruction::Add(c) => render_copy("ADD", c),
        Instruction::Env(kvs) | Instruction::Label(kvs) => {
            let kw = i.keyword();
            let parts: Vec<String> = kvs
                .iter()
                .map(|kv| {
                    let legacy = if kv.legacy { "~" } else { "" };
                    format!("{legacy}{}={:?}", kv.key, kv.value)
                })
                .collect();
            format!("{kw} {}", parts.join(" "))
        }
        Instruction::Arg(decls) => {
            let parts: Vec<String> = decls
                .iter()
                .map(|d| match &d.default {
                    Some(v) => format!("{}={v:?}", d.key),
                    None => d.key.clone(),
                })
                .collect();
            format!("ARG {}", parts.join(" "))
        }
        Instruction::Workdir(s)
        | Instruction::User(s)
        | Instruction::StopSignal(s)
        | Instruction::Maintainer(s) => format!("{} {s}", i.keyword()),
        Instruction::Cmd(c) | Instruction::Entrypoint(c) => {
            format!("{} {}", i.keyword(), render_cmd(c))
        }
        Instruction::Expose(v) | Instruction::Shell(v) | Instruction::Volume(v) => {
            format!("{} {v:?}", i.keyword())
        }
        Instruction::Healthcheck(h) => {
            let mut s = format!("HEALTHCHECK {:?}", h.test);
            for (k, v) in [
                ("interval", &h.interval),
                ("timeout", &h.timeout),
                ("start-period", &h.start_period),
                ("start-interval", &h.start_interval),
            ] {
                if let Some(v) = v {
                    s.push_str(&format!(" {k}={v}"));
                }
            }
            if let Some(r) = h.retries {
                s.push_str(&format!(" retries={r}"));
            }
            s
        }
        Instruction::Onbuild(e, inner) => format!("ONBUILD {e:?} => {}", render(inner)),
    }
}

/// Renders every instruction of the first stage, one per line, or `ERR <message>`.
fn check(body: &str) -> String {
    match parse(&format!("FROM scratch\n{body}")) {
        Ok(df) => df.stages[0]
            .commands
            .iter()
            .map(|c| render(&c.instruction))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("ERR {e}"),
    }
}

/// Whether `got` is what a case wants: the same rendering, or for
/// `ERR substring` an error containing it.
fn matches(got: &str, want: &str) -> bool {
    match want.strip_prefix("ERR ") {
        Some(sub) => got.starts_with("ERR ") && got.contains(sub),
        None => got == want,
    }
}

/// Asserts one case outside a table (instructions checked after expansion).
pub(crate) fn expect_rendering(input: &str, got: &str, want: &str) {
    assert!(
        matches(got, want),
        "input {input:?}\n   want {want}\n    got {got}"
    );
}

/// Checks each (Dockerfile lines after `FROM scratch`, rendering) case, with
/// `ERR substring` for errors, reporting every failure at once.
fn check_table(cases: &[(&str, &str)]) {
    let mut failures = Vec::new();
    for (input, want) in cases {
        let got = check(input);
        if !matches(&got, want) {
            failures.push(format!("{input:?}\n   want {want}\n    got {got}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn run_instructions() {
    check_table(&[
        ("RUN echo hi", "RUN shell:echo hi"),
        ("run echo hi", "RUN shell:echo hi"),
        ("RUN   echo   spaced  ", "RUN shell:echo   spaced"),
        (r#"RUN ["echo", "hi"]"#, r#"RUN exec:["echo", "hi"]"#),
        (r#"RUN ["a","b c"]"#, r#"RUN exec:["a", "b c"]"#),
        ("RUN []", "RUN exec:[]"),
        (r#"RUN [ "x" ]"#, r#"RUN exec:["x"]"#),
        ("RUN [not json]", "RUN shell:[not json]"),
        (r#"RUN ["unterminated""#, r#"RUN shell:["unterminated""#),
        ("RUN echo $HOME", "RUN shell:echo $HOME"),
        ("RUN echo a \\\n b", "RUN shell:echo a  b"),
        ("RUN echo a \\\n# comment\n b", "RUN shell:echo a  b"),
        ("RUN echo a\\\nb", "RUN shell:echo ab"),
        ("RUN --network=none true", "RUN shell:true network=none"),
        ("RUN --network=host true", "RUN shell:true network=host"),
        (
            "RUN --security=insecure true",
            "RUN shell:true security=insecure",
        ),
        (
            "RUN --mount=type=cache,target=/c true",
            "RUN shell:true mount=type=cache,target=/c",
        ),
        (
            "RUN --mount=type=bind,source=a,target=/a --mount=type=tmpfs,target=/t true",
            "RUN shell:true mount=type=bind,source=a,target=/a mount=type=tmpfs,target=/t",
        ),
        (
            "RUN --nope true",
            "ERR Dockerfile:2: unknown flag: nope for RUN",
        ),
        (
            "RUN",
            "ERR Dockerfile:2: RUN: RUN requires at least one argument",
        ),
        (
            "RUN <<EOF\necho hi\nEOF",
            r#"RUN shell:<<EOF doc:EOF="echo hi\n""#,
        ),
        (
            "RUN <<-EOF\n\techo hi\n\tEOF",
            r#"RUN shell:<<-EOF doc:EOF="echo hi\n" chomp"#,
        ),
        (
            "RUN cat <<A <<B\na\nA\nb\nB",
            r#"RUN shell:cat <<A <<B doc:A="a\n" doc:B="b\n""#,
        ),
        (
            "RUN <<EOF\nnever ends",
            "ERR Dockerfile:2: unterminated heredoc: missing EOF",
        ),
    ]);
}

#[test]
fn copy_add_instructions() {
    check_table(&[
        ("COPY a b", "COPY a -> b"),
        ("COPY a b c/", "COPY a,b -> c/"),
        (r#"COPY ["a b", "c"]"#, "COPY a b -> c"),
        ("COPY --from=build /x /y", "COPY /x -> /y from=build"),
        ("COPY --from=0 /x /y", "COPY /x -> /y from=0"),
        ("COPY --chown=1:2 a b", "COPY a -> b chown=1:2"),
        ("COPY --chown=user a b", "COPY a -> b chown=user"),
        ("COPY --chmod=755 a b", "COPY a -> b chmod=755"),
        ("COPY --link a b", "COPY a -> b link"),
        ("COPY --link=true a b", "COPY a -> b link"),
        ("COPY --link=false a b", "COPY a -> b"),
        ("COPY --parents a/b c/", "COPY a/b -> c/ parents"),
        (
            "COPY --exclude=*.log --exclude=tmp . /d",
            "COPY . -> /d exclude=*.log,tmp",
        ),
        ("COPY $SRC $DEST", "COPY $SRC -> $DEST"),
        (
            "COPY a",
            "ERR Dockerfile:2: COPY: COPY requires at least two arguments, but only one was provided. Destination could not be determined",
        ),
        (
            "COPY",
            "ERR Dockerfile:2: COPY: COPY requires at least two arguments, but only one was provided. Destination could not be determined",
        ),
        (
            "COPY --bogus a b",
            "ERR Dockerfile:2: unknown flag: bogus for COPY",
        ),
        (
            "COPY --checksum=sha256:00 a b",
            "ERR Dockerfile:2: unknown flag: checksum for COPY",
        ),
        (
            "COPY <<EOF /f\nhello\nEOF",
            r#"COPY  -> /f docs=[EOF="hello\n"]"#,
        ),
        (
            "COPY <<\"EOF\" /f\n$X\nEOF",
            r#"COPY  -> /f docs=[EOF="$X\n"]"#,
        ),
        (
            "COPY <<A <<B /d/\n1\nA\n2\nB",
            r#"COPY  -> /d/ docs=[A="1\n",B="2\n"]"#,
        ),
        ("ADD a b", "ADD a -> b"),
        (
            "ADD --checksum=sha256:ab http://x/y /z",
            "ADD http://x/y -> /z checksum=sha256:ab",
        ),
        (
            "ADD --keep-git-dir=true https://x/r.git /r",
            "ADD https://x/r.git -> /r keep-git-dir",
        ),
        ("ADD --unpack=false a.tar /", "ADD a.tar -> / unpack=false"),
        (
            "ADD --chown=1 --chmod=600 a b",
            "ADD a -> b chown=1 chmod=600",
        ),
    ]);
}

#[test]
fn env_label_instructions() {
    check_table(&[
        ("ENV A=1", r#"ENV A="1""#),
        ("ENV A=1 B=2", r#"ENV A="1" B="2""#),
        ("ENV A 1", r#"ENV ~A="1""#),
        ("ENV A hello world", r#"ENV ~A="hello world""#),
        (r#"ENV A="x y""#, r#"ENV A="\"x y\"""#),
        ("ENV A=", r#"ENV A="""#),
        (r#"ENV A=a\ b"#, r#"ENV A="a\\ b""#),
        ("ENV A=1 \\\n    B=2", r#"ENV A="1" B="2""#),
        (
            "ENV",
            "ERR Dockerfile:2: ENV: ENV requires at least one argument",
        ),
        (
            "ENV =x",
            "ERR Dockerfile:2: ENV: ENV names can not be blank",
        ),
        ("LABEL a=b", r#"LABEL a="b""#),
        (r#"LABEL "a b"=c"#, r#"LABEL "a b"="c""#),
        ("LABEL a=1 b=2", r#"LABEL a="1" b="2""#),
        ("LABEL a b", r#"LABEL ~a="b""#),
    ]);
}

#[test]
fn arg_instructions() {
    check_table(&[
        ("ARG A", "ARG A"),
        ("ARG A=1", r#"ARG A="1""#),
        ("ARG A=1 B", r#"ARG A="1" B"#),
        ("ARG A=", r#"ARG A="""#),
        ("ARG A=$B", r#"ARG A="$B""#),
        (
            "ARG",
            "ERR Dockerfile:2: ARG: ARG requires at least one argument",
        ),
    ]);
}

#[test]
fn workdir_user_stopsignal_maintainer() {
    check_table(&[
        ("WORKDIR /a", "WORKDIR /a"),
        ("WORKDIR rel", "WORKDIR rel"),
        ("WORKDIR $D", "WORKDIR $D"),
        (
            "WORKDIR",
            "ERR Dockerfile:2: WORKDIR: WORKDIR requires at least one argument",
        ),
        ("USER 1000", "USER 1000"),
        ("USER app:grp", "USER app:grp"),
        (
            "USER",
            "ERR Dockerfile:2: USER: USER requires at least one argument",
        ),
        ("STOPSIGNAL SIGKILL", "STOPSIGNAL SIGKILL"),
        ("STOPSIGNAL 9", "STOPSIGNAL 9"),
        ("MAINTAINER a <b@c>", "MAINTAINER a <b@c>"),
    ]);
}

#[test]
fn cmd_entrypoint_shell() {
    check_table(&[
        ("CMD echo hi", "CMD shell:echo hi"),
        (r#"CMD ["echo", "hi"]"#, r#"CMD exec:["echo", "hi"]"#),
        ("CMD []", "CMD exec:[]"),
        (r#"CMD ["a\"b"]"#, r#"CMD exec:["a\"b"]"#),
        (
            r#"ENTRYPOINT ["/bin/app"]"#,
            r#"ENTRYPOINT exec:["/bin/app"]"#,
        ),
        (
            "ENTRYPOINT /bin/app --flag",
            "ENTRYPOINT shell:/bin/app --flag",
        ),
        (
            r#"SHELL ["/bin/bash", "-c"]"#,
            r#"SHELL ["/bin/bash", "-c"]"#,
        ),
        (
            "SHELL /bin/bash -c",
            "ERR Dockerfile:2: SHELL: SHELL requires the arguments to be in JSON form",
        ),
    ]);
}

#[test]
fn expose_volume() {
    check_table(&[
        ("EXPOSE 80", r#"EXPOSE ["80"]"#),
        ("EXPOSE 80/tcp 53/udp", r#"EXPOSE ["53/udp", "80/tcp"]"#),
        (
            "EXPOSE",
            "ERR Dockerfile:2: EXPOSE: EXPOSE requires at least one argument",
        ),
        ("VOLUME /v", r#"VOLUME ["/v"]"#),
        ("VOLUME /a /b", r#"VOLUME ["/a", "/b"]"#),
        (r#"VOLUME ["/a", "/b"]"#, r#"VOLUME ["/a", "/b"]"#),
        (
            "VOLUME",
            "ERR Dockerfile:2: VOLUME: VOLUME specified can not be an empty string",
        ),
    ]);
}

#[test]
fn healthcheck_instructions() {
    check_table(&[
        ("HEALTHCHECK NONE", r#"HEALTHCHECK ["NONE"]"#),
        (
            "HEALTHCHECK CMD true",
            r#"HEALTHCHECK ["CMD-SHELL", "true"]"#,
        ),
        (
            r#"HEALTHCHECK CMD ["/check", "-q"]"#,
            r#"HEALTHCHECK ["CMD", "/check", "-q"]"#,
        ),
        (
            "HEALTHCHECK --interval=5s --timeout=1s --start-period=2s --start-interval=1s --retries=4 CMD x",
            r#"HEALTHCHECK ["CMD-SHELL", "x"] interval=5s timeout=1s start-period=2s start-interval=1s retries=4"#,
        ),
        (
            "HEALTHCHECK --bogus=1 CMD x",
            "ERR Dockerfile:2: unknown flag: bogus for HEALTHCHECK",
        ),
        (
            "HEALTHCHECK NONE extra",
            "ERR Dockerfile:2: HEALTHCHECK: HEALTHCHECK NONE takes no arguments",
        ),
        (
            "HEALTHCHECK",
            r#"ERR Dockerfile:2: HEALTHCHECK: unknown type "" in HEALTHCHECK (try CMD)"#,
        ),
    ]);
}

#[test]
fn onbuild_instructions() {
    check_table(&[
        (
            "ONBUILD RUN echo hi",
            r#"ONBUILD "RUN echo hi" => RUN shell:echo hi"#,
        ),
        (
            "ONBUILD COPY . /app",
            r#"ONBUILD "COPY . /app" => COPY . -> /app"#,
        ),
        (
            "ONBUILD ONBUILD RUN x",
            "ERR Dockerfile:2: ONBUILD: chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
        ),
        (
            "ONBUILD FROM busybox",
            "ERR Dockerfile:2: ONBUILD: FROM isn't allowed as an ONBUILD trigger",
        ),
        (
            "ONBUILD MAINTAINER x",
            "ERR Dockerfile:2: ONBUILD: MAINTAINER isn't allowed as an ONBUILD trigger",
        ),
    ]);
}

#[test]
fn unknown_and_several_instructions() {
    check_table(&[
        ("NOPE x", "ERR Dockerfile:2: unknown instruction: NOPE"),
        ("RUN a\nRUN b", "RUN shell:a\nRUN shell:b"),
        ("# comment\nRUN a", "RUN shell:a"),
        ("\n\n  RUN a  \n\n", "RUN shell:a"),
    ]);
}

#[test]
fn directive_and_stage_table() {
    // (whole Dockerfile, rendering of directives + stages; `ERR substring` for errors)
    let cases: &[(&str, &str)] = &[
        ("FROM a", "escape=\\ | a"),
        ("FROM a AS b", "escape=\\ | a as b"),
        ("FROM a as B", "escape=\\ | a as b"),
        (
            "FROM --platform=linux/arm64 a AS b",
            "escape=\\ | a as b on linux/arm64",
        ),
        ("# escape=`\nFROM a", "escape=` | a"),
        ("# escape=\\\nFROM a", "escape=\\ | a"),
        ("#escape=`\nFROM a", "escape=` | a"),
        ("# ESCAPE=`\nFROM a", "escape=` | a"),
        (
            "# syntax=docker/dockerfile:1\n# escape=`\nFROM a",
            "escape=` | a",
        ),
        ("FROM a\n# escape=`\nRUN x", "escape=\\ | a"),
        ("# escape=x\nFROM a", "ERR escape"),
        ("ARG V=1\nFROM a:$V", "escape=\\ | a:$V"),
        ("FROM a\nFROM b AS c\nFROM c", "escape=\\ | a, b as c, c"),
        ("FROM", "ERR FROM"),
        ("FROM a AS", "ERR FROM"),
        ("FROM a b c", "ERR FROM"),
        ("", "ERR file with no instructions"),
        ("# only a comment", "ERR file with no instructions"),
        ("ARG A\nRUN x\nFROM a", "ERR before FROM"),
        ("FROM a\r\nRUN x\r\n", "escape=\\ | a"),
    ];
    let mut failures = Vec::new();
    for (input, want) in cases {
        let got = match parse(input) {
            Ok(df) => {
                let stages: Vec<String> = df
                    .stages
                    .iter()
                    .map(|s| {
                        let mut r = s.base.clone();
                        if let Some(n) = &s.name {
                            r.push_str(&format!(" as {n}"));
                        }
                        if let Some(p) = &s.platform {
                            r.push_str(&format!(" on {p}"));
                        }
                        r
                    })
                    .collect();
                format!("escape={} | {}", df.directives.escape, stages.join(", "))
            }
            Err(e) => format!("ERR {e}"),
        };
        if !matches(&got, want) {
            failures.push(format!("{input:?}\n   want {want}\n    got {got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn run_table() {
    check_table(&[
        ("RUN echo hi", "RUN shell:echo hi"),
        ("run echo hi", "RUN shell:echo hi"),
        ("Run   echo   hi  ", "RUN shell:echo   hi"),
        (r#"RUN ["echo", "hi"]"#, r#"RUN exec:["echo", "hi"]"#),
        (r#"RUN ["echo","a\"b"]"#, r#"RUN exec:["echo", "a\"b"]"#),
        (r#"RUN ["echo", 'hi']"#, r#"RUN shell:["echo", 'hi']"#),
        (r#"RUN [ "a" ]"#, r#"RUN exec:["a"]"#),
        ("RUN [not json", "RUN shell:[not json"),
        ("RUN echo $HOME", "RUN shell:echo $HOME"),
        ("RUN a \\\n b", "RUN shell:a  b"),
        ("RUN a \\\n# comment\n b", "RUN shell:a  b"),
        ("RUN a \\\n\n b", "RUN shell:a  b"),
        ("RUN a \\  \n b", "RUN shell:a  b"),
        ("RUN --network=none wget x", "RUN shell:wget x network=none"),
        (
            "RUN --security=insecure ls",
            "RUN shell:ls security=insecure",
        ),
        (
            "RUN --mount=type=cache,target=/c --mount=type=tmpfs,target=/t ls",
            "RUN shell:ls mount=type=cache,target=/c mount=type=tmpfs,target=/t",
        ),
        (
            r#"RUN --mount="type=bind,source=a b" ls"#,
            "RUN shell:ls mount=type=bind,source=a b",
        ),
        ("RUN -- --weird", "RUN shell:--weird"),
        (
            "RUN --bogus ls",
            "ERR Dockerfile:2: unknown flag: bogus for RUN",
        ),
        (
            "RUN --network ls",
            "ERR Dockerfile:2: RUN: missing a value on flag: network",
        ),
        (
            "RUN",
            "ERR Dockerfile:2: RUN: RUN requires at least one argument",
        ),
        (
            "RUN <<EOF\necho hi\nEOF",
            r#"RUN shell:<<EOF doc:EOF="echo hi\n""#,
        ),
        (
            "RUN <<EOT sh -x\necho a\nEOT",
            r#"RUN shell:<<EOT sh -x doc:EOT="echo a\n""#,
        ),
        (
            "RUN <<-EOF\n\techo hi\n\tEOF",
            r#"RUN shell:<<-EOF doc:EOF="echo hi\n" chomp"#,
        ),
        (
            "RUN <<\"EOF\"\necho $x\nEOF",
            r#"RUN shell:<<"EOF" doc:EOF="echo $x\n" noexpand"#,
        ),
        (
            "RUN <<'EOF'\necho $x\nEOF",
            r#"RUN shell:<<'EOF' doc:EOF="echo $x\n" noexpand"#,
        ),
        (
            "RUN <<A cat && cat <<B\na\nA\nb\nB",
            r#"RUN shell:<<A cat && cat <<B doc:A="a\n" doc:B="b\n""#,
        ),
        (
            "RUN <<EOF\necho hi",
            "ERR Dockerfile:2: unterminated heredoc: missing EOF",
        ),
        ("RUN cat <<<word", "RUN shell:cat <<<word"),
        ("RUN echo \\\n  a && \\\n  b", "RUN shell:echo   a &&   b"),
    ]);
}

#[test]
fn copy_add_table() {
    check_table(&[
        ("COPY a b", "COPY a -> b"),
        ("COPY a b c/", "COPY a,b -> c/"),
        ("copy   a   /x", "COPY a -> /x"),
        (r#"COPY ["a b", "/x y/"]"#, "COPY a b -> /x y/"),
        ("COPY --from=builder /a /b", "COPY /a -> /b from=builder"),
        ("COPY --from=0 /a /b", "COPY /a -> /b from=0"),
        ("COPY --chown=1000:1000 a b", "COPY a -> b chown=1000:1000"),
        ("COPY --chmod=0755 a b", "COPY a -> b chmod=0755"),
        (
            "COPY --chown=u:g --chmod=u=rwx a b",
            "COPY a -> b chown=u:g chmod=u=rwx",
        ),
        ("COPY --link a b", "COPY a -> b link"),
        ("COPY --link=false a b", "COPY a -> b"),
        (
            "COPY --link=maybe a b",
            "ERR Dockerfile:2: COPY: expecting boolean value for flag link, not: maybe",
        ),
        ("COPY --parents a/./b c", "COPY a/./b -> c parents"),
        (
            "COPY --exclude=*.md --exclude=x . /app",
            "COPY . -> /app exclude=*.md,x",
        ),
        (
            "COPY --checksum=sha256:x a b",
            "ERR Dockerfile:2: unknown flag: checksum for COPY",
        ),
        (
            "COPY a",
            "ERR Dockerfile:2: COPY: COPY requires at least two arguments, but only one was provided. Destination could not be determined",
        ),
        (
            "COPY",
            "ERR Dockerfile:2: COPY: COPY requires at least two arguments, but only one was provided. Destination could not be determined",
        ),
        (
            "COPY <<EOF /etc/x\nk=v\nEOF",
            r#"COPY  -> /etc/x docs=[EOF="k=v\n"]"#,
        ),
        (
            "COPY <<A <<B /d/\na\nA\nb\nB",
            r#"COPY  -> /d/ docs=[A="a\n",B="b\n"]"#,
        ),
        ("COPY $SRC ${DEST}", "COPY $SRC -> ${DEST}"),
        ("ADD a b", "ADD a -> b"),
        ("ADD --chown=1:1 a b", "ADD a -> b chown=1:1"),
        (
            "ADD --checksum=sha256:abc https://x/y /y",
            "ADD https://x/y -> /y checksum=sha256:abc",
        ),
        (
            "ADD --from=x a b",
            "ERR Dockerfile:2: unknown flag: from for ADD",
        ),
    ]);
}

#[test]
fn env_label_arg_table() {
    check_table(&[
        ("ENV a=b", r#"ENV a="b""#),
        ("ENV a=b c=d", r#"ENV a="b" c="d""#),
        ("ENV a b", r#"ENV ~a="b""#),
        ("ENV a b c  d", r#"ENV ~a="b c  d""#),
        (r#"ENV a="b c" d=e"#, r#"ENV a="\"b c\"" d="e""#),
        (r#"ENV a=b\ c"#, r#"ENV a="b\\ c""#),
        ("ENV a=", r#"ENV a="""#),
        ("ENV a=b \\\n    c=d", r#"ENV a="b" c="d""#),
        (
            "ENV a=b c",
            r#"ERR Dockerfile:2: ENV: Syntax error - can't find = in "c". Must be of the form: name=value"#,
        ),
        (
            "ENV =b",
            "ERR Dockerfile:2: ENV: ENV names can not be blank",
        ),
        (
            "ENV a",
            "ERR Dockerfile:2: ENV: ENV must have two arguments",
        ),
        (
            "ENV",
            "ERR Dockerfile:2: ENV: ENV requires at least one argument",
        ),
        ("LABEL a=b", r#"LABEL a="b""#),
        (r#"LABEL "com.x"="y z""#, r#"LABEL "com.x"="\"y z\"""#),
        ("LABEL a b", r#"LABEL ~a="b""#),
        ("ARG a", "ARG a"),
        ("ARG a=1", r#"ARG a="1""#),
        ("ARG a=1 b c=", r#"ARG a="1" b c="""#),
        (r#"ARG a="x y""#, r#"ARG a="\"x y\"""#),
        (
            "ARG =x",
            "ERR Dockerfile:2: ARG: ARG names can not be blank",
        ),
    ]);
}

#[test]
fn simple_instruction_table() {
    check_table(&[
        ("WORKDIR /app", "WORKDIR /app"),
        ("WORKDIR a b", "WORKDIR a b"),
        (
            "WORKDIR",
            "ERR Dockerfile:2: WORKDIR: WORKDIR requires at least one argument",
        ),
        ("USER 1000:1000", "USER 1000:1000"),
        ("USER nobody", "USER nobody"),
        ("STOPSIGNAL SIGTERM", "STOPSIGNAL SIGTERM"),
        ("MAINTAINER me <me@x>", "MAINTAINER me <me@x>"),
        ("CMD echo hi", "CMD shell:echo hi"),
        (r#"CMD ["cat", "/f"]"#, r#"CMD exec:["cat", "/f"]"#),
        ("CMD []", "CMD exec:[]"),
        ("CMD", "CMD shell:"),
        (r#"ENTRYPOINT ["/app"]"#, r#"ENTRYPOINT exec:["/app"]"#),
        ("ENTRYPOINT exec /app", "ENTRYPOINT shell:exec /app"),
        ("EXPOSE 80", r#"EXPOSE ["80"]"#),
        ("EXPOSE 80/tcp 53/udp", r#"EXPOSE ["53/udp", "80/tcp"]"#),
        (
            "EXPOSE",
            "ERR Dockerfile:2: EXPOSE: EXPOSE requires at least one argument",
        ),
        (
            r#"SHELL ["/bin/bash", "-c"]"#,
            r#"SHELL ["/bin/bash", "-c"]"#,
        ),
        (
            "SHELL /bin/bash -c",
            "ERR Dockerfile:2: SHELL: SHELL requires the arguments to be in JSON form",
        ),
        ("VOLUME /data", r#"VOLUME ["/data"]"#),
        ("VOLUME /a /b", r#"VOLUME ["/a", "/b"]"#),
        (r#"VOLUME ["/a", "/b"]"#, r#"VOLUME ["/a", "/b"]"#),
        (
            r#"VOLUME [""]"#,
            "ERR Dockerfile:2: VOLUME: VOLUME specified can not be an empty string",
        ),
        ("HEALTHCHECK NONE", r#"HEALTHCHECK ["NONE"]"#),
        (
            "HEALTHCHECK --interval=5s --retries=3 CMD curl -f x",
            r#"HEALTHCHECK ["CMD-SHELL", "curl -f x"] interval=5s retries=3"#,
        ),
        (
            r#"HEALTHCHECK CMD ["curl", "x"]"#,
            r#"HEALTHCHECK ["CMD", "curl", "x"]"#,
        ),
        (
            "HEALTHCHECK --retries=x CMD a",
            r#"ERR Dockerfile:2: HEALTHCHECK: invalid retries "x""#,
        ),
        (
            "HEALTHCHECK FOO",
            r#"ERR Dockerfile:2: HEALTHCHECK: unknown type "FOO" in HEALTHCHECK (try CMD)"#,
        ),
        (
            "ONBUILD RUN echo hi",
            r#"ONBUILD "RUN echo hi" => RUN shell:echo hi"#,
        ),
        (
            "ONBUILD COPY --from=x a b",
            r#"ONBUILD "COPY --from=x a b" => COPY a -> b from=x"#,
        ),
        (
            "ONBUILD ONBUILD RUN x",
            "ERR Dockerfile:2: ONBUILD: chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
        ),
        (
            "ONBUILD FROM x",
            "ERR Dockerfile:2: ONBUILD: FROM isn't allowed as an ONBUILD trigger",
        ),
    ]);
}

#[test]
fn odd_input_table() {
    check_table(&[
        ("FOO bar", "ERR Dockerfile:2: unknown instruction: FOO"),
        ("\n\nbogus", "ERR Dockerfile:4: unknown instruction: BOGUS"),
        ("# just a comment", ""),
        ("   \t ", ""),
        (r#"\"#, ""),
        ("ENV --x=1 a=b", "ERR Dockerfile:2: unknown flag: x for ENV"),
        ("RUN 😀", "RUN shell:😀"),
        ("RUN a\r\nRUN b\r\n", "RUN shell:a\nRUN shell:b"),
    ]);
}
