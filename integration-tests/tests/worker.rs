//! The worker end to end on the runc backend: RUN mounts (cache, tmpfs, secret, ssh),
//! network modes, entitlements and escape attempts, with a real kilnd, runc and overlayfs.
//! The cases live in `worker_cases/`; `worker_containerd.rs` runs them on containerd.

mod worker_cases;

use kiln_integration_tests::Backend;

#[test]
fn cache_mount_persists_across_builds_and_never_lands_in_the_image() {
    worker_cases::cache_mount_persists_across_builds_and_never_lands_in_the_image(&Backend::Runc);
}

#[test]
fn tmpfs_mount_has_its_size_and_leaves_nothing_behind() {
    worker_cases::tmpfs_mount_has_its_size_and_leaves_nothing_behind(&Backend::Runc);
}

#[test]
fn secrets_reach_the_step_as_file_and_env_but_never_the_image_or_logs() {
    worker_cases::secrets_reach_the_step_as_file_and_env_but_never_the_image_or_logs(
        &Backend::Runc,
    );
}

#[test]
fn network_none_has_only_loopback_and_host_mode_is_the_host_network() {
    worker_cases::network_none_has_only_loopback_and_host_mode_is_the_host_network(&Backend::Runc);
}

#[test]
fn host_network_and_insecure_need_entitlements_from_daemon_and_request() {
    worker_cases::host_network_and_insecure_need_entitlements_from_daemon_and_request(
        &Backend::Runc,
    );
}

#[test]
fn copy_and_add_escapes_are_contained() {
    worker_cases::copy_and_add_escapes_are_contained(&Backend::Runc);
}

#[test]
fn copy_link_chmod_exclude_and_add_url_with_checksum() {
    worker_cases::copy_link_chmod_exclude_and_add_url_with_checksum(&Backend::Runc);
}

#[test]
fn cache_mount_seeded_from_a_stage_and_secrets_in_split_services() {
    worker_cases::cache_mount_seeded_from_a_stage_and_secrets_in_split_services(&Backend::Runc);
}

#[test]
fn ssh_mount_forwards_the_clients_agent() {
    worker_cases::ssh_mount_forwards_the_clients_agent(&Backend::Runc);
}
