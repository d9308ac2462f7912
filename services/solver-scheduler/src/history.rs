//! Build history: one record per finished build (ref, frontend, times,
//! error, and each step with whether it was cached), kept in the cache
//! store so it survives restarts. Served as BuildKit's
//! `Control.ListenBuildHistory` records.

use kiln_proto::moby::buildkit::v1::StatusResponse;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How many finished builds the store keeps (the oldest go first).
pub const HISTORY_MAX: usize = 200;

/// One step (vertex) of a past build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HistoryStep {
    pub digest: String,
    pub name: String,
    pub cached: bool,
    /// unix nanoseconds (0 = not started / not completed)
    pub started: i64,
    pub completed: i64,
    pub error: String,
    /// the farm worker it was placed on (its progress says `placed on worker ID`)
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub worker: String,
    /// bytes its inputs moved from other workers (`input … bytes moved`)
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes_moved: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How much an `input … from worker ID: N bytes moved` status moved.
fn moved(status_id: &str) -> Option<u64> {
    let rest = status_id.strip_prefix("input ")?;
    let n = rest.strip_suffix(MOVED)?.rsplit_once(": ")?.1;
    n.parse().ok()
}

/// The progress status a farm adds to a step it placed: `placed on worker ID`.
pub const PLACED_ON: &str = "placed on worker ";
/// The end of the status a farm adds for an input it moved to the step's
/// worker: `input REF from worker ID: N bytes moved`.
pub const MOVED: &str = " bytes moved";

/// One finished build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HistoryRecord {
    pub r#ref: String,
    pub frontend: String,
    pub frontend_attrs: BTreeMap<String, String>,
    /// unix nanoseconds
    pub created: i64,
    pub completed: i64,
    /// empty when the build succeeded
    pub error: String,
    pub exporter_response: BTreeMap<String, String>,
    pub steps: Vec<HistoryStep>,
    /// how many warnings the build's progress carried (build checks, ...)
    #[serde(default)]
    pub warnings: usize,
}

impl HistoryRecord {
    pub fn cached_steps(&self) -> usize {
        self.steps.iter().filter(|s| s.cached).count()
    }
    pub fn completed_steps(&self) -> usize {
        self.steps.iter().filter(|s| s.completed > 0).count()
    }
    pub fn failed_steps(&self) -> usize {
        self.steps.iter().filter(|s| !s.error.is_empty()).count()
    }
}

fn nanos(t: &prost_types::Timestamp) -> i64 {
    t.seconds * 1_000_000_000 + i64::from(t.nanos)
}

/// The steps of a build from its progress messages: each vertex in the
/// order it first appeared, with its last reported state.
pub fn steps_from_progress(msgs: &[StatusResponse]) -> Vec<HistoryStep> {
    let mut order: Vec<String> = Vec::new();
    let mut by_digest: BTreeMap<String, HistoryStep> = BTreeMap::new();
    for v in msgs.iter().flat_map(|m| m.vertexes.iter()) {
        let s = by_digest.entry(v.digest.clone()).or_insert_with(|| {
            order.push(v.digest.clone());
            HistoryStep {
                digest: v.digest.clone(),
                ..Default::default()
            }
        });
        s.name = v.name.clone();
        s.cached |= v.cached;
        if let Some(t) = &v.started {
            s.started = nanos(t);
        }
        if let Some(t) = &v.completed {
            s.completed = nanos(t);
        }
        if !v.error.is_empty() {
            s.error = v.error.clone();
        }
    }
    for st in msgs.iter().flat_map(|m| m.statuses.iter()) {
        if let (Some(w), Some(s)) = (st.id.strip_prefix(PLACED_ON), by_digest.get_mut(&st.vertex)) {
            // the last placement: a step that ran again elsewhere names where it ended
            s.worker = w.to_string();
        }
        if let (Some(n), Some(s)) = (moved(&st.id), by_digest.get_mut(&st.vertex))
            && st.completed.is_some()
        {
            s.bytes_moved += n;
        }
    }
    order
        .into_iter()
        .filter_map(|d| by_digest.remove(&d))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::moby::buildkit::v1::Vertex;

    fn ts(s: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: s,
            nanos: 0,
        })
    }

    #[test]
    fn steps_keep_first_order_and_last_state() {
        let v = |d: &str, started, completed, cached, error: &str| StatusResponse {
            vertexes: vec![Vertex {
                digest: d.into(),
                name: format!("step {d}"),
                started,
                completed,
                cached,
                error: error.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let msgs = vec![
            v("b", ts(1), None, false, ""),
            v("a", ts(1), ts(2), true, ""),
            v("b", ts(1), ts(3), false, "exit code: 1"),
        ];
        let steps = steps_from_progress(&msgs);
        assert_eq!(
            steps.iter().map(|s| s.digest.as_str()).collect::<Vec<_>>(),
            ["b", "a"]
        );
        assert_eq!(steps[0].completed, 3_000_000_000);
        assert_eq!(steps[0].error, "exit code: 1");
        let rec = HistoryRecord {
            steps,
            ..Default::default()
        };
        assert_eq!(
            (
                rec.cached_steps(),
                rec.completed_steps(),
                rec.failed_steps()
            ),
            (1, 2, 1)
        );
    }

    #[test]
    fn steps_keep_their_placement_and_the_bytes_their_inputs_moved() {
        use kiln_proto::moby::buildkit::v1::VertexStatus;
        let status = |id: String, completed| VertexStatus {
            id,
            vertex: "d".into(),
            completed,
            ..Default::default()
        };
        let msgs = vec![StatusResponse {
            vertexes: vec![Vertex {
                digest: "d".into(),
                ..Default::default()
            }],
            statuses: vec![
                status(format!("{PLACED_ON}w1"), ts(1)),
                status(format!("input abc from worker w2: 100{MOVED}"), ts(1)),
                status(format!("input def from worker w3: 23{MOVED}"), ts(1)),
                // not finished yet: not counted
                status(format!("input ghi from worker w3: 5{MOVED}"), None),
            ],
            ..Default::default()
        }];
        let steps = steps_from_progress(&msgs);
        assert_eq!(
            (steps[0].worker.as_str(), steps[0].bytes_moved),
            ("w1", 123)
        );
    }
}
