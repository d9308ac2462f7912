//! The farm over fake workers: placement, loss, re-make and drain, without
//! processes (the process farm is `integration-tests/tests/farm.rs`).

use super::members::Registration;
use super::*;
use std::sync::atomic::AtomicBool;

/// One fake worker's state, shared by every client of its address.
#[derive(Default)]
pub(crate) struct FakeState {
    pub refs: Mutex<HashSet<String>>,
    pub runs: Mutex<Vec<String>>,
    pub dead: AtomicBool,
}

/// The fake farm's "network": address -> worker state.
pub(crate) type Net = Arc<Mutex<HashMap<String, Arc<FakeState>>>>;

pub(crate) struct Fake {
    address: String,
    net: Net,
    state: Arc<FakeState>,
}

impl Worker for Fake {
    fn address(&self) -> String {
        self.address.clone()
    }

    async fn run(
        &self,
        op: RunOp,
        _events: Arc<dyn Fn(RunEvent) + Send + Sync>,
    ) -> Result<RunOutputs, Error> {
        if self.state.dead.load(Ordering::SeqCst) {
            return Err(Error::Unreachable {
                op: format!("run {}", op.name),
                source: kiln_proto::status::Remote::new(
                    tonic::Code::Unavailable,
                    "connection refused",
                ),
            });
        }
        self.state.runs.lock().expect("lock").push(op.name.clone());
        {
            let held = self.state.refs.lock().expect("lock");
            for i in op.inputs.iter().filter(|i| !i.is_empty()) {
                assert!(held.contains(i), "input {i} is not on {}", self.address);
            }
        }
        if op.name.contains("fail") {
            return Err(Error::Run(kiln_proto::status::Remote::new(
                tonic::Code::Unknown,
                "process \"false\" did not complete successfully: exit code: 1",
            )));
        }
        let r = uuid::Uuid::new_v4().to_string();
        self.state.refs.lock().expect("lock").insert(r.clone());
        Ok(RunOutputs {
            refs: vec![r],
            ..Default::default()
        })
    }

    async fn import(&self, peer: &str, r: &str) -> Result<crate::peer::Imported, Error> {
        let holder = self.net.lock().expect("lock").get(peer).cloned();
        match holder {
            Some(h)
                if !h.dead.load(Ordering::SeqCst) && h.refs.lock().expect("lock").contains(r) =>
            {
                let copy = format!("copy-of-{r}");
                self.state.refs.lock().expect("lock").insert(copy.clone());
                Ok(crate::peer::Imported {
                    r#ref: copy,
                    bytes_moved: 100,
                })
            }
            _ => Err(Error::Worker {
                op: format!("import {r}"),
                source: kiln_proto::status::Remote::new(
                    tonic::Code::Unavailable,
                    "peer unreachable",
                ),
            }),
        }
    }

    async fn checksum(&self, _r: &str, _s: &[Selector]) -> Result<String, Error> {
        Ok("sha256:0".into())
    }

    async fn path_entries(&self, _r: &str, _s: &[Selector]) -> Result<Vec<PathEntry>, Error> {
        Ok(vec![])
    }

    async fn exists(&self, refs: &[String]) -> Result<Vec<bool>, Error> {
        let held = self.state.refs.lock().expect("lock");
        Ok(refs.iter().map(|r| held.contains(r)).collect())
    }
}

pub(crate) fn fake_farm(config: FarmConfig) -> (Farm<Fake>, Net) {
    let net: Net = Default::default();
    let n = net.clone();
    let connect: Connect<Fake> = Arc::new(move |address: &str| {
        let state = n
            .lock()
            .expect("ok")
            .entry(address.to_string())
            .or_default()
            .clone();
        Ok(Fake {
            address: address.to_string(),
            net: n.clone(),
            state,
        })
    });
    (Farm::new(config, connect), net)
}

pub(crate) fn reg(id: &str, capacity: usize) -> Registration {
    Registration {
        id: id.into(),
        address: format!("tcp://{id}:1"),
        platforms: vec![kiln_oci::Platform::new("linux", "amd64", None)],
        labels: Default::default(),
        capacity,
        free_disk: 0,
        version: String::new(),
    }
}

/// An exec op (busybox-less: the fake does not look at it).
pub(crate) fn op(name: &str, inputs: Vec<String>) -> RunOp {
    use prost::Message;
    let op = pb::Op {
        op: Some(pb::op::Op::Exec(pb::ExecOp::default())),
        ..Default::default()
    };
    RunOp {
        build_id: "b".into(),
        session_id: String::new(),
        session_shared_key: String::new(),
        digest: format!("sha256:{name}"),
        op_bytes: op.encode_to_vec(),
        inputs,
        name: name.into(),
        entitlements: vec![],
    }
}

fn quiet() -> Arc<dyn Fn(RunEvent) + Send + Sync> {
    Arc::new(|_| {})
}

fn config() -> FarmConfig {
    FarmConfig {
        wait_for_worker: Duration::from_millis(200),
        ..Default::default()
    }
}

fn state(net: &Net, id: &str) -> Arc<FakeState> {
    net.lock().expect("lock")[&format!("tcp://{id}:1")].clone()
}

#[tokio::test]
async fn a_step_whose_worker_is_lost_runs_elsewhere_but_its_own_failure_is_not_retried() {
    let (farm, net) = fake_farm(config());
    let ga = farm.register(reg("a", 2)).expect("ok");
    farm.register(reg("b", 2)).expect("ok");
    // a dies: the step placed there (the lowest id, both idle) runs on b
    state(&net, "a").dead.store(true, Ordering::SeqCst);
    let out = farm.run(op("one", vec![]), quiet()).await.expect("run");
    assert_eq!(out.worker, "b");
    assert!(out.refs[0].ends_with("@b"), "{:?}", out.refs);
    farm.drop_worker("a", ga, "test");
    // a step that fails on its own fails once
    let e = farm
        .run(op("fail", vec![]), quiet())
        .await
        .expect_err("an error");
    assert!(e.to_string().contains("exit code: 1"), "{e}");
    let runs = state(&net, "b").runs.lock().expect("lock").clone();
    assert_eq!(runs, vec!["one".to_string(), "fail".to_string()]);
}

#[tokio::test]
async fn a_result_only_a_dropped_worker_held_is_made_again_for_its_consumer() {
    let (farm, net) = fake_farm(config());
    let ga = farm.register(reg("a", 2)).expect("ok");
    let first = farm.run(op("first", vec![]), quiet()).await.expect("run");
    farm.register(reg("b", 2)).expect("ok");
    farm.drop_worker("a", ga, "test");
    assert_eq!(
        farm.exists(&first.refs).await.expect("ok"),
        vec![false],
        "a ref on a gone worker is a miss, not an error"
    );
    let second = farm
        .run(op("second", first.refs.clone()), quiet())
        .await
        .expect("run");
    assert_eq!(second.worker, "b");
    let runs = state(&net, "b").runs.lock().expect("lock").clone();
    assert_eq!(runs, vec!["first".to_string(), "second".to_string()]);
}

#[tokio::test]
async fn a_copy_on_a_live_worker_serves_a_result_whose_worker_is_gone() {
    let (farm, net) = fake_farm(config());
    let ga = farm.register(reg("a", 2)).expect("ok");
    let first = farm.run(op("first", vec![]), quiet()).await.expect("run");
    assert_eq!(first.worker, "a");
    farm.register(reg("b", 2)).expect("ok");
    // a drains: the consumer runs on b, which imports a copy of the result
    farm.drain("a", ga);
    let second = farm
        .run(op("second", first.refs.clone()), quiet())
        .await
        .expect("run");
    assert_eq!(second.worker, "b");
    farm.drop_worker("a", ga, "test");
    // the result's worker is gone, its copy on b is not: a hit, not a re-make
    assert_eq!(farm.exists(&first.refs).await.expect("ok"), vec![true]);
    let third = farm
        .run(op("third", first.refs.clone()), quiet())
        .await
        .expect("run");
    assert_eq!(third.worker, "b");
    let runs = state(&net, "b").runs.lock().expect("lock").clone();
    assert_eq!(runs, vec!["second".to_string(), "third".to_string()]);
    // the copy gone too (b pruned it): a miss again
    state(&net, "b").refs.lock().expect("lock").clear();
    assert_eq!(farm.exists(&first.refs).await.expect("ok"), vec![false]);
}

#[tokio::test]
async fn inputs_move_to_the_step_and_affinity_keeps_chains_together() {
    let (farm, net) = fake_farm(config());
    farm.register(reg("a", 1)).expect("ok");
    farm.register(reg("b", 4)).expect("ok");
    let first = farm.run(op("first", vec![]), quiet()).await.expect("run");
    // the worker holding the input wins over the idle one
    let holder = first.worker.clone();
    let second = farm
        .run(op("second", first.refs.clone()), quiet())
        .await
        .expect("run");
    assert_eq!(second.worker, holder);
    // a worker that drains gets no new step: its input moves to the other one
    let other = if holder == "a" { "b" } else { "a" };
    let generation = farm.members.lock().expect("lock").by_id[&holder].generation;
    farm.drain(&holder, generation);
    let third = farm
        .run(op("third", second.refs.clone()), quiet())
        .await
        .expect("run");
    assert_eq!(third.worker, other);
    assert_eq!(farm.bytes_moved(), 100);
    assert!(
        state(&net, other)
            .refs
            .lock()
            .expect("ok")
            .iter()
            .any(|r| r.starts_with("copy-of-"))
    );
}

#[tokio::test]
async fn a_step_no_worker_can_run_fails_with_what_it_asked_for() {
    let (farm, _net) = fake_farm(config());
    farm.register(reg("a", 1)).expect("ok");
    let mut o = op("gpu", vec![]);
    {
        use prost::Message;
        let mut p = pb::Op::decode(o.op_bytes.as_slice()).expect("ok");
        p.constraints = Some(pb::WorkerConstraints {
            filter: vec!["labels.gpu==a100".into()],
        });
        o.op_bytes = p.encode_to_vec();
    }
    let e = farm.run(o, quiet()).await.expect_err("an error");
    assert!(
        e.to_string()
            .contains("no worker in the farm can run this step (1 worker constraint filter(s))"),
        "{e}"
    );
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// One simulated farm run: `workers` fake workers with 4 slots each, `steps`
/// steps queued at once (half of them reading one of 1,000 earlier results),
/// keepalives from every worker every 100 ms, and 1% of the workers lost
/// halfway. Returns a line of figures.
async fn simulate(workers: usize, steps: usize) -> String {
    let (farm, net) = fake_farm(FarmConfig {
        wait_for_worker: Duration::from_secs(5),
        ..Default::default()
    });
    let farm = Arc::new(farm);
    let mut generations = Vec::new();
    for i in 0..workers {
        generations.push(farm.register(reg(&format!("w{i:04}"), 4)).expect("ok"));
    }
    let mut seeds = Vec::new();
    for i in 0..1000 {
        let out = farm
            .run(op(&format!("seed{i}"), vec![]), quiet())
            .await
            .expect("ok");
        seeds.push(out.refs[0].clone());
    }
    let keepalives = {
        let farm = farm.clone();
        let generations = generations.clone();
        tokio::spawn(async move {
            loop {
                for (i, g) in generations.iter().enumerate() {
                    farm.heard(&format!("w{i:04}"), *g, 1 << 30);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let before = rss_kib();
    let (placed_before, _) = farm.placement_micros(0.5);
    let started = std::time::Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..steps {
        let farm = farm.clone();
        let inputs = if i % 2 == 0 {
            vec![seeds[i % seeds.len()].clone()]
        } else {
            vec![]
        };
        let done = done.clone();
        tasks.spawn(async move {
            let r = farm.run(op(&format!("step{i}"), inputs), quiet()).await;
            done.fetch_add(1, Ordering::Relaxed);
            r.map(|_| ())
        });
    }
    let queued_rss = rss_kib();
    // 1% of the workers are lost halfway
    while done.load(Ordering::Relaxed) < steps as u64 / 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for i in (0..workers).step_by(100) {
        state(&net, &format!("w{i:04}"))
            .dead
            .store(true, Ordering::SeqCst);
        farm.drop_worker(&format!("w{i:04}"), generations[i], "simulated loss");
    }
    let mut failed = 0;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if failed == 0 {
                    println!("first failure: {e}");
                }
                failed += 1;
            }
            Err(e) => {
                if failed == 0 {
                    println!("first failure: {e}");
                }
                failed += 1;
            }
        }
    }
    let wall = started.elapsed();
    keepalives.abort();
    let (placed, p50) = farm.placement_micros(0.5);
    let (_, p99) = farm.placement_micros(0.99);
    let decisions = placed - placed_before;
    assert_eq!(failed, 0, "every step ends on a live worker");
    format!(
        "workers {workers}, steps {steps}: {:.0} steps/s placed and run, {decisions} placement decisions, p50 {p50} µs, p99 {p99} µs, wall {:.2} s, RSS +{} MiB with all steps queued",
        steps as f64 / wall.as_secs_f64(),
        wall.as_secs_f64(),
        queued_rss.saturating_sub(before) / 1024
    )
}

/// The scheduler past this machine (`bench/farm/run.sh` runs it in release
/// mode): placement rate, decision latency and the memory of a queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: bench/farm/run.sh"]
async fn simulated_farm_of_a_thousand_workers() {
    let workers = std::env::var("KILN_SIM_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let steps = std::env::var("KILN_SIM_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    println!("SIM {}", simulate(workers, steps / 10).await);
    println!("SIM {}", simulate(workers, steps).await);
}
