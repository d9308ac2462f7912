//! The build farm, twice: as real processes on one host
//! (`kiln_integration_tests::farm`: a scheduler, a frontend, an exporter and
//! three workers joining it over loopback TCP), and as containers of kiln's
//! own image on a private Docker network (`container_farm`, each service its
//! own host). One build's steps run on all the workers; a worker killed,
//! partitioned or drained mid-build costs the build nothing but time. Each
//! behaviour is one generic body run on both.

use kiln_integration_tests::container_farm::{ContainerFarm, docker_available};
use kiln_integration_tests::farm::{
    Farm, ProcessFarm, busybox, bytes_moved, constrained_exec, finished, placements,
    stages_dockerfile,
};
use std::path::Path;
use std::time::Duration;

fn context(dockerfile: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("Dockerfile"), dockerfile).expect("Dockerfile");
    dir
}

const ZONES: [&[&str]; 3] = [
    &["--oci-worker-labels", "zone=a"],
    &["--oci-worker-labels", "zone=b"],
    &["--oci-worker-labels", "zone=c"],
];

fn three_workers() -> ProcessFarm {
    ProcessFarm::start(&ZONES, "").expect("farm")
}

/// Three workers as containers, or `None` (skipped) without a Docker engine.
fn three_containers() -> Option<ContainerFarm> {
    docker_available().then(|| ContainerFarm::start(&ZONES).expect("container farm"))
}

fn assert_outputs(dir: &Path, n: usize) {
    for i in 0..n {
        let got = std::fs::read_to_string(dir.join(format!("out/out/out{i}")))
            .unwrap_or_else(|e| panic!("out{i} missing from the image: {e}"));
        assert_eq!(got, format!("stage{i}\n"));
    }
}

/// The RUN steps' workers.
fn run_workers(progress: &str) -> Vec<String> {
    placements(progress)
        .into_iter()
        .filter(|(name, _)| name.contains(" RUN "))
        .map(|(_, w)| w)
        .collect()
}

#[test]
fn farm_runs_independent_stages_on_every_worker_and_builds_the_whole_image() {
    let farm = three_workers();
    stages_run_on_every_worker(&farm);
    dashboard_shows_the_build_per_worker(&farm);
}

/// `curl -s URL`'s body.
fn http_get(url: &str) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sf", "-m", "20", url])
        .output()
        .expect("run curl");
    assert!(out.status.success(), "GET {url} failed");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The scheduler's dashboard and metrics after [`stages_run_on_every_worker`]:
/// the build's steps on each worker's lane, what moved, every worker's slots.
fn dashboard_shows_the_build_per_worker(farm: &ProcessFarm) {
    let base = format!("http://{}", farm.debug);
    let overview: serde_json::Value =
        serde_json::from_str(&http_get(&format!("{base}/api/farm"))).expect("farm json");
    let id = overview["recent"][0]["ref"]
        .as_str()
        .expect("a recent build");
    let workers: Vec<&str> = overview["workers"]
        .as_array()
        .map(|w| w.iter().filter_map(|w| w["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(workers.len(), 3, "{overview}");
    let build: serde_json::Value =
        serde_json::from_str(&http_get(&format!("{base}/api/builds/{id}"))).expect("build json");
    let steps = build["steps"].as_array().expect("steps");
    let moved: u64 = steps.iter().filter_map(|s| s["bytes_moved"].as_u64()).sum();
    assert!(moved > 0, "the final stage's inputs moved: {build}");
    let page = http_get(&format!("{base}/build/{id}"));
    for w in &workers {
        let ran_there = steps.iter().filter(|s| s["worker"] == *w).count();
        assert!(ran_there > 0, "no step on {w}: {build}");
        assert!(
            page.contains(&format!("<td colspan=\"2\">{w} · {ran_there} steps</td>")),
            "the timeline has {w}'s lane with its {ran_there} steps:\n{page}"
        );
    }
    let metrics = http_get(&format!("{base}/metrics"));
    for w in &workers {
        assert!(
            metrics.contains(&format!("kiln_worker_capacity{{worker=\"{w}\"}} 2\n")),
            "{metrics}"
        );
    }
    assert!(
        metrics.contains("kiln_workers{state=\"ready\"} 3\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kiln_steps_total{kind=\"exec\",cache=\"miss\"} 12\n"),
        "{metrics}"
    );
    assert!(!metrics.contains("kiln_moved_bytes_total 0\n"), "{metrics}");
}

#[test]
fn farm_containers_run_independent_stages_on_every_worker_and_build_the_whole_image() {
    if let Some(farm) = three_containers() {
        stages_run_on_every_worker(&farm);
        // kiln's client image, on the farm's network, sees every worker
        let listed = farm
            .kiln_in_container(&["debug", "workers"])
            .expect("kiln from its image");
        for w in worker_ids(&farm) {
            assert!(listed.contains(&w), "{w} not listed:\n{listed}");
        }
    }
}

fn worker_ids(farm: &impl Farm) -> Vec<String> {
    (0..farm.worker_count())
        .map(|i| farm.worker_id(i))
        .collect()
}

fn stages_run_on_every_worker(farm: &impl Farm) {
    let listed = farm.listed_workers().expect("workers");
    for w in worker_ids(farm) {
        assert!(listed.contains(&w), "{w} not listed: {listed:?}");
    }
    let ctx = context(&stages_dockerfile(12, 1));
    let build = farm
        .spawn_build(ctx.path(), &["--output", "type=local,dest=out"])
        .expect("build");
    let progress = finished(build, farm).expect("build");
    assert_outputs(ctx.path(), 12);
    let used = run_workers(&progress);
    assert_eq!(used.len(), 12, "one placement per RUN:\n{progress}");
    for w in worker_ids(farm) {
        assert!(
            used.contains(&w),
            "no step ran on worker {w}: {used:?}\n{progress}"
        );
    }
    // the final stage's worker fetched the other stages' results from their workers
    assert!(bytes_moved(&progress) > 0, "{progress}");
    // the build history says which worker ran which step
    let histories = farm
        .kiln(ctx.path(), &["debug", "histories"])
        .output()
        .expect("kiln");
    let listed = String::from_utf8_lossy(&histories.stdout).to_string();
    let last = listed
        .lines()
        .rev()
        .find_map(|l| l.split_whitespace().next())
        .expect("a build in the history")
        .to_string();
    let history = farm
        .kiln(ctx.path(), &["debug", "history", &last])
        .output()
        .expect("kiln");
    let history = String::from_utf8_lossy(&history.stdout).to_string();
    for w in worker_ids(farm) {
        assert!(
            history
                .lines()
                .any(|l| l.contains(" RUN ") && l.ends_with(&format!("on {w}"))),
            "{history}"
        );
    }
    // `kiln debug workers` shows labels and state
    let out = farm
        .kiln(ctx.path(), &["debug", "workers", "-v"])
        .output()
        .expect("kiln");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("zone") && text.contains("ready"), "{text}");
}

/// Builds `n` stages of `secs` each, and once every worker runs one, does
/// `fault` to the farm; the context and the build's outcome.
fn build_through<F: Farm>(
    farm: &mut F,
    n: usize,
    secs: u32,
    fault: impl FnOnce(&mut F),
) -> (tempfile::TempDir, anyhow::Result<String>) {
    let ctx = context(&stages_dockerfile(n, secs));
    let build = farm
        .spawn_build(ctx.path(), &["--output", "type=local,dest=out"])
        .expect("build");
    farm.wait_all_running(Duration::from_secs(30))
        .expect("steps everywhere");
    fault(farm);
    let progress = finished(build, &*farm);
    (ctx, progress)
}

#[test]
fn farm_steps_of_a_killed_worker_run_elsewhere_and_the_build_succeeds() {
    killed_worker(&mut three_workers());
}

#[test]
fn farm_containers_steps_of_a_killed_worker_run_elsewhere_and_the_build_succeeds() {
    if let Some(mut farm) = three_containers() {
        killed_worker(&mut farm);
    }
}

fn killed_worker(farm: &mut impl Farm) {
    let killed = farm.worker_id(1);
    // every worker runs stages when worker 1 dies (they take 4 s)
    let (ctx, progress) = build_through(farm, 6, 4, |f| f.kill_worker(1));
    let progress = progress.expect("the build survives a lost worker");
    assert_outputs(ctx.path(), 6);
    assert!(
        progress.contains(&format!("worker {killed} lost"))
            && progress.contains("the step runs again elsewhere"),
        "{progress}"
    );
    // the farm lists the two left; the worker comes back under its id
    farm.wait_workers(2, Duration::from_secs(10))
        .expect("dropped");
    farm.start_worker(1).expect("restart");
    farm.wait_workers(3, Duration::from_secs(20))
        .expect("rejoined");
    assert!(farm.listed_workers().expect("workers").contains(&killed));
}

#[test]
fn farm_partitioned_worker_is_dropped_after_the_keepalive_timeout_and_rejoins() {
    partitioned_worker(&mut three_workers());
}

#[test]
fn farm_containers_partitioned_worker_is_dropped_after_the_keepalive_timeout_and_rejoins() {
    if let Some(mut farm) = three_containers() {
        partitioned_worker(&mut farm);
    }
}

fn partitioned_worker(farm: &mut impl Farm) {
    let cut = farm.worker_id(2);
    let (ctx, progress) = build_through(farm, 6, 4, |f| f.cut_worker(2));
    farm.heal_worker(2);
    let progress = progress.expect("the build survives a partition");
    assert_outputs(ctx.path(), 6);
    assert!(
        progress.contains(&format!("worker {cut} was dropped from the farm")),
        "{progress}"
    );
    farm.wait_workers(3, Duration::from_secs(20))
        .expect("the worker rejoins when the partition heals");
}

#[test]
fn farm_drained_worker_finishes_its_steps_and_takes_no_new_ones() {
    drained_worker(&mut three_workers());
}

#[test]
fn farm_containers_drained_worker_finishes_its_steps_and_takes_no_new_ones() {
    if let Some(mut farm) = three_containers() {
        drained_worker(&mut farm);
    }
}

fn drained_worker(farm: &mut impl Farm) {
    let drained = farm.worker_id(0);
    // 9 stages on 6 slots: a second wave starts once the first ends; the
    // drain comes while the first wave runs on every worker
    let (ctx, progress) = build_through(farm, 9, 3, |f| f.drain_worker(0));
    let progress = progress.expect("build");
    assert_outputs(ctx.path(), 9);
    assert!(
        !progress.contains("runs again elsewhere"),
        "a drained worker's steps finish where they run:\n{progress}"
    );
    let on_drained = run_workers(&progress)
        .iter()
        .filter(|w| **w == drained)
        .count();
    assert!(
        on_drained <= 2,
        "the drained worker got {on_drained} steps, more than its 2 slots held when it drained:\n{progress}"
    );
    let ok = farm
        .wait_worker_exit(0, Duration::from_secs(30))
        .expect("the drained worker exits");
    assert!(ok, "the drained worker failed:\n{}", farm.logs());
    farm.wait_workers(2, Duration::from_secs(10))
        .expect("gone from the list");
}

#[test]
fn farm_rebuild_after_one_stage_changes_runs_and_moves_only_that_stage() {
    rebuild_one_stage(&three_workers());
}

#[test]
fn farm_containers_rebuild_after_one_stage_changes_runs_and_moves_only_that_stage() {
    if let Some(farm) = three_containers() {
        rebuild_one_stage(&farm);
    }
}

fn rebuild_one_stage(farm: &impl Farm) {
    let mut d = String::new();
    for i in 0..6 {
        d.push_str(&format!(
            "FROM busybox AS s{i}\nCOPY a{i} /a{i}\nRUN cat /a{i} > /out{i}\n"
        ));
    }
    d.push_str("FROM busybox\n");
    for i in 0..6 {
        d.push_str(&format!("COPY --from=s{i} /out{i} /out/\n"));
    }
    let ctx = context(&d);
    for i in 0..6 {
        std::fs::write(ctx.path().join(format!("a{i}")), format!("stage{i}\n")).expect("file");
    }
    let first = finished(
        farm.spawn_build(ctx.path(), &["--output", "type=local,dest=out"])
            .expect("build"),
        farm,
    )
    .expect("first build");
    assert_outputs(ctx.path(), 6);
    std::fs::write(ctx.path().join("a3"), "three\n").expect("changed");
    let second = finished(
        farm.spawn_build(ctx.path(), &["--output", "type=local,dest=out2"])
            .expect("build"),
        farm,
    )
    .expect("second build");
    assert_eq!(
        std::fs::read_to_string(ctx.path().join("out2/out/out3")).expect("out3"),
        "three\n"
    );
    let ran = run_workers(&second);
    assert_eq!(
        placements(&second)
            .iter()
            .filter(|(n, _)| n.contains(" RUN "))
            .map(|(n, _)| n.clone())
            .collect::<Vec<_>>(),
        vec!["[s3 3/3] RUN cat /a3 > /out3".to_string()],
        "only the changed stage runs again:\n{second}"
    );
    assert_eq!(ran.len(), 1);
    let (b1, b2) = (bytes_moved(&first), bytes_moved(&second));
    assert!(
        b2 < 64 * 1024,
        "the rebuild moved {b2} bytes (the first build {b1}): only the changed stage's layer should move\n{second}"
    );
}

#[test]
fn farm_scheduler_restart_fails_the_build_clearly_and_the_retry_is_served_from_the_workers() {
    let mut farm = three_workers();
    let ctx = context(&stages_dockerfile(6, 2));
    let first = finished(
        farm.spawn_build(ctx.path(), &["--output", "type=local,dest=out"])
            .expect("build"),
        &farm,
    )
    .expect("first build");
    assert_eq!(run_workers(&first).len(), 6);
    // a build in flight when the scheduler dies gets an error, not a hang
    let ctx2 = context(&stages_dockerfile(6, 5).replace("echo stage", "echo again"));
    let doomed = farm
        .spawn_build(ctx2.path(), &["--output", "type=local,dest=out"])
        .expect("build");
    farm.wait_all_running(Duration::from_secs(30))
        .expect("the build runs");
    farm.restart_scheduler().expect("restart");
    let out = doomed.wait_with_output().expect("kiln");
    assert!(
        !out.status.success(),
        "a build survived its scheduler's death?"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error"), "{err}");
    // the workers join the new scheduler; the first build again is all cached
    farm.wait_workers(3, Duration::from_secs(30))
        .expect("rejoined");
    let again = finished(
        farm.spawn_build(ctx.path(), &["--output", "type=local,dest=out2"])
            .expect("build"),
        &farm,
    )
    .expect("retried build");
    assert!(
        run_workers(&again).is_empty(),
        "no step runs again:\n{again}"
    );
    assert!(again.matches("CACHED").count() >= 6, "{again}");
    for i in 0..6 {
        assert_eq!(
            std::fs::read_to_string(ctx.path().join(format!("out2/out/out{i}"))).expect("out"),
            format!("stage{i}\n")
        );
    }
}

/// SIGTERM (a rolling update of the scheduler) stops it promptly although its
/// workers' streams never end by themselves; the workers stay up and join the
/// next scheduler, whose builds use them.
#[test]
fn farm_scheduler_stops_on_sigterm_with_workers_joined_and_they_join_the_next() {
    let mut farm = ProcessFarm::start(&[&[], &[]], "").expect("farm");
    let ok = farm
        .terminate_scheduler(Duration::from_secs(10))
        .expect("the scheduler exits");
    assert!(ok, "the scheduler failed on SIGTERM:\n{}", farm.logs());
    farm.start_scheduler().expect("start again");
    farm.wait_workers(2, Duration::from_secs(20))
        .expect("the workers join the new scheduler");
    let ctx = context(&stages_dockerfile(4, 0));
    let progress = finished(
        farm.spawn_build(ctx.path(), &["--output", "type=local,dest=out"])
            .expect("build"),
        &farm,
    )
    .expect("build");
    assert_outputs(ctx.path(), 4);
    assert_eq!(run_workers(&progress).len(), 4, "{progress}");
}

#[test]
fn farm_step_constrained_to_a_label_runs_only_on_the_worker_with_it() {
    constrained_step(&three_workers());
}

#[test]
fn farm_containers_step_constrained_to_a_label_runs_only_on_the_worker_with_it() {
    if let Some(farm) = three_containers() {
        constrained_step(&farm);
    }
}

fn constrained_step(farm: &impl Farm) {
    use prost::Message;
    let labelled = farm.worker_id(1);
    let dir = tempfile::tempdir().expect("tempdir");
    for n in 0..4 {
        let mut b = kiln_llb::DefinitionBuilder::new();
        let image = busybox(&mut b);
        let out = constrained_exec(
            &mut b,
            image,
            "b",
            &format!("echo {n} > /n"),
            vec![],
            vec![],
        );
        let def = b.finish(Some(out)).encode_to_vec();
        let progress = farm.build_definition(dir.path(), &def).expect("build");
        let on: Vec<String> = placements(&progress)
            .into_iter()
            .filter(|(name, _)| name.contains("echo"))
            .map(|(_, w)| w)
            .collect();
        assert_eq!(on, vec![labelled.clone()], "{progress}");
    }
}

/// A CA and one certificate for 127.0.0.1 that every service of the farm uses
/// as server and client, and a certificate from another CA.
fn farm_pki(dir: &Path) {
    let sh = |script: &str| {
        let out = std::process::Command::new("sh")
            .args(["-ec", script])
            .current_dir(dir)
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh("for ca in ca other-ca; do
          openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
            -subj \"/CN=kiln farm $ca\" -keyout $ca.key -out $ca.pem 2>/dev/null
        done
        for leaf in farm:ca stranger:other-ca; do
          name=${leaf%%:*}; ca=${leaf#*:}
          openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -subj \"/CN=kiln farm $name\" -keyout $name.key -out $name.csr 2>/dev/null
          printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth,clientAuth\\n' > $name.ext
          openssl x509 -req -in $name.csr -CA $ca.pem -CAkey $ca.key -CAcreateserial -days 2 \
            -extfile $name.ext -out $name.pem 2>/dev/null
        done");
}

#[test]
fn farm_services_authenticate_each_other_with_mutual_tls() {
    let pki = tempfile::tempdir().expect("tempdir");
    farm_pki(pki.path());
    let p = |f: &str| pki.path().join(f).display().to_string();
    let farm = ProcessFarm::start(
        &[&[], &[]],
        &format!(
            "[farm.tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            p("ca.pem"),
            p("farm.pem"),
            p("farm.key")
        ),
    )
    .expect("a farm over mutual TLS");
    let ctx = context(&stages_dockerfile(4, 1));
    let progress = finished(
        farm.spawn_build(ctx.path(), &["--output", "type=local,dest=out"])
            .expect("build"),
        &farm,
    )
    .expect("build");
    assert_outputs(ctx.path(), 4);
    assert_eq!(run_workers(&progress).len(), 4, "{progress}");
    // a worker takes no call from a client without the farm's certificate:
    // neither plain nor with another CA's certificate
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        use kiln_proto::kiln::worker::v1::{InfoRequest, worker_client::WorkerClient};
        let worker = farm.workers[0].addr.clone();
        let plain = kiln_session::dial::connect_lazy(&worker).expect("channel");
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            WorkerClient::new(plain).info(InfoRequest {}),
        )
        .await
        .expect("an answer");
        assert!(r.is_err(), "a plain client was served: {r:?}");
        let stranger = kiln_session::tls::ClientTls {
            ca: Some(pki.path().join("ca.pem")),
            cert: Some(pki.path().join("stranger.pem")),
            key: Some(pki.path().join("stranger.key")),
            server_name: None,
        };
        let r = match kiln_session::dial::connect_with(&worker, Some(&stranger)).await {
            Err(e) => Err(e.to_string()),
            Ok(ch) => WorkerClient::new(ch)
                .info(InfoRequest {})
                .await
                .map(|_| ())
                .map_err(|s| s.to_string()),
        };
        assert!(r.is_err(), "a certificate of another CA was accepted");
        // the farm's own certificate is
        let ours = kiln_session::tls::ClientTls {
            ca: Some(pki.path().join("ca.pem")),
            cert: Some(pki.path().join("farm.pem")),
            key: Some(pki.path().join("farm.key")),
            server_name: None,
        };
        let ch = kiln_session::dial::connect_with(&worker, Some(&ours))
            .await
            .expect("connect");
        WorkerClient::new(ch)
            .info(InfoRequest {})
            .await
            .expect("the farm's certificate is served");
    });
}
