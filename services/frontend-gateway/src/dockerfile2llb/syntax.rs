//! `# syntax=<image>` and the `BUILDKIT_SYNTAX` build arg (which wins): the
//! frontend image a Dockerfile asks for. `docker/dockerfile` (any tag or
//! digest) is built by the built-in frontend; any other image is run as a
//! frontend image (`gateway.v0`), which gets the request with `source` and
//! `cmdline` set.

use std::collections::BTreeMap;

use super::Error;

/// The build arg that overrides the directive.
const SYNTAX_ARG: &str = "BUILDKIT_SYNTAX";

/// Where the requested frontend image was named.
fn requested(
    directives: &kiln_dockerfile::Directives,
    build_args: &BTreeMap<String, String>,
) -> Option<(String, Option<usize>)> {
    if let Some(r) = build_args.get(SYNTAX_ARG).map(|v| v.trim())
        && !r.is_empty()
    {
        return Some((r.to_string(), None));
    }
    let r = directives.syntax.as_deref().map(str::trim)?;
    (!r.is_empty()).then(|| (r.to_string(), Some(directives.syntax_line)))
}

/// Whether `reference` names the Dockerfile frontend image
/// (`[docker.io/]docker/dockerfile[-upstream][:tag][@digest]`).
fn is_dockerfile_frontend(reference: &str) -> bool {
    let name = reference.split('@').next().unwrap_or_default();
    let name = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => &name[..i],
        _ => name,
    };
    let name = ["docker.io/", "index.docker.io/", "registry-1.docker.io/"]
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name);
    matches!(name, "docker/dockerfile" | "docker/dockerfile-upstream")
}

/// Checks the requested frontend: Ok(Some(note)) when it is the Dockerfile
/// frontend (the note says kiln builds it itself), Ok(None) when none is
/// named, an error naming the image otherwise.
pub(crate) fn check(
    directives: &kiln_dockerfile::Directives,
    build_args: &BTreeMap<String, String>,
) -> Result<Option<String>, Error> {
    let Some((reference, line)) = requested(directives, build_args) else {
        return Ok(None);
    };
    let origin = origin(&reference, line);
    if is_dockerfile_frontend(&reference) {
        return Ok(Some(format!(
            "[internal] {origin}: building with kiln's built-in Dockerfile frontend"
        )));
    }
    Err(Error::ExternalFrontend {
        origin,
        line,
        reference,
    })
}

/// A frontend image a Dockerfile asks for (not the Dockerfile frontend).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendImage {
    pub reference: String,
    /// the directive's whole value, BuildKit's `cmdline` option
    pub cmdline: String,
    /// where it was named: `Dockerfile:1: # syntax=IMAGE` or `build-arg BUILDKIT_SYNTAX=IMAGE`
    pub origin: String,
}

/// The frontend image a Dockerfile asks for, when it is not the Dockerfile
/// frontend. Only the directives are read: a Dockerfile kiln cannot parse still
/// reaches the frontend it names.
pub fn frontend_image(
    dockerfile: &[u8],
    build_args: &BTreeMap<String, String>,
) -> Option<FrontendImage> {
    let text = String::from_utf8_lossy(dockerfile);
    let directives = detect(&text);
    let (cmdline, line) = requested(&directives, build_args)?;
    let reference = cmdline.split_whitespace().next()?.to_string();
    if is_dockerfile_frontend(&reference) {
        return None;
    }
    Some(FrontendImage {
        origin: origin(&cmdline, line),
        reference,
        cmdline,
    })
}

/// The `syntax` directive as BuildKit's `DetectSyntax` finds it to pick a
/// frontend: a first `#!` line is passed over, then come the `# key=value`
/// directives, else the same written `// key=value`, else the `"syntax"`
/// string of a JSON object. Directives it cannot accept are the named
/// frontend's to report, so this is never an error.
fn detect(text: &str) -> kiln_dockerfile::Directives {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (body, skipped) = if text.starts_with("#!") {
        (text.split_once('\n').map_or("", |(_, rest)| rest), 1)
    } else {
        (text, 0)
    };
    let mut found = kiln_dockerfile::detect_directives(body);
    if found.syntax.is_none() {
        let slashed: String = body
            .split('\n')
            .map_while(|l| l.strip_prefix("//"))
            .map(|rest| format!("#{rest}\n"))
            .collect();
        found = kiln_dockerfile::detect_directives(&slashed);
    }
    if found.syntax.is_none()
        && let Ok(serde_json::Value::Object(map)) = serde_json::from_str(body)
        && let Some(serde_json::Value::String(v)) = map.get("syntax")
    {
        found.syntax = Some(v.clone());
        found.syntax_line = 1;
    }
    if found.syntax.is_some() {
        found.syntax_line += skipped;
    }
    found
}

/// Where a frontend was named, as errors and notes say it.
fn origin(reference: &str, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("Dockerfile:{line}: # syntax={reference}"),
        None => format!("build-arg {SYNTAX_ARG}={reference}"),
    }
}

/// The progress note for a Dockerfile that names the Dockerfile frontend
/// image (None when it names none, or another image: `convert` refuses that).
pub fn syntax_note(dockerfile: &[u8], build_args: &BTreeMap<String, String>) -> Option<String> {
    let text = String::from_utf8_lossy(dockerfile);
    let directives = kiln_dockerfile::parse_directives(&text).ok()?;
    check(&directives, build_args).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_is_detected_in_every_form_buildkit_accepts() {
        let found = |t: &str| {
            let d = detect(t);
            (d.syntax.unwrap_or_default(), d.syntax_line)
        };
        let fe = "example.com/fe:1".to_string();
        assert_eq!(
            found("# syntax=example.com/fe:1\nFROM a\n"),
            (fe.clone(), 1)
        );
        assert_eq!(
            found("# escape=`\n# syntax = example.com/fe:1\nFROM a\n"),
            (fe.clone(), 2)
        );
        assert_eq!(
            found("//syntax=example.com/fe:1\nFROM a\n"),
            (fe.clone(), 1)
        );
        assert_eq!(
            found("#!/usr/bin/env kiln\n# syntax=example.com/fe:1\nFROM a\n"),
            (fe.clone(), 2)
        );
        assert_eq!(
            found("#!/bin/x\n// check=skip=all\n// syntax=example.com/fe:1\n"),
            (fe.clone(), 3)
        );
        assert_eq!(
            found("\u{feff}{\"syntax\": \"example.com/fe:1\", \"x\": 1}"),
            (fe.clone(), 1)
        );
        // a directive only at the top, never mixed prefixes, no JSON non-string
        assert_eq!(
            found("FROM a\n# syntax=example.com/fe:1\n"),
            (String::new(), 0)
        );
        assert_eq!(found("# check=skip=all\n// syntax=x\n"), (String::new(), 0));
        assert_eq!(found("{\"syntax\": 1}"), (String::new(), 0));
    }

    #[test]
    fn dockerfile_frontend_references() {
        for r in [
            "docker/dockerfile:1",
            "docker/dockerfile:1.7",
            "docker/dockerfile:1-labs",
            "docker/dockerfile",
            "docker.io/docker/dockerfile:1.7.0@sha256:aaaa",
            "docker.io/docker/dockerfile@sha256:aaaa",
            "docker/dockerfile-upstream:master",
        ] {
            assert!(is_dockerfile_frontend(r), "{r}");
        }
        for r in [
            "example.com/docker/dockerfile:1",
            "tonistiigi/dockerfile:1",
            "docker/dockerfile-extra:1",
            "localhost:5000/frontend",
        ] {
            assert!(!is_dockerfile_frontend(r), "{r}");
        }
    }

    #[test]
    fn build_arg_overrides_the_directive() {
        let ast =
            kiln_dockerfile::parse_ast("# syntax=docker/dockerfile:1\nFROM a\n").expect("ast");
        let none = BTreeMap::new();
        let note = check(&ast.directives, &none).expect("ok").expect("note");
        assert!(
            note.contains("Dockerfile:1: # syntax=docker/dockerfile:1"),
            "{note}"
        );
        let other = BTreeMap::from([(SYNTAX_ARG.to_string(), "example.com/fe:2".to_string())]);
        let err = check(&ast.directives, &other).expect_err("external");
        assert!(err.to_string().contains("example.com/fe:2"), "{err}");
        let ast = kiln_dockerfile::parse_ast("# syntax=example.com/fe\nFROM a\n").expect("ast");
        let ok = BTreeMap::from([(SYNTAX_ARG.to_string(), "docker/dockerfile:1".to_string())]);
        assert!(check(&ast.directives, &ok).expect("ok").is_some());
        let err = check(&ast.directives, &none).expect_err("external");
        assert_eq!(err.line(), Some(1));
    }
}
