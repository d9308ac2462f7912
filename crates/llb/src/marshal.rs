//! Byte-exact LLB encoding.
//!
//! BuildKit hashes op bytes as the client produced them, so an op's digest is
//! only stable if we reproduce protobuf-go's deterministic marshaling exactly.
//! prost differs from it in two places, both handled here:
//!
//! * prost writes a `oneof` at the position of its lowest tag; protobuf-go writes
//!   it after the regular fields. Only `pb.Op` is affected (its body oneof has
//!   tags 2..8 while `platform`/`constraints` are 10/11).
//! * prost omits a map entry's key or value when it holds the default value;
//!   protobuf-go always writes both (`Source.locations` values are usually the
//!   empty `Locations{}`, which must appear as `12 00`).
//!
//! Messages without maps or early oneofs are encoded with prost directly.

use prost::Message;
use prost::encoding::{self, WireType, encode_key, encode_varint};

use crate::pb;

/// Encodes an op exactly as BuildKit's client does (protobuf-go, deterministic).
pub fn marshal_op(op: &pb::Op) -> Vec<u8> {
    let mut buf = Vec::with_capacity(op.encoded_len() + 16);
    write_op(op, &mut buf);
    buf
}

/// Encodes a definition with every map sorted by key (protobuf-go deterministic):
/// the `def.canonical.pb` form. Op entries are copied verbatim.
pub fn marshal_definition(def: &pb::Definition) -> Vec<u8> {
    let mut buf = Vec::with_capacity(def.encoded_len() + 64);
    write_definition(def, &mut buf);
    buf
}

fn put_len_delimited(tag: u32, body: &[u8], buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(body.len() as u64, buf);
    buf.extend_from_slice(body);
}

fn put_nested(tag: u32, buf: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let mut body = Vec::new();
    write(&mut body);
    put_len_delimited(tag, &body, buf);
}

fn put_string_map(tag: u32, map: &std::collections::BTreeMap<String, String>, buf: &mut Vec<u8>) {
    for (k, v) in map {
        put_nested(tag, buf, |e| {
            encoding::string::encode(1, k, e);
            encoding::string::encode(2, v, e);
        });
    }
}

fn write_op(op: &pb::Op, buf: &mut Vec<u8>) {
    for input in &op.inputs {
        encoding::message::encode(1, input, buf);
    }
    if let Some(platform) = &op.platform {
        encoding::message::encode(10, platform, buf);
    }
    if let Some(constraints) = &op.constraints {
        encoding::message::encode(11, constraints, buf);
    }
    use pb::op::Op as Body;
    match &op.op {
        None => {}
        Some(Body::Exec(m)) => encoding::message::encode(2, m, buf),
        Some(Body::Source(m)) => put_nested(3, buf, |b| write_source_op(m, b)),
        Some(Body::File(m)) => encoding::message::encode(4, m, buf),
        Some(Body::Build(m)) => put_nested(5, buf, |b| write_build_op(m, b)),
        Some(Body::Merge(m)) => encoding::message::encode(6, m, buf),
        Some(Body::Diff(m)) => encoding::message::encode(7, m, buf),
        Some(Body::Passthrough(m)) => encoding::message::encode(8, m, buf),
    }
}

fn write_source_op(s: &pb::SourceOp, buf: &mut Vec<u8>) {
    if !s.identifier.is_empty() {
        encoding::string::encode(1, &s.identifier, buf);
    }
    put_string_map(2, &s.attrs, buf);
}

fn write_build_op(b: &pb::BuildOp, buf: &mut Vec<u8>) {
    if b.builder != 0 {
        encoding::int64::encode(1, &b.builder, buf);
    }
    for (k, v) in &b.inputs {
        put_nested(2, buf, |e| {
            encoding::string::encode(1, k, e);
            encoding::message::encode(2, v, e);
        });
    }
    if let Some(def) = &b.def {
        put_nested(3, buf, |d| write_definition(def, d));
    }
    put_string_map(4, &b.attrs, buf);
}

fn write_definition(def: &pb::Definition, buf: &mut Vec<u8>) {
    for op in &def.def {
        encoding::bytes::encode(1, op, buf);
    }
    for (k, md) in &def.metadata {
        put_nested(2, buf, |e| {
            encoding::string::encode(1, k, e);
            put_nested(2, e, |m| write_op_metadata(md, m));
        });
    }
    if let Some(source) = &def.source {
        put_nested(3, buf, |s| write_source(source, s));
    }
}

fn write_op_metadata(md: &pb::OpMetadata, buf: &mut Vec<u8>) {
    if md.ignore_cache {
        encoding::bool::encode(1, &md.ignore_cache, buf);
    }
    put_string_map(2, &md.description, buf);
    if let Some(ec) = &md.export_cache {
        encoding::message::encode(4, ec, buf);
    }
    for (k, v) in &md.caps {
        put_nested(5, buf, |e| {
            encoding::string::encode(1, k, e);
            encoding::bool::encode(2, v, e);
        });
    }
    if let Some(pg) = &md.progress_group {
        encoding::message::encode(6, pg, buf);
    }
    if let Some(lr) = &md.linux_resources {
        encoding::message::encode(7, lr, buf);
    }
}

fn write_source(source: &pb::Source, buf: &mut Vec<u8>) {
    for (k, locs) in &source.locations {
        put_nested(1, buf, |e| {
            encoding::string::encode(1, k, e);
            encoding::message::encode(2, locs, e);
        });
    }
    for info in &source.infos {
        put_nested(2, buf, |b| write_source_info(info, b));
    }
}

fn write_source_info(info: &pb::SourceInfo, buf: &mut Vec<u8>) {
    if !info.filename.is_empty() {
        encoding::string::encode(1, &info.filename, buf);
    }
    if !info.data.is_empty() {
        encoding::bytes::encode(2, &info.data, buf);
    }
    if let Some(def) = &info.definition {
        put_nested(3, buf, |d| write_definition(def, d));
    }
    if !info.language.is_empty() {
        encoding::string::encode(4, &info.language, buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_body_is_written_after_platform_and_constraints() {
        let op = pb::Op {
            platform: Some(pb::Platform {
                architecture: "amd64".into(),
                os: "linux".into(),
                ..Default::default()
            }),
            constraints: Some(pb::WorkerConstraints::default()),
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: "x".into(),
                attrs: Default::default(),
            })),
            ..Default::default()
        };
        let bytes = marshal_op(&op);
        // platform (tag 10) first, then constraints `5a 00`, then source (tag 3).
        assert_eq!(bytes[0], 0x52);
        let constraints_at = 2 + bytes[1] as usize;
        assert_eq!(&bytes[constraints_at..constraints_at + 2], &[0x5a, 0x00]);
        assert_eq!(
            &bytes[constraints_at + 2..],
            &[0x1a, 0x03, 0x0a, 0x01, b'x']
        );
        assert_eq!(pb::Op::decode(bytes.as_slice()).expect("decodes"), op);
    }

    #[test]
    fn empty_map_values_are_written() {
        let mut md = pb::OpMetadata::default();
        md.description.insert("k".into(), String::new());
        md.caps.insert("c".into(), false);
        let mut m = Vec::new();
        write_op_metadata(&md, &mut m);
        assert_eq!(
            m,
            vec![
                0x12, 0x05, 0x0a, 0x01, b'k', 0x12, 0x00, 0x2a, 0x05, 0x0a, 0x01, b'c', 0x10, 0x00
            ]
        );
    }
}
