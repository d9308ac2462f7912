//! `RUN --mount=...` values: `type=cache,target=/x,sharing=locked,...`.

/// The kind of a RUN mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountType {
    Bind,
    Cache,
    Tmpfs,
    Secret,
    Ssh,
}

/// Cache mount sharing mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    Shared,
    Private,
    Locked,
}

/// One parsed `--mount` value (defaults not yet applied unless noted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMount {
    pub kind: MountType,
    pub target: Option<String>,
    pub source: Option<String>,
    pub from: Option<String>,
    /// bind defaults to read-only, cache to read-write.
    pub readonly: bool,
    pub id: Option<String>,
    pub sharing: Sharing,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub required: bool,
    /// tmpfs size in bytes.
    pub size: Option<i64>,
    /// secret exposed as this env variable.
    pub env: Option<String>,
}

/// A `--mount` value BuildKit would refuse, in BuildKit's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    #[error("extraneous or missing \" in quoted-field")]
    Quotes,
    #[error("unsupported mount type {0:?}")]
    UnsupportedType(String),
    #[error("invalid field '{0}' must be a key=value pair")]
    NotKeyValue(String),
    /// A boolean or size that does not parse.
    #[error("invalid value for {key}: {value}")]
    InvalidValue { key: String, value: String },
    /// A mode, uid or gid that does not parse.
    #[error("invalid value {value:?} for {key}")]
    InvalidNumber { key: String, value: String },
    #[error("unsupported sharing value {0:?}")]
    UnsupportedSharing(String),
    #[error("unexpected key '{key}' in '{field}'")]
    UnexpectedKey { key: String, field: String },
    #[error("mount target is required")]
    MissingTarget,
    /// `from=` naming a variable: it is read before any expansion.
    #[error("'{0}' doesn't support variable expansion, define alias stage instead")]
    FromExpansion(String),
    #[error("one of id or target must be specified for secret mounts")]
    MissingSecretId,
}

/// Splits a CSV line honouring double quotes (Go's encoding/csv, one record).
fn csv_fields(s: &str) -> Result<Vec<String>, MountError> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if in_quotes => {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    cur.push('"');
                } else {
                    in_quotes = false;
                }
            }
            '"' if cur.is_empty() => in_quotes = true,
            ',' if !in_quotes => fields.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if in_quotes {
        return Err(MountError::Quotes);
    }
    fields.push(cur);
    Ok(fields)
}

fn parse_bool(key: &str, v: Option<&str>) -> Result<bool, MountError> {
    match v {
        None | Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(other) => Err(MountError::InvalidValue {
            key: key.to_string(),
            value: other.to_string(),
        }),
    }
}

/// The mount type a `--mount` value names (`bind` when none).
fn mount_type(fields: &[String]) -> Result<MountType, MountError> {
    let mut kind = MountType::Bind;
    for f in fields {
        if let Some(("type", v)) = f.split_once('=').map(|(k, v)| (k.trim(), v)) {
            kind = match v.to_ascii_lowercase().as_str() {
                "bind" => MountType::Bind,
                "cache" => MountType::Cache,
                "tmpfs" => MountType::Tmpfs,
                "secret" => MountType::Secret,
                "ssh" => MountType::Ssh,
                other => return Err(MountError::UnsupportedType(other.to_string())),
            };
        }
    }
    Ok(kind)
}

/// The `from=` of a `--mount` value as written, read before the value is
/// expanded (the stages a build needs are known before any stage runs): only
/// the CSV and a `from=` holding a variable are errors here, the rest waits
/// for [`parse_mount`] on the expanded value.
pub fn mount_from(spec: &str) -> Result<Option<String>, MountError> {
    let mut from = None;
    for f in csv_fields(spec)? {
        let Some((key, value)) = f.trim().split_once('=') else {
            continue;
        };
        let key = key.trim().to_ascii_lowercase();
        if key != "from" {
            continue;
        }
        if value.find('$').is_some_and(|i| i + 1 != value.len()) {
            return Err(MountError::FromExpansion(key));
        }
        from = Some(value.to_string());
    }
    Ok(from)
}

/// Parses one `--mount` value.
pub fn parse_mount(spec: &str) -> Result<RunMount, MountError> {
    let fields = csv_fields(spec)?;
    // Type first: it decides defaults.
    let kind = mount_type(&fields)?;
    let mut m = RunMount {
        kind,
        target: None,
        source: None,
        from: None,
        readonly: kind == MountType::Bind,
        id: None,
        sharing: Sharing::Shared,
        mode: None,
        uid: None,
        gid: None,
        required: false,
        size: None,
        env: None,
    };
    for f in fields {
        let f = f.trim();
        if !f.is_empty() {
            set_field(&mut m, f)?;
        }
    }
    let needs_target = matches!(kind, MountType::Bind | MountType::Cache | MountType::Tmpfs);
    if needs_target && m.target.as_deref().is_none_or(str::is_empty) {
        return Err(MountError::MissingTarget);
    }
    if kind == MountType::Secret && m.id.is_none() && m.target.is_none() {
        return Err(MountError::MissingSecretId);
    }
    Ok(m)
}

/// Applies one `key[=value]` field.
fn set_field(m: &mut RunMount, f: &str) -> Result<(), MountError> {
    let (key, value) = match f.split_once('=') {
        Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v)),
        None => (f.to_ascii_lowercase(), None),
    };
    let need = |v: Option<&str>| -> Result<String, MountError> {
        v.map(str::to_string)
            .ok_or_else(|| MountError::NotKeyValue(f.to_string()))
    };
    let num = |v: Option<&str>, radix: u32| -> Result<u32, MountError> {
        let v = need(v)?;
        u32::from_str_radix(&v, radix).map_err(|_| MountError::InvalidNumber {
            key: key.clone(),
            value: v,
        })
    };
    match key.as_str() {
        "type" => {}
        "target" | "dst" | "destination" => m.target = Some(need(value)?),
        "source" | "src" => m.source = Some(need(value)?),
        "from" => m.from = Some(need(value)?),
        "id" => m.id = Some(need(value)?),
        "readonly" | "ro" => m.readonly = parse_bool(&key, value)?,
        "readwrite" | "rw" => m.readonly = !parse_bool(&key, value)?,
        "required" => m.required = parse_bool(&key, value)?,
        "sharing" => {
            m.sharing = match need(value)?.to_ascii_lowercase().as_str() {
                "shared" => Sharing::Shared,
                "private" => Sharing::Private,
                "locked" => Sharing::Locked,
                other => return Err(MountError::UnsupportedSharing(other.to_string())),
            }
        }
        "mode" => m.mode = Some(num(value, 8)?),
        "uid" => m.uid = Some(num(value, 10)?),
        "gid" => m.gid = Some(num(value, 10)?),
        "size" => {
            // BuildKit: go-units' RAMInBytes, its error replaced by the value
            let v = need(value)?;
            let size = kiln_units::parse_size(&v).map_err(|_| MountError::InvalidValue {
                key: key.clone(),
                value: v,
            })?;
            m.size = Some(size);
        }
        "env" => m.env = Some(need(value)?),
        other => {
            return Err(MountError::UnexpectedKey {
                key: other.to_string(),
                field: f.to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_is_read_before_expansion() {
        let from = |s: &str| match mount_from(s) {
            Ok(f) => format!("{f:?}"),
            Err(e) => format!("ERR {e}"),
        };
        assert_eq!(from("type=$T,target=$P,from=build"), "Some(\"build\")");
        assert_eq!(from("type=cache,target=/c"), "None");
        assert_eq!(from("FROM=a$"), "Some(\"a$\")");
        assert_eq!(
            from("from=$stage,target=/x"),
            "ERR 'from' doesn't support variable expansion, define alias stage instead"
        );
        assert_eq!(
            from("\"from=x"),
            "ERR extraneous or missing \" in quoted-field"
        );
    }

    #[test]
    fn mount_table() {
        let cases: &[(&str, &str)] = &[
            ("type=cache,target=/c", "Cache target=/c rw shared"),
            (
                "type=cache,id=x,target=/c,sharing=locked,mode=0755,uid=1,gid=2",
                "Cache target=/c id=x rw locked mode=493 uid=1 gid=2",
            ),
            ("type=cache,target=/c,ro", "Cache target=/c ro shared"),
            (
                "target=/m,source=src,from=stage",
                "Bind target=/m source=src from=stage ro shared",
            ),
            ("type=bind,target=/m,rw", "Bind target=/m rw shared"),
            (
                "type=bind,target=/m,readwrite=false",
                "Bind target=/m ro shared",
            ),
            (
                "type=tmpfs,target=/t,size=32m",
                "Tmpfs target=/t rw shared size=33554432",
            ),
            ("type=secret,id=npmrc", "Secret id=npmrc rw shared"),
            (
                "type=secret,id=k,env=KEY,required",
                "Secret id=k rw shared required env=KEY",
            ),
            ("type=ssh", "Ssh rw shared"),
            (
                "type=ssh,id=gitlab,required=false,mode=0600",
                "Ssh id=gitlab rw shared mode=384",
            ),
            (
                "\"type=bind\",\"target=/a,b\"",
                "Bind target=/a,b ro shared",
            ),
            ("dst=/d", "Bind target=/d ro shared"),
            ("type=nope,target=/x", "ERR unsupported mount type \"nope\""),
            ("type=cache", "ERR mount target is required"),
            (
                "type=cache,target=/c,sharing=maybe",
                "ERR unsupported sharing value \"maybe\"",
            ),
            (
                "type=cache,target=/c,mode=9",
                "ERR invalid value \"9\" for mode",
            ),
            (
                "type=cache,target=/c,bogus=1",
                "ERR unexpected key 'bogus' in 'bogus=1'",
            ),
            (
                "type=secret",
                "ERR one of id or target must be specified for secret mounts",
            ),
            (
                "type=tmpfs,target=/t,size=lots",
                "ERR invalid value for size: lots",
            ),
            (
                "type=tmpfs,target=/t,size=1.5GiB",
                "Tmpfs target=/t rw shared size=1610612736",
            ),
            (
                "type=tmpfs,target=/t,size=-1m",
                "ERR invalid value for size: -1m",
            ),
            (
                "\"type=bind",
                "ERR extraneous or missing \" in quoted-field",
            ),
        ];
        for (spec, want) in cases {
            let got = match parse_mount(spec) {
                Err(e) => format!("ERR {e}"),
                Ok(m) => {
                    let mut s = format!("{:?}", m.kind);
                    for (k, v) in [
                        ("target", &m.target),
                        ("source", &m.source),
                        ("from", &m.from),
                        ("id", &m.id),
                    ] {
                        if let Some(v) = v {
                            s += &format!(" {k}={v}");
                        }
                    }
                    s += if m.readonly { " ro" } else { " rw" };
                    s += &format!(" {:?}", m.sharing).to_lowercase();
                    for (k, v) in [("mode", m.mode), ("uid", m.uid), ("gid", m.gid)] {
                        if let Some(v) = v {
                            s += &format!(" {k}={v}");
                        }
                    }
                    if m.required {
                        s += " required";
                    }
                    if let Some(v) = m.size {
                        s += &format!(" size={v}");
                    }
                    if let Some(v) = &m.env {
                        s += &format!(" env={v}");
                    }
                    s
                }
            };
            assert_eq!(&got, want, "spec {spec:?}");
        }
    }
}
