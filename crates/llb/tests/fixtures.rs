//! Checks the encoder and loader against BuildKit v0.32.2's own output
//! (`testdata/llb`, see its README).

use std::path::{Path, PathBuf};

use kiln_llb::{DefinitionBuilder, digest, load, marshal_definition, marshal_op, pb};
use prost::Message;
use serde_json::Value;

fn fixtures_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/llb");
    assert!(
        dir.join("index.json").is_file(),
        "LLB fixtures not found at {} (expected the shared fixtures checkout next to the repo)",
        dir.display()
    );
    dir
}

fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    let at = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let lo = at.saturating_sub(8);
    format!(
        "lengths {} vs {}, first difference at byte {at}: ours ..{} theirs ..{}",
        a.len(),
        b.len(),
        hex::encode(&a[lo..(at + 16).min(a.len())]),
        hex::encode(&b[lo..(at + 16).min(b.len())]),
    )
}

fn check_fixture(dir: &Path, entry: &Value) -> Vec<String> {
    let name = entry["name"].as_str().expect("fixture name");
    let fdir = dir.join(entry["dir"].as_str().expect("fixture dir"));
    let mut failures = Vec::new();
    let mut fail = |msg: String| failures.push(format!("{name}: {msg}"));

    let raw = std::fs::read(fdir.join("def.pb")).expect("read def.pb");
    let canonical = std::fs::read(fdir.join("def.canonical.pb")).expect("read def.canonical.pb");
    let def = pb::Definition::decode(raw.as_slice()).expect("decode def.pb");
    let reencoded = marshal_definition(&def);
    if reencoded != canonical {
        fail(format!(
            "definition re-encoding differs from def.canonical.pb: {}",
            first_difference(&reencoded, &canonical)
        ));
    }

    let ops = read_json(&fdir.join("ops.json"));
    let listed = ops["ops"].as_array().expect("ops array");
    if listed.len() as u64 != entry["num_ops"].as_u64().expect("num_ops")
        || listed.len() != def.def.len()
    {
        fail(format!(
            "ops.json lists {} ops, index.json {}, def.pb {}",
            listed.len(),
            entry["num_ops"],
            def.def.len()
        ));
    }
    for op in listed {
        let index = op["index"].as_u64().expect("op index") as usize;
        let bytes = hex::decode(op["hex"].as_str().expect("op hex")).expect("valid hex");
        let want = op["digest"].as_str().expect("op digest");
        if digest(&bytes) != want {
            fail(format!("op {index}: digest {} != {want}", digest(&bytes)));
        }
        if def.def.get(index) != Some(&bytes) {
            fail(format!("op {index}: def entry differs from ops.json hex"));
        }
        match pb::Op::decode(bytes.as_slice()) {
            Ok(decoded) => {
                let again = marshal_op(&decoded);
                if again != bytes {
                    fail(format!(
                        "op {index} ({}) re-encodes differently: {}",
                        op["kind"],
                        first_difference(&again, &bytes)
                    ));
                }
            }
            Err(e) => fail(format!("op {index}: decode: {e}")),
        }
    }

    match load(&def) {
        Ok(graph) => {
            let want = entry["result_digest"].as_str().unwrap_or("");
            let got = graph
                .result
                .as_ref()
                .map(|r| r.digest.as_str())
                .unwrap_or("");
            if got != want {
                fail(format!("load: result {got:?} != {want:?}"));
            }
            let want_index = ops["result"]["output_index"].as_i64().unwrap_or(0);
            if graph.result.as_ref().map(|r| r.index).unwrap_or(0) != want_index {
                fail(format!(
                    "load: result output index differs from {want_index}"
                ));
            }
            if let Some(r) = &graph.result
                && graph.get(&r.digest).is_none()
            {
                fail("load: result vertex missing".into());
            }
        }
        Err(e) => fail(format!("load: {e}")),
    }
    failures
}

#[test]
fn every_fixture_round_trips_byte_exact() {
    let dir = fixtures_dir();
    let index = read_json(&dir.join("index.json"));
    let fixtures = index["fixtures"].as_array().expect("fixtures array");
    assert!(!fixtures.is_empty());
    let failures: Vec<String> = fixtures
        .iter()
        .flat_map(|f| check_fixture(&dir, f))
        .collect();
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let total_ops: u64 = fixtures
        .iter()
        .map(|f| f["num_ops"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(total_ops, 221, "the fixture set documents 221 ops");
}

/// Rebuilding every fixture op by op with `DefinitionBuilder` (same ops, metadata,
/// source locations and infos) gives BuildKit's definition byte for byte:
/// terminal op, its caps and the per-op `Source.locations` entries included.
#[test]
fn builder_reproduces_every_fixture_definition() {
    let dir = fixtures_dir();
    let index = read_json(&dir.join("index.json"));
    let mut failures = Vec::new();
    for entry in index["fixtures"].as_array().expect("fixtures array") {
        let name = entry["name"].as_str().expect("fixture name");
        let fdir = dir.join(entry["dir"].as_str().expect("fixture dir"));
        let canonical =
            std::fs::read(fdir.join("def.canonical.pb")).expect("read def.canonical.pb");
        let def = pb::Definition::decode(canonical.as_slice()).expect("decode");
        let graph = load(&def).expect("load");
        let mut b = DefinitionBuilder::new();
        for info in def.source.iter().flat_map(|s| s.infos.iter()) {
            b.add_source_info(info.clone());
        }
        for v in &graph.vertices {
            let input = b.add_with_locations(
                v.op.clone(),
                v.metadata.clone(),
                graph.locations(&v.digest).to_vec(),
            );
            assert_eq!(input.digest, v.digest, "{name}: builder digest");
        }
        let rebuilt = marshal_definition(&b.finish(graph.result.clone()));
        if rebuilt != canonical {
            failures.push(format!(
                "{name}: {}",
                first_difference(&rebuilt, &canonical)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
