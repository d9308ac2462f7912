//! Build-cache usage as `du` shows it and `prune`/GC act on it: one
//! [`UsageItem`] per cache record, unnamed snapshot, cache-mount instance
//! and the blob store; BuildKit's filter syntax over them; and which items a
//! prune removes.
//!
//! Filters: each string is `cond[,cond...]` (all must hold), several strings
//! match if any does. A cond is `key==value` (or `key=value`), `key!=value`,
//! `key~=regex`, or a bare `key` for the flags `inuse`, `shared`, `private`,
//! `mutable`, `immutable`. Keys: `id`, `type`, `description`, `parents`,
//! plus `until=<duration>` (a Go duration, `24h`: only items last used
//! longer ago than that).

use crate::Error;
use std::time::Duration;

/// What removing an item means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// a cache record (by record id)
    Record(String),
    /// a worker snapshot no record names
    Snapshot(String),
    /// a cache-mount instance (`cachemount:<key>/<n>`)
    CacheMount(String),
    /// not removable by itself (the blob store: blobs go with their snapshots)
    None,
}

/// One line of `du`.
#[derive(Debug, Clone)]
pub struct UsageItem {
    pub id: String,
    /// BuildKit's record types: regular, source.local, exec.cachemount, ...
    pub record_type: String,
    pub description: String,
    pub size: i64,
    /// unix nanoseconds
    pub created: i64,
    pub last_used: i64,
    pub usage_count: i64,
    pub in_use: bool,
    pub shared: bool,
    pub mutable: bool,
    pub parents: Vec<String>,
    /// the worker refs this item keeps (a record's outputs, a snapshot, a
    /// cache mount)
    pub refs: Vec<String>,
    /// every snapshot beneath `refs` (their parents, transitively, not
    /// `refs` themselves): what this item holds while it stays
    pub ancestors: Vec<String>,
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Eq,
    Ne,
    Re,
    Flag,
}

#[derive(Debug, Clone)]
struct Cond {
    key: String,
    op: Op,
    value: String,
    re: Option<regex::Regex>,
}

/// Parsed filters: any group matches when all its conditions hold.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    groups: Vec<Vec<Cond>>,
    /// `until=`: only items last used longer ago than this
    pub until: Option<Duration>,
}

const FLAGS: [&str; 5] = ["inuse", "shared", "private", "mutable", "immutable"];
const KEYS: [&str; 4] = ["id", "type", "description", "parents"];

impl Filter {
    /// Parses `du`/`prune` filter strings.
    pub fn parse(filters: &[String]) -> Result<Filter, Error> {
        let bad = |f: &str, why: &str| Error::Filter {
            filter: f.to_string(),
            message: why.to_string(),
        };
        let mut out = Filter::default();
        for f in filters.iter().filter(|f| !f.trim().is_empty()) {
            let mut group = Vec::new();
            for part in f.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (key, op, value) = if let Some((k, v)) = part.split_once("!=") {
                    (k, Op::Ne, v)
                } else if let Some((k, v)) = part.split_once("~=") {
                    (k, Op::Re, v)
                } else if let Some((k, v)) = part.split_once("==") {
                    (k, Op::Eq, v)
                } else if let Some((k, v)) = part.split_once('=') {
                    (k, Op::Eq, v)
                } else {
                    (part, Op::Flag, "")
                };
                let key = key.trim().to_string();
                let value = value.trim().trim_matches('"').to_string();
                if key == "until" {
                    if op != Op::Eq {
                        return Err(bad(f, "until takes a duration: until=24h"));
                    }
                    let until = kiln_units::parse_duration(&value).map_err(|source| {
                        Error::FilterDuration {
                            filter: f.to_string(),
                            source,
                        }
                    })?;
                    out.until = Some(until);
                    continue;
                }
                let known = if op == Op::Flag {
                    FLAGS.contains(&key.as_str())
                } else {
                    KEYS.contains(&key.as_str()) || FLAGS.contains(&key.as_str())
                };
                if !known {
                    return Err(bad(f, &format!("unknown filter key {key:?}")));
                }
                let re = if op == Op::Re {
                    Some(regex::Regex::new(&value).map_err(|e| bad(f, &e.to_string()))?)
                } else {
                    None
                };
                group.push(Cond { key, op, value, re });
            }
            if !group.is_empty() {
                out.groups.push(group);
            }
        }
        Ok(out)
    }

    /// Whether `item` passes (`now` in unix nanoseconds, for `until`).
    pub fn matches(&self, item: &UsageItem, now: i64) -> bool {
        if let Some(u) = self.until
            && item.last_used > now - u.as_nanos() as i64
        {
            return false;
        }
        self.groups.is_empty() || self.groups.iter().any(|g| g.iter().all(|c| c.holds(item)))
    }
}

impl Cond {
    fn holds(&self, item: &UsageItem) -> bool {
        let flag = |k: &str| match k {
            "inuse" => Some(item.in_use),
            "shared" => Some(item.shared),
            "private" => Some(!item.shared),
            "mutable" => Some(item.mutable),
            "immutable" => Some(!item.mutable),
            _ => None,
        };
        if let Some(b) = flag(&self.key) {
            return match self.op {
                Op::Flag => b,
                Op::Eq => b.to_string() == self.value,
                Op::Ne => b.to_string() != self.value,
                Op::Re => self.re.as_ref().is_some_and(|r| r.is_match(&b.to_string())),
            };
        }
        let values: Vec<&str> = match self.key.as_str() {
            // ids are matched with or without the digest algorithm
            "id" => vec![item.id.as_str(), item.id.trim_start_matches("sha256:")],
            "type" => vec![item.record_type.as_str()],
            "description" => vec![item.description.as_str()],
            "parents" => item.parents.iter().map(String::as_str).collect(),
            _ => vec![],
        };
        let want = self.value.trim_start_matches("sha256:");
        match self.op {
            Op::Eq => values
                .iter()
                .any(|v| *v == self.value || v.trim_start_matches("sha256:") == want),
            Op::Ne => !values
                .iter()
                .any(|v| *v == self.value || v.trim_start_matches("sha256:") == want),
            Op::Re => self
                .re
                .as_ref()
                .is_some_and(|r| values.iter().any(|v| r.is_match(v))),
            Op::Flag => false,
        }
    }
}

/// What one prune (or GC policy) asks for.
#[derive(Debug, Clone, Default)]
pub struct PruneOptions {
    pub filter: Filter,
    /// also internal and frontend records (kiln keeps none, so all records
    /// are pruned either way)
    pub all: bool,
    /// keep items used within this long
    pub keep_duration: Option<Duration>,
    /// stop once the total is at most this many bytes (0 = no limit:
    /// remove every matching item)
    pub keep_bytes: i64,
}

/// The items a prune removes, least recently used first: those not in use,
/// matching the filter, older than `keep_duration`, and, under
/// `keep_bytes`, only as many as it takes to bring the total down to it.
/// An item whose snapshots are all beneath an item that stays (the parent
/// of a kept step's result, an image layer under it) stays with it; one
/// beneath only items that go goes with them, so a chain of steps goes
/// whole in one selection (children before their parents).
pub fn select(items: &[UsageItem], opts: &PruneOptions, now: i64) -> Vec<UsageItem> {
    use std::collections::HashMap;
    let total: i64 = items.iter().map(|i| i.size).sum();
    if opts.keep_bytes > 0 && total <= opts.keep_bytes {
        return vec![];
    }
    let mut candidates: Vec<usize> = (0..items.len())
        .filter(|&n| {
            let i = &items[n];
            !i.in_use
                && i.target != Target::None
                && (opts.all || !matches!(i.record_type.as_str(), "internal" | "frontend"))
                && opts
                    .keep_duration
                    .is_none_or(|d| i.last_used <= now - d.as_nanos() as i64)
                && opts.filter.matches(i, now)
        })
        .collect();
    candidates.sort_by_key(|&n| (items[n].last_used, items[n].created));
    // how many remaining items hold each snapshot beneath them
    let mut holders: HashMap<&str, usize> = HashMap::new();
    for i in items {
        for a in &i.ancestors {
            *holders.entry(a.as_str()).or_default() += 1;
        }
    }
    let mut gone = vec![false; items.len()];
    let mut left = total;
    let mut out = Vec::new();
    // each pass removes what nothing remaining holds; the next one what
    // that freed
    loop {
        let mut freed = false;
        for &n in &candidates {
            if opts.keep_bytes > 0 && left <= opts.keep_bytes {
                return out;
            }
            let i = &items[n];
            let held = !i.refs.is_empty()
                && i.refs
                    .iter()
                    .all(|r| holders.get(r.as_str()).is_some_and(|c| *c > 0));
            if gone[n] || held {
                continue;
            }
            gone[n] = true;
            freed = true;
            for a in &i.ancestors {
                if let Some(c) = holders.get_mut(a.as_str()) {
                    *c = c.saturating_sub(1);
                }
            }
            left -= i.size;
            out.push(i.clone());
        }
        if !freed {
            return out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, ty: &str, size: i64, last_used: i64) -> UsageItem {
        UsageItem {
            id: id.into(),
            record_type: ty.into(),
            description: format!("desc of {id}"),
            size,
            created: last_used,
            last_used,
            usage_count: 1,
            in_use: false,
            shared: false,
            mutable: false,
            parents: vec![],
            refs: vec![id.into()],
            ancestors: vec![],
            target: Target::Record(id.into()),
        }
    }

    fn f(s: &[&str]) -> Filter {
        Filter::parse(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>()).expect("parse")
    }

    #[test]
    fn filters_read_like_buildctl() {
        let a = item("sha256:aaa", "regular", 10, 100);
        let mut b = item("bbb", "exec.cachemount", 10, 100);
        b.shared = true;
        assert!(f(&["type==exec.cachemount"]).matches(&b, 0));
        assert!(!f(&["type==exec.cachemount"]).matches(&a, 0));
        assert!(f(&["type=regular"]).matches(&a, 0));
        assert!(f(&["id==aaa"]).matches(&a, 0), "ids match without sha256:");
        assert!(f(&["type!=regular"]).matches(&b, 0));
        assert!(f(&["description~=^desc of b"]).matches(&b, 0));
        assert!(!f(&["description~=^desc of b"]).matches(&a, 0));
        assert!(f(&["shared"]).matches(&b, 0) && !f(&["shared"]).matches(&a, 0));
        assert!(f(&["private"]).matches(&a, 0));
        // comma = and, several strings = or
        assert!(!f(&["type==regular,shared"]).matches(&a, 0));
        assert!(f(&["type==regular", "shared"]).matches(&b, 0));
        // until: last used longer ago than the duration
        let now = 3_600_000_000_000i64 + 100;
        assert!(f(&["until=30m"]).matches(&a, now));
        assert!(!f(&["until=2h"]).matches(&a, now));
        assert!(Filter::parse(&["colour==red".to_string()]).is_err());
        assert!(Filter::parse(&["description~=(".to_string()]).is_err());
    }

    #[test]
    fn select_drops_least_recently_used_first_down_to_keep_bytes() {
        let mut items = vec![
            item("old", "regular", 100, 1),
            item("mid", "regular", 100, 2),
            item("new", "regular", 100, 3),
            item("busy", "regular", 100, 0),
        ];
        items[3].in_use = true;
        let ids = |v: Vec<UsageItem>| v.into_iter().map(|i| i.id).collect::<Vec<_>>();
        let all = select(&items, &PruneOptions::default(), 10);
        assert_eq!(ids(all), ["old", "mid", "new"], "in use stays");
        let some = select(
            &items,
            &PruneOptions {
                keep_bytes: 250,
                ..Default::default()
            },
            10,
        );
        assert_eq!(ids(some), ["old", "mid"]);
        let under = select(
            &items,
            &PruneOptions {
                keep_bytes: 400,
                ..Default::default()
            },
            10,
        );
        assert!(under.is_empty());
        let recent = select(
            &items,
            &PruneOptions {
                keep_duration: Some(Duration::from_nanos(8)),
                ..Default::default()
            },
            10,
        );
        assert_eq!(ids(recent), ["old", "mid"], "used at 3 is within 8ns of 10");
    }

    /// A chain of steps: each result's snapshot is the parent of the next
    /// one's, the first on an image layer no record names.
    fn chain(n: usize) -> Vec<UsageItem> {
        let mut items = vec![item("layer", "regular", 10, 0)];
        items[0].target = Target::Snapshot("layer".into());
        items[0].shared = true;
        for k in 1..=n {
            let mut i = item(&format!("r{k}"), "regular", 10, k as i64);
            i.ancestors = std::iter::once("layer".to_string())
                .chain((1..k).map(|j| format!("r{j}")))
                .collect();
            i.shared = k < n;
            items.push(i);
        }
        items
    }

    #[test]
    fn select_takes_a_whole_chain_at_once_but_not_what_a_kept_item_holds() {
        let items = chain(50);
        let all = select(&items, &PruneOptions::default(), 100);
        assert_eq!(all.len(), 51, "every step and the layer under them");
        assert_eq!(all[0].id, "r50", "children before their parents");
        assert_eq!(all[50].id, "layer");
        // a step in use keeps itself and everything beneath it
        let mut busy = chain(50);
        busy[30].in_use = true;
        let some = select(&busy, &PruneOptions::default(), 100);
        let ids: Vec<&str> = some.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids.len(), 20, "{ids:?}");
        assert!(
            ids.iter()
                .all(|i| i[1..].parse::<usize>().is_ok_and(|k| k > 30))
        );
        // a filter that matches only the bottom of the chain removes nothing
        let bottom = PruneOptions {
            filter: f(&["id==r1"]),
            ..Default::default()
        };
        assert!(select(&items, &bottom, 100).is_empty());
        // one that matches the top: only the top
        let top = PruneOptions {
            filter: f(&["id==r50"]),
            ..Default::default()
        };
        assert_eq!(select(&items, &top, 100).len(), 1);
        // under a size limit, from the top down as far as it takes
        let limited = PruneOptions {
            keep_bytes: 455,
            ..Default::default()
        };
        let ids: Vec<String> = select(&items, &limited, 100)
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(ids, ["r50", "r49", "r48", "r47", "r46", "r45"]);
    }

    #[test]
    fn until_takes_a_go_duration() {
        assert_eq!(f(&["until=1h30m"]).until, Some(Duration::from_secs(5400)));
        assert_eq!(f(&["until=500ms"]).until, Some(Duration::from_millis(500)));
        let err = Filter::parse(&["until=10".to_string()]).expect_err("no unit");
        assert!(matches!(err, Error::FilterDuration { .. }), "{err}");
        assert!(
            Filter::parse(&["until=2d".to_string()]).is_err(),
            "Go has no days"
        );
    }
}
