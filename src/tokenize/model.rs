//! One model's tokenizer: its `tokenizer.json`, its chat template, and the
//! segment cache in front of them.
//!
//! Encoding splits the text at added tokens (`<|im_start|>`, `<|im_end|>`,
//! ... leftmost-longest, as the tokenizers library does before normalizing
//! and pre-tokenizing) and tokenizes each segment between them on its own:
//! the library never lets normalization or pre-tokenization cross an added
//! token, so the ids of the whole text are the concatenation of the
//! segments' ids and the added tokens' ids. That is what makes a segment
//! cacheable. Where a tokenizer's added tokens could behave otherwise
//! (`lstrip`, `rstrip`, `single_word`, or matched on normalized text) the
//! split is not used and the whole text goes to the library; load also
//! checks the property on probe texts and falls back the same way if it
//! fails, with a log line.
//!
//! Segments are encoded by the fast byte-level BPE encoder (`bpe`) when the
//! tokenizer.json has a shape it reproduces and the split is on; load checks
//! it against the library on probe texts and otherwise keeps the library,
//! saying which it chose in a log line.
//!
//! With the fast encoder, a long segment is also cut into chunks of about
//! [`CHUNK_BYTES`], each encoded and cached on its own. A completions prompt
//! has no added tokens, so without this it is one segment: prompts sharing
//! a long system prompt but not their last words would each be encoded
//! whole. A cut is placed only where the ids of the chunks concatenate to
//! the ids of the whole ([`next_cut`]), and a cut depends only on the text
//! up to one byte past it, so prompts sharing a prefix cut it the same way
//! and share its chunks in the cache.

use std::path::{Path, PathBuf};

use aho_corasick::{AhoCorasick, MatchKind};
use tokenizers::Tokenizer;

use super::{
    TokenizeError,
    bpe::FastBpe,
    cache::{self, CacheStats, SegmentCache},
    template::ChatTemplate,
};
use crate::request::{ApiKind, ChatMessage, InferenceRequest};

/// A model's tokenizer, shared by every request for the model.
#[derive(Debug)]
pub struct ModelTokenizer {
    dir: PathBuf,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    /// Added tokens for the segment split; None when splitting is unsafe.
    splitter: Option<Splitter>,
    /// Ids the post-processor puts around a single sequence (BOS/EOS), when
    /// it only adds ids around; None when it does something else.
    affixes: Option<(Vec<u32>, Vec<u32>)>,
    cache: SegmentCache,
    /// The fast encoder for segments; None: the library encodes them.
    fast: Option<FastBpe>,
    /// Chunk length of long segments (see the module header).
    chunk_bytes: usize,
}

/// Segments of at least twice this many bytes are encoded in chunks. Large
/// enough that a chunk's cache entry and lookup cost little next to
/// encoding it; small enough that the chunk holding the end of a shared
/// prefix, encoded again for every new suffix, is a small part of a prompt.
pub(super) const CHUNK_BYTES: usize = 1024;

/// The first position at or after `from` where `text` may be cut: a single
/// ASCII space between two ASCII letters, cut before the space. Both split
/// patterns the fast encoder reproduces (Qwen2's and Llama-3's) end a
/// piece there (`\p{L}+` stops at the space; a contraction ends in a
/// letter) and start the next at the space (` ?\p{L}+`); no alternative
/// looks behind, so the text after the cut splits as it does in the whole.
/// NFC never composes an ASCII letter with a following space.
fn next_cut(text: &[u8], from: usize) -> Option<usize> {
    let from = from.max(1);
    let rest = text.get(from..)?;
    let letter = |i: usize| text.get(i).is_some_and(u8::is_ascii_alphabetic);
    rest.iter()
        .enumerate()
        .filter(|&(_, &b)| b == b' ')
        .map(|(i, _)| from + i)
        .find(|&i| letter(i - 1) && letter(i + 1))
}

#[derive(Debug)]
struct Splitter {
    matcher: AhoCorasick,
    ids: Vec<u32>,
}

impl ModelTokenizer {
    /// Loads `dir/tokenizer.json` and `dir/tokenizer_config.json` (the chat
    /// template may also be `dir/chat_template.jinja`, which wins, as in
    /// transformers). `cache_bytes` bounds the segment cache; 0 disables it.
    pub fn from_dir(dir: &Path, cache_bytes: usize) -> Result<Self, TokenizeError> {
        let json_path = dir.join("tokenizer.json");
        let json = read(&json_path)?;
        let mut tokenizer =
            Tokenizer::from_bytes(&json).map_err(|e| TokenizeError::TokenizerJson {
                path: json_path.clone(),
                reason: e.to_string(),
            })?;
        // Truncation or padding saved with the file would change the ids;
        // the model server tokenizes the full prompt.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| TokenizeError::TokenizerJson {
                path: json_path.clone(),
                reason: e.to_string(),
            })?;
        let config_path = dir.join("tokenizer_config.json");
        let config = super::load::TokenizerConfig::read(&config_path)?;
        let jinja_path = dir.join("chat_template.jinja");
        let (source, origin) = match std::fs::read_to_string(&jinja_path) {
            Ok(s) => (Some(s), jinja_path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (config.chat_template.clone(), config_path)
            }
            Err(error) => {
                return Err(TokenizeError::Read {
                    path: jinja_path,
                    error,
                });
            }
        };
        let template = source
            .map(|s| ChatTemplate::new(s, &config.special, &origin.display().to_string()))
            .transpose()?;
        let fast = match FastBpe::from_json(&json) {
            Ok(f) => Some(f),
            Err(reason) => {
                tracing::info!(
                    dir = %dir.display(),
                    reason,
                    "tokenizer: not a shape the fast BPE encoder reproduces; the tokenizers library encodes"
                );
                None
            }
        };
        let mut model = Self {
            dir: dir.to_owned(),
            splitter: splitter(&tokenizer, dir),
            tokenizer,
            template,
            affixes: None,
            cache: SegmentCache::new(cache_bytes),
            fast,
            chunk_bytes: CHUNK_BYTES,
        };
        model.affixes = model.probe_affixes();
        model.verify_split();
        model.verify_fast();
        if model.fast.is_some() {
            tracing::info!(dir = %dir.display(), "tokenizer: fast byte-level BPE encoder on");
        }
        if model.renders_chat_natively() {
            tracing::info!(
                dir = %dir.display(),
                "tokenizer: ChatML chat template, rendered natively where it matches the template"
            );
        }
        Ok(model)
    }

    /// The directory the tokenizer was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends the token ids the model server computes for `req`'s prompt.
    ///
    /// Chat: the messages rendered with the chat template (generation prompt
    /// added), tokenized without the post-processor's special tokens, as
    /// vLLM's chat endpoint does. Completions: the prompt string with them,
    /// as its completions endpoint does. Anything else (prompt arrays,
    /// token-id prompts, tool calls, images, other APIs) is
    /// [`TokenizeError::Unsupported`]: the caller uses the approximate index.
    /// On error `out` may hold a partial result.
    pub fn tokenize(
        &self,
        req: &InferenceRequest<'_>,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizeError> {
        match req.api {
            ApiKind::ChatCompletions => {
                let text = self.render_chat(req.prompt.messages())?;
                self.encode(&text, false, out)
            }
            ApiKind::Completions => {
                let text = req.prompt.single_text().ok_or(TokenizeError::Unsupported(
                    "a completions prompt that is not one string",
                ))?;
                self.encode(text, true, out)
            }
            _ => Err(TokenizeError::Unsupported(
                "only chat and completions prompts are tokenized",
            )),
        }
    }

    /// The chat template's rendering of `messages` (what [`Self::tokenize`]
    /// encodes for a chat request).
    pub fn render_chat<'p>(
        &self,
        messages: impl Iterator<Item = ChatMessage<'p>>,
    ) -> Result<String, TokenizeError> {
        let template = self
            .template
            .as_ref()
            .ok_or(TokenizeError::NoChatTemplate {
                dir: self.dir.clone(),
            })?;
        template.render(messages)
    }

    /// Appends the ids of `text`; `add_special_tokens` as in the tokenizers
    /// library (the post-processor's BOS/EOS).
    pub fn encode(
        &self,
        text: &str,
        add_special_tokens: bool,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizeError> {
        match (&self.splitter, &self.affixes) {
            (Some(split), Some((prefix, suffix))) => {
                if add_special_tokens {
                    out.extend_from_slice(prefix);
                }
                self.encode_split(split, text, out, true)?;
                if add_special_tokens {
                    out.extend_from_slice(suffix);
                }
                Ok(())
            }
            (Some(split), None) if !add_special_tokens => self.encode_split(split, text, out, true),
            _ => self.encode_whole(text, add_special_tokens, out),
        }
    }

    /// Whether chats are rendered by the native ChatML renderer (where it
    /// covers them) instead of the template interpreter.
    pub fn renders_chat_natively(&self) -> bool {
        self.template.as_ref().is_some_and(|t| t.renders_natively())
    }

    /// Renders every chat through the template interpreter (for
    /// comparisons in tests and benchmarks).
    pub fn disable_native_chat_template(&mut self) {
        if let Some(t) = &mut self.template {
            t.disable_native();
        }
    }

    /// The template interpreter's rendering, native renderer or not.
    #[cfg(test)]
    pub(crate) fn render_chat_interpreted<'p>(
        &self,
        messages: impl Iterator<Item = ChatMessage<'p>>,
    ) -> Result<String, TokenizeError> {
        let messages: Vec<_> = messages.collect();
        match &self.template {
            Some(t) => t.interpret(&messages),
            None => Err(TokenizeError::NoChatTemplate {
                dir: self.dir.clone(),
            }),
        }
    }

    /// The segment cache's counters.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Whether encoding splits at added tokens and caches segments.
    pub fn caches_segments(&self) -> bool {
        self.splitter.is_some()
    }

    /// Cuts long segments into chunks of about `bytes` (tests exercise the
    /// cuts on short texts; benches compare with `usize::MAX`, no chunks).
    #[doc(hidden)]
    pub fn set_chunk_bytes(&mut self, bytes: usize) {
        self.chunk_bytes = bytes.max(1);
    }

    /// Whether segments are encoded by the fast BPE encoder.
    pub fn uses_fast_encoder(&self) -> bool {
        self.fast.is_some()
    }

    /// Encodes with the tokenizers library only (benches compare both).
    #[doc(hidden)]
    pub fn disable_fast_encoder(&mut self) {
        self.fast = None;
    }

    /// A segment's ids (no added token inside): the fast encoder's if on.
    fn encode_plain(&self, segment: &str, out: &mut Vec<u32>) -> Result<(), TokenizeError> {
        match &self.fast {
            Some(fast) => fast.encode(segment, &self.tokenizer, out),
            None => self.encode_whole(segment, false, out),
        }
    }

    fn encode_whole(
        &self,
        text: &str,
        add_special_tokens: bool,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizeError> {
        let enc = self
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(|e| TokenizeError::Encode(e.to_string()))?;
        out.extend_from_slice(enc.get_ids());
        Ok(())
    }

    fn encode_split(
        &self,
        split: &Splitter,
        text: &str,
        out: &mut Vec<u32>,
        use_cache: bool,
    ) -> Result<(), TokenizeError> {
        let mut last = 0;
        for m in split.matcher.find_iter(text) {
            self.encode_segment(&text[last..m.start()], out, use_cache)?;
            out.push(split.ids[m.pattern().as_usize()]);
            last = m.end();
        }
        self.encode_segment(&text[last..], out, use_cache)
    }

    /// Chunks of a long segment are cut only for the fast encoder, whose
    /// split patterns [`next_cut`] is written for.
    fn encode_segment(
        &self,
        segment: &str,
        out: &mut Vec<u32>,
        use_cache: bool,
    ) -> Result<(), TokenizeError> {
        if self.fast.is_none() || segment.len() / 2 < self.chunk_bytes {
            return self.encode_chunk(segment, out, use_cache);
        }
        let mut start = 0;
        while let Some(cut) = next_cut(segment.as_bytes(), start + self.chunk_bytes) {
            self.encode_chunk(&segment[start..cut], out, use_cache)?;
            start = cut;
        }
        self.encode_chunk(&segment[start..], out, use_cache)
    }

    fn encode_chunk(
        &self,
        segment: &str,
        out: &mut Vec<u32>,
        use_cache: bool,
    ) -> Result<(), TokenizeError> {
        if segment.is_empty() {
            return Ok(());
        }
        if !use_cache {
            return self.encode_plain(segment, out);
        }
        let key = cache::key(segment);
        if self.cache.get_into(key, out) {
            return Ok(());
        }
        let start = out.len();
        self.encode_plain(segment, out)?;
        self.cache.insert(key, &out[start..]);
        Ok(())
    }

    /// What the post-processor adds around a single sequence, if only that.
    fn probe_affixes(&self) -> Option<(Vec<u32>, Vec<u32>)> {
        let probe = "Hello world";
        let plain = self.tokenizer.encode_fast(probe, false).ok()?;
        let full = self.tokenizer.encode_fast(probe, true).ok()?;
        let (plain, full) = (plain.get_ids(), full.get_ids());
        let at = full.windows(plain.len()).position(|w| w == plain)?;
        Some((full[..at].to_vec(), full[at + plain.len()..].to_vec()))
    }

    /// Checks the split against whole-text encoding on probe texts; on a
    /// difference, stops splitting for this tokenizer.
    fn verify_split(&mut self) {
        let Some(split) = &self.splitter else {
            return;
        };
        let mut tokens: Vec<String> = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .map(|t| t.content)
            .filter(|c| !c.is_empty())
            .collect();
        tokens.sort_unstable();
        tokens.truncate(16);
        let failed = probe_texts(&tokens).into_iter().find(|text| {
            let (mut whole, mut parts) = (Vec::new(), Vec::new());
            let ok = self.encode_whole(text, false, &mut whole).is_ok()
                && self.encode_split(split, text, &mut parts, false).is_ok();
            !ok || whole != parts
        });
        if let Some(text) = failed {
            tracing::warn!(
                dir = %self.dir.display(),
                probe = %text.escape_debug(),
                "tokenizer: ids of a text differ from the ids of its segments between added tokens; segment caching is off for this tokenizer"
            );
            self.splitter = None;
        }
    }

    /// Checks the fast encoder against the library on the probe texts'
    /// segments; on a difference (or without the split, which the fast
    /// encoder needs), the library encodes.
    fn verify_fast(&mut self) {
        if self.splitter.is_none() && self.fast.take().is_some() {
            tracing::info!(
                dir = %self.dir.display(),
                "tokenizer: the fast BPE encoder needs the split at added tokens; the tokenizers library encodes"
            );
        }
        let (Some(fast), Some(split)) = (&self.fast, &self.splitter) else {
            return;
        };
        let mut texts = probe_texts(&[]);
        texts.extend(FAST_PROBES.iter().map(|s| (*s).to_owned()));
        let failed = texts.into_iter().find(|text| {
            let mut last = 0;
            let mut segments = Vec::new();
            for m in split.matcher.find_iter(text.as_str()) {
                segments.push(&text[last..m.start()]);
                last = m.end();
            }
            segments.push(&text[last..]);
            segments.into_iter().any(|s| {
                let (mut lib, mut ours) = (Vec::new(), Vec::new());
                let ok = self.encode_whole(s, false, &mut lib).is_ok()
                    && fast.encode(s, &self.tokenizer, &mut ours).is_ok();
                !ok || lib != ours
            })
        });
        if let Some(text) = failed {
            tracing::warn!(
                dir = %self.dir.display(),
                probe = %text.escape_debug(),
                "tokenizer: the fast BPE encoder differs from the tokenizers library on a probe text; the library encodes"
            );
            self.fast = None;
        }
    }
}

/// Texts for the fast encoder's load check: every alternative of the split
/// pattern, contractions, digit runs, newline and space runs, non-NFC and
/// non-Latin text.
const FAST_PROBES: &[&str] = &[
    "Hello, world! It's 12345 o'clock; we'LL see 'S 'Re  \n\n  x\r\n\t y  ",
    "fn main() {\n    println!(\"{}\", 3.14);\n}\n\n",
    "e\u{301}te\u{301} caf\u{e9} Stra\u{df}e \u{212b} \u{1e9b}\u{323}",
    "\u{4f60}\u{597d}\u{4e16}\u{754c} \u{1f30d}\u{1f600} \u{645}\u{631}\u{62d}\u{628}\u{627} \u{fb01}",
    "   leading and trailing   ",
    "!!!\n\n???  ...\t\t\n",
];

/// Texts around added tokens that exercise segment edges: whitespace runs,
/// combining marks, newlines, digits, and added tokens back to back.
fn probe_texts(tokens: &[String]) -> Vec<String> {
    let edges = [
        " ",
        "\n",
        "  \n\n ",
        "e\u{301}",
        "\u{301}x",
        "12 34",
        "Hello, world!",
        "'s ",
        "\t\u{a0}end",
    ];
    let mut out = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let a = edges[i % edges.len()];
        let b = edges[(i + 3) % edges.len()];
        let c = edges[(i + 5) % edges.len()];
        out.push(format!("{a}{t}{b}{t}{t}{c}"));
        out.push(format!("x{t}{a}y{b}{t}"));
    }
    out.push(edges.concat());
    out
}

/// The added tokens as a leftmost-longest matcher, if they are all matched
/// on raw text without stripping or word checks (else splitting is unsafe).
fn splitter(tokenizer: &Tokenizer, dir: &Path) -> Option<Splitter> {
    let added = tokenizer.get_added_tokens_decoder();
    let mut patterns = Vec::with_capacity(added.len());
    let mut ids = Vec::with_capacity(added.len());
    for (id, t) in &added {
        if t.single_word || t.lstrip || t.rstrip || t.normalized {
            tracing::info!(
                dir = %dir.display(),
                token = %t.content,
                "tokenizer: an added token strips, matches whole words or is normalized; segment caching is off for this tokenizer"
            );
            return None;
        }
        if t.content.is_empty() {
            continue;
        }
        patterns.push(t.content.clone());
        ids.push(*id);
    }
    let matcher = AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .build(&patterns)
        .ok()?;
    Some(Splitter { matcher, ids })
}

fn read(path: &Path) -> Result<Vec<u8>, TokenizeError> {
    std::fs::read(path).map_err(|error| TokenizeError::Read {
        path: path.to_owned(),
        error,
    })
}
