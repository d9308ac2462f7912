//! Docker image reference normalisation (`busybox` ->
//! `docker.io/library/busybox:latest`), as `reference.ParseNormalizedNamed`
//! followed by `TagNameOnly` does it in BuildKit.

/// Why a reference is not a valid image name (distribution/reference's wording).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("invalid reference format")]
    InvalidFormat,
    #[error("invalid reference format: invalid digest")]
    InvalidDigest,
    #[error("invalid reference format: repository name must be lowercase")]
    Uppercase,
}

/// Normalises `s` (`busybox` -> `docker.io/library/busybox:latest`).
pub(crate) fn normalize(s: &str) -> Result<String, ReferenceError> {
    if s.is_empty() {
        return Err(ReferenceError::InvalidFormat);
    }
    let (name_tag, digest) = match s.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (s, None),
    };
    if digest.is_some_and(|d| kiln_digest::hex_part(d).is_none()) {
        return Err(ReferenceError::InvalidDigest);
    }
    let last_slash = name_tag.rfind('/').map_or(0, |p| p + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(p) => (
            &name_tag[..last_slash + p],
            Some(&name_tag[last_slash + p + 1..]),
        ),
        None => (name_tag, None),
    };
    if let Some(tag) = tag {
        let ok = !tag.is_empty()
            && tag.len() <= 128
            && tag
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !ok {
            return Err(ReferenceError::InvalidFormat);
        }
    }
    let (domain, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_string(), rest.to_string())
        }
        Some(_) => ("docker.io".to_string(), name.to_string()),
        None => ("docker.io".to_string(), name.to_string()),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io".to_string()
    } else {
        domain
    };
    let path = if domain == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    if path.is_empty() {
        return Err(ReferenceError::InvalidFormat);
    }
    for component in path.split('/') {
        if component.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(ReferenceError::Uppercase);
        }
        let ok = !component.is_empty()
            && component
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
            && component
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            && component
                .chars()
                .last()
                .is_some_and(|c| c.is_ascii_alphanumeric());
        if !ok {
            return Err(ReferenceError::InvalidFormat);
        }
    }
    let mut out = format!("{domain}/{path}");
    match (tag, digest) {
        (Some(t), _) => {
            out.push(':');
            out.push_str(t);
        }
        (None, None) => out.push_str(":latest"),
        (None, Some(_)) => {}
    }
    if let Some(d) = digest {
        out.push('@');
        out.push_str(d);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_table() {
        let d = "sha256:53ac7b30790c6a5d02bdec3263363b09b0a3ed2102917dbc2f97a1b2e98143e9";
        let cases: Vec<(String, Result<String, ReferenceError>)> = vec![
            (
                "busybox".into(),
                Ok("docker.io/library/busybox:latest".into()),
            ),
            (
                "busybox:1.36".into(),
                Ok("docker.io/library/busybox:1.36".into()),
            ),
            (
                "library/busybox".into(),
                Ok("docker.io/library/busybox:latest".into()),
            ),
            ("user/app:v1".into(), Ok("docker.io/user/app:v1".into())),
            (
                "docker.io/busybox".into(),
                Ok("docker.io/library/busybox:latest".into()),
            ),
            (
                "index.docker.io/busybox".into(),
                Ok("docker.io/library/busybox:latest".into()),
            ),
            (
                "127.0.0.1:5000/library/busybox:latest".into(),
                Ok("127.0.0.1:5000/library/busybox:latest".into()),
            ),
            ("localhost/app".into(), Ok("localhost/app:latest".into())),
            ("ghcr.io/a/b/c:1".into(), Ok("ghcr.io/a/b/c:1".into())),
            (
                format!("busybox@{d}"),
                Ok(format!("docker.io/library/busybox@{d}")),
            ),
            (
                format!("busybox:1@{d}"),
                Ok(format!("docker.io/library/busybox:1@{d}")),
            ),
            ("BusyBox".into(), Err(ReferenceError::Uppercase)),
            ("busybox:".into(), Err(ReferenceError::InvalidFormat)),
            (
                "busybox@sha256:xyz".into(),
                Err(ReferenceError::InvalidDigest),
            ),
            (
                format!(
                    "busybox@{}",
                    d.to_ascii_uppercase().replace("SHA256", "sha256")
                ),
                Err(ReferenceError::InvalidDigest),
            ),
            ("".into(), Err(ReferenceError::InvalidFormat)),
            ("a//b".into(), Err(ReferenceError::InvalidFormat)),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(&input), want, "input {input:?}");
        }
    }
}
