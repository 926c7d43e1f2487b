"""convert_model.py: bit-exact round trips, strictness, CLI behaviour."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from ppllm import convert as cm
from tests.helpers import PY, run


def hf_model(path, tied=False, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, **kw)
    m = LlamaForCausalLM(cfg)
    return m


def save_bin(folder, model, shards=1):
    """pytorch_model.bin, or pytorch_model-0000i-of-0000n.bin + index, as older checkpoints ship."""
    os.makedirs(folder, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    if shards == 1:
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
        return
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def state_of(folder):
    out = {}
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    for name in files:
        out.update(load_file(os.path.join(folder, name)))
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded_safetensors", "sharded_bin"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_round_trip_bit_exact(tmp_path, fmt, tied):
    m = hf_model(tmp_path, tied=tied)
    src = tmp_path / "src"
    if fmt.endswith("bin"):  # transformers 5 only writes safetensors: write the legacy layout by hand
        save_bin(src, m, shards=3 if fmt.startswith("sharded") else 1)
    else:
        m.save_pretrained(src, max_shard_size="20KB" if fmt.startswith("sharded") else "50GB")
    cm.hg_to_pp(str(src), str(tmp_path / "pp"), quiet=True)
    cm.pp_to_hg(str(tmp_path / "pp"), str(tmp_path / "back"), quiet=True, max_shard_bytes=30_000)
    cm.hg_to_pp(str(tmp_path / "back"), str(tmp_path / "pp2"), quiet=True)
    ref = {k: v for k, v in m.state_dict().items() if not (tied and k == "lm_head.weight")}
    back = state_of(tmp_path / "back")
    assert set(back) == set(ref)
    for k, v in ref.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # pipeline -> HF -> pipeline is also identical, file by file
    for name in sorted(os.listdir(tmp_path / "pp")):
        if name.startswith("layer_"):
            a = torch.load(tmp_path / "pp" / name, weights_only=True)
            b = torch.load(tmp_path / "pp2" / name, weights_only=True)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert len([n for n in os.listdir(tmp_path / "back") if n.endswith(".safetensors")]) > 1
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "back")
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, m.eval()(ids).logits)


def test_dtype_cast_and_side_files(tmp_path):
    m = hf_model(tmp_path)
    m.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    cm.hg_to_pp(str(tmp_path / "src"), str(tmp_path / "pp"), dtype="bf16", quiet=True)
    t = torch.load(tmp_path / "pp" / "layer_01-model_states.pt", weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "ppllm.json"):
        assert (tmp_path / "pp" / name).exists(), name
    meta = json.loads((tmp_path / "pp" / "ppllm.json").read_text())
    assert meta["num_pipe_layers"] == 6 and meta["family"] == "llama"


def write_state(folder, state, cfg):
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
    cfg.save_pretrained(folder)


def test_strict_errors_list_every_problem(tmp_path):
    m = hf_model(tmp_path)
    state = dict(m.state_dict())
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(5, 32)
    state["model.extra.weight"] = torch.zeros(2)
    write_state(tmp_path / "bad", state, m.config)
    with pytest.raises(cm.ConversionError) as e:
        cm.hg_to_pp(str(tmp_path / "bad"), str(tmp_path / "pp"), quiet=True)
    msg = str(e.value)
    assert "missing key 'model.layers.1.mlp.up_proj.weight'" in msg
    assert "model.layers.0.self_attn.q_proj.weight: shape [5, 32]" in msg
    assert "unexpected key 'model.extra.weight'" in msg
    assert not (tmp_path / "pp").exists(), "a failed conversion must not leave a partial folder"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".convert-")]


def test_unknown_model_type_and_non_empty_output(tmp_path):
    m = hf_model(tmp_path)
    m.save_pretrained(tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["model_type"] = "gpt_neox_unknown"
    os.makedirs(tmp_path / "weird")
    (tmp_path / "weird" / "config.json").write_text(json.dumps(cfg))
    p = run([PY, "convert_model.py", "hg_to_pp", "--input-path", str(tmp_path / "weird"),
             "--save-path", str(tmp_path / "o")], check=False)
    assert p.returncode == 2 and "unknown model_type 'gpt_neox_unknown'" in p.stderr
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "keep.txt").write_text("precious")
    args = [PY, "convert_model.py", "hg_to_pp", "--input-path", str(tmp_path / "src"), "--save-path",
            str(tmp_path / "full"), "--quiet"]
    p = run(args, check=False)
    assert p.returncode == 2 and "--force" in p.stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"
    run(args + ["--force"])
    assert (tmp_path / "full" / "layer_00-model_states.pt").exists()


def test_pp_to_hg_reports_missing_layer_files(tmp_path):
    m = hf_model(tmp_path)
    m.save_pretrained(tmp_path / "src")
    cm.hg_to_pp(str(tmp_path / "src"), str(tmp_path / "pp"), quiet=True)
    os.remove(tmp_path / "pp" / "layer_02-model_states.pt")
    os.remove(tmp_path / "pp" / "layer_05-model_states.pt")
    with pytest.raises(cm.ConversionError) as e:
        cm.pp_to_hg(str(tmp_path / "pp"), str(tmp_path / "out"), quiet=True)
    assert "layer_02-model_states.pt" in str(e.value) and "layer_05-model_states.pt" in str(e.value)
