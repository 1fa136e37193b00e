"""The checkpoint's tokenizer: tokenizer.json (Hugging Face `tokenizers`) plus
tokenizer_config.json (BOS/EOS tokens, whether to add BOS, the jinja2 chat template).

`IncrementalDetokenizer` turns a growing list of token ids into text deltas for streaming,
emitting only complete UTF-8 text (a multi-byte character split over several byte-level
tokens comes out once its last byte arrives). Both skip special tokens unless told otherwise;
`keep` names special tokens to keep in the text while the others are skipped (the tool-call
markers, which a tool-call parser reads from the text).

Chat messages are OpenAI's: {"role": "system" | "user" | "assistant" | "tool", "content": ...},
an assistant message may carry `tool_calls` ([{"id", "type": "function", "function": {"name",
"arguments"}}], its content then optional), a tool message `tool_call_id`. `tools` (OpenAI's
[{"type": "function", "function": {"name", "description", "parameters"}}]) go to the chat
template as its `tools` variable when the template uses it. The official DeepSeek-V3, V3-0324
and R1 templates never do (they render tool calls and results, not tool descriptions): for
those the tools are described in the system prompt (`tools_system_prompt`, DeepSeek's "## Tools"
section with V3's call syntax), merged into the first system message, and the checkpoint's own
template renders that. A template that renders neither `tools` nor system messages cannot be
given tools.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import jinja2.sandbox
import tokenizers

Message = dict[str, Any]  # OpenAI's chat message: role, content, and tool_calls / tool_call_id
Tool = dict[str, Any]  # OpenAI's {"type": "function", "function": {"name", "description", "parameters"}}


class TokenizerError(ValueError):
    """A tokenizer that is missing or unusable, or a chat template that cannot be rendered."""


# ---- tools described in the system prompt ------------------------------------------------------
# For a chat template that never uses `tools` (DeepSeek-V3's, V3-0324's, R1's). The structure is
# DeepSeek's published tool-use system prompt (the DeepSeek-V3.1 model card's "## Tools" section:
# the tools by name, description and parameter schema, then the exact call format); the call
# format is V3's, the one `jaxmoe.server.tool_calls` parses (the markers are DeepSeek's special
# tokens, spelled as in its vocabulary).
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
TOOL_OUTPUTS_END = "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"
TOOLS_INTRO = "## Tools\nYou have access to the following tools:\n"
TOOLS_FORMAT = (
    "\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
    + TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP + "tool_call_name\n```json\ntool_call_arguments\n```"
    + TOOL_CALL_END + "{additional_tool_calls}" + TOOL_CALLS_END + "\n\nWhere:\n"
    "- `tool_call_name` must be an exact match to one of the available tools\n"
    "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
    "- For multiple tool calls, separate them with a newline"
)
_SYSTEM_PROBE = "jaxmoe-system-probe-5e1f"  # rendered in a system message: does the template show it?


def tools_system_prompt(tools: Sequence[Tool]) -> str:
    """The "## Tools" section of a system prompt describing `tools` (checked OpenAI tools):
    each tool's name, description and JSON parameter schema, then V3's tool-call format."""
    parts = [TOOLS_INTRO]
    for t in tools:
        f = t["function"]
        params = json.dumps(f.get("parameters") or {}, ensure_ascii=False)
        parts.append(f"\n### {f['name']}\nDescription: {f.get('description') or ''}\n\nParameters: {params}\n")
    parts.append(TOOLS_FORMAT)
    return "".join(parts)


def _with_tools_in_system(messages: list[Message], tools: Sequence[Tool]) -> list[Message]:
    """`messages` with the tools section appended to the first system message (after a blank
    line), or in a system message of its own first when there is none."""
    section = tools_system_prompt(tools)
    for i, m in enumerate(messages):
        if m["role"] == "system":
            content = m.get("content")
            if content is not None and not isinstance(content, str):
                raise ValueError(f"messages[{i}]: the tools are added to the system message, whose content must be a "
                                 f"string, got {type(content).__name__}")
            merged = f"{content}\n\n{section}" if content else section
            return [*messages[:i], {**m, "content": merged}, *messages[i + 1 :]]
    return [{"role": "system", "content": section}, *messages]


def _token_content(tok: Any) -> str | None:
    """tokenizer_config.json writes special tokens as plain strings or AddedToken dicts."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template error: {message}")


def _chat_template(config: dict[str, Any]) -> str | None:
    t = config.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict[str, Any] | None = None):
        self._tok = tokenizer
        self.config = dict(config or {})
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.bos_token_id = self._id_of(self.bos_token)
        self.eos_token_id = self._id_of(self.eos_token)
        self.add_bos_token = bool(self.config.get("add_bos_token", self.bos_token_id is not None))
        self.chat_template = _chat_template(self.config)
        self._template: jinja2.Template | None = None
        self._template_uses_tools = False
        self._renders_system: bool | None = None  # does the template show a system message (probed once)
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"no tokenizer: {tj} does not exist (pass token ids instead of text)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise TokenizerError(f"cannot read {tj}: {e}") from e
        config: dict[str, Any] = {}
        tc = path / "tokenizer_config.json"
        if tc.is_file():
            try:
                config = json.loads(tc.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise TokenizerError(f"cannot read {tc}: {e}") from e
        return cls(tok, config)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, BOS first when the config asks for it."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True, keep: Iterable[str] = frozenset()) -> str:
        """Text of `ids`; with skip_special_tokens, special tokens are left out except those in `keep`."""
        if skip_special_tokens and keep:
            drop = self._special_ids - self.token_ids(keep)
            return self._tok.decode([i for i in ids if i not in drop], skip_special_tokens=False)
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_ids(self, tokens: Iterable[str]) -> frozenset[int]:
        """The ids of those of `tokens` that are single tokens of the vocabulary."""
        return frozenset(i for t in tokens if (i := self._tok.token_to_id(t)) is not None)

    # ---- chat template ----------------------------------------------------------------
    def apply_chat_template(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True, tools: Sequence[Tool] | None = None
    ) -> str:
        """Render `messages` (and `tools`, if any) with the checkpoint's template.

        A template that uses the `tools` variable renders the tools itself; for one that does
        not (DeepSeek-V3's, R1's) they are described in the first system message
        (`tools_system_prompt`). Raises ValueError on malformed messages or tools, and when
        `tools` are given to a template that renders neither them nor system messages (they
        would silently be left out of the prompt)."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat_template in tokenizer_config.json; pass a prompt")
        messages = _checked_messages(messages)
        tools = _checked_tools(tools)
        self._compiled_template()
        if tools and not self._template_uses_tools:
            if not self._template_renders_system():
                raise TokenizerError(
                    "this checkpoint's chat template does not render tools (it never uses the `tools` variable) "
                    "nor system messages (where they would be described); it cannot be given tools"
                )
            messages, tools = _with_tools_in_system(messages, tools), None
        return self._render(messages, tools, add_generation_prompt)

    def _render(self, messages: list[Message], tools: list[Tool] | None, add_generation_prompt: bool) -> str:
        try:
            return self._compiled_template().render(
                messages=messages,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except (jinja2.TemplateError, TypeError) as e:  # TypeError: e.g. a template adding None to a string
            raise TokenizerError(f"cannot render chat template: {e}") from e

    def _template_renders_system(self) -> bool:
        """Whether a system message's content shows in the rendered prompt (a template that
        refuses system messages, raising, does not render them)."""
        if self._renders_system is None:
            probe = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hi"}]
            try:
                self._renders_system = _SYSTEM_PROBE in self._render(probe, None, True)
            except (TokenizerError, KeyError):
                self._renders_system = False
        return self._renders_system

    def _compiled_template(self) -> jinja2.Template:
        if self._template is None:
            assert self.chat_template is not None
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._template = env.from_string(self.chat_template)
                self._template_uses_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(self.chat_template))
            except jinja2.TemplateError as e:
                raise TokenizerError(f"invalid chat template: {e}") from e
        return self._template

    def encode_chat(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True, tools: Sequence[Tool] | None = None
    ) -> list[int]:
        """Token ids of the rendered chat (the template writes BOS itself if it wants one)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        return self.encode(text, add_special_tokens=False)

    def detokenizer(self, *, skip_special_tokens: bool = True, keep: Iterable[str] = frozenset()) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens, keep=keep)


def _checked_messages(messages: Sequence[Message]) -> list[Message]:
    """`messages` checked; an assistant message with tool calls and no content (missing or empty,
    as OpenAI clients send it) gets content None: DeepSeek-V3's template renders the calls only then."""
    if isinstance(messages, (str, bytes)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant":
                raise ValueError(f"messages[{i}]: only assistant messages have tool_calls, not {m['role']!r} ones")
            if isinstance(calls, (str, bytes, dict)) or not isinstance(calls, Sequence):
                raise ValueError(f"messages[{i}].tool_calls must be a list, got {calls!r}")
            for j, c in enumerate(calls):
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
                    raise ValueError(f"messages[{i}].tool_calls[{j}] must be {{'function': {{'name': ..., 'arguments': ...}}}}")
                if not isinstance(f.get("arguments", ""), (str, dict)):
                    raise ValueError(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON string")
            if m.get("content") in (None, ""):
                m = {**m, "content": None}
        elif "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        out.append(m)
    return out


def _checked_tools(tools: Sequence[Tool] | None) -> list[Tool] | None:
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, dict)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}} dicts, got {tools!r}")
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}, got {t!r}")
    return list(tools)


class IncrementalDetokenizer:
    """Text deltas for a stream of token ids.

    Decodes a short window of the recent tokens twice -- with and without the new ones --
    and emits the difference once it no longer ends in an incomplete character (U+FFFD).
    Decoding a window rather than everything keeps each step O(1) in the sequence length;
    both decodes start at the same token, so context-dependent decoders (a leading space
    dropped at the start of a text) agree on the shared prefix.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True, keep: Iterable[str] = frozenset()):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._keep = frozenset(keep)  # special tokens kept in the text while the others are skipped
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens before this one have been emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip, keep=self._keep)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""  # an incomplete character (or nothing visible yet): wait for more
        delta = full_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        return delta

    def flush(self) -> str:
        """The text still held back at the end of the stream (an incomplete character)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :]
