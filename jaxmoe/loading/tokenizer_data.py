"""A small, real tokenizer for synthetic checkpoints: byte-level BPE trained on Python's stdlib.

Deterministic (same Python install -> same tokenizer) and fast enough to train whenever a
synthetic checkpoint is written (docs/PERFORMANCE_MODEL.md, "Measurements behind design
choices"). DeepSeek's special tokens sit at ids 0-3 (bos = 0, eos = 1, as in the real
config, spelled with ASCII bars), DeepSeek-V3's tool-call and tool-output markers (spelled
exactly as the real ones, full-width bars: `jaxmoe.server.tool_calls` parses them) are the
last ids of the vocabulary, and `tokenizer_config.json` carries a DeepSeek-style jinja2
chat template that renders tools, assistant tool calls and tool results.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jaxmoe.tokenizer import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_OUTPUT_BEGIN,
    TOOL_OUTPUT_END,
    TOOL_OUTPUTS_BEGIN,
    TOOL_OUTPUTS_END,
    TOOL_SEP,
    TOOLS_FORMAT,
    TOOLS_INTRO,
)

BOS = "<|begin▁of▁sentence|>"
EOS = "<|end▁of▁sentence|>"
USER = "<|User|>"
ASSISTANT = "<|Assistant|>"
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT)

# DeepSeek-V3's tool markers, in the real vocabulary's order (ids 128806-128814 there)
TOOL_TOKENS = (
    TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END,
    TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, TOOL_SEP,
)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + len(TOOL_TOKENS)  # the byte alphabet plus the special tokens


def _q(s: str) -> str:
    """`s` as a single-quoted jinja string literal."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# The tools section of the system prompt (DeepSeek's published tool prompt, with V3's call syntax)

# DeepSeek-V3's template: bos, the system prompt(s) (and the tools), then the turns; an
# assistant turn's tool calls in the call markup, tool results in the output markup (an
# assistant turn after tool results continues after the outputs' end marker, no tag).
CHAT_TEMPLATE = (
    "{% if add_generation_prompt is not defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='', first_sp=true, is_tool=false) %}"
    "{%- for message in messages %}{% if message['role'] == 'system' %}"
    "{% if ns.first_sp %}{% set ns.system_prompt = message['content'] %}{% set ns.first_sp = false %}"
    "{% else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{% endif %}"
    "{% endif %}{% endfor -%}"
    "{% if tools %}"
    "{% set ns.system_prompt = (ns.system_prompt + '\\n\\n' if ns.system_prompt else '') + " + _q(TOOLS_INTRO) + " %}"
    "{% for tool in tools %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\n### ' + tool['function']['name']"
    " + '\\nDescription: ' + (tool['function']['description'] or '')"
    " + '\\n\\nParameters: ' + ((tool['function']['parameters'] or {}) | tojson) + '\\n' %}"
    "{% endfor %}"
    "{% set ns.system_prompt = ns.system_prompt + " + _q(TOOLS_FORMAT) + " %}"
    "{% endif %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if ns.is_tool %}{{ '" + TOOL_OUTPUTS_END + "' }}{% set ns.is_tool = false %}{% endif %}"
    "{{ '" + USER + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if ns.is_tool %}{{ '" + TOOL_OUTPUTS_END + "' }}{% set ns.is_tool = false %}"
    "{% else %}{{ '" + ASSISTANT + "' }}{% endif %}"
    "{{ message['content'] or '' }}"
    "{% if message['tool_calls'] %}{{ '" + TOOL_CALLS_BEGIN + "' }}"
    "{% for call in message['tool_calls'] %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{% set args = call['function']['arguments'] %}"
    "{{ '" + TOOL_CALL_BEGIN + "' + (call['type'] or 'function') + '" + TOOL_SEP + "' + call['function']['name']"
    " + '\\n```json\\n' + (args if args is string else args | tojson) + '\\n```" + TOOL_CALL_END + "' }}"
    "{% endfor %}{{ '" + TOOL_CALLS_END + "' }}{% endif %}"
    "{{ '" + EOS + "' }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if ns.is_tool %}{{ '\\n" + TOOL_OUTPUT_BEGIN + "' }}"
    "{% else %}{{ '" + TOOL_OUTPUTS_BEGIN + TOOL_OUTPUT_BEGIN + "' }}{% set ns.is_tool = true %}{% endif %}"
    "{{ message['content'] + '" + TOOL_OUTPUT_END + "' }}"
    "{% endif %}{% endfor -%}"
    "{% if ns.is_tool %}{{ '" + TOOL_OUTPUTS_END + "' }}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{ '" + ASSISTANT + "' }}{% endif %}"
)


def corpus(n_chars: int) -> list[str]:
    """Text that ships with Python: the stdlib's own top-level sources, in sorted order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for p in sorted(stdlib.glob("*.py")):
        if total >= n_chars:
            break
        try:
            t = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(t)
        total += len(t)
    if total < 100_000:  # a stripped install without sources: fall back to docstrings
        import builtins  # noqa: PLC0415

        texts += sorted({str(getattr(o, "__doc__", "") or "") for o in vars(builtins).values()})
    return texts


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens: ids 0-3 are the special tokens, the
    tool markers come last (the merges before them are those of a BPE trained without them)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} too small for a byte-level tokenizer (>= {MIN_VOCAB})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TOOL_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(400_000 + 150 * vocab_size), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TOOL_TOKENS])
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]),
    ])
    return tok


def write_tokenizer(path: str | Path, vocab_size: int, *, model_max_length: int = 4096) -> dict[str, int]:
    """Write tokenizer.json and tokenizer_config.json into `path`; returns {"bos_token_id", "eos_token_id"}."""
    path = Path(path)
    tok = train_tokenizer(vocab_size)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS)}
