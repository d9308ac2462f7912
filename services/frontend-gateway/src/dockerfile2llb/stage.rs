//! The state of one build stage while its instructions are dispatched: the
//! current op, the LLB-level env/cwd/user, the image config being built, and
//! the step counter used in progress names (`[stage-1 2/3] RUN ...`).

use kiln_llb::pb;
use kiln_oci::{ImageConfig, Platform};

use super::ops::OpId;

pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
pub(crate) const HISTORY_COMMENT: &str = "buildkit.dockerfile.v0";

/// An ARG declared in a stage, with its value (None: declared without one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StageArg {
    pub key: String,
    pub value: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct StageState {
    /// Name shown in progress (`builder`, `stage-1`), empty for single-stage builds.
    pub display_name: String,
    /// Current filesystem; None is scratch.
    pub state: Option<OpId>,
    /// The LLB env (image env, ENV and ARG values), each key at its last assignment.
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub user: String,
    pub platform: Platform,
    pub image: ImageConfig,
    /// ARGs declared in this stage (and its base stages), with their values.
    pub build_args: Vec<StageArg>,
    pub cmd_index: usize,
    pub cmd_total: usize,
    /// A CMD was given in this stage (ENTRYPOINT then keeps it).
    pub cmd_set: bool,
    /// An ONBUILD trigger is being dispatched (progress names say so).
    pub onbuild: bool,
}

impl StageState {
    /// A stage on top of `image` (its config is the starting point).
    pub(crate) fn new(state: Option<OpId>, mut image: ImageConfig, platform: Platform) -> Self {
        image.created = None;
        if !image
            .config
            .env
            .iter()
            .any(|e| e.split('=').next() == Some("PATH"))
        {
            image.config.env.push(format!("PATH={DEFAULT_PATH}"));
        }
        let env = image
            .config
            .env
            .iter()
            .map(|e| match e.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (e.clone(), String::new()),
            })
            .collect::<Vec<_>>();
        let mut st = StageState {
            display_name: String::new(),
            state,
            env: Vec::new(),
            cwd: "/".to_string(),
            user: image.config.user.clone(),
            platform,
            image,
            build_args: Vec::new(),
            cmd_index: 0,
            cmd_total: 0,
            cmd_set: false,
            onbuild: false,
        };
        for (k, v) in env {
            st.add_env(&k, &v);
        }
        if !st.image.config.working_dir.is_empty() {
            st.cwd = normalize_workdir("/", &st.image.config.working_dir);
        }
        st
    }

    /// `llb.State.AddEnv`: the key moves to the end with its new value.
    pub(crate) fn add_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Image config env: replace in place or append (BuildKit's addEnv).
    pub(crate) fn add_image_env(&mut self, key: &str, value: &str) {
        let entry = format!("{key}={value}");
        match self
            .image
            .config
            .env
            .iter_mut()
            .find(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key)
        {
            Some(e) => *e = entry,
            None => self.image.config.env.push(entry),
        }
    }

    /// `[name k/n] ` + `text`, advancing the step counter (BuildKit's prefixCommand).
    pub(crate) fn progress_name(&mut self, text: &str) -> String {
        if self.cmd_total == 0 {
            return text.to_string();
        }
        self.cmd_index += 1;
        self.progress_name_again(text)
    }

    /// Like [`StageState::progress_name`] for the current step (no advance).
    pub(crate) fn progress_name_again(&self, text: &str) -> String {
        if self.cmd_total == 0 {
            return text.to_string();
        }
        let width = self.cmd_total.to_string().len();
        let mut out = "[".to_string();
        if !self.display_name.is_empty() {
            out.push_str(&self.display_name);
            out.push(' ');
        }
        out.push_str(&format!("{:>width$}/{}] ", self.cmd_index, self.cmd_total));
        if self.onbuild {
            out.push_str("ONBUILD ");
        }
        out.push_str(text);
        out
    }

    pub(crate) fn pb_platform(&self) -> pb::Platform {
        pb::Platform::from(&self.platform)
    }

    /// Appends a history entry; `layer` ops get the ` # buildkit` suffix.
    pub(crate) fn commit(&mut self, created_by: String, layer: bool) {
        let created_by = if layer {
            format!("{created_by} # buildkit")
        } else {
            created_by
        };
        self.image.history.push(kiln_oci::History {
            created_by: Some(created_by),
            comment: Some(HISTORY_COMMENT.to_string()),
            empty_layer: (!layer).then_some(true),
            ..Default::default()
        });
    }

    /// Commits a metadata-only history entry (empty_layer: true).
    pub(crate) fn commit_empty(&mut self, created_by: String) {
        self.commit(created_by, false);
    }
}

/// The image of `FROM scratch` (BuildKit's emptyImage).
pub(crate) fn empty_image(platform: &Platform) -> ImageConfig {
    let mut img = ImageConfig {
        architecture: platform.architecture.clone(),
        os: platform.os.clone(),
        variant: platform.variant.clone(),
        ..Default::default()
    };
    img.config.working_dir = "/".to_string();
    img.config.env = vec![format!("PATH={DEFAULT_PATH}")];
    img
}

/// `p` as an absolute, lexically clean path (`bin/` is `/bin`, `.` is `/`).
pub(crate) fn clean_path(p: &str) -> String {
    kiln_dockerfile::clean_path(&format!("/{p}"))
}

/// WORKDIR semantics: relative paths join onto the current dir.
pub(crate) fn normalize_workdir(current: &str, requested: &str) -> String {
    if requested.starts_with('/') {
        clean_path(requested)
    } else {
        clean_path(&format!("{current}/{requested}"))
    }
}

/// COPY destination: relative to the working dir, trailing slash kept.
pub(crate) fn dest_path(cwd: &str, dest: &str) -> String {
    let dest = if dest.is_empty() || dest == "." {
        "./"
    } else {
        dest
    };
    let joined = if dest.starts_with('/') {
        clean_path(dest)
    } else {
        clean_path(&format!("{cwd}/{dest}"))
    };
    let keep_slash = dest.ends_with('/') || dest.ends_with("/.");
    if keep_slash && !joined.ends_with('/') {
        format!("{joined}/")
    } else {
        joined
    }
}

/// `--chown` / USER for file actions: `user[:group]`, numeric ids or names.
pub(crate) fn chown_opt(spec: &str, input: i64) -> Option<pb::ChownOpt> {
    if spec.is_empty() {
        return None;
    }
    let one = |s: &str| -> Option<pb::UserOpt> {
        if s.is_empty() {
            return None;
        }
        Some(pb::UserOpt {
            user: Some(match s.parse::<u32>() {
                Ok(id) => pb::user_opt::User::ById(id),
                Err(_) => pb::user_opt::User::ByName(pb::NamedUserOpt {
                    name: s.to_string(),
                    input,
                }),
            }),
        })
    };
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (one(u), one(g)),
        None => (one(spec), None),
    };
    Some(pb::ChownOpt { user, group })
}

/// Go's `%q` for a string.
pub(crate) fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Go's `%q` for a []string: `["a" "b"]`.
pub(crate) fn go_quote_list(v: &[String]) -> String {
    format!(
        "[{}]",
        v.iter().map(|s| go_quote(s)).collect::<Vec<_>>().join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(normalize_workdir("/", "www"), "/www");
        assert_eq!(normalize_workdir("/srv", "www"), "/srv/www");
        assert_eq!(normalize_workdir("/srv", "/a/../b/"), "/b");
        assert_eq!(dest_path("/", "/app"), "/app");
        assert_eq!(dest_path("/srv", "app"), "/srv/app");
        assert_eq!(dest_path("/srv", "app/"), "/srv/app/");
        assert_eq!(dest_path("/srv", "."), "/srv/");
        assert_eq!(dest_path("/", "."), "/");
        assert_eq!(dest_path("/srv", "/usr/local/bin/"), "/usr/local/bin/");
        assert_eq!(clean_path("bin/"), "/bin");
        assert_eq!(clean_path("."), "/");
    }

    #[test]
    fn quoting_and_names() {
        assert_eq!(
            go_quote_list(&["cat".into(), "/f".into()]),
            r#"["cat" "/f"]"#
        );
        assert_eq!(go_quote("a\"b\\\n"), r#""a\"b\\\n""#);
        let mut st = StageState::new(
            None,
            ImageConfig::default(),
            Platform::new("linux", "amd64", None),
        );
        st.cmd_total = 12;
        st.display_name = "builder".into();
        assert_eq!(st.progress_name("RUN x"), "[builder  1/12] RUN x");
        assert_eq!(st.env, vec![("PATH".to_string(), DEFAULT_PATH.to_string())]);
    }
}
