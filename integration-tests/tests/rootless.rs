//! Rootless kilnd: an unprivileged user runs `rootlesskit --net=host --copy-up=/etc
//! kilnd --rootless` (the harness's [`Topology::Rootless`]). Root in a step is that
//! user, other ids its subordinate ids; the images are the same as a root daemon's,
//! owners included; what needs real root (or ids the user was not given) fails saying
//! so; and `kiln` finds the
//! daemon's socket under `$XDG_RUNTIME_DIR`. (Every conformance group also runs on
//! a rootless daemon: `conformance_<group>_rootless`.)

use kiln_integration_tests::{
    BuildContext, Daemon, Topology, bin_dir, dockerfile_args, registry, registry_mirror_toml,
    rootless_kilnd, rootless_kilnd_on, rootless_user,
};
use serde_json::Value;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The subordinate id that id `n` (>= 1) inside maps to, from `/etc/subuid`-style `file`.
fn subordinate(file: &str, user: &str, n: u32) -> u32 {
    let text = std::fs::read_to_string(file).expect("read subordinate ids");
    let start: u32 = text
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(user)).then(|| f.next().and_then(|s| s.parse().ok()))?
        })
        .expect("the user's range");
    start + n - 1
}

/// Waits (at most 20 s) until `sock` exists or `child` exits; its exit status if it did.
fn wait_listening(
    child: &mut std::process::Child,
    sock: &Path,
) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while !sock.exists() && start.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The host pid of the kilnd whose command line names `dir`.
fn kilnd_pid(dir: &Path) -> u32 {
    let needle = dir.display().to_string();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("/bin/kilnd"))
            && args.iter().any(|a| a.contains(&needle))
        {
            return pid;
        }
    }
    panic!("no kilnd process for {needle}");
}

/// `Uid:`/`Gid:` of /proc/PID/status: the real id.
fn proc_id(pid: u32, key: &str) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("id")
}

/// A build context of `files` (path, content).
fn context(files: &[(&str, &str)]) -> BuildContext {
    let (_, dockerfile) = files
        .iter()
        .find(|(p, _)| *p == "Dockerfile")
        .expect("a Dockerfile");
    let ctx = BuildContext::new(dockerfile).expect("context");
    for (p, content) in files.iter().filter(|(p, _)| *p != "Dockerfile") {
        ctx.file(p, content).expect("file");
    }
    ctx
}

fn build_ok(d: &Daemon, ctx: &Path, extra: &[&str]) -> String {
    let mut args = vec!["build", "--progress", "plain"];
    args.extend(dockerfile_args());
    args.extend_from_slice(extra);
    let out = d.kiln(ctx, &args).expect("run kiln");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "build failed:\n{err}\n--- kilnd ---\n{}",
        std::fs::read_to_string(d.dir.path().join("kilnd.log")).unwrap_or_default()
    );
    err
}

#[test]
fn root_in_a_step_is_the_user_and_other_ids_its_subordinate_ids() {
    let user = rootless_user().expect("test user");
    let d = Daemon::start(Topology::Rootless).expect("rootless daemon");
    // the daemon is the user's process on the host
    let pid = kilnd_pid(d.dir.path());
    assert_eq!(proc_id(pid, "Uid:"), user.uid, "kilnd's host uid");
    assert_eq!(proc_id(pid, "Gid:"), user.gid, "kilnd's host gid");
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\n\
         RUN id -u > /whoami && cat /proc/self/uid_map > /uid_map \
         && echo x > /owned && chown 1000:2000 /owned\n",
    )]);
    let out = tempfile::tempdir().expect("tmp");
    let dest = format!("type=local,dest={}", out.path().display());
    build_ok(&d, ctx.path(), &["--output", &dest]);
    let read = |p: &str| std::fs::read_to_string(out.path().join(p)).expect("read");
    assert_eq!(read("whoami").trim(), "0");
    // root inside is the user outside; the rest are subordinate ids
    let map = read("uid_map");
    let first: Vec<&str> = map
        .lines()
        .next()
        .expect("map")
        .split_whitespace()
        .collect();
    assert_eq!(first, ["0", &user.uid.to_string(), "1"], "{map}");
    // in the export the file keeps the owner the step gave it
    let md = std::fs::metadata(out.path().join("owned")).expect("owned");
    assert_eq!((md.uid(), md.gid()), (1000, 2000));
    // on disk, in the daemon's snapshot, that owner is a subordinate id
    let want = (
        subordinate("/etc/subuid", &user.name, 1000),
        subordinate("/etc/subgid", &user.name, 2000),
    );
    let found = find_named(&d.dir.path().join("root"), "owned").expect("the step's snapshot");
    let md = std::fs::symlink_metadata(&found).expect("stat");
    assert_eq!((md.uid(), md.gid()), want, "{}", found.display());
}

/// The first file named `name` under `dir` (not following links).
fn find_named(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let ft = e.file_type().ok()?;
        if e.file_name() == name && ft.is_file() {
            return Some(p);
        }
        if ft.is_dir()
            && let Some(f) = find_named(&p, name)
        {
            return Some(f);
        }
    }
    None
}

/// The `rootfs.diff_ids` of the image config in the OCI tarball `tar`.
fn diff_ids(tar: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tmp");
    let st = Command::new("tar")
        .arg("-xf")
        .arg(tar)
        .arg("-C")
        .arg(dir.path())
        .status()
        .expect("tar");
    assert!(st.success());
    let json = |digest: &str| -> Value {
        let hex = digest.trim_start_matches("sha256:");
        serde_json::from_slice(
            &std::fs::read(dir.path().join("blobs/sha256").join(hex)).expect("blob"),
        )
        .expect("json")
    };
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).expect("index"))
            .expect("index json");
    let manifest = json(index["manifests"][0]["digest"].as_str().expect("manifest"));
    let config = json(manifest["config"]["digest"].as_str().expect("config"));
    config["rootfs"]["diff_ids"]
        .as_array()
        .expect("diff_ids")
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect()
}

/// A Dockerfile with owners from COPY --chown and chown in RUN, links, whiteouts and
/// opaque directories, and with `set_id`, set-uid/set-gid modes on files and
/// directories a later step copies up.
fn layers_dockerfile(set_id: bool) -> String {
    let (tool, dir) = if set_id {
        ("4755", "2750")
    } else {
        ("0755", "0750")
    };
    format!(
        "FROM busybox\n\
         COPY --chown=1000:1000 a.txt /app/a.txt\n\
         COPY --chmod={tool} tool /app/tool\n\
         RUN mkdir -p /d/sub /e && echo x > /d/sub/f && echo y > /d/g \\
         && ln -s /app/a.txt /link && ln /app/tool /app/hard \\
         && chown -R 65534:65534 /d && chmod {dir} /d && chmod 1777 /e \\
         && echo z > /e/gone\n\
         RUN rm -rf /d/sub /e/gone /link && mkdir /d/sub && echo w > /d/sub/new \\
         && chown 123:456 /d/sub/new\n"
    )
}

/// The `rootfs.diff_ids` of `dockerfile` built on `topology` with kilnd.toml `config`
/// (timestamps rewritten to SOURCE_DATE_EPOCH=0, so equal trees give equal layers).
fn built_layers(topology: Topology, config: &str, dockerfile: &str) -> Vec<String> {
    let ctx = context(&[
        ("Dockerfile", dockerfile),
        ("a.txt", "hello\n"),
        ("tool", "#!/bin/sh\necho tool\n"),
    ]);
    let d = Daemon::start_with_config(topology, config).expect("daemon");
    let tar = d.dir.path().join("out.tar");
    let dest = format!("type=oci,dest={},rewrite-timestamp=true", tar.display());
    build_ok(
        &d,
        ctx.path(),
        &["--opt", "build-arg:SOURCE_DATE_EPOCH=0", "--output", &dest],
    );
    diff_ids(&tar)
}

const FUSE: &str = "[worker.oci]\nsnapshotter = \"fuse-overlayfs\"\n";
const NATIVE: &str = "[worker.oci]\nsnapshotter = \"native\"\n";

#[test]
fn copied_snapshots_make_the_same_layers_as_a_root_daemon() {
    // where nothing mounts, snapshots are copies; a view turned back into an upper
    // gives the layers an overlay's would, set-id modes included
    let df = layers_dockerfile(true);
    let root = built_layers(Topology::AllInOne, "", &df);
    assert_eq!(built_layers(Topology::Rootless, NATIVE, &df), root);
}

#[test]
fn a_rootless_daemon_makes_the_same_layers_as_a_root_one() {
    // every layer byte for byte the same, set-id modes included
    let df = layers_dockerfile(true);
    let root = built_layers(Topology::AllInOne, "", &df);
    assert_eq!(root.len(), 5, "{root:?}");
    assert_eq!(built_layers(Topology::Rootless, "", &df), root);
}

#[test]
fn fuse_overlayfs_snapshots_make_the_same_layers_but_for_set_id_bits() {
    // fuse-overlayfs (where a kernel cannot mount overlayfs in a user namespace)
    // makes the same layers, its opaque marks on new directories removed
    let df = layers_dockerfile(false);
    let root = built_layers(Topology::AllInOne, "", &df);
    assert_eq!(built_layers(Topology::Rootless, FUSE, &df), root);
    // what it does not keep (README): set-id bits of what it copies up
    let df = layers_dockerfile(true);
    let root = built_layers(Topology::AllInOne, "", &df);
    let fuse = built_layers(Topology::Rootless, FUSE, &df);
    assert_eq!(fuse[..3], root[..3], "the layers before any copy-up");
    assert_ne!(
        fuse[3], root[3],
        "fuse-overlayfs kept set-id bits on copy-up: update the README"
    );
}

#[test]
fn what_needs_real_root_fails_saying_why() {
    let user = rootless_user().expect("test user");
    // security.insecure, even where the config and the build allow it
    let d = Daemon::start_with_config(
        Topology::Rootless,
        "insecure-entitlements = [\"security.insecure\"]",
    )
    .expect("rootless daemon");
    let ctx = context(&[("Dockerfile", "FROM busybox\nRUN --security=insecure true\n")]);
    let mut args = vec![
        "build",
        "--progress",
        "plain",
        "--allow",
        "security.insecure",
    ];
    args.extend(dockerfile_args());
    let out = d.kiln(ctx.path(), &args).expect("kiln");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("security.insecure: not available on a rootless worker"),
        "{err}"
    );
    // an owner outside the user's subordinate ids
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM busybox\nCOPY --chown=70000:70000 f /f\n",
        ),
        ("f", "x\n"),
    ]);
    let mut args = vec!["build", "--progress", "plain"];
    args.extend(dockerfile_args());
    let out = d.kiln(ctx.path(), &args).expect("kiln");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("owner 70000:70000 is outside the ids kilnd's user namespace maps")
            && err.contains("Dockerfile:2"),
        "{err}"
    );
    // the daemon is still there for the next build
    let ctx = context(&[("Dockerfile", "FROM busybox\nRUN true\n")]);
    build_ok(&d, ctx.path(), &[]);

    // bridge networking needs root on the host
    let e =
        match Daemon::start_with_config(Topology::Rootless, "[worker]\nnetworkMode = \"bridge\"\n")
        {
            Ok(_) => panic!("a rootless daemon started in bridge mode"),
            Err(e) => format!("{e:#}"),
        };
    assert!(
        e.contains("rootless: bridge network mode needs root"),
        "{e}"
    );

    // on a root inside an overlayfs nothing works (overlayfs refuses it as upper
    // layer, fuse-overlayfs and copies cannot make whiteouts there): kilnd tries
    // each and fails at start saying what rootless snapshots need
    let dir = tempfile::Builder::new()
        .prefix("kiln-rootless-ovl-")
        .tempdir()
        .expect("tmp");
    let d = |n: &str| dir.path().join(n);
    for n in ["lower", "upper", "work", "merged"] {
        std::fs::create_dir_all(d(n)).expect("mkdir");
    }
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            d("lower").display(),
            d("upper").display(),
            d("work").display()
        ))
        .arg(d("merged"))
        .status()
        .expect("mount");
    assert!(st.success(), "mount the overlay");
    let start_on_overlay =
        |name: &str, extra: &[&str]| -> (Option<std::process::ExitStatus>, String) {
            let home = d("merged").join(name);
            std::fs::create_dir_all(&home).expect("mkdir");
            let sock = home.join("kilnd.sock");
            let log = d(&format!("{name}.log"));
            let mut args = vec![
                "--root".to_string(),
                home.join("root").display().to_string(),
                "--addr".into(),
                format!("unix://{}", sock.display()),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            let mut child = rootless_kilnd(user, &home, &args, &[])
                .expect("command")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log"))
                .spawn()
                .expect("kilnd");
            let exited = wait_listening(&mut child, &sock);
            let _ = child.kill();
            let _ = child.wait();
            (exited, std::fs::read_to_string(&log).unwrap_or_default())
        };
    let (exited, log) = start_on_overlay("auto", &[]);
    let (forced, err) = start_on_overlay("forced", &["--oci-worker-snapshotter", "overlayfs"]);
    let _ = Command::new("umount").arg("-l").arg(d("merged")).status();
    assert!(exited.is_some_and(|s| !s.success()), "{log}");
    assert!(
        log.contains("snapshotter: overlayfs, fuse-overlayfs or copies cannot be mounted here")
            && log.contains("Linux 5.11 or later"),
        "{log}"
    );
    assert!(forced.is_some_and(|s| !s.success()), "{err}");
    assert!(
        err.contains("snapshotter: overlayfs cannot be mounted here")
            && err.contains("Linux 5.11 or later"),
        "{err}"
    );

    // the user's kilnd without rootlesskit says how to start it
    let out = Command::new("setpriv")
        .arg(format!("--reuid={}", user.name))
        .arg(format!("--regid={}", user.name))
        .arg("--init-groups")
        .arg(bin_dir().join("kilnd"))
        .args(["--rootless", "--root", "/nonexistent/kiln"])
        .output()
        .expect("kilnd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("runs as uid {}", user.uid))
            && err.contains("rootlesskit --net=host --copy-up=/etc kilnd --rootless"),
        "{err}"
    );
}

#[test]
fn kiln_finds_a_rootless_daemon_under_xdg_runtime_dir() {
    let user = rootless_user().expect("test user");
    let dir = tempfile::Builder::new()
        .prefix("kiln-rootless-defaults-")
        .tempdir()
        .expect("tmp");
    let config_dir = dir.path().join("config/kiln");
    std::fs::create_dir_all(&config_dir).expect("mkdir");
    std::fs::write(config_dir.join("kilnd.toml"), registry_mirror_toml()).expect("config");
    let data = dir.path().join("data");
    let config_home = dir.path().join("config");
    // no --root, --addr or --config: the user's defaults
    let log = dir.path().join("kilnd.log");
    let mut child = rootless_kilnd(
        user,
        dir.path(),
        &[],
        &[
            ("XDG_DATA_HOME", &data.display().to_string()),
            ("XDG_CONFIG_HOME", &config_home.display().to_string()),
        ],
    )
    .expect("command")
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).expect("log"))
    .spawn()
    .expect("start");
    let sock = dir.path().join("run/kiln/kilnd.sock");
    if let Some(st) = wait_listening(&mut child, &sock) {
        panic!(
            "kilnd exited with {st}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(sock.exists(), "no socket under XDG_RUNTIME_DIR: {logs}");
    // state under XDG_DATA_HOME/kiln
    assert!(data.join("kiln").is_dir(), "{logs}");
    let ctx = context(&[("Dockerfile", "FROM busybox\nRUN echo hi > /hi\n")]);
    let mut args = vec!["build", "--progress", "plain"];
    args.extend(dockerfile_args());
    let out = Command::new(bin_dir().join("kiln"))
        .args(&args)
        .current_dir(ctx.path())
        .env_remove("KILN_HOST")
        .env_remove("BUILDKIT_HOST")
        .env("XDG_RUNTIME_DIR", dir.path().join("run"))
        .output()
        .expect("kiln");
    let _ = child.kill();
    let _ = child.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    if Path::new("/run/kiln/kilnd.sock").exists() {
        // a system daemon comes first; the rootless one is found only without it
        eprintln!("a system kilnd listens on /run/kiln/kilnd.sock: it is used first");
        return;
    }
    assert!(
        out.status.success(),
        "kiln did not reach the rootless daemon: {err}\n--- kilnd ---\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(err.contains("echo hi"), "{err}");
}

#[test]
fn a_rootless_worker_joins_a_farm_beside_a_root_one() {
    use kiln_integration_tests::farm::{
        Farm, ProcessFarm, finished, placements, stages_dockerfile,
    };
    let user = rootless_user().expect("test user");
    // worker 0 as root, worker 1 rootless; each with 2 step slots
    let farm = ProcessFarm::start(&[&[], &["--rootless"]], "").expect("farm");
    let pid = kilnd_pid(&farm.dir.path().join("w1-rootless"));
    assert_eq!(
        proc_id(pid, "Uid:"),
        user.uid,
        "the rootless worker's host uid"
    );
    let ctx = BuildContext::new(&stages_dockerfile(8, 1)).expect("context");
    let build = farm
        .spawn_build(ctx.path(), &["--output", "type=local,dest=out"])
        .expect("build");
    let progress = finished(build, &farm).expect("build");
    for i in 0..8 {
        let got =
            std::fs::read_to_string(ctx.path().join(format!("out/out/out{i}"))).unwrap_or_default();
        assert_eq!(got, format!("stage{i}\n"), "{progress}");
    }
    // steps ran on both, and results moved between the root and the rootless one
    let used: Vec<String> = placements(&progress).into_iter().map(|(_, w)| w).collect();
    for i in 0..2 {
        let id = farm.worker_id(i);
        assert!(
            used.contains(&id),
            "no step on worker {i} ({id}): {used:?}\n{progress}"
        );
    }
}

#[test]
fn under_slirp4netns_steps_get_the_isolated_network_rootlesskit_made() {
    let user = rootless_user().expect("test user");
    let dir = tempfile::Builder::new()
        .prefix("kiln-rootless-slirp-")
        .tempdir()
        .expect("tmp");
    // inside slirp4netns the host's loopback is 10.0.2.2
    let port = registry()
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_string();
    let mirror = format!("10.0.2.2:{port}");
    let config = dir.path().join("kilnd.toml");
    std::fs::write(
        &config,
        format!("[registry.\"docker.io\"]\nmirrors = [\"{mirror}\"]\n[registry.\"{mirror}\"]\nhttp = true\n"),
    )
    .expect("config");
    let sock = dir.path().join("kilnd.sock");
    let log = dir.path().join("kilnd.log");
    let mut child = rootless_kilnd_on(
        "slirp4netns",
        user,
        dir.path(),
        &[
            "--config".into(),
            config.display().to_string(),
            "--root".into(),
            dir.path().join("root").display().to_string(),
            "--addr".into(),
            format!("unix://{}", sock.display()),
        ],
        &[],
    )
    .expect("command")
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).expect("log"))
    .spawn()
    .expect("start");
    if let Some(st) = wait_listening(&mut child, &sock) {
        panic!(
            "kilnd exited with {st}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN ip -o addr > /addrs && ip route > /routes\n",
    )]);
    let out = tempfile::tempdir().expect("out");
    let mut args = vec!["build".to_string(), "--progress".into(), "plain".into()];
    args.extend(dockerfile_args().iter().map(|s| s.to_string()));
    args.extend([
        "--output".into(),
        format!("type=local,dest={}", out.path().display()),
    ]);
    let res = Command::new(bin_dir().join("kiln"))
        .arg("--addr")
        .arg(format!("unix://{}", sock.display()))
        .args(&args)
        .current_dir(ctx.path())
        .output()
        .expect("kiln");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        res.status.success(),
        "{}\n--- kilnd ---\n{}",
        String::from_utf8_lossy(&res.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let addrs = std::fs::read_to_string(out.path().join("addrs")).expect("addrs");
    let routes = std::fs::read_to_string(out.path().join("routes")).expect("routes");
    // slirp4netns's tap device and address, and nothing of the host's
    assert!(
        addrs.contains("tap0") && addrs.contains("10.0.2.100/24"),
        "{addrs}"
    );
    assert!(routes.contains("default via 10.0.2.2"), "{routes}");
    let host = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["-o", "-4", "addr"])
            .output()
            .expect("ip")
            .stdout,
    )
    .into_owned();
    for line in host.lines().filter(|l| !l.contains(" lo ")) {
        let Some(a) = line.split_whitespace().nth(3) else {
            continue;
        };
        assert!(!addrs.contains(a), "the step saw the host's {a}: {addrs}");
    }
}
