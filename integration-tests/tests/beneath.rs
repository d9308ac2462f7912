//! Every path kiln writes from untrusted names stays beneath its destination: image
//! layers, `ADD` archives, file ops, cache, bind and secret mounts, exports, and the
//! synced context of another client. Each test aims at a canary directory on the host
//! and ends by checking that the canary is as it was and that kilnd still builds.

use kiln_integration_tests::{BuildContext, Daemon, Topology, dockerfile_args, run};
use kiln_oci::raw_tar::{RawEntry as E, raw_tar};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A host directory the attacks aim at: `sentinel` (secret content, mode 0644) must stay
/// the only entry, unchanged. Owned by root, or for a rootless daemon by the user it
/// runs as, so the daemon could write there if a path escaped.
struct Canary {
    dir: tempfile::TempDir,
    owner: (u32, u32),
}

const SECRET: &str = "host secret 5c2b";

impl Canary {
    fn new(topology: Topology) -> Canary {
        let dir = tempfile::Builder::new()
            .prefix("kiln-canary-")
            .tempdir()
            .expect("canary");
        std::fs::write(dir.path().join("sentinel"), SECRET).expect("sentinel");
        let mut owner = (0, 0);
        if topology == Topology::Rootless {
            let u = kiln_integration_tests::rootless_user().expect("test user");
            owner = (u.uid, u.gid);
            for p in [dir.path().to_path_buf(), dir.path().join("sentinel")] {
                std::os::unix::fs::lchown(&p, Some(u.uid), Some(u.gid)).expect("chown");
            }
        }
        Canary { dir, owner }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn display(&self) -> String {
        self.path().display().to_string()
    }

    fn assert_untouched(&self) {
        let names: Vec<String> = std::fs::read_dir(self.path())
            .expect("canary")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["sentinel"], "written into the host canary dir");
        let s = self.path().join("sentinel");
        assert_eq!(std::fs::read_to_string(&s).expect("sentinel"), SECRET);
        let md = std::fs::symlink_metadata(&s).expect("sentinel");
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (self.owner.0, self.owner.1, 0o644)
        );
        for p in ["/pwned", "/etc/pwned", "/tmp/pwned"] {
            assert!(!Path::new(p).exists(), "{p} written on the host");
        }
    }
}

fn args(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = dockerfile_args().iter().map(|s| s.to_string()).collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// `kiln build` of `ctx` with `extra` flags; (success, stderr).
fn build(d: &Daemon, ctx: &Path, extra: &[&str]) -> (bool, String) {
    let mut full = vec!["build".to_string(), "--progress".into(), "plain".into()];
    full.extend(args(extra));
    let refs: Vec<&str> = full.iter().map(String::as_str).collect();
    let out = d.kiln(ctx, &refs).expect("kiln");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Builds `ctx` and exports its filesystem into a new dir.
fn build_local(d: &Daemon, ctx: &Path) -> tempfile::TempDir {
    let out = tempfile::tempdir().expect("out");
    let dest = format!("type=local,dest={}", out.path().display());
    let (ok, err) = build(d, ctx, &["--output", &dest]);
    assert!(ok, "build failed: {err}\n{}", d.logs());
    out
}

/// kilnd is still up and builds.
fn assert_still_builds(d: &Daemon) {
    let ctx = BuildContext::new("FROM busybox\nRUN echo alive > /alive\n").expect("ctx");
    let out = build_local(d, ctx.path());
    assert_eq!(
        std::fs::read_to_string(out.path().join("alive")).expect("alive"),
        "alive\n"
    );
}

/// Pushes an image whose layers are the given uncompressed tars to the test registry
/// as `REGISTRY/NAME:1`.
fn push_layers(name: &str, layers: &[Vec<u8>]) -> String {
    let blobs: Vec<(&str, Vec<u8>)> = layers
        .iter()
        .map(|l| ("application/vnd.oci.image.layer.v1.tar", l.clone()))
        .collect();
    let diff_ids: Vec<String> = layers.iter().map(|l| kiln_llb::digest(l)).collect();
    kiln_integration_tests::push_oci_image(name, &blobs, &diff_ids)
}

/// Each probe against a root daemon and against a rootless one.
macro_rules! on_both {
    ($($body:ident => $root:ident, $rootless:ident;)*) => {$(
        #[test]
        fn $root() {
            $body(Topology::AllInOne);
        }
        #[test]
        fn $rootless() {
            $body(Topology::Rootless);
        }
    )*};
}

on_both! {
    image_layers_cannot_write_through_symlinks_on => image_layers_cannot_write_through_symlinks, image_layers_cannot_write_through_symlinks_rootless;
    file_ops_resolve_every_path_inside_the_rootfs_on => file_ops_resolve_every_path_inside_the_rootfs, file_ops_resolve_every_path_inside_the_rootfs_rootless;
    add_archives_unpack_inside_their_destination_on => add_archives_unpack_inside_their_destination, add_archives_unpack_inside_their_destination_rootless;
    mounts_stay_inside_the_rootfs_and_kilns_root_on => mounts_stay_inside_the_rootfs_and_kilns_root, mounts_stay_inside_the_rootfs_and_kilns_root_rootless;
    exports_of_an_image_with_host_symlinks_write_nothing_through_them_on => exports_of_an_image_with_host_symlinks_write_nothing_through_them, exports_of_an_image_with_host_symlinks_write_nothing_through_them_rootless;
    a_client_cannot_plant_files_in_another_clients_synced_context_on => a_client_cannot_plant_files_in_another_clients_synced_context, a_client_cannot_plant_files_in_another_clients_synced_context_rootless;
}

fn image_layers_cannot_write_through_symlinks_on(topology: Topology) {
    let canary = Canary::new(topology);
    let c = canary.display();
    let up = format!("{}{}", "../".repeat(12), c.trim_start_matches('/'));
    let d = Daemon::start(topology).expect("daemon");
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        // a symlink from a lower layer, an entry below it in the next
        (
            "lower-symlink",
            vec![
                raw_tar(&[E::Symlink("a", &c)]),
                raw_tar(&[E::File("a/pwned", b"x", 0o644, 0)]),
            ],
        ),
        // the same layer: `b -> ../../..` then `b/<canary>/pwned`
        (
            "same-layer-dotdot",
            vec![raw_tar(&[
                E::Symlink("b", &up),
                E::File(
                    &format!("b/{}/pwned", c.trim_start_matches('/'))[..],
                    b"x",
                    0o644,
                    0,
                ),
            ])],
        ),
        // a whiteout and an opaque marker below a symlink
        (
            "whiteout",
            vec![
                raw_tar(&[E::Symlink("w", &c)]),
                raw_tar(&[
                    E::File("w/.wh.sentinel", b"", 0o644, 0),
                    E::File("w/.wh..wh..opq", b"", 0o644, 0),
                ]),
            ],
        ),
        // a hard link whose target is reached through a symlink
        (
            "hardlink",
            vec![raw_tar(&[
                E::Symlink("s", &c),
                E::Hardlink("h", "s/sentinel"),
            ])],
        ),
        // `..` climbing out
        (
            "dotdot",
            vec![raw_tar(&[E::Dir("d", 0o755), E::File(&up, b"x", 0o644, 0)])],
        ),
    ];
    for (name, layers) in cases {
        let image = push_layers(&format!("beneath/{name}"), &layers);
        let ctx =
            BuildContext::new(&format!("FROM {image}\nCOPY Dockerfile /built\n")).expect("ctx");
        let (ok, err) = build(&d, ctx.path(), &[]);
        assert!(!ok, "{name}: the crafted image was applied");
        assert!(err.contains("is unsafe"), "{name}: {err}");
        canary.assert_untouched();
    }
    assert_still_builds(&d);
    canary.assert_untouched();
}

fn file_ops_resolve_every_path_inside_the_rootfs_on(topology: Topology) {
    let canary = Canary::new(topology);
    let c = canary.display();
    let d = Daemon::start(topology).expect("daemon");
    let up = format!("{}{}", "../".repeat(12), c.trim_start_matches('/'));
    // the rootfs holds symlinks to the host canary, absolute and climbing; COPY, WORKDIR
    // (mkdir) and COPY --chown through them land inside the image
    let ctx = BuildContext::new(&format!(
        "FROM busybox\n\
         RUN ln -s {c} /abs && ln -s {up} /up && mkdir -p {c} && ln -s {c}/sentinel /file\n\
         COPY f /abs/pwned-abs\n\
         COPY f /up/pwned-up\n\
         COPY --chown=1234:1234 f /file\n\
         COPY --chown=1234:1234 tree/ /chowned/\n\
         WORKDIR /abs/pwned-dir\n"
    ))
    .expect("ctx");
    ctx.file("f", "from the context").expect("f");
    ctx.file("tree/plain", "p").expect("tree");
    // a context symlink to the host: copied as a symlink, never followed on the host
    std::os::unix::fs::symlink(canary.path().join("sentinel"), ctx.path().join("tree/link"))
        .expect("symlink");
    let out = build_local(&d, ctx.path());
    let inside = out.path().join(c.trim_start_matches('/'));
    for f in ["pwned-abs", "pwned-up", "sentinel"] {
        assert_eq!(
            std::fs::read_to_string(inside.join(f)).expect(f),
            "from the context",
            "{f} is inside the image"
        );
    }
    assert!(inside.join("pwned-dir").is_dir());
    assert_eq!(
        std::fs::read_link(out.path().join("chowned/link")).expect("link"),
        canary.path().join("sentinel")
    );
    canary.assert_untouched();

    // a COPY source reaching the host through a context symlink is not found
    let ctx2 = BuildContext::new("FROM busybox\nCOPY host/sentinel /stolen\n").expect("ctx");
    std::os::unix::fs::symlink(canary.path(), ctx2.path().join("host")).expect("symlink");
    let (ok, err) = build(&d, ctx2.path(), &[]);
    assert!(!ok && err.contains("not found"), "{err}");
    assert_still_builds(&d);
    canary.assert_untouched();
}

fn add_archives_unpack_inside_their_destination_on(topology: Topology) {
    let canary = Canary::new(topology);
    let c = canary.display();
    let d = Daemon::start(topology).expect("daemon");
    let up = format!("{}{}", "../".repeat(12), c.trim_start_matches('/'));
    let write_tar = |ctx: &BuildContext, name: &str, entries: &[E]| {
        std::fs::write(ctx.path().join(name), raw_tar(entries)).expect("tar");
    };
    // an entry climbing out, and one below the archive's own symlink to the host
    for (i, entries) in [
        vec![E::File(&up[..], b"x", 0o644, 0)],
        vec![E::Symlink("a", &c), E::File("a/pwned", b"x", 0o644, 0)],
        vec![E::Symlink("b", &up), E::File("b/pwned", b"x", 0o644, 0)],
        vec![E::Symlink("s", &c), E::Hardlink("h", "s/sentinel")],
    ]
    .iter()
    .enumerate()
    {
        let ctx = BuildContext::new("FROM busybox\nADD evil.tar /dest/\n").expect("ctx");
        write_tar(&ctx, "evil.tar", entries);
        let (ok, err) = build(&d, ctx.path(), &[]);
        assert!(!ok, "case {i}: the archive was unpacked");
        assert!(err.contains("outside the destination"), "case {i}: {err}");
        canary.assert_untouched();
    }
    // a destination that is a symlink to the host path resolves inside the rootfs
    let ctx = BuildContext::new(&format!(
        "FROM busybox\nRUN mkdir -p {c} && ln -s {c} /dest\nADD ok.tar /dest/\n"
    ))
    .expect("ctx");
    write_tar(
        &ctx,
        "ok.tar",
        &[E::File("pwned", b"in the image", 0o644, 0)],
    );
    let out = build_local(&d, ctx.path());
    assert_eq!(
        std::fs::read_to_string(out.path().join(c.trim_start_matches('/')).join("pwned"))
            .expect("unpacked in the image"),
        "in the image"
    );
    assert_still_builds(&d);
    canary.assert_untouched();
}

fn mounts_stay_inside_the_rootfs_and_kilns_root_on(topology: Topology) {
    let canary = Canary::new(topology);
    let c = canary.display();
    let d = Daemon::start(topology).expect("daemon");
    let up = format!("{}{}", "../".repeat(12), c.trim_start_matches('/'));
    let secret = tempfile::NamedTempFile::new().expect("secret");
    std::fs::write(secret.path(), "s3cret").expect("secret");
    // cache and secret targets through rootfs symlinks to the host; a cache id that
    // climbs; a cache seeded from a climbing source
    let ctx = BuildContext::new(&format!(
        "FROM busybox\n\
         RUN ln -s {c} /cm && ln -s {up} /sec\n\
         RUN --mount=type=cache,target=/cm/x touch /cm/x/pwned-cache\n\
         RUN --mount=type=cache,id={up},target=/c touch /c/pwned-id\n\
         RUN --mount=type=secret,id=s,target=/sec/pwned-secret cat /sec/pwned-secret\n\
         RUN --mount=type=cache,target=/c2,from=busybox,source={up} \
             (cat /c2/sentinel || true) > /cache-from\n"
    ))
    .expect("ctx");
    let secret_arg = format!("id=s,src={}", secret.path().display());
    let out = tempfile::tempdir().expect("out");
    let dest = format!("type=local,dest={}", out.path().display());
    let (ok, err) = build(
        &d,
        ctx.path(),
        &["--secret", &secret_arg, "--output", &dest],
    );
    assert!(ok, "{err}\n{}", d.logs());
    let got = std::fs::read_to_string(out.path().join("cache-from")).expect("cache-from");
    assert!(
        !got.contains(SECRET),
        "the cache was seeded from the host: {got:?}"
    );
    canary.assert_untouched();
    // bind sources that climb, or name a context symlink to the host: they resolve in
    // the context (and are then missing), never on the host
    for source in [up.as_str(), "host", "host/sentinel"] {
        let ctx = BuildContext::new(&format!(
            "FROM busybox\nRUN --mount=type=bind,source={source},target=/m \
             (cat /m/sentinel /m 2>/dev/null || true) > /bound\n"
        ))
        .expect("ctx");
        std::os::unix::fs::symlink(canary.path(), ctx.path().join("host")).expect("symlink");
        let out = tempfile::tempdir().expect("out");
        let dest = format!("type=local,dest={}", out.path().display());
        let (ok, err) = build(&d, ctx.path(), &["--output", &dest]);
        if ok {
            let got = std::fs::read_to_string(out.path().join("bound")).expect("bound");
            assert!(!got.contains(SECRET), "source={source} read the host");
        } else {
            assert!(!err.contains(SECRET), "source={source}: {err}");
        }
    }
    canary.assert_untouched();
    // nothing of the cache id's climb outside kiln's root either
    let root_parent = d.dir.path();
    for e in std::fs::read_dir(root_parent).expect("daemon dir") {
        let n = e.expect("entry").file_name().to_string_lossy().into_owned();
        assert!(!n.contains("pwned"), "{n} beside kiln's root");
    }
    assert_still_builds(&d);
    canary.assert_untouched();
}

fn exports_of_an_image_with_host_symlinks_write_nothing_through_them_on(topology: Topology) {
    let canary = Canary::new(topology);
    let c = canary.display();
    let d = Daemon::start(topology).expect("daemon");
    let ctx = BuildContext::new(&format!(
        "FROM busybox\nRUN ln -s {c} /a && ln -s {c}/sentinel /s && mkdir /d && echo img > /d/f\n"
    ))
    .expect("ctx");
    let out = build_local(&d, ctx.path());
    assert_eq!(
        std::fs::read_link(out.path().join("a")).expect("a"),
        canary.path()
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("d/f")).expect("f"),
        "img\n"
    );
    let tar = tempfile::tempdir().expect("tar");
    let dest = format!("type=tar,dest={}", tar.path().join("fs.tar").display());
    let (ok, err) = build(&d, ctx.path(), &["--output", &dest]);
    assert!(ok, "{err}");
    assert_still_builds(&d);
    canary.assert_untouched();
}

/// Runs `kiln build` of `ctx` as a client whose state dir is `home`, with extra flags;
/// exports into a new dir.
fn client_build(d: &Daemon, ctx: &Path, home: &Path, flags: &[String]) -> tempfile::TempDir {
    let out = tempfile::tempdir().expect("out");
    let mut cmd = Command::new(kiln_integration_tests::bin_dir().join("kiln"));
    cmd.arg("--addr")
        .arg(&d.addr)
        .args(flags)
        .args(["build", "--progress", "plain"])
        .args(args(&[
            "--output",
            &format!("type=local,dest={}", out.path().display()),
        ]))
        .current_dir(ctx)
        .env("HOME", home)
        .env_remove("XDG_STATE_HOME");
    let o = cmd.output().expect("kiln");
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        d.logs()
    );
    out
}

/// Two clients with a context at the same path (`/src` on two CI machines): the
/// attacker syncs first a file with the metadata the victim's file will have and other
/// content; the victim's build must see only what the victim sent.
fn plant_then_build(d: &Daemon, attacker: (&Path, &[String]), victim: (&Path, &[String])) {
    let base = tempfile::tempdir().expect("base");
    let path = base.path().join("src");
    let make = |name: &str, content: &str| -> PathBuf {
        let dir = base.path().join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("Dockerfile"),
            "FROM scratch\nCOPY app.txt /app.txt\n",
        )
        .expect("dockerfile");
        std::fs::write(dir.join("app.txt"), content).expect("app");
        // same size, mode, owner and mtime on both sides
        for f in ["Dockerfile", "app.txt"] {
            run(Command::new("touch")
                .args(["-d", "@1000000000"])
                .arg(dir.join(f)))
            .expect("touch");
        }
        dir
    };
    let evil = make("evil", "planted by another client");
    let good = make("good", "genuine, from the victim!");
    std::fs::rename(&evil, &path).expect("attacker's checkout");
    let out = client_build(d, &path, attacker.0, attacker.1);
    assert_eq!(
        std::fs::read_to_string(out.path().join("app.txt")).expect("app"),
        "planted by another client"
    );
    std::fs::rename(&path, base.path().join("attacker-done")).expect("move");
    std::fs::rename(&good, &path).expect("victim's checkout");
    let out = client_build(d, &path, victim.0, victim.1);
    assert_eq!(
        std::fs::read_to_string(out.path().join("app.txt")).expect("app"),
        "genuine, from the victim!",
        "the victim's build holds a file another client planted"
    );
}

fn a_client_cannot_plant_files_in_another_clients_synced_context_on(topology: Topology) {
    let canary = Canary::new(topology);
    let d = Daemon::start(topology).expect("daemon");
    let (a, v) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("v"),
    );
    plant_then_build(&d, (a.path(), &[]), (v.path(), &[]));
    // each client keeps its own private id
    let id = |h: &Path| std::fs::read_to_string(h.join(".local/state/kiln/node-id")).expect("id");
    assert_ne!(id(a.path()), id(v.path()));
    let md = std::fs::metadata(a.path().join(".local/state/kiln/node-id")).expect("id");
    assert_eq!(md.mode() & 0o777, 0o600);
    assert_still_builds(&d);
    canary.assert_untouched();
}

/// A CA with two client certificates and a server certificate for 127.0.0.1.
fn pki(dir: &Path) {
    let ossl = |args: &[&str]| {
        run(Command::new("openssl").args(args).current_dir(dir)).expect("openssl");
    };
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(key);
    ca.extend([
        "-days",
        "2",
        "-subj",
        "/CN=kiln beneath ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    ossl(&ca);
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("alice", "extendedKeyUsage=clientAuth\n"),
        ("mallory", "extendedKeyUsage=clientAuth\n"),
    ] {
        let subj = format!("/CN=kiln beneath {name}");
        let (k, csr, pem, extf) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(dir.join(&extf), ext).expect("ext");
        let mut req = vec!["req"];
        req.extend(key);
        req.extend(["-subj", &subj, "-keyout", &k, "-out", &csr]);
        ossl(&req);
        ossl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &extf,
            "-out",
            &pem,
        ]);
    }
}

#[test]
fn a_client_certificate_keeps_its_synced_context_to_itself() {
    let canary = Canary::new(Topology::AllInOne);
    let dir = tempfile::tempdir().expect("pki");
    pki(dir.path());
    let p = |n: &str| dir.path().join(n).display().to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let d = Daemon::start_listening(
        &format!("tcp://127.0.0.1:{port}"),
        &[
            "--tlscert",
            &p("server.pem"),
            "--tlskey",
            &p("server.key"),
            "--tlscacert",
            &p("ca.pem"),
        ],
    )
    .expect("daemon");
    let flags = |who: &str| -> Vec<String> {
        vec![
            "--tlscacert".into(),
            p("ca.pem"),
            "--tlscert".into(),
            p(&format!("{who}.pem")),
            "--tlskey".into(),
            p(&format!("{who}.key")),
        ]
    };
    // one state dir for both: the same shared key, told apart by the certificate
    let home = tempfile::tempdir().expect("home");
    plant_then_build(
        &d,
        (home.path(), &flags("mallory")),
        (home.path(), &flags("alice")),
    );
    canary.assert_untouched();
}
