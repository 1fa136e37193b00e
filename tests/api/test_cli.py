"""The command line, in-process (fast) plus one real subprocess for the entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import jaxmoe
from jaxmoe.cli import main


def run(capsys, *argv):
    if argv[0] == "generate":  # the pure JAX path shares compiled steps across loads (see conftest)
        argv = (*argv, "--cpu-kernels", "off")
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_json_matches_the_api(capsys, tiny_ckpt, jax_model):
    rc, out, err = run(capsys, "generate", "--model", str(tiny_ckpt), "--prompt", "Hello", "--max-new-tokens", "6",
                       "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--seed", "3", "--json")
    assert rc == 0, err
    got = json.loads(out)
    r = jaxmoe.generate(jax_model, "Hello", max_new_tokens=6, temperature=0.8, top_k=50, top_p=0.9, seed=3)
    assert got["token_ids"] == r.token_ids and got["text"] == r.text and got["finish_reason"] == r.finish_reason
    assert got["prompt_token_ids"] == r.prompt_token_ids
    assert set(got["timings"]) >= {"ttft_s", "prefill_tok_s", "decode_tok_s"}


def test_generate_takes_a_tpot_target(capsys, tiny_ckpt, jax_model, monkeypatch):
    """--tpot-target-ms reaches the model's runtime (it only changes prompt chunking: same tokens)."""
    loaded, real_load = [], jaxmoe.load

    def spy(*args, **kw):
        loaded.append(real_load(*args, **kw))
        return loaded[-1]

    monkeypatch.setattr(jaxmoe, "load", spy)
    rc, out, err = run(capsys, "generate", "--model", str(tiny_ckpt), "--prompt", "Hello", "--max-new-tokens", "4",
                       "--tpot-target-ms", "50", "--json")
    assert rc == 0, err
    assert [m.runtime.tpot_target_ms for m in loaded] == [50.0]
    assert json.loads(out)["token_ids"] == jaxmoe.generate(jax_model, "Hello", max_new_tokens=4).token_ids


def test_generate_plain_and_stream_print_the_same_text(capsys, tiny_ckpt, jax_model):
    r = jaxmoe.generate(jax_model, "Hello", max_new_tokens=8)
    for extra in ((), ("--stream",)):
        rc, out, err = run(capsys, "generate", "--model", str(tiny_ckpt), "--prompt", "Hello", "--max-new-tokens", "8", *extra)
        assert rc == 0, err
        assert out == r.text + "\n"
        assert "time to first token" in err and "decode" in err and f"finish: {r.finish_reason}" in err


def test_generate_from_chat_and_ids(capsys, tiny_ckpt, jax_model):
    rc, out, _ = run(capsys, "generate", "--model", str(tiny_ckpt), "--chat", "Hi", "--max-new-tokens", "4", "--json")
    assert rc == 0
    chat = jaxmoe.generate(jax_model, messages=[{"role": "user", "content": "Hi"}], max_new_tokens=4)
    assert json.loads(out)["token_ids"] == chat.token_ids
    rc, out, _ = run(capsys, "generate", "--model", str(tiny_ckpt), "--prompt-ids", "0, 5,6", "--max-new-tokens", "4", "--json")
    assert rc == 0 and json.loads(out)["prompt_token_ids"] == [0, 5, 6]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/ckpt", "--prompt", "x"], "does not exist"),
        (["--prompt", "x", "--temperature", "-1"], "temperature"),
        (["--prompt", "x", "--top-p", "0"], "top_p"),
        (["--prompt", "x", "--max-new-tokens", "100000"], "prompt too long"),
        (["--prompt-ids", "1,a"], "--prompt-ids"),
        (["--prompt-ids", "1,999999"], "outside the vocabulary"),
        (["--prompt", ""], "empty"),
    ],
)
def test_user_errors_exit_2_without_traceback(capsys, tiny_ckpt, args, message):
    if "--model" not in args:
        args = ["--model", str(tiny_ckpt), *args]
    rc, out, err = run(capsys, "generate", *args)
    assert rc == 2
    assert err.startswith("jaxmoe: error:") and message in err and "Traceback" not in err


def test_synth_writes_a_loadable_checkpoint_and_refuses_to_overwrite(capsys, tmp_path):
    out = tmp_path / "ck"
    rc, stdout, err = run(capsys, "synth", "--config", "tiny", "--out", str(out), "--fmt", "bf16")
    assert rc == 0, err
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert jaxmoe.load(out).cfg.hidden_size == 64
    rc, _, err = run(capsys, "synth", "--config", "tiny", "--out", str(out))
    assert rc == 2 and "already exists" in err
    rc, _, err = run(capsys, "synth", "--config", "no-such-config", "--out", str(tmp_path / "x"))
    assert rc == 2 and "unknown model config" in err


def test_demo_writes_once_then_reuses_the_checkpoint(capsys, tmp_path):
    args = ("demo", "--config", "tiny", "--max-new-tokens", "5", "--cache-dir", str(tmp_path))
    rc, out, err = run(capsys, *args)
    assert rc == 0, err
    assert "writing synthetic checkpoint" in out
    for line in ("time to first token", "prefill", "decode", "tok/s"):
        assert line in out
    rc, out, err = run(capsys, *args, "--cpu-kernels", "off")
    assert rc == 0 and "using cached synthetic checkpoint" in out and "pure JAX path" in out
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 1


def test_console_entry_point_subprocess(tiny_ckpt):
    p = subprocess.run(
        [sys.executable, "-m", "jaxmoe.cli", "generate", "--model", str(tiny_ckpt), "--prompt", "x", "--top-k", "-2"],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 2 and "top_k" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "jaxmoe.cli", "--version"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == f"jaxmoe {jaxmoe.__version__}"
