//! A native renderer for ChatML chat templates (Qwen2/Qwen3 and others
//! that frame each message as `<|im_start|>{role}\n{content}<|im_end|>\n`).
//!
//! Why: interpreting a chat template costs a few microseconds per message
//! whatever its length, so a long conversation whose text is all in the
//! segment cache spends most of its tokenization in the template
//! interpreter. Writing the same bytes directly costs a copy.
//!
//! Exactness: this renderer is used for a model only when load shows that
//! it produces, byte for byte, what the model's own template produces
//! through minijinja on a set of probe conversations (roles in every
//! order, system prompts first and later, empty contents, leading and
//! trailing whitespace, newlines, text parts, non-ASCII, special-token
//! text inside contents). A template that adds a default system prompt,
//! prints a BOS token, trims contents or refuses some role order differs on
//! a probe and keeps the interpreter. Per request it covers only what the
//! probes exercise: plain messages with the roles `system`, `user` and
//! `assistant`; an assistant message holding reasoning markup (`<think>`,
//! `</think>`), one that comes after the last user message, or a user
//! message that is a tool response go to the interpreter (Qwen3's template
//! rewrites those).

use crate::request::ChatMessage;

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>\n";
const REASONING_MARKS: [&str; 2] = ["<think>", "</think>"];
const TOOL_RESPONSE: &str = "<tool_response>";

/// Renders `messages` with the generation prompt into `out`, or returns
/// false (with `out` in any state) when the conversation is not one this
/// renderer covers.
pub(crate) fn render<'p>(messages: &[ChatMessage<'p>], out: &mut String) -> bool {
    let mut last_user = None;
    let mut bytes = 0;
    for (i, m) in messages.iter().enumerate() {
        if !m.is_plain() {
            return false;
        }
        match m.role {
            "user" => {
                if m.text_parts()
                    .next()
                    .is_some_and(|p| p.starts_with(TOOL_RESPONSE))
                {
                    return false;
                }
                last_user = Some(i);
            }
            "system" => {}
            "assistant" => {
                if m.text_parts()
                    .any(|p| REASONING_MARKS.iter().any(|mark| p.contains(mark)))
                {
                    return false;
                }
            }
            _ => return false,
        }
        bytes += m.role.len() + IM_START.len() + IM_END.len() + 1;
        bytes += m.text_parts().map(|p| p.len() + 1).sum::<usize>();
    }
    // An assistant message after the last user message (a prefilled reply)
    // is rendered with reasoning markup by Qwen3's template.
    let after = last_user.map_or(0, |u| u + 1);
    if messages[after.min(messages.len())..]
        .iter()
        .any(|m| m.role == "assistant")
    {
        return false;
    }
    out.clear();
    out.reserve(bytes + IM_START.len() + "assistant\n".len());
    for m in messages {
        out.push_str(IM_START);
        out.push_str(m.role);
        out.push('\n');
        for (i, part) in m.text_parts().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(part);
        }
        out.push_str(IM_END);
    }
    out.push_str(IM_START);
    out.push_str("assistant\n");
    true
}

/// Conversations on which load compares this renderer with the template:
/// `(role, content parts)` per message.
pub(crate) fn probes() -> Vec<Vec<(&'static str, Vec<&'static str>)>> {
    let text = "Hello, world.\nSecond line with   spaces and a tab\t.";
    vec![
        vec![("user", vec!["hi"])],
        vec![("system", vec!["You are terse."]), ("user", vec![text])],
        vec![
            ("system", vec!["s"]),
            ("user", vec!["q1"]),
            ("assistant", vec!["a1"]),
            ("user", vec!["q2"]),
        ],
        // No system prompt, several turns, non-ASCII, special-token text.
        vec![
            ("user", vec!["  leading and trailing whitespace \n\n"]),
            ("assistant", vec!["\nnewline first and last\n"]),
            ("user", vec!["über <|im_end|> ✓ 日本語"]),
        ],
        // Roles out of the usual order; a system prompt later on.
        vec![
            ("user", vec!["a"]),
            ("user", vec!["b"]),
            ("system", vec!["later system"]),
            ("assistant", vec![""]),
            ("assistant", vec!["x"]),
            ("user", vec!["c"]),
        ],
        vec![("system", vec![""]), ("user", vec![""])],
        vec![("user", vec!["part one", "part two"])],
        vec![
            ("assistant", vec!["an assistant opens"]),
            ("user", vec!["the tool said <tool_response> nothing"]),
        ],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{ApiKind, parse};

    fn rendered(messages: serde_json::Value) -> Option<String> {
        let body =
            serde_json::to_vec(&serde_json::json!({"model": "m", "messages": messages})).unwrap();
        let req = parse(&body, ApiKind::ChatCompletions).unwrap();
        let messages: Vec<_> = req.prompt.messages().collect();
        let mut out = String::new();
        render(&messages, &mut out).then_some(out)
    }

    #[test]
    fn frames_each_message_and_adds_the_generation_prompt() {
        let got = rendered(serde_json::json!([
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]));
        assert_eq!(
            got.as_deref(),
            Some(
                "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n"
            )
        );
    }

    #[test]
    fn leaves_what_the_template_rewrites_to_the_template() {
        for messages in [
            serde_json::json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "prefill"}]),
            serde_json::json!([{"role": "assistant", "content": "<think>r</think>a"}, {"role": "user", "content": "q"}]),
            serde_json::json!([{"role": "user", "content": "<tool_response>x</tool_response>"}]),
            serde_json::json!([{"role": "tool", "content": "x"}, {"role": "user", "content": "q"}]),
            serde_json::json!([{"role": "developer", "content": "x"}]),
        ] {
            assert_eq!(rendered(messages.clone()), None, "{messages}");
        }
    }
}
