"""Conversion by byte ranges (ppllm/tensor_io.py): the layer files it writes are torch's format
(torch.load with and without mmap, weights_only, DeepSpeed's checkpoint engine), its readers
find every tensor's bytes, unusual files fall back to torch, and a conversion imports neither
DeepSpeed nor the training stack."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ppllm import tensor_io as tio
from tests.helpers import REPO


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(5, 7, generator=g).to(torch.bfloat16), "ids": torch.arange(11),
            "f32": torch.randn(64, 3, generator=g), "half": torch.randn(9, generator=g).half(),
            "empty": torch.ones(0), "flag": torch.tensor([True, False])}


def assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_layer_file_round_trip_through_every_reader(tmp_path):
    src = sample_tensors()
    save_file(src, tmp_path / "s.safetensors")
    index = tio.safetensors_index(str(tmp_path / "s.safetensors"))
    assert all(isinstance(p, tio.Stored) for p in index.values())
    extra = torch.full((3,), 2.5)
    path = str(tmp_path / "layer_00-model_states.pt")
    tio.write_torch_state(path, list(index.items()) + [("extra", extra), ("cast", tio.Lazy(
        torch.float32, (5, 7), lambda: index["w"].load().float()))])
    want = dict(src, extra=extra, cast=src["w"].float())
    for mmap in (False, True):
        assert_same(torch.load(path, weights_only=True, mmap=mmap), want)
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    assert_same(TorchCheckpointEngine().load(path, map_location="cpu"), want)
    # storages start at 64-byte boundaries, as torch writes them (mmap needs aligned tensors)
    back = tio.torch_zip_index(path)
    assert all(p.offset % 64 == 0 for p in back.values())
    tio.write_safetensors(str(tmp_path / "o.safetensors"), list(back.items()))
    assert_same(load_file(tmp_path / "o.safetensors"), want)


def test_torch_written_files_are_indexed_or_left_to_torch(tmp_path):
    plain = {"a": torch.randn(4, 4), "b": torch.arange(3)}
    torch.save(plain, tmp_path / "plain.pt")
    index = tio.torch_zip_index(str(tmp_path / "plain.pt"))
    assert_same({k: p.load() for k, p in index.items()}, plain)
    torch.save({"view": torch.randn(8)[2:5]}, tmp_path / "view.pt")  # shares a larger storage
    assert tio.torch_zip_index(str(tmp_path / "view.pt")) is None
    torch.save({"nested": {"a": torch.ones(2)}}, tmp_path / "nested.pt")
    assert tio.torch_zip_index(str(tmp_path / "nested.pt")) is None
    torch.save(plain, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert tio.torch_zip_index(str(tmp_path / "legacy.pt")) is None


def test_legacy_bin_checkpoint_still_converts(tmp_path):
    from ppllm import convert as cm
    from ppllm.tiny import make_llama
    hf = make_llama(str(tmp_path / "hf"), 64, num_hidden_layers=2, hidden_size=32, intermediate_size=48)
    state = load_file(os.path.join(hf, "model.safetensors"))
    os.remove(os.path.join(hf, "model.safetensors"))
    torch.save(state, os.path.join(hf, "pytorch_model.bin"), _use_new_zipfile_serialization=False)
    cm.hg_to_pp(hf, str(tmp_path / "pp"), quiet=True)
    cm.pp_to_hg(str(tmp_path / "pp"), str(tmp_path / "back"), quiet=True)
    with open(tmp_path / "back" / "model.safetensors.index.json") as f:
        files = set(json.load(f)["weight_map"].values())
    back = {}
    for name in files:
        back.update(load_file(tmp_path / "back" / name))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


CONVERT_ONLY = """
import sys
from ppllm import convert
convert.hg_to_pp(sys.argv[1] + "/hf", sys.argv[1] + "/pp", quiet=True)
convert.pp_to_hg(sys.argv[1] + "/pp", sys.argv[1] + "/back", quiet=True)
heavy = [m for m in ("deepspeed", "ppllm.engine", "ppllm.train", "ppllm.lora", "pydantic") if m in sys.modules]
print("HEAVY", heavy)
"""


@pytest.mark.timeout(120)
def test_conversion_imports_no_deepspeed(tmp_path):
    from ppllm.tiny import make_llama
    make_llama(str(tmp_path / "hf"), 64, num_hidden_layers=2, hidden_size=32, intermediate_size=48)
    p = subprocess.run([sys.executable, "-c", CONVERT_ONLY, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       timeout=110)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "HEAVY []" in p.stdout, p.stdout
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()


BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            rms_norm_eps=1e-5)


@pytest.mark.parametrize("cfg", [
    dict(BASE, model_type="llama"),
    dict(BASE, model_type="llama", num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, rope_theta=5e5,
         attention_bias=True, mlp_bias=True, initializer_range=0.01),
    dict(BASE, model_type="mistral", num_key_value_heads=2, sliding_window=16),
    dict(BASE, model_type="mistral", sliding_window=None),
    dict(BASE, model_type="qwen2", num_key_value_heads=2, use_sliding_window=True, sliding_window=8),
    dict(BASE, model_type="qwen2", num_key_value_heads=4, use_sliding_window=False, rope_theta=1e6),
    dict(BASE, model_type="qwen2", use_sliding_window=False),  # kv heads left to qwen2's default
])
def test_plain_config_reading_equals_transformers(cfg):
    """The converter reads a complete config.json without transformers; it must agree with it."""
    from dataclasses import fields

    from models import get_family
    fam = get_family(cfg["model_type"])
    plain, ref = fam.parse_config(cfg), fam.parse_with_transformers(cfg)
    defaults_needed = cfg["model_type"] != "llama" and "num_key_value_heads" not in cfg
    assert (plain.hf_config is None) != defaults_needed and ref.hf_config is not None
    for f in fields(plain):
        if f.name != "hf_config":
            assert getattr(plain, f.name) == getattr(ref, f.name), f.name
    torch.testing.assert_close(plain.make_rope().inv_freq, ref.make_rope().inv_freq, rtol=0, atol=0)
    scaled = dict(cfg, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert fam.parse_config(scaled).hf_config is not None  # anything but the default rope: transformers
