//! Conversions between the worker core's types and `kiln.worker.v1` messages.

use crate::{Event, LayerBlob, RunRequest, pb};
use kiln_proto::kiln::worker::v1 as wpb;
use prost::Message;

/// A wire ref: empty = scratch.
pub fn ref_from_wire(r: &str) -> Option<String> {
    (!r.is_empty()).then(|| r.to_string())
}

pub fn ref_to_wire(r: Option<String>) -> String {
    r.unwrap_or_default()
}

pub fn run_request(r: wpb::RunRequest) -> Result<RunRequest, crate::Error> {
    let op = pb::Op::decode(r.op.as_slice())?;
    Ok(RunRequest {
        build_id: r.build_id,
        session_id: r.session_id,
        session_shared_key: r.session_shared_key,
        name: r.name,
        op,
        inputs: r.inputs.iter().map(|i| ref_from_wire(i)).collect(),
        entitlements: r.entitlements,
    })
}

pub fn event(e: Event) -> wpb::RunEvent {
    let ev = match e {
        Event::Log { stream, data } => wpb::run_event::Event::Log(wpb::Log { stream, data }),
        Event::Progress {
            id,
            current,
            total,
            completed,
        } => wpb::run_event::Event::Progress(wpb::Progress {
            id,
            current,
            total,
            completed,
        }),
    };
    wpb::RunEvent { event: Some(ev) }
}

/// The outputs of a run, with the content key recorded in each output's
/// snapshot (empty where the definition determines the content).
pub fn outputs(refs: Vec<Option<String>>, content_keys: Vec<String>) -> wpb::RunEvent {
    wpb::RunEvent {
        event: Some(wpb::run_event::Event::Outputs(wpb::Outputs {
            refs: refs.into_iter().map(ref_to_wire).collect(),
            content_keys,
        })),
    }
}

pub fn layer(l: LayerBlob) -> wpb::Layer {
    wpb::Layer {
        media_type: l.descriptor.media_type,
        digest: l.descriptor.digest,
        size: l.descriptor.size as i64,
        diff_id: l.diff_id,
        empty: false,
    }
}
