//! BuildKit's build-cache config (`application/vnd.buildkit.cacheconfig.v0`):
//! the blob a registry or directory cache names as its config, and the value
//! of an image config's `moby.buildkit.cache.v0` key (inline cache).
//!
//! It is a graph. `layers` are blobs, each naming its parent layer by index
//! (-1: none), so a layer index stands for a whole chain. `records` are cache
//! keys: a record's `digest` is the key of one op output without its inputs,
//! and `inputs[i]` lists the records (by index, with a selector) that input
//! `i` may come from. A record's `layers` are results: the chain ending at a
//! layer; `chains` list a chain's layers explicitly.
//!
//! Everything here comes from outside (a registry, a client's directory, an
//! image), so [`CacheConfig::parse`] checks every index and digest before the
//! config is used, and refuses cycles.

use serde::{Deserialize, Serialize};

pub const CACHE_CONFIG_MEDIA_TYPE: &str = "application/vnd.buildkit.cacheconfig.v0";
/// The image config key holding an inline cache config.
pub const INLINE_CACHE_KEY: &str = "moby.buildkit.cache.v0";
/// The largest cache config accepted.
pub const MAX_CACHE_CONFIG: usize = 64 << 20;
/// The annotation naming a layer's diffID (containerd's).
pub const UNCOMPRESSED_ANNOTATION: &str = "containerd.io/uncompressed";
/// The annotation BuildKit gives a cache layer's creation time.
pub const CREATED_AT_ANNOTATION: &str = "buildkit/createdat";
/// The annotation naming the cache mount a layer holds (kiln's own: a layer
/// the cache config does not name, which BuildKit passes over).
pub const MOUNT_ID_ANNOTATION: &str = "kiln.cachemount.id";

/// The sources only kiln makes, which the scheduler hands its workers to
/// load imported caches (clients may not name them: all start with
/// [`sources::INTERNAL_PREFIX`]).
pub mod sources {
    /// What every one of them starts with.
    pub const INTERNAL_PREFIX: &str = "kiln-cache";
    /// A layer chain pulled from an imported cache (`kiln-cache://REPOSITORY`).
    pub const CACHE_SCHEME: &str = "kiln-cache://";
    /// Its layers: a JSON array of descriptors with their diffIDs.
    pub const CACHE_LAYERS_ATTR: &str = "kiln.cache.layers";
    /// A snapshot of cache mount ID, and cache mount ID seeded from a layer.
    pub const MOUNT_EXPORT_SCHEME: &str = "kiln-cachemount-export://";
    pub const MOUNT_IMPORT_SCHEME: &str = "kiln-cachemount-import://";
    /// The mount import's repository (or `local:DIR` store).
    pub const MOUNT_REPOSITORY_ATTR: &str = "kiln.cache.repository";
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<CacheLayer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<CacheRecord>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheLayer {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub blob: String,
    /// the parent layer's index, -1 for none (an omitted parent is 0)
    #[serde(default, rename = "parent", skip_serializing_if = "is_zero")]
    pub parent_index: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<LayerAnnotations>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerAnnotations {
    #[serde(
        default,
        rename = "mediaType",
        skip_serializing_if = "String::is_empty"
    )]
    pub media_type: String,
    #[serde(default, rename = "diffID", skip_serializing_if = "String::is_empty")]
    pub diff_id: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: i64,
    #[serde(default = "zero_time", rename = "createdAt")]
    pub created_at: String,
}

/// Go's zero time, which BuildKit writes for unknown times.
pub fn zero_time() -> String {
    "0001-01-01T00:00:00Z".to_string()
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheRecord {
    #[serde(default, rename = "layers", skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<CacheResult>,
    #[serde(default, rename = "chains", skip_serializing_if = "Vec::is_empty")]
    pub chained_results: Vec<ChainedResult>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<Vec<CacheInput>>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheResult {
    #[serde(rename = "layer")]
    pub layer_index: i64,
    #[serde(default = "zero_time", rename = "createdAt")]
    pub created_at: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainedResult {
    #[serde(default)]
    pub layers: Vec<i64>,
    #[serde(default = "zero_time", rename = "createdAt")]
    pub created_at: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheInput {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    #[serde(rename = "link")]
    pub link_index: i64,
}

/// Why a cache config was refused.
#[derive(Debug, thiserror::Error)]
pub enum CacheConfigError {
    #[error("cache config is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cache config is {0} bytes, more than the {MAX_CACHE_CONFIG} accepted")]
    TooLarge(usize),
    #[error("cache config layer {index}: {reason}")]
    Layer { index: usize, reason: String },
    #[error("cache config record {index}: {reason}")]
    Record { index: usize, reason: String },
}

impl CacheConfig {
    /// Parses and checks a cache config from outside.
    pub fn parse(bytes: &[u8]) -> Result<CacheConfig, CacheConfigError> {
        if bytes.len() > MAX_CACHE_CONFIG {
            return Err(CacheConfigError::TooLarge(bytes.len()));
        }
        let c: CacheConfig = serde_json::from_slice(bytes)?;
        c.check()?;
        Ok(c)
    }

    /// Every index in range, every digest a sha256 digest, no layer its own
    /// ancestor and no record its own input.
    pub fn check(&self) -> Result<(), CacheConfigError> {
        let nl = self.layers.len() as i64;
        let layer_err = |index, reason: String| CacheConfigError::Layer { index, reason };
        for (i, l) in self.layers.iter().enumerate() {
            if crate::digest::hex_part(&l.blob).is_none() {
                return Err(layer_err(
                    i,
                    format!("blob {:?} is not a sha256 digest", l.blob),
                ));
            }
            if l.parent_index < -1 || l.parent_index >= nl {
                return Err(layer_err(
                    i,
                    format!("parent {} out of range", l.parent_index),
                ));
            }
            if let Some(a) = &l.annotations
                && !a.diff_id.is_empty()
                && crate::digest::hex_part(&a.diff_id).is_none()
            {
                return Err(layer_err(
                    i,
                    format!("diffID {:?} is not a sha256 digest", a.diff_id),
                ));
            }
        }
        // parents: following them from any layer ends within nl steps
        for start in 0..self.layers.len() {
            let mut at = self.layers[start].parent_index;
            let mut steps = 0;
            while at >= 0 {
                steps += 1;
                if steps > self.layers.len() {
                    return Err(layer_err(start, "its parents form a cycle".into()));
                }
                at = self.layers[at as usize].parent_index;
            }
        }
        let nr = self.records.len() as i64;
        let rec_err = |index, reason: String| CacheConfigError::Record { index, reason };
        for (i, r) in self.records.iter().enumerate() {
            if r.digest.is_empty() || r.digest.len() > 200 || !r.digest.contains(':') {
                return Err(rec_err(i, format!("digest {:?} is not a digest", r.digest)));
            }
            for res in &r.results {
                if res.layer_index < 0 || res.layer_index >= nl {
                    return Err(rec_err(
                        i,
                        format!("layer {} out of range", res.layer_index),
                    ));
                }
            }
            for c in &r.chained_results {
                if let Some(bad) = c.layers.iter().find(|l| **l < 0 || **l >= nl) {
                    return Err(rec_err(i, format!("chain layer {bad} out of range")));
                }
            }
            for input in r.inputs.iter().flatten() {
                if input.link_index < 0 || input.link_index >= nr || input.link_index == i as i64 {
                    return Err(rec_err(
                        i,
                        format!("input link {} out of range", input.link_index),
                    ));
                }
            }
        }
        // links: no record reachable from itself
        let mut state = vec![0u8; self.records.len()]; // 0 new, 1 on the path, 2 done
        for start in 0..self.records.len() {
            if state[start] != 0 {
                continue;
            }
            let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
            state[start] = 1;
            while let Some((at, next)) = stack.pop() {
                let links: Vec<usize> = self.records[at]
                    .inputs
                    .iter()
                    .flatten()
                    .map(|x| x.link_index as usize)
                    .collect();
                match links.get(next) {
                    None => state[at] = 2,
                    Some(&l) => {
                        stack.push((at, next + 1));
                        match state[l] {
                            1 => return Err(rec_err(at, "its inputs form a cycle".into())),
                            0 => {
                                state[l] = 1;
                                stack.push((l, 0));
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The layer indexes of the chain ending at `layer`, bottom first.
    pub fn chain(&self, layer: i64) -> Vec<usize> {
        let mut out = Vec::new();
        let mut at = layer;
        while at >= 0 && (at as usize) < self.layers.len() && out.len() <= self.layers.len() {
            out.push(at as usize);
            at = self.layers[at as usize].parent_index;
        }
        out.reverse();
        out
    }
}

/// A record's identity: its digest and its inputs' (selector, link) pairs.
type RecordKey = (String, Vec<Vec<(String, i64)>>);

/// Builds a cache config, each layer (blob on a parent) and each record
/// (digest with inputs) once; a record added again gains the other's results.
#[derive(Debug, Default)]
pub struct Builder {
    config: CacheConfig,
    layers: std::collections::HashMap<(String, i64), i64>,
    records: std::collections::HashMap<RecordKey, usize>,
}

impl Builder {
    /// The index of layer `blob` on `parent` (-1: none).
    pub fn layer(&mut self, blob: &str, parent: i64, annotations: Option<LayerAnnotations>) -> i64 {
        let key = (blob.to_string(), parent);
        if let Some(i) = self.layers.get(&key) {
            return *i;
        }
        let i = self.config.layers.len() as i64;
        self.config.layers.push(CacheLayer {
            blob: blob.to_string(),
            parent_index: parent,
            annotations,
        });
        self.layers.insert(key, i);
        i
    }

    /// The index of record `digest` with `inputs` (links sorted), its
    /// `results` added to any it had.
    pub fn record(
        &mut self,
        digest: &str,
        mut inputs: Vec<Vec<CacheInput>>,
        results: Vec<CacheResult>,
    ) -> usize {
        for links in &mut inputs {
            links.sort_by(|a, b| (a.link_index, &a.selector).cmp(&(b.link_index, &b.selector)));
            links.dedup();
        }
        let key = (
            digest.to_string(),
            inputs
                .iter()
                .map(|l| {
                    l.iter()
                        .map(|x| (x.selector.clone(), x.link_index))
                        .collect()
                })
                .collect(),
        );
        let i = match self.records.get(&key) {
            Some(i) => *i,
            None => {
                let i = self.config.records.len();
                self.config.records.push(CacheRecord {
                    digest: digest.to_string(),
                    inputs,
                    ..Default::default()
                });
                self.records.insert(key, i);
                i
            }
        };
        let rec = &mut self.config.records[i];
        for r in results {
            if !rec.results.iter().any(|x| x.layer_index == r.layer_index) {
                rec.results.push(r);
            }
        }
        i
    }

    /// Adds every layer and record of `other` (a checked config).
    pub fn merge(&mut self, other: &CacheConfig) {
        let mut layer_map: Vec<i64> = Vec::with_capacity(other.layers.len());
        // parents come first in any config this builder wrote; others are
        // mapped in chain order
        let mut mapped: std::collections::HashMap<usize, i64> = Default::default();
        for i in 0..other.layers.len() {
            for l in other.chain(i as i64) {
                if mapped.contains_key(&l) {
                    continue;
                }
                let layer = &other.layers[l];
                let parent = usize::try_from(layer.parent_index)
                    .ok()
                    .and_then(|p| mapped.get(&p).copied())
                    .unwrap_or(-1);
                let n = self.layer(&layer.blob, parent, layer.annotations.clone());
                mapped.insert(l, n);
            }
            layer_map.push(mapped.get(&i).copied().unwrap_or(-1));
        }
        let mut rec_map: Vec<Option<usize>> = vec![None; other.records.len()];
        for start in 0..other.records.len() {
            // inputs first (check() refused cycles)
            let mut stack = vec![(start, false)];
            while let Some((r, expanded)) = stack.pop() {
                if rec_map[r].is_some() {
                    continue;
                }
                let rec = &other.records[r];
                let links = rec
                    .inputs
                    .iter()
                    .flatten()
                    .filter_map(|l| usize::try_from(l.link_index).ok());
                if !expanded {
                    stack.push((r, true));
                    stack.extend(
                        links
                            .filter(|l| rec_map.get(*l).is_some_and(Option::is_none))
                            .map(|l| (l, false)),
                    );
                    continue;
                }
                let inputs = rec
                    .inputs
                    .iter()
                    .map(|links| {
                        links
                            .iter()
                            .filter_map(|l| {
                                let to =
                                    rec_map.get(usize::try_from(l.link_index).ok()?)?.as_ref()?;
                                Some(CacheInput {
                                    selector: l.selector.clone(),
                                    link_index: *to as i64,
                                })
                            })
                            .collect()
                    })
                    .collect();
                let results = rec
                    .results
                    .iter()
                    .filter_map(|x| {
                        Some(CacheResult {
                            layer_index: *layer_map.get(usize::try_from(x.layer_index).ok()?)?,
                            created_at: x.created_at.clone(),
                        })
                    })
                    .collect();
                rec_map[r] = Some(self.record(&rec.digest, inputs, results));
            }
        }
    }

    pub fn finish(self) -> CacheConfig {
        self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn two_layers() -> CacheConfig {
        CacheConfig {
            layers: vec![
                CacheLayer {
                    blob: D1.into(),
                    parent_index: -1,
                    annotations: None,
                },
                CacheLayer {
                    blob: D2.into(),
                    parent_index: 0,
                    annotations: None,
                },
            ],
            records: vec![
                CacheRecord {
                    digest: D1.into(),
                    results: vec![CacheResult {
                        layer_index: 0,
                        created_at: zero_time(),
                    }],
                    ..Default::default()
                },
                CacheRecord {
                    digest: D2.into(),
                    results: vec![CacheResult {
                        layer_index: 1,
                        created_at: zero_time(),
                    }],
                    inputs: vec![vec![CacheInput {
                        selector: String::new(),
                        link_index: 0,
                    }]],
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn writes_buildkits_field_names_and_omits_what_go_omits() {
        let json = serde_json::to_string(&two_layers()).expect("json");
        // layer 1's parent 0 is omitted, as Go's omitempty does; -1 is written
        assert!(
            json.contains(&format!(r#"{{"blob":"{D1}","parent":-1}}"#)),
            "{json}"
        );
        assert!(json.contains(&format!(r#"{{"blob":"{D2}"}}"#)), "{json}");
        assert!(json.contains(r#""inputs":[[{"link":0}]]"#), "{json}");
        assert!(json.contains(r#""layers":[{"layer":1,"createdAt":"0001-01-01T00:00:00Z"}]"#));
        let back = CacheConfig::parse(json.as_bytes()).expect("parse");
        assert_eq!(back, two_layers());
        assert_eq!(back.chain(1), vec![0, 1]);
    }

    #[test]
    fn refuses_bad_indexes_digests_and_cycles() {
        let refused = |c: CacheConfig, what: &str| {
            let json = serde_json::to_vec(&c).expect("json");
            let e = CacheConfig::parse(&json).expect_err(what).to_string();
            assert!(e.contains(what), "{e} should say {what}");
        };
        let mut c = two_layers();
        c.layers[0].parent_index = 5;
        refused(c, "out of range");
        let mut c = two_layers();
        c.layers[0].parent_index = 1;
        refused(c, "cycle");
        let mut c = two_layers();
        c.layers[1].blob = "../../etc/passwd".into();
        refused(c, "not a sha256 digest");
        let mut c = two_layers();
        c.records[1].results[0].layer_index = 2;
        refused(c, "out of range");
        let mut c = two_layers();
        c.records[0].inputs = vec![vec![CacheInput {
            selector: String::new(),
            link_index: 1,
        }]];
        refused(c, "cycle");
        let mut c = two_layers();
        c.records[1].inputs[0][0].link_index = 1;
        refused(c, "out of range");
        assert!(CacheConfig::parse(b"{\"layers\":7}").is_err());
    }

    #[test]
    fn merging_keeps_both_writers_records_and_each_layer_once() {
        let mut a = Builder::default();
        let l0 = a.layer(D1, -1, None);
        let l1 = a.layer(D2, l0, None);
        let root = a.record(D1, vec![], vec![]);
        let link = |i: usize| {
            vec![vec![CacheInput {
                selector: String::new(),
                link_index: i as i64,
            }]]
        };
        let res = |l: i64| {
            vec![CacheResult {
                layer_index: l,
                created_at: zero_time(),
            }]
        };
        a.record(D2, link(root), res(l1));
        let first = a.finish();
        let mut b = Builder::default();
        let m0 = b.layer(D2, -1, None);
        let root = b.record(D1, vec![], vec![]);
        b.record(D2, link(root), res(m0));
        b.record(D1, link(root), vec![]);
        let second = b.finish();
        let mut m = Builder::default();
        m.merge(&second);
        m.merge(&first);
        m.merge(&first);
        let merged = m.finish();
        merged.check().expect("merged config is sound");
        assert_eq!(
            merged.layers.len(),
            3,
            "D2 alone and D2 on D1 are two chains"
        );
        assert_eq!(merged.records.len(), 3);
        let run = merged
            .records
            .iter()
            .find(|r| r.digest == D2)
            .expect("record");
        assert_eq!(run.results.len(), 2, "both writers' results kept");
        let chains: Vec<Vec<usize>> = run
            .results
            .iter()
            .map(|r| merged.chain(r.layer_index))
            .collect();
        assert!(chains.iter().any(|c| c.len() == 2) && chains.iter().any(|c| c.len() == 1));
    }
}
