//! Cache-miss explanations (`kiln build --explain-cache`).
//!
//! Each time a step runs, the solver records what went into its cache key
//! ([`StepRecord`]: facts about the op's own definition, and per input its
//! key, the step that produced it, and, when asked for explanations, every
//! file it reads with content digest, mode and owner) under the step's
//! stable identity across builds ([`shape`]: the client's project, the
//! Dockerfile location of the instruction and the op kind). When the step
//! runs again, [`explain`] compares the new record with the last one and
//! says what changed: a build arg, a file of the context (content, mode or
//! owner), the base image digest, or an input step that re-ran itself.

use kiln_proto::pb::{self, op::Op as OpKind};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A file an op reads, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FileFact {
    /// content digest (files), `link:<target>` (symlinks), empty (dirs)
    pub content: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// One input of a recorded step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct InputRecord {
    /// the cache key the step saw for this input
    pub key: String,
    /// name of the step that produced it
    pub from: String,
    /// checksum of the paths read, when the op reads only some paths
    pub content: Option<String>,
    /// the files read, by path (recorded only when explanations are asked for)
    pub files: Option<BTreeMap<String, FileFact>>,
}

/// What went into a step's cache key the last time it ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StepRecord {
    pub name: String,
    /// facts about the op's own definition ("args", "env:NAME", "image", ...)
    pub op: BTreeMap<String, String>,
    pub inputs: Vec<InputRecord>,
    /// names of the build args of that build
    pub build_args: BTreeSet<String>,
}

/// A step's identity across builds: the project (`scope`: the client's
/// shared session key, target, Dockerfile name), the source location of the
/// instruction it came from, and the op kind; the step's name when the
/// definition carries no locations.
pub fn shape(
    scope: &str,
    graph: &kiln_llb::Graph,
    digest: &str,
    op: &pb::Op,
    name: &str,
) -> String {
    let kind = crate::step::op_kind(op);
    let mut h = kiln_digest::Hasher::new();
    h.update(scope.as_bytes());
    h.update(&[0]);
    h.update(kind.as_bytes());
    h.update(&[0]);
    let loc = graph.locations(digest).first().and_then(|loc| {
        let info = graph
            .source
            .as_ref()?
            .infos
            .get(usize::try_from(loc.source_index).ok()?)?;
        let r = loc.ranges.first()?;
        Some(format!(
            "{}:{}-{}",
            info.filename,
            r.start.as_ref().map(|p| p.line).unwrap_or(0),
            r.end.as_ref().map(|p| p.line).unwrap_or(0)
        ))
    });
    match loc {
        Some(l) => h.update(l.as_bytes()),
        None => h.update(name.as_bytes()),
    }
    h.finish()
}

/// Facts about an op's own definition (not its inputs), by name.
pub fn op_facts(op: &pb::Op) -> BTreeMap<String, String> {
    let mut f = BTreeMap::new();
    match &op.op {
        Some(OpKind::Exec(e)) => {
            if let Some(m) = &e.meta {
                f.insert("command".into(), format!("{:?}", m.args));
                for kv in &m.env {
                    let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
                    f.insert(format!("env:{k}"), v.to_string());
                }
                f.insert("workdir".into(), m.cwd.clone());
                f.insert("user".into(), m.user.clone());
                if !m.hostname.is_empty() {
                    f.insert("hostname".into(), m.hostname.clone());
                }
                for h in &m.extra_hosts {
                    f.insert(format!("host:{}", h.host), h.ip.clone());
                }
            }
            f.insert("network".into(), e.network.to_string());
            f.insert("security".into(), e.security.to_string());
            for m in &e.mounts {
                let mut m = m.clone();
                m.input = i64::from(m.input >= 0);
                f.insert(format!("mount:{}", m.dest), format!("{m:?}"));
            }
        }
        Some(OpKind::Source(s)) => {
            let (name, digest) = match s.identifier.split_once('@') {
                Some((n, d)) => (n.to_string(), d.to_string()),
                None => (s.identifier.clone(), String::new()),
            };
            f.insert("source".into(), name);
            if !digest.is_empty() {
                f.insert("source digest".into(), digest);
            }
            for (k, v) in &s.attrs {
                if !matches!(
                    k.as_str(),
                    "local.session"
                        | "local.unique"
                        | "local.sharedkeyhint"
                        | kiln_session::ocilayout::ATTR_SESSION
                        | kiln_session::ocilayout::ATTR_STORE
                ) {
                    f.insert(format!("attr:{k}"), v.clone());
                }
            }
        }
        Some(OpKind::File(file)) => {
            for (i, a) in file.actions.iter().enumerate() {
                f.insert(format!("action {i}"), format!("{:?}", a.action));
            }
        }
        Some(OpKind::Merge(_)) => {
            f.insert("op".into(), "merge".into());
        }
        Some(OpKind::Diff(_)) => {
            f.insert("op".into(), "diff".into());
        }
        _ => {}
    }
    if let Some(p) = &op.platform {
        f.insert(
            "platform".into(),
            format!("{}/{}{}", p.os, p.architecture, p.variant),
        );
    }
    f
}

fn short(v: &str) -> String {
    if v.chars().count() > 80 {
        format!("{}…", v.chars().take(80).collect::<String>())
    } else {
        v.to_string()
    }
}

fn rel(p: &str) -> &str {
    let r = p.trim_start_matches('/');
    if r.is_empty() { "/" } else { r }
}

const MAX_FILES: usize = 20;

/// What changed in the files an input provides.
fn file_changes(
    from: &str,
    old: &BTreeMap<String, FileFact>,
    new: &BTreeMap<String, FileFact>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (p, n) in new {
        match old.get(p) {
            None => out.push(format!("file {} was added (in {from})", rel(p))),
            Some(o) if o == n => {}
            Some(o) => {
                let mut what = Vec::new();
                if o.content != n.content {
                    what.push("content changed".to_string());
                }
                if o.mode != n.mode {
                    what.push(format!(
                        "mode changed: {:o} -> {:o}",
                        o.mode & 0o7777,
                        n.mode & 0o7777
                    ));
                }
                if (o.uid, o.gid) != (n.uid, n.gid) {
                    what.push(format!(
                        "owner changed: {}:{} -> {}:{}",
                        o.uid, o.gid, n.uid, n.gid
                    ));
                }
                out.push(format!("file {} ({from}): {}", rel(p), what.join(", ")));
            }
        }
    }
    for p in old.keys().filter(|p| !new.contains_key(*p)) {
        out.push(format!("file {} was removed (from {from})", rel(p)));
    }
    if out.len() > MAX_FILES {
        let more = out.len() - MAX_FILES;
        out.truncate(MAX_FILES);
        out.push(format!("... and {more} more changed files"));
    }
    out
}

/// Why a step ran again: what differs between the `prev` record and `cur`.
/// `upstream` gives, for input steps that re-ran in this build, their own
/// first reason.
pub fn explain(
    prev: Option<&StepRecord>,
    cur: &StepRecord,
    upstream: &dyn Fn(usize) -> Option<String>,
) -> Vec<String> {
    let Some(prev) = prev else {
        return vec!["no earlier run of this step is recorded".into()];
    };
    let mut out = Vec::new();
    let keys: BTreeSet<&String> = prev.op.keys().chain(cur.op.keys()).collect();
    let mut source_changed = false;
    for k in keys {
        let (o, n) = (prev.op.get(k), cur.op.get(k));
        if o == n {
            continue;
        }
        let show = |v: Option<&String>| match v {
            Some(v) => format!("{:?}", short(v)),
            None => "unset".to_string(),
        };
        if let Some(name) = k.strip_prefix("env:") {
            let is_arg = cur.build_args.contains(name) || prev.build_args.contains(name);
            let what = if is_arg {
                "build arg"
            } else {
                "environment variable"
            };
            out.push(format!("{what} {name} changed: {} -> {}", show(o), show(n)));
        } else if k == "source digest" {
            let image = cur.op.get("source").cloned().unwrap_or_default();
            let image = image.strip_prefix("docker-image://").unwrap_or(&image);
            out.push(format!(
                "base image {image} digest changed: {} -> {}",
                o.map(String::as_str).unwrap_or("none"),
                n.map(String::as_str).unwrap_or("none")
            ));
            source_changed = true;
        } else if k == "source" {
            if !source_changed {
                out.push(format!("source changed: {} -> {}", show(o), show(n)));
            }
        } else {
            out.push(format!("{k} changed: {} -> {}", show(o), show(n)));
        }
    }
    if prev.inputs.len() != cur.inputs.len() {
        out.push(format!(
            "number of inputs changed: {} -> {}",
            prev.inputs.len(),
            cur.inputs.len()
        ));
        return out;
    }
    for (i, (o, n)) in prev.inputs.iter().zip(&cur.inputs).enumerate() {
        if o.key == n.key && o.content == n.content {
            continue;
        }
        match (&o.files, &n.files) {
            (Some(of), Some(nf)) if o.content.is_none() || o.content != n.content => {
                let ch = file_changes(&n.from, of, nf);
                if ch.is_empty() {
                    out.push(format!("input {:?} changed", n.from));
                } else {
                    out.extend(ch);
                }
                continue;
            }
            _ => {}
        }
        if o.content.is_some() && o.content != n.content {
            out.push(format!(
                "the files it reads from {:?} changed (no per-file record of the earlier run: pass --explain-cache to both builds)",
                n.from
            ));
            continue;
        }
        match upstream(i) {
            Some(why) => out.push(format!("input {:?} changed: {why}", n.from)),
            None => out.push(format!("input {:?} changed", n.from)),
        }
    }
    if out.is_empty() {
        out.push("its cache record was gone (pruned, or --no-cache)".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(content: &str, mode: u32) -> FileFact {
        FileFact {
            content: content.into(),
            mode,
            uid: 0,
            gid: 0,
        }
    }

    fn rec(op: &[(&str, &str)], inputs: Vec<InputRecord>) -> StepRecord {
        StepRecord {
            name: "step".into(),
            op: op
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            inputs,
            build_args: ["FOO".to_string()].into(),
        }
    }

    fn none(_: usize) -> Option<String> {
        None
    }

    #[test]
    fn build_args_env_and_image_digests_are_named() {
        let a = rec(&[("env:FOO", "1"), ("env:PATH", "/bin")], vec![]);
        let b = rec(&[("env:FOO", "2"), ("env:PATH", "/usr/bin")], vec![]);
        let why = explain(Some(&a), &b, &none);
        assert_eq!(
            why,
            [
                "build arg FOO changed: \"1\" -> \"2\"",
                "environment variable PATH changed: \"/bin\" -> \"/usr/bin\""
            ]
        );
        let i1 = rec(
            &[
                ("source", "docker-image://docker.io/library/busybox:latest"),
                ("source digest", "sha256:aaa"),
            ],
            vec![],
        );
        let mut i2 = i1.clone();
        i2.op.insert("source digest".into(), "sha256:bbb".into());
        assert_eq!(
            explain(Some(&i1), &i2, &none),
            [
                "base image docker.io/library/busybox:latest digest changed: sha256:aaa -> sha256:bbb"
            ]
        );
        assert_eq!(
            explain(None, &i2, &none),
            ["no earlier run of this step is recorded"]
        );
    }

    #[test]
    fn files_say_content_mode_or_owner() {
        let input = |files: &[(&str, FileFact)], key: &str| InputRecord {
            key: key.into(),
            from: "context".into(),
            content: Some(format!("c-{key}")),
            files: Some(
                files
                    .iter()
                    .map(|(p, f)| (p.to_string(), f.clone()))
                    .collect(),
            ),
        };
        let a = rec(
            &[],
            vec![input(
                &[("/a.txt", file("x", 0o100644)), ("/b", file("y", 0o100644))],
                "1",
            )],
        );
        let b = rec(
            &[],
            vec![input(
                &[("/a.txt", file("z", 0o100644)), ("/b", file("y", 0o100600))],
                "2",
            )],
        );
        assert_eq!(
            explain(Some(&a), &b, &none),
            [
                "file a.txt (context): content changed",
                "file b (context): mode changed: 644 -> 600"
            ]
        );
        let mut c = b.clone();
        if let Some(f) = c.inputs[0].files.as_mut().and_then(|f| f.get_mut("/b")) {
            f.uid = 1000;
        }
        c.inputs[0].key = "3".into();
        c.inputs[0].content = Some("c-3".into());
        assert_eq!(
            explain(Some(&b), &c, &none),
            ["file b (context): owner changed: 0:0 -> 1000:0"]
        );
        // no per-file record of the earlier run
        let mut d = a.clone();
        d.inputs[0].files = None;
        assert!(explain(Some(&d), &b, &none)[0].starts_with("the files it reads from"));
    }

    #[test]
    fn inputs_name_the_step_and_its_reason() {
        let input = |key: &str| InputRecord {
            key: key.into(),
            from: "[2/3] COPY a.txt /a.txt".into(),
            content: None,
            files: None,
        };
        let a = rec(&[], vec![input("1")]);
        let b = rec(&[], vec![input("2")]);
        let up = |i: usize| (i == 0).then(|| "file a.txt (context): content changed".to_string());
        assert_eq!(
            explain(Some(&a), &b, &up),
            ["input \"[2/3] COPY a.txt /a.txt\" changed: file a.txt (context): content changed"]
        );
        assert_eq!(
            explain(Some(&a), &a, &none),
            ["its cache record was gone (pruned, or --no-cache)"]
        );
    }
}
