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
    // as BuildKit's DetectSyntax: directives it cannot accept are the named
    // frontend's to report
    let directives = kiln_dockerfile::detect_directives(&text);
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
