//! `epp`: parse flags, set up logging, run the picker until SIGTERM/SIGINT.

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use epp::{
    config::Flags,
    server,
    telemetry::{logging, traces::Traces},
};

/// Longest wait at exit for queued spans to reach the collector.
const TRACE_FLUSH: std::time::Duration = std::time::Duration::from_secs(3);

fn main() -> anyhow::Result<()> {
    let matches = Flags::command().get_matches();
    let flags = Flags::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("epp")
        .build()
        .context("starting the async runtime")?;
    // The OTLP exporter's channel belongs to the runtime.
    let traces = {
        let _in_runtime = runtime.enter();
        Traces::from_env(flags.tracing)
    };
    logging::init(
        flags.verbosity,
        flags.effective_log_format(),
        traces.tracer(),
    );
    traces.log_startup();
    for why in epp::config::ignored_flags(&matches) {
        tracing::warn!("{why}");
    }
    let result = runtime.block_on(server::run(
        flags,
        traces.requests(),
        shutdown_signal(),
        None,
    ));
    let _in_runtime = runtime.enter();
    traces.shutdown(TRACE_FLUSH);
    result.context("endpoint picker failed")
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
