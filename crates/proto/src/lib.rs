//! Generated protobuf messages and gRPC stubs for every protocol kiln speaks.
//!
//! This is the only crate that runs code generation. The BuildKit-compatible
//! edge (`pb`, `moby.*`, `fsutil.types`) keeps BuildKit's package names and
//! field numbers; `kiln.*` are the internal service-to-service protocols.
//! No logic lives here except the wire forms every service's gRPC edge
//! shares: [`status`] (an error's cause chain and BuildKit's `errdefs`
//! details), [`layers`] (layer options) and [`platform`] (kiln-oci's
//! `Platform` as a `pb.Platform`).

#![allow(clippy::all, missing_docs, reason = "generated code")]

#[warn(clippy::all)]
pub mod layers;
#[warn(clippy::all)]
pub mod platform;
#[warn(clippy::all)]
pub mod status;

/// LLB: `pb.Op`, `pb.Definition` and friends.
pub mod pb {
    tonic::include_proto!("pb");
}

/// fsutil's file metadata and transfer packets.
pub mod fsutil {
    pub mod types {
        tonic::include_proto!("fsutil.types");
    }
}

/// gRPC health checking, served on client sessions.
pub mod health {
    tonic::include_proto!("grpc.health.v1");
}

/// `google.rpc.Status`, the error of an LLBBridge Return or process exit.
pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// containerd's content store API: a client's local build-cache directory,
/// served on its session.
pub mod containerd {
    pub mod services {
        pub mod content {
            pub mod v1 {
                tonic::include_proto!("containerd.services.content.v1");
            }
        }
    }
}

pub mod moby {
    pub mod sshforward {
        pub mod v1 {
            tonic::include_proto!("moby.sshforward.v1");
        }
    }
    pub mod filesync {
        pub mod v1 {
            tonic::include_proto!("moby.filesync.v1");
        }
    }
    pub mod buildkit {
        pub mod v1 {
            tonic::include_proto!("moby.buildkit.v1");
            pub mod types {
                tonic::include_proto!("moby.buildkit.v1.types");
            }
            pub mod frontend {
                tonic::include_proto!("moby.buildkit.v1.frontend");
            }
            pub mod apicaps {
                tonic::include_proto!("moby.buildkit.v1.apicaps");
            }
        }
        pub mod secrets {
            pub mod v1 {
                tonic::include_proto!("moby.buildkit.secrets.v1");
            }
        }
    }
}

pub mod kiln {
    pub mod farm {
        pub mod v1 {
            tonic::include_proto!("kiln.farm.v1");
        }
    }
    pub mod frontend {
        pub mod v1 {
            tonic::include_proto!("kiln.frontend.v1");
        }
    }
    pub mod session {
        pub mod v1 {
            tonic::include_proto!("kiln.session.v1");
        }
    }
    pub mod worker {
        pub mod v1 {
            tonic::include_proto!("kiln.worker.v1");
        }
    }
    pub mod exporter {
        pub mod v1 {
            tonic::include_proto!("kiln.exporter.v1");
        }
    }
}
