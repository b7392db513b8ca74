//! Session affinity, as llm-d's `encoded_endpoint_header` strategy
//! (`session-affinity-scorer`, `session-affinity-filter`).
//!
//! The picker answers every routed request with a response header (default
//! `x-session-token`) naming the endpoint that served it; a client that
//! sends the header back on its next request gets that endpoint preferred
//! (scorer: 1 there, 0 elsewhere) or required when it is still a candidate
//! (filter). Nothing is stored on the picker's side.
//!
//! The token is the standard base64 of the endpoint's name, as llm-d encodes
//! its pod's `namespace/name`. Decoding it can only ever select among the
//! endpoints discovery published: the decoded name is compared with the
//! candidates' names, never resolved to an address. A token that is longer
//! than [`MAX_TOKEN_BYTES`], not base64, or names no candidate is ignored.
//! Decoding borrows a fixed stack buffer: no allocation, whatever the client
//! sends.

use base64::{Engine, engine::general_purpose::STANDARD};
use serde::Deserialize;

use super::{Candidate, Cycle, Filter, Scorer};
use crate::endpoints::Endpoint;

/// llm-d's default header, for the request and the response.
pub const DEFAULT_HEADER: &str = "x-session-token";

/// Longest token considered (base64 of a 384-byte name; Kubernetes names
/// are at most 253 bytes).
pub const MAX_TOKEN_BYTES: usize = 512;

/// The token naming `endpoint`.
pub fn token(endpoint: &Endpoint) -> String {
    STANDARD.encode(endpoint.name())
}

/// Runs `f` on the endpoint name a token carries, if it decodes.
fn with_decoded<R>(token: &str, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
    let token = token.trim();
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return None;
    }
    let mut buf = [0u8; MAX_TOKEN_BYTES / 4 * 3];
    let n = STANDARD.decode_slice(token, &mut buf).ok()?;
    buf.get(..n).map(f)
}

/// Whether the request's token names this candidate.
fn named(token: Option<&str>, c: &Candidate<'_>) -> bool {
    token
        .and_then(|t| with_decoded(t, |name| name == c.endpoint.name().as_bytes()))
        .unwrap_or(false)
}

/// What a session plugin's parameters ask for.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionParams {
    #[serde(default)]
    pub strategy: Option<String>,
    #[serde(default)]
    pub profile_name: Option<String>,
    #[serde(default)]
    pub encoded_endpoint_header_config: Option<HeaderConfig>,
}

#[derive(Debug, Default, Deserialize)]
pub struct HeaderConfig {
    #[serde(default)]
    pub header: Option<String>,
}

/// Why a session plugin's parameters are refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionConfigError {
    /// Supported upstream, not here: (what, nearest).
    Unsupported(&'static str, &'static str),
    Invalid(String),
}

impl SessionParams {
    /// The header name to use, lower case; refuses what we do not do.
    pub fn header(&self) -> Result<String, SessionConfigError> {
        match self.strategy.as_deref() {
            None | Some("encoded_endpoint_header") => {}
            Some("session_id") => {
                return Err(SessionConfigError::Unsupported(
                    "strategy session_id: server-side session bindings",
                    "strategy encoded_endpoint_header (the default)",
                ));
            }
            Some(other) => {
                return Err(SessionConfigError::Invalid(format!(
                    "strategy must be \"encoded_endpoint_header\" or \"session_id\", got {other:?}"
                )));
            }
        }
        if self.profile_name.as_deref().is_some_and(|p| !p.is_empty()) {
            return Err(SessionConfigError::Unsupported(
                "profileName: pinning another profile's pick (prefill/decode disaggregation)",
                "no profileName (the picked endpoint)",
            ));
        }
        let header = self
            .encoded_endpoint_header_config
            .as_ref()
            .and_then(|c| c.header.as_deref())
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| DEFAULT_HEADER.to_owned());
        let token_char = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if !header.bytes().all(token_char) || header.starts_with(':') {
            return Err(SessionConfigError::Invalid(format!(
                "encodedEndpointHeaderConfig.header {header:?} is not an HTTP header name"
            )));
        }
        Ok(header)
    }
}

/// `session-affinity-scorer`: 1 for the endpoint the request's token names,
/// 0 for the others.
#[derive(Debug)]
pub struct SessionAffinityScorer;

impl Scorer for SessionAffinityScorer {
    fn score(&self, cycle: &Cycle<'_>, c: &[Candidate<'_>], out: &mut [f64]) {
        let token = cycle.facts.session_token;
        for (o, c) in out.iter_mut().zip(c) {
            *o = if named(token, c) { 1.0 } else { 0.0 };
        }
    }
}

/// `session-affinity-filter`: only the endpoint the token names when it is a
/// candidate; every candidate otherwise (never empty).
#[derive(Debug)]
pub struct SessionAffinityFilter;

impl Filter for SessionAffinityFilter {
    fn filter(&self, cycle: &Cycle<'_>, candidates: &mut Vec<Candidate<'_>>) {
        let token = cycle.facts.session_token;
        if token.is_some() && candidates.iter().any(|c| named(token, c)) {
            candidates.retain(|c| named(token, c));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_decode_within_bounds_only() {
        let encoded = STANDARD.encode("vllm-0");
        assert_eq!(encoded, "dmxsbS0w");
        assert_eq!(
            with_decoded(&encoded, <[u8]>::to_vec),
            Some(b"vllm-0".to_vec())
        );
        assert_eq!(
            with_decoded(" dmxsbS0w ", |n| n == b"vllm-0"),
            Some(true),
            "surrounding blanks"
        );
        for bad in ["", "not base64!", "dmxsbS0", "%%%%"] {
            assert_eq!(with_decoded(bad, |_| ()), None, "{bad:?}");
        }
        let longest = STANDARD.encode(vec![b'a'; MAX_TOKEN_BYTES / 4 * 3]);
        assert_eq!(longest.len(), MAX_TOKEN_BYTES);
        assert_eq!(with_decoded(&longest, <[u8]>::len), Some(384));
        let too_long = STANDARD.encode(vec![b'a'; MAX_TOKEN_BYTES]);
        assert_eq!(with_decoded(&too_long, |_| ()), None);
    }

    #[test]
    fn parameters_follow_llm_d_and_refuse_what_is_not_done() {
        let parse = |y: &str| -> SessionParams { yaml_serde::from_str(y).unwrap() };
        assert_eq!(parse("{}").header().unwrap(), DEFAULT_HEADER);
        assert_eq!(
            parse("{strategy: encoded_endpoint_header, encodedEndpointHeaderConfig: {header: ' X-My-Session '}}")
                .header()
                .unwrap(),
            "x-my-session"
        );
        assert!(matches!(
            parse("{strategy: session_id}").header(),
            Err(SessionConfigError::Unsupported(..))
        ));
        assert!(matches!(
            parse("{profileName: prefill}").header(),
            Err(SessionConfigError::Unsupported(..))
        ));
        assert!(matches!(
            parse("{strategy: sticky}").header(),
            Err(SessionConfigError::Invalid(_))
        ));
        assert!(matches!(
            parse("{encodedEndpointHeaderConfig: {header: 'bad header'}}").header(),
            Err(SessionConfigError::Invalid(_))
        ));
    }
}
