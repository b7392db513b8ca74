//! Log setup: `tracing` to stderr as text or JSON. `RUST_LOG` wins over the
//! Go-style `-v` level (0-3 info, 4 debug, 5+ trace). With traces on, an
//! OpenTelemetry layer beside it sees only the spans of target
//! [`traces::TARGET`], which the log layer never prints.

use opentelemetry_sdk::trace::SdkTracer;
use tracing_subscriber::{
    EnvFilter, Layer, filter::Targets, fmt, layer::SubscriberExt, util::SubscriberInitExt,
};

use super::traces;
use crate::config::LogFormat;

/// The default filter for a verbosity level.
pub fn level_for(verbosity: u8) -> &'static str {
    match verbosity {
        0..=3 => "info",
        4 => "debug",
        _ => "trace",
    }
}

/// Installs the global subscriber, with the OpenTelemetry layer when
/// `tracer` is given. Safe to call once per process.
pub fn init(verbosity: u8, format: LogFormat, tracer: Option<SdkTracer>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // Keep dependencies quiet below trace: their debug logs are per frame.
        let level = level_for(verbosity);
        EnvFilter::new(format!(
            "{level},h2=info,hyper=info,tower=info,rustls=info,kube=info"
        ))
    });
    // Spans for export are not log lines, whatever RUST_LOG says. A
    // directive, not a `filter_fn`: a closure filter makes every callsite's
    // interest "sometimes", so each disabled trace!/debug! in h2 and hyper
    // (several per frame) would be re-evaluated by every layer's filter on
    // every hit instead of being skipped for good.
    let filter = match format!("{}=off", traces::TARGET).parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    use std::io::IsTerminal;
    let logs = fmt::layer()
        .with_writer(std::io::stderr)
        // Colour only for people: files and log collectors get plain text.
        .with_ansi(std::io::stderr().is_terminal());
    let logs = match format {
        LogFormat::Json => logs.json().flatten_event(true).boxed(),
        LogFormat::Text => logs.boxed(),
    };
    let otel = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_target(false)
            .with_filter(Targets::new().with_target(traces::TARGET, tracing::Level::INFO))
    });
    let _ = tracing_subscriber::registry()
        .with(otel)
        .with(logs.with_filter(filter))
        .try_init();
}

/// Client-controlled text (path, request id, model, parse errors quoting the
/// body) as it goes into a log line: at most [`Clip::MAX`] bytes, cut on a
/// character boundary, with the full length noted, so a client cannot make
/// one debug line copy kilobytes (or, for a model name, megabytes) of its
/// own text into the log.
pub struct Clip<'a>(pub &'a str);

impl Clip<'_> {
    pub const MAX: usize = 128;
}

impl std::fmt::Display for Clip<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.len() <= Self::MAX {
            return f.write_str(self.0);
        }
        let mut end = Self::MAX;
        while !self.0.is_char_boundary(end) {
            end -= 1;
        }
        write!(f, "{}...({} bytes)", &self.0[..end], self.0.len())
    }
}

/// An error with its causes, `outer: cause: root cause`, for log lines.
///
/// Error types here either show their cause in their message or expose it as
/// `source()`, never both, so `anyhow` prints each cause once at the
/// binary's edge; a log line that printed only `Display` would lose the
/// causes, hence this. Some dependencies' errors (kube's) do both; a cause
/// whose text the level above already showed is left out.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

/// `e` and its causes, for `error = %chain(&e)`.
pub fn chain<'a>(e: &'a (dyn std::error::Error + 'static)) -> ErrorChain<'a> {
    ErrorChain(e)
}

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Errors are logged rarely; formatting each level to compare it
        // with the one above is affordable.
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !shown.contains(&text) {
                write!(f, ": {text}")?;
            }
            shown = text;
            source = cause.source();
        }
        Ok(())
    }
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

    /// Shows its cause in its message and exposes it too, as kube's do.
    #[derive(Debug, thiserror::Error)]
    #[error("client: {0}")]
    struct Both(#[source] std::io::Error);

    #[test]
    fn chain_joins_every_cause_once() {
        let e = Outer::Wrapped(Middle(std::io::Error::other("root")));
        assert_eq!(chain(&e).to_string(), "outer: middle: root");
        assert_eq!(chain(&std::io::Error::other("alone")).to_string(), "alone");
        let e = Both(std::io::Error::other("refused"));
        assert_eq!(chain(&e).to_string(), "client: refused");
    }

    #[test]
    fn client_text_in_log_lines_is_clipped_on_a_char_boundary() {
        assert_eq!(Clip("short").to_string(), "short");
        let long = format!("{}é{}", "a".repeat(127), "b".repeat(5000));
        let shown = Clip(&long).to_string();
        assert_eq!(shown, format!("{}...(5129 bytes)", "a".repeat(127)));
    }
}
