"""Tool calls in the model's output: DeepSeek-V3's tool-call markup, parsed incrementally.

DeepSeek-V3 (and V3-0324, R1) writes its calls after any plain content as one block:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

(the calls separated by a newline; "function" is the call's type). DeepSeek-V3.1 writes the
body of a call bare: `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>`,
the calls chained without a separator. The markers are single tokens of DeepSeek's
tokenizer; the text must be detokenized with them kept (`TOOL_MARKERS`, e.g.
`tokenizer.detokenizer(keep=TOOL_MARKERS)`), since the detokenizer drops special tokens.

`ToolCallParser.feed(text)` returns the content that is safe to emit now and the calls that
the text completed: content that could be the start of a block marker is held back until it
is decided, and each call comes out once its `<｜tool▁call▁end｜>` arrives (with arguments
that are a JSON object). A block that turns out malformed -- anything but calls and
whitespace between its markers, a call whose body does not parse, a marker inside a call --
is emitted as plain content from the first thing that does not parse on (calls before it
stay emitted), and the text after it is scanned for blocks again. At the end of the stream
`finish()` returns an unfinished block as plain content. Every decision depends only on the
text so far, never on how it was chunked: any split of a text gives the result of
`parse_tool_calls` on the whole (up to the random call ids).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from jaxmoe.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP

# the markers the parser reads: keep these when detokenizing the model's output
TOOL_MARKERS: tuple[str, ...] = (TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP)

# "deepseek_v3": the fenced V3 body, or else the bare V3.1 body; "deepseek_v31": the bare body only
STYLES = ("deepseek_v3", "deepseek_v31")

# V3 body after the type and the separator: NAME, newline, a ```json fence around the arguments
_V3_BODY = re.compile(r"\A[ \t]*([^\n]+?)[ \t]*\n```(?:json)?[ \t]*\n(.*?)\n?[ \t]*```\s*\Z", re.DOTALL)
# inside a call, any of these before its end marker makes the call malformed
_IN_CALL_MARKERS = (TOOL_CALL_END, TOOL_CALL_BEGIN, TOOL_CALLS_BEGIN, TOOL_CALLS_END)


@dataclass(frozen=True)
class ToolCall:
    id: str  # "call_" + 24 hex digits, unique
    name: str
    arguments: str  # the JSON text of the arguments as the model wrote it (stripped)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _valid_name(name: str) -> bool:
    return bool(name) and not any(c.isspace() for c in name) and "`" not in name


def parse_call_body(body: str, style: str = "deepseek_v3") -> tuple[str, str] | None:
    """(name, arguments) of the text between a call's begin and end markers; None if it does not parse."""
    head, sep, rest = body.partition(TOOL_SEP)
    if not sep or TOOL_SEP in rest:
        return None
    if style == "deepseek_v3" and head.strip() == "function" and (m := _V3_BODY.match(rest)):
        name, args = m.group(1).strip(), m.group(2).strip()
        if _valid_name(name) and _json_object(args):
            return name, args
    name, args = head.strip(), rest.strip()  # the bare V3.1 body
    if _valid_name(name) and _json_object(args):
        return name, args
    return None


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolCallParser:
    """Incremental parser of the model's tool-call markup in streamed text."""

    def __init__(self, style: str = "deepseek_v3"):
        if style not in STYLES:
            raise ValueError(f"unknown tool-call style {style!r}; one of {', '.join(STYLES)}")
        self.style = style
        self._reset()

    def _reset(self) -> None:
        self._buf = ""  # text received and not yet decided
        self._in_block = False  # after a block's begin marker
        self._opener = ""  # the block's begin marker while no call of the block was emitted

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """More generated text -> (plain content that is safe to emit now, tool calls completed by this text).
        Text that might be the start of a tool-call marker is held back until it is decided."""
        self._buf += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while self._step(content, calls):
            pass
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """End of generation -> (the rest of the content, tool calls completed at the end). An unfinished
        or malformed tool-call block is returned as plain content, never dropped."""
        rest = (self._opener if self._in_block else "") + self._buf
        self._reset()
        return rest, []

    # ---- one decision at a time ---------------------------------------------------------------
    def _step(self, content: list[str], calls: list[ToolCall]) -> bool:
        """Decide what the start of the buffer is; False when that needs more text."""
        buf = self._buf
        if not self._in_block:
            i = buf.find(TOOL_CALLS_BEGIN)
            if i < 0:
                keep = _held_prefix(buf, TOOL_CALLS_BEGIN)
                content.append(buf[: len(buf) - keep])
                self._buf = buf[len(buf) - keep :]
                return False
            content.append(buf[:i])
            self._buf = buf[i + len(TOOL_CALLS_BEGIN) :]
            self._in_block, self._opener = True, TOOL_CALLS_BEGIN
            return True
        rest = buf.lstrip()  # whitespace between the markers of a block
        if not rest:
            return False
        if rest.startswith(TOOL_CALLS_END):
            self._buf = rest[len(TOOL_CALLS_END) :]
            self._in_block, self._opener = False, ""
            return True
        if rest.startswith(TOOL_CALL_BEGIN):
            start = len(TOOL_CALL_BEGIN)
            found = [(j, m) for m in _IN_CALL_MARKERS if (j := rest.find(m, start)) >= 0]
            if not found:
                return False  # the call is still being written
            j, marker = min(found)
            parsed = parse_call_body(rest[start:j], self.style) if marker == TOOL_CALL_END else None
            if parsed is not None:
                calls.append(ToolCall(new_call_id(), *parsed))
                self._buf = rest[j + len(TOOL_CALL_END) :]
                self._opener = ""
                return True
        elif TOOL_CALL_BEGIN.startswith(rest) or TOOL_CALLS_END.startswith(rest):
            return False  # the start of a marker
        # malformed: the block's text from here on is plain content (scanned for blocks again)
        content.append(self._opener)
        self._in_block, self._opener = False, ""
        return True


def parse_tool_calls(text: str, style: str = "deepseek_v3") -> tuple[str, list[ToolCall]]:
    """The content and tool calls of a whole generated text (feed + finish)."""
    parser = ToolCallParser(style)
    content, calls = parser.feed(text)
    rest, more = parser.finish()
    return content + rest, calls + more
