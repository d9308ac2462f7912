//! Conversions between generated protobuf types and the exporter's domain types.

use kiln_proto::kiln::exporter::v1 as xpb;
use kiln_proto::kiln::worker::v1 as wpb;
use kiln_proto::pb;
use tonic::{Code, Status};

use crate::{Error, ExportRequest, LayerBlob, PlatformRef};

pub fn platform_from_pb(p: Option<pb::Platform>) -> Option<kiln_oci::Platform> {
    let p = p?;
    if p.os.is_empty() && p.architecture.is_empty() {
        return None;
    }
    Some(kiln_oci::Platform {
        architecture: p.architecture,
        os: if p.os.is_empty() {
            "linux".to_string()
        } else {
            p.os
        },
        variant: (!p.variant.is_empty()).then_some(p.variant),
        os_version: (!p.os_version.is_empty()).then_some(p.os_version),
        os_features: (!p.os_features.is_empty()).then_some(p.os_features),
    })
}

pub fn export_request_from_pb(r: xpb::ExportRequest) -> ExportRequest {
    ExportRequest {
        build_id: r.build_id,
        session_id: r.session_id,
        worker: r.worker,
        reference: r.r#ref,
        kind: r.r#type,
        attrs: r.attrs.into_iter().collect(),
        image_config: r.image_config,
        index: u32::try_from(r.index).unwrap_or(0),
        platforms: r
            .platforms
            .into_iter()
            .map(|p| PlatformRef {
                id: p.id,
                reference: p.r#ref,
                image_config: p.image_config,
            })
            .collect(),
        remote: r.remote.map(|rl| crate::RemoteLayers {
            repository: rl.repository,
            layers: serde_json::from_slice(&rl.layers).unwrap_or_default(),
        }),
        cache_mounts: r
            .cache
            .as_ref()
            .map(|g| {
                g.mounts
                    .iter()
                    .map(|m| (m.id.clone(), m.r#ref.clone()))
                    .collect()
            })
            .unwrap_or_default(),
        cache: r
            .cache
            .map(|g| {
                g.nodes
                    .into_iter()
                    .map(|n| crate::cache::CacheNode {
                        digest: n.digest,
                        inputs: n
                            .inputs
                            .into_iter()
                            .map(|i| {
                                i.links
                                    .into_iter()
                                    .map(|l| (l.selector, l.node as usize))
                                    .collect()
                            })
                            .collect(),
                        reference: n.r#ref,
                        created: n.created,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

pub fn export_request_to_pb(r: &ExportRequest) -> xpb::ExportRequest {
    xpb::ExportRequest {
        build_id: r.build_id.clone(),
        session_id: r.session_id.clone(),
        worker: r.worker.clone(),
        r#ref: r.reference.clone(),
        r#type: r.kind.clone(),
        attrs: r.attrs.clone().into_iter().collect(),
        image_config: r.image_config.clone(),
        index: i32::try_from(r.index).unwrap_or(i32::MAX),
        platforms: r
            .platforms
            .iter()
            .map(|p| xpb::PlatformRef {
                id: p.id.clone(),
                r#ref: p.reference.clone(),
                image_config: p.image_config.clone(),
            })
            .collect(),
        cache: (!r.cache.is_empty()).then(|| xpb::CacheGraph {
            nodes: r
                .cache
                .iter()
                .map(|n| xpb::CacheNode {
                    digest: n.digest.clone(),
                    inputs: n
                        .inputs
                        .iter()
                        .map(|links| xpb::CacheNodeInput {
                            links: links
                                .iter()
                                .map(|(selector, node)| xpb::CacheNodeLink {
                                    selector: selector.clone(),
                                    node: u32::try_from(*node).unwrap_or(u32::MAX),
                                })
                                .collect(),
                        })
                        .collect(),
                    r#ref: n.reference.clone(),
                    created: n.created,
                })
                .collect(),
            mounts: r
                .cache_mounts
                .iter()
                .map(|(id, r)| xpb::CacheMountRef {
                    id: id.clone(),
                    r#ref: r.clone(),
                })
                .collect(),
        }),
        remote: r.remote.as_ref().map(|rl| xpb::RemoteLayers {
            repository: rl.repository.clone(),
            layers: serde_json::to_vec(&rl.layers).unwrap_or_default(),
        }),
    }
}

/// An empty layer (a snapshot with an empty diff) comes back with an empty digest.
pub fn layer_from_pb(l: wpb::Layer) -> LayerBlob {
    LayerBlob {
        descriptor: kiln_oci::Descriptor {
            media_type: l.media_type,
            digest: l.digest,
            size: u64::try_from(l.size).unwrap_or(0),
            ..Default::default()
        },
        diff_id: l.diff_id,
    }
}

fn registry_code(e: &kiln_registry::Error) -> Code {
    use kiln_registry::Error as R;
    match e {
        R::ParseReference { .. } => Code::InvalidArgument,
        R::NoMatchingPlatform { .. } => Code::NotFound,
        R::Status { status: 404, .. } => Code::NotFound,
        R::Status {
            status: 401 | 403, ..
        } => Code::PermissionDenied,
        R::DigestMismatch { .. } | R::BlobMismatch { .. } => Code::DataLoss,
        _ => Code::Unavailable,
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match &e {
            Error::ParseReference { .. }
            | Error::UnknownExporter { .. }
            | Error::InvalidAttr { .. }
            | Error::DecodeImageConfig { .. }
            | Error::Cache { .. } => Code::InvalidArgument,
            Error::DockerMultiPlatform => Code::Unimplemented,
            Error::ResolveImage { source, .. }
            | Error::PushBlob { source, .. }
            | Error::PushManifest { source, .. } => registry_code(source),
            Error::DialWorker { .. } | Error::DialBroker { .. } => Code::Unavailable,
            Error::Worker { source, .. } => source.code,
            Error::Session { .. } | Error::CacheWrite { .. } => Code::Unavailable,
            Error::LayerMismatch { .. } => Code::DataLoss,
            Error::RegistryClient { .. }
            | Error::EncodeJson { .. }
            | Error::Io { .. }
            | Error::Oci { .. }
            | Error::Join { .. } => Code::Internal,
        };
        kiln_proto::status::from_error(code, &e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_per_variant() {
        let s: Status = Error::UnknownExporter { kind: "zip".into() }.into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("zip"));
        let s: Status = Error::ResolveImage {
            reference: "docker.io/library/x:latest".into(),
            source: Box::new(kiln_registry::Error::NoMatchingPlatform {
                reference: "x".into(),
                platform: "linux/s390x".into(),
            }),
        }
        .into();
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().contains("linux/s390x"), "{}", s.message());
    }

    #[test]
    fn platform_round_trip() {
        let p = kiln_oci::Platform::new("linux", "arm", Some("v7"));
        assert_eq!(platform_from_pb(Some(pb::Platform::from(&p))), Some(p));
        assert_eq!(platform_from_pb(Some(pb::Platform::default())), None);
    }
}
