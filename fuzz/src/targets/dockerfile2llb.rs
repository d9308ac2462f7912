//! `dockerfile2llb`: a Dockerfile through the frontend's converter.
//!
//! `frontend_gateway::dockerfile2llb::convert` with build args, named
//! contexts and `.dockerignore` excludes set, and images resolved to fixed
//! configs (busybox's, debian's, one with ONBUILD triggers) without any
//! registry. A Dockerfile that converts must give a definition the solver
//! loads (`kiln_llb::load`) whose ops pass the worker's output check, and an
//! image config that serializes.

use std::collections::BTreeMap;

use frontend_gateway::dockerfile2llb::{
    ConvertOptions, ImageResolver, NamedContext, ResolveError, ResolvedImage, convert,
};

use crate::Target;

pub fn target() -> Target {
    Target {
        name: "dockerfile2llb",
        about: "Dockerfiles through frontend_gateway::dockerfile2llb::convert (fake image configs); the result must load",
        run,
        seeds: || {
            crate::dockerfile::SEEDS
                .iter()
                .map(|s| s.as_bytes().to_vec())
                .collect()
        },
        tokens: crate::dockerfile::TOKENS,
        mutate: None,
        max_len: 8192,
    }
}

const BUSYBOX: &str =
    include_str!("../../../testdata/llb/image-configs/busybox-latest.config.json");
const DEBIAN: &str =
    include_str!("../../../testdata/llb/image-configs/debian-bookworm.config.json");
const ONBUILD: &str = include_str!("../../../testdata/llb/image-configs/onbuild-base.config.json");

/// Resolves every image to one of the fixed configs (or `config`, when set);
/// a reference with `missing` in it does not exist.
struct Fixed(Option<kiln_oci::ImageConfig>);

impl ImageResolver for Fixed {
    async fn resolve(
        &self,
        reference: &str,
        _platform: &kiln_oci::Platform,
    ) -> Result<ResolvedImage, ResolveError> {
        if reference.contains("missing") {
            return Err(format!("{reference}: not found").into());
        }
        let config = match &self.0 {
            Some(c) => c.clone(),
            None => {
                let json = if reference.contains("onbuild") {
                    ONBUILD
                } else if reference.contains("debian") {
                    DEBIAN
                } else {
                    BUSYBOX
                };
                serde_json::from_str(json)?
            }
        };
        Ok(ResolvedImage {
            canonical_ref: reference.to_string(),
            digest: kiln_oci::digest::sha256(reference.as_bytes()),
            config,
        })
    }
}

fn options() -> ConvertOptions {
    ConvertOptions {
        build_args: BTreeMap::from([
            ("A".to_string(), "x".to_string()),
            ("BASE".to_string(), "onbuild".to_string()),
        ]),
        platform: kiln_oci::Platform::new("linux", "amd64", None),
        session_id: "fuzz-session".into(),
        filename: "Dockerfile".into(),
        excludes: vec!["*.md".into(), "!README.md".into()],
        named_contexts: BTreeMap::from([
            ("ctx".to_string(), NamedContext::Local("other".into())),
            ("img".to_string(), NamedContext::Image("debian".into())),
        ]),
        ..Default::default()
    }
}

/// Converts `dockerfile` (over `config` for every image, or the fixed
/// configs) and checks what a conversion promises.
pub fn convert_checked(dockerfile: &[u8], config: impl Into<Option<kiln_oci::ImageConfig>>) {
    let resolver = Fixed(config.into());
    let converted = crate::rt::block_on(convert(dockerfile, &options(), &resolver));
    crate::debug(|| match &converted {
        Ok(c) => format!("converted: {} ops", c.definition.def.len()),
        Err(e) => format!("convert: {e}"),
    });
    let Ok(c) = converted else {
        return;
    };
    let graph = match kiln_llb::load(&c.definition) {
        Ok(g) => g,
        Err(e) => panic!("the converter made a definition that does not load: {e}"),
    };
    for v in &graph.vertices {
        if let Err(e) = worker_executor::ops::check_outputs(&v.op) {
            panic!(
                "the converter made an op the worker refuses: {e}: {:?}",
                v.op
            );
        }
    }
    if let Err(e) = serde_json::to_vec(&c.image_config) {
        panic!("image config does not serialize: {e}");
    }
}

pub fn run(data: &[u8]) {
    convert_checked(data, None);
}
