"""Tool calls: DeepSeek-V3's call markup parsed from streamed text (any split of a text gives the
one-shot result), tools / tool calls / tool results rendered by the chat template (checked
against transformers), and the detokenizer keeping only the tool markers among the special
tokens."""

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
from jaxmoe.tokenizer import Tokenizer, TokenizerError


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
        'Parameters: {"type": "object", "properties": {}}\n' + tokenizer_data._TOOLS_FORMAT
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


def test_a_template_without_tools_refuses_them(tmp_path, tiny_ckpt):
    shutil.copy(tiny_ckpt / "tokenizer.json", tmp_path / "tokenizer.json")
    template = "{{ bos_token }}{% for m in messages %}<|User|>{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": tokenizer_data.BOS, "chat_template": template}))
    tok = Tokenizer.from_dir(tmp_path)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(TokenizerError, match="does not render tools") as e:
        tok.apply_chat_template(msgs, tools=TOOLS)
    assert isinstance(e.value, ValueError)
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
