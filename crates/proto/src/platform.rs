//! Platforms on the wire: kiln-oci's `Platform` as an LLB `pb.Platform`.

use crate::pb;

impl From<&kiln_oci::Platform> for pb::Platform {
    fn from(p: &kiln_oci::Platform) -> Self {
        pb::Platform {
            architecture: p.architecture.clone(),
            os: p.os.clone(),
            variant: p.variant.clone().unwrap_or_default(),
            os_version: p.os_version.clone().unwrap_or_default(),
            os_features: p.os_features.clone().unwrap_or_default(),
        }
    }
}

/// An LLB platform as kiln-oci's (empty variant, version and features: none).
impl From<&pb::Platform> for kiln_oci::Platform {
    fn from(p: &pb::Platform) -> Self {
        let mut out = kiln_oci::Platform::new(
            &p.os,
            &p.architecture,
            Some(p.variant.as_str()).filter(|v| !v.is_empty()),
        );
        out.os_version = Some(p.os_version.clone()).filter(|v| !v.is_empty());
        out.os_features = Some(p.os_features.clone()).filter(|f| !f.is_empty());
        out
    }
}
