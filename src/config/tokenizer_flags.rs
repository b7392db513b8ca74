//! Flags naming the models' tokenizers (see `crate::tokenize`).

use std::path::PathBuf;

use clap::Args;

use super::parse_bytes;

#[derive(Debug, Clone, Args)]
pub struct TokenizerFlags {
    /// A served model's tokenizer: MODEL=DIR, DIR holding tokenizer.json and tokenizer_config.json
    /// (repeatable). Requests for the model are tokenized as the model server does, for
    /// token-exact prefix keys; models without a tokenizer use the approximate index.
    #[arg(long = "tokenizer", value_name = "MODEL=DIR", value_parser = parse_tokenizer_spec,
          help_heading = "Tokenizers")]
    pub tokenizers: Vec<TokenizerSpec>,

    /// A directory with one tokenizer directory per model, named by the model's path
    /// (DIR/Qwen/Qwen3-0.6B/tokenizer.json serves model Qwen/Qwen3-0.6B). --tokenizer wins
    /// for a model named in both.
    #[arg(long, value_name = "DIR", help_heading = "Tokenizers")]
    pub tokenizers_dir: Option<PathBuf>,

    /// Memory for each model's cache of tokenized prompt segments (text between special
    /// tokens, such as one chat message). 0 disables it.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes, help_heading = "Tokenizers")]
    pub tokenizer_cache_bytes: u64,
}

/// One `--tokenizer MODEL=DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerSpec {
    pub model: String,
    pub dir: PathBuf,
}

fn parse_tokenizer_spec(text: &str) -> Result<TokenizerSpec, String> {
    // Model names may hold `/` and `:` but not `=`; split at the first.
    match text.split_once('=') {
        Some((model, dir)) if !model.is_empty() && !dir.is_empty() => Ok(TokenizerSpec {
            model: model.to_owned(),
            dir: PathBuf::from(dir),
        }),
        _ => Err(format!("expected MODEL=DIR, got {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        t: TokenizerFlags,
    }

    #[test]
    fn specs_repeat_and_defaults_hold() {
        let c = Cli::parse_from([
            "x",
            "--tokenizer",
            "Qwen/Qwen3-0.6B=/t/qwen",
            "--tokenizer=m=a=b",
            "--tokenizer-cache-bytes",
            "1MiB",
        ]);
        assert_eq!(c.t.tokenizers.len(), 2);
        assert_eq!(c.t.tokenizers[0].model, "Qwen/Qwen3-0.6B");
        assert_eq!(c.t.tokenizers[1].dir, PathBuf::from("a=b"));
        assert_eq!(c.t.tokenizer_cache_bytes, 1 << 20);
        let c = Cli::parse_from(["x"]);
        assert!(c.t.tokenizers.is_empty() && c.t.tokenizers_dir.is_none());
        assert_eq!(c.t.tokenizer_cache_bytes, 64 << 20);
        assert!(Cli::try_parse_from(["x", "--tokenizer", "nodir"]).is_err());
        assert!(Cli::try_parse_from(["x", "--tokenizer", "=d"]).is_err());
    }
}
