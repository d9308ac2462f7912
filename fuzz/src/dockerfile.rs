//! `dockerfile`: the Dockerfile parser and expander (`kiln_dockerfile`), as
//! the libFuzzer target `parse_and_expand` also runs it: parse a Dockerfile,
//! then expand every word the converter would expand. Any panic is a bug;
//! errors are fine.

use kiln_dockerfile::{Instruction, Lex};

use crate::Target;

pub fn target() -> Target {
    Target {
        name: "dockerfile",
        about: "Dockerfile parsing and word expansion (kiln_dockerfile)",
        run: exercise,
        seeds: || SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect(),
        tokens: TOKENS,
        mutate: None,
        max_len: 4096,
    }
}

/// Dockerfile snippets the mutator starts from.
pub const SEEDS: &[&str] = &[
    "FROM busybox\nRUN echo hi\n",
    "# syntax=docker/dockerfile:1\n# escape=`\nFROM busybox AS a\nRUN echo `\n  hi\n",
    "ARG BASE=busybox\nFROM ${BASE:-x} AS b\nENV A=1 B=\"two words\" C=${A:+set}\nLABEL \"k\"='v'\n",
    "FROM scratch\nCOPY --from=0 --chown=1:2 --chmod=0755 a* /b/\nADD --checksum=sha256:00 http://x/y /z\n",
    "FROM busybox\nRUN <<EOF cat\nline $A\nEOF\nCOPY <<-\"EOT\" /f\n\tx\n\tEOT\n",
    "FROM busybox\nRUN --mount=type=cache,target=/c,id=x,sharing=locked --network=none [\"sh\",\"-c\",\"x\"]\n",
    "FROM busybox\nHEALTHCHECK --interval=5s CMD [\"true\"]\nONBUILD RUN x\nSHELL [\"/bin/sh\",\"-c\"]\nEXPOSE 80/tcp ${P}\nVOLUME [\"/v\"]\n",
    "FROM busybox\nENV a b c\nUSER 1:1\nWORKDIR rel\nSTOPSIGNAL SIGKILL\nCMD x\nENTRYPOINT [\"y\"]\n",
    "FROM busybox\nRUN echo \\\n# comment\n  more \\\n\n  end\n",
    "FROM ${BASE} AS one\nFROM img\nCOPY --from=one /a /b\nCOPY --from=ctx . /c\nCOPY --exclude=*.md --parents a/./b /d/\nADD --link --chown=x:y https://e/f.tar /g\nRUN --mount=type=bind,from=one,target=/m --mount=type=secret,id=s --mount=type=ssh true\n",
];

/// Dockerfile tokens the mutator inserts.
pub const TOKENS: &[&[u8]] = &[
    b"\n",
    b" ",
    b"\\",
    b"`",
    b"\\\n",
    b"`\n",
    b"$",
    b"${",
    b"}",
    b":-",
    b":+",
    b"-",
    b"+",
    b":?",
    b"?",
    b"'",
    b"\"",
    b"<<",
    b"<<-",
    b"EOF",
    b"\"EOF\"",
    b"'EOF'",
    b"#",
    b"# escape=`\n",
    b"# syntax=x\n",
    b"[",
    b"]",
    b",",
    b"=",
    b"--",
    b"--from=",
    b"--mount=",
    b"FROM ",
    b"RUN ",
    b"COPY ",
    b"ADD ",
    b"ENV ",
    b"ARG ",
    b"ONBUILD ",
    b"HEALTHCHECK ",
    b"CMD ",
    b"\t",
    b"\r\n",
    "é".as_bytes(),
    b"\0",
    b"${A:-${B:+$C}}",
    b"\\$",
    b"AS ",
    b"WORKDIR ",
    b"USER ",
    b"SHELL ",
    b"VOLUME ",
    b"EXPOSE ",
    b"LABEL ",
    b"STOPSIGNAL ",
    b"MAINTAINER ",
    b"--platform=",
    b"linux/arm64",
    b"$TARGETPLATFORM",
    b"$BUILDPLATFORM",
    b"--chmod=",
    b"--chown=",
    b"--link",
    b"--parents",
    b"--exclude=",
    b"--network=",
    b"--security=insecure",
    b"type=cache,",
    b"type=bind,",
    b"type=tmpfs,",
    b"type=secret,",
    b"type=ssh,",
    b"target=",
    b"source=",
    b"from=",
    b"../",
    b"/",
    b"*",
    b"**",
    b"scratch",
    b"onbuild",
    b"debian",
    b"missing",
    b"img",
    b"ctx",
    b"git@github.com:x/y.git",
    b"https://x/y.tar.gz",
    b"4294967296",
    b"-1",
    b"u+x,g-w",
];

/// Runs the parser and the expander over `data`. Never panics unless kiln_dockerfile does.
pub fn exercise(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // The whole text as one word, with both escape characters and every lexer mode.
    let env: Vec<(String, String)> = vec![
        ("A".into(), "a b".into()),
        ("EMPTY".into(), String::new()),
        ("X".into(), "$A".into()),
    ];
    for escape in ['\\', '`'] {
        let lex = Lex::new(escape);
        let _ = lex.process_word(&text, &env);
        let _ = lex.process_words(&text, &env);
        let _ = lex.raw_quotes(true).process_word(&text, &env);
        let _ = lex.skip_unset_env(true).process_word(&text, &env);
        let _ = lex.skip_quotes(true).process_word(&text, &env);
    }
    let _ = kiln_dockerfile::parse_command(&text, '\\');
    let Ok(df) = kiln_dockerfile::parse(&text) else {
        return;
    };
    let lex = Lex::new(df.directives.escape);
    for cmd in &df.meta_args {
        let mut ins = cmd.instruction.clone();
        let _ = ins.expand(&lex, &env);
    }
    for stage in &df.stages {
        let _ = lex.process_word(&stage.base, &env);
        if let Some(p) = &stage.platform {
            let _ = lex.process_word(p, &env);
        }
        for cmd in &stage.commands {
            let mut ins = cmd.instruction.clone();
            let _ = ins.expand(&lex, &env);
            match &cmd.instruction {
                Instruction::Run(run) => {
                    for m in &run.mounts {
                        let _ = kiln_dockerfile::parse_mount(m);
                    }
                }
                Instruction::Copy(c) | Instruction::Add(c) => {
                    for d in &c.source_contents {
                        let _ = d.content();
                    }
                }
                Instruction::Onbuild(expr, _) => {
                    let _ = kiln_dockerfile::parse_command(expr, df.directives.escape);
                }
                _ => {}
            }
        }
    }
}
