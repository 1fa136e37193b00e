"""Tool calls: DeepSeek-V3's call markup parsed from streamed text (any split of a text gives the
one-shot result), tools / tool calls / tool results rendered by the chat template (checked
against transformers), tools described in the system prompt for a template that never uses
`tools` (DeepSeek-V3's own), and the detokenizer keeping only the tool markers among the
special tokens."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmoe.loading import tokenizer_data
from jaxmoe.server.tool_calls import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_MARKERS,
    TOOL_SEP,
    ToolCallParser,
    parse_tool_calls,
)
from jaxmoe.tokenizer import TOOLS_FORMAT, Tokenizer, TokenizerError, tools_system_prompt


def v3_call(name: str, args: str, kind: str = "function") -> str:
    return f"{TOOL_CALL_BEGIN}{kind}{TOOL_SEP}{name}\n```json\n{args}\n```{TOOL_CALL_END}"


def v31_call(name: str, args: str) -> str:
    return f"{TOOL_CALL_BEGIN}{name}{TOOL_SEP}{args}{TOOL_CALL_END}"


def block(*calls: str, sep: str = "\n") -> str:
    return TOOL_CALLS_BEGIN + sep.join(calls) + TOOL_CALLS_END


WEATHER = '{"city": "Paris", "unit": "C"}'
ONE = "Let me check." + block(v3_call("get_weather", WEATHER))
SEVERAL = block(v3_call("get_weather", WEATHER), v3_call("now", "{}"), v3_call("search", '{\n  "q": "日本 ```x```"\n}'))
V31 = "ok" + block(v31_call("get_weather", WEATHER), v31_call("now", "{}"), sep="")

MALFORMED = [
    TOOL_CALLS_BEGIN,  # unfinished: only the opening marker
    "x" + TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP + "f\n```json\n{",  # unfinished call
    "x" + TOOL_CALLS_BEGIN + v3_call("f", "{}"),  # calls never closed... but the call is complete (see below)
    "x" + TOOL_CALLS_BEGIN + "garbage" + v3_call("f", "{}") + TOOL_CALLS_END,  # text inside the block
    block(v3_call("f", "{not json}")),  # arguments that are not JSON
    block(v3_call("f", "[1, 2]")),  # arguments that are not an object
    block(v3_call("two words", "{}")),  # not a name
    block(TOOL_CALL_BEGIN + "f" + "{}" + TOOL_CALL_END),  # no separator
    block(TOOL_CALL_BEGIN + "function" + TOOL_SEP + "f" + TOOL_CALLS_END),  # the block ends inside a call
    block(TOOL_CALL_BEGIN + "f" + TOOL_SEP + "{}" + TOOL_CALL_BEGIN + "g" + TOOL_SEP + "{}" + TOOL_CALL_END),  # nested
    "a " + TOOL_CALLS_BEGIN[:-1] + " b",  # almost a marker
    TOOL_CALLS_END + TOOL_CALL_END + TOOL_SEP + "stray markers outside a block",
]


def calls_of(result):
    content, calls = result
    return content, [(c.name, c.arguments) for c in calls]


def fed(text: str, cuts, parser=None):
    """Feed `text` cut at `cuts`; (content, [(name, arguments)]) with the content joined."""
    parser = parser or ToolCallParser()
    content, calls, bounds = [], [], [0, *sorted(cuts), len(text)]
    for a, b in zip(bounds, bounds[1:]):
        c, k = parser.feed(text[a:b])
        content.append(c)
        calls += k
    c, k = parser.finish()
    return calls_of(("".join(content) + c, calls + k))


def test_one_call_with_content_before():
    content, calls = parse_tool_calls(ONE)
    assert content == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", WEATHER)]
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0].id)


def test_several_calls_and_content_after():
    content, calls = calls_of(parse_tool_calls("pre " + SEVERAL + " post"))
    assert content == "pre  post"
    assert calls == [("get_weather", WEATHER), ("now", "{}"), ("search", '{\n  "q": "日本 ```x```"\n}')]
    assert calls_of(parse_tool_calls(SEVERAL + "more" + SEVERAL)) == ("more", calls + calls)


def test_v31_bare_calls_and_styles():
    assert calls_of(parse_tool_calls(V31)) == ("ok", [("get_weather", WEATHER), ("now", "{}")])
    assert calls_of(parse_tool_calls(V31, style="deepseek_v31")) == ("ok", [("get_weather", WEATHER), ("now", "{}")])
    # the fenced V3 body is V3's; a V3.1 parser takes it for text
    assert parse_tool_calls(ONE, style="deepseek_v31") == (ONE, [])
    with pytest.raises(ValueError, match="style"):
        ToolCallParser("qwen")


def test_calls_come_out_as_each_completes_and_markers_are_held_back():
    p = ToolCallParser()
    assert p.feed("Hello <｜tool▁") == ("Hello ", [])  # could be the block's opening marker
    assert p.feed("calls▁begin｜>") == ("", [])
    content, calls = p.feed(v3_call("f", '{"a": 1}') + "\n" + TOOL_CALL_BEGIN)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("f", '{"a": 1}')]
    content, calls = p.feed("function" + TOOL_SEP + "g\n```json\n{}\n```" + TOOL_CALL_END + TOOL_CALLS_END + "bye")
    assert content == "bye" and [c.name for c in calls] == ["g"]
    assert p.finish() == ("", [])
    assert p.feed("a <") == ("a ", [])
    assert p.feed("b") == ("<b", [])  # "<b" starts no marker
    assert p.finish() == ("", [])


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_or_unfinished_blocks_are_content(text):
    content, calls = calls_of(parse_tool_calls(text))
    if text == MALFORMED[2]:  # a complete call in a block that never closes: the call, and its opener is gone
        assert (content, calls) == ("x", [("f", "{}")])
    else:
        assert (content, calls) == (text, [])


def test_a_malformed_call_after_good_ones_keeps_them_and_the_rest_is_content():
    bad = TOOL_CALL_BEGIN + "f" + TOOL_SEP + "{oops" + TOOL_CALL_END
    text = TOOL_CALLS_BEGIN + v3_call("ok", "{}") + "\n" + bad + TOOL_CALLS_END + "after" + block(v3_call("again", "{}"))
    content, calls = calls_of(parse_tool_calls(text))
    assert calls == [("ok", "{}"), ("again", "{}")]
    assert content == "\n" + bad + TOOL_CALLS_END + "after"


def test_arguments_as_written_stripped_and_ids_unique():
    args = ' {"x": [1, 2],  "y": "a\\nb"} '
    (content, calls) = parse_tool_calls(block(v3_call("f", args), v31_call("g", "\n" + args + "\n")))
    assert content == "" and [c.arguments for c in calls] == [args.strip()] * 2
    json.loads(calls[0].arguments)
    ids = [c.id for _ in range(50) for c in parse_tool_calls(SEVERAL)[1]]
    assert len(set(ids)) == len(ids) == 150 and all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)


@pytest.mark.parametrize("text", [ONE, SEVERAL, V31, "plain text, no calls", *MALFORMED])
def test_every_split_gives_the_one_shot_result(text):
    whole = calls_of(parse_tool_calls(text))
    for i in range(len(text) + 1):
        assert fed(text, [i]) == whole, i
    assert fed(text, range(len(text))) == whole  # one character at a time


PIECES = [TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP, TOOL_CALLS_BEGIN[:5], TOOL_CALL_END[:-1],
          "function", "get_weather", "\n```json\n", "\n```", WEATHER, "{}", "{", "\n", " ", "x", "<", "｜", "▁"]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_split_of_any_text_equals_one_shot(data):
    """Random texts, mostly malformed, and valid ones, cut anywhere."""
    pieces = data.draw(st.lists(st.sampled_from(PIECES), max_size=14))
    calls = data.draw(st.lists(st.sampled_from([v3_call("f", WEATHER), v31_call("g", "{}"), v3_call("h", "{x")]), max_size=3))
    text = "".join(pieces) + (block(*calls) if calls else "") + "".join(reversed(pieces))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    assert fed(text, cuts) == calls_of(parse_tool_calls(text))
    content, found = calls_of(parse_tool_calls(text))
    # nothing is lost: every character is in the content or in a call (or is block markup)
    assert sum(map(len, (content, *(n + a for n, a in found)))) <= len(text)
    if TOOL_CALLS_BEGIN not in text:
        assert (content, found) == (text, [])


# ---- the synthetic tokenizer: markers, template, detokenizer ------------------------------------
@pytest.fixture(scope="module")
def tok(tiny_ckpt) -> Tokenizer:
    return Tokenizer.from_dir(tiny_ckpt)


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather of a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]
CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
         {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]
CONVERSATION = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "call_1", "content": "22C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
    {"role": "assistant", "content": "Sunny, 22C at noon."},
    {"role": "user", "content": "And Rome?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": CALLS[:1]},
    {"role": "tool", "tool_call_id": "call_1", "content": "25C"},
]


def test_tool_markers_are_the_synthetic_tokenizers_special_tokens(tok, tiny_cfg):
    assert set(TOOL_MARKERS) <= set(tokenizer_data.TOOL_TOKENS)
    ids = [tok.encode(m, add_special_tokens=False) for m in tokenizer_data.TOOL_TOKENS]
    assert all(len(i) == 1 for i in ids)  # single tokens, at the end of the vocabulary
    assert [i[0] for i in ids] == list(range(tiny_cfg.vocab_size - len(ids), tiny_cfg.vocab_size))
    assert tok.decode([i[0] for i in ids]) == ""  # special: skipped by default
    assert tok.token_ids(TOOL_MARKERS) == {i[0] for i, m in zip(ids, tokenizer_data.TOOL_TOKENS) if m in TOOL_MARKERS}


def test_template_renders_tools_calls_and_results(tok):
    text = tok.apply_chat_template(CONVERSATION[:5], tools=TOOLS[1:])
    bos, eos = tok.bos_token, tok.eos_token
    assert text == (
        f"{bos}Be terse.\n\n## Tools\nYou have access to the following tools:\n\n### now\nDescription: \n\n"
        'Parameters: {"type": "object", "properties": {}}\n' + tokenizer_data.TOOLS_FORMAT
        + "<|User|>Weather in Paris?<|Assistant|><｜tool▁calls▁begin｜>"
        '<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜>\n'
        "<｜tool▁call▁begin｜>function<｜tool▁sep｜>now\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>" + eos
        + "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>22C<｜tool▁output▁end｜>\n"
        "<｜tool▁output▁begin｜>noon<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
    )  # after tool results the model goes on without an assistant tag
    # the model's own calls, rendered back, parse to the same calls
    rendered = text[text.index("<|Assistant|>") + len("<|Assistant|>"): text.index(eos)]
    assert calls_of(parse_tool_calls(rendered)) == ("", [("get_weather", '{"city": "Paris"}'), ("now", "{}")])
    no_tools = tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[])
    assert no_tools == tok.apply_chat_template([{"role": "user", "content": "hi"}]) == f"{bos}<|User|>hi<|Assistant|>"


@pytest.mark.parametrize("n", [3, 5, 6, 7, 9])
def test_template_matches_transformers_with_tools(tiny_ckpt, tok, n):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_ckpt))
    for tools in (TOOLS, None):
        for gen in (True, False):
            expected = hf.apply_chat_template(CONVERSATION[:n], tools=tools, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(CONVERSATION[:n], tools=tools, add_generation_prompt=gen) == expected
    ids = tok.encode_chat(CONVERSATION[:n], tools=TOOLS)
    assert ids == hf(tok.apply_chat_template(CONVERSATION[:n], tools=TOOLS), add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(CONVERSATION[:n], tools=TOOLS)


def test_dict_arguments_and_missing_content_are_rendered(tok):
    call = {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}],
                                   add_generation_prompt=False)
    assert text.endswith('<|Assistant|><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{"a": 1}\n```'
                         "<｜tool▁call▁end｜><｜tool▁calls▁end｜><|end▁of▁sentence|>")


@pytest.mark.parametrize("messages, tools, match", [
    ([{"role": "user", "content": "x", "tool_calls": CALLS}], None, "only assistant"),
    ([{"role": "assistant", "tool_calls": "f()"}], None, "tool_calls must be a list"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], None, r"tool_calls\[0\]"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}], None, "arguments"),
    ([{"role": "tool", "tool_call_id": "call_1"}], None, r"messages\[0\]"),
    ([{"role": "user", "content": "x"}], {"type": "function"}, "tools must be a list"),
    ([{"role": "user", "content": "x"}], [{"type": "function", "function": {"description": "no name"}}], r"tools\[0\]"),
])
def test_bad_tool_messages_and_tools_raise(tok, messages, tools, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages, tools=tools)


def tokenizer_with(path, tiny_ckpt, template: str) -> Tokenizer:
    """A tokenizer directory at `path`: the synthetic tokenizer.json, `template` as the chat template."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_ckpt / "tokenizer.json", path / "tokenizer.json")
    config = {"bos_token": tokenizer_data.BOS, "eos_token": tokenizer_data.EOS, "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_dir(path)


def _lit(s: str) -> str:
    """`s` (no quote, backslash or newline in it) as a jinja string literal."""
    return "'" + s + "'"


# The official DeepSeek-V3 / R1 chat template's structure (tokenizer_config.json of the real
# checkpoints; here with the synthetic vocabulary's USER / ASSISTANT / EOS spellings, and the
# tool-calls end marker after the loop, as R1 has it): bos, the system messages joined, then the
# turns; an assistant turn with content None is its tool calls, tool results go in the output
# markup. It renders calls and results but never uses `tools`.
U, A, E = _lit(tokenizer_data.USER), _lit(tokenizer_data.ASSISTANT), _lit(tokenizer_data.EOS)
CALL_BODY = (f"{_lit(TOOL_CALL_BEGIN)} + tool['type'] + {_lit(TOOL_SEP)} + tool['function']['name'] + "
             f"'\\n```json\\n' + tool['function']['arguments'] + '\\n```' + {_lit(TOOL_CALL_END)}")
V3_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{ " + U + " + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- set ns.is_first = false -%}"
    "{%- for tool in message['tool_calls'] %}"
    "{%- if not ns.is_first %}{{ " + A + " + " + _lit(TOOL_CALLS_BEGIN) + " + " + CALL_BODY + " }}"
    "{%- set ns.is_first = true -%}"
    "{%- else %}{{ '\\n' + " + CALL_BODY + " }}{%- endif %}"
    "{%- endfor %}{{ " + _lit(TOOL_CALLS_END) + " + " + E + " }}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}{{ " + _lit(tokenizer_data.TOOL_OUTPUTS_END) + " + message['content'] + " + E + " }}"
    "{%- set ns.is_tool = false -%}"
    "{%- else %}{{ " + A + " + message['content'] + " + E + " }}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}{{ " + _lit(tokenizer_data.TOOL_OUTPUTS_BEGIN + tokenizer_data.TOOL_OUTPUT_BEGIN)
    + " + message['content'] + " + _lit(tokenizer_data.TOOL_OUTPUT_END) + " }}{%- set ns.is_output_first = false %}"
    "{%- else %}{{ '\\n' + " + _lit(tokenizer_data.TOOL_OUTPUT_BEGIN) + " + message['content'] + "
    + _lit(tokenizer_data.TOOL_OUTPUT_END) + " }}{%- endif %}{%- endif %}"
    "{%- endfor -%}"
    "{% if ns.is_tool %}{{ " + _lit(tokenizer_data.TOOL_OUTPUTS_END) + " }}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{ " + A + " }}{% endif %}"
)

# Our own text, in the structure of DeepSeek's published tool prompt ("## Tools"), V3's syntax
TOOLS_SECTION = (
    "## Tools\nYou have access to the following tools:\n"
    "\n### get_weather\nDescription: The weather of a city\n\n"
    'Parameters: {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}\n'
    "\n### now\nDescription: \n\n"
    'Parameters: {"type": "object", "properties": {}}\n'
    "\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>tool_call_name\n```json\ntool_call_arguments\n```"
    "<｜tool▁call▁end｜>{additional_tool_calls}<｜tool▁calls▁end｜>\n\n"
    "Where:\n"
    "- `tool_call_name` must be an exact match to one of the available tools\n"
    "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
    "- For multiple tool calls, separate them with a newline"
)


@pytest.fixture(scope="module")
def v3_tok(tmp_path_factory, tiny_ckpt) -> Tokenizer:
    return tokenizer_with(tmp_path_factory.mktemp("v3-template"), tiny_ckpt, V3_TEMPLATE)


def test_the_tools_section_and_its_call_format():
    assert tools_system_prompt(TOOLS) == TOOLS_SECTION
    # the stated call format is the one the parser reads
    example = TOOLS_FORMAT[TOOLS_FORMAT.index(TOOL_CALLS_BEGIN): TOOLS_FORMAT.index(TOOL_CALLS_END) + len(TOOL_CALLS_END)]
    call = example.replace("tool_call_name", "get_weather").replace("tool_call_arguments", WEATHER)
    assert calls_of(parse_tool_calls(call.replace("{additional_tool_calls}", ""))) == ("", [("get_weather", WEATHER)])
    two = call.replace("{additional_tool_calls}", "\n" + v3_call("now", "{}"))
    assert calls_of(parse_tool_calls(two)) == ("", [("get_weather", WEATHER), ("now", "{}")])


def test_a_v3_template_gets_the_tools_in_its_system_prompt(v3_tok):
    bos = tokenizer_data.BOS
    assert v3_tok.apply_chat_template(CONVERSATION[:2], tools=TOOLS) == (
        f"{bos}Be terse.\n\n{TOOLS_SECTION}<|User|>Weather in Paris?<|Assistant|>")
    user = CONVERSATION[1:2]
    assert v3_tok.apply_chat_template(user, tools=TOOLS) == f"{bos}{TOOLS_SECTION}<|User|>Weather in Paris?<|Assistant|>"
    # several system messages: the tools go with the first; the template joins them
    two = [{"role": "system", "content": "A."}, *user, {"role": "system", "content": "B."}]
    assert v3_tok.apply_chat_template(two, tools=TOOLS[1:]) == (
        f"{bos}A.\n\n{tools_system_prompt(TOOLS[1:])}\n\nB.<|User|>Weather in Paris?<|Assistant|>")
    empty = [{"role": "system", "content": ""}, *user]
    assert v3_tok.apply_chat_template(empty, tools=TOOLS) == v3_tok.apply_chat_template(user, tools=TOOLS)
    # no tools: the prompt as before
    for tools in (None, []):
        assert v3_tok.apply_chat_template(CONVERSATION[:2], tools=tools) == (
            f"{bos}Be terse.<|User|>Weather in Paris?<|Assistant|>")
    assert v3_tok.encode_chat(user, tools=TOOLS) == v3_tok.encode(
        v3_tok.apply_chat_template(user, tools=TOOLS), add_special_tokens=False)
    with pytest.raises(ValueError, match="must be a string"):
        v3_tok.apply_chat_template([{"role": "system", "content": [{"type": "text", "text": "x"}]}, *user], tools=TOOLS)


def test_a_v3_template_renders_the_round_trip_with_the_tools(v3_tok):
    """Calls (content None, or "" as some clients send it) and their results, after the tools."""
    calls_empty = {**CONVERSATION[2], "content": ""}
    for msgs in (CONVERSATION[:5], [*CONVERSATION[:2], calls_empty, *CONVERSATION[3:5]]):
        text = v3_tok.apply_chat_template(msgs, tools=TOOLS)
        assert text == (
            f"{tokenizer_data.BOS}Be terse.\n\n{TOOLS_SECTION}<|User|>Weather in Paris?<|Assistant|>"
            + block(v3_call("get_weather", '{"city": "Paris"}'), v3_call("now", "{}")) + tokenizer_data.EOS
            + "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>22C<｜tool▁output▁end｜>\n"
            "<｜tool▁output▁begin｜>noon<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
        )


@pytest.mark.parametrize("n", [2, 3, 5, 6, 7, 9])
def test_described_in_the_system_prompt_as_the_synthetic_template_renders_them(tmp_path, tiny_ckpt, tok, n):
    """The synthetic template without its own tools block, given tools, renders what it renders with it."""
    template = tokenizer_data.CHAT_TEMPLATE
    without = template[: template.index("{% if tools %}")] + template[template.index("{{ bos_token }}"):]
    assert "tools" not in without
    bare = tokenizer_with(tmp_path, tiny_ckpt, without)
    for msgs in (CONVERSATION[:n], CONVERSATION[1:n]):
        for gen in (True, False):
            expected = tok.apply_chat_template(msgs, tools=TOOLS, add_generation_prompt=gen)
            assert bare.apply_chat_template(msgs, tools=TOOLS, add_generation_prompt=gen) == expected
            assert TOOLS_SECTION in expected


@pytest.mark.parametrize("template", [
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}{% endif %}{% endfor %}",
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
    "{% endif %}<|User|>{{ m['content'] }}{% endfor %}",
])
def test_a_template_without_tools_or_system_messages_refuses_tools(tmp_path, tiny_ckpt, template):
    tok = tokenizer_with(tmp_path, tiny_ckpt, template)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(TokenizerError, match="does not render tools") as e:
        tok.apply_chat_template(msgs, tools=TOOLS)
    assert isinstance(e.value, ValueError) and "nor system messages" in str(e.value)
    assert tok.apply_chat_template(msgs, tools=[]) == tok.apply_chat_template(msgs) == tokenizer_data.BOS + "<|User|>hi"


MODEL_OUTPUT = "Let me look.\n" + block(v3_call("get_weather", WEATHER), v3_call("now", "{}")) + tokenizer_data.EOS


def test_decode_keeps_only_the_given_special_tokens(tok):
    ids = tok.encode(MODEL_OUTPUT)  # BOS first, EOS last: special tokens that stay skipped
    assert tok.decode(ids) == "Let me look.\n" + "function" + "get_weather\n```json\n" + WEATHER + "\n```" + "\n" \
        + "function" + "now\n```json\n{}\n```"
    assert tok.decode(ids, keep=TOOL_MARKERS) == MODEL_OUTPUT.removesuffix(tokenizer_data.EOS)
    assert tok.decode(ids, keep={tokenizer_data.EOS}) == tok.decode(ids) + tokenizer_data.EOS
    assert tok.decode(ids, skip_special_tokens=False) == tokenizer_data.BOS + MODEL_OUTPUT
    assert tok.decode(ids, keep=["not a token"]) == tok.decode(ids)


def test_streamed_tokens_to_tool_calls(tok):
    """The server's path: token ids -> detokenizer keeping the markers -> parser."""
    ids = tok.encode(MODEL_OUTPUT, add_special_tokens=False)
    detok, parser = tok.detokenizer(keep=TOOL_MARKERS), ToolCallParser()
    content, calls, text = [], [], []
    for t in ids:
        delta = detok.add(t)
        text.append(delta)
        c, k = parser.feed(delta)
        content.append(c)
        calls += k
    text.append(detok.flush())
    c, k = parser.feed(text[-1])
    content.append(c)
    c2, k2 = parser.finish()
    assert "".join(text) == tok.decode(ids, keep=TOOL_MARKERS) == MODEL_OUTPUT.removesuffix(tokenizer_data.EOS)
    assert "".join(content) + c2 == "Let me look.\n"
    assert [(x.name, x.arguments) for x in calls + k + k2] == [("get_weather", WEATHER), ("now", "{}")]
    default = tok.detokenizer()  # unchanged: every special token skipped
    assert "".join([default.add(t) for t in ids] + [default.flush()]) == tok.decode(ids)


def test_model_encode_prompt_passes_tools(model, tokenizer):
    msgs = CONVERSATION[:2]
    assert model.encode_prompt(messages=msgs, tools=TOOLS) == tokenizer.encode_chat(msgs, tools=TOOLS)
    assert model.encode_prompt(messages=msgs) == tokenizer.encode_chat(msgs) != tokenizer.encode_chat(msgs, tools=TOOLS)
    with pytest.raises(ValueError, match="tools"):
        model.encode_prompt("hi", tools=TOOLS)
