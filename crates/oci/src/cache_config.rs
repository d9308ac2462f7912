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
    #[serde(default, rename = "mediaType", skip_serializing_if = "String::is_empty")]
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
                return Err(layer_err(i, format!("blob {:?} is not a sha256 digest", l.blob)));
            }
            if l.parent_index < -1 || l.parent_index >= nl {
                return Err(layer_err(i, format!("parent {} out of range", l.parent_index)));
            }
            if let Some(a) = &l.annotations
                && !a.diff_id.is_empty()
                && crate::digest::hex_part(&a.diff_id).is_none()
            {
                return Err(layer_err(i, format!("diffID {:?} is not a sha256 digest", a.diff_id)));
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
                    return Err(rec_err(i, format!("layer {} out of range", res.layer_index)));
                }
            }
            for c in &r.chained_results {
                if let Some(bad) = c.layers.iter().find(|l| **l < 0 || **l >= nl) {
                    return Err(rec_err(i, format!("chain layer {bad} out of range")));
                }
            }
            for input in r.inputs.iter().flatten() {
                if input.link_index < 0 || input.link_index >= nr || input.link_index == i as i64 {
                    return Err(rec_err(i, format!("input link {} out of range", input.link_index)));
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
        assert!(json.contains(&format!(r#"{{"blob":"{D1}","parent":-1}}"#)), "{json}");
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
}
