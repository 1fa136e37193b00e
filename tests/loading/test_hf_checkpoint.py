"""Interop with Hugging Face transformers: its checkpoints load with jaxmoe, and ours load with it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxmoe.loading import hf_map
from jaxmoe.loading.loader import load_checkpoint
from jaxmoe.loading.synthetic import synthetic_tensors, write_synthetic_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_save_pretrained_checkpoint_loads(tmp_path, tiny_cfg):
    """DeepseekV3ForCausalLM.save_pretrained: f32, per-expert keys, transformers 5.x config spelling."""
    from safetensors.numpy import load_file

    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**tiny_cfg.to_hf_dict()))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in config and "rope_scaling" not in config and config["dtype"] == "float32"
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in saved

    cfg, w = load_checkpoint(tmp_path)
    assert cfg == tiny_cfg.replace(dtype="float32")
    for name, spec in hf_map.expected_tensors(cfg).items():
        node = hf_map.lookup(w, spec)
        got = node.weight if spec.kind == "linear" else node
        assert got.dtype == np.float32, name
        np.testing.assert_array_equal(np.asarray(got), saved[name], err_msg=name)


def test_transformers_runs_our_checkpoint(tmp_path, tiny_cfg):
    """Our f32 checkpoint loads into transformers with no key left over, and the random init is
    numerically sane: hidden states O(1) through the layers, greedy decoding varied."""
    path = write_synthetic_checkpoint(tmp_path / "ck", tiny_cfg, fmt="f32")
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref = synthetic_tensors(tiny_cfg, fmt="f32")["model.layers.1.mlp.experts.3.up_proj.weight"]
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj.detach().numpy()  # [E, 2I, H], fused at load
    np.testing.assert_array_equal(gate_up[3, tiny_cfg.moe_intermediate_size :], ref)

    prompt = torch.tensor([[0, 17, 301, 44, 92, 260, 5, 411]])
    with torch.no_grad():
        hidden = model(prompt, output_hidden_states=True).hidden_states
        out = model.generate(prompt, max_new_tokens=24, do_sample=False)
    stds = [float(h.std()) for h in hidden]
    assert all(0.3 < s < 5 for s in stds), stds
    new = out[0, prompt.shape[1]:].tolist()
    assert len(set(new)) >= 10, new
