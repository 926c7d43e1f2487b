"""LoRA in pipeline mode: only adapters train, exports (merged and PEFT) agree, resume works."""
import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from models import get_family
from ppllm.pipeline import SequentialModel
from ppllm.lora import LoraConfig, LoRALinear, apply_lora, merge_into, trainable_fraction
from tests.helpers import PY, launch, read_metrics, run, tiny_pipeline_model

TEXTS = [f"Line {i}: the baker shapes the first loaves while the street is still dark." for i in range(8)]
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def test_apply_lora_starts_as_identity_and_freezes_base():
    fam = get_family("llama")
    margs = fam.parse_config(dict(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model = SequentialModel(fam.build_specs(margs))
    x = (torch.randint(0, 50, (1, 8)), torch.arange(8)[None], torch.zeros(1, 8, dtype=torch.long))
    before = model(x).detach()
    n = apply_lora(model, LoraConfig(**LORA))
    assert n == 6 and isinstance(model.layers[1].self_attn.q_proj, LoRALinear)
    assert torch.equal(model(x), before)  # B starts at zero
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in k for k in trainable)
    assert "layers.1.self_attn.q_proj.weight" in dict(model.named_parameters())  # base names unchanged
    assert 0 < trainable_fraction(fam, margs, LoraConfig(**LORA)) < 0.2


def test_merge_math():
    w, a, b = torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 2)
    out = merge_into({"q.weight": w.clone()}, {"q.lora_A.weight": a, "q.lora_B.weight": b}, 4.0)
    assert torch.allclose(out["q.weight"], w + 4.0 * b @ a)


@pytest.mark.timeout(600)
@pytest.mark.multiprocess
def test_pipe2_lora_train_export_peft_and_resume(tmp_path):
    from peft import PeftModel
    pp, data = tiny_pipeline_model(tmp_path, TEXTS)
    cfg = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
           "model_path": str(pp), "save_path": str(tmp_path / "run"), "data_path": str(data),
           "max_seq_len": 48, "max_steps": 12, "n_epoches": 100, "template": "plain", "precision": "fp32",
           "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "lora": LORA,
           "optimizer": {"type": "AdamW", "params": {"lr": 5e-2, "weight_decay": 0.0}},
           "lr_schedule": {"type": "constant"}}
    path = tmp_path / "lora.yml"
    path.write_text(yaml.safe_dump(cfg))
    p = launch(["train_pp.py", "--config", str(path)], 2)
    assert "lora: r=4" in p.stdout
    m = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert m[-1]["loss"] < m[0]["loss"] - 0.2, (m[0]["loss"], m[-1]["loss"])  # random frozen base: slow but steady
    tag = tmp_path / "run" / "global_step12"
    meta = json.loads((tag / "ppllm_lora.json").read_text())
    assert meta["base_model_path"] == str(pp) and meta["lora"]["r"] == 4
    adapters = {}
    for name in sorted(os.listdir(tag)):
        if name.startswith("layer_"):
            state = torch.load(tag / name, weights_only=True)
            assert all(".lora_" in k for k in state), (name, list(state))  # only adapters are saved
            adapters[int(name[6:8])] = state
    # optimizer state holds only the adapters
    for name in os.listdir(tag):
        if name.startswith("mp_rank_"):
            osd = torch.load(tag / name, weights_only=False)["optimizer"]
            n_state = sum(p.numel() for st in osd["state"].values() for k, p in st.items() if k == "exp_avg")
            stage_lora = sum(t.numel() for st in adapters.values() for t in st.values())
            assert 0 < n_state <= stage_lora

    run([PY, "convert_model.py", "pp_to_hg", "--input-path", str(tmp_path / "run"), "--save-path",
         str(tmp_path / "merged"), "--merge-lora", "--quiet"])
    run([PY, "convert_model.py", "pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "base")])
    run([PY, "convert_model.py", "pp_to_hg", "--input-path", str(tmp_path / "run"), "--save-path",
         str(tmp_path / "adapter"), "--lora-only"])
    merged = load_file(next(str(tmp_path / "merged" / f) for f in os.listdir(tmp_path / "merged")
                            if f.endswith(".safetensors")))
    base = load_file(next(str(tmp_path / "base" / f) for f in os.listdir(tmp_path / "base")
                          if f.endswith(".safetensors")))
    scaling = LORA["alpha"] / LORA["r"]
    changed = 0
    for key, w in base.items():
        module = key.rsplit(".", 2)[-2] if key.endswith(".weight") else None
        if module in LORA["target_modules"]:
            i = int(key.split(".")[2])
            local = key.split(f"layers.{i}.", 1)[1][: -len(".weight")]
            a, b = adapters[i + 1][f"{local}.lora_A.weight"], adapters[i + 1][f"{local}.lora_B.weight"]
            assert torch.allclose(merged[key], w + scaling * b @ a, atol=1e-6), key
            changed += int(not torch.equal(merged[key], w))
        else:
            assert torch.equal(merged[key], w), key  # frozen weights are untouched
    assert changed == 6

    cfg_a = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg_a["r"] == 4 and sorted(cfg_a["target_modules"]) == sorted(LORA["target_modules"])
    model_m = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    model_p = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                        tmp_path / "adapter").eval()
    ids = torch.randint(3, 300, (2, 20))
    with torch.no_grad():
        logits_m = model_m(ids).logits
        assert (logits_m - model_p(ids).logits).abs().max() < 1e-5

    # the adapter names a base transformers can load: the HF export written beside it by default ...
    from peft import AutoPeftModelForCausalLM
    assert cfg_a["base_model_name_or_path"] == str((tmp_path / "adapter" / "base").resolve())
    with torch.no_grad():
        model_a = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
        torch.testing.assert_close(model_a(ids).logits, logits_m, atol=1e-5, rtol=1e-5)
    # ... or the one named with --base-hf (not written again)
    run([PY, "convert_model.py", "pp_to_hg", "--input-path", str(tmp_path / "run"), "--save-path",
         str(tmp_path / "adapter2"), "--lora-only", "--base-hf", str(tmp_path / "base")])
    cfg_b = json.loads((tmp_path / "adapter2" / "adapter_config.json").read_text())
    assert cfg_b["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert not (tmp_path / "adapter2" / "base").exists()
    with torch.no_grad():
        model_b = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter2").eval()
        torch.testing.assert_close(model_b(ids).logits, logits_m, atol=1e-5, rtol=1e-5)
    # a --base-hf of another model is refused, naming the base it should be
    from ppllm.tiny import make_llama
    make_llama(str(tmp_path / "other"), 300, num_hidden_layers=3)
    p = run([PY, "convert_model.py", "pp_to_hg", "--input-path", str(tmp_path / "run"), "--save-path",
             str(tmp_path / "adapter3"), "--lora-only", "--base-hf", str(tmp_path / "other")], check=False)
    assert p.returncode == 2 and "is not the adapter's base model" in p.stderr and str(pp) in p.stderr

    # resume: continue the adapter run to step 16
    p = launch(["train_pp.py", "--config", str(path), "--set", "max_steps=16"], 2)
    assert "resumed from" in p.stdout and "step 16/16" in p.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 17))


def test_plan_shows_lora_optimizer_saving(tmp_path):
    from ppllm import convert as cm
    from ppllm.tiny import make_llama
    make_llama(str(tmp_path / "hf"), 300, num_hidden_layers=4)
    cm.hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), quiet=True)
    base = ["--config", "configs/demo.yml", "--plan", "--set", f"model_path={tmp_path}/pp"]
    full = run([PY, "train_pp.py"] + base).stdout
    lora = run([PY, "train_pp.py"] + base + ["--set", "lora={r: 4, target_modules: [q_proj, v_proj]}"]).stdout

    def optim_col(text):
        rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
        return sum(float(r[5]) for r in rows[:2])
    assert " lora" in lora and optim_col(lora) < optim_col(full) / 5


TINY_CONFIGS = {
    "bloom": ({"model_type": "bloom", "vocab_size": 50, "hidden_size": 32, "n_layer": 2, "n_head": 4},
              ["query_key_value", "dense_4h_to_h"]),
    "chatglm": ({"model_type": "chatglm", "padded_vocab_size": 50, "hidden_size": 32, "ffn_hidden_size": 48,
                 "num_layers": 2, "num_attention_heads": 4, "kv_channels": 8, "multi_query_attention": True,
                 "multi_query_group_num": 2, "add_qkv_bias": True, "layernorm_epsilon": 1e-5},
                ["query_key_value", "dense"]),
    "baichuan": ({"model_type": "baichuan", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "rms_norm_eps": 1e-6}, ["W_pack", "o_proj"]),
}


@pytest.mark.parametrize("model_type", list(TINY_CONFIGS))
def test_lora_targets_each_familys_own_module_names(model_type):
    cfg, targets = TINY_CONFIGS[model_type]
    fam = get_family(model_type)
    margs = fam.parse_config(cfg)
    model = SequentialModel(fam.build_specs(margs))
    x = (torch.randint(0, 50, (1, 8)), torch.arange(8)[None], torch.zeros(1, 8, dtype=torch.long))
    before = model(x).detach()
    lcfg = LoraConfig(r=2, alpha=4.0, dropout=0.0, target_modules=targets)
    assert apply_lora(model, lcfg) == 2 * len(targets)
    assert torch.equal(model(x), before)
    with torch.no_grad():  # a non-zero B changes the output: the adapters are really in the forward
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_()
    assert not torch.allclose(model(x), before)
