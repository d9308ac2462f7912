//! Platforms (`os/arch[/variant]`): the one place that parses, normalises
//! and formats them, with containerd's rules (which BuildKit and buildx use):
//! case-insensitive, `x86_64` is `amd64`, `aarch64` is `arm64`, `armhf` is
//! `arm/v7`, a lone OS or architecture is completed from the host.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The platform an image or index entry is for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    #[serde(
        rename = "os.features",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_features: Option<Vec<String>>,
}

/// GOARCH-style name of the architecture kiln was built for (`amd64`, `arm64`, ...).
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl Platform {
    /// linux on the architecture kiln runs on.
    pub fn host() -> Self {
        Platform::new("linux", host_architecture(), None)
    }

    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Platform {
            architecture: architecture.to_string(),
            os: os.to_string(),
            variant: variant.map(str::to_string),
            ..Default::default()
        }
    }

    /// Whether an index entry's platform satisfies this (wanted) platform.
    /// An empty wanted variant matches any variant; arm64 treats a missing variant as "v8".
    pub fn matches(&self, candidate: &Platform) -> bool {
        if self.os != candidate.os || self.architecture != candidate.architecture {
            return false;
        }
        let norm = |p: &Platform| -> Option<String> {
            match (p.architecture.as_str(), p.variant.as_deref()) {
                ("arm64", None) => Some("v8".to_string()),
                (_, Some("")) => None,
                (_, v) => v.map(str::to_string),
            }
        };
        match norm(self) {
            None => true,
            Some(v) => norm(candidate).as_deref() == Some(v.as_str()),
        }
    }
}

/// A platform specifier that is not `os[/arch[/variant]]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlatformError {
    #[error("{specifier:?}: unknown operating system or architecture")]
    Unknown { specifier: String },
    #[error(
        "{component:?} is an invalid component of {specifier:?}: platform specifier component must match \"^[A-Za-z0-9_.-]+$\""
    )]
    InvalidComponent {
        component: String,
        specifier: String,
    },
    #[error("{specifier:?}: cannot parse platform specifier")]
    TooManyParts { specifier: String },
}

const KNOWN_OS: &[&str] = &[
    "aix",
    "android",
    "darwin",
    "dragonfly",
    "freebsd",
    "hurd",
    "illumos",
    "ios",
    "js",
    "linux",
    "nacl",
    "netbsd",
    "openbsd",
    "plan9",
    "solaris",
    "wasip1",
    "windows",
    "zos",
];

const KNOWN_ARCH: &[&str] = &[
    "386",
    "amd64",
    "amd64p32",
    "arm",
    "armbe",
    "arm64",
    "arm64be",
    "loong64",
    "mips",
    "mipsle",
    "mips64",
    "mips64le",
    "mips64p32",
    "mips64p32le",
    "ppc",
    "ppc64",
    "ppc64le",
    "riscv",
    "riscv64",
    "s390",
    "s390x",
    "sparc",
    "sparc64",
    "wasm",
];

fn normalize_os(os: &str) -> String {
    match os.to_ascii_lowercase().as_str() {
        "" => "linux".to_string(),
        "macos" => "darwin".to_string(),
        other => other.to_string(),
    }
}

/// containerd's architecture/variant normalisation.
fn normalize_arch(arch: &str, variant: &str) -> (String, String) {
    let arch = arch.to_ascii_lowercase();
    let variant = variant.to_ascii_lowercase();
    match arch.as_str() {
        "i386" => ("386".into(), String::new()),
        "x86_64" | "x86-64" | "amd64" => {
            let v = if variant == "v1" {
                String::new()
            } else {
                variant
            };
            ("amd64".into(), v)
        }
        "aarch64" | "arm64" => {
            let v = match variant.as_str() {
                "8" | "v8" | "v8.0" => String::new(),
                "9" | "9.0" | "v9.0" => "v9".into(),
                _ => variant,
            };
            ("arm64".into(), v)
        }
        "armhf" => ("arm".into(), "v7".into()),
        "armel" => ("arm".into(), "v6".into()),
        "arm" => {
            let v = match variant.as_str() {
                "" | "7" => "v7".into(),
                "5" | "6" | "8" => format!("v{variant}"),
                _ => variant,
            };
            ("arm".into(), v)
        }
        _ => (arch, variant),
    }
}

impl Platform {
    /// Parses a specifier (`linux/amd64`, `linux/arm/v7`, `arm64`, `linux`)
    /// as containerd's `platforms.Parse` does.
    pub fn parse(specifier: &str) -> Result<Platform, PlatformError> {
        let parts: Vec<&str> = specifier.split('/').collect();
        for part in &parts {
            let valid = !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !valid {
                return Err(PlatformError::InvalidComponent {
                    component: part.to_string(),
                    specifier: specifier.to_string(),
                });
            }
        }
        let with = |os: String, (arch, variant): (String, String)| {
            Platform::new(
                &os,
                &arch,
                (!variant.is_empty()).then_some(variant.as_str()),
            )
        };
        match parts.as_slice() {
            [one] => {
                let os = normalize_os(one);
                if KNOWN_OS.contains(&os.as_str()) {
                    return Ok(Platform::new(&os, host_architecture(), None));
                }
                let (arch, mut variant) = normalize_arch(one, "");
                if arch == "arm" && variant == "v7" {
                    variant.clear();
                }
                if KNOWN_ARCH.contains(&arch.as_str()) {
                    return Ok(with("linux".into(), (arch, variant)));
                }
                Err(PlatformError::Unknown {
                    specifier: specifier.to_string(),
                })
            }
            [os, arch] => {
                let (arch, mut variant) = normalize_arch(arch, "");
                if arch == "arm" && variant == "v7" {
                    variant.clear();
                }
                Ok(with(normalize_os(os), (arch, variant)))
            }
            [os, arch, variant] => {
                let (arch, mut variant) = normalize_arch(arch, variant);
                if arch == "arm64" && variant.is_empty() {
                    variant = "v8".into();
                }
                Ok(with(normalize_os(os), (arch, variant)))
            }
            _ => Err(PlatformError::TooManyParts {
                specifier: specifier.to_string(),
            }),
        }
    }

    /// The same platform in containerd's normal form (`arm64/v8` is `arm64`).
    pub fn normalized(&self) -> Platform {
        let (arch, variant) =
            normalize_arch(&self.architecture, self.variant.as_deref().unwrap_or(""));
        Platform {
            os: normalize_os(&self.os),
            architecture: arch,
            variant: (!variant.is_empty()).then_some(variant),
            ..self.clone()
        }
    }
}

/// `os/arch[/variant]`, the form `--platform` takes and BuildKit prints.
impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match self.variant.as_deref() {
            Some(v) if !v.is_empty() => write!(f, "/{v}"),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(s: &str) -> String {
        Platform::parse(s).expect(s).to_string()
    }

    #[test]
    fn parses_like_containerd() {
        assert_eq!(parsed("linux/amd64"), "linux/amd64");
        assert_eq!(parsed("Linux/X86_64"), "linux/amd64");
        assert_eq!(parsed("linux/aarch64"), "linux/arm64");
        assert_eq!(parsed("linux/arm64/v8"), "linux/arm64/v8");
        assert_eq!(parsed("linux/arm"), "linux/arm");
        assert_eq!(parsed("linux/arm/7"), "linux/arm/v7");
        assert_eq!(parsed("linux/armhf"), "linux/arm");
        assert_eq!(parsed("linux/armel"), "linux/arm/v6");
        assert_eq!(parsed("linux/i386"), "linux/386");
        assert_eq!(parsed("macos/arm64"), "darwin/arm64");
        assert_eq!(parsed("s390x"), "linux/s390x");
        assert_eq!(parsed("linux"), format!("linux/{}", host_architecture()));
        assert_eq!(parsed("linux/amd64/v1"), "linux/amd64");
        assert_eq!(parsed("linux/riscv64"), "linux/riscv64");
    }

    #[test]
    fn rejects_what_containerd_rejects() {
        for bad in [
            "",
            "linux/",
            "/amd64",
            "linux/amd64/v8/x",
            "linux/*",
            "nosuchthing",
            "linux amd64",
        ] {
            assert!(Platform::parse(bad).is_err(), "{bad:?} parsed");
        }
        let e = Platform::parse("nosuchthing")
            .expect_err("unknown")
            .to_string();
        assert_eq!(
            e,
            "\"nosuchthing\": unknown operating system or architecture"
        );
    }

    #[test]
    fn normal_form_drops_the_default_arm64_variant() {
        let p = Platform::new("linux", "aarch64", Some("v8")).normalized();
        assert_eq!(p.to_string(), "linux/arm64");
    }
}
