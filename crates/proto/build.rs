//! The only code generation step in the workspace: every .proto under
//! `proto/` is compiled here.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "pb/ops.proto",
        "fsutil/types/wire.proto",
        "moby/filesync/v1/filesync.proto",
        "moby/filesync/v1/auth.proto",
        "moby/secrets/v1/secrets.proto",
        "moby/sshforward/v1/ssh.proto",
        "moby/buildkit/v1/types/worker.proto",
        "moby/buildkit/v1/apicaps/caps.proto",
        "google/rpc/status.proto",
        "moby/buildkit/v1/control.proto",
        "moby/buildkit/v1/frontend/gateway.proto",
        "grpc/health/v1/health.proto",
        "kiln/frontend/v1/frontend.proto",
        "kiln/session/v1/broker.proto",
        "kiln/worker/v1/worker.proto",
        "kiln/exporter/v1/exporter.proto",
        "kiln/farm/v1/farm.proto",
        "containerd/services/content/v1/content.proto",
    ];
    let paths: Vec<_> = files.iter().map(|f| root.join(f)).collect();
    for p in &paths {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    tonic_prost_build::configure()
        // Maps are encoded sorted by key, as BuildKit's deterministic marshaling does:
        // LLB digests depend on it.
        .btree_map(".")
        .compile_protos(&paths, &[root])?;
    Ok(())
}
