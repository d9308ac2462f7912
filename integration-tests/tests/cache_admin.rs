//! Managing and observing the build cache: `kiln du` filters and sizes that
//! add up to the disk, cache mounts in du and prune, `kiln prune
//! --keep-storage/--filter`, GC policies from kilnd.toml, `max-parallelism`,
//! build history and `kiln build --explain-cache`.

use kiln_integration_tests::{
    BuildContext, Daemon, Restartable, Topology, dockerfile_args, is_cached, parse_size,
    step_number,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `kiln ARGS`, which must succeed; returns stdout.
fn kiln_ok(d: &Daemon, cwd: &Path, args: &[&str]) -> String {
    let out = d.kiln(cwd, args).expect("run kiln");
    assert!(
        out.status.success(),
        "kiln {args:?} failed:\n{}\n--- daemon logs ---\n{}",
        text(&out),
        d.logs()
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `kiln build --progress plain` with the dockerfile flags; returns stderr.
fn build(d: &Daemon, ctx: &Path, extra: &[&str]) -> String {
    let mut args = dockerfile_args();
    args.extend_from_slice(extra);
    let out = d.build(ctx, &args).expect("build");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn worker_root(d: &Daemon) -> PathBuf {
    d.dir.path().join("root/all/worker")
}

fn du_total(listing: &str) -> f64 {
    du_line(listing, "Total:")
}

/// The size on `kiln du`'s line starting with `label`.
fn du_line(listing: &str, label: &str) -> f64 {
    let v = listing
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label} in:\n{listing}"));
    parse_size(v.trim())
}

/// Table rows of `kiln du` (between the header and the summary lines).
fn rows(listing: &str) -> Vec<String> {
    listing
        .lines()
        .skip(1)
        .take_while(|l| {
            !["Shared:", "Private:", "Reclaimable:", "Total:"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(str::to_string)
        .collect()
}

/// Allocated bytes under `dirs` (as `du -s --block-size=1`).
fn disk_bytes(dirs: &[PathBuf]) -> f64 {
    dirs.iter()
        .filter(|d| d.exists())
        .map(|d| {
            let out = Command::new("du")
                .arg("-s")
                .arg("--block-size=1")
                .arg(d)
                .output()
                .expect("du");
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<f64>().ok())
                .expect("du size")
        })
        .sum()
}

fn store_dirs(d: &Daemon) -> Vec<PathBuf> {
    ["snapshots", "content", "cache-mounts"]
        .iter()
        .map(|s| worker_root(d).join(s))
        .collect()
}

#[test]
fn du_counts_cache_mounts_filters_records_and_adds_up_to_the_disk() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let c = BuildContext::new(
        "FROM busybox\nRUN --mount=type=cache,target=/cache head -c 200000 /dev/urandom > /cache/blob\nRUN head -c 300000 /dev/zero > /big\n",
    )
    .expect("ctx");
    build(&d, c.path(), &[]);
    let all = kiln_ok(&d, c.path(), &["du"]);
    let on_disk = disk_bytes(&store_dirs(&d));
    let listed = du_total(&all);
    assert!(
        (listed - on_disk).abs() <= on_disk * 0.01,
        "kiln du total {listed} vs {on_disk} bytes on disk:\n{all}"
    );
    // the cache mount is a record of its own type
    let mounts = kiln_ok(&d, c.path(), &["du", "--filter", "type==exec.cachemount"]);
    let mount_rows = rows(&mounts);
    assert_eq!(mount_rows.len(), 1, "{mounts}");
    assert!(mount_rows[0].contains("kB"), "200 kB of cache: {mounts}");
    let verbose = kiln_ok(
        &d,
        c.path(),
        &["du", "--verbose", "--filter", "type==exec.cachemount"],
    );
    assert!(
        verbose.contains("exec.cachemount") && verbose.contains("/cache\""),
        "{verbose}"
    );
    // the other filters select among the rest
    let regular = kiln_ok(&d, c.path(), &["du", "--filter", "type==regular"]);
    assert!(!regular.contains("cachemount"), "{regular}");
    assert!(rows(&regular).len() >= 2, "{regular}");
    let by_desc = kiln_ok(
        &d,
        c.path(),
        &["du", "--filter", "description~=head -c 300000"],
    );
    assert_eq!(rows(&by_desc).len(), 1, "{by_desc}");
    let id = rows(&by_desc)[0]
        .split_whitespace()
        .next()
        .expect("id")
        .to_string();
    let by_id = kiln_ok(&d, c.path(), &["du", "--filter", &format!("id=={id}")]);
    assert_eq!(rows(&by_id), rows(&by_desc), "{by_id}");
    let bad = d
        .kiln(c.path(), &["du", "--filter", "colour==red"])
        .expect("kiln");
    assert!(!bad.status.success(), "{}", text(&bad));
    // prune only the cache mounts: the mount's dir goes, the records stay
    let pruned = kiln_ok(
        &d,
        c.path(),
        &["prune", "--filter", "type==exec.cachemount"],
    );
    assert_eq!(rows(&pruned).len(), 1, "{pruned}");
    let left = kiln_ok(&d, c.path(), &["du"]);
    assert!(!left.contains("cachemount:"), "{left}");
    assert_eq!(
        std::fs::read_dir(worker_root(&d).join("cache-mounts"))
            .map(|r| r.count())
            .unwrap_or(0),
        0
    );
    let again = build(&d, c.path(), &[]);
    assert!(is_cached(&again, "head -c 300000"), "{again}");
    // a plain prune removes everything, cache mounts included
    build(
        &d,
        c.path(),
        &["--no-cache", "--output", "type=local,dest=out"],
    );
    kiln_ok(&d, c.path(), &["prune"]);
    let empty = kiln_ok(&d, c.path(), &["du"]);
    assert!(rows(&empty).is_empty(), "{empty}");
    assert!(disk_bytes(&[worker_root(&d).join("cache-mounts")]) < 10_000.0);
}

#[test]
fn prune_keep_storage_removes_least_recently_used_first() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    // one context, two Dockerfiles
    let ctx = BuildContext::new("").expect("ctx");
    ctx.file(
        "a.Dockerfile",
        "FROM busybox\nRUN head -c 500000 /dev/zero > /a\n",
    )
    .expect("write");
    ctx.file(
        "b.Dockerfile",
        "FROM busybox\nRUN head -c 500001 /dev/zero > /b\n",
    )
    .expect("write");
    let (a, b) = (&ctx, &ctx);
    let fa = ["--opt", "filename=a.Dockerfile"];
    let fb = ["--opt", "filename=b.Dockerfile"];
    build(&d, a.path(), &fa);
    build(&d, b.path(), &fb);
    let total = du_total(&kiln_ok(&d, a.path(), &["du"]));
    // room for everything but a's RUN
    let limit = (total - 300_000.0) as i64;
    let pruned = kiln_ok(
        &d,
        a.path(),
        &["prune", "--keep-storage", &format!("{limit}B")],
    );
    assert!(!rows(&pruned).is_empty(), "{pruned}");
    let after = kiln_ok(&d, a.path(), &["du"]);
    assert!(
        du_total(&after) <= limit as f64,
        "under {limit} after prune:\n{after}"
    );
    let rb = build(&d, b.path(), &fb);
    assert!(
        is_cached(&rb, "head -c 500001"),
        "the recent build stays:\n{rb}"
    );
    let ra = build(&d, a.path(), &fa);
    assert!(
        !is_cached(&ra, "head -c 500000"),
        "the least recently used RUN went:\n{ra}"
    );
    // a limit above the total prunes nothing
    let none = kiln_ok(&d, a.path(), &["prune", "--keep-storage", "10GB"]);
    assert!(rows(&none).is_empty(), "{none}");
}

/// du total of the store after one `RUN head -c 500000` build.
fn one_build_size() -> f64 {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let c = BuildContext::new("FROM busybox\nRUN head -c 500000 /dev/zero > /f0\n").expect("ctx");
    build(&d, c.path(), &[]);
    du_total(&kiln_ok(&d, c.path(), &["du"]))
}

#[test]
fn gc_policy_keeps_the_store_under_its_limit() {
    let one = one_build_size();
    let limit = (one + 400_000.0) as i64;
    let d = Daemon::start_with_config(
        Topology::AllInOne,
        &format!("[worker.oci]\ngc = true\n[[worker.oci.gcpolicy]]\nall = true\nkeepBytes = \"{limit}B\"\n"),
    )
    .expect("daemon");
    // one context, a Dockerfile per build
    let c = BuildContext::new("").expect("ctx");
    let i = 4;
    let file = |i: usize| format!("filename={i}.Dockerfile");
    for i in 1..=i {
        c.file(
            &format!("{i}.Dockerfile"),
            &format!("FROM busybox\nRUN head -c 500000 /dev/zero > /f{i} && echo {i} > /n\n"),
        )
        .expect("write");
        build(&d, c.path(), &["--opt", &file(i)]);
    }
    // GC runs after each build, in the background
    let start = Instant::now();
    let mut listing = kiln_ok(&d, c.path(), &["du"]);
    while du_total(&listing) > limit as f64 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "store still over {limit}:\n{listing}\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
        listing = kiln_ok(&d, c.path(), &["du"]);
    }
    assert!(
        du_total(&listing) > one * 0.5,
        "the latest build's results are kept:\n{listing}"
    );
    let again = build(
        &d,
        c.path(),
        &["--opt", &file(i), "--output", "type=local,dest=out"],
    );
    assert!(
        is_cached(&again, &format!("echo {i}")),
        "latest build still cached:\n{again}"
    );
    assert_eq!(
        std::fs::read_to_string(c.path().join("out/n")).expect("read"),
        format!("{i}\n")
    );
    assert_eq!(
        std::fs::metadata(c.path().join(format!("out/f{i}")))
            .expect("f")
            .len(),
        500_000
    );
}

#[test]
fn max_parallelism_one_runs_one_step_at_a_time() {
    let d = Daemon::start_with_config(Topology::AllInOne, "[worker.oci]\nmax-parallelism = 1\n")
        .expect("daemon");
    // three independent stages; each step appends start and end markers to
    // a log in a shared cache mount
    let step = |name: &str| {
        format!(
            "FROM busybox AS {name}\nRUN --mount=type=cache,id=plog,target=/m,sharing=shared echo start-{name} >> /m/log && sleep 1 && echo end-{name} >> /m/log && touch /done-{name}\n"
        )
    };
    let c = BuildContext::new(&format!(
        "{}{}{}FROM busybox\nCOPY --from=a /done-a /\nCOPY --from=b /done-b /\nCOPY --from=c /done-c /\nRUN --mount=type=cache,id=plog,target=/m,sharing=shared cp /m/log /log\n",
        step("a"),
        step("b"),
        step("c")
    ))
    .expect("ctx");
    build(&d, c.path(), &["--output", "type=local,dest=out"]);
    let log = std::fs::read_to_string(c.path().join("out/log")).expect("log");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 6, "three steps ran:\n{log}");
    for pair in lines.chunks(2) {
        let (s, e) = (pair[0], pair[1]);
        assert!(
            s.strip_prefix("start-").is_some()
                && e.strip_prefix("end-") == s.strip_prefix("start-"),
            "steps overlapped (max-parallelism = 1):\n{log}"
        );
    }
}

/// `kiln build --explain-cache` with the dockerfile flags; returns stderr.
fn explain_build(d: &Daemon, ctx: &Path, extra: &[&str]) -> String {
    let mut args = vec!["--explain-cache"];
    args.extend_from_slice(extra);
    build(d, ctx, &args)
}

/// The `Cache misses:` section `--explain-cache` prints.
fn misses(stderr: &str) -> String {
    stderr
        .split_once("Cache misses:")
        .map(|(_, m)| m.to_string())
        .unwrap_or_else(|| panic!("no explanation in:\n{stderr}"))
}

#[test]
fn explain_cache_names_the_changed_file_mode_build_arg_and_base_digest() {
    use std::os::unix::fs::PermissionsExt;
    let reg = kiln_integration_tests::registry();
    // a base image of our own, so its digest can change under the same tag
    let repo = format!("library/explain-base-{}", std::process::id());
    let copy = |format: &str| {
        let st = Command::new("skopeo")
            .args([
                "copy",
                "-q",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
            ])
            .args(["--format", format])
            .arg(format!("docker://{reg}/library/busybox:latest"))
            .arg(format!("docker://{reg}/{repo}:latest"))
            .status()
            .expect("skopeo");
        assert!(st.success(), "skopeo copy");
    };
    copy("oci");
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let name = repo.trim_start_matches("library/");
    let c = BuildContext::new(&format!(
        "FROM {name}\nARG GREETING=hi\nCOPY a.txt b.txt /\nRUN echo $GREETING > /greeting && cat /a.txt /b.txt\n"
    ))
    .expect("ctx");
    c.file("a.txt", "a\n").expect("write");
    c.file("b.txt", "b\n").expect("write");
    c.file("unread.txt", "u\n").expect("write");
    let greet = ["--opt", "build-arg:GREETING=hello"];
    let first = explain_build(&d, c.path(), &greet);
    assert!(
        misses(&first).contains("no earlier run of this step is recorded"),
        "{first}"
    );
    // nothing changed: every step cached
    let same = explain_build(&d, c.path(), &greet);
    assert!(same.contains("Cache misses: none"), "{same}");
    // a file the COPY reads: content
    c.file("a.txt", "A!\n").expect("write");
    let content = misses(&explain_build(&d, c.path(), &greet));
    assert!(
        content.contains("file a.txt (context): content changed"),
        "{content}"
    );
    assert!(!content.contains("file b.txt"), "{content}");
    assert!(
        content.contains("input \"[2/3] COPY a.txt b.txt /\" changed: file a.txt"),
        "the RUN names the COPY and why it ran:\n{content}"
    );
    // mode
    std::fs::set_permissions(
        c.path().join("b.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    let mode = misses(&explain_build(&d, c.path(), &greet));
    assert!(
        mode.contains("file b.txt (context): mode changed: 644 -> 600"),
        "{mode}"
    );
    assert!(!mode.contains("content changed"), "{mode}");
    // a build arg
    let arg = misses(&explain_build(
        &d,
        c.path(),
        &["--opt", "build-arg:GREETING=bye"],
    ));
    assert!(
        arg.contains("build arg GREETING changed: \"hello\" -> \"bye\""),
        "{arg}"
    );
    assert!(
        !arg.contains("COPY a.txt b.txt /\n"),
        "the COPY stayed cached:\n{arg}"
    );
    // the base image's digest
    copy("v2s2");
    let base = misses(&explain_build(
        &d,
        c.path(),
        &["--opt", "build-arg:GREETING=bye"],
    ));
    assert!(
        base.contains(&format!(
            "base image docker.io/{repo}:latest digest changed: sha256:"
        )),
        "{base}"
    );
}

#[test]
fn build_history_lists_builds_with_their_steps_across_a_restart() {
    let mut d = Restartable::start();
    let c = BuildContext::new("").expect("ctx");
    c.file("ok.Dockerfile", "FROM busybox\nRUN echo hist > /h\n")
        .expect("write");
    c.file("bad.Dockerfile", "FROM busybox\nRUN false\n")
        .expect("write");
    let build = |d: &Restartable, file: &str| {
        let mut args = vec!["build", "--progress", "plain"];
        args.extend(dockerfile_args());
        args.extend(["--opt", file]);
        d.kiln(c.path(), &args).output().expect("kiln")
    };
    for _ in 0..2 {
        let out = build(&d, "filename=ok.Dockerfile");
        assert!(out.status.success(), "{}", text(&out));
    }
    let bad = build(&d, "filename=bad.Dockerfile");
    assert!(!bad.status.success());
    d.restart(false);
    let out = d
        .kiln(c.path(), &["debug", "histories"])
        .output()
        .expect("kiln");
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    let rows: Vec<Vec<String>> = listing
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    assert_eq!(rows.len(), 3, "{listing}");
    // newest first: REF STARTED DURATION STATUS STEPS CACHED FAILED
    let col = |r: &[String], i: usize| r.get(i).cloned().unwrap_or_default();
    assert_eq!(col(&rows[0], 3), "Error", "{listing}");
    assert_eq!(col(&rows[0], 6), "1", "one failed step:\n{listing}");
    assert_eq!(col(&rows[1], 3), "Completed", "{listing}");
    let cached = |r: &[String]| col(r, 5).parse::<u32>().expect("cached");
    let total = |r: &[String]| col(r, 4).parse::<u32>().expect("steps");
    assert!(cached(&rows[1]) >= 2, "the rebuild was cached:\n{listing}");
    assert!(
        cached(&rows[2]) < total(&rows[2]) && cached(&rows[2]) < cached(&rows[1]),
        "{listing}"
    );
    let detail = |r: &str| {
        let out = d
            .kiln(c.path(), &["debug", "history", r])
            .output()
            .expect("kiln");
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let second = detail(&col(&rows[1], 0));
    // kiln runs the frontend through LLBBridge; the history still names it
    assert!(second.contains("Frontend:\tdockerfile.v0"), "{second}");
    assert!(
        second
            .lines()
            .any(|l| l.contains("RUN echo hist") && l.ends_with("CACHED")),
        "{second}"
    );
    let first = detail(&col(&rows[2], 0));
    assert!(
        first
            .lines()
            .any(|l| l.contains("RUN echo hist") && l.contains("DONE")),
        "{first}"
    );
    let failed = detail(&col(&rows[0], 0));
    assert!(
        failed
            .lines()
            .any(|l| l.contains("RUN false") && l.contains("ERROR")),
        "{failed}"
    );
    let unknown = d
        .kiln(c.path(), &["debug", "history", "nope"])
        .output()
        .expect("kiln");
    assert!(!unknown.status.success());
}

#[test]
fn ten_concurrent_identical_builds_run_the_step_once() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let c =
        BuildContext::new("FROM busybox\nRUN sleep 1 && echo ten-way-$((40+2))\n").expect("ctx");
    // pull the base first so every build reaches the RUN together
    build(
        &d,
        BuildContext::new("FROM busybox\nRUN true\n")
            .expect("ctx")
            .path(),
        &[],
    );
    let mut args: Vec<&str> = vec!["build", "--progress", "plain"];
    args.extend(dockerfile_args());
    let outs: Vec<Output> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..10)
            .map(|_| s.spawn(|| d.kiln(c.path(), &args).expect("kiln")))
            .collect();
        hs.into_iter().map(|h| h.join().expect("join")).collect()
    });
    for o in &outs {
        assert!(o.status.success(), "{}\n{}", text(o), d.logs());
    }
    let ran = outs
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.stderr).contains("ten-way-42"))
        .count();
    assert_eq!(ran, 1, "exactly one build ran the step");
}

/// `FROM busybox` and `RUN echo N >> /f` for N in 1..=n: a chain of n steps,
/// each result the parent of the next.
fn chain_dockerfile(n: usize) -> String {
    let mut df = String::from("FROM busybox\n");
    for i in 1..=n {
        df.push_str(&format!("RUN echo {i} >> /f\n"));
    }
    df
}

/// How many of the chain's `RUN echo N` steps ran (done, not CACHED).
fn chain_steps_ran(progress: &str, n: usize) -> usize {
    (1..=n)
        .filter(|i| {
            let Some(num) = step_number(progress, &format!("RUN echo {i} >> /f")) else {
                return false;
            };
            let done = format!("#{num} DONE");
            !is_cached(progress, &format!("RUN echo {i} >> /f"))
                && progress.lines().any(|l| l.starts_with(&done))
        })
        .count()
}

/// Sum of the sizes in `kiln du`'s `Reclaimable:` line.
fn du_reclaimable(listing: &str) -> f64 {
    du_line(listing, "Reclaimable:")
}

#[test]
fn prune_all_empties_a_fifty_step_chain_in_one_call() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let c = BuildContext::new(&chain_dockerfile(50)).expect("ctx");
    let first = build(&d, c.path(), &[]);
    assert_eq!(chain_steps_ran(&first, 50), 50, "{first}");
    kiln_ok(&d, c.path(), &["prune", "--all"]);
    let left = kiln_ok(&d, c.path(), &["du"]);
    assert!(rows(&left).is_empty(), "one prune --all left:\n{left}");
    assert_eq!(du_reclaimable(&left), 0.0, "{left}");
    assert_eq!(du_total(&left), 0.0, "{left}");
    let again = build(&d, c.path(), &["--output", "type=local,dest=out"]);
    assert_eq!(
        chain_steps_ran(&again, 50),
        50,
        "the rebuild after prune --all runs every step:\n{again}"
    );
    let want: String = (1..=50).map(|i| format!("{i}\n")).collect();
    assert_eq!(
        std::fs::read_to_string(c.path().join("out/f")).expect("read"),
        want
    );
}

/// Processes whose command line is exactly `args`.
fn processes(args: &[&str]) -> usize {
    let want: Vec<u8> = args
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn prune_all_while_a_build_runs_keeps_what_it_uses() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let c = BuildContext::new("").expect("ctx");
    c.file("chain.Dockerfile", &chain_dockerfile(5))
        .expect("write");
    c.file(
        "slow.Dockerfile",
        &format!("{}RUN sleep 5.5 && cat /f > /g\n", chain_dockerfile(5)),
    )
    .expect("write");
    let chain = ["--opt", "filename=chain.Dockerfile"];
    build(&d, c.path(), &chain);
    std::thread::scope(|s| {
        let slow = s.spawn(|| {
            build(
                &d,
                c.path(),
                &[
                    "--opt",
                    "filename=slow.Dockerfile",
                    "--output",
                    "type=local,dest=out",
                ],
            )
        });
        let start = Instant::now();
        while processes(&["sleep", "5.5"]) == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the slow step never started:\n{}",
                d.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        kiln_ok(&d, c.path(), &["prune", "--all"]);
        let slow = slow.join().expect("slow build");
        assert_eq!(chain_steps_ran(&slow, 5), 0, "{slow}");
    });
    let want: String = (1..=5).map(|i| format!("{i}\n")).collect();
    assert_eq!(
        std::fs::read_to_string(c.path().join("out/g")).expect("read"),
        want,
        "the running build read the chain it was using"
    );
    // what the running build used stayed cached
    let again = build(&d, c.path(), &chain);
    assert_eq!(chain_steps_ran(&again, 5), 0, "{again}");
}

/// Steps after `FROM` that plain progress shows CACHED.
fn cached_steps(progress: &str) -> Vec<String> {
    progress
        .lines()
        .filter_map(|l| l.strip_prefix('#')?.strip_suffix(" CACHED"))
        .filter_map(|n| {
            let head = format!("#{n} [");
            progress.lines().find(|l| l.starts_with(&head))
        })
        .filter(|l| !l.contains(" FROM "))
        .map(str::to_string)
        .collect()
}

#[test]
fn sixteen_concurrent_distinct_builds_after_a_prune_each_run_and_output_their_own() {
    const BUILDS: usize = 16;
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    // the base pulled, then the cache emptied, as a daemon that has built before
    build(
        &d,
        BuildContext::new("FROM busybox\nRUN true\n")
            .expect("ctx")
            .path(),
        &[],
    );
    kiln_ok(&d, Path::new("/"), &["prune", "--all"]);
    let ctxs: Vec<BuildContext> = (0..BUILDS)
        .map(|i| {
            let c = BuildContext::new(
                "FROM busybox\nCOPY src/ /src/\nRUN cat /src/* > /all && sleep 0.2\n\
                 RUN wc -l < /all > /lines\n",
            )
            .expect("ctx");
            c.file("src/a", &format!("build {i}\n")).expect("write");
            c.file("src/b", &format!("second file of {i}\n"))
                .expect("write");
            c
        })
        .collect();
    let started = Instant::now();
    let outs: Vec<Output> = std::thread::scope(|s| {
        let hs: Vec<_> = ctxs
            .iter()
            .map(|c| {
                let d = &d;
                s.spawn(move || {
                    let mut args: Vec<&str> = vec!["build", "--progress", "plain"];
                    args.extend(dockerfile_args());
                    args.extend(["--output", "type=local,dest=out"]);
                    d.kiln(c.path(), &args).expect("kiln")
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("join")).collect()
    });
    let took = started.elapsed();
    for (i, (o, c)) in outs.iter().zip(&ctxs).enumerate() {
        let progress = text(o);
        assert!(o.status.success(), "build {i}: {progress}\n{}", d.logs());
        let cached = cached_steps(&progress);
        assert!(cached.is_empty(), "build {i} found {cached:?} CACHED");
        let all = std::fs::read_to_string(c.path().join("out/all")).expect("out/all");
        assert_eq!(all, format!("build {i}\nsecond file of {i}\n"), "build {i}");
        let lines = std::fs::read_to_string(c.path().join("out/lines")).expect("out/lines");
        assert_eq!(lines.trim(), "2", "build {i}");
    }
    eprintln!("{BUILDS} concurrent distinct builds took {took:?}");
}
