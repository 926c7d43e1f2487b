"""bloom: parity with BloomForCausalLM (power-of-two and other head counts), ALiBi restarting per
packed document, bit-exact round trips with and without the ``transformer.`` prefix, real size
of bloom-7b1 on the meta device."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BloomConfig, BloomForCausalLM

from ppllm import convert as cm
from models import get_family
from models.bloom import alibi_slopes
from tests.test_families import assert_parity, nontrivial_norms, ours, packed_matches_alone

V = 150


def bloom_checkpoint(folder, heads=4, vocab=V, prefix=True, seed=0):
    """A tiny random BloomForCausalLM saved as the hub does: model.safetensors, tied head not stored.
    ``prefix=False`` strips ``transformer.`` from every key, as many hub checkpoints do."""
    torch.manual_seed(seed)
    cfg = BloomConfig(vocab_size=vocab, hidden_size=8 * heads, n_layer=3, n_head=heads, layer_norm_epsilon=1e-5,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = BloomForCausalLM(cfg).eval()
    nontrivial_norms(model)
    model.save_pretrained(folder)
    if not prefix:
        path = os.path.join(folder, "model.safetensors")
        state = load_file(path)
        save_file({k.removeprefix("transformer."): v for k, v in state.items()}, path, metadata={"format": "pt"})
    return model, load_file(os.path.join(folder, "model.safetensors"))


def load_export(folder) -> dict:
    """Every tensor of a pp_to_hg output (safetensors shards listed by the index)."""
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    out = {}
    for name in files:
        out.update(load_file(os.path.join(folder, name)))
    return out


def test_alibi_slopes_match_transformers():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    for n in (1, 2, 4, 6, 8, 12, 16, 20, 32, 112):
        ref = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n, torch.float32).view(n, 2)[:, 1]
        assert torch.equal(alibi_slopes(n), ref), n


@pytest.mark.parametrize("heads", [4, 6], ids=["heads4", "heads6"])
def test_bloom_parity_roundtrip_and_packing(tmp_path, heads):
    ref, state = bloom_checkpoint(tmp_path / "src", heads=heads)
    assert all(k.startswith("transformer.") for k in state) and "lm_head.weight" not in state
    cm.hg_to_pp(str(tmp_path / "src"), str(tmp_path / "pp"), quiet=True)
    fam, args, model = ours(str(tmp_path / "pp"))
    assert fam.name == "bloom" and fam.is_tied(args)
    ids, r = assert_parity(ref, fam, args, model)
    # ALiBi positions restart per packed document: each document scores as if it were alone
    packed_matches_alone(model, lambda x: ref(x).logits)
    # exactly one layer file holds the tied matrix (the embedding's); the head has none
    files = sorted(f for f in os.listdir(tmp_path / "pp") if f.startswith("layer_"))
    assert len(files) == fam.num_pipe_layers(args) - 1
    cm.pp_to_hg(str(tmp_path / "pp"), str(tmp_path / "back"), quiet=True)
    back = load_export(tmp_path / "back")
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    again = BloomForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert torch.equal(again.lm_head.weight, again.transformer.word_embeddings.weight)
    with torch.no_grad():  # the tensors are bit-identical (above); two model objects' logits were seen to
        # differ in the last bit once under heavy CPU load, so compare those with a tolerance
        torch.testing.assert_close(again(ids).logits, r.logits, rtol=0, atol=1e-6)


def test_bloom_without_transformer_prefix(tmp_path):
    _, with_prefix = bloom_checkpoint(tmp_path / "a", prefix=True)
    _, bare = bloom_checkpoint(tmp_path / "b", prefix=False)
    assert not any(k.startswith("transformer.") for k in bare) and "word_embeddings.weight" in bare
    cm.hg_to_pp(str(tmp_path / "a"), str(tmp_path / "pp_a"), quiet=True)
    cm.hg_to_pp(str(tmp_path / "b"), str(tmp_path / "pp_b"), quiet=True)
    files = sorted(f for f in os.listdir(tmp_path / "pp_a") if f.startswith("layer_"))
    assert files == sorted(f for f in os.listdir(tmp_path / "pp_b") if f.startswith("layer_"))
    for f in files:
        a = torch.load(tmp_path / "pp_a" / f, weights_only=True)
        b = torch.load(tmp_path / "pp_b" / f, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    # export always writes the canonical (prefixed) names that BloomForCausalLM saves
    cm.pp_to_hg(str(tmp_path / "pp_b"), str(tmp_path / "back"), quiet=True)
    back = load_export(tmp_path / "back")
    assert set(back) == set(with_prefix)
    assert all(torch.equal(back[k], bare[k.removeprefix("transformer.")]) for k in back)


def test_bloom_7b1_real_size_on_meta():
    cfg = {"model_type": "bloom", "vocab_size": 250880, "hidden_size": 4096, "n_layer": 30, "n_head": 32,
           "layer_norm_epsilon": 1e-5}
    fam = get_family("bloom")
    a = fam.parse_config(cfg)
    assert sum(fam.layer_param_counts(a)) == 7069016064  # bloom-7b1
    # every key and shape of the real checkpoint, from transformers' own model built on meta
    with torch.device("meta"):
        ref = BloomForCausalLM(BloomConfig(**cfg))
    real = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    shapes = fam.expected_shapes(a)
    km = fam.key_map(a)
    mine = {km.to_hf(f"{fam.slot_of(a, i)}.{k}"): s for i, st in shapes.items() for k, s in st.items()}
    assert mine == real
    assert fam.num_pipe_layers(a) == 33 and len(shapes) == 32  # the tied head has no file of its own


def test_bloom_config_errors():
    fam = get_family("bloom")
    base = {"model_type": "bloom", "vocab_size": 10, "hidden_size": 8, "n_layer": 1, "n_head": 2}
    with pytest.raises(ValueError, match="apply_residual_connection_post_layernorm"):
        fam.parse_config(dict(base, apply_residual_connection_post_layernorm=True))
    with pytest.raises(ValueError, match="not divisible"):
        fam.parse_config(dict(base, n_head=3))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        fam.parse_config(dict(base, tie_word_embeddings=False))
