//! The build cache end to end: persistence across daemon restarts and
//! crashes, content checksums of only the paths a step reads, deduplication
//! of concurrent builds, and `kiln du` / `kiln prune`.

use kiln_integration_tests::{
    BuildContext, Restartable as Kilnd, dockerfile_args, is_cached, parse_size, step_number,
};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Snapshots in the worker's store.
fn snapshots(d: &Kilnd) -> usize {
    std::fs::read_dir(d.root().join("worker/snapshots"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn out_arg(dir: &Path) -> String {
    format!("type=local,dest={}", dir.display())
}

#[test]
fn cache_survives_a_daemon_restart() {
    let mut d = Kilnd::start();
    let c = BuildContext::new(
        "FROM busybox\nCOPY a.txt /a.txt\nRUN cat /a.txt > /b.txt && echo restart-step-$((40+2))\n",
    )
    .expect("ctx");
    c.file("a.txt", "one\n").expect("write");
    let outs = tempfile::tempdir().expect("tmp");
    let first = d.build(c.path(), &["--output", &out_arg(&outs.path().join("1"))]);
    assert!(first.contains("restart-step-42"), "{first}");
    d.restart(true);
    let second = d.build(c.path(), &["--output", &out_arg(&outs.path().join("2"))]);
    for step in ["FROM", "COPY", "RUN"] {
        assert!(
            is_cached(&second, step),
            "{step} cached after a restart:\n{second}"
        );
    }
    assert!(!second.contains("restart-step-42"), "{second}");
    assert_eq!(
        std::fs::read_to_string(outs.path().join("2/b.txt")).expect("read"),
        "one\n"
    );
}

#[test]
fn kill_9_during_a_run_then_restart_reruns_the_interrupted_step() {
    let mut d = Kilnd::start();
    let c = BuildContext::new("FROM busybox\nRUN echo before > /before\nRUN sleep 5 && echo done > /slow && echo slow-step-$((40+2))\n").expect("ctx");
    // warm the base and the first RUN, so only the slow RUN is in flight at the kill
    let warm = BuildContext::new("FROM busybox\nRUN echo before > /before\n").expect("ctx");
    d.build(warm.path(), &[]);
    let mut args = vec!["build", "--progress", "plain"];
    args.extend(dockerfile_args());
    let client = d
        .kiln(c.path(), &args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln");
    // wait until the slow RUN runs
    let start = Instant::now();
    let running = d.root().join("worker/staging");
    loop {
        let staged = std::fs::read_dir(&running).map(|r| r.count()).unwrap_or(0);
        if staged > 0 && start.elapsed() > Duration::from_secs(2) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "slow step never started:\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    d.stop(false);
    let out = client.wait_with_output().expect("kiln");
    assert!(!out.status.success(), "the build was interrupted");
    d.spawn();
    let outs = tempfile::tempdir().expect("tmp");
    let again = d.build(c.path(), &["--output", &out_arg(outs.path())]);
    assert!(
        is_cached(&again, "echo before"),
        "the step done before the crash is cached:\n{again}"
    );
    assert!(
        !is_cached(&again, "sleep 5"),
        "the interrupted step runs again:\n{again}"
    );
    assert!(again.contains("slow-step-42"), "{again}");
    assert_eq!(
        std::fs::read_to_string(outs.path().join("slow")).expect("read"),
        "done\n"
    );
    assert_eq!(
        std::fs::read_to_string(outs.path().join("before")).expect("read"),
        "before\n"
    );
    // and the store is consistent: a third build hits everything
    let third = d.build(c.path(), &[]);
    assert!(is_cached(&third, "sleep 5"), "{third}");
}

#[test]
fn changing_a_file_the_copy_does_not_read_keeps_the_copy_cached() {
    let d = Kilnd::start();
    let c = BuildContext::new("FROM busybox\nCOPY a.txt /a.txt\nRUN cat /a.txt > /b.txt && echo copy-consumer-$((40+2))\n").expect("ctx");
    c.file("a.txt", "a\n").expect("write");
    c.file("other.txt", "1\n").expect("write");
    let outs = tempfile::tempdir().expect("tmp");
    let first = d.build(c.path(), &["--output", &out_arg(&outs.path().join("1"))]);
    assert!(first.contains("copy-consumer-42"), "{first}");
    c.file("other.txt", "2\n").expect("write");
    let second = d.build(c.path(), &["--output", &out_arg(&outs.path().join("2"))]);
    assert!(
        is_cached(&second, "COPY"),
        "COPY a.txt cached when other.txt changed:\n{second}"
    );
    assert!(is_cached(&second, "RUN"), "{second}");
    assert!(!second.contains("copy-consumer-42"), "{second}");
    // the mode of the copied file is part of its checksum
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        c.path().join("a.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    let third = d.build(c.path(), &["--output", &out_arg(&outs.path().join("3"))]);
    assert!(
        !is_cached(&third, "COPY"),
        "mode change re-runs the COPY:\n{third}"
    );
    assert_eq!(
        std::fs::read_to_string(outs.path().join("3/b.txt")).expect("read"),
        "a\n"
    );
}

#[test]
fn concurrent_identical_builds_run_the_slow_step_once() {
    let d = Kilnd::start();
    // pull the base first so both builds reach the slow RUN together
    let warm = BuildContext::new("FROM busybox\nRUN true\n").expect("ctx");
    d.build(warm.path(), &[]);
    let c = BuildContext::new("FROM busybox\nRUN sleep 3 && echo shared-step-$((40+2))\n")
        .expect("ctx");
    let mut args = vec!["build", "--progress", "plain"];
    args.extend(dockerfile_args());
    let mut first = d
        .kiln(c.path(), &args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln");
    // The second build starts only once the first one's step is running, so
    // it can neither run the step itself (no in-flight dedup) nor find it
    // finished in the cache (builds serialised) without the test noticing.
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = first.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) if l.contains("RUN sleep 3") => break,
            Ok(_) => {}
            Err(e) => panic!("the first build never started its step ({e})\n{}", d.logs()),
        }
    }
    let second = d.kiln(c.path(), &args).output().expect("kiln");
    let status = first.wait().expect("kiln");
    let e1 = reader.join().expect("reader");
    assert!(status.success(), "first build failed:\n{e1}");
    let e2 = d.check(second, "second build");
    let ran = [&e1, &e2]
        .iter()
        .filter(|e| e.contains("shared-step-42"))
        .count();
    assert_eq!(ran, 1, "exactly one build ran the step:\n{e1}\n----\n{e2}");
    // The second build joined the running step: it waited for it, not for a
    // cache record written after it.
    assert!(
        step_number(&e2, "RUN sleep 3").is_some(),
        "the second build shows the step:\n{e2}"
    );
    assert!(
        !is_cached(&e2, "RUN sleep 3"),
        "the second build found the step cached instead of sharing it:\n{e2}"
    );
}

#[test]
fn du_lists_records_and_prune_empties_them() {
    let d = Kilnd::start();
    let c = BuildContext::new("FROM busybox\nRUN head -c 300000 /dev/zero > /big\n").expect("ctx");
    d.build(c.path(), &[]);
    let du = |d: &Kilnd| {
        let out = d.kiln(c.path(), &["du"]).output().expect("du");
        assert!(
            out.status.success(),
            "du: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let listed = du(&d);
    let rows: Vec<&str> = listed
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("Reclaimable"))
        .collect();
    assert!(rows.len() >= 2, "base and RUN records:\n{listed}");
    assert!(
        listed.lines().next().is_some_and(|h| h.starts_with("ID")
            && h.contains("RECLAIMABLE")
            && h.contains("LAST ACCESSED")),
        "{listed}"
    );
    assert!(
        rows.iter().any(|r| r.contains("kB")),
        "the RUN's 300 kB show up:\n{listed}"
    );
    let before = snapshots(&d);
    assert!(before >= 2);
    // the sizes add up to what the worker holds on disk
    let total = listed
        .lines()
        .find_map(|l| l.strip_prefix("Total:"))
        .expect("total")
        .trim()
        .to_string();
    let on_disk: f64 = ["snapshots", "content"]
        .iter()
        .map(|sub| {
            let out = Command::new("du")
                .arg("-s")
                .arg("--block-size=1")
                .arg(d.root().join("worker").join(sub))
                .output()
                .expect("du");
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<f64>().ok())
                .expect("du size")
        })
        .sum();
    let listed_bytes = parse_size(&total);
    assert!(
        (listed_bytes - on_disk).abs() <= on_disk * 0.01,
        "kiln du total {total} vs {on_disk} bytes on disk:\n{listed}"
    );
    let out = d.kiln(c.path(), &["prune"]).output().expect("prune");
    assert!(
        out.status.success(),
        "prune: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pruned = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(pruned.contains("Total:"), "{pruned}");
    let after = du(&d);
    assert_eq!(
        after
            .lines()
            .skip(1)
            .take_while(|l| !l.starts_with("Reclaimable"))
            .count(),
        0,
        "{after}"
    );
    assert!(after.contains("Total:\t\t0B"), "{after}");
    assert_eq!(snapshots(&d), 0, "the worker removed the snapshots");
    // the next build runs again and is correct
    let again = d.build(c.path(), &[]);
    assert!(!is_cached(&again, "RUN"), "{again}");
}

/// Processes whose command line is exactly `args`.
fn processes(args: &[&str]) -> usize {
    let want: Vec<u8> = args.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
                .count()
        })
        .unwrap_or(0)
}

/// `kiln build` on `d` (in the background) of a step `sleep SECS`, once that step runs.
fn build_sleeping(d: &Kilnd, secs: &str) -> (BuildContext, std::process::Child) {
    let c =
        BuildContext::new(&format!("FROM busybox\nRUN sleep {secs} && echo never\n")).expect("ctx");
    let mut args = vec!["build", "--progress", "plain"];
    args.extend(dockerfile_args());
    let client = d
        .kiln(c.path(), &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kiln");
    let start = Instant::now();
    while processes(&["sleep", secs]) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the step never started:\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (c, client)
}

/// Waits (up to 10 s) until no `sleep SECS` runs any more.
fn wait_until_gone(d: &Kilnd, secs: &str, what: &str) {
    let stopped = Instant::now();
    while processes(&["sleep", secs]) > 0 {
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "{what}:\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sigterm_waits_for_a_running_build_and_a_second_one_stops_kilnd_at_once() {
    let mut d = Kilnd::start();
    let (_c, mut client) = build_sleeping(&d, "53");
    d.signal("TERM");
    assert!(
        !d.exited(Duration::from_secs(2)),
        "the first SIGTERM waits for the running build:\n{}",
        d.logs()
    );
    d.signal("TERM");
    assert!(
        d.exited(Duration::from_secs(10)),
        "a second SIGTERM stops kilnd:\n{}",
        d.logs()
    );
    let _ = client.wait();
    // as after a crash: a new kilnd on the same root removes the abandoned step's
    // container and builds
    d.spawn();
    let again = BuildContext::new("FROM busybox\nRUN echo after > /after\n").expect("ctx");
    d.build(again.path(), &[]);
    wait_until_gone(&d, "53", "the abandoned step still runs");
}

#[test]
fn a_client_that_goes_away_stops_its_running_step() {
    let d = Kilnd::start();
    let (c, mut client) = build_sleeping(&d, "47");
    let _ = client.kill();
    let _ = client.wait();
    wait_until_gone(&d, "47", "the step still runs after its client left");
    // nothing was cached for the stopped step
    let again = BuildContext::new("FROM busybox\nRUN echo quick\n").expect("ctx");
    d.build(again.path(), &[]);
    let out = d.kiln(c.path(), &["du"]).output().expect("du");
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!listed.contains("sleep 47"), "{listed}");
}

#[test]
fn prune_keep_duration_keeps_recent_records() {
    let d = Kilnd::start();
    let c = BuildContext::new("FROM busybox\nRUN echo kept > /kept\n").expect("ctx");
    d.build(c.path(), &[]);
    let out = d
        .kiln(c.path(), &["prune", "--keep-duration", "1h"])
        .output()
        .expect("prune");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Total:\t0B"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let again = d.build(c.path(), &[]);
    assert!(
        is_cached(&again, "RUN"),
        "records used within the hour survive:\n{again}"
    );
}

#[test]
fn kill_9_at_many_moments_leaves_a_consistent_cache() {
    let mut d = Kilnd::start();
    let c = BuildContext::new(
        "FROM busybox\nCOPY a.txt /a.txt\nRUN sleep 0.3 && cat /a.txt > /one\nRUN sleep 0.3 && cat /one /one > /two\nRUN sleep 0.3 && cat /two /a.txt > /three\n",
    )
    .expect("ctx");
    c.file("a.txt", "a\n").expect("write");
    let mut args = vec!["build", "--progress", "plain"];
    args.extend(dockerfile_args());
    // kill the daemon at different points of the build, from the start to
    // the last step, twenty times (issue 6)
    for i in 0..20u64 {
        let mut client = d
            .kiln(c.path(), &args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("kiln");
        std::thread::sleep(Duration::from_millis(150 + (i % 10) * 120));
        d.restart(false);
        let _ = client.kill();
        let _ = client.wait();
    }
    let outs = tempfile::tempdir().expect("tmp");
    d.build(c.path(), &["--output", &out_arg(outs.path())]);
    let read = |f: &str| std::fs::read_to_string(outs.path().join(f)).expect("read");
    assert_eq!(
        (read("one"), read("two"), read("three")),
        ("a\n".into(), "a\na\n".into(), "a\na\na\n".into())
    );
    let again = d.build(c.path(), &[]);
    assert_eq!(
        again.lines().filter(|l| l.ends_with(" CACHED")).count(),
        5,
        "FROM, COPY and three RUNs:\n{again}"
    );
}

/// Sets a file's mtime without touching its content.
fn set_mtime(p: &Path, secs: u64) {
    std::fs::File::options()
        .write(true)
        .open(p)
        .and_then(|f| f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(secs)))
        .expect("set mtime");
}

#[test]
fn mtime_only_changes_rerun_nothing_and_a_content_change_reruns_only_its_readers() {
    let d = Kilnd::start();
    let c = BuildContext::new(
        "FROM busybox\nCOPY a.txt /a.txt\nRUN cat /a.txt > /a.out\nCOPY b.txt /b.txt\nRUN cat /a.txt /b.txt > /ab && echo readers-ran-$((40+2))\n",
    )
    .expect("ctx");
    c.file("a.txt", "a\n").expect("write");
    c.file("b.txt", "b\n").expect("write");
    let outs = tempfile::tempdir().expect("tmp");
    let first = d.build(c.path(), &["--output", &out_arg(&outs.path().join("1"))]);
    assert!(first.contains("readers-ran-42"), "{first}");
    // touch: new mtimes, same content, mode and owner
    set_mtime(&c.path().join("a.txt"), 1_000_000);
    set_mtime(&c.path().join("b.txt"), 2_000_000);
    let second = d.build(c.path(), &["--output", &out_arg(&outs.path().join("2"))]);
    for step in [
        "COPY a.txt",
        "cat /a.txt > /a.out",
        "COPY b.txt",
        "readers-ran",
    ] {
        assert!(
            is_cached(&second, step),
            "{step} cached after an mtime-only change:\n{second}"
        );
    }
    assert!(!second.contains("readers-ran-42"), "{second}");
    // a content change of b.txt: only what reads it runs again
    c.file("b.txt", "B2\n").expect("write");
    let third = d.build(c.path(), &["--output", &out_arg(&outs.path().join("3"))]);
    assert!(is_cached(&third, "COPY a.txt"), "{third}");
    assert!(is_cached(&third, "cat /a.txt > /a.out"), "{third}");
    assert!(!is_cached(&third, "COPY b.txt"), "{third}");
    assert!(third.contains("readers-ran-42"), "{third}");
    assert_eq!(
        std::fs::read_to_string(outs.path().join("3/ab")).expect("read"),
        "a\nB2\n"
    );
}

#[test]
fn layers_built_before_a_context_change_keep_their_files() {
    // the context snapshot and the COPY share inodes (hard links) with
    // kilnd's synced copy of the context: later syncs and RUN writes must
    // never reach the layers of earlier builds
    let d = Kilnd::start();
    let c = BuildContext::new(
        "FROM busybox\nCOPY ctx/ /ctx/\nRUN cat /ctx/f > /seen && echo appended >> /ctx/f && chmod 600 /ctx/g\n",
    )
    .expect("ctx");
    c.file("ctx/f", "v1\n").expect("write");
    c.file("ctx/g", "g\n").expect("write");
    let outs = tempfile::tempdir().expect("tmp");
    let read = |n: &str, p: &str| std::fs::read_to_string(outs.path().join(n).join(p)).expect(p);
    d.build(c.path(), &["--output", &out_arg(&outs.path().join("1"))]);
    assert_eq!(read("1", "seen"), "v1\n");
    assert_eq!(read("1", "ctx/f"), "v1\nappended\n");
    c.file("ctx/f", "v2\n").expect("write");
    d.build(c.path(), &["--output", &out_arg(&outs.path().join("2"))]);
    assert_eq!(read("2", "seen"), "v2\n");
    // back to the first content (new mtime): the first build's layers are
    // reused, and they still hold what they held
    c.file("ctx/f", "v1\n").expect("write");
    let third = d.build(c.path(), &["--output", &out_arg(&outs.path().join("3"))]);
    assert!(is_cached(&third, "COPY ctx/"), "{third}");
    assert!(is_cached(&third, "cat /ctx/f"), "{third}");
    assert_eq!(read("3", "seen"), "v1\n");
    assert_eq!(read("3", "ctx/f"), "v1\nappended\n");
    assert_eq!(read("3", "ctx/g"), "g\n");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(outs.path().join("3/ctx/g"))
        .expect("g")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // and a build that only copies shows the context's files untouched by the RUN
    let only_copy = BuildContext::new("FROM busybox\nCOPY ctx/ /ctx/\n").expect("ctx");
    only_copy.file("ctx/f", "v1\n").expect("write");
    only_copy.file("ctx/g", "g\n").expect("write");
    d.build(
        only_copy.path(),
        &["--output", &out_arg(&outs.path().join("4"))],
    );
    assert_eq!(read("4", "ctx/f"), "v1\n");
    let mode = std::fs::metadata(outs.path().join("4/ctx/g"))
        .expect("g")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
}

/// The bytes a build's plain output says went over for the build context
/// (`#N transferring context: 12.3kB done` of the `#N [internal] load build
/// context` step; the `.dockerignore` load reports one too).
fn context_transferred(out: &str) -> f64 {
    let n = out
        .lines()
        .find_map(|l| l.strip_suffix(" [internal] load build context"))
        .unwrap_or_else(|| panic!("no context step in:\n{out}"));
    let prefix = format!("{n} transferring context: ");
    let size = out
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no context transfer in:\n{out}"));
    parse_size(size)
}

#[test]
fn a_changed_file_is_all_that_goes_over_also_after_a_kill_9() {
    // kilnd keeps the last synced copy of a context and asks only for what
    // changed; that copy becomes the build's context snapshot and is made
    // again afterwards, and a daemon killed before that still syncs
    // incrementally on its next start
    let mut d = Kilnd::start();
    let c = BuildContext::new("FROM busybox\nCOPY ctx/ /ctx/\n").expect("ctx");
    let chunk = "0123456789abcdef".repeat(256); // 4 KiB
    for i in 0..50 {
        c.file(&format!("ctx/f{i:02}"), &format!("{i}{chunk}"))
            .expect("write");
    }
    let outs = tempfile::tempdir().expect("tmp");
    let read = |n: &str, p: &str| std::fs::read_to_string(outs.path().join(n).join(p)).expect(p);
    let first = d.build(c.path(), &["--output", &out_arg(&outs.path().join("1"))]);
    assert!(context_transferred(&first) >= 50.0 * 4096.0, "{first}");
    c.file("ctx/f07", "seven\n").expect("write");
    let second = d.build(c.path(), &["--output", &out_arg(&outs.path().join("2"))]);
    assert_eq!(context_transferred(&second), 6.0, "{second}");
    assert_eq!(read("2", "ctx/f07"), "seven\n");
    assert_eq!(read("2", "ctx/f08"), format!("8{chunk}"));
    // killed before the synced copy was made again (what a kill can leave:
    // no copy, a half-made one next to it): the copy is made once the worker
    // is quiet, so wait for it (a loaded machine is slow), then undo it
    let local = d.root().join("worker/local");
    let made = || {
        std::fs::read_dir(&local)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let p = e.path();
                p.extension().is_some_and(|x| x == "last")
                    && p.with_extension("").join("ctx").exists()
            })
    };
    let t = std::time::Instant::now();
    while !made() && t.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    d.stop(false);
    let mut copies = 0;
    for e in std::fs::read_dir(&local).expect("local dirs").flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "last") {
            let copy = p.with_extension("");
            if copy.join("ctx").exists() {
                std::fs::remove_dir_all(&copy).expect("remove copy");
                std::fs::create_dir_all(copy.with_extension("relink").join("ctx")).expect("half");
                copies += 1;
            }
        }
    }
    assert_eq!(copies, 1, "one synced copy of the context");
    d.spawn();
    c.file("ctx/f08", "eight!\n").expect("write");
    let third = d.build(c.path(), &["--output", &out_arg(&outs.path().join("3"))]);
    assert_eq!(context_transferred(&third), 7.0, "{third}");
    assert_eq!(read("3", "ctx/f07"), "seven\n");
    assert_eq!(read("3", "ctx/f08"), "eight!\n");
    assert_eq!(
        std::fs::read_dir(outs.path().join("3/ctx"))
            .expect("ctx")
            .count(),
        50
    );
    // the earlier builds' layers kept their files
    let fourth = {
        c.file("ctx/f07", &format!("7{chunk}")).expect("write");
        c.file("ctx/f08", &format!("8{chunk}")).expect("write");
        d.build(c.path(), &["--output", &out_arg(&outs.path().join("4"))])
    };
    assert!(is_cached(&fourth, "COPY ctx/"), "{fourth}");
    assert_eq!(read("4", "ctx/f07"), format!("7{chunk}"));
}

#[test]
fn an_unrelated_directory_added_to_the_context_keeps_a_wildcard_copy_cached() {
    let d = Kilnd::start();
    let c = BuildContext::new(
        "FROM busybox\nCOPY *.txt /d/\nCOPY sub*/x.txt /e/\nRUN ls /d /e && echo wildcard-copy-$((40+2))\n",
    )
    .expect("ctx");
    c.file("a.txt", "a\n").expect("write");
    c.file("b.txt", "b\n").expect("write");
    c.file("sub1/x.txt", "x\n").expect("write");
    let outs = tempfile::tempdir().expect("tmp");
    let first = d.build(c.path(), &["--output", &out_arg(&outs.path().join("1"))]);
    assert!(first.contains("wildcard-copy-42"), "{first}");
    // neither pattern names anything in these
    c.file("unrelated/notes.md", "n\n").expect("write");
    c.file("sub2/y.md", "y\n").expect("write");
    let second = d.build(c.path(), &["--output", &out_arg(&outs.path().join("2"))]);
    for step in ["COPY *.txt", "COPY sub*/x.txt", "wildcard-copy"] {
        assert!(
            is_cached(&second, step),
            "{step} cached after an unrelated directory was added:\n{second}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(outs.path().join("2/e/x.txt")).expect("read"),
        "x\n"
    );
}
