//! The body shared by the libFuzzer target (`cargo fuzz run parse_and_expand`)
//! and the stable-toolchain random-input loop (`run-stable.sh`): parse a
//! Dockerfile, then expand every word the converter would expand. Any panic
//! is a bug; errors are fine.

use kiln_dockerfile::{Instruction, Lex};

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
