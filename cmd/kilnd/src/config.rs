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
    /// `[farm]`: workers joining a scheduler, and how the scheduler treats them.
    #[serde(default)]
    pub farm: Farm,
    /// `[[remote-cache.import]]` / `[[remote-cache.export]]`: build caches every
    /// build imports and exports, each a table as `--import-cache`/`--export-cache`
    /// takes it (`type = "registry"`, `ref = "…"`, `mode = "max"`).
    #[serde(default, rename = "remote-cache")]
    pub remote_cache: RemoteCache,
    /// `[debug]`: the debug listener's address.
    #[serde(default)]
    pub debug: Debug,
    /// `[otel]`: where traces go when no `OTEL_*` variable says (see `telemetry`).
    #[serde(default)]
    pub otel: crate::telemetry::OtelConfig,
}

/// `[remote-cache]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteCache {
    #[serde(default)]
    pub import: Vec<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub export: Vec<std::collections::BTreeMap<String, String>>,
}

/// `[farm]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Farm {
    /// a worker: the scheduler's internal address to join (`--join`)
    pub join: Option<String>,
    /// a worker: the address the scheduler, the exporter and other workers
    /// reach its Worker API at (`--advertise-addr`; default: its `--addr`)
    pub advertise: Option<String>,
    /// a worker: steps it runs at once (`--capacity`; default: its CPUs)
    pub capacity: Option<u32>,
    /// a worker: how long leaving waits for its running steps (default 10m)
    pub drain_timeout: Option<String>,
    /// the scheduler: a worker silent this long is dropped (default 10s)
    pub keepalive_timeout: Option<String>,
    /// the scheduler: runs of a step whose worker was lost (default 3)
    pub retries: Option<u32>,
    /// the scheduler: a worker reporting less free disk gets steps only when
    /// no other can take them (a size, "1GB"; a number is MB; default 1GiB; 0: off)
    pub min_free_disk: Option<SizeValue>,
    /// `[farm.tls]`: mutual TLS between kiln's services on `tcp://`
    #[serde(default)]
    pub tls: GrpcTls,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grpc {
    #[serde(default)]
    pub address: Vec<String>,
    /// `[grpc.tls]`: TLS on the client listener's `tcp://` addresses
    #[serde(default)]
    pub tls: GrpcTls,
    /// owner of the unix sockets (buildkitd.toml's `[grpc] uid`)
    pub uid: Option<u32>,
    /// group of the unix sockets (buildkitd.toml's `[grpc] gid`; `--group` wins)
    pub gid: Option<u32>,
    /// buildkitd.toml's `[grpc] debugAddress`: the debug listener (`[debug] address`)
    #[serde(rename = "debugAddress")]
    pub debug_address: Option<String>,
}

/// `[debug]`: the debug listener (metrics, health, the farm dashboard).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Debug {
    /// `host:port` (`--debugaddr` wins)
    pub address: Option<String>,
}

/// buildkitd.toml's `[grpc.tls]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcTls {
    /// server certificate (PEM)
    pub cert: Option<PathBuf>,
    /// server private key (PEM)
    pub key: Option<PathBuf>,
    /// with a CA, clients must present a certificate it signed
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Worker {
    /// What exec steps get for a network: "auto" (default: "bridge" when it can be set
    /// up, else "host"), "host", "bridge" or "none" (buildkitd's `networkMode`, here for
    /// both executors; `[worker.oci]`/`[worker.containerd]` `networkMode` are read too).
    #[serde(rename = "networkMode")]
    pub network_mode: Option<String>,
    /// bridge mode: the bridge's name (default "kiln0")
    #[serde(rename = "bridgeName")]
    pub bridge_name: Option<String>,
    /// bridge mode: the steps' subnet (default "10.213.0.0/16"; the bridge gets its
    /// first address)
    #[serde(rename = "bridgeSubnet")]
    pub bridge_subnet: Option<String>,
    #[serde(default)]
    pub oci: OciWorker,
    /// `[worker.containerd]`: run exec steps as containerd tasks and keep snapshots in
    /// containerd's snapshotter.
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
    /// buildkitd's place for `[worker] networkMode`
    #[serde(rename = "networkMode")]
    pub network_mode: Option<String>,
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
    /// rootless mode (`--rootless`)
    pub rootless: Option<bool>,
    /// how snapshots are mounted: auto, overlayfs or fuse-overlayfs
    /// (`--oci-worker-snapshotter`)
    pub snapshotter: Option<String>,
    /// what starts exec steps: auto (kiln's own starter, runc where it cannot run),
    /// native or runc (`--oci-worker-runtime`)
    pub runtime: Option<String>,
    /// automatic build-cache GC (buildkitd's `gc`)
    pub gc: Option<bool>,
    /// limit of the default GC policy: MB as a number, or "10GB"
    pub gckeepstorage: Option<SizeValue>,
    /// `[[worker.oci.gcpolicy]]`, applied in order
    #[serde(default)]
    pub gcpolicy: Vec<GcPolicy>,
    /// at most this many steps run at once, across builds
    #[serde(rename = "max-parallelism")]
    pub max_parallelism: Option<usize>,
    /// buildkitd's place for `[worker] networkMode`
    #[serde(rename = "networkMode")]
    pub network_mode: Option<String>,
    /// labels the worker carries (`--oci-worker-labels`): LLB worker
    /// constraints select workers by them
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A size: a number (its unit depends on the key) or a string with a unit.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Number(i64),
    Text(String),
}

impl SizeValue {
    pub fn bytes(&self, number_unit: i64) -> anyhow::Result<i64> {
        match self {
            SizeValue::Number(n) => Ok(n * number_unit),
            SizeValue::Text(t) => Ok(kiln_units::parse_size(t)?),
        }
    }
}

/// A duration: seconds as a number, or "48h".
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DurationValue {
    Seconds(u64),
    Text(String),
}

/// One `[[worker.oci.gcpolicy]]`, with buildkitd's key names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GcPolicy {
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub filters: Vec<String>,
    pub keep_duration: Option<DurationValue>,
    /// bytes (older buildkitd name of reservedSpace)
    pub keep_bytes: Option<SizeValue>,
    pub reserved_space: Option<SizeValue>,
    pub max_used_space: Option<SizeValue>,
}

impl OciWorker {
    /// The GC policies the solver applies after builds, empty when GC is
    /// off. `gc = true` without policies keeps everything under
    /// `gckeepstorage` (default 10GB).
    pub fn gc_policies(&self) -> anyhow::Result<Vec<solver_scheduler::usage::PruneOptions>> {
        use solver_scheduler::usage::{Filter, PruneOptions};
        if self.gc != Some(true) {
            return Ok(vec![]);
        }
        if self.gcpolicy.is_empty() {
            let keep = match &self.gckeepstorage {
                Some(s) => s.bytes(1_000_000)?,
                None => 10_000_000_000,
            };
            return Ok(vec![PruneOptions {
                all: true,
                keep_bytes: keep,
                ..Default::default()
            }]);
        }
        self.gcpolicy
            .iter()
            .map(|p| {
                let limits = [&p.keep_bytes, &p.reserved_space, &p.max_used_space]
                    .into_iter()
                    .flatten()
                    .map(|s| s.bytes(1))
                    .collect::<anyhow::Result<Vec<i64>>>()?;
                let keep_duration = match &p.keep_duration {
                    None => None,
                    Some(DurationValue::Seconds(s)) => Some(std::time::Duration::from_secs(*s)),
                    Some(DurationValue::Text(t)) => Some(
                        kiln_units::parse_config_duration(t)
                            .map_err(|e| anyhow::anyhow!("gcpolicy keepDuration: {e}"))?,
                    ),
                };
                Ok(PruneOptions {
                    filter: Filter::parse(&p.filters)?,
                    all: p.all,
                    keep_duration,
                    keep_bytes: limits.into_iter().max().unwrap_or(0),
                })
            })
            .collect()
    }
}

impl Worker {
    /// The steps' network settings: `flag` (`--network-mode`) over `[worker]` over
    /// `[worker.oci]`/`[worker.containerd]`; bad values are errors naming the key.
    pub fn network(
        &self,
        flag: Option<&str>,
    ) -> anyhow::Result<worker_executor::network::NetworkConfig> {
        use worker_executor::network::{NetworkConfig, NetworkMode, Subnet};
        let mut c = NetworkConfig::default();
        let mode = flag.map(|m| ("--network-mode", m)).or_else(|| {
            [
                ("[worker] networkMode", &self.network_mode),
                ("[worker.oci] networkMode", &self.oci.network_mode),
                (
                    "[worker.containerd] networkMode",
                    &self.containerd.network_mode,
                ),
            ]
            .into_iter()
            .find_map(|(key, v)| v.as_deref().map(|m| (key, m)))
        });
        if let Some((key, m)) = mode {
            c.mode = m
                .parse::<NetworkMode>()
                .map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        }
        if let Some(b) = &self.bridge_name {
            worker_executor::network::check_bridge_name(b)
                .map_err(|e| anyhow::anyhow!("[worker] bridgeName: {e}"))?;
            c.bridge = b.clone();
        }
        if let Some(s) = &self.bridge_subnet {
            c.subnet = s
                .parse::<Subnet>()
                .map_err(|e| anyhow::anyhow!("[worker] bridgeSubnet: {e}"))?;
        }
        Ok(c)
    }
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Peers {
    /// the solver-scheduler's internal address (SessionBroker, LLBBridge); with
    /// `--role solver-scheduler` it is where that role serves them
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
    fn remote_cache_tables_name_each_cache_as_the_flags_do() {
        let c: FileConfig = toml::from_str(
            "[[remote-cache.import]]\ntype = \"registry\"\nref = \"r/cache:main\"\n\n[[remote-cache.export]]\ntype = \"registry\"\nref = \"r/cache:main\"\nmode = \"max\"\n",
        )
        .expect("parse");
        assert_eq!(c.remote_cache.import.len(), 1);
        assert_eq!(c.remote_cache.export[0]["mode"], "max");
        assert_eq!(c.remote_cache.export[0]["type"], "registry");
        assert!(toml::from_str::<FileConfig>("[remote-cache]\nimports = []\n").is_err());
    }

    #[test]
    fn gc_policies_and_parallelism_read_buildkitd_keys() {
        let c: FileConfig = toml::from_str(
            r#"
[worker.oci]
gc = true
max-parallelism = 2
[[worker.oci.gcpolicy]]
keepBytes = 512000000
keepDuration = 172800
filters = ["type==source.local", "type==exec.cachemount"]
[[worker.oci.gcpolicy]]
all = true
keepBytes = "1GB"
keepDuration = "48h"
"#,
        )
        .expect("parses");
        assert_eq!(c.worker.oci.max_parallelism, Some(2));
        let p = c.worker.oci.gc_policies().expect("policies");
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].keep_bytes, 512_000_000);
        assert_eq!(p[1].keep_bytes, 1 << 30, "go-units: GB is 1024^3");
        assert!(p[1].all && !p[0].all);
        assert_eq!(
            p[0].keep_duration,
            Some(std::time::Duration::from_secs(172_800))
        );
        assert_eq!(p[0].keep_duration, p[1].keep_duration);
        let c: FileConfig =
            toml::from_str("[worker.oci]\ngc = true\ngckeepstorage = 9000\n").expect("parses");
        let p = c.worker.oci.gc_policies().expect("policies");
        assert_eq!(p[0].keep_bytes, 9_000_000_000, "gckeepstorage is in MB");
        let off: FileConfig =
            toml::from_str("[worker.oci]\ngckeepstorage = 9000\n").expect("parses");
        assert!(off.worker.oci.gc_policies().expect("policies").is_empty());
        let bad: FileConfig = toml::from_str(
            "[worker.oci]\ngc = true\n[[worker.oci.gcpolicy]]\nfilters = [\"colour==red\"]\n",
        )
        .expect("parses");
        assert!(bad.worker.oci.gc_policies().is_err());
        assert!(toml::from_str::<FileConfig>("[[worker.oci.gcpolicy]]\nkeepBites = 1\n").is_err());
    }

    #[test]
    fn grpc_tls_reads_buildkitd_keys() {
        let c: FileConfig = toml::from_str(
            "[grpc]\naddress = [\"tcp://0.0.0.0:1234\"]\n[grpc.tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\nca = \"/ca.pem\"\n",
        )
        .expect("parses");
        assert_eq!(
            c.grpc.tls.cert.as_deref(),
            Some(std::path::Path::new("/c.pem"))
        );
        assert_eq!(
            c.grpc.tls.key.as_deref(),
            Some(std::path::Path::new("/k.pem"))
        );
        assert_eq!(
            c.grpc.tls.ca.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert!(toml::from_str::<FileConfig>("[grpc.tls]\ncertificate = \"/c\"\n").is_err());
    }

    #[test]
    fn network_mode_reads_worker_keys_and_the_flag_wins() {
        use worker_executor::network::NetworkMode;
        let c: FileConfig = toml::from_str("").expect("parses");
        let n = c.worker.network(None).expect("network");
        assert_eq!(n.mode, NetworkMode::Auto);
        assert_eq!(
            (n.bridge.as_str(), n.subnet.to_string().as_str()),
            ("kiln0", "10.213.0.0/16")
        );
        let c: FileConfig = toml::from_str(
            "[worker]\nnetworkMode = \"bridge\"\nbridgeName = \"kb1\"\nbridgeSubnet = \"10.99.0.0/24\"\n",
        )
        .expect("parses");
        let n = c.worker.network(None).expect("network");
        assert_eq!(n.mode, NetworkMode::Bridge);
        assert_eq!(
            (n.bridge.as_str(), n.subnet.to_string().as_str()),
            ("kb1", "10.99.0.0/24")
        );
        assert_eq!(
            c.worker.network(Some("host")).expect("network").mode,
            NetworkMode::Host
        );
        let c: FileConfig =
            toml::from_str("[worker.oci]\nnetworkMode = \"none\"\n").expect("parses");
        assert_eq!(
            c.worker.network(None).expect("network").mode,
            NetworkMode::None
        );
        let c: FileConfig = toml::from_str("[worker]\nnetworkMode = \"cni\"\n").expect("parses");
        let e = c.worker.network(None).expect_err("cni").to_string();
        assert!(
            e.contains("[worker] networkMode") && e.contains("cni"),
            "{e}"
        );
        let e = c
            .worker
            .network(Some("bridged"))
            .expect_err("flag")
            .to_string();
        assert!(
            e.starts_with("--network-mode") && e.contains("bridged"),
            "{e}"
        );
        let c: FileConfig =
            toml::from_str("[worker]\nbridgeSubnet = \"10.99.0.1/24\"\n").expect("parses");
        let e = c.worker.network(None).expect_err("host bits").to_string();
        assert!(e.contains("bridgeSubnet"), "{e}");
        let c: FileConfig =
            toml::from_str("[worker]\nbridgeName = \"a-much-too-long-name\"\n").expect("parses");
        let e = c.worker.network(None).expect_err("long name").to_string();
        assert!(e.contains("bridgeName") && e.contains("15"), "{e}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<FileConfig>("rooot = \"/x\"").is_err());
    }
}
