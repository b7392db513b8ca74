//! How a pod turns a request's prompt into token ids: the KV model caches
//! blocks of token ids, and the KV events carry them, so a subscriber keys
//! its index from exactly the ids the pod cached.
//!
//! Two sources:
//! - [`PromptTokenizer::Chunks`] (the default, and every existing bench):
//!   the rendered prompt text cut into `--chars-per-token` byte chunks, each
//!   chunk one id. A chunk of at most 4 bytes is its bytes packed
//!   little-endian (injective for full chunks, free to compute); a longer
//!   chunk is the low 32 bits of its xxh3. Equal text therefore gives equal
//!   ids, and a prefix of the text a prefix of the ids, which is all the
//!   cache model needs; hit rates are those of the byte-block model it
//!   replaced (a block of `block_size` ids is `block_size x chars_per_token`
//!   bytes).
//! - `--tokenizer DIR`: the model's real tokenizer and chat template
//!   (`tokenizer.json`, `tokenizer_config.json`), through the picker's own
//!   `epp::tokenize`, so the pod caches exactly the ids the picker computes
//!   from the same request, as a vLLM pod and the picker share a tokenizer.
//!   A prompt the template cannot render is encoded as plain text.

use std::sync::Arc;

use epp::{
    request::{ApiKind, parse},
    tokenize::ModelTokenizer,
};
use xxhash_rust::xxh3::xxh3_64;

use super::SimError;
use super::api::{Endpoint, Validated};
use super::config::SimConfig;

/// The token ids of `text` in chunk mode, appended to `out` (cleared first).
/// Public so tests can compute what a pod caches for a prompt.
pub fn chunk_token_ids(text: &[u8], chars_per_token: usize, out: &mut Vec<u32>) {
    out.clear();
    if chars_per_token == 0 {
        return;
    }
    out.reserve(text.len().div_ceil(chars_per_token));
    if chars_per_token <= 4 {
        out.extend(text.chunks(chars_per_token).map(|c| {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(b)
        }));
    } else {
        out.extend(text.chunks(chars_per_token).map(|c| xxh3_64(c) as u32));
    }
}

/// A pod's tokenizer (shared by its connections; immutable).
#[derive(Debug, Clone)]
pub enum PromptTokenizer {
    /// Fixed-size byte chunks of the rendered prompt text.
    Chunks { chars_per_token: usize },
    /// The model's tokenizer and chat template.
    Model(Arc<ModelTokenizer>),
}

/// Segment cache of a simulated pod's tokenizer (one per fleet process).
const SIM_TOKENIZER_CACHE_BYTES: usize = 64 << 20;

impl PromptTokenizer {
    /// The tokenizer the flags ask for.
    pub fn from_config(cfg: &SimConfig) -> Result<Self, SimError> {
        if let Some(dir) = &cfg.tokenizer {
            let t = ModelTokenizer::from_dir(dir, SIM_TOKENIZER_CACHE_BYTES).map_err(|e| {
                SimError::Config(format!(
                    "--tokenizer {}: {}",
                    dir.display(),
                    epp::telemetry::logging::chain(&e)
                ))
            })?;
            return Ok(Self::Model(Arc::new(t)));
        }
        Ok(Self::Chunks {
            chars_per_token: cfg.chars_per_token,
        })
    }

    /// The prompt's token ids into `out` (cleared first). `body` is the
    /// request as received (the real tokenizer renders its messages).
    pub fn tokenize(&self, v: &Validated, body: &[u8], endpoint: Endpoint, out: &mut Vec<u32>) {
        match self {
            Self::Chunks { chars_per_token } => {
                chunk_token_ids(v.text.as_bytes(), *chars_per_token, out);
            }
            Self::Model(t) => {
                out.clear();
                let api = match endpoint {
                    Endpoint::Chat => ApiKind::ChatCompletions,
                    Endpoint::Completions => ApiKind::Completions,
                };
                let ok = parse(body, api)
                    .ok()
                    .is_some_and(|req| t.tokenize(&req, out).is_ok());
                if !ok {
                    out.clear();
                    // The text the sim validated; never empty for a valid request.
                    let _ = t.encode(&v.text, true, out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_deterministic_and_prefix_stable() {
        for cpt in [1, 3, 4, 5, 9] {
            let mut a = Vec::new();
            let mut b = Vec::new();
            let x = b"the same system prompt, then a question";
            chunk_token_ids(x, cpt, &mut a);
            chunk_token_ids(b"the same system prompt, then another", cpt, &mut b);
            assert_eq!(a.len(), x.len().div_ceil(cpt));
            let common = 29 / cpt; // chunks wholly inside the shared text
            assert_eq!(a[..common], b[..common], "cpt {cpt}");
            assert_ne!(a, b);
        }
        let mut v = Vec::new();
        chunk_token_ids(b"abcdabce", 4, &mut v);
        assert_eq!(
            v,
            [u32::from_le_bytes(*b"abcd"), u32::from_le_bytes(*b"abce")]
        );
    }
}
