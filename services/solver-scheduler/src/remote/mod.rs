//! Build cache kept outside the daemon (`--export-cache`, `--import-cache`),
//! in BuildKit's format so either side can read what the other wrote.
//!
//! Every vertex output a build solves gets a BuildKit record key
//! ([`keys`]): the digest of its op's cache map and output index, linked to
//! the records of its inputs (with the op's selector), plus, for inputs
//! read only at some paths, a record of their content. A build collects
//! these as a [`graph::Graph`]; a cache export hands the graph to the
//! exporter, which writes the results' layers and the cache config. An
//! import is read before the build's steps look it up: a step that misses
//! locally but matches an imported record with a result pulls that layer
//! chain instead of running ([`graph::Imported`]).

pub mod graph;
pub mod keys;
pub mod plan;

use crate::Error;
use kiln_proto::moby::buildkit::v1::{CacheOptions, CacheOptionsEntry};
use std::collections::BTreeMap;

/// One `--export-cache` or `--import-cache` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheEntry {
    pub r#type: String,
    pub attrs: BTreeMap<String, String>,
}

impl CacheEntry {
    /// An entry from a table of kilnd.toml: `type` and the attributes.
    pub fn from_table(mut t: BTreeMap<String, String>) -> CacheEntry {
        let r#type = t.remove("type").unwrap_or_default();
        CacheEntry { r#type, attrs: t }
    }

    pub fn attr(&self, k: &str) -> Option<&str> {
        self.attrs
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn from_proto(e: CacheOptionsEntry) -> CacheEntry {
        CacheEntry {
            r#type: e.r#type,
            attrs: e.attrs.into_iter().collect(),
        }
    }

    fn registry(r: String, mut attrs: BTreeMap<String, String>) -> CacheEntry {
        attrs.insert("ref".into(), r);
        CacheEntry {
            r#type: "registry".into(),
            attrs,
        }
    }
}

/// A Solve's cache exports and imports, the deprecated single-ref fields
/// turned into registry entries as BuildKit turns them.
pub fn cache_entries(c: CacheOptions) -> (Vec<CacheEntry>, Vec<CacheEntry>) {
    let mut exports: Vec<CacheEntry> = c.exports.into_iter().map(CacheEntry::from_proto).collect();
    if !c.export_ref_deprecated.is_empty() {
        let attrs = c.export_attrs_deprecated.into_iter().collect();
        exports.push(CacheEntry::registry(c.export_ref_deprecated, attrs));
    }
    let mut imports: Vec<CacheEntry> = c.imports.into_iter().map(CacheEntry::from_proto).collect();
    for r in c.import_refs_deprecated {
        imports.push(CacheEntry::registry(r, BTreeMap::new()));
    }
    (exports, imports)
}

/// The build arg `BUILDKIT_INLINE_CACHE=1` asks for an inline cache, as
/// `--export-cache type=inline` does (Docker's and buildx's way to ask).
pub fn inline_from_build_arg(
    frontend_attrs: &BTreeMap<String, String>,
    exports: &mut Vec<CacheEntry>,
) {
    let on = frontend_attrs
        .get("build-arg:BUILDKIT_INLINE_CACHE")
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "t"));
    if on && !exports.iter().any(|e| e.r#type == "inline") {
        exports.push(CacheEntry {
            r#type: "inline".into(),
            attrs: BTreeMap::new(),
        });
    }
}

/// The daemon's default caches added to a build's own: every import not
/// already asked for, and every export to a place the build does not write.
pub fn add_defaults(
    imports: &mut Vec<CacheEntry>,
    exports: &mut Vec<CacheEntry>,
    default_imports: &[CacheEntry],
    default_exports: &[CacheEntry],
) {
    for d in default_imports {
        if !imports.contains(d) {
            imports.push(d.clone());
        }
    }
    for d in default_exports {
        let same_place = |e: &CacheEntry| {
            e.r#type == d.r#type
                && match e.r#type.as_str() {
                    "registry" => e.attr("ref") == d.attr("ref"),
                    "local" => e.attr("dest") == d.attr("dest"),
                    _ => true,
                }
        };
        if !exports.iter().any(same_place) {
            exports.push(d.clone());
        }
    }
}

/// Which results a cache export carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// the final result's layers only (every record is still written, so
    /// the steps under it can be matched)
    #[default]
    Min,
    /// every step's result
    Max,
}

/// A cache export, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub entry: CacheEntry,
    pub mode: Mode,
    /// a failed export is a warning, not a failed build
    pub ignore_error: bool,
    /// the build's cache mounts are written too (`cache-mounts=true`)
    pub cache_mounts: bool,
}

pub(crate) fn bool_attr(e: &CacheEntry, k: &str) -> Result<bool, Error> {
    match e.attrs.get(k).map(String::as_str) {
        None => Ok(false),
        Some("") | Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(v) => Err(Error::CacheOption(format!(
            "{k}={v:?} in cache {} is not a boolean",
            e.r#type
        ))),
    }
}

/// Checks that `e` is of a type in `known` ((type, the attribute it
/// requires)); `what` is "exporter" or "importer".
fn check_type(e: &CacheEntry, what: &str, known: &[(&str, Option<&str>)]) -> Result<(), Error> {
    match known.iter().find(|(t, _)| *t == e.r#type) {
        Some((t, Some(attr))) if e.attr(attr).is_none() => Err(Error::CacheOption(format!(
            "{t} cache {what} requires {attr}"
        ))),
        Some(_) => Ok(()),
        None => {
            let types: Vec<&str> = known.iter().map(|(t, _)| *t).collect();
            Err(Error::CacheOption(format!(
                "unknown cache {what}: {:?} ({})",
                e.r#type,
                types.join(", ")
            )))
        }
    }
}

/// The build's cache exports, checked: known types, required attributes,
/// a valid mode, no entry twice, at most one inline.
pub fn export_specs(entries: &[CacheEntry]) -> Result<Vec<ExportSpec>, Error> {
    let mut out: Vec<ExportSpec> = Vec::new();
    for e in entries {
        let known = [
            ("registry", Some("ref")),
            ("local", Some("dest")),
            ("inline", None),
        ];
        check_type(e, "exporter", &known)?;
        let mode = match e.attrs.get("mode").map(String::as_str) {
            None | Some("") | Some("min") => Mode::Min,
            Some("max") => Mode::Max,
            Some(m) => {
                return Err(Error::CacheOption(format!(
                    "mode={m:?} in cache {}: expected min or max",
                    e.r#type
                )));
            }
        };
        let spec = ExportSpec {
            entry: e.clone(),
            mode,
            ignore_error: bool_attr(e, "ignore-error")?,
            cache_mounts: bool_attr(e, "cache-mounts")?,
        };
        if e.r#type == "inline" && out.iter().any(|s| s.entry.r#type == "inline") {
            continue;
        }
        let same = |s: &ExportSpec| match e.r#type.as_str() {
            "registry" => s.entry.r#type == "registry" && s.entry.attr("ref") == e.attr("ref"),
            _ => s.entry == *e,
        };
        if out.iter().any(same) {
            return Err(Error::CacheOption(format!(
                "duplicate cache exports [{}]",
                e.r#type
            )));
        }
        out.push(spec);
    }
    Ok(out)
}

/// The build's cache imports, checked.
pub fn check_imports(entries: &[CacheEntry]) -> Result<(), Error> {
    for e in entries {
        check_type(
            e,
            "importer",
            &[("registry", Some("ref")), ("local", Some("src"))],
        )?;
        bool_attr(e, "cache-mounts")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(t: &str, attrs: &[(&str, &str)]) -> CacheEntry {
        CacheEntry {
            r#type: t.into(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn deprecated_refs_become_registry_entries() {
        let (ex, im) = cache_entries(CacheOptions {
            export_ref_deprecated: "r/c:1".into(),
            export_attrs_deprecated: [("mode".to_string(), "max".to_string())].into(),
            import_refs_deprecated: vec!["r/a".into(), "r/b".into()],
            ..Default::default()
        });
        assert_eq!(
            ex,
            vec![entry("registry", &[("mode", "max"), ("ref", "r/c:1")])]
        );
        assert_eq!(
            im,
            vec![
                entry("registry", &[("ref", "r/a")]),
                entry("registry", &[("ref", "r/b")])
            ]
        );
    }

    #[test]
    fn exports_are_checked_as_buildkit_checks_them() {
        let ok = export_specs(&[
            entry("registry", &[("ref", "r/c"), ("mode", "max")]),
            entry("inline", &[]),
            entry("inline", &[("mode", "min")]),
        ])
        .expect("valid");
        assert_eq!(ok.len(), 2, "a second inline export is dropped");
        assert_eq!(ok[0].mode, Mode::Max);
        assert_eq!(ok[1].mode, Mode::Min);
        let err = |entries: &[CacheEntry], says: &str| {
            let e = export_specs(entries).expect_err(says).to_string();
            assert!(e.contains(says), "{e:?} should say {says:?}");
        };
        err(&[entry("registry", &[])], "requires ref");
        err(&[entry("local", &[])], "requires dest");
        err(&[entry("s4", &[])], "unknown cache exporter");
        err(
            &[entry("registry", &[("ref", "r"), ("mode", "all")])],
            "expected min or max",
        );
        err(
            &[
                entry("registry", &[("ref", "r")]),
                entry("registry", &[("ref", "r"), ("mode", "max")]),
            ],
            "duplicate cache exports",
        );
        err(
            &[entry("inline", &[("ignore-error", "maybe")])],
            "not a boolean",
        );
        assert!(check_imports(&[entry("registry", &[("ref", "r")])]).is_ok());
        assert!(check_imports(&[entry("inline", &[])]).is_err());
        assert!(check_imports(&[entry("local", &[])]).is_err());
    }
}

/// A build's remote-cache state: the records its steps made (for export)
/// and the caches it imported (for lookups).
#[derive(Default)]
pub struct Remote {
    pub graph: std::sync::Mutex<graph::Graph>,
    pub imports: Vec<graph::Imported>,
    /// the records of the build's results (what an export starts from)
    pub tops: std::sync::Mutex<Vec<usize>>,
    /// records whose result is an imported one not loaded yet
    pub(crate) lazy: std::sync::Mutex<std::collections::HashMap<usize, crate::step::Lazy>>,
    /// imported results loaded: in use while the build runs, though no
    /// record holds them (GC keeps them)
    pub loaded: std::sync::Mutex<Vec<String>>,
    /// the ids of the cache mounts the build's steps use
    pub cache_mounts: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl Remote {
    pub fn new(imports: Vec<graph::Imported>) -> Remote {
        Remote {
            imports,
            ..Default::default()
        }
    }

    /// The records an export in `mode` writes, for the exporter; imported
    /// results it carries are loaded first, unless `load` is false (then
    /// they are written without a result).
    pub async fn export_graph(
        &self,
        mode: Mode,
        load: bool,
    ) -> Result<kiln_proto::kiln::exporter::v1::CacheGraph, Error> {
        use kiln_proto::kiln::exporter::v1 as xpb;
        let tops = self.tops.lock().map(|t| t.clone()).unwrap_or_default();
        let (mut nodes, ids) = self
            .graph
            .lock()
            .map(|g| g.export(&tops, mode))
            .unwrap_or_default();
        let lazy: Vec<(usize, crate::step::Lazy)> = match self.lazy.lock() {
            Ok(m) => ids
                .iter()
                .enumerate()
                .filter(|(i, _)| load && nodes[*i].wants_result)
                .filter_map(|(i, id)| Some((i, m.get(id)?.clone())))
                .collect(),
            Err(_) => Vec::new(),
        };
        for (i, l) in lazy {
            nodes[i].r#ref = l.await.map_err(Error::from)?;
        }
        Ok(xpb::CacheGraph {
            nodes: nodes
                .into_iter()
                .map(|n| xpb::CacheNode {
                    digest: n.digest,
                    inputs: n
                        .inputs
                        .into_iter()
                        .map(|links| xpb::CacheNodeInput {
                            links: links
                                .into_iter()
                                .map(|l| xpb::CacheNodeLink {
                                    selector: l.selector,
                                    node: u32::try_from(l.node).unwrap_or(u32::MAX),
                                })
                                .collect(),
                        })
                        .collect(),
                    r#ref: n.r#ref,
                    created: n.created,
                })
                .collect(),
            mounts: Vec::new(),
        })
    }
}
