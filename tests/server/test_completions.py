"""Chat and text completions through the official `openai` client, plain and streamed: the
same tokens as `jaxmoe.generate` with the same parameters, usage, finish reasons, and eight
concurrent streams batched by the engine, each equal to its solo output."""

from __future__ import annotations

import threading

import pytest

import jaxmoe

from .conftest import NAME

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def _usage_ok(usage, r):
    assert usage.prompt_tokens == len(r.prompt_token_ids)
    assert usage.completion_tokens == len(r.token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_plain_equals_generate(server, model):
    r = jaxmoe.generate(model, messages=CHAT, max_new_tokens=8)
    out = server.client().chat.completions.create(model=NAME, messages=CHAT, max_tokens=8, temperature=0)
    assert out.object == "chat.completion" and out.model == NAME and out.id.startswith("chatcmpl-")
    assert out.system_fingerprint and out.created > 0
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.message.content == r.text
    assert choice.finish_reason == FINISH[r.finish_reason] and choice.message.tool_calls is None
    _usage_ok(out.usage, r)


def test_chat_stream_equals_generate(server, model):
    r = jaxmoe.generate(model, messages=CHAT, max_new_tokens=8)
    chunks = list(server.client().chat.completions.create(
        model=NAME, messages=CHAT, max_completion_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [FINISH[r.finish_reason]]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # include_usage: the last chunk
    _usage_ok(chunks[-1].usage, r)
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_plain_and_stream_equal_generate(server, model):
    client = server.client()
    r = jaxmoe.generate(model, "Once upon a time", max_new_tokens=10)
    out = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert out.object == "text_completion" and out.choices[0].text == r.text
    assert out.choices[0].finish_reason == FINISH[r.finish_reason]
    _usage_ok(out.usage, r)
    chunks = list(client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [FINISH[r.finish_reason]]


def test_token_id_prompt_sampling_and_stop_match_generate(server, model):
    """Token ids as the prompt, seeded sampling, top_k (extension) and a stop string."""
    kw = dict(temperature=0.9, top_p=0.9, seed=7)
    r = jaxmoe.generate(model, [0, 5, 6, 7], max_new_tokens=12, top_k=40, **kw)
    out = server.client().completions.create(model=NAME, prompt=[0, 5, 6, 7], max_tokens=12, extra_body={"top_k": 40},
                                             **kw)
    assert out.choices[0].text == r.text and out.usage.completion_tokens == len(r.token_ids)
    greedy = jaxmoe.generate(model, "Hello", max_new_tokens=12, ignore_eos=True)
    stop = greedy.text[3:5]  # two characters the greedy text has: it must stop there
    r = jaxmoe.generate(model, "Hello", max_new_tokens=12, ignore_eos=True, stop=[stop])
    assert r.finish_reason == "stop"
    out = server.client().completions.create(model=NAME, prompt="Hello", max_tokens=12, temperature=0, stop=[stop],
                                             extra_body={"ignore_eos": True})
    assert out.choices[0].text == r.text and out.choices[0].finish_reason == "stop"


def test_default_max_tokens_is_the_rest_of_the_context(server, model):
    """No max_tokens: the completion may run to the end of the context (here it stops at EOS or
    at the context's end, as generate with the same limit)."""
    ids = [10 + i % 400 for i in range(model.context_len - 6)]  # 6 positions left
    r = jaxmoe.generate(model, ids, max_new_tokens=6)
    out = server.client().completions.create(model=NAME, prompt=ids, temperature=0)
    assert out.choices[0].text == r.text and out.usage.completion_tokens == len(r.token_ids) <= 6


def test_models_and_health(server, model):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME] and models.data[0].owned_by == "jaxmoe"
    assert server.client().models.retrieve(NAME).id == NAME
    assert server.http.get("/v1/models").json()["data"][0]["max_model_len"] == model.context_len
    h = server.http.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"


PROMPTS = ["The cat", "A long time ago in a galaxy far away", "def f(x):", "1, 2, 3,",
           "Hello", "import numpy as np\n", "Once upon", "Q: what is 2+2?\nA:"]


def test_eight_concurrent_streams_each_equal_their_solo_output(server, model):
    solo = [jaxmoe.generate(model, p, max_new_tokens=8) for p in PROMPTS]
    results: dict[int, tuple[str, str | None]] = {}
    errors = []
    barrier = threading.Barrier(len(PROMPTS))
    client = server.client()

    def run(i):
        try:
            barrier.wait()
            stream = client.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=8, temperature=0, stream=True)
            parts, finish = [], None
            for c in stream:
                parts.append(c.choices[0].text)
                finish = c.choices[0].finish_reason or finish
            results[i] = ("".join(parts), finish)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert [results[i] for i in range(len(PROMPTS))] == [(r.text, FINISH[r.finish_reason]) for r in solo]
    server.wait_idle()


@pytest.mark.parametrize("content", ["Hi", [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]])
def test_chat_content_parts_and_developer_role(server, model, content):
    r = jaxmoe.generate(model, messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
                        max_new_tokens=4)
    out = server.client().chat.completions.create(model=NAME, max_tokens=4, temperature=0, messages=[
        {"role": "developer", "content": "S"}, {"role": "user", "content": content}])
    assert out.choices[0].message.content == r.text


def test_a_huge_top_k_keeps_every_token(server, model):
    """top_k beyond the vocabulary is top_k 0 (and never reaches the step as an int32 overflow)."""
    r = jaxmoe.generate(model, "Hi", max_new_tokens=4, temperature=0.9, seed=5)
    out = server.client().completions.create(model=NAME, prompt="Hi", max_tokens=4, temperature=0.9, seed=5,
                                             extra_body={"top_k": 10**12})
    assert out.choices[0].text == r.text


def test_a_resent_chat_history_reports_its_cached_prompt_tokens(server, model):
    """The second turn resends the first: usage.prompt_tokens_details.cached_tokens counts the
    prompt tokens served from the prefix cache (at least a whole cache block), and the reply is the one
    `generate` gives for the same messages."""
    block = model.engine.blocks.block_size
    system = {"role": "system", "content": "You answer in short sentences. " * 8}
    first = [system, {"role": "user", "content": "Hello there"}]
    client = server.client()
    out1 = client.chat.completions.create(model=NAME, messages=first, max_tokens=4, temperature=0)
    second = [*first, {"role": "assistant", "content": out1.choices[0].message.content},
              {"role": "user", "content": "And then?"}]
    out2 = client.chat.completions.create(model=NAME, messages=second, max_tokens=4, temperature=0)
    cached = out2.usage.prompt_tokens_details.cached_tokens
    assert block <= cached < out2.usage.prompt_tokens
    assert out2.choices[0].message.content == jaxmoe.generate(model, messages=second, max_new_tokens=4).text
