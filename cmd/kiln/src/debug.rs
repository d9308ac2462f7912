//! `kiln debug`: daemon information and build history.
//!
//! The history comes from `Control.ListenBuildHistory` (BuildKit's RPC);
//! the per-step detail of `kiln debug history REF` is kiln's extension of
//! the record (`kilnSteps`), empty from a BuildKit daemon.

use anyhow::Context;
use clap::Subcommand;
use kiln_proto::moby::buildkit::v1::{
    BuildHistoryRecord, BuildHistoryRequest, InfoRequest, ListWorkersRequest,
    control_client::ControlClient,
};

#[derive(Subcommand)]
pub enum DebugCommand {
    /// List the daemon's workers (a farm's members)
    Workers {
        /// each worker's labels, version and, in a farm, state and load
        #[arg(short, long)]
        verbose: bool,
        /// only workers matching a filter, e.g. labels.zone==b (repeatable: any)
        #[arg(long)]
        filter: Vec<String>,
    },
    /// Show the daemon's version
    Info,
    /// List past builds: ref, start, duration, status, steps (total, cached, failed)
    Histories,
    /// Show one past build's steps, cached or how long each took
    History {
        /// the build's ref (a unique prefix is enough)
        r#ref: String,
    },
}

fn nanos(t: Option<&prost_types::Timestamp>) -> i64 {
    t.map(|t| t.seconds * 1_000_000_000 + i64::from(t.nanos))
        .unwrap_or(0)
}

/// `1.2s`, `3m4s`.
pub fn duration(ns: i64) -> String {
    let s = ns.max(0) as f64 / 1e9;
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        format!("{}m{}s", (s / 60.0) as i64, (s % 60.0) as i64)
    }
}

/// `2026-11-27T05:40:28Z` (UTC), to the second.
pub fn rfc3339(ns: i64) -> String {
    // prost's Timestamp prints RFC 3339, with a fraction only when it has one
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: 0,
    }
    .to_string()
}

fn status(r: &BuildHistoryRecord) -> &'static str {
    match (&r.error, r.completed_at.is_some()) {
        (Some(_), _) => "Error",
        (None, true) => "Completed",
        (None, false) => "Running",
    }
}

async fn records(
    addr: &crate::Daemon,
    req: BuildHistoryRequest,
) -> anyhow::Result<Vec<BuildHistoryRecord>> {
    let mut c = ControlClient::new(addr.connect().await?);
    let mut s = c
        .listen_build_history(req)
        .await
        .context("build history")?
        .into_inner();
    let mut out = Vec::new();
    while let Some(ev) = s.message().await.context("build history")? {
        out.extend(ev.record);
    }
    Ok(out)
}

pub async fn run(addr: &crate::Daemon, what: DebugCommand) -> anyhow::Result<()> {
    match what {
        DebugCommand::Info => {
            let mut c = ControlClient::new(addr.connect().await?);
            let v = c
                .info(InfoRequest {})
                .await?
                .into_inner()
                .buildkit_version
                .unwrap_or_default();
            println!("BuildKit: {} {} {}", v.package, v.version, v.revision);
        }
        DebugCommand::Workers { verbose, filter } => {
            let mut c = ControlClient::new(addr.connect().await?);
            let w = c
                .list_workers(ListWorkersRequest { filter })
                .await?
                .into_inner();
            if !verbose {
                println!("ID\tPLATFORMS");
            }
            for r in w.record {
                let p: Vec<String> = r
                    .platforms
                    .iter()
                    .map(|p| {
                        format!(
                            "{}/{}{}",
                            p.os,
                            p.architecture,
                            if p.variant.is_empty() {
                                String::new()
                            } else {
                                format!("/{}", p.variant)
                            }
                        )
                    })
                    .collect();
                if !verbose {
                    println!("{}\t{}", r.id, p.join(","));
                    continue;
                }
                // buildctl's layout of `debug workers -v`
                println!("ID:\t\t{}", r.id);
                println!("Platforms:\t{}", p.join(","));
                if let Some(v) = &r.buildkit_version {
                    println!("BuildKit:\t{} {} {}", v.package, v.version, v.revision);
                }
                println!("Labels:");
                for (k, v) in &r.labels {
                    println!("\t{k}:\t{v}");
                }
                println!();
            }
        }
        DebugCommand::Histories => {
            let mut all = records(addr, BuildHistoryRequest::default()).await?;
            all.extend(
                records(
                    addr,
                    BuildHistoryRequest {
                        active_only: true,
                        ..Default::default()
                    },
                )
                .await?,
            );
            println!(
                "{:<32}  {:<20}  {:>9}  {:<9}  {:>5}  {:>6}  {:>6}",
                "REF", "STARTED", "DURATION", "STATUS", "STEPS", "CACHED", "FAILED"
            );
            for r in all.iter().rev() {
                let (c, d) = (nanos(r.created_at.as_ref()), nanos(r.completed_at.as_ref()));
                let failed = r.kiln_steps.iter().filter(|s| !s.error.is_empty()).count();
                println!(
                    "{:<32}  {:<20}  {:>9}  {:<9}  {:>5}  {:>6}  {:>6}",
                    r.r#ref,
                    rfc3339(c),
                    if d > 0 { duration(d - c) } else { "-".into() },
                    status(r),
                    r.num_total_steps,
                    r.num_cached_steps,
                    failed
                );
            }
        }
        DebugCommand::History { r#ref } => {
            let all = records(addr, BuildHistoryRequest::default()).await?;
            let found: Vec<&BuildHistoryRecord> =
                all.iter().filter(|r| r.r#ref.starts_with(&r#ref)).collect();
            let r = match found.as_slice() {
                [one] => *one,
                [] => anyhow::bail!("no build {ref:?} in the history"),
                _ => anyhow::bail!(
                    "{ref:?} matches {} builds; give more of the ref",
                    found.len()
                ),
            };
            let (c, d) = (nanos(r.created_at.as_ref()), nanos(r.completed_at.as_ref()));
            println!("Ref:\t\t{}", r.r#ref);
            println!("Frontend:\t{}", r.frontend);
            println!("Started:\t{}", rfc3339(c));
            println!("Duration:\t{}", duration(d - c));
            println!("Status:\t\t{}", status(r));
            if let Some(e) = &r.error {
                println!("Error:\t\t{}", e.message);
            }
            println!(
                "Steps:\t\t{} ({} cached)",
                r.num_total_steps, r.num_cached_steps
            );
            if let Some(digest) = r.exporter_response.get("containerimage.digest") {
                println!("Image:\t\t{digest}");
            }
            println!();
            for (i, s) in r.kiln_steps.iter().enumerate() {
                let state = if !s.error.is_empty() {
                    format!("ERROR: {}", s.error)
                } else if s.cached {
                    "CACHED".to_string()
                } else {
                    let (a, b) = (nanos(s.started.as_ref()), nanos(s.completed.as_ref()));
                    if b > 0 {
                        format!("DONE {}", duration(b - a))
                    } else {
                        "INCOMPLETE".to_string()
                    }
                };
                if s.worker.is_empty() {
                    println!("#{} {}\t{}", i + 1, s.name, state);
                } else {
                    println!("#{} {}\t{}\ton {}", i + 1, s.name, state, s.worker);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_rfc3339_and_durations() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(1_795_000_000 * 1_000_000_000),
            "2026-11-18T11:06:40Z"
        );
        assert_eq!(duration(1_250_000_000), "1.2s");
        assert_eq!(duration(185 * 1_000_000_000), "3m5s");
    }
}
