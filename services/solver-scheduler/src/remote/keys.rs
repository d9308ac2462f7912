//! BuildKit's cache keys, so that a cache kiln writes can be read by
//! BuildKit and the reverse.
//!
//! Each op has a *cache map*: a digest of its definition (the op as Go's
//! `encoding/json` writes BuildKit's generated structs, with the fields that
//! do not change the result cleared) and, per input, a selector (a digest of
//! the paths it reads) and whether the input may be matched by its content.
//! A record's key is `sha256("<cache map digest>@<output>")` ([`root_key`]);
//! an input read by content is a record of its own, keyed
//! `sha256("<content digest>@-1")`.
//!
//! Content digests are kiln's own checksums of the selected paths, so a
//! record linked through content matches between kiln daemons only.
//! Sources whose key needs the fetched content (local dirs, git, http)
//! have no key ([`CacheMap`] is `None`): steps reading them match through
//! content only, as local sources do in BuildKit.

use crate::peer::Selector;
use base64::Engine as _;
use kiln_proto::pb::{self, op::Op as OpKind};

/// An op's cache map.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheMap {
    pub digest: String,
    pub deps: Vec<Dep>,
}

/// How one input enters an op's key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dep {
    /// the digest of the paths the op reads from it ("" for none)
    pub selector: String,
    /// read by content: the paths whose checksum keys it
    pub content: Option<Vec<Selector>>,
}

/// The record key of output `output` of an op whose cache map digest is `digest`.
pub fn root_key(digest: &str, output: i64) -> String {
    kiln_digest::sha256(format!("{digest}@{output}").as_bytes())
}

/// The digest of `parts` joined by NUL bytes.
fn joined(parts: &[&str]) -> String {
    kiln_digest::sha256(parts.join("\0").as_bytes())
}

/// The key of an input read by content, from the checksum of its paths.
pub fn content_record(checksum: &str) -> String {
    root_key(&joined(&[checksum]), -1)
}

/// The platform an op runs for: its own, normalised, else the daemon's.
fn platform(op: &pb::Op) -> kiln_oci::Platform {
    match op.platform.as_ref().filter(|p| !p.os.is_empty()) {
        Some(p) => {
            let mut k = kiln_oci::Platform::new(
                &p.os,
                &p.architecture,
                Some(p.variant.as_str()).filter(|v| !v.is_empty()),
            )
            .normalized();
            k.os_version = Some(p.os_version.clone()).filter(|v| !v.is_empty());
            let mut f = p.os_features.clone();
            f.sort();
            f.dedup();
            k.os_features = Some(f).filter(|f| !f.is_empty());
            k
        }
        None => kiln_oci::Platform::new("linux", kiln_oci::host_architecture(), None).normalized(),
    }
}

/// The cache map of `op` (`None`: its key is not known from its definition).
pub fn cache_map(op: &pb::Op) -> Option<CacheMap> {
    let n = op.inputs.len();
    match op.op.as_ref()? {
        OpKind::Source(s) => source(s, &platform(op)).map(|digest| CacheMap {
            digest,
            deps: vec![],
        }),
        OpKind::Exec(e) => Some(exec(e, &platform(op), n)),
        OpKind::File(f) => Some(file(f, n)),
        OpKind::Merge(m) => {
            let items: Vec<String> = m.inputs.iter().map(|i| input_obj(i.input)).collect();
            Some(typed_map("buildkit.merge.v0", "Merge", n, |o| {
                o.raw_list("inputs", &items)
            }))
        }
        OpKind::Diff(d) => Some(typed_map("buildkit.diff.v0", "Diff", n, |o| {
            if let Some(l) = &d.lower {
                o.raw("lower", &input_obj(l.input));
            }
            if let Some(u) = &d.upper {
                o.raw("upper", &input_obj(u.input));
            }
        })),
        _ => None,
    }
}

/// The cache map of an op hashed as `{"Type":ty,"Field":{…}}` whose `n`
/// inputs are read whole.
fn typed_map(ty: &str, field: &str, n: usize, fill: impl FnOnce(&mut Obj<'_>)) -> CacheMap {
    let mut inner = String::new();
    fill(&mut Obj::new(&mut inner));
    let mut j = String::new();
    {
        let mut o = Obj::new(&mut j);
        o.str("Type", ty, true);
        o.raw(field, &inner);
    }
    CacheMap {
        digest: kiln_digest::sha256(j.as_bytes()),
        deps: vec![Dep::default(); n],
    }
}

/// A JSON object as `fill` writes it.
fn obj(fill: impl FnOnce(&mut Obj<'_>)) -> String {
    let mut s = String::new();
    fill(&mut Obj::new(&mut s));
    s
}

fn input_obj(input: i64) -> String {
    let mut s = String::new();
    Obj::new(&mut s).int("input", input);
    s
}

/// A source's cache map digest: images pinned by digest only (a registry's
/// or an OCI layout's, whose keys BuildKit makes alike).
fn source(s: &pb::SourceOp, p: &kiln_oci::Platform) -> Option<String> {
    let (r, limit_attr) = match s.identifier.strip_prefix("docker-image://") {
        Some(r) => (r, "image.layerlimit"),
        None => (
            s.identifier.strip_prefix(kiln_session::ocilayout::SCHEME)?,
            kiln_session::ocilayout::ATTR_LAYER_LIMIT,
        ),
    };
    let (_, digest) = r.rsplit_once('@')?;
    kiln_digest::hex_part(digest)?;
    let mut j = String::new();
    {
        let mut o = Obj::new(&mut j);
        o.str("Digest", digest, true);
        o.str("OS", &p.os, true);
        o.str("Arch", &p.architecture, true);
        o.str("Variant", p.variant.as_deref().unwrap_or(""), false);
        o.str("OSVersion", p.os_version.as_deref().unwrap_or(""), false);
        o.strs("OSFeatures", p.os_features.as_deref().unwrap_or(&[]));
        if let Some(l) = s.attrs.get(limit_attr)
            && let Ok(l) = l.parse::<i64>()
        {
            o.int_always("Limit", l);
        }
    }
    let key = kiln_digest::sha256(j.as_bytes());
    Some(kiln_digest::sha256(
        format!("buildkit.source.v0:{key}").as_bytes(),
    ))
}

/// Go's `path.Join("/", p)`: absolute and clean.
fn join_root(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Paths without those under another of them, deduplicated and sorted.
fn dedupe_paths(mut paths: Vec<String>) -> Vec<String> {
    paths.sort();
    paths.dedup();
    let all = paths.clone();
    paths.retain(|p| {
        !all.iter()
            .any(|q| q != p && (q == "/" || p.starts_with(&format!("{q}/"))))
    });
    paths
}

fn exec(e: &pb::ExecOp, p: &kiln_oci::Platform, n: usize) -> CacheMap {
    // the dependencies first, from the mounts as the op has them
    let mut sels: Vec<Vec<String>> = vec![Vec::new(); n];
    let mut content = vec![false; n];
    for m in &e.mounts {
        let t = m.mount_type;
        if t == pb::MountType::Secret as i32
            || t == pb::MountType::Ssh as i32
            || t == pb::MountType::Tmpfs as i32
            || m.input == -1
        {
            continue;
        }
        let Some(i) = usize::try_from(m.input).ok().filter(|i| *i < n) else {
            continue;
        };
        let sel = join_root(&m.selector);
        let mut by_content = m.output == -1 || m.readonly || sel == "/";
        match m.content_cache {
            x if x == pb::MountContentCache::Off as i32 => by_content = false,
            x if x == pb::MountContentCache::On as i32 => {}
            _ => {
                if m.dest == "/" {
                    by_content = false;
                }
            }
        }
        sels[i].push(sel);
        content[i] = by_content;
    }
    let deps = sels
        .into_iter()
        .zip(content)
        .map(|(paths, by_content)| {
            if paths.is_empty() {
                return Dep::default();
            }
            let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
            let selector = joined(&refs);
            let content = by_content.then(|| {
                let paths = dedupe_paths(paths);
                if paths.iter().any(|p| p.is_empty() || p == "/") {
                    vec![whole()]
                } else {
                    paths
                        .into_iter()
                        .map(|path| Selector {
                            path,
                            wildcard: false,
                            follow_links: true,
                        })
                        .collect()
                }
            });
            Dep { selector, content }
        })
        .collect();

    let mut op = e.clone();
    if let Some(m) = op.meta.as_mut() {
        m.proxy_env = None;
        for h in &mut m.extra_hosts {
            h.ip.clear();
        }
    }
    for m in &mut op.mounts {
        m.selector.clear();
        if let Some(c) = m.cache_opt.as_mut() {
            let default_id =
                c.id == m.dest || c.id.split_once('/').is_some_and(|(_, rest)| rest == m.dest);
            if !(default_id && c.sharing == 0) {
                c.id.clear();
                c.sharing = 0;
            }
        }
    }
    if let [m] = op.mounts.as_slice()
        && m.dest == "/"
        && !m.readonly
        && m.mount_type == pb::MountType::Bind as i32
        && m.cache_opt.is_none()
        && m.ssh_opt.is_none()
        && m.secret_opt.is_none()
        && m.result_id.is_empty()
    {
        op.mounts.clear();
    }
    let mut j = String::new();
    {
        let mut o = Obj::new(&mut j);
        o.str("Type", "buildkit.exec.v0", true);
        o.raw("Exec", &exec_json(&op));
        o.str("OS", &p.os, true);
        o.str("Arch", &p.architecture, true);
        o.str("Variant", p.variant.as_deref().unwrap_or(""), false);
        o.str("OSVersion", p.os_version.as_deref().unwrap_or(""), false);
        o.strs("OSFeatures", p.os_features.as_deref().unwrap_or(&[]));
    }
    CacheMap {
        digest: kiln_digest::sha256(j.as_bytes()),
        deps,
    }
}

fn whole() -> Selector {
    Selector {
        path: "/".into(),
        wildcard: false,
        follow_links: false,
    }
}

fn exec_json(e: &pb::ExecOp) -> String {
    let mut s = String::new();
    let mut o = Obj::new(&mut s);
    if let Some(m) = &e.meta {
        let mut ms = String::new();
        {
            let mut mo = Obj::new(&mut ms);
            mo.strs("args", &m.args);
            mo.strs("env", &m.env);
            mo.str("cwd", &m.cwd, false);
            mo.str("user", &m.user, false);
            let hosts: Vec<String> = m
                .extra_hosts
                .iter()
                .map(|h| {
                    obj(|o| {
                        o.str("Host", &h.host, false);
                        o.str("IP", &h.ip, false);
                    })
                })
                .collect();
            mo.raw_list("extraHosts", &hosts);
            mo.str("hostname", &m.hostname, false);
            let ulimits: Vec<String> = m
                .ulimit
                .iter()
                .map(|u| {
                    obj(|o| {
                        o.str("Name", &u.name, false);
                        o.int("Soft", u.soft);
                        o.int("Hard", u.hard);
                    })
                })
                .collect();
            mo.raw_list("ulimit", &ulimits);
            mo.str("cgroupParent", &m.cgroup_parent, false);
            mo.bool("removeMountStubsRecursive", m.remove_mount_stubs_recursive);
            let codes: Vec<String> = m.valid_exit_codes.iter().map(i32::to_string).collect();
            mo.raw_list("validExitCodes", &codes);
        }
        o.raw("meta", &ms);
    }
    let mounts: Vec<String> = e.mounts.iter().map(mount_json).collect();
    o.raw_list("mounts", &mounts);
    o.int("network", i64::from(e.network));
    o.int("security", i64::from(e.security));
    let secretenv: Vec<String> = e
        .secretenv
        .iter()
        .map(|se| {
            obj(|o| {
                o.str("ID", &se.id, false);
                o.str("name", &se.name, false);
                o.bool("optional", se.optional);
            })
        })
        .collect();
    o.raw_list("secretenv", &secretenv);
    let cdi: Vec<String> = e
        .cdi_devices
        .iter()
        .map(|d| {
            obj(|o| {
                o.str("name", &d.name, false);
                o.bool("optional", d.optional);
            })
        })
        .collect();
    o.raw_list("cdiDevices", &cdi);
    drop(o);
    s
}

fn mount_json(m: &pb::Mount) -> String {
    let mut s = String::new();
    let mut o = Obj::new(&mut s);
    o.int("input", m.input);
    o.str("selector", &m.selector, false);
    o.str("dest", &m.dest, false);
    o.int("output", m.output);
    o.bool("readonly", m.readonly);
    o.int("mountType", i64::from(m.mount_type));
    if let Some(t) = &m.tmpfs_opt {
        o.raw("TmpfsOpt", &obj(|x| x.int("size", t.size)));
    }
    if let Some(c) = &m.cache_opt {
        let x = obj(|co| {
            co.str("ID", &c.id, false);
            co.int("sharing", i64::from(c.sharing));
        });
        o.raw("cacheOpt", &x);
    }
    let secretish = |id: &str, uid: u32, gid: u32, mode: u32, optional: bool| {
        obj(|so| {
            so.str("ID", id, false);
            so.int("uid", i64::from(uid));
            so.int("gid", i64::from(gid));
            so.int("mode", i64::from(mode));
            so.bool("optional", optional);
        })
    };
    if let Some(c) = &m.secret_opt {
        o.raw(
            "secretOpt",
            &secretish(&c.id, c.uid, c.gid, c.mode, c.optional),
        );
    }
    if let Some(c) = &m.ssh_opt {
        o.raw(
            "SSHOpt",
            &secretish(&c.id, c.uid, c.gid, c.mode, c.optional),
        );
    }
    o.str("resultID", &m.result_id, false);
    o.int("contentCache", i64::from(m.content_cache));
    drop(o);
    s
}

/// A `UserOpt` as BuildKit's own JSON marshaller writes it.
fn user_json(u: &pb::UserOpt) -> String {
    use pb::user_opt::User;
    let mut inner = String::new();
    {
        let mut io = Obj::new(&mut inner);
        match &u.user {
            Some(User::ByName(n)) => {
                let x = obj(|no| {
                    no.str("name", &n.name, false);
                    no.int("input", n.input);
                });
                io.raw("byName", &x);
            }
            Some(User::ById(id)) => io.int("byId", i64::from(*id)),
            None => {}
        }
    }
    let mut s = String::new();
    Obj::new(&mut s).raw("User", &inner);
    s
}

fn owner_json(c: &Option<pb::ChownOpt>, o: &mut Obj<'_>) {
    let Some(c) = c else { return };
    let mut x = String::new();
    {
        let mut co = Obj::new(&mut x);
        if let Some(u) = &c.user {
            co.raw("user", &user_json(u));
        }
        if let Some(g) = &c.group {
            co.raw("group", &user_json(g));
        }
    }
    o.raw("owner", &x);
}

/// Go's `path.Base`.
fn base(p: &str) -> String {
    if p.is_empty() {
        return ".".into();
    }
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        return "/".into();
    }
    t.rsplit('/').next().unwrap_or(t).to_string()
}

fn contains_wildcards(name: &str) -> bool {
    let b = name.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'*' | b'?' | b'[' => return true,
            _ => {}
        }
        i += 1;
    }
    false
}

fn file(f: &pb::FileOp, n: usize) -> CacheMap {
    use pb::file_action::Action;
    let mut selectors: Vec<Vec<Selector>> = vec![Vec::new(); n];
    let mut invalid = vec![false; n];
    let mut actions = Vec::new();
    let mut indexes: Vec<[i64; 3]> = Vec::new();
    let slot = |i: i64| usize::try_from(i).ok().filter(|i| *i < n);
    let owner_sels = |c: &Option<pb::ChownOpt>, sels: &mut Vec<Vec<Selector>>| {
        let Some(c) = c else { return };
        for (u, path) in [(&c.user, "/etc/passwd"), (&c.group, "/etc/group")] {
            if let Some(pb::UserOpt {
                user: Some(pb::user_opt::User::ByName(nu)),
            }) = u
                && let Some(i) = slot(nu.input)
            {
                sels[i].push(Selector {
                    path: path.into(),
                    wildcard: false,
                    follow_links: true,
                });
            }
        }
    };
    for a in &f.actions {
        if let Some(i) = slot(a.input) {
            invalid[i] = true;
        }
        let mut s = String::new();
        {
            let mut o = Obj::new(&mut s);
            match &a.action {
                Some(Action::Mkdir(m)) => {
                    owner_sels(&m.owner, &mut selectors);
                    o.str("path", &m.path, false);
                    o.int("mode", i64::from(m.mode));
                    o.bool("makeParents", m.make_parents);
                    owner_json(&m.owner, &mut o);
                    o.int("timestamp", m.timestamp);
                }
                Some(Action::Mkfile(m)) => {
                    owner_sels(&m.owner, &mut selectors);
                    o.str("path", &m.path, false);
                    o.int("mode", i64::from(m.mode));
                    if !m.data.is_empty() {
                        let b64 = base64::engine::general_purpose::STANDARD.encode(&m.data);
                        o.str("data", &b64, true);
                    }
                    owner_json(&m.owner, &mut o);
                    o.int("timestamp", m.timestamp);
                }
                Some(Action::Symlink(m)) => {
                    o.str("oldpath", &m.oldpath, false);
                    o.str("newpath", &m.newpath, false);
                    owner_json(&m.owner, &mut o);
                    o.int("timestamp", m.timestamp);
                }
                Some(Action::Rm(m)) => {
                    o.str("path", &m.path, false);
                    o.bool("allowNotFound", m.allow_not_found);
                    o.bool("allowWildcard", m.allow_wildcard);
                }
                Some(Action::Copy(c)) => {
                    owner_sels(&c.owner, &mut selectors);
                    let mut src = c.src.clone();
                    if a.secondary_input != -1
                        && let Some(i) = slot(a.secondary_input)
                    {
                        selectors[i].push(Selector {
                            path: c.src.clone(),
                            wildcard: c.allow_wildcard && contains_wildcards(&c.src),
                            follow_links: c.follow_symlink,
                        });
                        src = base(&c.src);
                    }
                    o.str("src", &src, false);
                    o.str("dest", &c.dest, false);
                    owner_json(&c.owner, &mut o);
                    o.int("mode", i64::from(c.mode));
                    o.bool("followSymlink", c.follow_symlink);
                    o.bool("dirCopyContents", c.dir_copy_contents);
                    o.bool(
                        "attemptUnpackDockerCompatibility",
                        c.attempt_unpack_docker_compatibility,
                    );
                    o.bool("createDestPath", c.create_dest_path);
                    o.bool("allowWildcard", c.allow_wildcard);
                    o.bool("allowEmptyWildcard", c.allow_empty_wildcard);
                    o.int("timestamp", c.timestamp);
                    o.strs("include_patterns", &c.include_patterns);
                    o.strs("exclude_patterns", &c.exclude_patterns);
                    o.bool(
                        "alwaysReplaceExistingDestPaths",
                        c.always_replace_existing_dest_paths,
                    );
                    o.str("modeStr", &c.mode_str, false);
                    o.strs("required_paths", &c.required_paths);
                }
                None => {}
            }
        }
        if a.action.is_none() {
            // Go marshals a nil payload as null
            s = "null".into();
        }
        actions.push(base64::engine::general_purpose::STANDARD.encode(s.as_bytes()));
        indexes.push([a.input, a.secondary_input, a.output]);
    }
    let default_indexes = !indexes.is_empty()
        && indexes.iter().enumerate().all(|(i, idx)| {
            let last = i == indexes.len() - 1;
            (if i == 0 {
                idx[0] == 0
            } else {
                idx[0] == (indexes.len() + i - 1) as i64
            }) && (idx[1] == -1 || idx[1] == 1)
                && idx[2] == if last { 0 } else { -1 }
        });
    let mut j = String::new();
    {
        let mut o = Obj::new(&mut j);
        o.str("Type", "buildkit.file.v0", true);
        let quoted: Vec<String> = actions.iter().map(|a| format!("\"{a}\"")).collect();
        o.raw_list_always("Actions", &quoted);
        if !default_indexes {
            let rows: Vec<String> = indexes
                .iter()
                .map(|r| format!("[{},{},{}]", r[0], r[1], r[2]))
                .collect();
            o.raw_list("indexes", &rows);
        }
    }
    let deps = selectors
        .into_iter()
        .zip(invalid)
        .map(|(sels, invalid)| {
            if invalid || sels.is_empty() {
                return Dep::default();
            }
            let mut paths: Vec<&str> = sels.iter().map(|s| s.path.as_str()).collect();
            paths.sort();
            paths.reverse();
            Dep {
                selector: joined(&paths),
                content: Some(dedupe_selectors(&sels)),
            }
        })
        .collect();
    CacheMap {
        digest: kiln_digest::sha256(j.as_bytes()),
        deps,
    }
}

/// The selectors a file op's input is checksummed by: plain paths without
/// those under another (per follow-links group), then wildcards, by path.
fn dedupe_selectors(sels: &[Selector]) -> Vec<Selector> {
    let plain = |follow: bool| {
        dedupe_paths(
            sels.iter()
                .filter(|s| !s.wildcard && s.follow_links == follow)
                .map(|s| s.path.clone())
                .collect(),
        )
    };
    let mut out: Vec<Selector> = Vec::new();
    for follow in [false, true] {
        out.extend(plain(follow).into_iter().map(|path| Selector {
            path: join_root(&path),
            wildcard: false,
            follow_links: follow,
        }));
    }
    out.extend(sels.iter().filter(|s| s.wildcard).map(|s| Selector {
        path: join_root(&s.path),
        ..s.clone()
    }));
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// One JSON object as Go's `encoding/json` writes a struct.
struct Obj<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> Obj<'a> {
    fn new(out: &'a mut String) -> Obj<'a> {
        out.push('{');
        Obj { out, first: true }
    }

    fn key(&mut self, k: &str) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        go_str(self.out, k);
        self.out.push(':');
    }

    /// A string field (`always`: without `omitempty`).
    fn str(&mut self, k: &str, v: &str, always: bool) {
        if always || !v.is_empty() {
            self.key(k);
            go_str(self.out, v);
        }
    }

    fn strs(&mut self, k: &str, v: &[String]) {
        if !v.is_empty() {
            self.key(k);
            self.out.push('[');
            for (i, s) in v.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                go_str(self.out, s);
            }
            self.out.push(']');
        }
    }

    fn int(&mut self, k: &str, v: i64) {
        if v != 0 {
            self.int_always(k, v);
        }
    }

    fn int_always(&mut self, k: &str, v: i64) {
        self.key(k);
        self.out.push_str(&v.to_string());
    }

    fn bool(&mut self, k: &str, v: bool) {
        if v {
            self.key(k);
            self.out.push_str("true");
        }
    }

    fn raw(&mut self, k: &str, json: &str) {
        self.key(k);
        self.out.push_str(json);
    }

    fn raw_list(&mut self, k: &str, items: &[String]) {
        if !items.is_empty() {
            self.raw_list_always(k, items);
        }
    }

    fn raw_list_always(&mut self, k: &str, items: &[String]) {
        self.key(k);
        self.out.push('[');
        self.out.push_str(&items.join(","));
        self.out.push(']');
    }
}

impl Drop for Obj<'_> {
    fn drop(&mut self) {
        self.out.push('}');
    }
}

/// A string as Go's `json.Marshal` writes it (HTML characters escaped).
fn go_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

    fn run_op(cmd: &str) -> pb::Op {
        pb::Op {
            inputs: vec![pb::Input {
                digest: "sha256:x".into(),
                index: 0,
            }],
            op: Some(OpKind::Exec(pb::ExecOp {
                meta: Some(pb::Meta {
                    args: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
                    env: vec![PATH.into()],
                    cwd: "/".into(),
                    ..Default::default()
                }),
                mounts: vec![pb::Mount {
                    input: 0,
                    dest: "/".into(),
                    output: 0,
                    ..Default::default()
                }],
                ..Default::default()
            })),
            platform: Some(pb::Platform {
                os: "linux".into(),
                architecture: "amd64".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn go_strings_escape_as_encoding_json_does() {
        let mut s = String::new();
        go_str(&mut s, "a && b < c > d \"q\" \\ \n\t\u{1}\u{8}\u{2028}é");
        assert_eq!(
            s,
            r#""a \u0026\u0026 b \u003c c \u003e d \"q\" \\ \n\t\u0001\b\u2028é""#
        );
    }

    #[test]
    fn a_plain_run_hashes_buildkits_json_with_its_root_mount_dropped() {
        // the JSON BuildKit hashes for `RUN echo hi` on linux/amd64
        let json = format!(
            r#"{{"Type":"buildkit.exec.v0","Exec":{{"meta":{{"args":["/bin/sh","-c","echo hi"],"env":["{PATH}"],"cwd":"/"}}}},"OS":"linux","Arch":"amd64"}}"#
        );
        let cm = cache_map(&run_op("echo hi")).expect("exec has a cache map");
        assert_eq!(cm.digest, kiln_digest::sha256(json.as_bytes()));
        // its root input: the selector sha256("/"), not read by content
        assert_eq!(
            cm.deps,
            vec![Dep {
                selector: "sha256:8a5edab282632443219e051e4ade2d1d5bbc671c781051bf1437897cbdfea0f1"
                    .into(),
                content: None,
            }]
        );
        // what changes the result changes the key; proxies do not
        let mut other = run_op("echo hi");
        if let Some(OpKind::Exec(e)) = &mut other.op
            && let Some(m) = e.meta.as_mut()
        {
            m.proxy_env = Some(pb::ProxyEnv {
                http_proxy: "http://p:3128".into(),
                ..Default::default()
            });
        }
        assert_eq!(cache_map(&other).map(|c| c.digest), Some(cm.digest.clone()));
        assert_ne!(
            cache_map(&run_op("echo ho")).map(|c| c.digest),
            Some(cm.digest)
        );
    }

    #[test]
    fn a_cache_mount_keeps_the_mounts_with_zero_indexes_omitted() {
        let mut op = run_op("echo hi");
        if let Some(OpKind::Exec(e)) = &mut op.op {
            e.mounts.push(pb::Mount {
                input: -1,
                dest: "/root/.cache".into(),
                output: -1,
                mount_type: pb::MountType::Cache as i32,
                cache_opt: Some(pb::CacheOpt {
                    id: "/root/.cache".into(),
                    sharing: 0,
                }),
                ..Default::default()
            });
        }
        let json = format!(
            r#"{{"Type":"buildkit.exec.v0","Exec":{{"meta":{{"args":["/bin/sh","-c","echo hi"],"env":["{PATH}"],"cwd":"/"}},"mounts":[{{"dest":"/"}},{{"input":-1,"dest":"/root/.cache","output":-1,"mountType":3,"cacheOpt":{{"ID":"/root/.cache"}}}}]}},"OS":"linux","Arch":"amd64"}}"#
        );
        assert_eq!(
            cache_map(&op).map(|c| c.digest),
            Some(kiln_digest::sha256(json.as_bytes()))
        );
    }

    #[test]
    fn a_copy_from_a_context_is_keyed_by_the_base_of_its_source_and_read_by_content() {
        use pb::file_action::Action;
        let op = pb::Op {
            inputs: vec![
                pb::Input {
                    digest: "sha256:a".into(),
                    index: 0,
                },
                pb::Input {
                    digest: "sha256:b".into(),
                    index: 0,
                },
            ],
            op: Some(OpKind::File(pb::FileOp {
                actions: vec![pb::FileAction {
                    input: 0,
                    secondary_input: 1,
                    output: 0,
                    action: Some(Action::Copy(pb::FileActionCopy {
                        src: "/".into(),
                        dest: "/app/".into(),
                        mode: -1,
                        follow_symlink: true,
                        dir_copy_contents: true,
                        create_dest_path: true,
                        allow_wildcard: true,
                        allow_empty_wildcard: true,
                        timestamp: -1,
                        ..Default::default()
                    })),
                }],
            })),
            ..Default::default()
        };
        let action = r#"{"src":"/","dest":"/app/","mode":-1,"followSymlink":true,"dirCopyContents":true,"createDestPath":true,"allowWildcard":true,"allowEmptyWildcard":true,"timestamp":-1}"#;
        let json = format!(
            r#"{{"Type":"buildkit.file.v0","Actions":["{}"]}}"#,
            base64::engine::general_purpose::STANDARD.encode(action)
        );
        let cm = cache_map(&op).expect("file op");
        assert_eq!(cm.digest, kiln_digest::sha256(json.as_bytes()));
        assert_eq!(cm.deps[0], Dep::default(), "the destination is read whole");
        assert_eq!(cm.deps[1].selector, kiln_digest::sha256(b"/"));
        assert_eq!(
            cm.deps[1].content,
            Some(vec![Selector {
                path: "/".into(),
                wildcard: false,
                follow_links: true
            }])
        );
    }

    #[test]
    fn images_are_keyed_by_their_pinned_digest_and_platform() {
        let d = format!("sha256:{}", "1".repeat(64));
        let op = pb::Op {
            op: Some(OpKind::Source(pb::SourceOp {
                identifier: format!("docker-image://docker.io/library/busybox:latest@{d}"),
                ..Default::default()
            })),
            platform: Some(pb::Platform {
                os: "linux".into(),
                architecture: "amd64".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let k0 = kiln_digest::sha256(
            format!(r#"{{"Digest":"{d}","OS":"linux","Arch":"amd64"}}"#).as_bytes(),
        );
        let want = kiln_digest::sha256(format!("buildkit.source.v0:{k0}").as_bytes());
        assert_eq!(cache_map(&op).map(|c| c.digest), Some(want.clone()));
        assert_eq!(
            root_key("sha256:ab", 0),
            kiln_digest::sha256(b"sha256:ab@0")
        );
        // unpinned images and local dirs have no key of their own
        let unpinned = pb::Op {
            op: Some(OpKind::Source(pb::SourceOp {
                identifier: "docker-image://docker.io/library/busybox:latest".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        assert!(cache_map(&unpinned).is_none());
        // an OCI layout's image is keyed alike, whichever session and store
        // it is read from
        let layout = |session: &str| pb::Op {
            op: Some(OpKind::Source(pb::SourceOp {
                identifier: format!("oci-layout://docker.io/library/base@{d}"),
                attrs: [
                    ("oci.session".to_string(), session.to_string()),
                    ("oci.store".to_string(), session.to_string()),
                ]
                .into(),
            })),
            platform: op.platform.clone(),
            ..Default::default()
        };
        assert_eq!(cache_map(&layout("s1")).map(|c| c.digest), Some(want));
        assert_eq!(
            cache_map(&layout("s1")).map(|c| c.digest),
            cache_map(&layout("s2")).map(|c| c.digest)
        );
    }
}
