//! Reading `tokenizer_config.json` and finding model directories.
//!
//! The config's `chat_template` is a string, or a list of named templates of
//! which `default` is the chat one (transformers' convention); special
//! tokens are strings or `{"content": ...}` objects. A `--tokenizers-dir`
//! holds one directory per model named by the model's path, so
//! `Qwen/Qwen3-0.6B` is `DIR/Qwen/Qwen3-0.6B/tokenizer.json` (the layout the
//! manifests' picker-tokenizer component writes).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{TokenizeError, template::SpecialTokens};

/// How deep model names nest (`org/name` is 2; one more for safety).
const MAX_DEPTH: usize = 3;

#[derive(Debug, Default)]
pub(crate) struct TokenizerConfig {
    pub chat_template: Option<String>,
    pub special: SpecialTokens,
}

impl TokenizerConfig {
    /// Reads the file; a missing file is an empty config (tokenizers
    /// without chat templates exist), a malformed one an error.
    pub(crate) fn read(path: &Path) -> Result<Self, TokenizeError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(error) => {
                return Err(TokenizeError::Read {
                    path: path.to_owned(),
                    error,
                });
            }
        };
        let bad = |reason: String| TokenizeError::ConfigJson {
            path: path.to_owned(),
            reason,
        };
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        let Value::Object(map) = v else {
            return Err(bad("not a JSON object".to_owned()));
        };
        let chat_template = match map.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            Some(_) => return Err(bad("`chat_template` must be a string or a list".into())),
        };
        let token = |name: &str| match map.get(name) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_owned),
            _ => None,
        };
        Ok(Self {
            chat_template,
            special: SpecialTokens {
                bos: token("bos_token"),
                eos: token("eos_token"),
                pad: token("pad_token"),
                unk: token("unk_token"),
            },
        })
    }
}

/// The model directories under `root`: (model name, directory), sorted by
/// name. A directory holding `tokenizer.json` is a model; one holding a
/// `FETCH_FAILED` marker (the manifests' init container could not download)
/// is reported with a warning and skipped.
pub(crate) fn model_dirs(root: &Path) -> Result<Vec<(String, PathBuf)>, TokenizeError> {
    let mut found = Vec::new();
    walk(root, root, 0, &mut found)?;
    found.sort();
    Ok(found)
}

fn walk(
    root: &Path,
    dir: &Path,
    depth: usize,
    found: &mut Vec<(String, PathBuf)>,
) -> Result<(), TokenizeError> {
    let name = || {
        dir.strip_prefix(root)
            .unwrap_or(dir)
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/")
    };
    if depth > 0 && dir.join("tokenizer.json").is_file() {
        found.push((name(), dir.to_owned()));
        return Ok(());
    }
    if depth > 0 && dir.join("FETCH_FAILED").exists() {
        tracing::warn!(dir = %dir.display(), "tokenizer files were not fetched (FETCH_FAILED); model {} has no tokenizer", name());
        return Ok(());
    }
    if depth == MAX_DEPTH {
        return Ok(());
    }
    let io = |error| TokenizeError::Read {
        path: dir.to_owned(),
        error,
    };
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        // Kubernetes volumes link files through `..data`: follow links,
        // skip hidden entries.
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if entry.path().is_dir() {
            entries.push(entry.path());
        }
    }
    for sub in entries {
        walk(root, &sub, depth + 1, found)?;
    }
    Ok(())
}
