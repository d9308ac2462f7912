//! `kiln du` and `kiln prune`: the daemon's build cache, as `buildctl du`
//! and `buildctl prune` show it.

use anyhow::Context;
use clap::Args;
use kiln_proto::moby::buildkit::v1::{
    DiskUsageRequest, PruneRequest, UsageRecord, control_client::ControlClient,
};
use std::time::{Duration, SystemTime};

#[derive(Args, Debug)]
pub struct DuArgs {
    /// Only records matching this filter (id, type, description, parents,
    /// inuse, shared, private, mutable, immutable, until); repeatable
    #[arg(long, short)]
    filter: Vec<String>,
    /// Show every field of each record
    #[arg(long, short)]
    verbose: bool,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Keep records used within this duration (e.g. 24h, 90m, 1h30m)
    #[arg(long, value_parser = parse_duration)]
    keep_duration: Option<Duration>,
    /// Keep this much data (MB, or a size with a unit: 10GB, 512MiB)
    #[arg(long, value_parser = parse_storage)]
    keep_storage: Option<i64>,
    /// Only records matching this filter (as for du); repeatable
    #[arg(long, short)]
    filter: Vec<String>,
    /// Include records that a default prune keeps
    #[arg(long)]
    all: bool,
    /// Print every pruned record
    #[arg(long, short)]
    verbose: bool,
}

/// `--keep-duration`: a Go duration, as buildctl takes it (`24h`, `90m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    kiln_units::parse_duration(s).map_err(|e| e.to_string())
}

/// `--keep-storage`: megabytes as buildctl takes them, or a size with a unit
/// (`2GB`, `512m`; powers of 1024, as sizes are everywhere else).
pub fn parse_storage(s: &str) -> Result<i64, String> {
    match s.trim().parse::<f64>() {
        Ok(mb) if mb >= 0.0 => Ok((mb * 1e6) as i64),
        _ => kiln_units::parse_size(s).map_err(|e| e.to_string()),
    }
}

/// Decimal sizes as Docker prints them: `12.3MB`.
pub fn human_size(n: i64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i < units.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        return format!("{n}B");
    }
    let num = format!("{v:.2}");
    format!(
        "{}{}",
        num.trim_end_matches('0').trim_end_matches('.'),
        units[i]
    )
}

fn ago(ts: Option<&prost_types::Timestamp>) -> String {
    let Some(ts) = ts else { return String::new() };
    let t =
        SystemTime::UNIX_EPOCH + Duration::new(ts.seconds.max(0) as u64, ts.nanos.max(0) as u32);
    let s = SystemTime::now()
        .duration_since(t)
        .unwrap_or_default()
        .as_secs();
    let h = match s {
        0 => "Less than a second".to_string(),
        1..=59 => format!("{s} seconds"),
        60..=3599 => format!("{} minutes", s / 60),
        3600..=172_799 => format!("{} hours", s / 3600),
        _ => format!("{} days", s / 86_400),
    };
    format!("{h} ago")
}

fn print_table(records: &[UsageRecord]) {
    println!(
        "{:<66}\t{:<12}\t{:<10}\tLAST ACCESSED",
        "ID", "RECLAIMABLE", "SIZE"
    );
    for r in records {
        println!(
            "{:<66}\t{:<12}\t{:<10}\t{}",
            r.id,
            !r.in_use,
            human_size(r.size),
            ago(r.last_used_at.as_ref())
        );
    }
}

fn print_verbose(records: &[UsageRecord]) {
    for r in records {
        println!("ID:\t\t{}", r.id);
        println!("Created at:\t{}", ago(r.created_at.as_ref()));
        println!("Mutable:\t{}", r.mutable);
        println!("Reclaimable:\t{}", !r.in_use);
        println!("Shared:\t\t{}", r.shared);
        println!("Size:\t\t{}", human_size(r.size));
        if !r.parents.is_empty() {
            println!("Parents:\t{}", r.parents.join(";"));
        }
        println!("Description:\t{}", r.description);
        println!("Usage count:\t{}", r.usage_count);
        println!("Last used:\t{}", ago(r.last_used_at.as_ref()));
        println!("Type:\t\t{}", r.record_type);
        println!();
    }
}

pub async fn du(addr: &crate::Daemon, args: DuArgs) -> anyhow::Result<()> {
    let mut c = ControlClient::new(addr.connect().await?);
    let records = c
        .disk_usage(DiskUsageRequest {
            filter: args.filter.clone(),
            ..Default::default()
        })
        .await
        .context("disk usage")?
        .into_inner()
        .record;
    if args.verbose {
        print_verbose(&records);
    } else {
        print_table(&records);
    }
    let total: i64 = records.iter().map(|r| r.size).sum();
    let reclaimable: i64 = records.iter().filter(|r| !r.in_use).map(|r| r.size).sum();
    let shared: i64 = records.iter().filter(|r| r.shared).map(|r| r.size).sum();
    if shared > 0 {
        println!("Shared:\t\t{}", human_size(shared));
        println!("Private:\t{}", human_size(total - shared));
    }
    println!("Reclaimable:\t{}", human_size(reclaimable));
    println!("Total:\t\t{}", human_size(total));
    Ok(())
}

pub async fn prune(addr: &crate::Daemon, args: PruneArgs) -> anyhow::Result<()> {
    let mut c = ControlClient::new(addr.connect().await?);
    let keep_duration = match args.keep_duration {
        Some(d) => i64::try_from(d.as_nanos()).context("keep-duration too long")?,
        None => 0,
    };
    let mut stream = c
        .prune(PruneRequest {
            all: args.all,
            keep_duration,
            filter: args.filter.clone(),
            reserved_space: args.keep_storage.unwrap_or(0),
            ..Default::default()
        })
        .await
        .context("prune")?
        .into_inner();
    let mut removed = Vec::new();
    while let Some(r) = stream.message().await.context("prune")? {
        removed.push(r);
    }
    if args.verbose {
        print_verbose(&removed);
    } else if !removed.is_empty() {
        print_table(&removed);
    }
    println!(
        "Total:\t{}",
        human_size(removed.iter().map(|r| r.size).sum())
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_read_like_buildctl() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("48h"), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("2d").is_err(), "not a Go duration");
        assert!(parse_duration("3w").is_err());
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(12_300_000), "12.3MB");
        assert_eq!(human_size(2_000), "2kB");
        assert_eq!(parse_storage("10"), Ok(10_000_000));
        assert_eq!(parse_storage("2GB"), Ok(2 << 30));
        assert_eq!(parse_storage("1MiB"), Ok(1 << 20));
        assert!(parse_storage("lots").is_err());
    }
}
