//! The farm's benchmarks on real processes (`bench/farm/run.sh` runs them in
//! release mode; ignored in `make test`):
//! - the 12-stage graph (each stage `sleep 2` and a CPU-bound part) on 1, 2
//!   and 3 workers with 2 step slots each, cold every time (`--no-cache`, and
//!   every RUN's placement is checked in the progress);
//! - a 1 GiB snapshot moved between two workers (its producer constrained to
//!   one worker's label, its consumer to the other's), against the raw TCP
//!   throughput of the same link (loopback) measured in the same run.

use kiln_integration_tests::farm::{
    Farm, ProcessFarm, busybox, constrained_exec, finished, placements,
};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn reps() -> usize {
    std::env::var("BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn twelve_stages() -> String {
    let mut d = String::new();
    for i in 0..12 {
        // CPU-bound: hashing 64 MiB (0.2-0.9 s of one core, by machine)
        d.push_str(&format!(
            "FROM busybox AS s{i}\nRUN sleep 2 && head -c 67108864 /dev/zero | sha256sum > /out{i}\n"
        ));
    }
    d.push_str("FROM busybox\n");
    for i in 0..12 {
        d.push_str(&format!("COPY --from=s{i} /out{i} /out/\n"));
    }
    d
}

#[test]
#[ignore = "a benchmark: bench/farm/run.sh"]
fn bench_twelve_stages_on_one_two_and_three_workers() {
    let ctx = tempfile::tempdir().expect("tempdir");
    std::fs::write(ctx.path().join("Dockerfile"), twelve_stages()).expect("Dockerfile");
    let mut times: Vec<Vec<f64>> = vec![vec![]; 3];
    let farms: Vec<ProcessFarm> = (1..=3)
        .map(|n| {
            let flags: Vec<&[&str]> = (0..n).map(|_| &[][..]).collect();
            ProcessFarm::start(&flags, "").expect("farm")
        })
        .collect();
    // the base image is pulled once per farm, untimed
    for f in &farms {
        finished(f.spawn_build(ctx.path(), &[]).expect("prime"), f).expect("prime");
    }
    for _ in 0..reps() {
        for (n, f) in farms.iter().enumerate() {
            let t = Instant::now();
            let progress = finished(
                f.spawn_build(ctx.path(), &["--no-cache"]).expect("build"),
                f,
            )
            .expect("build");
            let secs = t.elapsed().as_secs_f64();
            let runs = placements(&progress)
                .iter()
                .filter(|(name, _)| name.contains(" RUN "))
                .count();
            // one worker shows no placements: check it ran every step instead
            let ran = if n == 0 {
                progress.matches("RUN sleep 2").count() >= 12 && !progress.contains("CACHED")
            } else {
                runs == 12
            };
            assert!(ran, "a cold build runs all 12 stages:\n{progress}");
            times[n].push(secs);
        }
    }
    let t1 = median(times[0].clone());
    // every worker here shares this machine's cores: the stages' CPU parts of
    // one wave share them too, which N hosts would not
    let cpu = stage_alone_seconds(&farms[0]) - 2.0;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let ideal = |workers: usize| -> f64 {
        let slots = 2 * workers;
        let waves = 12_usize.div_ceil(slots);
        (0..waves)
            .map(|w| {
                let running = (12 - w * slots).min(slots) as f64;
                2.0 + cpu * (running / cores).max(1.0)
            })
            .sum()
    };
    println!(
        "| one stage alone, past its `sleep 2` (a RUN with nothing beside it): {cpu:.2} s; {cores} cores shared by every worker of a farm |"
    );
    println!();
    println!(
        "| workers | median s (min–max) | speedup | target (0.8·N) | ideal s on this machine (no overhead) | speedup ceiling here |"
    );
    println!("|---|---|---|---|---|---|");
    for (n, t) in times.iter().enumerate() {
        let m = median(t.clone());
        let (lo, hi) = (
            t.iter().cloned().fold(f64::MAX, f64::min),
            t.iter().cloned().fold(0.0, f64::max),
        );
        let speedup = t1 / m;
        let target = 0.8 * (n + 1) as f64;
        println!(
            "| {} | {m:.2} ({lo:.2}–{hi:.2}) | {speedup:.2}× | {target:.1}× {} | {:.2} | {:.2}× |",
            n + 1,
            if speedup >= target { "✅" } else { "❌" },
            ideal(n + 1),
            ideal(1) / ideal(n + 1),
        );
    }
}

/// Seconds one stage's RUN takes with nothing beside it on `farm` (its
/// container, `sleep 2` and CPU part; median of 3 cold runs).
fn stage_alone_seconds(farm: &ProcessFarm) -> f64 {
    let ctx = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nRUN sleep 2 && head -c 67108864 /dev/zero | sha256sum > /out\n",
    )
    .expect("Dockerfile");
    let times = (0..3)
        .map(|_| {
            let progress = finished(
                farm.spawn_build(ctx.path(), &["--no-cache"])
                    .expect("build"),
                farm,
            )
            .expect("build");
            let n = kiln_integration_tests::step_number(&progress, "RUN sleep 2").expect("the RUN");
            progress
                .lines()
                .find_map(|l| {
                    l.strip_prefix(&format!("#{n} DONE "))?
                        .strip_suffix('s')?
                        .parse()
                        .ok()
                })
                .unwrap_or_else(|| panic!("no DONE time for #{n}:\n{progress}"))
        })
        .collect();
    median(times)
}

/// `s` without terminal colour escapes (kilnd's log lines carry them).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Bytes per second of one TCP stream over loopback.
fn raw_loopback(bytes: usize) -> f64 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        while n < bytes {
            let k = s.read(&mut buf).expect("read");
            if k == 0 {
                break;
            }
            n += k;
        }
        n
    });
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let chunk = vec![7u8; 1 << 20];
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&chunk).expect("write");
        sent += chunk.len();
    }
    drop(s);
    let got = reader.join().expect("reader");
    got as f64 / t.elapsed().as_secs_f64()
}

/// Bytes per second of writing `bytes` of random data into a new file under
/// `dir` (the page cache and the disk under it, as an import's unpacking
/// writes): the floor of any move that lands the bytes on the worker.
fn raw_disk_write(dir: &std::path::Path, bytes: usize) -> f64 {
    use std::io::{Read, Write};
    let mut chunk = vec![0u8; 1 << 20];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut chunk))
        .expect("random");
    let path = dir.join("disk-write-probe");
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).expect("create");
    let mut written = 0;
    while written < bytes {
        f.write_all(&chunk).expect("write");
        written += chunk.len();
    }
    drop(f);
    let rate = written as f64 / t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    rate
}

#[test]
#[ignore = "a benchmark: bench/farm/run.sh"]
fn bench_one_gib_snapshot_between_two_workers() {
    use kiln_proto::pb;
    use prost::Message;
    let farm = ProcessFarm::start(
        &[
            &["--oci-worker-labels", "zone=a"],
            &["--oci-worker-labels", "zone=b"],
        ],
        "",
    )
    .expect("farm");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rows = Vec::new();
    for rep in 0..reps() {
        let mut b = kiln_llb::DefinitionBuilder::new();
        let image = busybox(&mut b);
        // 1 GiB of incompressible bytes, made on zone a (a new nonce each rep)
        let big = constrained_exec(
            &mut b,
            image.clone(),
            "a",
            &format!(
                "head -c 1073741824 /dev/urandom > /big # {rep}-{}",
                std::process::id()
            ),
            vec![],
            vec![],
        );
        // read on zone b: the snapshot moves from a to b
        let mount = pb::Mount {
            input: 1,
            dest: "/in".into(),
            output: -1,
            readonly: true,
            ..Default::default()
        };
        let read = constrained_exec(&mut b, image, "b", "wc -c /in/big", vec![mount], vec![big]);
        let def = b.finish(Some(read)).encode_to_vec();
        let progress = farm.build_definition(dir.path(), &def).expect("build");
        assert!(progress.contains("1073741824"), "{progress}");
        // the importing worker logs the import's figures
        std::thread::sleep(Duration::from_millis(200));
        let log = strip_ansi(&std::fs::read_to_string(&farm.workers[1].log).expect("log"));
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("imported") && l.contains("bytes=10737"))
            .unwrap_or_else(|| panic!("no import logged:\n{log}"))
            .to_string();
        let field = |k: &str| -> f64 {
            let i = line.find(&format!("{k}=")).expect("field") + k.len() + 1;
            line[i..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|v| v.parse().ok())
                .expect("number")
        };
        let (bytes, total, holder, fetch) = (
            field("bytes"),
            field("total_ms") / 1e3,
            field("holder_layers_ms") / 1e3,
            field("fetch_ms") / 1e3,
        );
        let raw = raw_loopback(1 << 30);
        let disk = raw_disk_write(&farm.workers[1].root, 1 << 30);
        rows.push((bytes, total, holder, fetch, raw, disk));
    }
    println!(
        "| rep | moved | import total | holder hashes its layer | fetch (streamed, verified, unpacked) | import rate | raw loopback | ratio (target ≥ 0.7) | writing 1 GiB to the worker's disk | import / disk |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (i, (bytes, total, holder, fetch, raw, disk)) in rows.iter().enumerate() {
        let rate = bytes / total;
        println!(
            "| {} | {:.0} MiB | {total:.2} s | {holder:.2} s | {fetch:.2} s | {:.0} MiB/s | {:.0} MiB/s | {:.2} (fetch alone {:.2}) | {:.0} MiB/s | {:.2} |",
            i + 1,
            bytes / 1048576.0,
            rate / 1048576.0,
            raw / 1048576.0,
            rate / raw,
            (bytes / fetch) / raw,
            disk / 1048576.0,
            rate / disk,
        );
    }
}
