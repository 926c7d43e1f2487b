"""baichuan2 and chatglm3: parity with their transformers references, round trips in the original
file layout, packed rows, and real sizes on the meta device."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import GlmConfig, GlmForCausalLM, LlamaConfig, LlamaForCausalLM

from ppllm import convert as cm
from models import get_family, load_family
from ppllm.pipeline import SequentialModel
from tests.helpers import SHARED_ASSETS

V = 150


def save_bin_checkpoint(folder, state: dict, config: dict, shards: int = 1, extra_files: dict | None = None):
    """The original releases' layout: pytorch_model.bin, or pytorch_model-0000i-of-0000n.bin + index."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    for name, text in (extra_files or {}).items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    if shards == 1:
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
        return
    keys, weight_map = list(state), {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k].clone() for k in keys[i::shards]}
        torch.save(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def nontrivial_norms(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))


def ours(folder):
    fam, args = load_family(folder)
    model = SequentialModel(fam.build_specs(args))
    model.load_layer_files(folder)
    return fam, args, model.eval()


def inputs(B=2, S=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S), generator=g)
    return ids, torch.arange(S).expand(B, S), torch.zeros(B, S, dtype=torch.long)


def shifted(ids):
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


def assert_parity(ref, fam, args, model, S=24, what=""):
    """fp32 logits within 1e-5 of the reference, and the family's loss equals the reference's."""
    ids, pos, doc = inputs(S=S)
    with torch.no_grad():
        r = ref(ids, labels=ids)
        out = model((ids, pos, doc))
    torch.testing.assert_close(out, r.logits, rtol=0, atol=1e-5, msg=lambda m: f"{what}: {m}")
    torch.testing.assert_close(fam.loss_fn(args)(out, shifted(ids)).item(), r.loss.item(), rtol=0, atol=1e-5,
                               msg=lambda m: f"{what}: {m}")
    return ids, r


def packed_matches_alone(model, ref_fn):
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, V, (1, 9), generator=g), torch.randint(0, V, (1, 14), generator=g)
    pos = torch.cat([torch.arange(9), torch.arange(14)])[None]
    doc = torch.cat([torch.zeros(9), torch.ones(14)]).long()[None]
    with torch.no_grad():
        out = model((torch.cat([a, b], 1), pos, doc))
        ra, rb = ref_fn(a), ref_fn(b)
    torch.testing.assert_close(out[:, :9], ra, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, 9:], rb, rtol=0, atol=1e-5)


def assert_same_files(src_state: dict, folder, index_name: str):
    with open(os.path.join(folder, index_name)) as f:
        files = set(json.load(f)["weight_map"].values())
    back = {}
    for name in files:
        assert name.endswith(".bin")
        back.update(torch.load(os.path.join(folder, name), weights_only=True))
    assert set(back) == set(src_state)
    for k, v in src_state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


# ---------------------------------------------------------------------------------------- baichuan2

def baichuan_checkpoint(folder, z_loss_weight=0.0, vocab=V, extra_files=None):
    V = vocab
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0,
                                       tie_word_embeddings=False)).eval()
    nontrivial_norms(ref)
    raw_head = torch.randn(V, 64) * 3  # rows of very different norms: the head must normalise them
    state = {}
    for k, v in ref.state_dict().items():
        if ".self_attn.q_proj." in k:
            pre = k.split(".self_attn.")[0]
            sd = ref.state_dict()
            state[f"{pre}.self_attn.W_pack.weight"] = torch.cat(
                [sd[f"{pre}.self_attn.{n}_proj.weight"] for n in "qkv"], 0)
        elif ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
            continue
        elif k == "lm_head.weight":
            state[k] = raw_head
        else:
            state[k] = v
    with torch.no_grad():
        ref.lm_head.weight.copy_(F.normalize(raw_head, dim=-1))
    config = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "vocab_size": V,
              "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "z_loss_weight": z_loss_weight,
              "auto_map": {"AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}}
    save_bin_checkpoint(folder, state, config, extra_files={"modeling_baichuan.py": "# remote code\n",
                                                            **(extra_files or {})})
    return ref, state


def test_baichuan2_parity_roundtrip_and_packing(tmp_path):
    ref, state = baichuan_checkpoint(tmp_path / "src")
    cm.hg_to_pp(str(tmp_path / "src"), str(tmp_path / "pp"), quiet=True)
    fam, args, model = ours(str(tmp_path / "pp"))
    assert_parity(ref, fam, args, model)
    packed_matches_alone(model, lambda x: ref(x).logits)
    # the stored head stays raw: an export behaves identically in the original code
    head = torch.load(tmp_path / "pp" / "layer_04-model_states.pt", weights_only=True)["weight"]
    assert torch.equal(head, state["lm_head.weight"])
    cm.pp_to_hg(str(tmp_path / "pp"), str(tmp_path / "back"), quiet=True, max_shard_bytes=40_000)
    assert_same_files(state, tmp_path / "back", "pytorch_model.bin.index.json")
    assert (tmp_path / "back" / "modeling_baichuan.py").exists()
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "baichuan"


def test_baichuan2_z_loss(tmp_path):
    ref, _ = baichuan_checkpoint(tmp_path / "src", z_loss_weight=0.5)
    cm.hg_to_pp(str(tmp_path / "src"), str(tmp_path / "pp"), quiet=True)
    fam, args, model = ours(str(tmp_path / "pp"))
    ids, pos, doc = inputs()
    with torch.no_grad():
        logits = ref(ids).logits
        out = model((ids, pos, doc))
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    z = (logits[:, :-1].max(-1).values ** 2).mean()
    torch.testing.assert_close(fam.loss_fn(args)(out, shifted(ids)).item(), (ce + 0.5 * z).item(), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------- chatglm3

def chatglm_checkpoint(folder, rope_ratio=1.0, groups=2, vocab=V, extra_files=None):
    V = vocab
    torch.manual_seed(0)
    N, hd, H, I = 4, 16, 64, 96
    ref = GlmForCausalLM(GlmConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=2,
                                   num_attention_heads=N, num_key_value_heads=groups, head_dim=hd,
                                   attention_bias=True, rms_norm_eps=1e-5, pad_token_id=0, eos_token_id=2,
                                   bos_token_id=1, rope_parameters={"rope_type": "default",
                                                                    "rope_theta": 10000.0 * rope_ratio,
                                                                    "partial_rotary_factor": 0.5})).eval()
    nontrivial_norms(ref)
    sd = ref.state_dict()
    state = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
             "transformer.rotary_pos_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, hd // 2, 2).float() / (hd // 2)))}
    for i in range(2):
        p, q = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            state[f"{q}self_attention.query_key_value.{kind}"] = torch.cat(
                [sd[f"{p}self_attn.{n}_proj.{kind}"] for n in "qkv"], 0)
        state[f"{q}self_attention.dense.weight"] = sd[f"{p}self_attn.o_proj.weight"]
        state[f"{q}mlp.dense_h_to_4h.weight"] = sd[f"{p}mlp.gate_up_proj.weight"]
        state[f"{q}mlp.dense_4h_to_h.weight"] = sd[f"{p}mlp.down_proj.weight"]
        state[f"{q}input_layernorm.weight"] = sd[f"{p}input_layernorm.weight"]
        state[f"{q}post_attention_layernorm.weight"] = sd[f"{p}post_attention_layernorm.weight"]
    state["transformer.encoder.final_layernorm.weight"] = sd["model.norm.weight"]
    state["transformer.output_layer.weight"] = sd["lm_head.weight"]
    config = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "add_bias_linear": False,
              "add_qkv_bias": True, "ffn_hidden_size": I, "hidden_size": H, "kv_channels": hd,
              "layernorm_epsilon": 1e-5, "multi_query_attention": True, "multi_query_group_num": groups,
              "num_attention_heads": N, "num_layers": 2, "padded_vocab_size": V, "rmsnorm": True,
              "post_layer_norm": True, "original_rope": True, "rope_ratio": rope_ratio, "seq_length": 128,
              "apply_residual_connection_post_layernorm": False, "torch_dtype": "float32"}
    save_bin_checkpoint(folder, state, config, shards=3,
                        extra_files={"modeling_chatglm.py": "# remote code\n", "tokenizer_config.json": "{}",
                                     **(extra_files or {})})
    return ref, state


@pytest.mark.parametrize("rope_ratio,groups", [(1.0, 2), (500.0, 1)])
def test_chatglm3_parity_roundtrip_and_packing(tmp_path, rope_ratio, groups):
    ref, state = chatglm_checkpoint(tmp_path / "src", rope_ratio, groups)
    cm.hg_to_pp(str(tmp_path / "src"), str(tmp_path / "pp"), quiet=True)
    fam, args, model = ours(str(tmp_path / "pp"))
    assert_parity(ref, fam, args, model)
    packed_matches_alone(model, lambda x: ref(x).logits)
    cm.pp_to_hg(str(tmp_path / "pp"), str(tmp_path / "back"), quiet=True, max_shard_bytes=50_000)
    assert_same_files(state, tmp_path / "back", "pytorch_model.bin.index.json")  # inv_freq regenerated
    for name in ("modeling_chatglm.py", "tokenizer_config.json", "config.json"):
        assert (tmp_path / "back" / name).exists()


# ----------------------------------------------------------------------------- real sizes (meta)

def test_real_sizes_on_meta_device():
    if not os.path.isdir(SHARED_ASSETS):
        pytest.skip(f"{SHARED_ASSETS} is absent")
    with open(os.path.join(SHARED_ASSETS, "configs", "chatglm3-6b", "config.json")) as f:
        glm_cfg = json.load(f)
    fam = get_family("chatglm")
    a = fam.parse_config(glm_cfg)
    shapes = fam.expected_shapes(a)
    keymap = fam.key_map(a)
    ours_keys = {keymap.to_hf(f"{fam.slot_of(a, i)}.{k}") for i, st in shapes.items() for k in st}
    ours_keys |= set(fam.export_extra(a))
    with open(os.path.join(SHARED_ASSETS, "configs", "chatglm3-6b", "pytorch_model.bin.index.json")) as f:
        real_keys = set(json.load(f)["weight_map"])
    assert ours_keys == real_keys
    H, hd, g, I, V_, L = 4096, 128, 2, 13696, 65024, 28
    qkv = H * (32 * hd + 2 * g * hd) + (32 * hd + 2 * g * hd)
    per_layer = qkv + 32 * hd * H + H * 2 * I + I * H + 2 * H
    assert sum(fam.layer_param_counts(a)) == 2 * V_ * H + L * per_layer + H
    assert shapes[1]["self_attention.query_key_value.weight"] == (4608, 4096)
    assert shapes[1]["mlp.dense_h_to_4h.weight"] == (27392, 4096)

    with open(os.path.join(SHARED_ASSETS, "configs", "baichuan2-7b", "config.json")) as f:
        bc_cfg = json.load(f)
    fam = get_family("baichuan")
    a = fam.parse_config(bc_cfg)
    H, I, V_, L = 4096, 11008, 125696, 32
    assert sum(fam.layer_param_counts(a)) == 2 * V_ * H + L * (4 * H * H + 3 * H * I + 2 * H) + H
    shapes = fam.expected_shapes(a)
    assert shapes[1]["self_attn.W_pack.weight"] == (3 * H, H) and shapes[34]["weight"] == (V_, H)


def test_llama2_7b_real_size():
    fam = get_family("llama")
    a = fam.parse_config(dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32))
    assert sum(fam.layer_param_counts(a)) == 6738415616
    assert fam.num_pipe_layers(a) == 35


# ------------------------------------------------------------- llama config switches: qwen2, mistral

def test_qwen2_and_mistral_parity(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    for name, model in (("qwen2", Qwen2ForCausalLM(Qwen2Config(**common))),
                        ("mistral", MistralForCausalLM(MistralConfig(sliding_window=8, **common)))):
        model.eval()
        nontrivial_norms(model)
        model.save_pretrained(tmp_path / name)
        cm.hg_to_pp(str(tmp_path / name), str(tmp_path / f"{name}_pp"), quiet=True)
        fam, args, ours_model = ours(str(tmp_path / f"{name}_pp"))
        assert_parity(model, fam, args, ours_model, S=20, what=name)
        if name == "qwen2":
            assert args.qkv_bias and not args.o_bias
        else:
            assert args.sliding_window == 8
