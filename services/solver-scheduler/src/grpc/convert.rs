//! Conversions between generated types and the solver's domain types.

use crate::build::{BuildRequest, ExporterSpec};
use crate::history::HistoryRecord;
use crate::usage::{Filter, PruneOptions, UsageItem};
use kiln_proto::moby::buildkit::v1::{
    BuildHistoryRecord, BuildHistoryStep, HistoryError, PruneRequest, SolveRequest, UsageRecord,
};

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
    let (mut cache_exports, cache_imports) =
        crate::remote::cache_entries(r.cache.unwrap_or_default());
    crate::remote::inline_from_build_arg(&r.frontend_attrs, &mut cache_exports);
    BuildRequest {
        cache_exports,
        cache_imports,
        id: r.r#ref,
        session_id: r.session,
        definition: r.definition,
        frontend: r.frontend,
        frontend_attrs: r.frontend_attrs,
        exporters,
        entitlements: r.entitlements,
        frontend_inputs: r.frontend_inputs,
        owner: String::new(),
    }
}

pub fn timestamp(unix_nanos: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: unix_nanos.div_euclid(1_000_000_000),
        nanos: unix_nanos.rem_euclid(1_000_000_000) as i32,
    }
}

/// A `du` item as `du`/`prune` report it.
pub fn usage_record(r: &UsageItem) -> UsageRecord {
    UsageRecord {
        id: r.id.clone(),
        mutable: r.mutable,
        in_use: r.in_use,
        size: r.size,
        parent: r.parents.first().cloned().unwrap_or_default(),
        parents: r.parents.clone(),
        created_at: (r.created > 0).then(|| timestamp(r.created)),
        last_used_at: (r.last_used > 0).then(|| timestamp(r.last_used)),
        usage_count: r.usage_count,
        description: r.description.clone(),
        record_type: r.record_type.clone(),
        shared: r.shared,
    }
}

/// A client's prune request in domain terms: `keep-storage` is BuildKit's
/// field 4 (`keepBytes`, now `reservedSpace`); `maxUsedSpace` is a limit too.
pub fn prune_options(r: &PruneRequest) -> Result<PruneOptions, crate::Error> {
    let limit = match (r.reserved_space, r.max_used_space) {
        (a, b) if a > 0 && b > 0 => b.max(a),
        (a, b) => a.max(b),
    };
    Ok(PruneOptions {
        filter: Filter::parse(&r.filter)?,
        all: r.all,
        keep_duration: (r.keep_duration > 0)
            .then(|| std::time::Duration::from_nanos(r.keep_duration as u64)),
        keep_bytes: limit,
    })
}

/// A finished build as BuildKit's `BuildHistoryRecord` (with kiln's steps).
pub fn history_record(h: &HistoryRecord) -> BuildHistoryRecord {
    let ts = |n: i64| (n > 0).then(|| timestamp(n));
    BuildHistoryRecord {
        r#ref: h.r#ref.clone(),
        frontend: h.frontend.clone(),
        frontend_attrs: h.frontend_attrs.clone(),
        error: (!h.error.is_empty()).then(|| HistoryError {
            code: tonic::Code::Unknown as i32,
            message: h.error.clone(),
        }),
        created_at: ts(h.created),
        completed_at: ts(h.completed),
        exporter_response: h.exporter_response.clone(),
        generation: 0,
        pinned: false,
        num_cached_steps: h.cached_steps() as i32,
        num_total_steps: h.steps.len() as i32,
        num_completed_steps: h.completed_steps() as i32,
        num_warnings: h.warnings as i32,
        kiln_steps: h
            .steps
            .iter()
            .map(|s| BuildHistoryStep {
                digest: s.digest.clone(),
                name: s.name.clone(),
                cached: s.cached,
                started: ts(s.started),
                completed: ts(s.completed),
                error: s.error.clone(),
                worker: s.worker.clone(),
            })
            .collect(),
    }
}

/// A `google.rpc.Status` a client sent (LLBBridge `Return`), with the step
/// and source details it carries.
pub fn remote(st: kiln_proto::google::rpc::Status) -> kiln_proto::status::Remote {
    use prost::Message;
    let code = tonic::Code::from(st.code);
    let message = st.message.clone();
    let status = tonic::Status::with_details(code, message, st.encode_to_vec().into());
    kiln_proto::status::Remote::from(status)
}
