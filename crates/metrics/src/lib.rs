//! kiln's Prometheus metrics: process-wide counters, gauges and histograms,
//! rendered in Prometheus's text exposition format (version 0.0.4) for
//! kilnd's `/metrics` (`--debugaddr`).
//!
//! Every family is a `static` below, so any crate counts with one call
//! (`kiln_metrics::STEPS.inc(&["exec", "miss"])`) and nothing is threaded
//! through constructors. A family keeps its samples by label values; the
//! label names are fixed with the family. Gauges that describe state another
//! part owns (workers, sessions, cache size) are set by kilnd just before it
//! renders ([`Family::replace`]), so they are never stale.
//!
//! Each process counts what it does: in a split farm, the scheduler counts
//! builds and steps, a worker what it pulled, an exporter what it pushed, and
//! Prometheus scrapes each one.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// What a family measures, as the `# TYPE` line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Debug, Clone)]
enum Value {
    Number(f64),
    /// counts per bucket (not cumulative), the sum and the count
    Histogram(Vec<u64>, f64, u64),
}

/// One metric family: a name, its help, its label names and a sample per
/// label-value tuple.
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    /// histogram bucket upper bounds, ascending (`+Inf` is implied)
    buckets: &'static [f64],
    samples: Mutex<BTreeMap<Vec<String>, Value>>,
}

impl Family {
    pub const fn counter(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Family {
        Family::new(name, help, Kind::Counter, labels, &[])
    }

    pub const fn gauge(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Family {
        Family::new(name, help, Kind::Gauge, labels, &[])
    }

    pub const fn histogram(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Family {
        Family::new(name, help, Kind::Histogram, labels, buckets)
    }

    const fn new(
        name: &'static str,
        help: &'static str,
        kind: Kind,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Family {
        Family {
            name,
            help,
            kind,
            labels,
            buckets,
            samples: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    fn key(&self, values: &[&str]) -> Vec<String> {
        // a wrong arity is a programming error: pad or cut rather than panic
        (0..self.labels.len())
            .map(|i| values.get(i).copied().unwrap_or_default().to_string())
            .collect()
    }

    fn with(&self, values: &[&str], f: impl FnOnce(&mut Value)) {
        let key = self.key(values);
        if let Ok(mut s) = self.samples.lock() {
            let v = s.entry(key).or_insert_with(|| match self.kind {
                Kind::Histogram => Value::Histogram(vec![0; self.buckets.len() + 1], 0.0, 0),
                _ => Value::Number(0.0),
            });
            f(v);
        }
    }

    /// Adds one (a counter or gauge).
    pub fn inc(&self, values: &[&str]) {
        self.add(values, 1.0);
    }

    /// Adds `n` (a counter or gauge; a gauge may go down).
    pub fn add(&self, values: &[&str], n: f64) {
        self.with(values, |v| {
            if let Value::Number(x) = v {
                *x += n;
            }
        });
    }

    /// Sets a gauge.
    pub fn set(&self, values: &[&str], n: f64) {
        self.with(values, |v| {
            if let Value::Number(x) = v {
                *x = n;
            }
        });
    }

    /// Records one observation in a histogram.
    pub fn observe(&self, values: &[&str], x: f64) {
        let bucket = self
            .buckets
            .iter()
            .position(|b| x <= *b)
            .unwrap_or(self.buckets.len());
        self.with(values, |v| {
            if let Value::Histogram(counts, sum, count) = v {
                if let Some(c) = counts.get_mut(bucket) {
                    *c += 1;
                }
                *sum += x;
                *count += 1;
            }
        });
    }

    /// Replaces every sample of a gauge (state read just before rendering:
    /// a worker that left disappears from the family).
    pub fn replace<'a>(&self, samples: impl IntoIterator<Item = (Vec<&'a str>, f64)>) {
        let fresh: BTreeMap<Vec<String>, Value> = samples
            .into_iter()
            .map(|(k, v)| (self.key(&k), Value::Number(v)))
            .collect();
        if let Ok(mut s) = self.samples.lock() {
            *s = fresh;
        }
    }

    /// The value of a counter or gauge (0 when never set).
    pub fn get(&self, values: &[&str]) -> f64 {
        let key = self.key(values);
        match self.samples.lock().ok().and_then(|s| s.get(&key).cloned()) {
            Some(Value::Number(x)) => x,
            Some(Value::Histogram(_, _, count)) => count as f64,
            None => 0.0,
        }
    }

    /// The sum over every label tuple (a histogram: its observations).
    pub fn total(&self) -> f64 {
        self.sum(|_| true)
    }

    /// The sum over the label tuples whose `label` is `value`.
    pub fn total_where(&self, label: &str, value: &str) -> f64 {
        match self.labels.iter().position(|l| *l == label) {
            Some(i) => self.sum(|key| key.get(i).is_some_and(|v| v == value)),
            None => 0.0,
        }
    }

    fn sum(&self, want: impl Fn(&[String]) -> bool) -> f64 {
        let Ok(s) = self.samples.lock() else {
            return 0.0;
        };
        s.iter()
            .filter(|(k, _)| want(k))
            .map(|(_, v)| match v {
                Value::Number(x) => *x,
                Value::Histogram(_, _, count) => *count as f64,
            })
            .sum()
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind.name());
        let Ok(samples) = self.samples.lock() else {
            return;
        };
        if samples.is_empty() && self.labels.is_empty() && self.kind != Kind::Histogram {
            // an unlabelled family always has its one sample
            let _ = writeln!(out, "{} 0", self.name);
        }
        for (key, value) in samples.iter() {
            let labels = label_text(self.labels, key, None);
            match value {
                Value::Number(x) => {
                    let _ = writeln!(out, "{}{} {}", self.name, labels, number(*x));
                }
                Value::Histogram(counts, sum, count) => {
                    let mut cumulative = 0;
                    for (i, c) in counts.iter().enumerate() {
                        cumulative += c;
                        let le = match self.buckets.get(i) {
                            Some(b) => number(*b),
                            None => "+Inf".to_string(),
                        };
                        let l = label_text(self.labels, key, Some(&le));
                        let _ = writeln!(out, "{}_bucket{} {}", self.name, l, cumulative);
                    }
                    let _ = writeln!(out, "{}_sum{} {}", self.name, labels, number(*sum));
                    let _ = writeln!(out, "{}_count{} {}", self.name, labels, count);
                }
            }
        }
    }
}

/// `{a="x",b="y"}` (with `le` last for a bucket), or nothing without labels.
fn label_text(names: &[&str], values: &[String], le: Option<&str>) -> String {
    let mut parts: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn number(x: f64) -> String {
    if x.is_infinite() {
        if x > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else if x.is_nan() {
        "NaN".to_string()
    } else if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// Step and build durations: 5 ms to 30 min.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0,
];

/// Builds that ended, by `status`: succeeded, failed or canceled.
pub static BUILDS: Family = Family::counter(
    "kiln_builds_total",
    "Builds that ended, by status (succeeded, failed, canceled).",
    &["status"],
);
/// Builds running now (set when rendered).
pub static BUILDS_RUNNING: Family =
    Family::gauge("kiln_builds_running", "Builds running now.", &[]);
/// Whole-build durations.
pub static BUILD_DURATION: Family = Family::histogram(
    "kiln_build_duration_seconds",
    "How long builds took, from Solve to their end.",
    &["status"],
    DURATION_BUCKETS,
);
/// Steps that finished, by op kind and cache result (hit: the local cache;
/// remote: an imported cache; miss: the step ran).
pub static STEPS: Family = Family::counter(
    "kiln_steps_total",
    "Steps that finished, by op kind and cache result (hit, remote, miss).",
    &["kind", "cache"],
);
/// Steps that failed, by op kind.
pub static STEP_FAILURES: Family = Family::counter(
    "kiln_step_failures_total",
    "Steps that failed, by op kind.",
    &["kind"],
);
/// How long steps that ran took (lookups, inputs and the run on a worker).
pub static STEP_DURATION: Family = Family::histogram(
    "kiln_step_duration_seconds",
    "How long steps that ran took, by op kind.",
    &["kind"],
    DURATION_BUCKETS,
);
/// How long steps waited for a worker slot.
pub static QUEUE_WAIT: Family = Family::histogram(
    "kiln_queue_wait_seconds",
    "How long steps waited for a free worker slot.",
    &[],
    DURATION_BUCKETS,
);
/// Steps waiting for a worker slot now: what a farm's autoscaler watches.
pub static QUEUE_LENGTH: Family = Family::gauge(
    "kiln_queue_length",
    "Steps waiting for a free worker slot now.",
    &[],
);
/// Steps running on each worker (set when rendered).
pub static WORKER_RUNNING: Family = Family::gauge(
    "kiln_worker_running_steps",
    "Steps running on each worker of the farm.",
    &["worker"],
);
/// Each worker's step slots (0: unbounded).
pub static WORKER_CAPACITY: Family = Family::gauge(
    "kiln_worker_capacity",
    "Steps each worker runs at once (0: unbounded).",
    &["worker"],
);
/// Each worker's free disk as it last reported it.
pub static WORKER_FREE_DISK: Family = Family::gauge(
    "kiln_worker_free_disk_bytes",
    "Free disk under each worker's root, as it last reported.",
    &["worker"],
);
/// Workers by state (ready, draining).
pub static WORKERS: Family =
    Family::gauge("kiln_workers", "Workers in the farm, by state.", &["state"]);
/// The build cache's size on disk (records, snapshots, blobs).
pub static CACHE_SIZE: Family = Family::gauge(
    "kiln_cache_size_bytes",
    "Disk used by the build cache (snapshots, blobs).",
    &[],
);
/// Records in the build cache.
pub static CACHE_RECORDS: Family =
    Family::gauge("kiln_cache_records", "Records in the build cache.", &[]);
/// Garbage-collection runs and what they removed.
pub static GC_RUNS: Family = Family::counter(
    "kiln_gc_runs_total",
    "Garbage-collection and prune runs.",
    &[],
);
pub static GC_REMOVED: Family = Family::counter(
    "kiln_gc_removed_items_total",
    "Cache items garbage collection and prunes removed.",
    &[],
);
/// Bytes pulled from registries (image layers, imported caches).
pub static PULLED_BYTES: Family = Family::counter(
    "kiln_pulled_bytes_total",
    "Bytes pulled from registries.",
    &[],
);
/// Bytes pushed to registries (images, caches).
pub static PUSHED_BYTES: Family = Family::counter(
    "kiln_pushed_bytes_total",
    "Bytes pushed to registries.",
    &[],
);
/// Bytes moved between the farm's workers.
pub static MOVED_BYTES: Family = Family::counter(
    "kiln_moved_bytes_total",
    "Bytes moved between workers of the farm.",
    &[],
);
/// Client sessions open now.
pub static SESSIONS: Family =
    Family::gauge("kiln_client_sessions", "Client sessions open now.", &[]);

/// Every family, in the order `/metrics` lists them.
pub static ALL: &[&Family] = &[
    &BUILDS,
    &BUILDS_RUNNING,
    &BUILD_DURATION,
    &STEPS,
    &STEP_FAILURES,
    &STEP_DURATION,
    &QUEUE_WAIT,
    &QUEUE_LENGTH,
    &WORKERS,
    &WORKER_RUNNING,
    &WORKER_CAPACITY,
    &WORKER_FREE_DISK,
    &CACHE_SIZE,
    &CACHE_RECORDS,
    &GC_RUNS,
    &GC_REMOVED,
    &PULLED_BYTES,
    &PUSHED_BYTES,
    &MOVED_BYTES,
    &SESSIONS,
];

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every family in the text exposition format.
pub fn render() -> String {
    let mut out = String::new();
    for f in ALL {
        f.render(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_histograms_and_labels_render_as_prometheus_reads_them() {
        static C: Family = Family::counter("t_total", "help", &["kind", "cache"]);
        static H: Family = Family::histogram("t_seconds", "help", &[], &[0.1, 1.0]);
        C.inc(&["exec", "hit"]);
        C.add(&["exec", "hit"], 2.0);
        C.inc(&["file", "mi\"ss\n"]);
        H.observe(&[], 0.05);
        H.observe(&[], 0.5);
        H.observe(&[], 5.0);
        let mut out = String::new();
        C.render(&mut out);
        H.render(&mut out);
        assert_eq!(
            out,
            "# HELP t_total help\n# TYPE t_total counter\n\
             t_total{kind=\"exec\",cache=\"hit\"} 3\n\
             t_total{kind=\"file\",cache=\"mi\\\"ss\\n\"} 1\n\
             # HELP t_seconds help\n# TYPE t_seconds histogram\n\
             t_seconds_bucket{le=\"0.1\"} 1\nt_seconds_bucket{le=\"1\"} 2\n\
             t_seconds_bucket{le=\"+Inf\"} 3\nt_seconds_sum 5.55\nt_seconds_count 3\n"
        );
        assert_eq!(C.get(&["exec", "hit"]), 3.0);
        assert_eq!(C.total(), 4.0);
        assert_eq!(C.total_where("kind", "exec"), 3.0);
        assert_eq!(C.total_where("cache", "hit"), 3.0);
        assert_eq!(C.total_where("nope", "hit"), 0.0);
    }

    #[test]
    fn replace_drops_what_is_gone() {
        static G: Family = Family::gauge("g", "help", &["worker"]);
        G.replace([(vec!["a"], 1.0), (vec!["b"], 2.0)]);
        G.replace([(vec!["b"], 3.0)]);
        let mut out = String::new();
        G.render(&mut out);
        assert!(!out.contains("worker=\"a\""), "{out}");
        assert!(out.contains("g{worker=\"b\"} 3\n"), "{out}");
    }

    #[test]
    fn an_unlabelled_family_always_has_a_sample() {
        static Z: Family = Family::counter("z_total", "help", &[]);
        let mut out = String::new();
        Z.render(&mut out);
        assert!(out.ends_with("z_total 0\n"), "{out}");
    }
}
