//! What kilnd leaves on the host for others to see: its state dir is private to
//! it and its socket open to its user and group only, whatever the umask.

use kiln_integration_tests::{Daemon, Topology};
use std::os::unix::fs::PermissionsExt;

#[test]
fn the_state_dir_is_private_and_the_socket_is_not_world_writable() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&d.dir.path().join("root/all")), 0o700);
    assert_eq!(mode(&d.dir.path().join("kilnd.sock")), 0o660);
}
