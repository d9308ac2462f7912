//! Placement: which worker of the farm runs a step.
//!
//! A step may run on a worker that is ready (not draining or gone), that
//! matches the LLB op's `WorkerConstraints` filters, and — for an exec op —
//! that runs the op's platform (when no worker of the farm runs it, any may
//! try, as a single worker would). Among those with a free step slot, a
//! worker with enough free disk beats one short of it (a full disk fails the
//! step itself, which is not retried), then the one already holding the most
//! of the step's inputs wins (no bytes to move), then the least loaded
//! (running / capacity), then the lowest id, so the choice is deterministic.
//!
//! Constraint filters use containerd's filter grammar, as BuildKit's worker
//! filters do: a filter is `,`-separated conditions that must all hold, and
//! an op with several filters may run on a worker matching any of them. A
//! condition is `FIELD`, `FIELD==VALUE` or `FIELD!=VALUE` (values may be
//! double-quoted); fields are `id`, `platforms` and `labels.KEY` (a key with
//! dots or other punctuation double-quoted: `labels."org.example.gpu"`).

use std::collections::BTreeMap;

/// What placement knows of a worker.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub id: &'a str,
    pub platforms: &'a [kiln_oci::Platform],
    pub labels: &'a BTreeMap<String, String>,
    pub running: usize,
    pub capacity: usize,
    /// how many of the step's inputs it holds
    pub holds: usize,
    /// its last reported free disk is below the farm's `min-free-disk`
    pub low_disk: bool,
}

/// What a step asks of its worker.
#[derive(Debug, Clone, Default)]
pub struct Want {
    /// an exec op's platform: the worker must run it
    pub platform: Option<kiln_oci::Platform>,
    /// `WorkerConstraints.filter` (any one matching is enough; none: all match)
    pub filters: Vec<Filter>,
}

/// Why a step has no worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoWorker {
    /// no worker matches at all (now)
    NoMatch,
    /// some match, but every one is busy
    AllBusy,
}

/// Whether `c` may run a step that wants `want`; `platform_known` says some
/// worker of the farm runs the wanted platform.
pub fn eligible(c: &Candidate<'_>, want: &Want, platform_known: bool) -> bool {
    let platform_ok = match &want.platform {
        Some(p) if platform_known => c.platforms.iter().any(|h| p.matches(h)),
        _ => true,
    };
    platform_ok && (want.filters.is_empty() || want.filters.iter().any(|f| f.matches(c)))
}

/// The best of `candidates` for a step (see the module doc): an index into it.
pub fn choose(candidates: &[Candidate<'_>], want: &Want) -> Result<usize, NoWorker> {
    let platform_known = match &want.platform {
        Some(p) => candidates
            .iter()
            .any(|c| c.platforms.iter().any(|h| p.matches(h))),
        None => true,
    };
    let mut any = false;
    let mut best: Option<usize> = None;
    for (i, c) in candidates.iter().enumerate() {
        if !eligible(c, want, platform_known) {
            continue;
        }
        any = true;
        if c.running >= c.capacity.max(1) {
            continue;
        }
        best = match best {
            Some(b) if !better(c, &candidates[b]) => Some(b),
            _ => Some(i),
        };
    }
    match best {
        Some(b) => Ok(b),
        None if any => Err(NoWorker::AllBusy),
        None => Err(NoWorker::NoMatch),
    }
}

/// Whether `a` beats `b`: enough free disk, then more inputs held, then
/// lower load, then lower id.
fn better(a: &Candidate<'_>, b: &Candidate<'_>) -> bool {
    if a.low_disk != b.low_disk {
        return !a.low_disk;
    }
    if a.holds != b.holds {
        return a.holds > b.holds;
    }
    // running/capacity compared without division (nor overflow: the home
    // worker's capacity is unbounded)
    let (la, lb) = (
        a.running as u128 * b.capacity.max(1) as u128,
        b.running as u128 * a.capacity.max(1) as u128,
    );
    if la != lb {
        return la < lb;
    }
    a.id < b.id
}

/// One `WorkerConstraints` filter: conditions that must all hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter(Vec<Condition>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Condition {
    field: Field,
    test: Test,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Id,
    Platforms,
    Label(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Test {
    Present,
    Equal(String),
    NotEqual(String),
}

impl Filter {
    /// Parses one filter; the error says what is wrong with it.
    pub fn parse(s: &str) -> Result<Filter, String> {
        let mut conditions = Vec::new();
        for part in split_unquoted(s, ',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!("worker filter {s:?}: an empty condition"));
            }
            conditions
                .push(Condition::parse(part).map_err(|e| format!("worker filter {s:?}: {e}"))?);
        }
        Ok(Filter(conditions))
    }

    pub fn matches(&self, c: &Candidate<'_>) -> bool {
        self.0.iter().all(|cond| cond.matches(c))
    }
}

impl Condition {
    fn parse(s: &str) -> Result<Condition, String> {
        let (field, test) = if let Some(i) = find_unquoted(s, "==") {
            (&s[..i], Test::Equal(unquote(s[i + 2..].trim())?))
        } else if let Some(i) = find_unquoted(s, "!=") {
            (&s[..i], Test::NotEqual(unquote(s[i + 2..].trim())?))
        } else if find_unquoted(s, "~=").is_some() {
            return Err("regular expressions (~=) are not supported".into());
        } else {
            (s, Test::Present)
        };
        let field = field.trim();
        let field = match field {
            "id" => Field::Id,
            "platforms" | "platform" => Field::Platforms,
            f if f.starts_with("labels.") => {
                let key = unquote(&f["labels.".len()..])?;
                if key.is_empty() {
                    return Err("an empty label key".into());
                }
                Field::Label(key)
            }
            f => return Err(format!("unknown field {f:?} (id, platforms, labels.KEY)")),
        };
        Ok(Condition { field, test })
    }

    fn matches(&self, c: &Candidate<'_>) -> bool {
        let values: Vec<String> = match &self.field {
            Field::Id => vec![c.id.to_string()],
            Field::Platforms => c.platforms.iter().map(|p| p.to_string()).collect(),
            Field::Label(k) => c.labels.get(k).cloned().into_iter().collect(),
        };
        match &self.test {
            Test::Present => !values.is_empty(),
            Test::Equal(v) => values.iter().any(|x| x == v),
            Test::NotEqual(v) => !values.iter().any(|x| x == v),
        }
    }
}

/// `s` without its surrounding double quotes (with `\"` and `\\` inside), or as is.
fn unquote(s: &str) -> Result<String, String> {
    let Some(inner) = s.strip_prefix('"') else {
        return Ok(s.to_string());
    };
    let Some(inner) = inner.strip_suffix('"') else {
        return Err(format!("unterminated quote in {s:?}"));
    };
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(ch) = chars.next() {
        if ch == '\\' {
            match chars.next() {
                Some(n) => out.push(n),
                None => return Err(format!("a trailing backslash in {s:?}")),
            }
        } else {
            out.push(ch);
        }
    }
    Ok(out)
}

/// Byte offsets of `pat` outside double quotes: the first one.
fn find_unquoted(s: &str, pat: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, ch) in s.char_indices() {
        match ch {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            _ if !quoted && s[i..].starts_with(pat) => return Some(i),
            _ => {}
        }
    }
    None
}

fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut rest = s;
    while let Some(i) = find_unquoted(rest, &sep.to_string()) {
        parts.push(&rest[..i]);
        rest = &rest[i + 1..];
    }
    parts.push(rest);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand<'a>(
        id: &'a str,
        platforms: &'a [kiln_oci::Platform],
        labels: &'a BTreeMap<String, String>,
        running: usize,
        holds: usize,
    ) -> Candidate<'a> {
        Candidate {
            id,
            platforms,
            labels,
            running,
            capacity: 2,
            holds,
            low_disk: false,
        }
    }

    #[test]
    fn a_worker_short_of_disk_is_chosen_only_when_no_other_can_take_the_step() {
        let amd = [kiln_oci::Platform::new("linux", "amd64", None)];
        let none = BTreeMap::new();
        let mut full = cand("a", &amd, &none, 0, 2);
        full.low_disk = true;
        // it holds the inputs and is idle, yet the one with disk wins
        let cs = [full.clone(), cand("b", &amd, &none, 1, 0)];
        assert_eq!(choose(&cs, &Want::default()), Ok(1));
        // the other busy: the full one still takes the step
        let mut busy = cand("b", &amd, &none, 2, 0);
        busy.low_disk = false;
        assert_eq!(choose(&[full, busy], &Want::default()), Ok(0));
    }

    #[test]
    fn the_worker_holding_the_inputs_wins_then_the_least_loaded() {
        let amd = [kiln_oci::Platform::new("linux", "amd64", None)];
        let none = BTreeMap::new();
        let cs = [
            cand("a", &amd, &none, 0, 0),
            cand("b", &amd, &none, 1, 1),
            cand("c", &amd, &none, 0, 0),
        ];
        assert_eq!(choose(&cs, &Want::default()), Ok(1), "b holds an input");
        let cs = [
            cand("a", &amd, &none, 1, 0),
            cand("b", &amd, &none, 2, 1),
            cand("c", &amd, &none, 0, 0),
        ];
        assert_eq!(choose(&cs, &Want::default()), Ok(2), "b is full; c is idle");
        let cs = [cand("a", &amd, &none, 2, 0), cand("b", &amd, &none, 2, 0)];
        assert_eq!(choose(&cs, &Want::default()), Err(NoWorker::AllBusy));
        // an unbounded worker (the daemon's own) with steps running beside a joined one
        let mut home = cand("home", &amd, &none, 3, 0);
        home.capacity = usize::MAX;
        let cs = [home, cand("w", &amd, &none, 1, 0)];
        assert_eq!(
            choose(&cs, &Want::default()),
            Ok(0),
            "3 of unbounded is less loaded than 1 of 2"
        );
    }

    #[test]
    fn platforms_and_label_filters_select_workers() {
        let amd = [kiln_oci::Platform::new("linux", "amd64", None)];
        let arm = [kiln_oci::Platform::new("linux", "arm64", None)];
        let gpu: BTreeMap<String, String> =
            [("org.example.gpu".to_string(), "a100".to_string())].into();
        let none = BTreeMap::new();
        let cs = [cand("a", &amd, &none, 0, 0), cand("b", &arm, &gpu, 1, 0)];
        let want = Want {
            platform: Some(kiln_oci::Platform::new("linux", "arm64", None)),
            filters: vec![],
        };
        assert_eq!(choose(&cs, &want), Ok(1));
        let want = Want {
            platform: None,
            filters: vec![Filter::parse(r#"labels."org.example.gpu"==a100"#).expect("ok")],
        };
        assert_eq!(choose(&cs, &want), Ok(1));
        let want = Want {
            platform: None,
            filters: vec![Filter::parse("labels.\"org.example.gpu\"!=a100,id==a").expect("ok")],
        };
        assert_eq!(choose(&cs, &want), Ok(0));
        let want = Want {
            platform: None,
            filters: vec![Filter::parse("id==nowhere").expect("ok")],
        };
        assert_eq!(choose(&cs, &want), Err(NoWorker::NoMatch));
        // a platform no worker runs: any worker may try, as one worker would
        let want = Want {
            platform: Some(kiln_oci::Platform::new("linux", "riscv64", None)),
            filters: vec![],
        };
        assert_eq!(choose(&cs, &want), Ok(0));
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        assert!(
            Filter::parse("labels.x~=y")
                .expect_err("an error")
                .contains("~=")
        );
        assert!(
            Filter::parse("hostname==x")
                .expect_err("an error")
                .contains("unknown field")
        );
        assert!(
            Filter::parse("labels.\"x==y")
                .expect_err("an error")
                .contains("quote")
        );
        assert!(
            Filter::parse("id==a,,id==b")
                .expect_err("an error")
                .contains("empty")
        );
    }
}
