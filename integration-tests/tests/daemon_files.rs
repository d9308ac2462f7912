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

#[test]
fn group_gives_the_socket_to_a_group_by_name_or_number() {
    use std::os::unix::fs::MetadataExt;
    // Debian's "daemon" group is gid 1 on every machine
    for (group, gid) in [("daemon", 1), ("4242", 4242)] {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("k.sock");
        let addr = format!("unix://{}", sock.display());
        let d = Daemon::start_listening(&addr, &["--group", group]).expect("daemon");
        let meta = std::fs::metadata(&sock).expect("socket");
        assert_eq!(meta.gid(), gid, "--group {group}");
        assert_eq!(meta.mode() & 0o777, 0o660);
        let ok = d.kiln(dir.path(), &["debug", "workers"]).expect("kiln");
        assert!(ok.status.success(), "{}", d.logs());
    }
    // an unknown group name is a clear error at start
    let dir = tempfile::tempdir().expect("tmp");
    let addr = format!("unix://{}", dir.path().join("k.sock").display());
    let err = Daemon::start_listening(&addr, &["--group", "no-such-group-kiln"])
        .err()
        .expect("refused");
    assert!(err.to_string().contains("no such group"), "{err}");
}
