//! Serde types for OCI/Docker manifests, indexes and image configs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Platform;

/// Media types of manifests, indexes, configs and layers (OCI and Docker v2 schema 2).
pub mod media_types {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";

    /// True for manifest-list / index media types.
    pub fn is_index(media_type: &str) -> bool {
        media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
    }

    /// True for single-platform manifest media types.
    pub fn is_manifest(media_type: &str) -> bool {
        media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
    }
}

/// Annotation naming an image in an OCI layout's index.json.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Annotation containerd uses for the full image name in an OCI layout.
pub const ANNOTATION_CONTAINERD_IMAGE_NAME: &str = "io.containerd.image.name";

/// A content descriptor: what a blob is, its digest and size.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
}

/// `secs` since the Unix epoch as an RFC 3339 UTC timestamp
/// (`1970-01-01T00:00:00Z`), the form image configs use for `created`.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // civil_from_days (H. Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An image index / manifest list.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// The image config JSON (OCI image-spec config with Docker-compatible field names).
/// Unknown fields are kept in `extra` so a config round-trips.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default)]
    pub config: ContainerConfig,
    #[serde(default)]
    pub rootfs: RootFs,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The `config` object of an image config: how to run a container from the image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ContainerConfig {
    #[serde(rename = "User", default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(
        rename = "ExposedPorts",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub exposed_ports: Option<BTreeMap<String, EmptyObject>>,
    #[serde(
        rename = "Env",
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub env: Vec<String>,
    #[serde(rename = "Entrypoint", default, skip_serializing_if = "none_or_empty")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default, skip_serializing_if = "none_or_empty")]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Volumes", default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<BTreeMap<String, EmptyObject>>,
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub working_dir: String,
    #[serde(rename = "Labels", default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(
        rename = "StopSignal",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub stop_signal: Option<String>,
    #[serde(rename = "Shell", default, skip_serializing_if = "none_or_empty")]
    pub shell: Option<Vec<String>>,
    #[serde(rename = "OnBuild", default, skip_serializing_if = "none_or_empty")]
    pub on_build: Option<Vec<String>>,
    #[serde(
        rename = "Healthcheck",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub healthcheck: Option<serde_json::Value>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Go's `omitempty` on a slice: an empty list is left out like a missing one
/// (`CMD []` gives a config without `Cmd`, as BuildKit writes it).
fn none_or_empty<T>(v: &Option<Vec<T>>) -> bool {
    v.as_ref().is_none_or(Vec::is_empty)
}

/// `{}` — the value type of ExposedPorts and Volumes maps.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct EmptyObject {}

/// The layer diff ids of an image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub diff_ids: Vec<String>,
}

impl Default for RootFs {
    fn default() -> Self {
        RootFs {
            type_: "layers".to_string(),
            diff_ids: Vec::new(),
        }
    }
}

/// One history entry of an image config.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct History {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_layer: Option<bool>,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// testdata/llb/image-configs/busybox-latest.config.json
    const BUSYBOX: &str = r#"{"created":"2000-01-01T00:00:00Z","architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:4d864a48afdcdb82ea28cadb4d24caa0856e8c48658990e60db318af5f4ccd16"]},"history":[{"created":"2000-01-01T00:00:00Z","created_by":"busybox-static 1:1.35.0-4+deb12u1+b1 rootfs"}]}"#;

    #[test]
    fn busybox_config_round_trips() {
        let cfg: ImageConfig = serde_json::from_str(BUSYBOX).expect("parse");
        assert_eq!(cfg.config.cmd.as_deref(), Some(&["sh".to_string()][..]));
        assert_eq!(cfg.rootfs.diff_ids.len(), 1);
        assert_eq!(
            cfg.history[0].created_by.as_deref(),
            Some("busybox-static 1:1.35.0-4+deb12u1+b1 rootfs")
        );
        let out = serde_json::to_value(&cfg).expect("serialize");
        let orig: serde_json::Value = serde_json::from_str(BUSYBOX).expect("parse value");
        assert_eq!(out, orig);
    }

    #[test]
    fn unknown_fields_and_docker_names_are_kept() {
        let src = r#"{"architecture":"arm64","os":"linux","variant":"v8","docker_version":"24",
            "config":{"User":"1000","ExposedPorts":{"80/tcp":{}},"Env":null,"Entrypoint":["/e"],
            "WorkingDir":"/w","Labels":{"a":"b"},"Volumes":{"/data":{}},"StopSignal":"SIGTERM",
            "Shell":["/bin/bash","-c"],"OnBuild":["RUN x"],"ArgsEscaped":true},
            "rootfs":{"type":"layers","diff_ids":[]},
            "history":[{"created_by":"x","empty_layer":true}]}"#;
        let cfg: ImageConfig = serde_json::from_str(src).expect("parse");
        assert_eq!(cfg.extra["docker_version"], "24");
        assert_eq!(cfg.config.extra["ArgsEscaped"], true);
        assert_eq!(cfg.config.user, "1000");
        assert_eq!(cfg.history[0].empty_layer, Some(true));
        let v = serde_json::to_value(&cfg).expect("serialize");
        assert_eq!(v["config"]["ExposedPorts"]["80/tcp"], serde_json::json!({}));
        assert_eq!(v["config"]["Shell"][0], "/bin/bash");
        assert_eq!(v["config"]["OnBuild"][0], "RUN x");
        assert!(v["config"].get("Env").is_none());
        assert!(v["config"].get("Cmd").is_none());
        assert_eq!(v["rootfs"]["diff_ids"], serde_json::json!([]));
    }

    #[test]
    fn platform_matching() {
        let want = Platform::new("linux", "arm64", None);
        assert!(want.matches(&Platform::new("linux", "arm64", Some("v8"))));
        assert!(!want.matches(&Platform::new("linux", "amd64", None)));
        let arm7 = Platform::new("linux", "arm", Some("v7"));
        assert!(!arm7.matches(&Platform::new("linux", "arm", Some("v6"))));
        assert!(Platform::new("linux", "arm", None).matches(&Platform::new(
            "linux",
            "arm",
            Some("v6")
        )));
    }

    #[test]
    fn descriptor_json_names() {
        let d = Descriptor {
            media_type: media_types::OCI_CONFIG.into(),
            digest: "sha256:00".into(),
            size: 3,
            ..Default::default()
        };
        let v = serde_json::to_string(&d).expect("serialize");
        assert_eq!(
            v,
            r#"{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:00","size":3}"#
        );
    }
}
