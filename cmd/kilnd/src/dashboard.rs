//! The farm dashboard on `--debugaddr`: server-rendered HTML with inline
//! styles (no script, no external asset), refreshed by the browser every few
//! seconds, and the same data as JSON under `/api/`.
//!
//! `/` shows the workers (state, labels, running/capacity, free disk), the
//! queue, and the running and recent builds; `/build/REF` a build's timeline:
//! one lane per worker, one bar per step from its start to its end (cached,
//! ran, failed or running), with the bytes its inputs moved between workers.

use crate::serve::Solver;
use solver_scheduler::history::{HistoryRecord, HistoryStep};
use solver_scheduler::peer::WorkerInfo;
use std::collections::BTreeMap;
use std::fmt::Write;

/// How many finished builds the front page lists.
const RECENT: usize = 20;
/// The page reloads itself this often (seconds).
const REFRESH_SECS: u32 = 5;

/// Everything the front page shows.
pub struct Farm {
    pub role: &'static str,
    pub workers: Vec<WorkerInfo>,
    /// steps waiting for a worker slot
    pub queued: f64,
    pub running: Vec<Build>,
    /// newest first
    pub recent: Vec<Build>,
    /// steps finished since kilnd started: (cache hits incl. remote, ran)
    pub steps: (f64, f64),
}

/// A build, running or finished.
pub struct Build {
    pub record: HistoryRecord,
    pub running: bool,
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

pub async fn farm(role: &'static str, s: &Solver) -> Farm {
    let mut running: Vec<Build> = s
        .active_builds()
        .iter()
        .filter_map(|(id, _)| s.running_record(id))
        .map(|record| Build {
            record,
            running: true,
        })
        .collect();
    running.sort_by_key(|b| std::cmp::Reverse(b.record.created));
    let recent = s
        .history()
        .await
        .unwrap_or_default()
        .into_iter()
        .rev()
        .take(RECENT)
        .map(|record| Build {
            record,
            running: false,
        })
        .collect();
    let steps = kiln_metrics::STEPS.total();
    let ran = kiln_metrics::STEPS.total_where("cache", "miss");
    Farm {
        role,
        workers: s.worker_infos(),
        queued: kiln_metrics::QUEUE_LENGTH.get(&[]),
        running,
        recent,
        steps: (steps - ran, ran),
    }
}

/// A running build, else a finished one from the history.
pub async fn build(s: &Solver, id: &str) -> Option<Build> {
    if let Some(record) = s.running_record(id) {
        return Some(Build {
            record,
            running: true,
        });
    }
    s.history()
        .await
        .ok()?
        .into_iter()
        .find(|r| r.r#ref == id)
        .map(|record| Build {
            record,
            running: false,
        })
}

impl Build {
    fn status(&self) -> &'static str {
        if self.running {
            "running"
        } else if self.record.error.is_empty() {
            "succeeded"
        } else {
            "failed"
        }
    }

    /// When it ended, or now while it runs.
    fn end(&self) -> i64 {
        if self.record.completed > 0 {
            self.record.completed
        } else {
            now_nanos()
        }
    }

    fn workers(&self) -> Vec<&str> {
        let mut w: Vec<&str> = self
            .record
            .steps
            .iter()
            .map(|s| s.worker.as_str())
            .filter(|w| !w.is_empty())
            .collect();
        w.sort_unstable();
        w.dedup();
        w
    }

    fn moved(&self) -> u64 {
        self.record.steps.iter().map(|s| s.bytes_moved).sum()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.record).unwrap_or_default();
        v["status"] = self.status().into();
        v["duration_seconds"] = secs(self.end() - self.record.created).into();
        v
    }
}

impl Farm {
    pub fn to_json(&self) -> serde_json::Value {
        let workers: Vec<serde_json::Value> = self
            .workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "id": w.id,
                    "address": w.address,
                    "state": w.state,
                    "labels": w.labels,
                    "platforms": w.platforms.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                    "running": w.running,
                    "capacity": w.capacity,
                    "free_disk": w.free_disk,
                })
            })
            .collect();
        let summary = |b: &Build| {
            serde_json::json!({
                "ref": b.record.r#ref,
                "status": b.status(),
                "created": b.record.created,
                "completed": b.record.completed,
                "steps": b.record.steps.len(),
                "cached_steps": b.record.cached_steps(),
                "workers": b.workers(),
                "bytes_moved": b.moved(),
            })
        };
        serde_json::json!({
            "role": self.role,
            "workers": workers,
            "queue": { "waiting_steps": self.queued },
            "steps": { "cached": self.steps.0, "ran": self.steps.1 },
            "running": self.running.iter().map(summary).collect::<Vec<_>>(),
            "recent": self.recent.iter().map(summary).collect::<Vec<_>>(),
        })
    }
}

fn secs(nanos: i64) -> f64 {
    nanos.max(0) as f64 / 1e9
}

/// Text made safe for HTML.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A path segment made safe for a link.
fn url_part(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

fn duration(nanos: i64) -> String {
    let s = secs(nanos);
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.0} min {:.0} s", (s / 60.0).floor(), s % 60.0)
    }
}

fn clock(nanos: i64) -> String {
    let secs = nanos.div_euclid(1_000_000_000);
    let day = secs.rem_euclid(86_400);
    format!(
        "{:02}:{:02}:{:02} UTC",
        day / 3600,
        (day % 3600) / 60,
        day % 60
    )
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}\
table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}\
.bar{background:#eee;width:120px;height:10px;display:inline-block}.bar i{display:block;height:10px;background:#3a7}\
.gantt{width:100%}.gantt .name{max-width:40em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}\
.gantt .track{width:60%}.lanehead td{font-family:monospace;font-weight:bold;background:#eef2f8}\
.lane{position:relative;height:14px;background:#f6f6f6}\
.step{position:absolute;top:1px;height:12px;border-radius:2px}\
.ran{background:#2a6fd6}.cached{background:#999}.failed{background:#d33}.running{background:#e90}\
.muted{color:#777}\
.succeeded{color:#2a7}.failed-t{color:#d33}.running-t{color:#e90}";

fn page(title: &str, body: &str, refresh: bool) -> String {
    let meta = if refresh {
        format!("<meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">")
    } else {
        String::new()
    };
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\">{meta}<title>{}</title>\
         <style>{STYLE}</style></head><body>{body}</body></html>",
        esc(title)
    )
}

fn status_cell(b: &Build) -> String {
    let class = match b.status() {
        "succeeded" => "succeeded",
        "failed" => "failed-t",
        _ => "running-t",
    };
    format!("<span class=\"{class}\">{}</span>", b.status())
}

fn build_rows(out: &mut String, builds: &[Build]) {
    if builds.is_empty() {
        out.push_str("<p class=\"muted\">none</p>");
        return;
    }
    out.push_str(
        "<table><tr><th>build</th><th>status</th><th>started</th><th>took</th>\
         <th>steps</th><th>cached</th><th>workers</th><th>moved</th></tr>",
    );
    for b in builds {
        let r = &b.record;
        let _ = write!(
            out,
            "<tr><td><a href=\"/build/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            url_part(&r.r#ref),
            esc(&r.r#ref),
            status_cell(b),
            clock(r.created),
            duration(b.end() - r.created),
            r.steps.len(),
            r.cached_steps(),
            esc(&b.workers().join(", ")),
            bytes(b.moved()),
        );
    }
    out.push_str("</table>");
}

pub fn farm_page(f: &Farm) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<h1>kiln farm</h1><p class=\"muted\">kilnd {} ({}), {}</p>",
        env!("CARGO_PKG_VERSION"),
        f.role,
        clock(now_nanos())
    );
    let _ = write!(o, "<h2>Workers ({})</h2>", f.workers.len());
    o.push_str(
        "<table><tr><th>worker</th><th>state</th><th>address</th><th>platforms</th>\
         <th>labels</th><th>running</th><th>free disk</th></tr>",
    );
    for w in &f.workers {
        let cap = if w.capacity == 0 {
            "∞".to_string()
        } else {
            w.capacity.to_string()
        };
        let fill = if w.capacity == 0 {
            0
        } else {
            (u64::from(w.running) * 100 / u64::from(w.capacity)).min(100)
        };
        let labels: Vec<String> = w
            .labels
            .iter()
            .filter(|(k, _)| !k.starts_with("org.mobyproject."))
            .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
            .collect();
        let platforms: Vec<String> = w.platforms.iter().map(|p| esc(&p.to_string())).collect();
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td><span class=\"bar\"><i style=\"width:{fill}%\"></i></span> {}/{}</td><td>{}</td></tr>",
            esc(&w.id),
            esc(&w.state),
            esc(&w.address),
            platforms.join(", "),
            labels.join("<br>"),
            w.running,
            cap,
            if w.free_disk > 0 {
                bytes(w.free_disk)
            } else {
                "—".into()
            },
        );
    }
    o.push_str("</table>");
    let _ = write!(
        o,
        "<h2>Queue</h2><p>{} steps waiting for a worker slot; since start {} steps ran and {} were cached.</p>",
        f.queued, f.steps.1, f.steps.0
    );
    let _ = write!(o, "<h2>Running builds ({})</h2>", f.running.len());
    build_rows(&mut o, &f.running);
    let _ = write!(o, "<h2>Recent builds ({})</h2>", f.recent.len());
    build_rows(&mut o, &f.recent);
    page("kiln farm", &o, true)
}

fn step_class(s: &HistoryStep) -> &'static str {
    if !s.error.is_empty() {
        "failed"
    } else if s.cached {
        "cached"
    } else if s.completed == 0 {
        "running"
    } else {
        "ran"
    }
}

/// A build's page; `lone_worker`: the farm's only worker, where every step
/// that ran without a placement ran.
pub fn build_page(b: &Build, lone_worker: Option<&str>) -> String {
    let r = &b.record;
    let (t0, end) = (r.created, b.end());
    let span = (end - t0).max(1) as f64;
    let mut o = String::new();
    let _ = write!(
        o,
        "<p><a href=\"/\">← farm</a></p><h1>build {}</h1><p>{} · started {} · took {} · \
         {} steps, {} cached · {} moved between workers{}</p>",
        esc(&r.r#ref),
        status_cell(b),
        clock(t0),
        duration(end - t0),
        r.steps.len(),
        r.cached_steps(),
        bytes(b.moved()),
        if r.error.is_empty() {
            String::new()
        } else {
            format!("<br><span class=\"failed-t\">{}</span>", esc(&r.error))
        }
    );
    // one lane per worker; a lone worker places nothing, so its steps have
    // no worker named; cached steps ran nowhere
    let mut lanes: BTreeMap<String, Vec<&HistoryStep>> = BTreeMap::new();
    for s in &r.steps {
        let lane = if !s.worker.is_empty() {
            s.worker.clone()
        } else if s.cached {
            "(cached)".to_string()
        } else {
            lone_worker.unwrap_or("(not placed)").to_string()
        };
        lanes.entry(lane).or_default().push(s);
    }
    let _ = write!(
        o,
        "<h2>Timeline</h2><table class=\"gantt\"><tr><th>worker / step</th>\
         <th class=\"track\">0 … {}</th></tr>",
        duration(end - t0)
    );
    for (lane, steps) in &lanes {
        let _ = write!(
            o,
            "<tr class=\"lanehead\"><td colspan=\"2\">{} · {} steps</td></tr>",
            esc(lane),
            steps.len()
        );
        for s in steps {
            let _ = write!(
                o,
                "<tr><td class=\"name\">{}</td><td class=\"track\"><div class=\"lane\">",
                esc(&s.name)
            );
            if s.started > 0 {
                let stop = if s.completed > 0 { s.completed } else { end };
                let left = ((s.started - t0) as f64 / span * 100.0).clamp(0.0, 100.0);
                let width = ((stop - s.started) as f64 / span * 100.0).clamp(0.4, 100.0 - left);
                let _ = write!(
                    o,
                    "<div class=\"step {}\" style=\"left:{left:.2}%;width:{width:.2}%\" title=\"{} ({}){}\"></div>",
                    step_class(s),
                    esc(&s.name),
                    duration(stop - s.started),
                    if s.bytes_moved > 0 {
                        format!(", {} moved", bytes(s.bytes_moved))
                    } else {
                        String::new()
                    },
                );
            }
            o.push_str("</div></td></tr>");
        }
    }
    o.push_str("</table>");
    o.push_str(
        "<h2>Steps</h2><table><tr><th>step</th><th>worker</th><th>result</th><th>at</th>\
         <th>took</th><th>moved</th></tr>",
    );
    for s in &r.steps {
        let at = if s.started > 0 {
            format!("+{}", duration(s.started - t0))
        } else {
            "—".into()
        };
        let took = if s.started > 0 && s.completed > 0 {
            duration(s.completed - s.started)
        } else {
            "—".into()
        };
        let result = match step_class(s) {
            "failed" => format!("<span class=\"failed-t\">failed: {}</span>", esc(&s.error)),
            c => c.to_string(),
        };
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&s.name),
            esc(&s.worker),
            result,
            at,
            took,
            if s.bytes_moved > 0 {
                bytes(s.bytes_moved)
            } else {
                String::new()
            },
        );
    }
    o.push_str("</table>");
    page(&format!("kiln build {}", r.r#ref), &o, b.running)
}

pub fn role_page(role: &str) -> String {
    page(
        "kiln",
        &format!(
            "<h1>kilnd {} ({})</h1><p>This kilnd runs no scheduler: the farm dashboard is on \
             the solver-scheduler's debug address. <a href=\"/metrics\">metrics</a></p>",
            env!("CARGO_PKG_VERSION"),
            esc(role)
        ),
        false,
    )
}

pub fn not_found(id: &str) -> String {
    page(
        "kiln",
        &format!(
            "<p><a href=\"/\">← farm</a></p><p>No build {} is running or in the history.</p>",
            esc(id)
        ),
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, worker: &str, started: i64, completed: i64, cached: bool) -> HistoryStep {
        HistoryStep {
            name: name.into(),
            worker: worker.into(),
            started,
            completed,
            cached,
            ..Default::default()
        }
    }

    #[test]
    fn a_build_page_has_a_lane_per_worker_and_escapes_names() {
        let b = Build {
            record: HistoryRecord {
                r#ref: "abc".into(),
                created: 1_000_000_000,
                completed: 3_000_000_000,
                steps: vec![
                    step(
                        "[1/2] RUN echo <x>",
                        "w1",
                        1_000_000_000,
                        2_000_000_000,
                        false,
                    ),
                    step("[2/2] COPY", "w2", 2_000_000_000, 3_000_000_000, false),
                    step("FROM busybox", "", 1_000_000_000, 1_000_000_000, true),
                ],
                ..Default::default()
            },
            running: false,
        };
        let page = build_page(&b, None);
        assert!(page.contains("RUN echo &lt;x&gt;"), "{page}");
        assert!(!page.contains("<x>"), "{page}");
        for lane in ["w1 · 1 steps", "w2 · 1 steps", "(cached) · 1 steps"] {
            assert!(
                page.contains(&format!("<td colspan=\"2\">{lane}</td>")),
                "{page}"
            );
        }
        // the second step starts half way through the build
        assert!(page.contains("left:50.00%;width:50.00%"), "{page}");
        assert!(page.contains("succeeded"), "{page}");
    }

    #[test]
    fn links_quote_what_is_not_plain() {
        assert_eq!(url_part("a b/c"), "a%20b%2Fc");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(clock(3_661_000_000_000), "01:01:01 UTC");
    }
}
