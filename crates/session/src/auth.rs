//! The session's Auth attachable (BuildKit's `moby.filesync.v1.Auth`): the client answers
//! `Credentials(host)` from its Docker config (`$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`, `auths.HOST.auth` = base64 "user:pass"), read at each call so
//! the daemon never stores credentials. Credential helpers (`credsStore`) are not run.

use base64::Engine as _;
use kiln_proto::moby::filesync::v1::{
    CredentialsRequest, CredentialsResponse, FetchTokenRequest, FetchTokenResponse,
    GetTokenAuthorityRequest, GetTokenAuthorityResponse, VerifyTokenAuthorityRequest,
    VerifyTokenAuthorityResponse, auth_server,
};
use std::path::PathBuf;
use tonic::{Request, Response, Status};

/// Docker Hub's key in config.json.
const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";

/// The Docker client config file of this user.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// (username, secret) for `host` from a Docker config.json document; `None` when it has no
/// usable entry. `identitytoken` entries answer with an empty username, as BuildKit does.
pub fn credentials_from_config(config: &[u8], host: &str) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_slice(config).ok()?;
    let auths = v.get("auths")?.as_object()?;
    let hub = matches!(
        host,
        "docker.io" | "registry-1.docker.io" | "index.docker.io"
    );
    let keys: Vec<String> = if hub {
        vec![
            DOCKER_HUB_AUTH_KEY.to_string(),
            "docker.io".into(),
            "index.docker.io".into(),
        ]
    } else {
        vec![
            host.to_string(),
            format!("https://{host}"),
            format!("http://{host}"),
        ]
    };
    let entry = keys.iter().find_map(|k| {
        auths
            .get(k)
            .or_else(|| auths.get(&format!("{k}/")))
            .or_else(|| {
                auths
                    .iter()
                    .find(|(name, _)| {
                        name.trim_end_matches('/')
                            .trim_end_matches("/v1")
                            .trim_end_matches("/v2")
                            == k
                    })
                    .map(|(_, e)| e)
            })
    })?;
    if let Some(token) = entry
        .get("identitytoken")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
    {
        return Some((String::new(), token.to_string()));
    }
    if let Some(auth) = entry
        .get("auth")
        .and_then(|a| a.as_str())
        .filter(|a| !a.is_empty())
    {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()?;
        let s = String::from_utf8(raw).ok()?;
        let (u, p) = s.split_once(':')?;
        return Some((u.to_string(), p.to_string()));
    }
    let u = entry.get("username").and_then(|u| u.as_str())?;
    let p = entry.get("password").and_then(|p| p.as_str())?;
    Some((u.to_string(), p.to_string()))
}

/// The Auth service a client serves on its session.
pub(crate) struct Auth;

#[tonic::async_trait]
impl auth_server::Auth for Auth {
    async fn credentials(
        &self,
        request: Request<CredentialsRequest>,
    ) -> Result<Response<CredentialsResponse>, Status> {
        let host = request.into_inner().host;
        let found = docker_config_path()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|c| credentials_from_config(&c, &host));
        let (username, secret) = found.unwrap_or_default();
        Ok(Response::new(CredentialsResponse { username, secret }))
    }

    async fn fetch_token(
        &self,
        _r: Request<FetchTokenRequest>,
    ) -> Result<Response<FetchTokenResponse>, Status> {
        Err(Status::unimplemented(
            "token fetching on the client is not supported; use Credentials",
        ))
    }

    async fn get_token_authority(
        &self,
        _r: Request<GetTokenAuthorityRequest>,
    ) -> Result<Response<GetTokenAuthorityResponse>, Status> {
        Err(Status::unimplemented("token authority is not supported"))
    }

    async fn verify_token_authority(
        &self,
        _r: Request<VerifyTokenAuthorityRequest>,
    ) -> Result<Response<VerifyTokenAuthorityResponse>, Status> {
        Err(Status::unimplemented("token authority is not supported"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_by_host_and_docker_hub_key() {
        let cfg = br#"{"auths":{
            "127.0.0.1:5000":{"auth":"dXNlcjpwYTpzcw=="},
            "https://index.docker.io/v1/":{"auth":"aHViOmh1YnB3"},
            "https://reg.example/v1/":{"username":"u2","password":"p2"},
            "tok.example":{"identitytoken":"T"}}}"#;
        assert_eq!(
            credentials_from_config(cfg, "127.0.0.1:5000"),
            Some(("user".into(), "pa:ss".into()))
        );
        assert_eq!(
            credentials_from_config(cfg, "docker.io"),
            Some(("hub".into(), "hubpw".into()))
        );
        assert_eq!(
            credentials_from_config(cfg, "registry-1.docker.io"),
            Some(("hub".into(), "hubpw".into()))
        );
        assert_eq!(
            credentials_from_config(cfg, "reg.example"),
            Some(("u2".into(), "p2".into()))
        );
        assert_eq!(
            credentials_from_config(cfg, "tok.example"),
            Some((String::new(), "T".into()))
        );
        assert_eq!(credentials_from_config(cfg, "other:5000"), None);
        assert_eq!(credentials_from_config(b"not json", "x"), None);
    }
}
