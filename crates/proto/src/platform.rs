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
