//! Conversions between generated types and the solver's domain types.

use crate::build::{BuildRequest, ExporterSpec};
use crate::cache::CacheRecord;
use kiln_proto::moby::buildkit::v1::{SolveRequest, UsageRecord};

pub fn build_request(r: SolveRequest) -> BuildRequest {
    let mut exporters: Vec<ExporterSpec> = r
        .exporters
        .into_iter()
        .map(|e| ExporterSpec {
            r#type: e.r#type,
            attrs: e.attrs,
        })
        .collect();
    if exporters.is_empty() && !r.exporter_deprecated.is_empty() {
        exporters.push(ExporterSpec {
            r#type: r.exporter_deprecated,
            attrs: r.exporter_attrs_deprecated,
        });
    }
    BuildRequest {
        id: r.r#ref,
        session_id: r.session,
        definition: r.definition,
        frontend: r.frontend,
        frontend_attrs: r.frontend_attrs,
        exporters,
        entitlements: r.entitlements,
    }
}

fn timestamp(unix_nanos: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: unix_nanos.div_euclid(1_000_000_000),
        nanos: unix_nanos.rem_euclid(1_000_000_000) as i32,
    }
}

/// A cache record as `du`/`prune` report it.
pub fn usage_record(r: &CacheRecord) -> UsageRecord {
    UsageRecord {
        id: r.id.trim_start_matches("sha256:").to_string(),
        size: r.size.unwrap_or(0),
        created_at: Some(timestamp(r.created)),
        last_used_at: Some(timestamp(r.last_used)),
        usage_count: r.usage_count,
        description: r.description.clone(),
        record_type: "regular".into(),
        ..Default::default()
    }
}

/// A snapshot no cache record names, as `du` reports it.
pub fn snapshot_record(s: &crate::peer::SnapshotUsage, shared: bool) -> UsageRecord {
    UsageRecord {
        id: s.r#ref.clone(),
        size: s.size,
        parent: s.parent.clone(),
        parents: if s.parent.is_empty() {
            vec![]
        } else {
            vec![s.parent.clone()]
        },
        created_at: Some(timestamp(s.created)),
        last_used_at: Some(timestamp(s.created)),
        description: format!("{} snapshot", s.kind),
        record_type: if s.kind == "local" {
            "source.local".into()
        } else {
            "regular".into()
        },
        shared,
        ..Default::default()
    }
}
