//! On the containerd backend the worker's snapshots live in containerd's snapshotter:
//! a build leaves committed `kiln/<id>` snapshots whose containerd parents are kiln's,
//! the outputs read them right, and `kiln prune` removes them from containerd.

use kiln_integration_tests::{
    Backend, BuildContext, Daemon, Topology, containerd_snapshots as snapshots, dockerfile_args,
    parse_size,
};
use std::path::{Path, PathBuf};
use std::process::Command;

fn meta(worker: &Path, id: &str) -> serde_json::Value {
    let p = worker.join("snapshots").join(id).join("meta.json");
    serde_json::from_slice(&std::fs::read(&p).expect("meta.json")).expect("json")
}

#[test]
fn a_build_keeps_its_snapshots_in_containerd_and_prune_removes_them() {
    let Some(backend) = Backend::containerd() else {
        return;
    };
    let Backend::Containerd { address } = &backend else {
        return;
    };
    let d = Daemon::start_on(Topology::AllInOne, &backend, "").expect("daemon");
    let ns = d.containerd_namespace.clone().expect("namespace");
    let worker: PathBuf = d.dir.path().join("root/all/worker");
    let c = BuildContext::new("FROM busybox\nRUN echo hi > /hello\nCOPY f /f\n").expect("ctx");
    c.file("f", "copied\n").expect("write");
    let mut args = dockerfile_args();
    args.extend(["--output", "type=local,dest=out"]);
    let out = d.build(c.path(), &args).expect("build");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.logs()
    );
    assert_eq!(
        std::fs::read_to_string(c.path().join("out/hello")).expect("hello"),
        "hi\n"
    );
    assert_eq!(
        std::fs::read_to_string(c.path().join("out/f")).expect("f"),
        "copied\n"
    );
    assert!(c.path().join("out/bin/busybox").exists(), "base layer");
    // the image export reads the layers from containerd's dirs
    let mut args = dockerfile_args();
    args.extend(["--output", "type=oci,dest=img.tar"]);
    let out = d.build(c.path(), &args).expect("build");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = kiln_integration_tests::tar_names(&c.path().join("img.tar")).expect("tar");
    assert!(names.iter().any(|n| n == "index.json"), "{names:?}");

    let listed = snapshots(address, &ns);
    assert!(!listed.is_empty());
    let mut ids = Vec::new();
    for (name, row) in &listed {
        assert_eq!(row.kind, "Committed", "{name}: {listed:?}");
        let id = name
            .strip_prefix("kiln/")
            .unwrap_or_else(|| panic!("{name} is not kiln's"));
        // containerd's parent is kiln's parent
        let m = meta(&worker, id);
        let parent = m["parent"].as_str().map(|p| format!("kiln/{p}"));
        assert_eq!(Some(row.parent.clone()).filter(|p| !p.is_empty()), parent);
        // kiln's diff is containerd's dir
        let diff = std::fs::read_link(worker.join("snapshots").join(id).join("diff"))
            .expect("diff is a link");
        assert!(
            diff.to_string_lossy()
                .contains("io.containerd.snapshotter.v1.overlayfs/snapshots/"),
            "{}",
            diff.display()
        );
        ids.push(id.to_string());
    }
    // the COPY's snapshot holds /f, its parent the RUN's /hello, down to the base
    let copy = ids
        .iter()
        .find(|id| {
            worker.join("snapshots").join(id).join("diff/f").exists()
                && meta(&worker, id)["kind"] == "built"
        })
        .expect("the COPY's snapshot");
    let run = meta(&worker, copy)["parent"]
        .as_str()
        .expect("parent")
        .to_string();
    assert_eq!(
        std::fs::read_to_string(worker.join("snapshots").join(&run).join("diff/hello"))
            .expect("the RUN's diff"),
        "hi\n"
    );
    assert_eq!(
        listed[&format!("kiln/{copy}")].parent,
        format!("kiln/{run}")
    );
    let base = meta(&worker, &run)["parent"]
        .as_str()
        .expect("parent")
        .to_string();
    assert_eq!(meta(&worker, &base)["kind"], "image");

    let out = d.kiln(c.path(), &["prune"]).expect("prune");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = snapshots(address, &ns);
    assert!(left.is_empty(), "left in containerd: {left:?}");
    assert_eq!(
        std::fs::read_dir(worker.join("snapshots"))
            .expect("snapshots")
            .count(),
        0
    );
}

#[test]
fn du_adds_up_to_the_disk_of_kilns_and_containerds_dirs() {
    let Some(backend) = Backend::containerd() else {
        return;
    };
    let d = Daemon::start_on(Topology::AllInOne, &backend, "").expect("daemon");
    let worker: PathBuf = d.dir.path().join("root/all/worker");
    let c = BuildContext::new(
        "FROM busybox\nRUN head -c 300000 /dev/urandom > /big\nCOPY f /f\nRUN cp /f /g\n",
    )
    .expect("ctx");
    c.file("f", &"x".repeat(100_000)).expect("write");
    let out = d.build(c.path(), &dockerfile_args()).expect("build");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.kiln(c.path(), &["du"]).expect("du");
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    let listed = listing
        .lines()
        .find_map(|l| l.strip_prefix("Total:"))
        .map(|t| parse_size(t.trim()))
        .unwrap_or_else(|| panic!("no total in:\n{listing}"));
    // kiln's dirs and, for each snapshot, containerd's dir of it (fs and work), in one
    // du so a hard-linked file counts once
    let mut dirs: Vec<PathBuf> = ["snapshots", "content", "cache-mounts"]
        .iter()
        .map(|s| worker.join(s))
        .filter(|p| p.exists())
        .collect();
    for e in std::fs::read_dir(worker.join("snapshots")).expect("snapshots") {
        let id = e.expect("entry").file_name().to_string_lossy().to_string();
        let m = meta(&worker, &id);
        let fs = PathBuf::from(m["containerd"]["dir"].as_str().expect("containerd dir"));
        dirs.push(fs.parent().expect("snapshot dir").to_path_buf());
    }
    let du = Command::new("du")
        .args(["-s", "-c", "--block-size=1"])
        .args(&dirs)
        .output()
        .expect("du");
    let on_disk: f64 = String::from_utf8_lossy(&du.stdout)
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("du total");
    assert!(
        (listed - on_disk).abs() <= on_disk * 0.01,
        "kiln du total {listed} vs {on_disk} bytes on disk:\n{listing}"
    );
}
