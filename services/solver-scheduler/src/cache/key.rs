//! Cache keys.
//!
//! A vertex's (fast) key is the digest of its op's definition key combined
//! with the cache keys of the input outputs it reads. The definition key is
//! the op without its input digests (inputs count through their own keys)
//! and without attributes naming the client session rather than content.
//! Its content key replaces the inputs it reads only at some paths (COPY
//! sources, read-only bind mounts: [`input_selectors`]) by a checksum of
//! those paths, so changing a file the step does not read keeps it cached.
//! Outputs whose content the definition does not determine (local sources)
//! are keyed by the content digest the worker reports.

use crate::peer::Selector;
use kiln_proto::pb::{self, op::Op as OpKind};

/// The digest of `parts`, each ended by a NUL byte: every cache key is one.
pub(crate) fn digest_of(parts: &[&str]) -> String {
    let mut bytes = Vec::new();
    for p in parts {
        bytes.extend_from_slice(p.as_bytes());
        bytes.push(0);
    }
    kiln_digest::sha256(&bytes)
}

/// The part of an op's cache key that comes from its definition: the op
/// without its input digests (inputs count through their own cache keys) and
/// without attributes that name the client session rather than content.
pub(crate) fn definition_key(op: &pb::Op) -> String {
    use prost::Message;
    let mut op = op.clone();
    op.inputs.iter_mut().for_each(|i| i.digest.clear());
    match &mut op.op {
        Some(OpKind::Source(s)) => {
            // which session and store an OCI layout is read from do not
            // change what it is: its identifier pins the digest
            for k in [
                "local.session",
                "local.unique",
                "local.sharedkeyhint",
                kiln_session::ocilayout::ATTR_SESSION,
                kiln_session::ocilayout::ATTR_STORE,
            ] {
                s.attrs.remove(k);
            }
        }
        // proxy settings say how to reach the network, not what the step
        // produces: changing them re-runs nothing
        Some(OpKind::Exec(e)) => {
            if let Some(m) = e.meta.as_mut() {
                m.proxy_env = None;
            }
        }
        _ => {}
    }
    digest_of(&[&hex::encode(op.encode_to_vec())])
}

fn abs_path(p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    }
}

/// Per input of `op`: the paths the op reads from it, when it reads only
/// those paths (copy sources, read-only bind mounts with a selector); `None`
/// when it depends on the whole input.
pub fn input_selectors(op: &pb::Op) -> Vec<Option<Vec<Selector>>> {
    let n = op.inputs.len();
    let mut whole = vec![false; n];
    let mut sel: Vec<Vec<Selector>> = vec![Vec::new(); n];
    let slot = |i: i64| usize::try_from(i).ok().filter(|i| *i < n);
    match &op.op {
        Some(OpKind::File(f)) => {
            for a in &f.actions {
                if let Some(i) = slot(a.input) {
                    whole[i] = true;
                }
                if let Some(i) = slot(a.secondary_input) {
                    match &a.action {
                        Some(pb::file_action::Action::Copy(c)) => sel[i].push(Selector {
                            path: abs_path(&c.src),
                            wildcard: c.allow_wildcard,
                            follow_links: c.follow_symlink,
                        }),
                        _ => whole[i] = true,
                    }
                }
            }
        }
        Some(OpKind::Exec(e)) => {
            for m in &e.mounts {
                let Some(i) = slot(m.input) else { continue };
                let bind = m.mount_type == pb::MountType::Bind as i32;
                if bind && m.readonly && m.output < 0 && !m.selector.is_empty() && m.selector != "/"
                {
                    sel[i].push(Selector {
                        path: abs_path(&m.selector),
                        wildcard: false,
                        follow_links: true,
                    });
                } else {
                    whole[i] = true;
                }
            }
        }
        _ => whole.iter_mut().for_each(|w| *w = true),
    }
    whole
        .into_iter()
        .zip(sel)
        .map(|(w, mut s)| {
            if w || s.is_empty() {
                None
            } else {
                s.sort();
                s.dedup();
                Some(s)
            }
        })
        .collect()
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_settings_are_not_part_of_a_steps_definition_key() {
        let exec = |proxy: Option<&str>| pb::Op {
            op: Some(OpKind::Exec(pb::ExecOp {
                meta: Some(pb::Meta {
                    args: vec!["/bin/sh".into(), "-c".into(), "true".into()],
                    proxy_env: proxy.map(|p| pb::ProxyEnv {
                        http_proxy: p.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        let base = definition_key(&exec(None));
        assert_eq!(base, definition_key(&exec(Some("http://a:1"))));
        assert_eq!(base, definition_key(&exec(Some("http://b:2"))));
        let mut other = exec(None);
        if let Some(OpKind::Exec(e)) = &mut other.op {
            e.meta.as_mut().expect("meta").args[2] = "false".into();
        }
        assert_ne!(base, definition_key(&other), "the command still counts");
    }
}
