"""What the checkpoint manifest costs: checksums at save and the check at resume, against torch.save.

A checkpoint tag of the shape a pipeline run writes (layer files in the training dtype, one
``mp_rank_XX_model_states.pt`` per stage holding fp32 master weights and Adam moments, RNG files),
``--gb`` GB in all, is written with torch.save; then the manifest is computed the way a save does it
(``--ranks`` processes on one node, each its share) and the resume check runs the same way.

    python bench/checkpoint_verify.py --gb 2 --ranks 1 2
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time

import torch

from ppllm import checkpoint as ckpt
from ppllm.paths import ds_model_states_file


def make_tag(tag: str, gb: float, stages: int = 2, layers: int = 8) -> float:
    """Weights (bf16) : optimizer state (fp32 master + 2 moments) = 2 : 12 bytes per parameter."""
    params = int(gb * 2**30 / 14)
    per_layer = params // layers
    spent = 0.0
    for i in range(layers):
        w = torch.randn(per_layer, dtype=torch.bfloat16)
        t0 = time.perf_counter()
        torch.save({"w": w}, os.path.join(tag, f"layer_{i:02d}-model_states.pt"))
        spent += time.perf_counter() - t0
    per_stage = params // stages
    for s in range(stages):
        state = {k: torch.randn(per_stage) for k in ("fp32", "exp_avg", "exp_avg_sq")}
        t0 = time.perf_counter()
        torch.save({"optimizer": {"state": {0: state}}, "global_steps": 10}, ds_model_states_file(tag, s))
        torch.save({"torch": torch.get_rng_state()}, os.path.join(tag, f"rng_rank{s}.pt"))
        spent += time.perf_counter() - t0
    t0 = time.perf_counter()
    os.sync()
    return spent + time.perf_counter() - t0


def _part(args):
    tag, index, count = args
    ckpt.write_manifest_part(tag, index, count)


def _verify(args):
    tag, index, count = args
    ckpt.verify(tag, [], index, count)


def timed(fn, tag: str, ranks: int) -> float:
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(ranks) as pool:
        pool.map(fn, [(tag, i, ranks) for i in range(ranks)])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    root = tempfile.mkdtemp(dir=a.dir)
    try:
        tag = os.path.join(root, "global_step10")
        os.makedirs(tag)
        save_s = make_tag(tag, a.gb)
        size = sum(os.path.getsize(os.path.join(tag, n)) for n in os.listdir(tag)) / 2**30
        print(f"checkpoint: {size:.2f} GiB in {len(os.listdir(tag))} files; torch.save + sync {save_s:.1f} s (tensor generation not counted) "
              f"({size / save_s:.2f} GiB/s)")
        print("| ranks | manifest at save | s/GiB | vs torch.save | check at resume | s/GiB |")
        print("|---|---|---|---|---|---|")
        result = []
        for r in a.ranks:
            write_s = timed(_part, tag, r)
            ckpt.merge_manifest(tag, r)
            check_s = timed(_verify, tag, r)
            print(f"| {r} | {write_s:.2f} s | {write_s / size:.2f} | {write_s / save_s:.2f}x | {check_s:.2f} s | "
                  f"{check_s / size:.2f} |")
            result.append(f"save_s_per_gib_{r}ranks={write_s / size:.3f} resume_s_per_gib_{r}ranks={check_s / size:.3f}")
        print(f"RESULT torch_save_s_per_gib={save_s / size:.3f} " + " ".join(result))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
