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
/// causes, hence this.
pub struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

/// See [`ErrorChain`].
pub fn chain<'a>(e: &'a (dyn std::error::Error + 'static)) -> ErrorChain<'a> {
    ErrorChain(e)
}

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_prints_every_cause_once() {
        let e = Outer(std::io::Error::other("root"));
        assert_eq!(chain(&e).to_string(), "outer: root");
    }

    #[test]
    fn client_text_in_log_lines_is_clipped_on_a_char_boundary() {
        assert_eq!(Clip("short").to_string(), "short");
        let long = format!("{}é{}", "a".repeat(127), "b".repeat(5000));
        let shown = Clip(&long).to_string();
        assert_eq!(shown, format!("{}...(5129 bytes)", "a".repeat(127)));
    }
}
