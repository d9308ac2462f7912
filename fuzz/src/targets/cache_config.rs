//! `cache_config`: build-cache configs from a registry, a client's directory
//! or an image's inline cache (`kiln_oci::cache_config::CacheConfig::parse`).
//!
//! A config that parses is used as an import is: every record's result
//! chain is resolved and every record is matched against a step through the
//! solver's own matching (`solver_scheduler::remote::graph`); it is merged
//! into another config as an export merges with what a ref holds, and the
//! merged config must pass the same checks (no index out of range, no
//! cycle), merged twice must not grow, and must write back as JSON that
//! parses.

use crate::Target;
use kiln_oci::cache_config::{Builder, CacheConfig};
use solver_scheduler::remote::graph::{Imported, InputMatch, matches};
use solver_scheduler::remote::keys::CacheMap;

pub fn target() -> Target {
    Target {
        name: "cache_config",
        about: "build-cache configs (CacheConfig::parse), used as imports and merged as exports",
        run,
        seeds,
        tokens: TOKENS,
        mutate: None,
        max_len: 16 * 1024,
    }
}

const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

const TOKENS: &[&[u8]] = &[
    b"{\"layers\":[",
    b"\"records\":[",
    b"{\"blob\":\"sha256:1111111111111111111111111111111111111111111111111111111111111111\"",
    b"\"parent\":-1",
    b"\"parent\":0",
    b"\"parent\":1",
    b"\"parent\":99999999999",
    b"\"digest\":\"sha256:2222222222222222222222222222222222222222222222222222222222222222\"",
    b"\"inputs\":[[{\"link\":0}]]",
    b"\"inputs\":[[{\"selector\":\"x\",\"link\":1}]]",
    b"\"link\":-1",
    b"\"layers\":[{\"layer\":0,\"createdAt\":\"0001-01-01T00:00:00Z\"}]",
    b"\"chains\":[{\"layers\":[0,1]}]",
    b"\"annotations\":{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"diffID\":\"sha256:1111111111111111111111111111111111111111111111111111111111111111\",\"size\":3}",
    b"]",
    b"}",
    b",",
];

fn seeds() -> Vec<Vec<u8>> {
    vec![
        format!(
            r#"{{"layers":[{{"blob":"{D1}","parent":-1,"annotations":{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","diffID":"{D2}","size":3}}}},{{"blob":"{D2}"}}],"records":[{{"digest":"{D1}"}},{{"layers":[{{"layer":1}}],"digest":"{D2}","inputs":[[{{"link":0}}]]}},{{"chains":[{{"layers":[0,1]}}],"digest":"{D2}","inputs":[[{{"selector":"s","link":1}}]]}}]}}"#
        )
        .into_bytes(),
        br#"{"records":[{"digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","inputs":[[{"link":0}]]}]}"#.to_vec(),
        b"{}".to_vec(),
    ]
}

fn run(data: &[u8]) {
    let Ok(config) = CacheConfig::parse(data) else {
        return;
    };
    crate::debug(|| {
        format!(
            "{} layers, {} records",
            config.layers.len(),
            config.records.len()
        )
    });
    // as an import
    let imported = vec![Imported::new(
        config.clone(),
        "registry.example/cache".into(),
    )];
    for (i, r) in config.records.iter().enumerate() {
        let _ = imported[0].result(i);
        let cm = CacheMap {
            digest: r.digest.clone(),
            deps: Vec::new(),
        };
        let inputs: Vec<InputMatch> = r
            .inputs
            .iter()
            .map(|links| InputMatch {
                selector: String::new(),
                matched: links
                    .iter()
                    .filter_map(|l| Some((0, usize::try_from(l.link_index).ok()?)))
                    .collect(),
                content: None,
            })
            .collect();
        let _ = matches(&imported, &cm, 0, &inputs);
    }
    // as an export merges it
    let mut b = Builder::default();
    b.merge(&config);
    b.merge(&config);
    let merged = b.finish();
    if let Err(e) = merged.check() {
        panic!("a merged config fails its checks: {e}");
    }
    assert!(
        merged.records.len() <= config.records.len(),
        "merging twice grew the records"
    );
    assert!(
        merged.layers.len() <= config.layers.len(),
        "merging twice grew the layers"
    );
    let json = serde_json::to_vec(&merged).expect("encode");
    if let Err(e) = CacheConfig::parse(&json) {
        panic!("a merged config does not parse back: {e}");
    }
}
