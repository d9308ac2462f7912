//! The gRPC edge of the solver: `Control` and `SessionBroker` and
//! `LLBBridge` servers, and clients for the worker, frontend and exporter
//! peers. The only module that names tonic or generated types.

pub mod client;
mod container;
mod convert;
pub mod farm;
pub mod server;

pub use farm::farm_server;
pub use server::{bridge_server, broker_server, client_bridge_server, control_server};

/// gRPC metadata key carrying the build id on LLBBridge calls.
pub const BUILD_ID_KEY: &str = "kiln-build-id";
