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

/// Displays an error with its causes, "msg: cause: cause", for log fields.
/// An error either shows its cause in its message or exposes it as
/// `source()`, never both, so `%e` alone would drop the causes of the
/// latter kind; this walks them.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// `e` and its causes, for `error = %chain(&e)`.
pub fn chain<'a>(e: &'a (dyn std::error::Error + 'static)) -> ErrorChain<'a> {
    ErrorChain(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("outer")]
        Wrapped(#[source] Middle),
    }

    #[derive(Debug, thiserror::Error)]
    #[error("middle")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn chain_joins_every_cause() {
        let e = Outer::Wrapped(Middle(std::io::Error::other("root")));
        assert_eq!(chain(&e).to_string(), "outer: middle: root");
        assert_eq!(chain(&std::io::Error::other("alone")).to_string(), "alone");
    }
}
