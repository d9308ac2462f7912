//! The worker end to end on the containerd backend (`[worker.containerd]`, the
//! containerd at `KILN_TEST_CONTAINERD`): the same cases as `worker.rs`.

mod worker_cases;

use kiln_integration_tests::{Backend, BuildContext, Daemon, Topology};

#[test]
fn cache_mount_persists_across_builds_and_never_lands_in_the_image() {
    if let Some(b) = Backend::containerd() {
        worker_cases::cache_mount_persists_across_builds_and_never_lands_in_the_image(&b);
    }
}

#[test]
fn tmpfs_mount_has_its_size_and_leaves_nothing_behind() {
    if let Some(b) = Backend::containerd() {
        worker_cases::tmpfs_mount_has_its_size_and_leaves_nothing_behind(&b);
    }
}

#[test]
fn secrets_reach_the_step_as_file_and_env_but_never_the_image_or_logs() {
    if let Some(b) = Backend::containerd() {
        worker_cases::secrets_reach_the_step_as_file_and_env_but_never_the_image_or_logs(&b);
    }
}

#[test]
fn network_none_has_only_loopback_and_host_mode_is_the_host_network() {
    if let Some(b) = Backend::containerd() {
        worker_cases::network_none_has_only_loopback_and_host_mode_is_the_host_network(&b);
    }
}

#[test]
fn host_network_and_insecure_need_entitlements_from_daemon_and_request() {
    if let Some(b) = Backend::containerd() {
        worker_cases::host_network_and_insecure_need_entitlements_from_daemon_and_request(&b);
    }
}

#[test]
fn copy_and_add_escapes_are_contained() {
    if let Some(b) = Backend::containerd() {
        worker_cases::copy_and_add_escapes_are_contained(&b);
    }
}

#[test]
fn copy_link_chmod_exclude_and_add_url_with_checksum() {
    if let Some(b) = Backend::containerd() {
        worker_cases::copy_link_chmod_exclude_and_add_url_with_checksum(&b);
    }
}

#[test]
fn cache_mount_seeded_from_a_stage_and_secrets_in_split_services() {
    if let Some(b) = Backend::containerd() {
        worker_cases::cache_mount_seeded_from_a_stage_and_secrets_in_split_services(&b);
    }
}

#[test]
fn ssh_mount_forwards_the_clients_agent() {
    if let Some(b) = Backend::containerd() {
        worker_cases::ssh_mount_forwards_the_clients_agent(&b);
    }
}

#[test]
fn secret_env_never_reaches_containerds_database() {
    let Some(b) = Backend::containerd() else {
        return;
    };
    let Backend::Containerd { address } = &b else {
        return;
    };
    let db = std::path::Path::new(address)
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("root/io.containerd.metadata.v1.bolt/meta.db"))
        .expect("containerd root");
    let d = Daemon::start_on(Topology::AllInOne, &b, "").expect("daemon");
    let value = format!("env-secret-{}", uuid::Uuid::new_v4().simple());
    let c = BuildContext::new(
        "FROM busybox\nRUN --mount=type=secret,id=tok,env=TOKEN sh -c 'test ${#TOKEN} -gt 0 && sleep 3'\n",
    )
    .expect("context");
    let mut child = std::process::Command::new(kiln_integration_tests::bin_dir().join("kiln"))
        .args(["--addr", &d.addr, "build", "--progress", "plain"])
        .args(kiln_integration_tests::dockerfile_args())
        .args(["--secret", "id=tok,env=KILN_TEST_SECRET_ENV"])
        .current_dir(c.path())
        .env("KILN_TEST_SECRET_ENV", &value)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kiln");
    // while the step runs (and after), containerd's database never holds the value
    let mut seen = false;
    let started = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() && started.elapsed().as_secs() < 120 {
        let bytes = std::fs::read(&db).unwrap_or_default();
        seen |= bytes.windows(value.len()).any(|w| w == value.as_bytes());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("kiln");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.logs()
    );
    assert!(!seen, "containerd's database held the secret env value");
}
