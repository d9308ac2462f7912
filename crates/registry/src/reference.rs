//! Image references with Docker's normalisation rules.

use std::fmt;

use crate::Error;

/// The registry `docker.io` names (Docker Hub).
pub const DOCKER_HUB: &str = "docker.io";
/// The API host behind `docker.io`.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";

/// A parsed, normalised image reference: `busybox` is `docker.io/library/busybox:latest`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host (and port), e.g. "docker.io", "127.0.0.1:5000".
    pub registry: String,
    /// Repository path, e.g. "library/busybox".
    pub repository: String,
    pub tag: Option<String>,
    /// "sha256:<hex>"
    pub digest: Option<String>,
}

impl Reference {
    /// Parse with Docker normalisation: no registry -> docker.io, single-component Docker Hub
    /// names get `library/`, and a reference with neither tag nor digest gets `:latest`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = |reason: &'static str| Error::ParseReference {
            reference: s.to_string(),
            reason,
        };
        if s.is_empty() {
            return Err(bad("empty reference"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                if !d.starts_with("sha256:") {
                    return Err(bad("digest is not sha256"));
                }
                if kiln_oci::digest::hex_part(d).is_none() {
                    return Err(bad("malformed digest"));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &rest[last_slash + i + 1..];
                if tag.is_empty()
                    || tag.len() > 128
                    || !tag
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
                    || !tag.as_bytes()[0].is_ascii_alphanumeric() && tag.as_bytes()[0] != b'_'
                {
                    return Err(bad("malformed tag"));
                }
                (&rest[..last_slash + i], Some(tag.to_string()))
            }
            None => (rest, None),
        };
        let (registry, repository) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), path.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        // the registry becomes a URL's host, picks plain HTTP for loopback
        // hosts and the client's credentials: only a real host[:port]
        if !is_registry_host(&registry) {
            return Err(bad(
                "registry must be a host name or [IPv6] address with an optional :port",
            ));
        }
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.is_empty()
            || repository.split('/').any(|c| {
                c.is_empty()
                    || !c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
                    || !c.as_bytes()[0].is_ascii_alphanumeric()
            })
        {
            return Err(bad(
                "repository must be lowercase [a-z0-9._-] path components",
            ));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The tag, or the digest when pinned, as used in `/v2/<repo>/manifests/<reference>`.
    pub fn object(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The same repository at `digest` (tag kept).
    pub fn with_digest(&self, digest: &str) -> Self {
        Reference {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// Docker's short form: `busybox:latest`, `user/app:v1`, `127.0.0.1:5000/x:y`.
    pub fn familiar(&self) -> String {
        let name = if self.registry == DOCKER_HUB {
            // `library/` goes only in front of a one-component name: the short
            // form of `library/a/b` is itself (`a/b` would be `docker.io/a/b`)
            let short = match self.repository.strip_prefix("library/") {
                Some(short) if !short.contains('/') => short,
                _ => &self.repository,
            };
            // a first component that looks like a host would be read as the registry
            let first = short.split('/').next().unwrap_or("");
            if short.contains('/')
                && (first.contains('.') || first.contains(':') || first == "localhost")
            {
                self.name()
            } else {
                short.to_string()
            }
        } else {
            self.name()
        };
        let mut s = name;
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        }
        s
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Reference::parse(s)
    }
}

/// Docker's grammar for a reference's registry: domain components
/// (alphanumerics and inner `-`) joined by `.`, or a bracketed IPv6 address,
/// then an optional numeric port.
pub fn is_registry_host(host: &str) -> bool {
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => {
            let Some((addr, after)) = rest.split_once(']') else {
                return false;
            };
            if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
                return false;
            }
            match after {
                "" => return true,
                p => match p.strip_prefix(':') {
                    Some(port) => (None, Some(port)),
                    None => return false,
                },
            }
        }
        None => match host.rsplit_once(':') {
            Some((n, p)) => (Some(n), Some(p)),
            None => (Some(host), None),
        },
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let name_ok = name.is_none_or(|n| {
        !n.is_empty()
            && n.split('.').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !c.starts_with('-')
                    && !c.ends_with('-')
            })
    });
    port_ok && name_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:4d864a48afdcdb82ea28cadb4d24caa0856e8c48658990e60db318af5f4ccd16";

    #[test]
    fn the_registry_must_be_a_host_and_port() {
        for ok in [
            "localhost:5000/x",
            "127.0.0.1:5000/a/b:c",
            "[::1]:5000/y:z",
            "[fe80::1]/y",
            "my-registry.Example.com:443/team/app",
        ] {
            assert!(Reference::parse(ok).is_ok(), "{ok}");
        }
        // each of these made a URL whose host is not the registry named
        // (`127.0.0.1@evil.com` also counted as loopback: plain HTTP)
        for bad in [
            "127.0.0.1@evil.com/x",
            "evil.com#.x/y",
            "a.b?x=y/repo",
            "user:pw@host.com/x",
            "registry.ex\u{e9}mple.com:443/team/app",
            "a..b/x",
            "-a.com/x",
            "a.com:/x",
            "a.com:80a/x",
            ":5000/x",
            "[::1/x",
            "[::1]x/y",
        ] {
            let e = Reference::parse(bad).expect_err(bad);
            // an `@` is taken for a digest's separator first
            assert!(
                bad.contains('@') || e.to_string().contains("registry must be a host"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_familiar_form_names_the_same_image() {
        for (full, short) in [
            ("docker.io/library/busybox:latest", "busybox:latest"),
            ("docker.io/library/a/b:c", "library/a/b:c"),
            ("docker.io/user/app:v1", "user/app:v1"),
            ("docker.io/localhost/x:y", "docker.io/localhost/x:y"),
            ("docker.io/a.b/c:d", "docker.io/a.b/c:d"),
            ("127.0.0.1:5000/library/x:y", "127.0.0.1:5000/library/x:y"),
        ] {
            let r = Reference::parse(full).expect("parse");
            assert_eq!(r.familiar(), short);
            assert_eq!(Reference::parse(&r.familiar()).expect("reparse"), r);
        }
    }

    #[test]
    fn normalises_like_docker() {
        let cases = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("user/app", "docker.io/user/app:latest"),
            (
                "index.docker.io/library/alpine:3",
                "docker.io/library/alpine:3",
            ),
            ("docker.io/alpine", "docker.io/library/alpine:latest"),
            ("127.0.0.1:5000/x/y:v1", "127.0.0.1:5000/x/y:v1"),
            ("localhost/app", "localhost/app:latest"),
            ("localhost:5000/app", "localhost:5000/app:latest"),
            ("ghcr.io/o/r/deep:t", "ghcr.io/o/r/deep:t"),
        ];
        for (input, want) in cases {
            assert_eq!(
                Reference::parse(input).expect(input).to_string(),
                want,
                "{input}"
            );
        }
        let r = Reference::parse(&format!("busybox@{D}")).expect("digest");
        assert_eq!(r.tag, None);
        assert_eq!(r.object(), D);
        assert_eq!(r.to_string(), format!("docker.io/library/busybox@{D}"));
        let r = Reference::parse(&format!("127.0.0.1:5000/a:t@{D}")).expect("both");
        assert_eq!(
            (r.registry.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", Some("t"))
        );
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(
            Reference::parse("busybox").expect("x").familiar(),
            "busybox:latest"
        );
        assert_eq!(
            Reference::parse("127.0.0.1:5000/a").expect("x").familiar(),
            "127.0.0.1:5000/a:latest"
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "Busybox",
            "a//b",
            "a:",
            "a@sha256:12",
            "a:b c",
            "x/-y",
            "a@md5:00",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} should fail");
        }
    }
}
