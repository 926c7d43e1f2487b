"""Start-up of one pipeline stage that loads its weights: peak host memory and time, before and after
building on the meta device.

* before: DeepSpeed builds every layer on the host in fp32 with its random init, the layer files
  are then copied in, and the stage is cast to the training dtype (what ppllm did until now);
* after: ``PipeModel(weights=...)`` builds on ``meta`` and gives each layer its storage in the
  training dtype and its values from its (memory-mapped) file, one layer at a time.

One stage holds the whole model (pipe=1, one process), on CPU: the stage's own weights then live
in host memory either way, so the figure to compare is peak RSS against the weights' size in the
training dtype. Rounds alternate the two modes, each in a fresh process.

    python bench/stage_startup.py                      # 0.9B-parameter llama in bf16, 3 rounds
    python bench/stage_startup.py --smoke              # a few MB, for the test suite
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

from _common import REPO, launch, load_note, log


def make_model(root: str, hidden: int, layers: int, vocab: int) -> str:
    """A llama pipeline folder with bf16 layer files (written once, reused)."""
    pp = os.path.join(root, f"pp_h{hidden}_l{layers}_v{vocab}")
    if os.path.isdir(pp):
        return pp
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ppllm import convert
    hf = pp + "_hf"
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 128 or 1,
                      num_key_value_heads=max(1, hidden // 512), max_position_embeddings=4096,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.02, generator=g)
    model.save_pretrained(hf)
    del model
    convert.hg_to_pp(hf, pp, quiet=True)
    return pp


def worker(mode: str, model_dir: str, out: str) -> None:
    import deepspeed
    import torch

    from models import load_family
    from ppllm import ds_compat
    from ppllm.pipeline import PipeModel
    deepspeed.init_distributed(dist_backend="gloo")
    fam, margs = load_family(model_dir)
    n = fam.num_pipe_layers(margs)
    specs = fam.build_specs(margs)
    t0 = time.perf_counter()
    if mode == "before":
        model = PipeModel(specs, bounds=[0, n], topology=ds_compat.topology(1, 1), seed_layers=True, base_seed=0)
        model.load_layer_files(model_dir)
        model.to(torch.bfloat16)
    else:
        model = PipeModel(specs, bounds=[0, n], topology=ds_compat.topology(1, 1), seed_layers=True, base_seed=0,
                          weights=model_dir, device="cpu", dtype=torch.bfloat16)
    seconds = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    checksum = float(sum(p.float().sum() for p in model.parameters()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(out, "w") as f:
        json.dump({"seconds": seconds, "peak_rss": peak, "weights": weights, "checksum": checksum}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default=os.path.join(REPO, "runs", "bench_startup"))
    ap.add_argument("--smoke", action="store_true", help="a tiny model, one round")
    ap.add_argument("--worker", nargs=3, metavar=("MODE", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.rounds = 256, 2, 1000, 1
    os.makedirs(args.work, exist_ok=True)
    model = make_model(args.work, args.hidden, args.layers, args.vocab)
    got: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for mode in ("before", "after") if r % 2 == 0 else ("after", "before"):
            out = os.path.join(args.work, f"{mode}.json")
            launch([os.path.abspath(__file__), "--worker", mode, model, out], 1, threads=1, direct=True)
            with open(out) as f:
                got[mode].append(json.load(f))
    weights = got["after"][0]["weights"]
    assert abs(got["before"][0]["checksum"] - got["after"][0]["checksum"]) <= 1e-6 * weights, "weights differ"
    log(f"stage of {weights / 2 ** 20:.0f} MiB of bf16 weights, {args.rounds} round(s), {load_note()}")
    for mode in ("before", "after"):
        rss = [g["peak_rss"] / 2 ** 20 for g in got[mode]]
        sec = [g["seconds"] for g in got[mode]]
        log(f"{mode:6s}: peak RSS {statistics.median(rss):8.0f} MiB (range {min(rss):.0f}-{max(rss):.0f}), "
            f"build+load {statistics.median(sec):6.2f} s (range {min(sec):.2f}-{max(sec):.2f})")
    med = {m: (statistics.median(g["peak_rss"] for g in got[m]), statistics.median(g["seconds"] for g in got[m]))
           for m in got}
    log(f"RESULT weights_mib={weights / 2 ** 20:.1f} rss_before_mib={med['before'][0] / 2 ** 20:.1f} "
        f"rss_after_mib={med['after'][0] / 2 ** 20:.1f} rss_ratio={med['after'][0] / med['before'][0]:.3f} "
        f"time_ratio={med['after'][1] / med['before'][1]:.3f}")


if __name__ == "__main__":
    main()
