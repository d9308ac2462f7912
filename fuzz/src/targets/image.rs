//! `image`: what a registry answers when kiln resolves an image.
//!
//! The bytes are up to four documents separated by a line `=====`: what the
//! registry serves for the tag (an index or a manifest), then documents it
//! serves by digest (a platform manifest, the config, …). A document may
//! start with a line `Content-Type: TYPE`, sent as that header. `@M@`, `@C@`
//! and `@D3@` are replaced with the sha256 digests of documents 1, 2 and 3,
//! so mutated inputs still chain.
//!
//! A registry on a loopback port serves them to the real client
//! (`kiln_registry::Client::resolve`: media type detection, index → platform
//! manifest, digest checks, size limits); the config it returns is parsed as
//! the frontend parses it (`kiln_oci::ImageConfig`) and a Dockerfile is
//! converted on top of it (env, user, workdir, shell, ONBUILD triggers of
//! the base image). Every document is also decoded as each `kiln_oci` type.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use crate::Target;

pub fn target() -> Target {
    Target {
        name: "image",
        about: "registry answers: manifests, indexes and configs served to kiln_registry::Client::resolve, then the frontend's use of the config",
        run,
        seeds,
        tokens: TOKENS,
        mutate: None,
        max_len: 64 * 1024,
    }
}

const TOKENS: &[&[u8]] = &[
    b"\n=====\n",
    b"Content-Type: application/vnd.oci.image.index.v1+json\n",
    b"Content-Type: application/vnd.oci.image.manifest.v1+json\n",
    b"Content-Type: application/vnd.docker.distribution.manifest.list.v2+json\n",
    b"Content-Type: application/vnd.docker.distribution.manifest.v2+json\n",
    b"Content-Type: text/plain\n",
    b"@M@",
    b"@C@",
    b"@D3@",
    b"\"mediaType\":",
    b"\"manifests\":[",
    b"\"layers\":[",
    b"\"config\":",
    b"\"digest\":\"@M@\"",
    b"\"digest\":\"@C@\"",
    b"\"digest\":\"sha256:../../x\"",
    b"\"size\":-1",
    b"\"size\":18446744073709551615",
    b"\"platform\":{\"architecture\":\"amd64\",\"os\":\"linux\"}",
    b"\"variant\":\"v8\"",
    b"\"os.version\":\"x\"",
    b"\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[]}",
    b"\"diff_ids\":[\"sha256:../x\"]",
    b"\"Env\":[\"A=1\",\"PATH\",\"=\",\"\"]",
    b"\"User\":\"0:0\"",
    b"\"WorkingDir\":\"../..\"",
    b"\"Shell\":[]",
    b"\"OnBuild\":[\"RUN x\",\"FROM y\",\"ONBUILD RUN z\",\"COPY --from=0 / /\",\"\"]",
    b"\"Entrypoint\":null",
    b"\"Cmd\":[\"sh\"]",
    b"\"ExposedPorts\":{\"80/tcp\":{}}",
    b"\"Volumes\":{\"/v\":{}}",
    b"\"Labels\":{\"a\":\"b\"}",
    b"\"history\":[{\"empty_layer\":true}]",
    b"null",
    b"{}",
    b"[]",
    b"\"\\u0000\"",
    b"1e999",
    b"-0",
];

const BUSYBOX: &str =
    include_str!("../../../testdata/llb/image-configs/busybox-latest.config.json");
const DEBIAN: &str =
    include_str!("../../../testdata/llb/image-configs/debian-bookworm.config.json");
const ONBUILD: &str = include_str!("../../../testdata/llb/image-configs/onbuild-base.config.json");

fn manifest(media_type: &str, config_type: &str) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{media_type}","config":{{"mediaType":"{config_type}","digest":"@C@","size":100}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:4d864a48afdcdb82ea28cadb4d24caa0856e8c48658990e60db318af5f4ccd16","size":10}}]}}"#
    )
}

fn index(media_type: &str) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{media_type}","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"@M@","size":100,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
    )
}

fn seeds() -> Vec<Vec<u8>> {
    let oci_m = manifest(
        kiln_oci::media_types::OCI_MANIFEST,
        kiln_oci::media_types::OCI_CONFIG,
    );
    let docker_m = manifest(
        kiln_oci::media_types::DOCKER_MANIFEST,
        kiln_oci::media_types::DOCKER_CONFIG,
    );
    let oci_i = index(kiln_oci::media_types::OCI_INDEX);
    let docker_i = index(kiln_oci::media_types::DOCKER_MANIFEST_LIST);
    let sep = "\n=====\n";
    let mut out = Vec::new();
    for config in [BUSYBOX, DEBIAN, ONBUILD] {
        out.push(format!("{oci_i}{sep}{oci_m}{sep}{config}"));
        out.push(format!("{docker_i}{sep}{docker_m}{sep}{config}"));
        // a manifest for the tag: the config is document 2, document 1 unused
        out.push(format!("{oci_m}{sep}{{}}{sep}{config}"));
    }
    // the media type from the header, none in the body
    let bare = oci_m.replace(
        &format!(r#""mediaType":"{}","#, kiln_oci::media_types::OCI_MANIFEST),
        "",
    );
    out.push(format!(
        "Content-Type: application/vnd.oci.image.manifest.v1+json\n{bare}{sep}{{}}{sep}{BUSYBOX}"
    ));
    // an index without a media type, chained indexes
    out.push(format!(
        "{}{sep}{oci_i}{sep}{BUSYBOX}",
        oci_i.replace(
            &format!(r#""mediaType":"{}","#, kiln_oci::media_types::OCI_INDEX),
            ""
        )
    ));
    out.into_iter().map(String::into_bytes).collect()
}

/// What the registry serves: (content type, body) for the tag, and bodies by digest.
#[derive(Default)]
struct Docs {
    tag: (Option<String>, Vec<u8>),
    by_digest: HashMap<String, (Option<String>, Vec<u8>)>,
}

fn split_docs(data: &[u8]) -> Vec<(Option<String>, Vec<u8>)> {
    let text = String::from_utf8_lossy(data);
    let mut docs: Vec<(Option<String>, String)> = text
        .splitn(4, "\n=====\n")
        .map(|d| match d.strip_prefix("Content-Type: ") {
            Some(rest) => {
                let (ct, body) = rest.split_once('\n').unwrap_or((rest, ""));
                (Some(ct.to_string()), body.to_string())
            }
            None => (None, d.to_string()),
        })
        .collect();
    // digests of later documents into earlier ones, last first
    let mut digests: Vec<String> = vec![String::new(); docs.len()];
    for i in (0..docs.len()).rev() {
        let mut body = docs[i].1.clone();
        for (j, ph) in [(1, "@M@"), (2, "@C@"), (3, "@D3@")] {
            if j > i && j < docs.len() {
                body = body.replace(ph, &digests[j]);
            }
        }
        digests[i] = kiln_oci::digest::sha256(body.as_bytes());
        docs[i].1 = body;
    }
    docs.into_iter()
        .map(|(ct, b)| (ct, b.into_bytes()))
        .collect()
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    ct: Option<&str>,
    body: &[u8],
    head: bool,
) -> bool {
    let mut h = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    if let Some(ct) = ct {
        // a header value cannot hold a line break
        let ct: String = ct.chars().filter(|c| !c.is_control()).collect();
        h.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    h.push_str("\r\n");
    let mut out = h.into_bytes();
    if !head {
        out.extend_from_slice(body);
    }
    stream.write_all(&out).is_ok()
}

fn serve(stream: TcpStream, docs: Arc<Mutex<Docs>>) {
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut stream = stream;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let _ = std::io::copy(&mut (&mut reader).take(length as u64), &mut std::io::sink());
        let mut parts = request.split(' ');
        let method = parts.next().unwrap_or("");
        let path = parts.next().unwrap_or("");
        let head = method == "HEAD";
        let docs = docs.lock().expect("docs");
        let found = if path == "/v2/" {
            Some((None, b"{}".to_vec()))
        } else if path == "/v2/fuzz/img/manifests/latest" {
            Some(docs.tag.clone())
        } else if let Some(d) = path
            .strip_prefix("/v2/fuzz/img/manifests/")
            .or_else(|| path.strip_prefix("/v2/fuzz/img/blobs/"))
        {
            docs.by_digest.get(d).cloned()
        } else {
            None
        };
        drop(docs);
        let ok = match found {
            Some((ct, body)) => respond(&mut stream, "200 OK", ct.as_deref(), &body, head),
            None => respond(&mut stream, "404 Not Found", None, b"{}", head),
        };
        if !ok {
            return;
        }
    }
}

struct Registry {
    docs: Arc<Mutex<Docs>>,
    client: kiln_registry::Client,
    reference: kiln_registry::Reference,
}

fn start() -> Registry {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let docs: Arc<Mutex<Docs>> = Arc::default();
    let d = docs.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let d = d.clone();
            std::thread::spawn(move || serve(s, d));
        }
    });
    Registry {
        docs,
        client: kiln_registry::Client::new(Default::default()).expect("registry client"),
        reference: kiln_registry::Reference::parse(&format!("127.0.0.1:{port}/fuzz/img:latest"))
            .expect("reference"),
    }
}

thread_local! {
    static REGISTRY: RefCell<Option<Registry>> = const { RefCell::new(None) };
}

pub fn run(data: &[u8]) {
    let docs = split_docs(data);
    for (_, body) in &docs {
        let _ = serde_json::from_slice::<kiln_oci::Manifest>(body);
        if let Ok(index) = serde_json::from_slice::<kiln_oci::Index>(body) {
            let host = kiln_oci::Platform::host();
            for m in &index.manifests {
                if let Some(p) = &m.platform {
                    let _ = host.matches(p);
                    let _ = p.matches(&host);
                }
            }
        }
        let _ = serde_json::from_slice::<kiln_oci::ImageConfig>(body);
    }
    let resolved = REGISTRY.with(|r| {
        let mut r = r.borrow_mut();
        let reg = r.get_or_insert_with(start);
        {
            let mut served = reg.docs.lock().expect("docs");
            served.tag = docs[0].clone();
            served.by_digest = docs
                .iter()
                .skip(1)
                .map(|(ct, body)| (kiln_oci::digest::sha256(body), (ct.clone(), body.clone())))
                .collect();
        }
        let platform = kiln_oci::Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            ..kiln_oci::Platform::host()
        };
        crate::rt::block_on(reg.client.resolve(&reg.reference, &platform))
    });
    crate::debug(|| match &resolved {
        Ok(r) => format!("resolved {} to {}", r.reference, r.manifest_digest),
        Err(e) => format!("resolve: {e}"),
    });
    let Ok(resolved) = resolved else {
        return;
    };
    // what the registry client promises: digests that match the bytes
    assert_eq!(
        kiln_oci::digest::sha256(&resolved.manifest_bytes),
        resolved.manifest_digest,
        "resolved manifest digest"
    );
    assert_eq!(
        kiln_oci::digest::sha256(&resolved.config),
        resolved.manifest.config.digest,
        "resolved config digest"
    );
    // what the frontend does with the config
    if let Ok(config) = serde_json::from_slice::<kiln_oci::ImageConfig>(&resolved.config) {
        crate::targets::dockerfile2llb::convert_checked(
            b"FROM img\nRUN echo $PATH\nENV A=${HOME:-x}\nWORKDIR sub\nCOPY a b\nUSER nobody\n",
            config,
        );
    }
}
