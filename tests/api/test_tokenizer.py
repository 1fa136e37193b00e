"""The tokenizer wrapper: BOS handling, round trips, the chat template (checked against
transformers' own rendering), incremental detokenization of multi-byte text."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmoe.tokenizer import Tokenizer, TokenizerError

TEXTS = ["Hello world", "héllo wörld, naïve café", "数据 🙂 emoji\n\ttabs", "  leading spaces", "x"]


def test_special_tokens_come_from_the_config(tokenizer, tiny_cfg):
    assert tokenizer.bos_token_id == tiny_cfg.bos_token_id == 0
    assert tokenizer.eos_token_id == 1
    assert tokenizer.vocab_size <= tiny_cfg.vocab_size
    assert tokenizer.chat_template


@pytest.mark.parametrize("text", TEXTS)
def test_encode_adds_bos_once_and_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    bare = tokenizer.encode(text, add_special_tokens=False)
    assert bare == ids[1:]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=False).startswith(tokenizer.bos_token)


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]


def test_chat_template_renders_deepseek_turns(tokenizer):
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    assert text == f"{bos}You are terse.<|User|>Hi there<|Assistant|>Hello.{eos}<|User|>What is 2+2?<|Assistant|>"
    no_gen = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert no_gen == text[: -len("<|Assistant|>")]
    ids = tokenizer.encode_chat(MESSAGES)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chat_template_matches_transformers(tiny_ckpt, tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_ckpt))
    for gen in (True, False):
        expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=gen) == expected
    for text in TEXTS:
        assert tokenizer.encode(text) == hf(text)["input_ids"]


@pytest.mark.parametrize("bad", [[], "hello", [{"content": "x"}], [{"role": "user"}], ["user: hi"]])
def test_bad_messages_raise(tokenizer, bad):
    with pytest.raises(ValueError, match="messages"):
        tokenizer.apply_chat_template(bad)


def detokenize_stream(tokenizer, ids):
    d = tokenizer.detokenizer()
    deltas = [d.add(t) for t in ids]
    deltas.append(d.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_emits_only_complete_characters(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = detokenize_stream(tokenizer, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_multibyte_character_split_over_tokens_waits_for_its_last_byte(tokenizer):
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1, "the tiny tokenizer should split a 4-byte emoji"
    deltas = detokenize_stream(tokenizer, ids)
    assert deltas[:-2] == [""] * (len(ids) - 1) and "".join(deltas) == "🙂"


@settings(max_examples=60, deadline=None)
@given(st.text(st.sampled_from("ab é€数🙂\n"), max_size=24))
def test_incremental_detokenizer_join_equals_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert "".join(detokenize_stream(tokenizer, ids)) == tokenizer.decode(ids) == text


def test_invalid_bytes_are_flushed_at_the_end(tokenizer):
    # A lone UTF-8 lead byte never completes: it comes out (as U+FFFD) when the stream ends.
    lead = tokenizer._tok.token_to_id("ð")  # byte-level alphabet char of byte 0xF0
    assert lead is not None
    ids = tokenizer.encode("ok", add_special_tokens=False) + [lead]
    deltas = detokenize_stream(tokenizer, ids)
    assert "".join(deltas) == "ok\ufffd" and deltas[-1] == "\ufffd"


def test_missing_or_broken_files(tmp_path, tiny_ckpt):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(tiny_ckpt / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<|begin▁of▁sentence|>"}}))
    tok = Tokenizer.from_dir(tmp_path)  # AddedToken-style bos, no chat template
    assert tok.bos_token_id == 0 and tok.eos_token_id is None
    with pytest.raises(TokenizerError, match="chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
