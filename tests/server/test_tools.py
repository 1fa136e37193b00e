"""Tools: rendered into the prompt by the chat template (not with tool_choice "none"), or, for
a template that never uses `tools` (DeepSeek-V3's), described in its system prompt; and the
model's tool-call markup answered as `tool_calls`, plain and streamed, finish_reason
"tool_calls". The random tiny model never writes the markup, so those answers come from a
scripted generation in place of stream_generate; the real model checks the prompts."""

from __future__ import annotations

import json
import shutil

import openai
import pytest

import jaxmoe
from jaxmoe.generate import StreamResponse, Timings
from jaxmoe.loading import tokenizer_data
from jaxmoe.server import state as state_module
from jaxmoe.server.tool_calls import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_MARKERS,
    TOOL_SEP,
    parse_tool_calls,
)
from jaxmoe.tokenizer import Tokenizer, tools_system_prompt

from .conftest import NAME

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
MSGS = [{"role": "user", "content": "Weather in Paris?"}]
ARGS = '{"city": "Paris"}'


def call(name, args):
    return f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n{args}\n```{TOOL_CALL_END}"


SCRIPT = "Let me check." + TOOL_CALLS_BEGIN + call("get_weather", ARGS) + "\n" + call("now", "{}") + TOOL_CALLS_END


def test_tools_are_rendered_and_the_output_parsed(server, model):
    ids = model.encode_prompt(messages=MSGS, tools=TOOLS)
    assert len(ids) > len(model.encode_prompt(messages=MSGS))
    r = jaxmoe.generate(model, ids, max_new_tokens=6)
    text = "".join(p.text for p in jaxmoe.stream_generate(model, ids, max_new_tokens=6, keep_special_tokens=TOOL_MARKERS))
    content, calls = parse_tool_calls(text)
    out = server.client().chat.completions.create(model=NAME, messages=MSGS, tools=TOOLS, max_tokens=6, temperature=0)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(r.token_ids)
    assert (out.choices[0].message.content or "") == content and not calls
    none = server.client().chat.completions.create(model=NAME, messages=MSGS, tools=TOOLS, tool_choice="none",
                                                   max_tokens=2, temperature=0)
    assert none.usage.prompt_tokens == len(model.encode_prompt(messages=MSGS))  # no tools in the prompt


def test_a_tool_round_trip_is_rendered(server, model):
    """An assistant turn with tool calls (content null) and the tool's result, as clients send them."""
    msgs = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    out = server.client().chat.completions.create(model=NAME, messages=msgs, tools=TOOLS, max_tokens=2, temperature=0)
    as_template_reads_them = [msgs[0], {**msgs[1], "content": ""}, msgs[2]]
    assert out.usage.prompt_tokens == len(model.encode_prompt(messages=as_template_reads_them, tools=TOOLS))


@pytest.fixture
def scripted(monkeypatch):
    """stream_generate replaced by one that 'generates' SCRIPT in small pieces (markers split)."""
    seen = []

    def fake(model, prompt, *, max_new_tokens, keep_special_tokens=(), on_submit=None, **kw):
        seen.append(tuple(keep_special_tokens))
        pieces = [SCRIPT[i : i + 7] for i in range(0, len(SCRIPT), 7)]

        def gen():
            for i, p in enumerate(pieces):
                t = Timings(prompt_tokens=len(prompt), generated_tokens=i + 1)
                yield StreamResponse(100 + i, p, "eos" if i == len(pieces) - 1 else None, t)

        return gen()

    monkeypatch.setattr(state_module, "stream_generate", fake)
    return seen


def test_tool_calls_plain(server, scripted):
    out = server.client().chat.completions.create(model=NAME, messages=MSGS, tools=TOOLS, max_tokens=50)
    (choice,) = out.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"}), ("function", "now", {})]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    assert scripted == [TOOL_MARKERS]  # the markers were kept for the parser


def test_tool_calls_streamed(server, scripted):
    chunks = list(server.client().chat.completions.create(model=NAME, messages=MSGS, tools=TOOLS, max_tokens=50,
                                                          stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == "Let me check." and TOOL_SEP not in content
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [(0, "get_weather", ARGS), (1, "now", "{}")]
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


def test_without_tools_nothing_is_parsed(server, scripted):
    """No tools in the request: no parser runs and no markers are kept (the detokenizer drops them)."""
    out = server.client().chat.completions.create(model=NAME, messages=MSGS, max_tokens=50)
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == SCRIPT and scripted == [()]


def swap_template(model, monkeypatch, tmp_path, tiny_ckpt, template: str) -> Tokenizer:
    """The served model's tokenizer swapped (for this test) for the same one with `template`."""
    shutil.copy(tiny_ckpt / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((tiny_ckpt / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    tok = Tokenizer.from_dir(tmp_path)
    monkeypatch.setattr(model, "tokenizer", tok)
    return tok


@pytest.fixture
def v3_template(model, monkeypatch, tmp_path, tiny_ckpt) -> Tokenizer:
    """A template like DeepSeek-V3's own: tool calls and results but no `tools` (the synthetic
    template without its tools block)."""
    t = tokenizer_data.CHAT_TEMPLATE
    without = t[: t.index("{% if tools %}")] + t[t.index("{{ bos_token }}"):]
    assert "tools" not in without
    return swap_template(model, monkeypatch, tmp_path, tiny_ckpt, without)


def test_a_v3_template_gets_the_tools_in_the_system_prompt(server, model, v3_template):
    ids = model.encode_prompt(messages=MSGS, tools=TOOLS)
    assert tools_system_prompt(TOOLS) in v3_template.apply_chat_template(MSGS, tools=TOOLS)
    out = server.client().chat.completions.create(model=NAME, messages=MSGS, tools=TOOLS, max_tokens=2, temperature=0)
    assert out.usage.prompt_tokens == len(ids) > len(model.encode_prompt(messages=MSGS))
    none = server.client().chat.completions.create(model=NAME, messages=MSGS, tools=TOOLS, tool_choice="none",
                                                   max_tokens=2, temperature=0)
    assert none.usage.prompt_tokens == len(model.encode_prompt(messages=MSGS))


def test_a_v3_template_answers_tool_calls(server, v3_template, scripted):
    out = server.client().chat.completions.create(model=NAME, messages=MSGS, tools=TOOLS, max_tokens=50)
    assert out.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in out.choices[0].message.tool_calls] == ["get_weather", "now"]


def test_a_template_ignoring_system_messages_refuses_tools(server, model, monkeypatch, tmp_path, tiny_ckpt):
    template = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}{% endif %}" \
               "{% endfor %}<|Assistant|>"
    swap_template(model, monkeypatch, tmp_path, tiny_ckpt, template)
    with pytest.raises(openai.BadRequestError, match="does not render tools") as e:
        server.client().chat.completions.create(model=NAME, messages=MSGS, tools=TOOLS, max_tokens=2)
    assert e.value.body["param"] == "tools"
    ok = server.client().chat.completions.create(model=NAME, messages=MSGS, max_tokens=2)
    assert ok.usage.prompt_tokens == len(model.encode_prompt(messages=MSGS))
