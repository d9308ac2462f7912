//! kilnd's side of the farm: `[farm]` and the farm flags, the farm a
//! solver-scheduler keeps, and a worker-executor's membership in one.

use crate::config::FileConfig;
use anyhow::Context;
use solver_scheduler::farm::members::Registration;
use solver_scheduler::farm::{Farm, FarmConfig};
use solver_scheduler::grpc::client::GrpcWorker;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The worker's labels: `[worker.oci] labels`, then each `--oci-worker-labels KEY=VALUE`.
pub fn labels(file: &FileConfig, flags: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut labels = file.worker.oci.labels.clone();
    for f in flags {
        let (k, v) = f
            .split_once('=')
            .with_context(|| format!("--oci-worker-labels {f:?}: want KEY=VALUE"))?;
        anyhow::ensure!(!k.is_empty(), "--oci-worker-labels {f:?}: an empty key");
        labels.insert(k.to_string(), v.to_string());
    }
    // what executes steps, as BuildKit's workers say it
    let executor = if file.worker.containerd.enabled {
        "containerd"
    } else {
        "oci"
    };
    labels
        .entry(solver_scheduler::solver::WORKER_EXECUTOR_LABEL.to_string())
        .or_insert_with(|| executor.to_string());
    Ok(labels)
}

fn duration(key: &str, v: &Option<String>, default: Duration) -> anyhow::Result<Duration> {
    match v {
        Some(s) => {
            kiln_units::parse_config_duration(s).with_context(|| format!("[farm] {key} = {s:?}"))
        }
        None => Ok(default),
    }
}

/// `[farm.tls]`: when set, kiln's services speak mutual TLS to each other on
/// `tcp://`: this process dials with the certificate, and its internal
/// listeners require one the CA signed. Returns the listeners' config.
pub fn internal_tls(file: &FileConfig) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    let t = &file.farm.tls;
    if t.cert.is_none() && t.key.is_none() && t.ca.is_none() {
        return Ok(None);
    }
    let (Some(cert), Some(key), Some(ca)) = (&t.cert, &t.key, &t.ca) else {
        anyhow::bail!("[farm.tls] needs cert, key and ca: the services authenticate each other");
    };
    kiln_session::dial::set_internal_tls(kiln_session::tls::ClientTls {
        ca: Some(ca.clone()),
        cert: Some(cert.clone()),
        key: Some(key.clone()),
        server_name: None,
    });
    let server = kiln_session::tls::ServerTls {
        cert: cert.clone(),
        key: key.clone(),
        ca: Some(ca.clone()),
    };
    Ok(Some(server.config().context("[farm.tls]")?))
}

/// How the scheduler treats its workers.
pub fn config(file: &FileConfig) -> anyhow::Result<FarmConfig> {
    let d = FarmConfig::default();
    let timeout = duration("keepalive-timeout", &file.farm.keepalive_timeout, d.timeout)?;
    anyhow::ensure!(
        timeout >= Duration::from_millis(500),
        "[farm] keepalive-timeout must be at least 500ms"
    );
    Ok(FarmConfig {
        // a few keepalives fit in the timeout
        keepalive_interval: (timeout / 4).max(Duration::from_millis(100)),
        timeout,
        retries: file.farm.retries.unwrap_or(d.retries),
        min_free_disk: match &file.farm.min_free_disk {
            Some(v) => u64::try_from(v.bytes(1 << 20).context("[farm] min-free-disk")?)
                .context("[farm] min-free-disk is negative")?,
            None => d.min_free_disk,
        },
        ..d
    })
}

/// The client of a worker that joined.
fn connect(address: &str) -> Result<GrpcWorker, solver_scheduler::Error> {
    let ch = kiln_session::dial::connect_lazy(address)?;
    Ok(GrpcWorker::new(address.to_string(), ch))
}

/// The solver's farm: workers join it; `home`, the daemon's own worker (or
/// its `--worker-addr`), is a member that never leaves.
pub fn farm(
    file: &FileConfig,
    home: Option<(Registration, GrpcWorker)>,
) -> anyhow::Result<Farm<GrpcWorker>> {
    let config = config(file)?;
    Ok(match home {
        Some((reg, w)) => Farm::with_home(config, Arc::new(connect), reg, w),
        None => Farm::new(config, Arc::new(connect)),
    })
}

/// The home member's registration: unbounded steps at once (the solver's
/// `max-parallelism` still applies), as the one worker of a daemon always ran.
pub fn home_registration(
    id: String,
    address: &str,
    platforms: Vec<kiln_oci::Platform>,
    labels: BTreeMap<String, String>,
) -> Registration {
    Registration {
        id,
        address: address.to_string(),
        platforms,
        labels,
        capacity: usize::MAX,
        free_disk: 0,
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// A worker's membership: where it joins, as whom.
pub fn join_config(
    file: &FileConfig,
    join: &str,
    listen: &str,
    advertise: Option<&str>,
    capacity: Option<u32>,
    labels: BTreeMap<String, String>,
) -> anyhow::Result<worker_executor::join::JoinConfig> {
    let address = advertise
        .map(str::to_string)
        .or_else(|| file.farm.advertise.clone())
        .unwrap_or_else(|| listen.to_string());
    anyhow::ensure!(
        address.starts_with("tcp://"),
        "a worker joining a farm needs a tcp:// address the others can reach: give --advertise-addr (listening on {listen})"
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    Ok(worker_executor::join::JoinConfig {
        scheduler: join.to_string(),
        address,
        labels,
        capacity: capacity.or(file.farm.capacity).unwrap_or(cpus).max(1),
        drain_timeout: duration(
            "drain-timeout",
            &file.farm.drain_timeout,
            Duration::from_secs(600),
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn farm_config(toml_text: &str) -> anyhow::Result<FarmConfig> {
        let file: FileConfig = toml::from_str(toml_text)?;
        config(&file)
    }

    #[test]
    fn min_free_disk_is_a_size_a_number_of_megabytes_or_off() {
        let d = farm_config("").expect("default");
        assert_eq!(d.min_free_disk, 1 << 30);
        let n = farm_config("[farm]\nmin-free-disk = 512\n").expect("number");
        assert_eq!(n.min_free_disk, 512 << 20);
        let s = farm_config("[farm]\nmin-free-disk = \"2GiB\"\n").expect("size");
        assert_eq!(s.min_free_disk, 2 << 30);
        let off = farm_config("[farm]\nmin-free-disk = 0\n").expect("off");
        assert_eq!(off.min_free_disk, 0);
        assert!(farm_config("[farm]\nmin-free-disk = -1\n").is_err());
    }
}
