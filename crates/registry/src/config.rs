//! Per-registry settings, as in kilnd.toml's `[registry."host"]` tables.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Registry settings keyed by registry host, e.g.
/// `[registry."docker.io"] mirrors = ["127.0.0.1:5000"]` and
/// `[registry."127.0.0.1:5000"] http = true`.
#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq, Eq)]
pub struct RegistryConfig {
    #[serde(flatten)]
    pub hosts: BTreeMap<String, HostConfig>,
}

/// Settings of one registry host.
#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// Hosts ("host:port", optionally with an http:// or https:// scheme) tried before this one for pulls.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// Speak plain http to this host.
    #[serde(default)]
    pub http: bool,
    /// Accept invalid TLS certificates from this host.
    #[serde(default)]
    pub insecure: bool,
    /// PEM files of CA certificates trusted for this host, in addition to the system roots.
    #[serde(default)]
    pub ca: Vec<PathBuf>,
}

impl RegistryConfig {
    pub fn host(&self, host: &str) -> Option<&HostConfig> {
        self.hosts.get(host)
    }

    /// Whether `host` is spoken to over plain http: configured so, or a loopback address
    /// with no TLS settings (`ca`, `insecure`).
    pub fn is_http(&self, host: &str) -> bool {
        match self.host(host) {
            Some(h) if h.http => true,
            Some(h) if !h.ca.is_empty() || h.insecure => false,
            _ => is_loopback(host),
        }
    }
}

/// "127.0.0.1:5000", "localhost", "[::1]:5000" ...
pub fn is_loopback(host: &str) -> bool {
    let h = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    h == "localhost" || h.starts_with("127.") || h == "::1"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kilnd_toml_shape() {
        #[derive(Deserialize)]
        struct Kilnd {
            registry: RegistryConfig,
        }
        let cfg: Kilnd = toml::from_str(
            r#"
            [registry."docker.io"]
            mirrors = ["127.0.0.1:5000"]
            [registry."127.0.0.1:5000"]
            http = true
            [registry."reg.example:443"]
            insecure = true
            [registry."tls.local:5000"]
            ca = ["/etc/kiln/ca.pem"]
            "#,
        )
        .expect("toml");
        let r = cfg.registry;
        assert_eq!(r.hosts["docker.io"].mirrors, ["127.0.0.1:5000"]);
        assert!(r.hosts["127.0.0.1:5000"].http);
        assert!(r.hosts["reg.example:443"].insecure);
        assert_eq!(
            r.hosts["tls.local:5000"].ca,
            [PathBuf::from("/etc/kiln/ca.pem")]
        );
        assert!(!r.is_http("reg.example:443"));
        assert!(r.is_http("localhost:5001"));
        assert!(!r.is_http("tls.local:5000"));
        assert!(r.is_http("127.0.0.2"));
        assert!(r.is_http("[::1]:80"));
        assert!(!r.is_http("docker.io"));
    }
}
