//! How an error travels as a gRPC status, the one rule every service's edge
//! follows: the message is the whole cause chain (`pull x: connect: connection
//! refused`), and where a step or a Dockerfile location is known it rides in
//! the status details the way BuildKit sends it (`errdefs.Vertex`,
//! `errdefs.Source` as JSON `Any`s in `grpc-status-details-bin`), so
//! `buildctl` and buildx print the failing lines and kiln's services pass the
//! location on unchanged.

use std::error::Error;

use base64::Engine as _;
use prost::Message as _;
use serde_json::{Value, json};

use crate::google::rpc;
use crate::pb;

/// The type URL BuildKit registers for `errdefs.Vertex`.
pub const VERTEX_TYPE_URL: &str = "github.com/moby/buildkit/errdefs.Vertex+json";
/// The type URL BuildKit registers for `errdefs.Source`.
pub const SOURCE_TYPE_URL: &str = "github.com/moby/buildkit/errdefs.Source+json";

/// `error: cause: cause…`, each message once (a message never repeats its source).
pub fn chain(e: &dyn Error) -> String {
    Chain(e).to_string()
}

/// Displays an error with all its causes, as [`chain`] does: what a log line
/// prints (`tracing::warn!(error = %Chain(&e), …)`).
pub struct Chain<'a>(pub &'a dyn Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let text = c.to_string();
            // A message that already quotes its source (a foreign crate's habit)
            // is not repeated.
            if !out.ends_with(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            cause = c.source();
        }
        f.write_str(&out)
    }
}

/// A status whose message is `e` and all its causes.
pub fn from_error(code: tonic::Code, e: &dyn Error) -> tonic::Status {
    tonic::Status::new(code, chain(e))
}

/// A peer's failure as it arrived over gRPC: its code, its whole message
/// (the peer joined its causes before sending it) and the step and source
/// location it carried in the status details. Its message is the peer's,
/// unchanged; [`Remote::into_status`] sends it on with code and details.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Remote {
    pub code: tonic::Code,
    pub message: String,
    pub details: Details,
}

impl Remote {
    pub fn new(code: tonic::Code, message: impl Into<String>) -> Self {
        Remote {
            code,
            message: message.into(),
            details: Details::default(),
        }
    }

    /// The status the peer sent, passed on: its code, message and details.
    pub fn into_status(self) -> tonic::Status {
        self.details
            .attach(tonic::Status::new(self.code, self.message))
    }
}

impl From<tonic::Status> for Remote {
    fn from(s: tonic::Status) -> Self {
        Remote {
            code: s.code(),
            message: s.message().to_string(),
            details: Details::of(&s),
        }
    }
}

/// Lines of a source file (a Dockerfile) an error points at.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourceLocation {
    pub info: pb::SourceInfo,
    pub ranges: Vec<pb::Range>,
}

/// Where a failure happened, as far as it is known.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Details {
    /// The digest of the LLB vertex (step) that failed.
    pub vertex: Option<String>,
    /// The source lines the failing step or instruction came from.
    pub sources: Vec<SourceLocation>,
}

impl Details {
    pub fn is_empty(&self) -> bool {
        self.vertex.is_none() && self.sources.is_empty()
    }

    /// The details a status carries; details kiln does not know are skipped.
    pub fn of(status: &tonic::Status) -> Details {
        let mut out = Details::default();
        let Ok(st) = rpc::Status::decode(status.details()) else {
            return out;
        };
        for any in st.details {
            let Ok(v) = serde_json::from_slice::<Value>(&any.value) else {
                continue;
            };
            match any.type_url.as_str() {
                VERTEX_TYPE_URL => {
                    out.vertex = v["digest"].as_str().map(str::to_string);
                }
                SOURCE_TYPE_URL => out.sources.push(source_from_json(&v)),
                _ => {}
            }
        }
        out
    }

    /// `status` with these details (replacing any it had).
    pub fn attach(&self, status: tonic::Status) -> tonic::Status {
        if self.is_empty() {
            return status;
        }
        let mut details = Vec::new();
        if let Some(digest) = &self.vertex {
            details.push(any(VERTEX_TYPE_URL, &json!({ "digest": digest })));
        }
        for s in &self.sources {
            details.push(any(SOURCE_TYPE_URL, &source_to_json(s)));
        }
        let encoded = rpc::Status {
            code: status.code() as i32,
            message: status.message().to_string(),
            details,
        }
        .encode_to_vec();
        tonic::Status::with_details_and_metadata(
            status.code(),
            status.message().to_string(),
            encoded.into(),
            status.metadata().clone(),
        )
    }
}

fn any(type_url: &str, value: &Value) -> prost_types::Any {
    prost_types::Any {
        type_url: type_url.to_string(),
        value: value.to_string().into_bytes(),
    }
}

/// Go's `encoding/json` of BuildKit's generated structs: `omitempty`
/// everywhere, `[]byte` as standard base64.
fn source_to_json(s: &SourceLocation) -> Value {
    let mut info = serde_json::Map::new();
    if !s.info.filename.is_empty() {
        info.insert("filename".into(), s.info.filename.clone().into());
    }
    if !s.info.data.is_empty() {
        let data = base64::engine::general_purpose::STANDARD.encode(&s.info.data);
        info.insert("data".into(), data.into());
    }
    if !s.info.language.is_empty() {
        info.insert("language".into(), s.info.language.clone().into());
    }
    let position = |p: &Option<pb::Position>| {
        let mut m = serde_json::Map::new();
        if let Some(p) = p {
            if p.line != 0 {
                m.insert("line".into(), p.line.into());
            }
            if p.character != 0 {
                m.insert("character".into(), p.character.into());
            }
        }
        Value::Object(m)
    };
    let ranges: Vec<Value> = s
        .ranges
        .iter()
        .map(|r| json!({ "start": position(&r.start), "end": position(&r.end) }))
        .collect();
    let mut out = serde_json::Map::new();
    out.insert("info".into(), Value::Object(info));
    if !ranges.is_empty() {
        out.insert("ranges".into(), ranges.into());
    }
    Value::Object(out)
}

fn source_from_json(v: &Value) -> SourceLocation {
    let int = |v: &Value| i32::try_from(v.as_i64().unwrap_or(0)).unwrap_or(0);
    let position = |p: &Value| {
        p.is_object().then(|| pb::Position {
            line: int(&p["line"]),
            character: int(&p["character"]),
        })
    };
    let info = &v["info"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    SourceLocation {
        info: pb::SourceInfo {
            filename: text(&info["filename"]),
            data: info["data"]
                .as_str()
                .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
                .unwrap_or_default(),
            language: text(&info["language"]),
            definition: None,
        },
        ranges: v["ranges"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .map(|r| pb::Range {
                        start: position(&r["start"]),
                        end: position(&r["end"]),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("pull docker.io/library/busybox:latest")]
    struct Pull {
        source: std::io::Error,
    }

    #[test]
    fn the_message_is_the_whole_chain() {
        let e = Pull {
            source: std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "connection refused",
            ),
        };
        let s = from_error(tonic::Code::Unavailable, &e);
        assert_eq!(
            s.message(),
            "pull docker.io/library/busybox:latest: connection refused"
        );
    }

    fn location() -> Details {
        Details {
            vertex: Some("sha256:abc".into()),
            sources: vec![SourceLocation {
                info: pb::SourceInfo {
                    filename: "Dockerfile".into(),
                    data: b"FROM busybox\nRUN false\n".to_vec(),
                    language: "Dockerfile".into(),
                    definition: None,
                },
                ranges: vec![pb::Range {
                    start: Some(pb::Position {
                        line: 2,
                        character: 0,
                    }),
                    end: Some(pb::Position {
                        line: 2,
                        character: 0,
                    }),
                }],
            }],
        }
    }

    #[test]
    fn details_round_trip_through_a_status() {
        let s = location().attach(tonic::Status::unknown(
            "process did not complete successfully",
        ));
        assert_eq!(s.message(), "process did not complete successfully");
        assert_eq!(Details::of(&s), location());
    }

    #[test]
    fn details_are_buildkits_json_anys() {
        let s = location().attach(tonic::Status::unknown("x"));
        let st = rpc::Status::decode(s.details()).expect("google.rpc.Status");
        assert_eq!(st.details[0].type_url, VERTEX_TYPE_URL);
        assert_eq!(st.details[0].value, br#"{"digest":"sha256:abc"}"#);
        assert_eq!(st.details[1].type_url, SOURCE_TYPE_URL);
        let v: Value = serde_json::from_slice(&st.details[1].value).expect("json");
        // "FROM busybox\nRUN false\n" in base64, as Go's encoding/json writes []byte
        assert_eq!(v["info"]["data"], "RlJPTSBidXN5Ym94ClJVTiBmYWxzZQo=");
        assert_eq!(v["ranges"][0]["start"]["line"], 2);
        assert!(
            v["ranges"][0]["start"].get("character").is_none(),
            "omitempty"
        );
    }

    #[test]
    fn a_remote_error_passes_on_its_code_message_and_details() {
        let sent = location().attach(tonic::Status::not_found("no such image"));
        let back = Remote::from(sent).into_status();
        assert_eq!(back.code(), tonic::Code::NotFound);
        assert_eq!(back.message(), "no such image");
        assert_eq!(Details::of(&back), location());
    }

    #[test]
    fn a_status_without_details_has_none() {
        assert!(Details::of(&tonic::Status::internal("x")).is_empty());
    }
}
