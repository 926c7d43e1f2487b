"""ppllm's llama layers == transformers.LlamaForCausalLM in fp32 (logits and loss)."""
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from ppllm import convert as cm
from models import load_family
from ppllm.pipeline import SequentialModel

V = 101
CASES = {
    "mha": {},
    "gqa": {"num_key_value_heads": 2},
    "mqa_tied": {"num_key_value_heads": 1, "tie_word_embeddings": True},
    "gqa_tied": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "llama3_rope": {"num_key_value_heads": 2, "rope_theta": 500000.0,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "linear_rope": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "biases": {"attention_bias": True, "mlp_bias": True},
    "head_dim": {"head_dim": 16},
}


def build(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=256, **kw)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights and biases
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight") or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    cm.hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), quiet=True)
    fam, args = load_family(str(tmp_path / "pp"))
    ours = SequentialModel(fam.build_specs(args))
    ours.load_layer_files(str(tmp_path / "pp"))
    return hf, ours.eval(), fam, args


def inputs(B=2, S=40):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, S), generator=g)
    pos = torch.arange(S).expand(B, S)
    doc = torch.zeros(B, S, dtype=torch.long)
    return ids, pos, doc


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_loss_match_transformers(tmp_path, case):
    hf, ours, fam, args = build(tmp_path, **CASES[case])
    ids, pos, doc = inputs()
    with torch.no_grad():
        ref = hf(ids, labels=ids)
        out = ours((ids, pos, doc))
    torch.testing.assert_close(out, ref.logits, rtol=0, atol=1e-5)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    loss_fn = fam.loss_fn(args)
    torch.testing.assert_close(loss_fn(out, labels).item(), ref.loss.item(), rtol=0, atol=1e-5)


def test_packed_row_equals_documents_alone(tmp_path):
    hf, ours, _, _ = build(tmp_path, num_key_value_heads=2)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, V, (1, 13), generator=g), torch.randint(0, V, (1, 19), generator=g)
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(13), torch.arange(19)]).unsqueeze(0)
    doc = torch.cat([torch.zeros(13), torch.ones(19)]).long().unsqueeze(0)
    with torch.no_grad():
        out = ours((packed, pos, doc))
        ra, rb = hf(a).logits, hf(b).logits
    torch.testing.assert_close(out[:, :13], ra, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, 13:], rb, rtol=0, atol=1e-5)


def test_gradients_match_transformers(tmp_path):
    hf, ours, fam, args = build(tmp_path, num_key_value_heads=2)
    ids, pos, doc = inputs(2, 24)
    hf.train()
    ours.train()
    F.cross_entropy(hf(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    F.cross_entropy(ours((ids, pos, doc))[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    g_ref = hf.model.layers[1].mlp.down_proj.weight.grad
    g_ours = ours.layers[2].mlp.down_proj.weight.grad
    torch.testing.assert_close(g_ref, g_ours, rtol=0, atol=1e-6)
    torch.testing.assert_close(hf.model.embed_tokens.weight.grad, ours.layers[0].weight.grad, rtol=0, atol=1e-6)
