//! The model's chat template (Jinja2 source from `tokenizer_config.json`),
//! compiled once with minijinja and rendered per chat request.
//!
//! Rendering follows what vLLM's chat endpoint does through transformers'
//! `apply_chat_template`: Jinja with `trim_blocks` and `lstrip_blocks`, the
//! messages as `{role, content}` maps (text parts joined by newlines),
//! `add_generation_prompt=true`, the tokenizer's special tokens as
//! `bos_token`, `eos_token`, `pad_token`, `unk_token`, and
//! `raise_exception(msg)` failing the render. Python string methods
//! (`startswith`, `split`, `strip`...) come from minijinja-contrib's
//! pycompat. No tools are passed (tool-using requests are not plain and are
//! refused before rendering).
//!
//! A ChatML template that load shows the native renderer (`chatml`)
//! reproduces is rendered natively instead, for the conversations that
//! renderer covers; everything else goes through minijinja.

use std::collections::BTreeMap;

use minijinja::{Environment, Error, ErrorKind, Value, syntax::SyntaxConfig};

use super::{TokenizeError, chatml};
use crate::request::{ApiKind, ChatMessage};

const NAME: &str = "chat_template";

/// The special-token strings a template may print.
#[derive(Debug, Default, Clone)]
pub(crate) struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
}

#[derive(Debug)]
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    /// Context values every render shares, built once.
    base: BTreeMap<Value, Value>,
    /// The native ChatML renderer matched this template on every probe.
    native: bool,
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names the file in errors.
    pub(crate) fn new(
        source: String,
        tokens: &SpecialTokens,
        origin: &str,
    ) -> Result<Self, TokenizeError> {
        let compile_error = |e: Error| TokenizeError::Template {
            origin: origin.to_owned(),
            reason: describe(&e),
        };
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(compile_error)?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(NAME, source)
            .map_err(compile_error)?;
        let mut base = BTreeMap::new();
        for (name, value) in [
            ("bos_token", &tokens.bos),
            ("eos_token", &tokens.eos),
            ("pad_token", &tokens.pad),
            ("unk_token", &tokens.unk),
        ] {
            if let Some(v) = value {
                base.insert(Value::from(name), Value::from(v.as_str()));
            }
        }
        base.insert(Value::from("add_generation_prompt"), Value::from(true));
        let mut t = Self {
            env,
            base,
            native: false,
        };
        t.native = t.native_matches_on_probes();
        Ok(t)
    }

    /// Whether chats are rendered natively where the renderer covers them.
    pub(crate) fn renders_natively(&self) -> bool {
        self.native
    }

    /// Renders every chat through minijinja (for comparisons).
    pub(crate) fn disable_native(&mut self) {
        self.native = false;
    }

    /// Renders `messages` as the model server would before tokenizing.
    pub(crate) fn render<'p>(
        &self,
        messages: impl Iterator<Item = ChatMessage<'p>>,
    ) -> Result<String, TokenizeError> {
        let messages: Vec<ChatMessage<'p>> = messages.collect();
        if self.native {
            let mut out = String::new();
            if chatml::render(&messages, &mut out) {
                return Ok(out);
            }
        }
        self.interpret(&messages)
    }

    /// True when the native renderer covers at least one probe and, on every
    /// probe it covers, writes what the template writes.
    fn native_matches_on_probes(&self) -> bool {
        let mut covered = 0;
        for probe in chatml::probes() {
            let messages: Vec<serde_json::Value> = probe
                .iter()
                .map(|(role, parts)| {
                    let content = match parts.as_slice() {
                        [one] => serde_json::Value::from(*one),
                        many => many
                            .iter()
                            .map(|t| serde_json::json!({"type": "text", "text": t}))
                            .collect(),
                    };
                    serde_json::json!({"role": role, "content": content})
                })
                .collect();
            let body = serde_json::json!({"model": "probe", "messages": messages}).to_string();
            let Ok(req) = crate::request::parse(body.as_bytes(), ApiKind::ChatCompletions) else {
                return false;
            };
            let messages: Vec<ChatMessage<'_>> = req.prompt.messages().collect();
            let mut native = String::new();
            if !chatml::render(&messages, &mut native) {
                continue;
            }
            match self.interpret(&messages) {
                Ok(text) if text == native => covered += 1,
                _ => return false,
            }
        }
        covered > 0
    }

    pub(crate) fn interpret(&self, messages: &[ChatMessage<'_>]) -> Result<String, TokenizeError> {
        let mut list = Vec::with_capacity(messages.len());
        let mut content = String::new();
        for m in messages {
            if !m.is_plain() {
                return Err(TokenizeError::Unsupported(
                    "a chat message holds more than a role and text",
                ));
            }
            content.clear();
            for (i, part) in m.text_parts().enumerate() {
                if i > 0 {
                    content.push('\n');
                }
                content.push_str(part);
            }
            let mut map = BTreeMap::new();
            map.insert(Value::from("role"), Value::from(m.role));
            map.insert(Value::from("content"), Value::from(content.as_str()));
            list.push(Value::from(map));
        }
        let mut ctx = self.base.clone();
        ctx.insert(Value::from("messages"), Value::from(list));
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| TokenizeError::Render(describe(&e)))?;
        template
            .render(Value::from(ctx))
            .map_err(|e| TokenizeError::Render(describe(&e)))
    }
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// minijinja's error with its causes and the template line, on one line.
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
