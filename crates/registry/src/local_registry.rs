//! A throwaway `docker-registry` (distribution) on loopback, for tests that
//! push and pull for real (feature `local-registry`).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where Debian's `docker-registry` package puts the binary.
pub const BIN: &str = "/usr/bin/docker-registry";

/// A running registry, stopped when dropped; its storage is a temporary dir.
pub struct LocalRegistry {
    /// `127.0.0.1:PORT`
    pub addr: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl LocalRegistry {
    /// Starts one on a free port and waits until it accepts connections;
    /// `None` (the caller skips its test) when docker-registry is not installed.
    pub async fn start() -> Option<LocalRegistry> {
        if !Path::new(BIN).exists() {
            eprintln!("{BIN} missing: skipped");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .expect("config");
        let child = Command::new(BIN)
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn registry");
        let reg = LocalRegistry {
            addr,
            child,
            _dir: dir,
        };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(&reg.addr).await.is_ok() {
                return Some(reg);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("registry did not start on {}", reg.addr);
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
