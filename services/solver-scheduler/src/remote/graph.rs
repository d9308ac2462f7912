//! A build's cache records, for export, and the imported records its steps
//! are matched against.

use super::Mode;
use super::keys::{self, CacheMap};
use kiln_oci::cache_config::{CacheConfig, CacheRecord};
use std::collections::{HashMap, HashSet};

/// A link from a record's input to the record it may come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Link {
    pub selector: String,
    pub node: usize,
}

/// One record of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub digest: String,
    pub inputs: Vec<Vec<Link>>,
    /// the worker ref holding its result (empty: none)
    pub r#ref: String,
    /// unix nanoseconds
    pub created: i64,
    /// in an export: the mode keeps its result
    pub wants_result: bool,
}

/// The records a build's steps made, each once.
#[derive(Debug, Default)]
pub struct Graph {
    nodes: Vec<Node>,
    index: HashMap<(String, Vec<Vec<Link>>), usize>,
}

/// The selector of an input read whole (`sha256("/")`), which BuildKit
/// before v0.13 wrote as no selector: both mean the same.
pub const ROOT_SELECTOR: &str =
    "sha256:8a5edab282632443219e051e4ade2d1d5bbc671c781051bf1437897cbdfea0f1";

impl Graph {
    /// The record `digest` with `inputs` (each input's links sorted), added
    /// once.
    pub fn add(&mut self, digest: String, mut inputs: Vec<Vec<Link>>) -> usize {
        for i in &mut inputs {
            i.sort();
            i.dedup();
        }
        let key = (digest, inputs);
        if let Some(n) = self.index.get(&key) {
            return *n;
        }
        let n = self.nodes.len();
        self.nodes.push(Node {
            digest: key.0.clone(),
            inputs: key.1.clone(),
            r#ref: String::new(),
            created: 0,
            wants_result: false,
        });
        self.index.insert(key, n);
        n
    }

    /// Records that `node`'s result is held in worker ref `r`.
    pub fn set_result(&mut self, node: usize, r: &str, created: i64) {
        if let Some(n) = self.nodes.get_mut(node)
            && !r.is_empty()
        {
            n.r#ref = r.to_string();
            n.created = created;
        }
    }

    pub fn node(&self, n: usize) -> Option<&Node> {
        self.nodes.get(n)
    }

    /// The records an export of `tops` (the build's results) writes: every
    /// record they depend on, results kept per `mode` (only on `tops` for
    /// min); a record without inputs never carries a result. Links are
    /// renumbered into the returned list, returned with each one's id here.
    pub fn export(&self, tops: &[usize], mode: Mode) -> (Vec<Node>, Vec<usize>) {
        let mut keep: Vec<usize> = Vec::new();
        let mut seen = HashSet::new();
        let mut stack: Vec<usize> = tops.to_vec();
        while let Some(n) = stack.pop() {
            if n >= self.nodes.len() || !seen.insert(n) {
                continue;
            }
            keep.push(n);
            stack.extend(self.nodes[n].inputs.iter().flatten().map(|l| l.node));
        }
        keep.sort();
        let renumber: HashMap<usize, usize> =
            keep.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let nodes = keep
            .iter()
            .map(|n| {
                let node = &self.nodes[*n];
                let with_result =
                    !node.inputs.is_empty() && (mode == Mode::Max || tops.contains(n));
                Node {
                    digest: node.digest.clone(),
                    inputs: node
                        .inputs
                        .iter()
                        .map(|links| {
                            links
                                .iter()
                                .filter_map(|l| {
                                    Some(Link {
                                        selector: l.selector.clone(),
                                        node: *renumber.get(&l.node)?,
                                    })
                                })
                                .collect()
                        })
                        .collect(),
                    r#ref: if with_result {
                        node.r#ref.clone()
                    } else {
                        String::new()
                    },
                    created: node.created,
                    wants_result: with_result,
                }
            })
            .collect();
        (nodes, keep)
    }
}

/// How one input of a step is found: the records its producer matched, or
/// its content.
#[derive(Debug, Clone, Default)]
pub struct InputMatch {
    pub selector: String,
    /// (import, record) pairs the input's producer matched
    pub matched: Vec<(usize, usize)>,
    /// the key of the input's content record, when it is read by content
    pub content: Option<String>,
}

/// One imported cache: its config (every layer described) and the
/// repository its blobs come from.
#[derive(Debug)]
pub struct Imported {
    pub config: CacheConfig,
    pub repo: String,
    by_digest: HashMap<String, Vec<usize>>,
}

impl Imported {
    pub fn new(config: CacheConfig, repo: String) -> Imported {
        let mut by_digest: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, r) in config.records.iter().enumerate() {
            by_digest.entry(r.digest.clone()).or_default().push(i);
        }
        Imported {
            config,
            repo,
            by_digest,
        }
    }

    fn record(&self, i: usize) -> Option<&CacheRecord> {
        self.config.records.get(i)
    }

    /// The layers of record `i`'s result, bottom first (the newest result
    /// when it has several); `None` without one.
    pub fn result(&self, i: usize) -> Option<Vec<kiln_oci::Descriptor>> {
        let r = self.record(i)?;
        let chain: Vec<usize> = match r
            .results
            .iter()
            .max_by(|a, b| a.created_at.cmp(&b.created_at))
        {
            Some(res) => self.config.chain(res.layer_index),
            None => r
                .chained_results
                .iter()
                .max_by(|a, b| a.created_at.cmp(&b.created_at))?
                .layers
                .iter()
                .map(|l| *l as usize)
                .collect(),
        };
        chain
            .into_iter()
            .map(|l| {
                let layer = self.config.layers.get(l)?;
                let a = layer.annotations.as_ref()?;
                Some(kiln_oci::Descriptor {
                    media_type: a.media_type.clone(),
                    digest: layer.blob.clone(),
                    size: u64::try_from(a.size).ok()?,
                    annotations: Some(
                        [(
                            kiln_oci::cache_config::UNCOMPRESSED_ANNOTATION.to_string(),
                            a.diff_id.clone(),
                        )]
                        .into(),
                    ),
                    ..Default::default()
                })
            })
            .collect()
    }
}

/// Two selectors that mean the same: equal, or one the other's older form.
fn same_selector(a: &str, b: &str) -> bool {
    a == b || (a.is_empty() && b == ROOT_SELECTOR) || (a == ROOT_SELECTOR && b.is_empty())
}

/// The imported records matching output `output` of an op with cache map
/// `cm` whose inputs are found as `inputs`: the same key, and for every
/// input a link to a record its producer matched (with the same selector)
/// or to the record of its content.
pub fn matches(
    imports: &[Imported],
    cm: &CacheMap,
    output: i64,
    inputs: &[InputMatch],
) -> Vec<(usize, usize)> {
    let digest = keys::root_key(&cm.digest, output);
    let mut out = Vec::new();
    for (k, imp) in imports.iter().enumerate() {
        let Some(candidates) = imp.by_digest.get(&digest) else {
            continue;
        };
        for &r in candidates {
            let Some(rec) = imp.record(r) else { continue };
            if rec.inputs.len() != inputs.len() {
                continue;
            }
            let ok = rec.inputs.iter().zip(inputs).all(|(links, want)| {
                links.iter().any(|l| {
                    let Ok(li) = usize::try_from(l.link_index) else {
                        return false;
                    };
                    (same_selector(&l.selector, &want.selector) && want.matched.contains(&(k, li)))
                        || (l.selector.is_empty()
                            && want.content.as_ref().is_some_and(|c| {
                                imp.record(li)
                                    .is_some_and(|lr| lr.digest == *c && lr.inputs.is_empty())
                            }))
                })
            });
            if ok {
                out.push((k, r));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_oci::cache_config::{CacheInput, CacheLayer, CacheResult, LayerAnnotations};

    fn link(selector: &str, node: usize) -> Link {
        Link {
            selector: selector.into(),
            node,
        }
    }

    #[test]
    fn min_exports_every_key_but_only_the_results_layers() {
        let mut g = Graph::default();
        let base = g.add("sha256:base".into(), vec![]);
        let a = g.add("sha256:a".into(), vec![vec![link("", base)]]);
        let b = g.add("sha256:b".into(), vec![vec![link("", a)]]);
        assert_eq!(
            g.add("sha256:a".into(), vec![vec![link("", base)]]),
            a,
            "added once"
        );
        g.set_result(base, "r-base", 1);
        g.set_result(a, "r-a", 2);
        g.set_result(b, "r-b", 3);
        let (min, _) = g.export(&[b], Mode::Min);
        assert_eq!(min.len(), 3);
        let refs: Vec<&str> = min.iter().map(|n| n.r#ref.as_str()).collect();
        assert_eq!(refs, vec!["", "", "r-b"]);
        let (max, _) = g.export(&[b], Mode::Max);
        let refs: Vec<&str> = max.iter().map(|n| n.r#ref.as_str()).collect();
        assert_eq!(
            refs,
            vec!["", "r-a", "r-b"],
            "a root never carries a result"
        );
        assert_eq!(max[2].inputs, vec![vec![link("", 1)]]);
        // a record the results do not depend on is not written
        let other = g.add("sha256:c".into(), vec![vec![link("", base)]]);
        assert!(
            g.export(&[b], Mode::Max)
                .0
                .iter()
                .all(|n| n.digest != "sha256:c")
        );
        assert_eq!(g.export(&[other], Mode::Max).0.len(), 2);
    }

    fn imported() -> Imported {
        let ann = |d: &str| LayerAnnotations {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            diff_id: d.into(),
            size: 10,
            created_at: String::new(),
        };
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let cm = CacheMap {
            digest: "sha256:run".into(),
            deps: vec![],
        };
        let content = keys::content_record("sha256:files");
        Imported::new(
            CacheConfig {
                layers: vec![
                    CacheLayer {
                        blob: d('1'),
                        parent_index: -1,
                        annotations: Some(ann(&d('a'))),
                    },
                    CacheLayer {
                        blob: d('2'),
                        parent_index: 0,
                        annotations: Some(ann(&d('b'))),
                    },
                ],
                records: vec![
                    CacheRecord {
                        digest: keys::root_key("sha256:image", 0),
                        ..Default::default()
                    },
                    CacheRecord {
                        digest: keys::root_key(&cm.digest, 0),
                        results: vec![CacheResult {
                            layer_index: 1,
                            created_at: String::new(),
                        }],
                        // written by an older BuildKit: no selector for the root
                        inputs: vec![vec![CacheInput {
                            selector: String::new(),
                            link_index: 0,
                        }]],
                        ..Default::default()
                    },
                    CacheRecord {
                        digest: content,
                        ..Default::default()
                    },
                    CacheRecord {
                        digest: keys::root_key("sha256:copy", 0),
                        inputs: vec![
                            vec![CacheInput {
                                selector: String::new(),
                                link_index: 1,
                            }],
                            vec![CacheInput {
                                selector: String::new(),
                                link_index: 2,
                            }],
                        ],
                        ..Default::default()
                    },
                ],
            },
            "registry/cache".into(),
        )
    }

    #[test]
    fn steps_match_imported_records_through_their_inputs() {
        let imports = vec![imported()];
        let root = |d: &str| CacheMap {
            digest: d.into(),
            deps: vec![],
        };
        let image = matches(&imports, &root("sha256:image"), 0, &[]);
        assert_eq!(image, vec![(0, 0)]);
        let run = CacheMap {
            digest: "sha256:run".into(),
            deps: vec![],
        };
        let on = |matched: Vec<(usize, usize)>| InputMatch {
            selector: ROOT_SELECTOR.into(),
            matched,
            content: None,
        };
        assert_eq!(
            matches(&imports, &run, 0, &[on(image.clone())]),
            vec![(0, 1)]
        );
        assert!(
            matches(&imports, &run, 0, &[on(vec![])]).is_empty(),
            "another base"
        );
        assert!(
            matches(&imports, &run, 1, &[on(image)]).is_empty(),
            "another output"
        );
        // the result: the chain ending at layer 1, with diffIDs
        let layers = imports[0].result(1).expect("result");
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[1].digest, format!("sha256:{}", "2".repeat(64)));
        assert!(imports[0].result(0).is_none(), "a root has no result");
        // an input matched by its content
        let copy = root("sha256:copy");
        let by_content = |c: &str| InputMatch {
            selector: "sha256:sel".into(),
            matched: vec![],
            content: Some(keys::content_record(c)),
        };
        let dest = InputMatch {
            selector: String::new(),
            matched: vec![(0, 1)],
            content: None,
        };
        assert_eq!(
            matches(
                &imports,
                &copy,
                0,
                &[dest.clone(), by_content("sha256:files")]
            ),
            vec![(0, 3)]
        );
        assert!(matches(&imports, &copy, 0, &[dest, by_content("sha256:other")]).is_empty());
    }
}
