//! Layer options on the wire: how the exporter (and the solver, computing
//! layers ahead of an export) asks a worker for a chain's blobs.

use kiln_oci::{Compression, LayerOptions};

use crate::kiln::worker::v1 as wire;

impl From<&LayerOptions> for wire::LayerOptions {
    fn from(o: &LayerOptions) -> Self {
        wire::LayerOptions {
            compression: o.compression.name().to_string(),
            level: o.level,
            force: o.force,
            clamp_mtime: o.clamp_mtime,
        }
    }
}

/// A compression name the worker does not know.
#[derive(Debug, thiserror::Error)]
#[error("unsupported layer compression {0:?}")]
pub struct UnknownCompression(pub String);

impl TryFrom<&wire::LayerOptions> for LayerOptions {
    type Error = UnknownCompression;

    fn try_from(o: &wire::LayerOptions) -> Result<Self, Self::Error> {
        let compression = Compression::from_name(&o.compression)
            .ok_or_else(|| UnknownCompression(o.compression.clone()))?;
        Ok(LayerOptions {
            compression,
            level: o.level,
            force: o.force,
            clamp_mtime: o.clamp_mtime,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_round_trip() {
        let o = LayerOptions {
            compression: Compression::Zstd,
            level: Some(12),
            force: true,
            clamp_mtime: Some(42),
        };
        let back = LayerOptions::try_from(&wire::LayerOptions::from(&o)).expect("known");
        assert_eq!(back, o);
        let none = wire::LayerOptions::default();
        assert_eq!(
            LayerOptions::try_from(&none).expect("gzip"),
            LayerOptions::default()
        );
        let bad = wire::LayerOptions {
            compression: "lz4".into(),
            ..Default::default()
        };
        assert!(LayerOptions::try_from(&bad).is_err());
    }
}
