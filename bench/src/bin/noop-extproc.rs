//! `noop-extproc`: the no-op ext_proc server of the overhead benchmark (see
//! `epp_bench::perf::noop`). Prints `listening on ADDR` once bound.

use anyhow::Context as _;
use clap::Parser;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use epp_bench::perf::noop::NoopExtProc;

/// Buffers each request body, names an endpoint round robin, passes
/// everything else back. Plaintext h2c.
#[derive(Debug, Parser)]
#[command(name = "noop-extproc", version)]
struct Cli {
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 9002)]
    port: u16,
    /// Endpoints (ip:port) named in turn, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", cli.port))
        .await
        .context("binding")?;
    println!("listening on {}", listener.local_addr()?);
    let incoming = futures_util::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    });
    tonic::transport::Server::builder()
        .add_service(ExternalProcessorServer::new(NoopExtProc::new(
            cli.endpoints,
        )))
        .serve_with_incoming(incoming)
        .await
        .context("serving")?;
    Ok(())
}
