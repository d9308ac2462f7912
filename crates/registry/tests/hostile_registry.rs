//! A registry that works against its client: it names upload locations on another
//! host, answers with endless error and token bodies, moves a tag between two
//! resolves and refuses a repository it served before. A tiny HTTP/1.1 server on
//! loopback plays it; the client under test is kiln's, unchanged.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_oci::{Descriptor, Platform, digest::sha256};
use kiln_registry::{Client, Error, Reference, RegistryConfig};

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    authorization: Option<String>,
}

/// What the server answers: status line + headers (no Content-Length), body, and
/// whether the body is endless (written until the client hangs up).
struct Answer {
    head: String,
    body: Vec<u8>,
    endless: bool,
}

fn answer(head: &str) -> Answer {
    Answer {
        head: head.to_string(),
        body: Vec::new(),
        endless: false,
    }
}

type Route = Arc<dyn Fn(&Seen) -> Answer + Send + Sync>;

/// Serves `route` on a loopback port; returns the address and what it saw.
fn serve(route: Route) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (route, log) = (route.clone(), log.clone());
            std::thread::spawn(move || connection(conn, &route, &log));
        }
    });
    (addr, seen)
}

fn connection(conn: TcpStream, route: &Route, log: &Mutex<Vec<Seen>>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(20)));
    let mut w = conn.try_clone().expect("clone");
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let (mut length, mut authorization) = (0usize, None);
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            match k.to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse().unwrap_or(0),
                "authorization" => authorization = Some(v.trim().to_string()),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let seen = Seen {
            method,
            path,
            authorization,
        };
        log.lock().expect("log").push(seen.clone());
        let a = route(&seen);
        if a.endless {
            let _ = write!(w, "{}\r\nContent-Length: 1099511627776\r\n\r\n", a.head);
            // bounded: at most 4 GiB, or until the client hangs up
            let chunk = vec![b'x'; 64 << 10];
            for _ in 0..65536 {
                if w.write_all(&chunk).is_err() {
                    return;
                }
            }
            return;
        }
        let _ = write!(w, "{}\r\nContent-Length: {}\r\n\r\n", a.head, a.body.len());
        let _ = w.write_all(&a.body);
    }
}

fn client() -> Client {
    Client::new(RegistryConfig::default()).expect("client")
}

#[tokio::test]
async fn credentials_never_go_to_an_upload_location_on_another_host() {
    let (other, other_seen) = serve(Arc::new(|s: &Seen| match s.method.as_str() {
        "PUT" => answer("HTTP/1.1 201 Created"),
        "PATCH" => answer("HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"x\""),
        _ => answer("HTTP/1.1 404 Not Found"),
    }));
    let upload = format!("http://{other}/upload/1");
    let (registry, registry_seen) = serve(Arc::new(move |s: &Seen| {
        if s.authorization.is_none() {
            return answer("HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"r\"");
        }
        match s.method.as_str() {
            "POST" => answer(&format!("HTTP/1.1 202 Accepted\r\nLocation: {upload}")),
            _ => answer("HTTP/1.1 404 Not Found"),
        }
    }));
    let c = client().with_credentials(Arc::new(|_host: &str| {
        Some(("ci-user".to_string(), "s3cret".to_string()))
    }));
    let dir = tempfile::tempdir().expect("tmp");
    let blob = dir.path().join("blob");
    std::fs::write(&blob, b"layer bytes").expect("write");
    let desc = Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        digest: sha256(b"layer bytes"),
        size: 11,
        ..Default::default()
    };
    let r = Reference::parse(&format!("{registry}/team/app:1")).expect("ref");
    c.push_blob(&r, &desc, &blob).await.expect("push");
    // the registry itself got the credentials; the other host got the blob, not them
    assert!(
        registry_seen
            .lock()
            .expect("seen")
            .iter()
            .any(|s| s.authorization.is_some())
    );
    let other_seen = other_seen.lock().expect("seen").clone();
    assert!(
        other_seen
            .iter()
            .any(|s| s.method == "PUT" && s.path.starts_with("/upload/1")),
        "{other_seen:?}"
    );
    assert!(
        other_seen.iter().all(|s| s.authorization.is_none()),
        "credentials sent to another host: {other_seen:?}"
    );
}

#[tokio::test]
async fn an_endless_error_body_is_not_read_whole() {
    let (registry, _) = serve(Arc::new(|_: &Seen| Answer {
        head: "HTTP/1.1 404 Not Found".into(),
        body: Vec::new(),
        endless: true,
    }));
    let r = Reference::parse(&format!("{registry}/team/app:1")).expect("ref");
    let started = Instant::now();
    let err = client()
        .resolve(&r, &Platform::default())
        .await
        .expect_err("a 404");
    assert!(matches!(err, Error::Status { status: 404, .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_endless_token_body_is_refused_at_the_limit() {
    let (tokens, _) = serve(Arc::new(|_: &Seen| Answer {
        head: "HTTP/1.1 200 OK\r\nContent-Type: application/json".into(),
        body: Vec::new(),
        endless: true,
    }));
    let (registry, _) = serve(Arc::new(move |_: &Seen| {
        answer(&format!(
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://{tokens}/token\",service=\"r\""
        ))
    }));
    let r = Reference::parse(&format!("{registry}/team/app:1")).expect("ref");
    let started = Instant::now();
    let err = client()
        .resolve(&r, &Platform::default())
        .await
        .expect_err("no token");
    assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// An image index for linux/amd64 with its manifest and config, served as `tag` of
/// `team/app` and `team/other`; `moved` switches the tag to a second image and
/// `locked` refuses `team/other` from then on.
struct Served {
    tags: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>,
    moved: std::sync::atomic::AtomicBool,
    locked: std::sync::atomic::AtomicBool,
}

fn served_image(n: u8) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["N={n}"]}}}}"#)
        .into_bytes();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[]}}"#,
        sha256(&config),
        config.len()
    )
    .into_bytes();
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
        sha256(&manifest),
        manifest.len()
    )
    .into_bytes();
    (index, manifest, config)
}

fn serve_tags(state: Arc<Served>) -> (String, Arc<Mutex<Vec<Seen>>>) {
    use std::sync::atomic::Ordering;
    serve(Arc::new(move |s: &Seen| {
        if s.path.starts_with("/v2/team/other/") && state.locked.load(Ordering::SeqCst) {
            return answer("HTTP/1.1 404 Not Found");
        }
        let (index, manifest, config) =
            &state.tags[usize::from(state.moved.load(Ordering::SeqCst))];
        let found = |ct: &str, body: &[u8]| Answer {
            head: format!("HTTP/1.1 200 OK\r\nContent-Type: {ct}"),
            body: body.to_vec(),
            endless: false,
        };
        let object = s.path.rsplit('/').next().unwrap_or("");
        if s.path.contains("/manifests/") && object == "1" {
            found("application/vnd.oci.image.index.v1+json", index)
        } else if s.path.contains("/manifests/") && object == sha256(manifest) {
            found("application/vnd.oci.image.manifest.v1+json", manifest)
        } else if s.path.contains("/blobs/") && object == sha256(config) {
            found("application/octet-stream", config)
        } else {
            answer("HTTP/1.1 404 Not Found")
        }
    }))
}

#[tokio::test]
async fn a_tag_resolved_again_to_the_same_digest_costs_one_request_and_a_moved_tag_is_followed() {
    use std::sync::atomic::Ordering;
    let state = Arc::new(Served {
        tags: vec![served_image(1), served_image(2)],
        moved: false.into(),
        locked: false.into(),
    });
    let (registry, seen) = serve_tags(state.clone());
    let c = client();
    let amd64 = Platform::new("linux", "amd64", None);
    let app = Reference::parse(&format!("{registry}/team/app:1")).expect("ref");
    let requests = || seen.lock().expect("seen").len();

    let first = c.resolve(&app, &amd64).await.expect("resolve");
    assert_eq!(requests(), 3, "index, manifest, config");
    let again = c.resolve(&app, &amd64).await.expect("resolve again");
    assert_eq!(requests(), 4, "only the tag is asked again");
    assert_eq!(again.digest, first.digest);
    assert_eq!(again.config, first.config);
    assert_eq!(again.manifest_digest, first.manifest_digest);
    assert_eq!(again.reference, first.reference);

    // the tag moves: the new image is resolved whole
    state.moved.store(true, Ordering::SeqCst);
    let moved = c.resolve(&app, &amd64).await.expect("resolve moved");
    assert_eq!(requests(), 7);
    assert_ne!(moved.digest, first.digest);
    assert!(String::from_utf8_lossy(&moved.config).contains("N=2"));

    // the same index in another repository is resolved there, whole
    let other = Reference::parse(&format!("{registry}/team/other:1")).expect("ref");
    c.resolve(&other, &amd64).await.expect("resolve other");
    assert_eq!(requests(), 10);
    // and once that repository refuses, nothing remembered answers for it
    state.locked.store(true, Ordering::SeqCst);
    assert!(c.resolve(&other, &amd64).await.is_err());
}
