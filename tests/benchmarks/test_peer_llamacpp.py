"""benchmarks/peer_llamacpp.py and benchmarks/_llamacpp: llama-bench's JSON output, the command
lines, the conversion fix-ups, and `--quick` with no llama.cpp (recorded as skipped). No
network, no llama.cpp build, no timing assertions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._llamacpp import bench as LB  # noqa: E402
from benchmarks._llamacpp import convert as LC  # noqa: E402
from benchmarks._llamacpp import fetch as LF  # noqa: E402


def _record(n_prompt: int, n_gen: int, samples_ts: list[float]) -> dict:
    avg = sum(samples_ts) / len(samples_ts)
    return {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "AMD EPYC", "gpu_info": "", "backends": "CPU",
            "model_filename": "/c/gguf/bench-v3-mid-q8_0.gguf", "model_type": "deepseek2 ?B Q8_0",
            "model_size": 4563402752, "model_n_params": 4293468160, "n_batch": 2048, "n_ubatch": 512, "n_threads": 2,
            "cpu_mask": "0x0", "cpu_strict": False, "poll": 50, "type_k": "f16", "type_v": "f16", "n_gpu_layers": 99,
            "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": 0, "test_time": "2026-11-23T13:00:00Z",
            "avg_ns": int(1e9 * (n_prompt or n_gen) / avg), "stddev_ns": 1000, "avg_ts": avg, "stddev_ts": 0.5,
            "samples_ns": [int(1e9 * (n_prompt or n_gen) / s) for s in samples_ts], "samples_ts": samples_ts}


def _printed(recs: list[dict]) -> str:
    """The layout of llama-bench's json printer: '[', one indented object per test, ']'."""
    body = ",\n".join("  {\n" + ",\n".join(f"    \"{k}\": {json.dumps(v)}" for k, v in r.items()) + "\n  }" for r in recs)
    return "[\n" + body + "\n]\n"


def test_parse_llama_bench_json():
    text = _printed([_record(512, 0, [55.0, 57.0, 59.0]), _record(0, 32, [13.1, 13.9])])
    res = LB.parse("build: some log line\n" + text)  # anything before the array is ignored
    assert set(res) == {"pp512", "tg32"}
    pp, tg = res["pp512"]["tok_s"], res["tg32"]["tok_s"]
    assert pp["median"] == 57.0 and pp["min"] == 55.0 and pp["max"] == 59.0 and pp["n"] == 3
    assert tg["median"] == pytest.approx(13.5) and tg["mean"] == pytest.approx(13.5) and tg["stddev"] == 0.5
    assert res["tg32"]["n_threads"] == 2 and res["tg32"]["model_size"] == 4563402752


# verbatim `llama-bench -m tiny-q8_0.gguf -t 2 -p 16 -n 4 -r 2 -o json` (llama.cpp 0c1e570 from the
# llama-cpp-python 0.3.36 sdist, this box, a loaded moment)
REAL_OUTPUT = r"""
[
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/root/.cache/jaxmoe/llamacpp/gguf/tiny-7ef81f7401-q8_0.gguf",
    "model_type": "deepseek2 ?B Q8_0",
    "model_size": 297632,
    "model_n_params": 257728,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 16,
    "n_gen": 0,
    "n_depth": 0,
    "test_time": "2026-11-23T13:47:49Z",
    "avg_ns": 1213971341,
    "stddev_ns": 31113456,
    "avg_ts": 13.184213,
    "stddev_ts": 0.337904,
    "samples_ns": [ 1191970833, 1235971850 ],
    "samples_ts": [ 13.4231, 12.9453 ]
  },
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/root/.cache/jaxmoe/llamacpp/gguf/tiny-7ef81f7401-q8_0.gguf",
    "model_type": "deepseek2 ?B Q8_0",
    "model_size": 297632,
    "model_n_params": 257728,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 4,
    "n_depth": 0,
    "test_time": "2026-11-23T13:47:53Z",
    "avg_ns": 2024432889,
    "stddev_ns": 2827769065,
    "avg_ts": 80.824091,
    "stddev_ts": 112.896736,
    "samples_ns": [ 4023967571, 24898207 ],
    "samples_ts": [ 0.994044, 160.654 ]
  }
]
"""


def test_parse_real_llama_bench_output():
    res = LB.parse(REAL_OUTPUT)
    assert set(res) == {"pp16", "tg4"}
    pp = res["pp16"]
    assert pp["n_threads"] == 2 and pp["model_type"].startswith("deepseek2") and pp["tok_s"]["n"] == 2
    assert pp["tok_s"]["min"] <= pp["tok_s"]["median"] <= pp["tok_s"]["max"]
    assert pp["tok_s"]["mean"] == pp["avg_ts"]


def test_parse_llama_bench_combined_and_errors():
    rec = _record(512, 64, [10.0])
    rec.pop("samples_ts")  # older builds: avg_ts only
    res = LB.parse(json.dumps([rec]))
    assert list(res) == ["pp512+tg64"] and res["pp512+tg64"]["tok_s"]["median"] == 10.0
    with pytest.raises(ValueError, match="no JSON array"):
        LB.parse("| model | size | test | t/s |")
    with pytest.raises(ValueError, match="avg_ts"):
        LB.parse(json.dumps([{"n_prompt": 1, "n_gen": 0}]))


def test_llama_bench_cmd():
    cmd = LB.llama_bench_cmd(Path("/c/bin/llama-bench"), Path("/c/m.gguf"), threads=2, n_prompt=512, n_gen=32, reps=3)
    assert cmd == ["/c/bin/llama-bench", "-m", "/c/m.gguf", "-t", "2", "-p", "512", "-n", "32", "-r", "3", "-o", "json"]
    with pytest.raises(ValueError):
        LB.llama_bench_cmd(Path("b"), Path("m"), threads=0, n_prompt=512, n_gen=32, reps=1)
    with pytest.raises(ValueError):
        LB.llama_bench_cmd(Path("b"), Path("m"), threads=2, n_prompt=0, n_gen=0, reps=1)


def test_llama_bench_cmd_without_repack():
    cmd = LB.llama_bench_cmd(Path("b"), Path("m.gguf"), threads=2, n_prompt=16, n_gen=4, reps=1, repack=False)
    assert cmd[-2:] == ["--repack", "0"] and cmd[:-2] == LB.llama_bench_cmd(Path("b"), Path("m.gguf"), threads=2,
                                                                           n_prompt=16, n_gen=4, reps=1)


AMX_FLAGS = frozenset("avx2 fma avx512f amx_tile amx_bf16 amx_int8".split())
NO_AMX = frozenset("avx2 fma avx512f avx512_bf16".split())
ABORT_STDERR = ("load_tensors: CPU_REPACK model buffer size = 1024.00 MiB\n"
                "/llama.cpp/ggml/src/ggml-backend.cpp:1042: GGML_ASSERT(*cur_backend_id != -1) failed\n")


def test_amx_repack_abort_detection():
    assert LB.is_amx_repack_abort(-6, ABORT_STDERR, NO_AMX)  # the assert text, whatever the CPU
    assert LB.is_amx_repack_abort(134, "Aborted", AMX_FLAGS)  # any failure on an AMX CPU
    assert not LB.is_amx_repack_abort(1, "error: failed to load model", NO_AMX)
    assert not LB.is_amx_repack_abort(0, ABORT_STDERR, AMX_FLAGS)  # it ran


def _fake_llama_bench(tmp_path: Path, *, abort_with_repack: bool, fail_always: bool = False) -> Path:
    """A llama-bench stand-in: aborts with the AMX assert unless `--repack 0` is given (when
    abort_with_repack), fails with another error when fail_always, else prints a -o json array."""
    out = tmp_path / "out.json"
    out.write_text(json.dumps([_record(16, 0, [50.0]), _record(0, 4, [10.0])]))
    log = tmp_path / "calls.log"
    script = tmp_path / "llama-bench"
    script.write_text("#!/bin/sh\n"
                      f'echo "$*" >> "{log}"\n'
                      + ('echo "error: failed to load model" >&2; exit 1\n' if fail_always else "")
                      + ('case "$*" in *"--repack 0"*) ;; *) echo "GGML_ASSERT(*cur_backend_id != -1) failed" >&2; '
                         'kill -ABRT $$;; esac\n' if abort_with_repack else "")
                      + f'cat "{out}"\n')
    script.chmod(0o755)
    return script


def test_run_with_workaround(tmp_path):
    kw = dict(threads=2, n_prompt=16, n_gen=4, reps=1, flags=NO_AMX)
    binary = _fake_llama_bench(tmp_path, abort_with_repack=True)
    res, wa = LB.run_with_workaround(binary, Path("m.gguf"), **kw)
    assert set(res) == {"pp16", "tg4"} and wa == LB.REPACK_WORKAROUND == "--repack 0 (AMX repack abort)"
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 2 and "--repack" not in calls[0] and calls[1].endswith("--repack 0")
    res, wa = LB.run_with_workaround(binary, Path("m.gguf"), repack=False, **kw)  # later rounds: straight away
    assert wa == LB.REPACK_WORKAROUND and len((tmp_path / "calls.log").read_text().splitlines()) == 3

    ok = tmp_path / "ok"
    ok.mkdir()
    res, wa = LB.run_with_workaround(_fake_llama_bench(ok, abort_with_repack=False), Path("m.gguf"), **kw)
    assert wa is None and res["tg4"]["tok_s"]["median"] == 10.0

    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(LB.LlamaBenchError, match="failed to load model") as e:  # not the AMX abort: no rerun
        LB.run_with_workaround(_fake_llama_bench(bad, abort_with_repack=False, fail_always=True), Path("m.gguf"), **kw)
    assert e.value.returncode == 1 and len((bad / "calls.log").read_text().splitlines()) == 1
    with pytest.raises(LB.LlamaBenchError):  # on an AMX CPU it is retried once, then raised
        LB.run_with_workaround(bad / "llama-bench", Path("m.gguf"), **{**kw, "flags": AMX_FLAGS})
    assert len((bad / "calls.log").read_text().splitlines()) == 3


def test_fetch_and_build_cmds(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXMOE_LLAMACPP_CACHE", str(tmp_path / "c"))
    assert LF.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("JAXMOE_LLAMACPP_CACHE")
    assert LF.cache_dir() == Path.home() / ".cache" / "jaxmoe" / "llamacpp"
    dl = LF.download_cmd(tmp_path / "sdist", python="py")
    assert dl == ["py", "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "llama-cpp-python", "-d",
                  str(tmp_path / "sdist")]
    conf = LF.configure_cmd(Path("/s"), Path("/b"))
    assert conf[:5] == ["cmake", "-S", "/s", "-B", "/b"]
    for flag in ("-DGGML_NATIVE=ON", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF"):
        assert flag in conf
    assert LF.build_cmd(Path("/b"), jobs=2) == ["cmake", "--build", "/b", "--target", "llama-bench", "-j", "2"]
    # nothing cached and fetching/building off: a clear reason, no network
    with pytest.raises(LF.PeerUnavailable, match="building is off"):
        LF.ensure_llama_bench(tmp_path / "empty", allow_network=False, allow_build=False)
    with pytest.raises(LF.PeerUnavailable, match="network fetching is off"):
        LF.ensure_llama_bench(tmp_path / "empty", allow_network=False, allow_build=True)
    fake = tmp_path / "c2" / "build" / "bin" / "llama-bench"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert LF.ensure_llama_bench(tmp_path / "c2", allow_network=False, allow_build=False) == fake


BASE = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "num_hidden_layers": 3,
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}


def test_fix_config():
    cfg, notes = LC.fix_config(BASE)
    assert cfg["scoring_func"] == "sigmoid" and any("scoring_func" in n for n in notes)
    assert cfg["quantization_config"] == BASE["quantization_config"]  # the converter dequantizes FP8 itself
    assert "scoring_func" not in BASE  # not modified in place
    same, notes = LC.fix_config({**BASE, "scoring_func": "sigmoid"})
    assert same["scoring_func"] == "sigmoid" and notes == []
    for n in (26, 27):
        with pytest.raises(ValueError, match="Lite"):
            LC.fix_config({**BASE, "num_hidden_layers": n})
    with pytest.raises(ValueError, match="model_type"):
        LC.fix_config({**BASE, "model_type": "mixtral"})
    rp = {**BASE, "scoring_func": "sigmoid",
          "rope_parameters": {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 40.0}}
    cfg, notes = LC.fix_config(rp)
    assert cfg["rope_theta"] == 10000.0 and cfg["rope_scaling"]["type"] == "yarn" and cfg["rope_scaling"]["factor"] == 40.0
    qwen = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_hidden_layers": 27}
    assert LC.fix_config(qwen) == (qwen, [])  # converted as it is: no DeepSeek fix, no Lite layer count


def test_stage_and_convert_cmd(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps(BASE))
    (ck / "tokenizer.json").write_text("{}")
    (ck / "model-00001-of-00001.safetensors").write_bytes(b"x")
    (ck / "model.safetensors.index.json").write_text("{}")
    staged, notes = LC.stage(ck, tmp_path / "staged")
    assert json.loads((staged / "config.json").read_text())["scoring_func"] == "sigmoid"
    assert json.loads((ck / "config.json").read_text()) == BASE  # the checkpoint is left alone
    assert (staged / "model-00001-of-00001.safetensors").is_symlink()
    assert (staged / "tokenizer.json").read_text() == "{}"
    LC.stage(ck, tmp_path / "staged")  # again: replaces its links
    (ck / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        LC.stage(ck, tmp_path / "staged2")

    cmd = LC.convert_cmd(Path("/l"), staged, tmp_path / "o.gguf", "q8_0", python="py")
    assert cmd[0] == "py" and cmd[1].endswith("_convert_entry.py") and cmd[2:4] == ["/l", str(staged)]
    assert cmd[4:] == ["--outfile", str(tmp_path / "o.gguf"), "--outtype", "q8_0"]
    with pytest.raises(ValueError, match="outtype"):
        LC.convert_cmd(Path("/l"), staged, tmp_path / "o.gguf", "q4_k")
    assert LC.convert_env(Path("/l"))["PYTHONPATH"].split(os.pathsep)[:2] == ["/l/gguf-py", "/l"]
    assert LC.gguf_path(tmp_path, "bench-v3-mid", "bf16") == tmp_path / "gguf" / "bench-v3-mid-bf16.gguf"
    fp = LC.fingerprint(ck)
    assert LC.gguf_path(tmp_path, "m", "q8_0", ck) == tmp_path / "gguf" / f"m-{fp}-q8_0.gguf"
    (ck / "model-00001-of-00001.safetensors").write_bytes(b"xy")  # other weights: another GGUF
    assert LC.fingerprint(ck) != fp
    with pytest.raises(FileNotFoundError, match="no llama.cpp source"):
        LC.ensure_gguf(tmp_path, None, ck, "m", "q8_0")


def test_peer_quick_without_llamacpp(tmp_path):
    """--quick with an empty llama.cpp cache: the jaxmoe side runs on the tiny model, the peer
    is recorded as skipped with its reason, ratios are None."""
    out = tmp_path / "peer.json"
    results = ROOT / "benchmarks" / "results" / "peer_llamacpp.json"
    before = results.read_bytes() if results.exists() else None
    env = {**os.environ, "JAXMOE_LLAMACPP_CACHE": str(tmp_path / "llamacpp"), "JAXMOE_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.peer_llamacpp", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert set(doc) == {"metrics", "env", "details"}
    m = doc["metrics"]
    for k in ("jaxmoe_decode_tok_s", "jaxmoe_prefill64_tok_s", "read_gb_s"):
        assert isinstance(m[k], (int, float)) and math.isfinite(m[k]) and m[k] > 0, (k, m[k])
    for t in ("q8_0", "bf16"):
        for k in (f"llamacpp_{t}_decode_tok_s", f"ratio_decode_vs_{t}", f"ratio_prefill64_vs_{t}"):
            assert k in m and m[k] is None
    assert "building is off" in m["peer_skipped"] and m["threads"] == 2
    d = doc["details"]
    assert d["model"] == "tiny" and d["rounds"] == 1 and len(d["per_round"]) == 1
    assert d["per_round"][0]["order"] == ["jaxmoe", "llama.cpp"] and "llama.cpp" not in d["per_round"][0]
    assert d["targets"]["ratio_decode_vs_q8_0"]["met"] is None
    assert d["llama_bench_workaround"] is None and d["llama_bench"]["workaround_by_type"] == {}
    assert doc["env"]["quick"] is True
    assert not (tmp_path / "llamacpp").exists() or not any((tmp_path / "llamacpp").rglob("*.tar.gz"))
    assert results.exists() is (before is not None) and (before is None or results.read_bytes() == before)
