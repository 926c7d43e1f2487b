"""Each non-llama family trains at pipe=2 on 2 CPU ranks from a checkpoint in its own file layout,
memorises a few texts, and after pp_to_hg its reference implementation scores exactly the
evaluation loss logged in metrics.jsonl.

For bloom that loss is computed on the last stage with ITS copy of the tied embedding, while the
export holds the first stage's copy: equal losses after 30 steps show the two copies stayed equal
(the tied gradient is reduced between the stages)."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import GlmConfig, GlmForCausalLM, LlamaConfig, LlamaForCausalLM

from ppllm.config import load_config
from ppllm.tiny import sample_texts, train_sentencepiece
from tests.helpers import PY, REPO, launch, read_metrics, run
from tests.test_families import baichuan_checkpoint, chatglm_checkpoint

pytestmark = pytest.mark.multiprocess  # DeepSpeed launches: not in make test-fast

V = 400  # a 384-piece SentencePiece model plus chatglm3's 9 special tokens
TEXTS = ["The lighthouse keeper counted the ships every evening.",
         "Maria planted tomatoes, beans and basil behind the kitchen.",
         "The train to the coast leaves at nine and arrives before noon.",
         "Every winter the lake freezes and children skate across it."]


def load_bins(folder) -> dict:
    with open(os.path.join(folder, "pytorch_model.bin.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    state = {}
    for name in files:
        state.update(torch.load(os.path.join(folder, name), weights_only=True))
    return state


def baichuan_reference(folder):
    sd = load_bins(folder)
    cfg = json.loads(open(os.path.join(folder, "config.json")).read())
    model = LlamaForCausalLM(LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                                         intermediate_size=cfg["intermediate_size"],
                                         num_hidden_layers=cfg["num_hidden_layers"],
                                         num_attention_heads=cfg["num_attention_heads"], rms_norm_eps=1e-6,
                                         tie_word_embeddings=False))
    out = {}
    for k, v in sd.items():
        if k.endswith("W_pack.weight"):
            for n, part in zip("qkv", v.chunk(3, 0)):
                out[k.replace("W_pack", f"{n}_proj")] = part
        elif k == "lm_head.weight":
            out[k] = F.normalize(v, dim=-1)
        else:
            out[k] = v
    model.load_state_dict(out)
    return model.eval()


def chatglm_reference(folder):
    sd = load_bins(folder)
    cfg = json.loads(open(os.path.join(folder, "config.json")).read())
    N, hd, g = cfg["num_attention_heads"], cfg["kv_channels"], cfg["multi_query_group_num"]
    model = GlmForCausalLM(GlmConfig(vocab_size=cfg["padded_vocab_size"], hidden_size=cfg["hidden_size"],
                                     intermediate_size=cfg["ffn_hidden_size"], num_hidden_layers=cfg["num_layers"],
                                     num_attention_heads=N, num_key_value_heads=g, head_dim=hd, attention_bias=True,
                                     rms_norm_eps=cfg["layernorm_epsilon"], pad_token_id=0, eos_token_id=2,
                                     bos_token_id=1,
                                     rope_parameters={"rope_type": "default",
                                                      "rope_theta": 10000.0 * cfg.get("rope_ratio", 1.0),
                                                      "partial_rotary_factor": 0.5}))
    out = {"model.embed_tokens.weight": sd["transformer.embedding.word_embeddings.weight"],
           "model.norm.weight": sd["transformer.encoder.final_layernorm.weight"],
           "lm_head.weight": sd["transformer.output_layer.weight"]}
    for i in range(cfg["num_layers"]):
        p, q = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            parts = sd[f"{q}self_attention.query_key_value.{kind}"].split([N * hd, g * hd, g * hd], 0)
            for n, part in zip("qkv", parts):
                out[f"{p}self_attn.{n}_proj.{kind}"] = part
        out[f"{p}self_attn.o_proj.weight"] = sd[f"{q}self_attention.dense.weight"]
        out[f"{p}mlp.gate_up_proj.weight"] = sd[f"{q}mlp.dense_h_to_4h.weight"]
        out[f"{p}mlp.down_proj.weight"] = sd[f"{q}mlp.dense_4h_to_h.weight"]
        out[f"{p}input_layernorm.weight"] = sd[f"{q}input_layernorm.weight"]
        out[f"{p}post_attention_layernorm.weight"] = sd[f"{q}post_attention_layernorm.weight"]
    model.load_state_dict(out)
    return model.eval()


def bloom_reference(folder):
    from transformers import BloomForCausalLM
    model = BloomForCausalLM.from_pretrained(folder).eval()
    # the export stores the tied matrix once; the reference's head is that same matrix
    assert model.lm_head.weight.data_ptr() == model.transformer.word_embeddings.weight.data_ptr()
    return model


def bloom_source(folder, vocab):
    from tests.test_bloom import bloom_checkpoint
    return bloom_checkpoint(folder, vocab=vocab)


FAMILIES = {"bloom": (bloom_source, bloom_reference),
            "baichuan2": (baichuan_checkpoint, baichuan_reference),
            "chatglm3": (chatglm_checkpoint, chatglm_reference)}


def reference_loss(model, cfg_path) -> float:
    from ppllm.feed import load_data
    cfg = load_config(str(cfg_path))
    _, rows, _ = load_data(cfg, json.load(open(os.path.join(cfg.run.model_path, "config.json")))["model_type"])
    ids = torch.as_tensor(rows["input_ids"][:])
    labels = torch.as_tensor(rows["labels"][:])
    with torch.no_grad():
        logits = model(ids).logits.float()
    return (F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            / (labels != -100).sum()).item()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_at_pipe2_and_exports(tmp_path, family):
    make_checkpoint, make_reference = FAMILIES[family]
    tok = train_sentencepiece(sample_texts(f"{REPO}/data/samples/demo.json"), str(tmp_path / "tok"))
    make_checkpoint(tmp_path / "src", vocab=V)
    shutil.copy2(os.path.join(tok, "tokenizer.model"), tmp_path / "src" / "tokenizer.model")
    run([PY, "convert_model.py", "hg_to_pp", "--input-path", str(tmp_path / "src"), "--save-path",
         str(tmp_path / "pp"), "--quiet"])
    data = tmp_path / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"type": "pretrain", "text": t}) for t in TEXTS))
    cfg = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
           "model_path": str(tmp_path / "pp"), "save_path": str(tmp_path / "run"), "data_path": str(data),
           "eval_data_path": str(data), "eval_interval": 30, "template": "plain", "max_seq_len": 48,
           "packing": False, "max_steps": 30, "n_epoches": 1000, "precision": "fp32",
           "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}},
           "lr_schedule": {"type": "constant"}}
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    launch(["train_pp.py", "--config", str(path)], 2)
    m = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert m[-1]["loss"] < 0.3 * m[0]["loss"], (m[0]["loss"], m[-1]["loss"])
    run([PY, "convert_model.py", "pp_to_hg", "--input-path", str(tmp_path / "run"), "--save-path",
         str(tmp_path / "out"), "--quiet"])
    ref = make_reference(tmp_path / "out")
    torch.testing.assert_close(reference_loss(ref, path), m[-1]["eval_loss"], rtol=0, atol=1e-4)
    assert abs(m[-1]["eval_loss"] - m[-1]["loss"]) < 0.05 + 0.5 * m[-1]["loss"]
