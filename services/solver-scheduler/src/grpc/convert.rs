//! Conversions between generated types and the solver's domain types.

use crate::build::{BuildRequest, ExporterSpec};
use kiln_proto::moby::buildkit::v1::SolveRequest;

pub fn build_request(r: SolveRequest) -> BuildRequest {
    let mut exporters: Vec<ExporterSpec> = r
        .exporters
        .into_iter()
        .map(|e| ExporterSpec { r#type: e.r#type, attrs: e.attrs })
        .collect();
    if exporters.is_empty() && !r.exporter_deprecated.is_empty() {
        exporters.push(ExporterSpec { r#type: r.exporter_deprecated, attrs: r.exporter_attrs_deprecated });
    }
    BuildRequest {
        id: r.r#ref,
        session_id: r.session,
        definition: r.definition,
        frontend: r.frontend,
        frontend_attrs: r.frontend_attrs,
        exporters,
    }
}
