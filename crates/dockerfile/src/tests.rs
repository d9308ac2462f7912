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

fn render(i: &Instruction) -> String {
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
            }
            s
        }
        Instruction::Copy(c) => render_copy("COPY", c),
        Instruction::Add(c) => render_copy("ADD", c),
        Instruction::Env(kvs) | Instruction::Label(kvs) => {
            let kw = i.keyword();
            let parts: Vec<String> = kvs
                .iter()
                .map(|kv| format!("{}={:?}", kv.key, kv.value))
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
        Instruction::Onbuild(_, inner) => format!("ONBUILD {}", render(inner)),
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

/// Checks each (Dockerfile lines after `FROM scratch`, rendering) case, with
/// `ERR substring` for errors, reporting every failure at once.
fn check_table(cases: &[(&str, &str)]) {
    let mut failures = Vec::new();
    for (input, want) in cases {
        let got = check(input);
        let ok = match want.strip_prefix("ERR ") {
            Some(sub) => got.starts_with("ERR ") && got.contains(sub),
            None => &got == want,
        };
        if !ok {
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
        ("RUN [\"echo\", \"hi\"]", "RUN exec:[\"echo\", \"hi\"]"),
        ("RUN [\"a\",\"b c\"]", "RUN exec:[\"a\", \"b c\"]"),
        ("RUN []", "RUN exec:[]"),
        ("RUN [ \"x\" ]", "RUN exec:[\"x\"]"),
        ("RUN [not json]", "RUN shell:[not json]"),
        ("RUN [\"unterminated\"", "RUN shell:[\"unterminated\""),
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
        ("RUN --nope true", "ERR unknown flag"),
        ("RUN", "ERR RUN"),
        (
            "RUN <<EOF\necho hi\nEOF",
            "RUN shell:<<EOF doc:EOF=\"echo hi\\n\"",
        ),
        (
            "RUN <<-EOF\n\techo hi\n\tEOF",
            "RUN shell:<<-EOF doc:EOF=\"echo hi\\n\"",
        ),
        (
            "RUN cat <<A <<B\na\nA\nb\nB",
            "RUN shell:cat <<A <<B doc:A=\"a\\n\" doc:B=\"b\\n\"",
        ),
        ("RUN <<EOF\nnever ends", "ERR unterminated heredoc"),
    ]);
}

#[test]
fn copy_add_instructions() {
    check_table(&[
        ("COPY a b", "COPY a -> b"),
        ("COPY a b c/", "COPY a,b -> c/"),
        ("COPY [\"a b\", \"c\"]", "COPY a b -> c"),
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
        ("COPY a", "ERR COPY"),
        ("COPY", "ERR COPY"),
        ("COPY --bogus a b", "ERR unknown flag"),
        ("COPY --checksum=sha256:00 a b", "ERR unknown flag"),
        (
            "COPY <<EOF /f\nhello\nEOF",
            "COPY  -> /f docs=[EOF=\"hello\\n\"]",
        ),
        (
            "COPY <<\"EOF\" /f\n$X\nEOF",
            "COPY  -> /f docs=[EOF=\"$X\\n\"]",
        ),
        (
            "COPY <<A <<B /d/\n1\nA\n2\nB",
            "COPY  -> /d/ docs=[A=\"1\\n\",B=\"2\\n\"]",
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
        ("ENV A=1", "ENV A=\"1\""),
        ("ENV A=1 B=2", "ENV A=\"1\" B=\"2\""),
        ("ENV A 1", "ENV A=\"1\""),
        ("ENV A hello world", "ENV A=\"hello world\""),
        ("ENV A=\"x y\"", "ENV A=\"\\\"x y\\\"\""),
        ("ENV A=", "ENV A=\"\""),
        ("ENV A=a\\ b", "ENV A=\"a\\\\ b\""),
        ("ENV A=1 \\\n    B=2", "ENV A=\"1\" B=\"2\""),
        ("ENV", "ERR ENV"),
        ("ENV =x", "ERR ENV"),
        ("LABEL a=b", "LABEL a=\"b\""),
        ("LABEL \"a b\"=c", "LABEL \"a b\"=\"c\""),
        ("LABEL a=1 b=2", "LABEL a=\"1\" b=\"2\""),
        ("LABEL a b", "LABEL a=\"b\""),
    ]);
}

#[test]
fn arg_instructions() {
    check_table(&[
        ("ARG A", "ARG A"),
        ("ARG A=1", "ARG A=\"1\""),
        ("ARG A=1 B", "ARG A=\"1\" B"),
        ("ARG A=", "ARG A=\"\""),
        ("ARG A=$B", "ARG A=\"$B\""),
        ("ARG", "ERR ARG"),
    ]);
}

#[test]
fn workdir_user_stopsignal_maintainer() {
    check_table(&[
        ("WORKDIR /a", "WORKDIR /a"),
        ("WORKDIR rel", "WORKDIR rel"),
        ("WORKDIR $D", "WORKDIR $D"),
        ("WORKDIR", "ERR WORKDIR"),
        ("USER 1000", "USER 1000"),
        ("USER app:grp", "USER app:grp"),
        ("USER", "ERR USER"),
        ("STOPSIGNAL SIGKILL", "STOPSIGNAL SIGKILL"),
        ("STOPSIGNAL 9", "STOPSIGNAL 9"),
        ("MAINTAINER a <b@c>", "MAINTAINER a <b@c>"),
    ]);
}

#[test]
fn cmd_entrypoint_shell() {
    check_table(&[
        ("CMD echo hi", "CMD shell:echo hi"),
        ("CMD [\"echo\", \"hi\"]", "CMD exec:[\"echo\", \"hi\"]"),
        ("CMD []", "CMD exec:[]"),
        ("CMD [\"a\\\"b\"]", "CMD exec:[\"a\\\"b\"]"),
        (
            "ENTRYPOINT [\"/bin/app\"]",
            "ENTRYPOINT exec:[\"/bin/app\"]",
        ),
        (
            "ENTRYPOINT /bin/app --flag",
            "ENTRYPOINT shell:/bin/app --flag",
        ),
        (
            "SHELL [\"/bin/bash\", \"-c\"]",
            "SHELL [\"/bin/bash\", \"-c\"]",
        ),
        ("SHELL /bin/bash -c", "ERR SHELL"),
    ]);
}

#[test]
fn expose_volume() {
    check_table(&[
        ("EXPOSE 80", "EXPOSE [\"80\"]"),
        ("EXPOSE 80/tcp 53/udp", "EXPOSE [\"80/tcp\", \"53/udp\"]"),
        ("EXPOSE", "ERR EXPOSE"),
        ("VOLUME /v", "VOLUME [\"/v\"]"),
        ("VOLUME /a /b", "VOLUME [\"/a\", \"/b\"]"),
        ("VOLUME [\"/a\", \"/b\"]", "VOLUME [\"/a\", \"/b\"]"),
        ("VOLUME", "ERR VOLUME"),
    ]);
}

#[test]
fn healthcheck_instructions() {
    check_table(&[
        ("HEALTHCHECK NONE", "HEALTHCHECK [\"NONE\"]"),
        (
            "HEALTHCHECK CMD true",
            "HEALTHCHECK [\"CMD-SHELL\", \"true\"]",
        ),
        (
            "HEALTHCHECK CMD [\"/check\", \"-q\"]",
            "HEALTHCHECK [\"CMD\", \"/check\", \"-q\"]",
        ),
        (
            "HEALTHCHECK --interval=5s --timeout=1s --start-period=2s --start-interval=1s --retries=4 CMD x",
            "HEALTHCHECK [\"CMD-SHELL\", \"x\"] interval=5s timeout=1s start-period=2s start-interval=1s retries=4",
        ),
        ("HEALTHCHECK --bogus=1 CMD x", "ERR unknown flag"),
        ("HEALTHCHECK NONE extra", "ERR HEALTHCHECK"),
        ("HEALTHCHECK", "ERR HEALTHCHECK"),
    ]);
}

#[test]
fn onbuild_instructions() {
    check_table(&[
        ("ONBUILD RUN echo hi", "ONBUILD RUN shell:echo hi"),
        ("ONBUILD COPY . /app", "ONBUILD COPY . -> /app"),
        ("ONBUILD ONBUILD RUN x", "ERR ONBUILD"),
        ("ONBUILD FROM busybox", "ERR ONBUILD"),
        ("ONBUILD MAINTAINER x", "ERR ONBUILD"),
    ]);
}

#[test]
fn unknown_and_several_instructions() {
    check_table(&[
        ("NOPE x", "ERR unknown instruction"),
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
        let ok = match want.strip_prefix("ERR ") {
            Some(sub) => got.starts_with("ERR ") && got.contains(sub),
            None => &got == want,
        };
        if !ok {
            failures.push(format!("{input:?}\n   want {want}\n    got {got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
