//! The worker's end-to-end cases, shared by `worker.rs` (runc) and
//! `worker_containerd.rs` (containerd): RUN mounts (cache, tmpfs, secret, ssh), network
//! modes, entitlements, file ops and escape attempts, with a real kilnd and overlayfs.

use kiln_integration_tests::{Backend, BuildContext, Daemon, Topology, dockerfile_args};
use std::path::Path;

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = dockerfile_args();
    v.extend_from_slice(extra);
    v
}

fn read(out: &Path, p: &str) -> String {
    std::fs::read_to_string(out.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// Every regular file under `dir` whose contents contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file()
                && let Ok(data) = std::fs::read(&p)
                && data.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

pub fn cache_mount_persists_across_builds_and_never_lands_in_the_image(b: &Backend) {
    let d = Daemon::start_on(Topology::AllInOne, b, "").expect("daemon");
    let df = |n: &str| {
        format!(
            "FROM busybox\n\
             RUN --mount=type=cache,target=/cache,id=counter \
             sh -c 'echo {n} > /dev/null; c=$(cat /cache/n 2>/dev/null || echo 0); echo $((c+1)) > /cache/n; cp /cache/n /seen'\n\
             RUN --mount=type=cache,target=/owned,uid=1000,gid=1000,mode=0750 stat -c '%u:%g:%a' /owned > /perm\n\
             RUN --mount=type=cache,target=/priv,sharing=private,id=counter cat /priv/n > /private-seen\n\
             RUN --mount=type=cache,target=/ro,id=counter,readonly sh -c 'cat /ro/n > /ro-seen; ! touch /ro/x 2>/dev/null'\n"
        )
    };
    let c = BuildContext::new(&df("first")).expect("context");
    d.build(c.path(), &args(&["--output", "type=local,dest=out1"]))
        .expect("build 1");
    let out1 = c.path().join("out1");
    assert_eq!(read(&out1, "seen"), "1\n");
    assert_eq!(read(&out1, "perm"), "1000:1000:750\n");
    assert_eq!(read(&out1, "private-seen"), "1\n");
    assert_eq!(read(&out1, "ro-seen"), "1\n");
    for m in ["cache", "owned", "priv", "ro"] {
        assert!(
            out1.join(m).symlink_metadata().is_err(),
            "/{m} mount point leaked into the image"
        );
    }
    // a different step (not a cache hit) sees what the first build left in the cache
    std::fs::write(c.path().join("Dockerfile"), df("second")).expect("write");
    d.build(c.path(), &args(&["--output", "type=local,dest=out2"]))
        .expect("build 2");
    assert_eq!(read(&c.path().join("out2"), "seen"), "2\n");
}

pub fn tmpfs_mount_has_its_size_and_leaves_nothing_behind(b: &Backend) {
    let d = Daemon::start_on(Topology::AllInOne, b, "").expect("daemon");
    let c = BuildContext::new(
        "FROM busybox\n\
         RUN --mount=type=tmpfs,target=/scratch,size=2m sh -c 'echo data > /scratch/f && df -k /scratch | tail -n 1 | awk \"{print \\$2}\" > /size && grep \" /scratch \" /proc/mounts | cut -d\" \" -f3 > /fstype'\n",
    )
    .expect("context");
    d.build(c.path(), &args(&["--output", "type=local,dest=out"]))
        .expect("build");
    let out = c.path().join("out");
    assert_eq!(read(&out, "size"), "2048\n");
    assert_eq!(read(&out, "fstype"), "tmpfs\n");
    assert!(
        out.join("scratch").symlink_metadata().is_err(),
        "tmpfs mount point leaked"
    );
}

const SECRET: &str = "s3cr3t-file-value-8d1f";
const ENV_SECRET: &str = "s3cr3t-env-value-77aa";

pub fn secrets_reach_the_step_as_file_and_env_but_never_the_image_or_logs(b: &Backend) {
    let d = Daemon::start_on(Topology::AllInOne, b, "").expect("daemon");
    let c = BuildContext::new(
        "FROM busybox\n\
         RUN --mount=type=secret,id=tok,uid=1000,mode=0440 sh -c 'stat -c \"%u %a\" /run/secrets/tok > /secret-meta; wc -c < /run/secrets/tok > /secret-len; sha256sum /run/secrets/tok | cut -c1-64 > /secret-sum'\n\
         RUN --mount=type=secret,id=envtok,env=TOKEN sh -c 'echo ${#TOKEN} > /env-len'\n\
         RUN --mount=type=secret,id=absent sh -c 'test ! -e /run/secrets/absent && echo ok > /optional'\n",
    )
    .expect("context");
    // outside the context, which is synced to the daemon
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret_file = secret_dir.path().join("secret.txt");
    std::fs::write(&secret_file, SECRET).expect("write secret");
    let secret_arg = format!("id=tok,src={}", secret_file.display());
    let out = {
        let mut cmd_args = args(&[
            "--output",
            "type=local,dest=out",
            "--secret",
            &secret_arg,
            "--secret",
            "id=envtok,env=KILN_TEST_ENV_SECRET",
        ]);
        cmd_args.insert(0, "--progress");
        cmd_args.insert(1, "plain");
        cmd_args.insert(0, "build");
        std::process::Command::new(kiln_integration_tests::bin_dir().join("kiln"))
            .arg("--addr")
            .arg(&d.addr)
            .args(&cmd_args)
            .current_dir(c.path())
            .env("KILN_TEST_ENV_SECRET", ENV_SECRET)
            .output()
            .expect("run kiln")
    };
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "build failed: {stderr}\n{}", d.logs());
    let o = c.path().join("out");
    assert_eq!(read(&o, "secret-meta"), "1000 440\n");
    assert_eq!(read(&o, "secret-len"), format!("{}\n", SECRET.len()));
    let sum = {
        use std::process::Command;
        let s = Command::new("sha256sum")
            .arg(&secret_file)
            .output()
            .expect("sha256sum");
        String::from_utf8_lossy(&s.stdout)[..64].to_string()
    };
    assert_eq!(read(&o, "secret-sum").trim(), sum);
    assert_eq!(read(&o, "env-len"), format!("{}\n", ENV_SECRET.len()));
    assert_eq!(read(&o, "optional"), "ok\n");
    assert!(
        o.join("run/secrets").symlink_metadata().is_err(),
        "secret mount point leaked"
    );
    for v in [SECRET, ENV_SECRET] {
        assert!(
            files_containing(&o, v.as_bytes()).is_empty(),
            "secret in the image"
        );
        assert!(!stderr.contains(v), "secret in the client output");
        assert!(!d.logs().contains(v), "secret in the daemon logs");
        // nothing the daemon keeps on disk (snapshots, cache, tmp) holds it
        let state = d.dir.path().join("root");
        assert!(
            files_containing(&state, v.as_bytes()).is_empty(),
            "secret stored by the daemon"
        );
    }

    // a required secret the client does not have fails the step
    let c2 = BuildContext::new(
        "FROM busybox\nRUN --mount=type=secret,id=missing,required=true cat /run/secrets/missing\n",
    )
    .expect("context");
    let err = d
        .build(c2.path(), &args(&["--output", "type=local,dest=out"]))
        .expect_err("missing secret must fail");
    assert!(
        err.to_string().contains("secret missing: not found"),
        "{err}"
    );
}

/// A plain HTTP server on the host's loopback, answering "host-side".
struct HostHttp {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl HostHttp {
    fn start() -> HostHttp {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("index.html"), "host-side\n").expect("write");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let child = std::process::Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 http.server");
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed().as_secs() < 10, "http server did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        HostHttp {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for HostHttp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn network_none_has_only_loopback_and_host_mode_is_the_host_network(b: &Backend) {
    let http = HostHttp::start();
    // network mode host: steps share the host's network, its loopback included
    let d = Daemon::start_on(Topology::AllInOne, b, "[worker]\nnetworkMode = \"host\"")
        .expect("daemon");
    let c = BuildContext::new(&format!(
        "FROM busybox\n\
         RUN --network=none sh -c 'mkdir -p /www && echo in-sandbox > /www/index.html && httpd -p 127.0.0.1:8099 -h /www && sleep 0.3; wget -q -O /loopback http://127.0.0.1:8099/index.html; if wget -q -O - http://127.0.0.1:{p}/ ; then echo reached > /none-host; else echo blocked > /none-host; fi; rm -rf /www'\n\
         RUN wget -q -O /default-host http://127.0.0.1:{p}/\n",
        p = http.port
    ))
    .expect("context");
    d.build(c.path(), &args(&["--output", "type=local,dest=out"]))
        .expect("build");
    let out = c.path().join("out");
    assert_eq!(
        read(&out, "loopback"),
        "in-sandbox\n",
        "loopback is up in the sandbox"
    );
    assert_eq!(
        read(&out, "none-host"),
        "blocked\n",
        "the host is unreachable with --network=none"
    );
    assert_eq!(read(&out, "default-host"), "host-side\n");
}

pub fn host_network_and_insecure_need_entitlements_from_daemon_and_request(b: &Backend) {
    let df = "FROM busybox\nRUN --network=host true\n";
    let insecure = "FROM busybox\nRUN --security=insecure sh -c 'mkdir -p /m && mount -t tmpfs none /m && umount /m && rmdir /m && grep CapEff /proc/self/status > /caps'\n";
    // daemon does not allow
    let d = Daemon::start_on(Topology::AllInOne, b, "").expect("daemon");
    let c = BuildContext::new(df).expect("context");
    let err = d
        .build(c.path(), &args(&["--allow", "network.host"]))
        .expect_err("daemon config must refuse");
    assert!(err.to_string().contains("network.host"), "{err}");
    drop(d);

    let d = Daemon::start_on(
        Topology::AllInOne,
        b,
        "insecure-entitlements = [\"network.host\", \"security.insecure\"]",
    )
    .expect("daemon");
    let err = d
        .build(c.path(), &args(&[]))
        .expect_err("request without --allow must be refused");
    assert!(err.to_string().contains("network.host"), "{err}");
    d.build(c.path(), &args(&["--allow", "network.host"]))
        .expect("both grant network.host");

    let c = BuildContext::new(insecure).expect("context");
    let err = d
        .build(c.path(), &args(&["--allow", "network.host"]))
        .expect_err("insecure needs its own entitlement");
    assert!(err.to_string().contains("security.insecure"), "{err}");
    d.build(
        c.path(),
        &args(&[
            "--allow",
            "security.insecure",
            "--output",
            "type=local,dest=out",
        ]),
    )
    .expect("privileged run");
    // every capability the daemon itself may hold
    let bounding = std::fs::read_to_string("/proc/self/status")
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:").map(|v| v.trim().to_string()))
        .expect("CapBnd");
    assert_eq!(
        read(&c.path().join("out"), "caps")
            .split_whitespace()
            .last(),
        Some(bounding.as_str())
    );

    // a sandboxed step cannot mount
    let c = BuildContext::new("FROM busybox\nRUN mkdir -p /m && mount -t tmpfs none /m\n")
        .expect("context");
    d.build(c.path(), &args(&[]))
        .expect_err("sandbox must not mount");
}

/// A tar archive with raw entry names and link targets (no sanitising).
fn crafted_tar(entries: &[(&str, u8, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, data) in entries {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        let size = if *kind == b'0' { data.len() } else { 0 };
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = *kind;
        if *kind == b'2' || *kind == b'1' {
            h[157..157 + data.len()].copy_from_slice(data.as_bytes());
        }
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| *b as u32).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        out.extend_from_slice(&h);
        if size > 0 {
            out.extend_from_slice(data.as_bytes());
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
    }
    out.resize(out.len() + 1024, 0);
    out
}

pub fn copy_and_add_escapes_are_contained(b: &Backend) {
    let d = Daemon::start_on(Topology::AllInOne, b, "").expect("daemon");
    let tag = format!("kiln-escape-{}", std::process::id());
    let host_probe = format!("/tmp/{tag}");
    let c = BuildContext::new(&format!(
        "FROM busybox AS base\n\
         RUN rm -rf /var && mkdir -p /host-var-{tag} && ln -s /host-var-{tag} /var && ln -s /tmp/{tag}-abs /abs\n\
         FROM base\n\
         COPY evil/passwd /got-abs\n\
         COPY up /got-up\n\
         COPY inside.txt /var/planted\n\
         COPY inside.txt /abs/planted\n\
         RUN --mount=type=tmpfs,target=/var/mnt/deep --mount=type=cache,target=/abs/cache cat /var/planted > /via-run && ls /host-var-{tag} > /listing\n"
    ))
    .expect("context");
    c.file("etc/passwd", "context passwd\n").expect("write");
    c.file("inside.txt", "inside\n").expect("write");
    std::os::unix::fs::symlink("/etc", c.path().join("evil")).expect("symlink");
    std::os::unix::fs::symlink("../../../../../../etc/passwd", c.path().join("up"))
        .expect("symlink");
    d.build(c.path(), &args(&["--output", "type=local,dest=out"]))
        .expect("build");
    let out = c.path().join("out");
    assert_eq!(
        read(&out, "got-abs"),
        "context passwd\n",
        "an absolute symlink in the context resolves in the context"
    );
    assert_eq!(
        read(&out, "got-up"),
        "context passwd\n",
        "`..` in a symlink stops at the context root"
    );
    assert_eq!(
        read(&out, format!("host-var-{tag}/planted").as_str()),
        "inside\n",
        "/var -> /host-var resolves in the rootfs"
    );
    assert_eq!(
        read(&out, format!("tmp/{tag}-abs/planted").as_str()),
        "inside\n"
    );
    assert_eq!(read(&out, "via-run"), "inside\n");
    assert!(read(&out, "listing").contains("planted"));
    assert!(
        !Path::new(&format!("/host-var-{tag}")).exists(),
        "written on the host"
    );
    assert!(
        !out.join(format!("host-var-{tag}/mnt")).exists(),
        "mount stub under a symlinked parent left behind"
    );
    assert!(
        !Path::new(&format!("/tmp/{tag}-abs")).exists(),
        "written on the host"
    );

    // ADD of crafted archives: `..` entries, entries through a symlink to /, hard links out
    for (name, tar) in [
        (
            "dotdot",
            crafted_tar(&[(&format!("../../../../../../tmp/{tag}-dotdot"), b'0', "x")]),
        ),
        (
            "via-link",
            crafted_tar(&[
                ("root", b'2', "/"),
                (&format!("root/tmp/{tag}-link"), b'0', "x"),
            ]),
        ),
        (
            "hardlink",
            crafted_tar(&[("hl", b'1', "../../../../etc/passwd")]),
        ),
    ] {
        let c = BuildContext::new(&format!("FROM busybox\nADD {name}.tar /x/\n")).expect("context");
        std::fs::write(c.path().join(format!("{name}.tar")), tar).expect("write tar");
        let res = d.build(c.path(), &args(&["--output", "type=local,dest=out"]));
        assert!(
            res.is_err(),
            "{name}: a tar entry outside the destination must fail the build"
        );
    }
    for suffix in ["dotdot", "link"] {
        assert!(
            !Path::new(&format!("{host_probe}-{suffix}")).exists(),
            "{suffix} escaped to the host"
        );
    }
    // a well-formed archive is unpacked
    let c = BuildContext::new("FROM busybox\nADD ok.tar /x/\n").expect("context");
    std::fs::write(
        c.path().join("ok.tar"),
        crafted_tar(&[("d/f.txt", b'0', "hello"), ("d/l", b'2', "/etc/passwd")]),
    )
    .expect("tar");
    d.build(c.path(), &args(&["--output", "type=local,dest=out"]))
        .expect("build ok.tar");
    assert_eq!(read(&c.path().join("out"), "x/d/f.txt"), "hello");
    assert_eq!(
        std::fs::read_link(c.path().join("out/x/d/l")).expect("link"),
        Path::new("/etc/passwd")
    );
}

pub fn copy_link_chmod_exclude_and_add_url_with_checksum(b: &Backend) {
    let http = HostHttp::start();
    let body = "host-side\n";
    let sum = {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "printf '{}' | sha256sum | cut -c1-64",
                body.replace('\n', "\\n")
            ))
            .output()
            .expect("sha256sum");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let d = Daemon::start_on(Topology::AllInOne, b, "").expect("daemon");
    let c = BuildContext::new(&format!(
        "FROM busybox\n\
         RUN echo base > /base.txt\n\
         COPY --link a.txt /linked/a.txt\n\
         COPY --chmod=u+x,go-w run.sh /run.sh\n\
         COPY --exclude=*.skip dir/ /dir/\n\
         ADD --checksum=sha256:{sum} http://127.0.0.1:{p}/index.html /dl/\n\
         RUN cat /base.txt /linked/a.txt > /after-link && stat -c %a /run.sh > /run-mode && stat -c %a /dl/index.html > /dl-mode\n",
        p = http.port
    ))
    .expect("context");
    c.file("a.txt", "linked\n").expect("write");
    c.file("run.sh", "#!/bin/sh\n").expect("write");
    c.file("dir/keep.txt", "keep\n").expect("write");
    c.file("dir/drop.skip", "drop\n").expect("write");
    c.file("dir/sub/also.skip", "drop\n").expect("write");
    std::fs::set_permissions(
        c.path().join("run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .expect("chmod");
    d.build(c.path(), &args(&["--output", "type=local,dest=out"]))
        .expect("build");
    let out = c.path().join("out");
    assert_eq!(
        read(&out, "after-link"),
        "base\nlinked\n",
        "COPY --link merged onto the base"
    );
    assert_eq!(read(&out, "run-mode"), "744\n");
    assert_eq!(read(&out, "dir/keep.txt"), "keep\n");
    assert!(!out.join("dir/drop.skip").exists(), "--exclude");
    // as with BuildKit's pattern matcher, `*` does not cross directories
    assert_eq!(read(&out, "dir/sub/also.skip"), "drop\n");
    assert_eq!(read(&out, "dl/index.html"), body);
    assert_eq!(read(&out, "dl-mode"), "600\n");

    // a wrong checksum fails the step
    let c2 = BuildContext::new(&format!(
        "FROM busybox\nADD --checksum=sha256:{} http://127.0.0.1:{}/index.html /dl/\n",
        "0".repeat(64),
        http.port
    ))
    .expect("context");
    let err = d
        .build(c2.path(), &args(&["--output", "type=local,dest=out"]))
        .expect_err("checksum mismatch");
    assert!(err.to_string().contains("digest mismatch"), "{err}");

    // the linked layer exports as an image too
    d.build(
        c.path(),
        &args(&["--output", "type=oci,dest=img.tar,name=kiln-it/link:1"]),
    )
    .expect("oci export");
    assert!(c.path().join("img.tar").metadata().expect("img.tar").len() > 0);
}

pub fn cache_mount_seeded_from_a_stage_and_secrets_in_split_services(b: &Backend) {
    let d = Daemon::start_on(Topology::Split, b, "").expect("daemon");
    let c = BuildContext::new(
        "FROM busybox AS seed\n\
         RUN mkdir -p /seed && echo seeded > /seed/s.txt\n\
         FROM busybox\n\
         RUN --mount=type=cache,target=/c,from=seed,source=/seed sh -c 'cat /c/s.txt > /from-seed; echo more >> /c/s.txt'\n\
         RUN --mount=type=cache,target=/c2,from=seed,source=/seed,id=other cat /c2/s.txt > /second\n\
         RUN --mount=type=secret,id=tok,target=/tok cat /tok > /dev/null && echo ok > /secret-ok\n",
    )
    .expect("context");
    let secret_dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(secret_dir.path().join("tok"), SECRET).expect("write");
    let arg = format!("id=tok,src={}", secret_dir.path().join("tok").display());
    d.build(
        c.path(),
        &args(&["--output", "type=local,dest=out", "--secret", &arg]),
    )
    .expect("build");
    let out = c.path().join("out");
    assert_eq!(read(&out, "from-seed"), "seeded\n");
    assert_eq!(
        read(&out, "second"),
        "seeded\n",
        "another cache id is seeded afresh"
    );
    assert_eq!(read(&out, "secret-ok"), "ok\n");
    assert!(
        out.join("c").symlink_metadata().is_err() && out.join("tok").symlink_metadata().is_err()
    );
    assert!(files_containing(&out, SECRET.as_bytes()).is_empty());
}

pub fn ssh_mount_forwards_the_clients_agent(b: &Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = kiln_integration_tests::SshAgent::start(dir.path()).expect("ssh-agent");
    let sock = agent.sock.clone();
    let key = dir.path().join("key");
    let ok = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-test-key", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen");
    assert!(ok.success());
    let add = std::process::Command::new("ssh-add")
        .arg(&key)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .expect("ssh-add");
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let host_list = std::process::Command::new("ssh-add")
        .arg("-l")
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .expect("ssh-add -l");
    let host_list = String::from_utf8_lossy(&host_list.stdout).to_string();
    assert!(host_list.contains("kiln-test-key"));

    // the host's ssh-add, run inside the step with its own loader and libraries
    let c = BuildContext::new(
        "FROM busybox\n\
         RUN --mount=type=bind,source=sshbin,target=/sshbin --mount=type=ssh \
         sh -c '/sshbin/ld.so --library-path /sshbin /sshbin/ssh-add -l > /keys'\n",
    )
    .expect("context");
    let bin = c.path().join("sshbin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    std::fs::copy("/usr/bin/ssh-add", bin.join("ssh-add")).expect("copy ssh-add");
    std::fs::copy("/lib64/ld-linux-x86-64.so.2", bin.join("ld.so")).expect("copy loader");
    let ldd = std::process::Command::new("ldd")
        .arg("/usr/bin/ssh-add")
        .output()
        .expect("ldd");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        if let Some((name, rest)) = line.trim().split_once(" => ") {
            let path = rest.split_whitespace().next().unwrap_or_default();
            if path.starts_with('/') {
                std::fs::copy(path, bin.join(name)).expect("copy library");
            }
        }
    }
    let d = Daemon::start_on(Topology::AllInOne, b, "").expect("daemon");
    let ssh_arg = format!("default={}", sock.display());
    d.build(
        c.path(),
        &args(&["--output", "type=local,dest=out", "--ssh", &ssh_arg]),
    )
    .expect("build");
    let out = c.path().join("out");
    assert_eq!(
        read(&out, "keys"),
        host_list,
        "the step lists the client's keys"
    );
    assert!(
        out.join("run/buildkit").symlink_metadata().is_err(),
        "agent socket stub leaked"
    );

    // a required agent the client does not forward fails the step
    let c2 = BuildContext::new("FROM busybox\nRUN --mount=type=ssh,required=true true\n")
        .expect("context");
    let err = d.build(c2.path(), &args(&[])).expect_err("no agent");
    assert!(err.to_string().contains("ssh agent default"), "{err}");
}
