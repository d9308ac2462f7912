//! The worker end to end on the containerd backend (`[worker.containerd]`, the
//! containerd at `KILN_TEST_CONTAINERD`): the same cases as `worker.rs`.

mod worker_cases;

use kiln_integration_tests::Backend;

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
