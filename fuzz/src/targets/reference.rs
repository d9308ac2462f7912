//! `reference`: image references and registry auth challenges.
//!
//! Each line of the input is parsed as an image reference
//! (`kiln_registry::Reference::parse`, what `FROM`, `--from`, named contexts
//! and exporters' names go through), as a `WWW-Authenticate` value
//! (`kiln_registry::describe_challenge`), as a loopback check and as a named
//! context. A parsed reference must print back to itself (its `Display` and
//! familiar forms parse to the same reference), and its registry must be a
//! host name or address with an optional port: it becomes the host of the
//! registry URL, decides plain HTTP for loopback hosts and picks the client's
//! credentials.

use crate::Target;

pub fn target() -> Target {
    Target {
        name: "reference",
        about: "image references (kiln_registry::Reference::parse) and WWW-Authenticate challenges",
        run,
        seeds,
        tokens: TOKENS,
        mutate: None,
        max_len: 4096,
    }
}

const TOKENS: &[&[u8]] = &[
    b"\n",
    b"docker.io/",
    b"index.docker.io/",
    b"library/",
    b"busybox",
    b":latest",
    b":",
    b"@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    b"@sha256:",
    b"@",
    b"localhost/",
    b"localhost:5000/",
    b"127.0.0.1:5000/",
    b"127.0.0.1@",
    b"[::1]:5000/",
    b"[",
    b"]",
    b"/",
    b"//",
    b"#",
    b"?",
    b"%2f",
    b"..",
    b"_",
    b"-",
    b".",
    b"Bearer ",
    b"Basic ",
    b"realm=",
    b"realm=\"https://auth.example.com/token\"",
    b"service=\"registry\"",
    b"scope=\"repository:x:pull\"",
    b"\"",
    b"\\",
    b",",
    b"=",
    b" ",
    b"local:",
    b"docker-image://",
];

const SEEDS: &[&str] = &[
    "busybox\nbusybox:latest\nlibrary/busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n",
    "127.0.0.1:5000/a/b:c\nlocalhost/x\n[::1]:5000/y:z\nregistry.example.com:443/team/app:v1.2.3\n",
    "docker.io/library/busybox:1.36@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n",
    "Bearer realm=\"https://auth.docker.io/token\",service=\"registry.docker.io\",scope=\"repository:library/busybox:pull\"\n",
    "Basic realm=\"Registry\"\nbearer realm=x, service = y ,scope=\"a\\\"b\"\nNegotiate\n",
    "local:context\ndocker-image://alpine:3\n",
];

fn seeds() -> Vec<Vec<u8>> {
    SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect()
}

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for line in text.split('\n') {
        let _ = kiln_registry::describe_challenge(line);
        let _ = kiln_registry::is_loopback(line);
        let _ = frontend_gateway::dockerfile2llb::NamedContext::parse(line);
        let Ok(r) = kiln_registry::Reference::parse(line) else {
            continue;
        };
        assert!(
            // normalisation (index.docker.io -> docker.io) comes after the parser's check
            kiln_registry::is_registry_host(&r.registry),
            "{line:?} parsed with registry {:?}, which is not a host[:port]",
            r.registry
        );
        let printed = r.to_string();
        match kiln_registry::Reference::parse(&printed) {
            Ok(again) => assert_eq!(again, r, "{line:?} printed as {printed:?}"),
            Err(e) => panic!("{line:?} printed as {printed:?}, which does not parse: {e}"),
        }
        let familiar = r.familiar();
        match kiln_registry::Reference::parse(&familiar) {
            Ok(again) => assert_eq!(again, r, "{line:?} familiar form {familiar:?}"),
            Err(e) => panic!("{line:?} familiar form {familiar:?} does not parse: {e}"),
        }
        let _ = (r.name(), r.object());
    }
}
