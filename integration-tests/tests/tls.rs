//! TLS on the client listener, with BuildKit's flags: `kilnd --tlscert --tlskey
//! --tlscacert` on `tcp://`, `kiln --tlscacert --tlscert --tlskey` or `--tlsdir`.
//! Certificates are made with `openssl` for each test.

use kiln_integration_tests::{BuildContext, Daemon, dockerfile_args, run};
use std::path::PathBuf;
use std::process::Command;

/// A CA, a server certificate for 127.0.0.1 and a client certificate it signed,
/// and a second CA with its own client certificate.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("kiln-pki-")
            .tempdir()
            .expect("tempdir");
        let pki = Pki { dir };
        pki.ca("ca");
        pki.ca("other-ca");
        pki.leaf(
            "server",
            "ca",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        pki.leaf("client", "ca", "extendedKeyUsage=clientAuth\n");
        pki.leaf("client-b", "ca", "extendedKeyUsage=clientAuth\n");
        pki.leaf("other-client", "other-ca", "extendedKeyUsage=clientAuth\n");
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn openssl(&self, args: &[&str]) {
        run(Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path()))
        .expect("openssl");
    }

    fn ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=kiln test {name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    fn leaf(&self, name: &str, ca: &str, extensions: &str) {
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN=kiln test {name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        std::fs::write(self.path(&format!("{name}.ext")), extensions).expect("write ext");
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    /// kiln's flags for client certificate `name`.
    fn client_flags(&self, name: &str) -> Vec<String> {
        vec![
            "--tlscacert".into(),
            self.arg("ca.pem"),
            "--tlscert".into(),
            self.arg(&format!("{name}.pem")),
            "--tlskey".into(),
            self.arg(&format!("{name}.key")),
        ]
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// kilnd on `tcp://127.0.0.1:<free port>` requiring client certificates of `ca`.
fn tls_daemon(pki: &Pki) -> Daemon {
    let addr = format!("tcp://127.0.0.1:{}", free_port());
    let (cert, key, ca) = (
        pki.arg("server.pem"),
        pki.arg("server.key"),
        pki.arg("ca.pem"),
    );
    Daemon::start_listening(
        &addr,
        &["--tlscert", &cert, "--tlskey", &key, "--tlscacert", &ca],
    )
    .expect("start kilnd with tls")
}

fn context() -> BuildContext {
    let ctx = BuildContext::new("FROM busybox\nCOPY hello.txt /hello.txt\nRUN cat /hello.txt\n")
        .expect("context");
    ctx.file("hello.txt", "over tls\n").expect("file");
    ctx
}

/// `kiln build` to a local dir with `flags`; returns the exit status and stderr.
fn build(d: &Daemon, ctx: &BuildContext, flags: &[String]) -> (bool, String) {
    let out_dir = ctx.path().join("out");
    let mut args: Vec<String> = flags.to_vec();
    args.extend(["build", "--progress", "plain"].map(String::from));
    args.extend(dockerfile_args().into_iter().map(String::from));
    args.extend([
        "--output".into(),
        format!("type=local,dest={}", out_dir.display()),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = d.kiln(ctx.path(), &args).expect("run kiln");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if out.status.success() {
        let built = std::fs::read_to_string(out_dir.join("hello.txt")).unwrap_or_default();
        assert_eq!(built, "over tls\n", "{stderr}");
    }
    (out.status.success(), stderr)
}

#[test]
fn kiln_with_buildctl_tls_flags_builds_over_tcp() {
    let pki = Pki::new();
    let d = tls_daemon(&pki);
    let ctx = context();
    let (ok, stderr) = build(&d, &ctx, &pki.client_flags("client"));
    assert!(ok, "{stderr}\n--- daemon ---\n{}", d.logs());
}

#[test]
fn kiln_with_a_tls_dir_builds_over_tcp() {
    let pki = Pki::new();
    let d = tls_daemon(&pki);
    let tlsdir = tempfile::tempdir().expect("tempdir");
    for (from, to) in [
        ("ca.pem", "ca.pem"),
        ("client.pem", "cert.pem"),
        ("client.key", "key.pem"),
    ] {
        std::fs::copy(pki.path(from), tlsdir.path().join(to)).expect("copy");
    }
    let ctx = context();
    let flags = ["--tlsdir".to_string(), tlsdir.path().display().to_string()];
    let (ok, stderr) = build(&d, &ctx, &flags);
    assert!(ok, "{stderr}\n--- daemon ---\n{}", d.logs());
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let pki = Pki::new();
    let d = tls_daemon(&pki);
    let (ok, stderr) = build(&d, &context(), &["--tlscacert".into(), pki.arg("ca.pem")]);
    assert!(!ok);
    assert!(
        stderr.contains("tls handshake with 127.0.0.1:")
            && stderr.contains("the daemon requires a client certificate"),
        "{stderr}"
    );
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let d = tls_daemon(&pki);
    let (ok, stderr) = build(&d, &context(), &pki.client_flags("other-client"));
    assert!(!ok);
    assert!(
        stderr.contains("the daemon refused the client certificate")
            && stderr.contains("other-client.pem"),
        "{stderr}"
    );
}

#[test]
fn a_plain_text_client_is_told_tls_is_required() {
    let pki = Pki::new();
    let d = tls_daemon(&pki);
    let (ok, stderr) = build(&d, &context(), &[]);
    assert!(!ok);
    assert!(
        stderr.contains("this kilnd listener requires tls"),
        "{stderr}"
    );
}

#[test]
fn a_daemon_certificate_from_another_ca_is_not_trusted() {
    let pki = Pki::new();
    let d = tls_daemon(&pki);
    let mut flags = pki.client_flags("client");
    flags[1] = pki.arg("other-ca.pem");
    let (ok, stderr) = build(&d, &context(), &flags);
    assert!(!ok);
    assert!(
        stderr.contains("the daemon's certificate is not signed by"),
        "{stderr}"
    );
}

#[test]
fn a_tls_certificate_without_its_key_stops_kilnd_at_start() {
    let pki = Pki::new();
    let addr = format!("tcp://127.0.0.1:{}", free_port());
    let cert = pki.arg("server.pem");
    let e = Daemon::start_listening(&addr, &["--tlscert", &cert])
        .err()
        .expect("kilnd refuses to start");
    assert!(e.to_string().contains("needs a key"), "{e:#}");
    let missing = pki.arg("missing.key");
    let e = Daemon::start_listening(&addr, &["--tlscert", &cert, "--tlskey", &missing])
        .err()
        .expect("kilnd refuses to start");
    assert!(e.to_string().contains("missing.key"), "{e:#}");
}

mod identity {
    //! A build's client-side frontend can be driven only by the client
    //! certificate that started the build.
    use super::*;
    use kiln_proto::moby::buildkit::v1::frontend::{PingRequest, llb_bridge_client};
    use kiln_proto::moby::buildkit::v1::{SolveRequest, control_client};
    use kiln_session::tls::ClientTls;

    fn tls(pki: &Pki, name: &str) -> ClientTls {
        ClientTls {
            ca: Some(pki.path("ca.pem")),
            cert: Some(pki.path(&format!("{name}.pem"))),
            key: Some(pki.path(&format!("{name}.key"))),
            server_name: None,
        }
    }

    async fn ping(addr: &str, tls: &ClientTls, build: &str) -> Result<(), tonic::Status> {
        let ch = kiln_session::dial::connect_with(addr, Some(tls))
            .await
            .expect("connect");
        let mut req = tonic::Request::new(PingRequest {});
        req.metadata_mut().insert(
            "buildkit-controlapi-buildid",
            build.parse().expect("metadata value"),
        );
        llb_bridge_client::LlbBridgeClient::new(ch)
            .ping(req)
            .await
            .map(|_| ())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_client_that_started_a_build_drives_its_frontend() {
        let pki = Pki::new();
        let d = tokio::task::block_in_place(|| tls_daemon(&pki));
        let (a, b) = (tls(&pki, "client"), tls(&pki, "client-b"));
        let id = "tls-identity-build";
        // client A starts a build whose frontend it runs itself (no frontend, no definition)
        let ch = kiln_session::dial::connect_with(&d.addr, Some(&a))
            .await
            .expect("connect a");
        let solve = tokio::spawn(async move {
            control_client::ControlClient::new(ch)
                .solve(SolveRequest {
                    r#ref: id.into(),
                    ..Default::default()
                })
                .await
        });
        // A's Ping succeeds once the build is registered
        let mut pinged = Err(tonic::Status::unknown("not tried"));
        for _ in 0..50 {
            pinged = ping(&d.addr, &a, id).await;
            if pinged.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        pinged.unwrap_or_else(|e| panic!("owner's ping: {e}\n{}", d.logs()));
        let e = ping(&d.addr, &b, id).await.expect_err("another client");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        assert!(e.message().contains("another client"), "{e}");
        solve.abort();
    }
}
