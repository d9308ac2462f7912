//! `kiln-frontend`: kiln's Dockerfile frontend as the entrypoint of a frontend
//! image. A daemon (kilnd, or BuildKit) runs it for `--frontend gateway.v0
//! --opt source=IMAGE` or `# syntax=IMAGE` with LLBBridge on its stdio.

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let req = frontend_gateway::grpc::image::request_from_env(std::env::vars());
    let channel = kiln_session::dial::stdio();
    if let Err(e) = frontend_gateway::grpc::image::run(channel, req).await {
        eprintln!(
            "kiln-frontend: return the result to the daemon: {}",
            e.message()
        );
        std::process::exit(1);
    }
    // not a return from main: the runtime would wait for the thread blocked
    // reading stdin
    std::process::exit(0);
}
