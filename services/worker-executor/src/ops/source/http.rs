//! `http(s)://` sources: one downloaded file in a snapshot.

use crate::error::{Error, Result};
use crate::snapshot::Kind;
use crate::{Worker, fscopy};
use std::collections::BTreeMap;

/// The file's name: `http.filename`, else the URL's last path segment (`index` when none).
fn filename(url: &str, attrs: &BTreeMap<String, String>) -> String {
    if let Some(f) = attrs.get("http.filename").filter(|f| !f.is_empty()) {
        return f.clone();
    }
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let rest = path.split_once("://").map_or(path, |(_, r)| r);
    match rest.split_once('/') {
        Some((_, p)) => p
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .filter(|b| !b.is_empty())
            .unwrap_or("index")
            .to_string(),
        None => "index".to_string(),
    }
}

/// Downloads one file into a snapshot: `http.filename` (default: the last path
/// segment), `http.perm` (octal, default 0600), `http.uid`/`http.gid`, verified
/// against `http.checksum` (sha256:...) when given.
pub(super) async fn http(
    w: &Worker,
    url: &str,
    attrs: &BTreeMap<String, String>,
) -> Result<String> {
    let herr = |reason: String| Error::Http {
        url: url.to_string(),
        reason,
    };
    let request = |source| Error::HttpRequest {
        url: url.to_string(),
        source,
    };
    let filename = filename(url, attrs);
    if filename.contains('/') || filename == ".." || filename == "." {
        return Err(herr(format!("invalid filename {filename:?}")));
    }
    let parse_num = |k: &str, radix: u32| -> Result<Option<u32>> {
        attrs
            .get(k)
            .filter(|v| !v.is_empty())
            .map(|v| u32::from_str_radix(v, radix).map_err(|_| herr(format!("invalid {k} {v:?}"))))
            .transpose()
    };
    let perm = parse_num("http.perm", 8)?.unwrap_or(0o600);
    let uid = parse_num("http.uid", 10)?.unwrap_or(0);
    let gid = parse_num("http.gid", 10)?.unwrap_or(0);
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(request)?;
    let mut resp = client
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(request)?;
    let mtime = resp
        .headers()
        .get(reqwest::header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| httpdate::parse_http_date(s).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    let mut st = w.store().prepare(None)?;
    let path = st.diff().join(&filename);
    let f = std::fs::File::create(&path).map_err(Error::io("create", &path))?;
    let mut out = kiln_digest::DigestWriter::new(f);
    while let Some(chunk) = resp.chunk().await.map_err(request)? {
        use std::io::Write;
        out.write_all(&chunk).map_err(Error::io("write", &path))?;
    }
    let (_, digest, _) = out.finish();
    if let Some(want) = attrs.get("http.checksum").filter(|c| !c.is_empty())
        && *want != digest
    {
        return Err(herr(format!("digest mismatch {digest}: expected {want}")));
    }
    let times = fscopy::timespec(mtime.map_or(0, |t| t.as_secs() as i64 * 1_000_000_000));
    fscopy::set_meta(&path, (uid, gid), Some(perm), times).map_err(Error::io("chmod", &path))?;
    st.content_key = Some(format!("http:{digest}:{filename}:{perm:o}:{uid}:{gid}"));
    let store = w.store().clone();
    tokio::task::spawn_blocking(move || store.commit(st, Kind::Built, None)).await?
}
