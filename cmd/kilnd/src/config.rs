//! kilnd.toml: buildkitd.toml's keys for what kiln supports, plus `[peers]`
//! for running one service alone.

use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// State directory (snapshots, content, cache).
    pub root: Option<PathBuf>,
    #[serde(default)]
    pub grpc: Grpc,
    /// `[registry."docker.io"] mirrors = [...]`, `http = true`, `insecure = true`
    #[serde(default)]
    pub registry: kiln_registry::RegistryConfig,
    #[serde(default)]
    pub worker: Worker,
    /// Entitlements builds may ask for with `--allow`: "network.host", "security.insecure".
    #[serde(default, rename = "insecure-entitlements")]
    pub insecure_entitlements: Vec<String>,
    /// Addresses of the other services when running one `--role`.
    #[serde(default)]
    pub peers: Peers,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grpc {
    #[serde(default)]
    pub address: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Worker {
    #[serde(default)]
    pub oci: OciWorker,
    /// `[worker.containerd]`: run exec steps as containerd tasks.
    #[serde(default)]
    pub containerd: ContainerdWorker,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerdWorker {
    #[serde(default)]
    pub enabled: bool,
    /// containerd's gRPC socket (a path, or `unix:///path`)
    pub address: Option<String>,
    /// containerd namespace (default "kiln")
    pub namespace: Option<String>,
    /// snapshotter (default "overlayfs")
    pub snapshotter: Option<String>,
}

impl ContainerdWorker {
    /// The worker's containerd settings, `None` unless enabled.
    pub fn to_config(
        &self,
    ) -> anyhow::Result<Option<worker_executor::containerd::ContainerdConfig>> {
        if !self.enabled {
            return Ok(None);
        }
        let address = self
            .address
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("[worker.containerd] enabled needs an address"))?;
        let address = address.strip_prefix("unix://").unwrap_or(address);
        let mut c = worker_executor::containerd::ContainerdConfig::new(address);
        if let Some(n) = &self.namespace {
            c.namespace = n.clone();
        }
        if let Some(s) = &self.snapshotter {
            c.snapshotter = s.clone();
        }
        Ok(Some(c))
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct OciWorker {
    /// runc binary
    pub binary: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Peers {
    pub solver: Option<String>,
    pub worker: Option<String>,
    pub frontend: Option<String>,
    pub exporter: Option<String>,
}

pub fn load(path: &std::path::Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("read config {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buildkitd_style_config_parses() {
        let c: FileConfig = toml::from_str(
            r#"
root = "/tmp/kiln"
[grpc]
address = ["unix:///tmp/kiln.sock"]
[registry."docker.io"]
mirrors = ["127.0.0.1:5000"]
[registry."127.0.0.1:5000"]
http = true
"#,
        )
        .expect("parses");
        assert_eq!(c.root.as_deref(), Some(std::path::Path::new("/tmp/kiln")));
        assert_eq!(c.grpc.address, vec!["unix:///tmp/kiln.sock".to_string()]);
        assert_eq!(
            c.registry.hosts["docker.io"].mirrors,
            vec!["127.0.0.1:5000".to_string()]
        );
        assert!(c.registry.hosts["127.0.0.1:5000"].http);
        assert!(c.insecure_entitlements.is_empty());
        let c: FileConfig =
            toml::from_str("insecure-entitlements = [\"network.host\", \"security.insecure\"]\n")
                .expect("parses");
        assert_eq!(
            c.insecure_entitlements,
            vec!["network.host".to_string(), "security.insecure".to_string()]
        );
    }

    #[test]
    fn containerd_worker_section_parses_with_defaults() {
        let c: FileConfig = toml::from_str(
            "[worker.containerd]\nenabled = true\naddress = \"unix:///run/c.sock\"\n",
        )
        .expect("parses");
        let cc = c
            .worker
            .containerd
            .to_config()
            .expect("valid")
            .expect("enabled");
        assert_eq!(cc.address, std::path::Path::new("/run/c.sock"));
        assert_eq!(
            (cc.namespace.as_str(), cc.snapshotter.as_str()),
            ("kiln", "overlayfs")
        );
        let c: FileConfig =
            toml::from_str("[worker.containerd]\nenabled = true\n").expect("parses");
        assert!(c.worker.containerd.to_config().is_err(), "address required");
        let c: FileConfig =
            toml::from_str("[worker.containerd]\naddress = \"/x\"\n").expect("parses");
        assert!(c.worker.containerd.to_config().expect("valid").is_none());
        assert!(toml::from_str::<FileConfig>("[worker.containerd]\nadress = \"/x\"\n").is_err());
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<FileConfig>("rooot = \"/x\"").is_err());
    }
}
