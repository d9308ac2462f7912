//! Operating kiln: kilnd's debug address (`[debug] address`) seen through
//! the real tools operators use: a Prometheus server (Debian's `prometheus`)
//! scraping `/metrics` while builds run, queried through its HTTP API; the
//! farm dashboard opened in a headless browser (Debian's `chromium`), its
//! screenshot kept under `target/test-artifacts/`; and the gRPC health
//! service probes use.

use kiln_integration_tests::farm::free_port;
use kiln_integration_tests::{BuildContext, Daemon, Topology, dockerfile_args};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An all-in-one kilnd with a debug listener on a free loopback port.
fn daemon_with_debug() -> (Daemon, String) {
    let port = free_port().expect("free port");
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with_config(
        Topology::AllInOne,
        &format!("[debug]\naddress = \"{addr}\"\n"),
    )
    .expect("start kilnd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "the debug listener {addr} never answered:\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (d, addr)
}

/// `curl -s URL`: (HTTP status, body).
fn get(url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "20", "-w", "\n%{http_code}", url])
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn build(d: &Daemon, ctx: &Path, extra: &[&str]) -> String {
    let mut args = dockerfile_args();
    args.extend_from_slice(extra);
    let out = d.build(ctx, &args).expect("build");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Kills and reaps a helper process when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One number from Prometheus's instant query API (`None`: no sample yet).
fn prom_query(prom: &str, query: &str) -> Option<f64> {
    let out = Command::new("curl")
        .args(["-s", "-m", "10", "-G", "--data-urlencode"])
        .arg(format!("query={query}"))
        .arg(format!("http://{prom}/api/v1/query"))
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    if v["status"] != "success" {
        return None;
    }
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// Waits (bounded) until `query` reaches at least `want`; the last value.
fn prom_wait(prom: &str, query: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let got = prom_query(prom, query);
        if got.is_some_and(|v| v >= want) || Instant::now() > deadline {
            return got.unwrap_or(f64::NAN);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn prometheus_scrapes_builds_steps_and_cache_hits_from_kilnd() {
    let (d, debug) = daemon_with_debug();
    let work = tempfile::tempdir().expect("tempdir");
    let prom_addr = format!("127.0.0.1:{}", free_port().expect("free port"));
    std::fs::write(
        work.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: kilnd\n    static_configs:\n      - targets: ['{debug}']\n"
        ),
    )
    .expect("write prometheus.yml");
    let log = std::fs::File::create(work.path().join("prometheus.log")).expect("log");
    let prom = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            work.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            work.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={prom_addr}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prometheus (Debian's prometheus package; make deps installs it)");
    let _prom = Reaped(prom);
    // the target is up before the build starts, so a scrape lands during it
    let up = prom_wait(&prom_addr, "up{job=\"kilnd\"}", 1.0);
    assert_eq!(
        up,
        1.0,
        "prometheus never scraped kilnd: {}",
        std::fs::read_to_string(work.path().join("prometheus.log")).unwrap_or_default()
    );

    let ctx =
        BuildContext::new("FROM busybox\nRUN echo one > /one && sleep 3\nRUN cat /one > /two\n")
            .expect("context");
    let first = build(&d, ctx.path(), &[]);
    assert!(
        !first.contains("CACHED"),
        "a cold build ran its steps:\n{first}"
    );
    let second = build(&d, ctx.path(), &[]);
    assert!(
        second.matches("CACHED").count() >= 2,
        "the rebuild is cached:\n{second}"
    );

    let builds = prom_wait(&prom_addr, "kiln_builds_total{status=\"succeeded\"}", 2.0);
    assert_eq!(builds, 2.0, "two succeeded builds counted");
    // both RUN steps ran once (the first build) and hit the cache once (the second)
    let ran = prom_wait(
        &prom_addr,
        "kiln_steps_total{kind=\"exec\",cache=\"miss\"}",
        2.0,
    );
    assert_eq!(ran, 2.0, "exec steps that ran");
    let hits = prom_wait(
        &prom_addr,
        "kiln_steps_total{kind=\"exec\",cache=\"hit\"}",
        2.0,
    );
    assert_eq!(hits, 2.0, "exec steps served from the cache");
    // scraped while the first build ran (its 3 s step spans several 1 s scrapes)
    let running = prom_wait(&prom_addr, "max_over_time(kiln_builds_running[5m])", 1.0);
    assert_eq!(running, 1.0, "a scrape saw the build running");
    let slow = prom_wait(
        &prom_addr,
        "kiln_step_duration_seconds_bucket{kind=\"exec\",le=\"2.5\"}",
        1.0,
    );
    let all = prom_wait(
        &prom_addr,
        "kiln_step_duration_seconds_count{kind=\"exec\"}",
        2.0,
    );
    assert_eq!(
        (slow, all),
        (1.0, 2.0),
        "one exec step under 2.5 s, the sleeping one over"
    );
    let pulled = prom_wait(&prom_addr, "kiln_pulled_bytes_total", 1.0);
    assert!(pulled > 100_000.0, "busybox's layer was pulled: {pulled}");
}

#[test]
fn health_answers_on_the_debug_address_over_http_and_grpc() {
    let (d, debug) = daemon_with_debug();
    assert_eq!(
        get(&format!("http://{debug}/healthz")),
        (200, "ok\n".into())
    );
    assert_eq!(get(&format!("http://{debug}/livez")).0, 200);
    // gRPC health over plain HTTP/2, as a Kubernetes `grpc:` probe asks it
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let statuses = rt.block_on(async {
        use kiln_proto::health::{HealthCheckRequest, health_client::HealthClient};
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{debug}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to the debug address over h2c");
        let mut c = HealthClient::new(ch);
        let mut out = Vec::new();
        for service in ["", "readiness", "liveness", "nonsense"] {
            let r = c
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await;
            out.push(r.map(|r| r.into_inner().status).map_err(|e| e.code()));
        }
        out
    });
    assert_eq!(
        statuses,
        vec![Ok(1), Ok(1), Ok(1), Err(tonic::Code::NotFound)],
        "SERVING for the default, readiness and liveness; unknown services refused"
    );
    drop(d);
}

/// Headless Chromium: the DOM of `url` after it loaded, and a screenshot.
fn chromium(url: &str, screenshot: &Path, profile: &Path) -> String {
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--window-size=1400,1000",
    ];
    let dom = Command::new("chromium")
        .args(common)
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", url])
        .output()
        .expect("run chromium (Debian's chromium package; make deps installs it)");
    assert!(
        dom.status.success(),
        "chromium --dump-dom {url}: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let shot = Command::new("chromium")
        .args(common)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        shot.status.success() && screenshot.exists(),
        "chromium --screenshot {url}: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    String::from_utf8_lossy(&dom.stdout).to_string()
}

#[test]
fn the_dashboard_shows_a_build_and_its_steps_in_a_browser() {
    let (d, debug) = daemon_with_debug();
    let ctx = BuildContext::new(
        "FROM busybox AS left\nRUN echo dashboard-left > /l\n\
         FROM busybox AS right\nRUN echo dashboard-right > /r\n\
         FROM busybox\nCOPY --from=left /l /l\nCOPY --from=right /r /r\n",
    )
    .expect("context");
    build(&d, ctx.path(), &[]);
    let (_, farm) = get(&format!("http://{debug}/api/farm"));
    let farm: serde_json::Value = serde_json::from_str(&farm).expect("farm json");
    let id = farm["recent"][0]["ref"]
        .as_str()
        .expect("the build is among the recent ones")
        .to_string();
    assert_eq!(farm["recent"][0]["status"], "succeeded");
    assert_eq!(farm["workers"].as_array().map(Vec::len), Some(1), "{farm}");

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let profile = tempfile::tempdir().expect("profile");
    let front = chromium(
        &format!("http://{debug}/"),
        &artifacts.join("dashboard-farm.png"),
        profile.path(),
    );
    assert!(front.contains("kiln farm"), "{front}");
    assert!(
        front.contains(&id),
        "the front page lists the build:\n{front}"
    );
    let page = chromium(
        &format!("http://{debug}/build/{id}"),
        &artifacts.join("dashboard-build.png"),
        profile.path(),
    );
    for step in [
        "RUN echo dashboard-left &gt; /l",
        "RUN echo dashboard-right &gt; /r",
        "COPY --from=left /l /l",
    ] {
        assert!(
            page.contains(step),
            "the build page shows the step {step:?}:\n{page}"
        );
    }
    assert!(page.contains("Timeline"), "{page}");
    // each step that ran is a bar on the timeline
    assert!(
        page.matches("class=\"step ran\"").count() >= 4,
        "bars of the steps that ran:\n{page}"
    );
    // an unknown build is a 404 page, not an error
    assert_eq!(get(&format!("http://{debug}/build/nope")).0, 404);
}
