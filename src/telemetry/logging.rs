//! Log setup: `tracing` to stderr as text or JSON. `RUST_LOG` wins over the
//! Go-style `-v` level (0-3 info, 4 debug, 5+ trace).

use tracing_subscriber::{EnvFilter, fmt};

use crate::config::LogFormat;

/// The default filter for a verbosity level.
pub fn level_for(verbosity: u8) -> &'static str {
    match verbosity {
        0..=3 => "info",
        4 => "debug",
        _ => "trace",
    }
}

/// Installs the global subscriber. Safe to call once per process.
pub fn init(verbosity: u8, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // Keep dependencies quiet below trace: their debug logs are per frame.
        let level = level_for(verbosity);
        EnvFilter::new(format!(
            "{level},h2=info,hyper=info,tower=info,rustls=info,kube=info"
        ))
    });
    use std::io::IsTerminal;
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for people: files and log collectors get plain text.
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
