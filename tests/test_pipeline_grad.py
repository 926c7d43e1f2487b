"""Pipelined training == one unpipelined process: one SGD step, same updated weights.

One DeepSpeed launch per world size runs several scenarios (see dist_worker.py).
"""
import glob
import json
import os

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from ppllm import convert as cm
from models import load_family
from ppllm.lora import LoraConfig, apply_lora
from ppllm.pipeline import SequentialModel
from ppllm.tiny import make_llama
from tests.helpers import launch, seed_lora, synthetic_batches, token_weighted_loss
from tests.test_families import baichuan_checkpoint, chatglm_checkpoint, nontrivial_norms

pytestmark = pytest.mark.multiprocess  # DeepSpeed launches: not in make test-fast

SEQ, VOCAB = 32, 96


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gradeq")
    out = {}
    for name, kw in {"untied": {}, "tied": {"tie_word_embeddings": True, "num_key_value_heads": 4}}.items():
        hf = make_llama(str(root / f"hf_{name}"), VOCAB, seed=1, num_hidden_layers=3, hidden_size=32,
                        intermediate_size=64, **kw)
        cm.hg_to_pp(hf, str(root / f"pp_{name}"), quiet=True)
        out[name] = str(root / f"pp_{name}")
    torch.manual_seed(2)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=3, n_head=4))
    nontrivial_norms(bloom)
    bloom.save_pretrained(root / "hf_bloom")
    cm.hg_to_pp(str(root / "hf_bloom"), str(root / "pp_bloom"), quiet=True)
    out["bloom"] = str(root / "pp_bloom")
    # baichuan2 with z-loss: NormHead, and the z-loss normalised over the step's next-token positions
    baichuan_checkpoint(root / "hf_baichuan", z_loss_weight=0.5, vocab=VOCAB)
    cm.hg_to_pp(str(root / "hf_baichuan"), str(root / "pp_baichuan"), quiet=True)
    out["baichuan_z"] = str(root / "pp_baichuan")
    # chatglm3: fused qkv with bias, multi-query groups, half-rotary RoPE, separate head
    chatglm_checkpoint(root / "hf_glm", vocab=VOCAB)
    cm.hg_to_pp(str(root / "hf_glm"), str(root / "pp_glm"), quiet=True)
    out["glm"] = str(root / "pp_glm")
    out["root"] = root
    return out


def z_weighted_loss(model, batches, z_weight: float) -> torch.Tensor:
    """The step's loss by its definition, unchunked: CE summed over trained tokens / their count, plus
    z_weight x max(logits)^2 summed over next-token positions / their count, over all micro-batches."""
    import torch.nn.functional as F

    from models.common import next_token_mask
    ce, n_ce, z, n_z = torch.zeros(()), 0, torch.zeros(()), 0
    for inputs, labels in batches:
        logits = model(inputs).float()
        ce = ce + F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        n_ce += int((labels != -100).sum())
        mask = next_token_mask(inputs[2])
        z = z + (logits.max(-1).values ** 2)[mask].sum()
        n_z += int(mask.sum())
    return ce / n_ce + z_weight * z / n_z


def reference_update(model_dir, sc):
    fam, margs = load_family(model_dir)
    model = SequentialModel(fam.build_specs(margs))
    model.load_layer_files(model_dir)
    if sc.get("lora"):
        apply_lora(model, LoraConfig(**sc["lora"]))
        assert seed_lora(enumerate(model.layers)) > 0
    batches = synthetic_batches(sc["seed"], sc["gas"] * sc["data"], sc["mbs"], SEQ, margs.vocab_size)
    z_weight = getattr(fam.loss_fn(margs), "z_loss_weight", 0.0)
    loss = z_weighted_loss(model, batches, z_weight) if z_weight else token_weighted_loss(model, batches)
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in trained))
    if sc.get("clip"):
        torch.nn.utils.clip_grad_norm_(trained, sc["clip"])
    updated = {}
    with torch.no_grad():
        for idx, layer in enumerate(model.layers):
            if isinstance(layer, torch.nn.Identity):
                continue
            if sc.get("optimizer") == "Lion":
                # first Lion step: -lr * sign(grad). DeepSpeed's CPU Lion takes sign(0) as +1, so
                # entries without gradient (embedding rows of absent tokens) move by -lr as well;
                # pin that behaviour here so a change in DeepSpeed is noticed.
                updated[idx] = {k: (p - sc["lr"] * torch.where(p.grad == 0, 1.0, torch.sign(p.grad)))
                                for k, p in layer.named_parameters()}
            elif sc.get("optimizer") == "Adam":  # first Adam step: -lr * g / (|g| + eps)
                updated[idx] = {k: (p - sc["lr"] * p.grad / (p.grad.abs() + 1e-8))
                                for k, p in layer.named_parameters()}
            else:  # SGD with lr 1
                updated[idx] = {k: (p - p.grad) if p.requires_grad else p.clone()
                                for k, p in layer.named_parameters()}
            before = {k: p.clone() for k, p in layer.named_parameters()}
            updated[idx]["__before__"] = before
            updated[idx]["__frozen__"] = {k for k, p in layer.named_parameters() if not p.requires_grad}
    updated["__norm__"] = float(norm)
    return float(loss.detach()), updated


def check_same_step(out_dir, sc):
    """bf16 (DeepSpeed's bf16 optimizer, fp32 gradient sums): the ZB-H1 step equals the 1F1B step of
    ``sc['same_as']``. Both sum the same bf16 micro-batch weight gradients into fp32 in the same order,
    so the fp32 master weights after the step must agree exactly."""
    pairs = [(torch.load(p, weights_only=False),
              torch.load(p.replace(sc["name"], sc["same_as"]), weights_only=False))
             for p in sorted(glob.glob(os.path.join(out_dir, f"{sc['name']}_rank*.pt")))]
    assert len(pairs) == sc["pipe"] * sc["data"], pairs
    moved = 0.0
    for zb, ref in pairs:
        assert zb["zb"]["w_passes"] == sc["gas"] and zb["zb"]["deferred"] == zb["zb"]["linears"] * sc["gas"] > 0
        assert ref["zb"] is None and zb["loss"] == ref["loss"], (zb["loss"], ref["loss"])
        assert zb["master"].keys() == ref["master"].keys() and zb["master"]
        for name, want in ref["master"].items():
            assert want.dtype == torch.float32
            torch.testing.assert_close(zb["master"][name], want, rtol=0, atol=0,
                                       msg=lambda m: f"{sc['name']} master {name}: {m}")
        for name, want in ref["master"].items():  # every weight moved: the comparison is not vacuous
            step = float((want - ref["master_before"][name]).abs().max())
            assert step > 1e-6, f"{sc['same_as']} did not move {name}"
            moved = max(moved, step)
    assert moved > 1e-3, "the step barely moved the weights"


def check(out_dir, sc, model_dir):
    if sc.get("same_as"):
        return check_same_step(out_dir, sc)
    if sc.get("precision") == "bf16":
        return  # the 1F1B side of a bf16 pair: check_same_step compares it with its ZB-H1 step
    ref_loss, ref = reference_update(model_dir, sc)
    ref_norm = ref.pop("__norm__")
    dumps = sorted(glob.glob(os.path.join(out_dir, f"{sc['name']}_rank*.pt")))
    assert len(dumps) == sc["pipe"] * sc["data"], dumps
    seen = set()
    biggest = 0.0
    for path in dumps:
        d = torch.load(path, weights_only=False)
        if sc.get("schedule") == "zb-h1":  # the weight gradients really went through the W's
            zb = d["zb"]
            assert zb["linears"] > 0 and zb["w_passes"] == sc["gas"], (sc["name"], path, zb)
            assert zb["deferred"] == zb["linears"] * sc["gas"], (sc["name"], path, zb)
        else:
            assert d["zb"] is None, (sc["name"], path)
        torch.testing.assert_close(d["loss"], ref_loss, rtol=0, atol=1e-5, msg=lambda m: f"{sc['name']} loss: {m}")
        torch.testing.assert_close(d["grad_norm"], ref_norm, rtol=0, atol=1e-5 * max(1.0, ref_norm),
                                   msg=lambda m: f"{sc['name']} grad norm: {m}")
        for idx, state in d["layers"].items():
            if isinstance(idx, str):  # tied module copy on a later stage: must equal the embedding
                idx = 0
            seen.add(idx)
            for k, v in state.items():
                want = ref[idx][k]
                moved = (want - ref[idx]["__before__"][k]).abs().max()
                if k in ref[idx]["__frozen__"]:  # LoRA's base weights: must come back unchanged
                    assert moved == 0, f"{k} is frozen but the reference moved it"
                else:
                    assert moved > 1e-7, f"{k} did not change: the test would be vacuous"
                biggest = max(biggest, float(moved))
                torch.testing.assert_close(v, want, rtol=0, atol=1e-5,
                                           msg=lambda m: f"{sc['name']} layer {idx} {k}: {m}")
    assert seen == set(ref), (seen, set(ref))
    assert biggest > 1e-3, "the step barely moved the weights: the comparison would be vacuous"


SCEN_2 = [
    {"name": "p2_untied", "model": "untied", "pipe": 2, "data": 1, "mbs": 2, "gas": 3, "seed": 11},
    {"name": "p2_tied", "model": "tied", "pipe": 2, "data": 1, "mbs": 1, "gas": 4, "seed": 12},
    {"name": "p2_ckpt", "model": "untied", "pipe": 2, "data": 1, "mbs": 2, "gas": 2, "seed": 13, "grad_ckpt": True},
    {"name": "p2_parts", "model": "untied", "pipe": 2, "data": 1, "mbs": 2, "gas": 2, "seed": 14, "parts": [1, 5]},
    {"name": "p2_clip", "model": "tied", "pipe": 2, "data": 1, "mbs": 2, "gas": 2, "seed": 15, "clip": 0.5},
    {"name": "p2_lion", "model": "untied", "pipe": 2, "data": 1, "mbs": 2, "gas": 2, "seed": 16,
     "optimizer": "Lion", "lr": 0.01},
    # bloom: TiedLayerSpec embedding/head across the two stages, embedding LayerNorm, ALiBi
    {"name": "p2_bloom", "model": "bloom", "pipe": 2, "data": 1, "mbs": 2, "gas": 2, "seed": 17, "clip": 0.5},
    # ZB-H1 (schedule: zb-h1): the same step with each backward split into B and deferred W's
    {"name": "p2_zb_tied", "model": "tied", "pipe": 2, "data": 1, "mbs": 1, "gas": 4, "seed": 12, "schedule": "zb-h1"},
    {"name": "p2_zb_ckpt", "model": "untied", "pipe": 2, "data": 1, "mbs": 2, "gas": 3, "seed": 13, "grad_ckpt": True,
     "schedule": "zb-h1"},
    {"name": "p2_zb_clip", "model": "tied", "pipe": 2, "data": 1, "mbs": 2, "gas": 2, "seed": 15, "clip": 0.5,
     "schedule": "zb-h1"},
    {"name": "p2_zb_bloom_m1", "model": "bloom", "pipe": 2, "data": 1, "mbs": 2, "gas": 1, "seed": 17, "clip": 0.5,
     "schedule": "zb-h1", "grad_ckpt": True},
    # LoRA (adapters on attention and MLP, base frozen): 1F1B and ZB-H1
    {"name": "p2_lora", "model": "tied", "pipe": 2, "data": 1, "mbs": 2, "gas": 2, "seed": 18, "clip": 0.5,
     "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}},
    {"name": "p2_zb_lora", "model": "tied", "pipe": 2, "data": 1, "mbs": 2, "gas": 3, "seed": 18, "clip": 0.5,
     "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}, "schedule": "zb-h1",
     "grad_ckpt": True},
    {"name": "p2_glm", "model": "glm", "pipe": 2, "data": 1, "mbs": 2, "gas": 2, "seed": 31, "clip": 0.5},
    {"name": "p2_zb_glm", "model": "glm", "pipe": 2, "data": 1, "mbs": 2, "gas": 3, "seed": 32, "grad_ckpt": True,
     "schedule": "zb-h1"},
    # bf16 (DeepSpeed's bf16 optimizer, fp32 gradient sums): ZB-H1's step equals 1F1B's, master weights exactly
    {"name": "p2_bf16", "model": "tied", "pipe": 2, "data": 1, "mbs": 2, "gas": 3, "seed": 19, "clip": 0.5,
     "precision": "bf16", "grad_ckpt": True},
    {"name": "p2_zb_bf16", "model": "tied", "pipe": 2, "data": 1, "mbs": 2, "gas": 3, "seed": 19, "clip": 0.5,
     "precision": "bf16", "grad_ckpt": True, "schedule": "zb-h1", "same_as": "p2_bf16"},
]
SCEN_4 = [
    {"name": "p2d2_untied", "model": "untied", "pipe": 2, "data": 2, "mbs": 2, "gas": 2, "seed": 21},
    {"name": "p2d2_tied", "model": "tied", "pipe": 2, "data": 2, "mbs": 1, "gas": 3, "seed": 22},
    {"name": "p2d2_clip", "model": "untied", "pipe": 2, "data": 2, "mbs": 2, "gas": 2, "seed": 23, "clip": 0.5},
    {"name": "p2d2_zero1", "model": "tied", "pipe": 2, "data": 2, "mbs": 1, "gas": 2, "seed": 24, "zero": 1},
    {"name": "p2d2_offload", "model": "untied", "pipe": 2, "data": 2, "mbs": 1, "gas": 2, "seed": 25, "zero": 1,
     "offload": True, "optimizer": "Adam", "lr": 1e-3},
    {"name": "p2d2_bloom", "model": "bloom", "pipe": 2, "data": 2, "mbs": 1, "gas": 2, "seed": 26},
    {"name": "p2d2_baichuan_z", "model": "baichuan_z", "pipe": 2, "data": 2, "mbs": 2, "gas": 2, "seed": 27},
    {"name": "p2d2_zb_tied", "model": "tied", "pipe": 2, "data": 2, "mbs": 1, "gas": 3, "seed": 22, "schedule": "zb-h1"},
    {"name": "p2d2_zb_ckpt_clip", "model": "untied", "pipe": 2, "data": 2, "mbs": 2, "gas": 2, "seed": 23, "clip": 0.5,
     "grad_ckpt": True, "schedule": "zb-h1"},
    {"name": "p2d2_zb_baichuan_z", "model": "baichuan_z", "pipe": 2, "data": 2, "mbs": 2, "gas": 4, "seed": 27,
     "schedule": "zb-h1"},
    {"name": "p2d2_zb_glm", "model": "glm", "pipe": 2, "data": 2, "mbs": 1, "gas": 2, "seed": 33, "clip": 0.5,
     "schedule": "zb-h1"},
    {"name": "p2d2_bf16", "model": "bloom", "pipe": 2, "data": 2, "mbs": 2, "gas": 2, "seed": 28, "clip": 0.5,
     "precision": "bf16"},
    {"name": "p2d2_zb_bf16", "model": "bloom", "pipe": 2, "data": 2, "mbs": 2, "gas": 2, "seed": 28, "clip": 0.5,
     "precision": "bf16", "schedule": "zb-h1", "same_as": "p2d2_bf16"},
]


@pytest.mark.parametrize("world,scenarios", [(2, SCEN_2), (4, SCEN_4)], ids=["pipe2", "pipe2xdata2"])
@pytest.mark.timeout(420)
def test_pipeline_matches_single_process(models, world, scenarios):
    out_dir = models["root"] / f"out{world}"
    out_dir.mkdir()
    for sc in scenarios:
        sc["model_dir"] = models[sc["model"]]
        sc["seq"] = SEQ
    spec = out_dir / "spec.json"
    spec.write_text(json.dumps(scenarios))
    launch(["tests/dist_worker.py", str(spec), str(out_dir)], world)
    for sc in scenarios:
        check(str(out_dir), sc, sc["model_dir"])
