//! Build args: the global (meta) ARGs before the first FROM with BuildKit's
//! automatic platform ARGs, and the ARG instruction inside a stage.

use std::collections::BTreeMap;

use kiln_dockerfile::{ArgDecl, Command, Dockerfile, Instruction, Lex};
use kiln_oci::Platform;

use super::stage::{StageArg, StageState};
use super::{Error, line_of};

/// Args in the order they were set, each key once (at its last value).
#[derive(Debug, Clone, Default)]
pub(crate) struct Args(Vec<(String, String)>);

impl Args {
    pub(crate) fn set(&mut self, key: &str, value: &str) {
        self.0.retain(|(k, _)| k != key);
        self.0.push((key.to_string(), value.to_string()));
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The args as an environment for word expansion.
    pub(crate) fn pairs(&self) -> &Vec<(String, String)> {
        &self.0
    }
}

/// BuildKit's automatic platform ARGs (`BUILDPLATFORM`, `TARGETARCH`, ...).
pub(crate) fn platform_args(target: &Platform, build: &Platform) -> Args {
    let mut args = Args::default();
    for (prefix, p) in [("BUILD", build), ("TARGET", target)] {
        args.set(&format!("{prefix}PLATFORM"), &p.to_string());
        args.set(&format!("{prefix}OS"), &p.os);
        args.set(
            &format!("{prefix}OSVERSION"),
            p.os_version.as_deref().unwrap_or(""),
        );
        args.set(&format!("{prefix}ARCH"), &p.architecture);
        args.set(
            &format!("{prefix}VARIANT"),
            p.variant.as_deref().unwrap_or(""),
        );
    }
    args
}

/// The args usable in FROM: the platform ARGs and `TARGETSTAGE` (the target
/// stage's name, `default` for an unnamed last stage), each replaced by a
/// build arg of its name, then each global ARG's build arg or (expanded) default.
pub(crate) fn global_args(
    df: &Dockerfile,
    lex: &Lex,
    build_args: &BTreeMap<String, String>,
    target: &Platform,
    target_stage: Option<&str>,
) -> Result<Args, Error> {
    let mut args = platform_args(target, &Platform::host());
    let stage = match target_stage {
        Some(t) if !t.is_empty() => t.to_string(),
        _ => df
            .stages
            .last()
            .and_then(|s| s.name.clone())
            .unwrap_or_else(|| "default".to_string()),
    };
    args.set("TARGETSTAGE", &stage);
    let automatic: Vec<String> = args.pairs().iter().map(|(k, _)| k.clone()).collect();
    for key in automatic {
        if let Some(v) = build_args.get(&key) {
            args.set(&key, v);
        }
    }
    for cmd in &df.meta_args {
        let Instruction::Arg(decls) = &cmd.instruction else {
            continue;
        };
        for d in decls {
            if let Some(v) = global_value(cmd, d, lex, build_args, &args)? {
                args.set(&d.key, &v);
            }
        }
    }
    Ok(args)
}

fn global_value(
    cmd: &Command,
    d: &ArgDecl,
    lex: &Lex,
    build_args: &BTreeMap<String, String>,
    args: &Args,
) -> Result<Option<String>, Error> {
    if let Some(v) = build_args.get(&d.key) {
        return Ok(Some(v.clone()));
    }
    let Some(default) = &d.default else {
        return Ok(None);
    };
    lex.process_word(default, args.pairs())
        .map(Some)
        .map_err(|source| Error::Expand {
            line: line_of(cmd),
            source,
        })
}

/// ARG inside a stage: build arg, else default (expanded), else the global
/// value. Returns the variables a default used that were neither set nor
/// declared by an earlier ARG of the stage (`UndefinedVar`), each with the
/// names it could have meant.
pub(crate) fn arg(
    lex: &Lex,
    st: &mut StageState,
    decls: &[ArgDecl],
    build_args: &BTreeMap<String, String>,
    global_args: &Args,
    line: usize,
) -> Result<Vec<(String, Vec<String>)>, Error> {
    let mut commit = Vec::new();
    let mut undefined = Vec::new();
    for d in decls {
        let value = if let Some(v) = build_args.get(&d.key) {
            Some(v.clone())
        } else if let Some(def) = &d.default {
            let env = super::lint::Recording::new(&st.env);
            let v = lex
                .process_word(def, &env)
                .map_err(|source| Error::Expand { line, source })?;
            let keys: Vec<String> = st.env.iter().map(|(k, _)| k.clone()).collect();
            for name in env.missing() {
                if !st.build_args.iter().any(|a| a.key == name) {
                    undefined.push((name, keys.clone()));
                }
            }
            Some(v)
        } else {
            global_args.get(&d.key).map(str::to_string)
        };
        if let Some(v) = &value {
            st.add_env(&d.key, v);
        }
        commit.push(match &value {
            Some(v) => format!("{}={v}", d.key),
            None => d.key.clone(),
        });
        st.build_args.push(StageArg {
            key: d.key.clone(),
            value,
        });
    }
    st.commit_empty(format!("ARG {}", commit.join(" ")));
    Ok(undefined)
}
