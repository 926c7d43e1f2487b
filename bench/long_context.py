"""Long packed rows on CPU: attention memory and time, before (dense) and after (blockwise).

1. ``--layers``: one decoder layer, forward + backward, for llama (grouped kv heads), mistral (sliding
   window 4096) and bloom (ALiBi) at S = 4k, 8k, 16k, 32k tokens in one row of several packed documents
   and a padded tail; each measurement in a fresh process (1 thread): peak RSS growth over the inputs
   and the seconds of forward + backward. The dense path runs only where its predicted S x S memory
   fits ``--dense-max-gb``; the rest is reported as predicted, not measured.
2. ``--pipe``: a whole pipe=2 run (two CPU ranks, DeepSpeed) of a tiny llama at ``max_seq_len`` 16384,
   peak RSS per rank against ``train_pp.py --plan``'s per-stage total.

``--smoke`` runs the first at S = 1024 and 2048 for llama only (tests/test_bench_smoke.py).
The last line is ``RESULT`` with the blockwise memory ratio 32k/4k (``mem_ratio``), the blockwise/dense
time ratio at 4k (``time_ratio_4k``) and, with ``--pipe``, the measured/planned RSS ratio per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

from _common import PY, REPO, launch, load_note, log, run_env, setup_tiny, write_run_config

LAYER_CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
from models import get_family
from ppllm.pipeline import SequentialModel
family, backend, S, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = json.loads(sys.argv[5])
fam = get_family(cfg["model_type"])
args = fam.parse_config(cfg)
torch.manual_seed(seed)
layer = fam.build_specs(args, backend)[1].build()
H = args.hidden_size
g = torch.Generator().manual_seed(seed)
lengths, left = [], S - S // 16          # documents of 1/16 .. 1/3 of the row, a padded tail of S/16
while left > 0:
    n = min(left, int(torch.randint(S // 16, S // 3, (1,), generator=g)))
    lengths.append(n); left -= n
doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((S // 16,), -1)])[None]
pos = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(S // 16, dtype=torch.long)])[None]
x = torch.randn(1, S, H, generator=g).requires_grad_()
gy = torch.randn(1, S, H, generator=g)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
y, _, _ = layer((x, pos, doc))
y.backward(gy)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT " + json.dumps({"mb": (peak - base) / 1024, "s": dt, "docs": len(lengths)}))
"""

SHAPES = {  # small layers with real head dims: attention dominates at long S
    "llama": dict(model_type="llama", vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6),
    "mistral": dict(model_type="mistral", vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, sliding_window=4096, rms_norm_eps=1e-6),
    "bloom": dict(model_type="bloom", vocab_size=256, hidden_size=256, n_layer=1, n_head=4),
}


def dense_predicted_gb(cfg: dict, S: int) -> float:
    """What the dense path may hold at its peak: the bool mask, and per query head fp32 scores,
    probabilities and their gradient (bloom's explicit ALiBi path). Conservative for llama/mistral,
    where torch's fused CPU kernel keeps no per-head scores (measured: 1.8 GB at 16k, not 12)."""
    N = cfg.get("num_attention_heads", cfg.get("n_head"))
    return (S * S + 3 * 4 * N * S * S) / 2 ** 30


def layer_point(family: str, backend: str, S: int, seed: int) -> dict:
    p = subprocess.run([PY, "-c", LAYER_CHILD, family, backend, str(S), str(seed), json.dumps(SHAPES[family])],
                       cwd=REPO, env=run_env(1), capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"{family} {backend} S={S} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1][len("RESULT "):])


def spread(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:.2f}" + (f" [{min(values):.2f}-{max(values):.2f}]" if len(values) > 1 else "")


def layers(families: list[str], sizes: list[int], rounds: int, dense_max_gb: float) -> dict:
    results = {}
    log(f"one decoder layer fwd+bwd, 1 thread, {rounds} round(s); {load_note()}")
    log("family   S      backend    peak MB (median [min-max])   seconds            docs")
    for fam in families:
        for S in sizes:
            backends = ["dense", "blockwise"]
            if dense_predicted_gb(SHAPES[fam], S) > dense_max_gb:
                log(f"{fam:8s} {S:6d} {'dense':10s} not run: predicted {dense_predicted_gb(SHAPES[fam], S):.1f} GB "
                    f"> --dense-max-gb {dense_max_gb}")
                backends = ["blockwise"]
            # the backends alternate round by round, so load from other work spreads over both
            runs = {b: [] for b in backends}
            for r in range(rounds):
                for backend in backends:
                    runs[backend].append(layer_point(fam, backend, S, r))
            for backend in backends:
                pts = runs[backend]
                mb, sec = [p["mb"] for p in pts], [p["s"] for p in pts]
                results[(fam, S, backend)] = (statistics.median(mb), statistics.median(sec))
                log(f"{fam:8s} {S:6d} {backend:10s} {spread(mb):28s} {spread(sec):18s} {pts[0]['docs']}")
    log("ratios:")
    for fam in families:
        lo, hi = sizes[0], sizes[-1]
        b_lo, b_hi = results.get((fam, lo, "blockwise")), results.get((fam, hi, "blockwise"))
        d_lo = results.get((fam, lo, "dense"))
        line = f"  {fam}: blockwise memory {hi}/{lo} = {b_hi[0] / max(b_lo[0], 1e-9):.2f}x (S grew {hi // lo}x)"
        if d_lo:
            line += (f"; at S={lo} blockwise/dense time {b_lo[1] / d_lo[1]:.2f}x, memory {b_lo[0] / max(d_lo[0], 1e-9):.3f}x")
        for S in sizes:
            d = results.get((fam, S, "dense"))
            if d and S != lo:
                b = results[(fam, S, "blockwise")]
                line += f"; S={S} time {b[1] / d[1]:.2f}x memory {b[0] / max(d[0], 1e-9):.3f}x"
        log(line)
    return results


RSS_WORKER = r"""
import atexit, json, os, resource, sys
out = os.environ["PPLLM_RSS_OUT"]
def dump():
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": int(rank), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)
atexit.register(dump)
import runpy
runpy.run_path("train_pp.py", run_name="__main__")
"""


def pipe_run(seq: int, steps: int) -> dict:
    """pipe=2 at max_seq_len seq: measured peak RSS per rank against --plan's per-stage total."""
    root = tempfile.mkdtemp(prefix="ppllm_long_")
    t = setup_tiny(root, n_docs=600, mean_words=900, vocab_size=1000, hidden_size=256, intermediate_size=512,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq)
    cfg = write_run_config(os.path.join(root, "run.yml"), pp_dir=t["pp"], save_path=os.path.join(root, "out"),
                           data=t["data"], dims=[2, 1], seq=seq, mbs=1, gas=2, steps=steps)
    plan = subprocess.run([PY, "train_pp.py", "--config", cfg, "--plan"], cwd=REPO, env=run_env(1),
                          capture_output=True, text=True, timeout=600)
    if plan.returncode != 0:
        raise RuntimeError(plan.stdout[-3000:] + plan.stderr[-3000:])
    planned = {}
    unit = 1024 if "(GiB)" in plan.stdout.split("configured parts")[0] else 1
    for line in plan.stdout.split("configured parts")[0].splitlines():
        m = re.match(r"\s*(\d+)\s+\d+\.\.\d+\s", line)
        if m:
            planned[int(m.group(1))] = float(line.split()[-1]) * unit
    worker = os.path.join(root, "rss_worker.py")
    with open(worker, "w") as f:
        f.write(RSS_WORKER)
    out = os.path.join(root, "rss")
    os.makedirs(out)
    _, wall = launch([worker, "--config", cfg, "--quiet"], 2, threads=1, env={"PPLLM_RSS_OUT": out}, timeout=3600)
    # what a bare rank holds before any of the plan's terms: the interpreter, torch, DeepSpeed, gloo
    bare = subprocess.run([PY, "-c", "import resource, torch, deepspeed, ppllm.train; "
                           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                          cwd=REPO, env=run_env(1), capture_output=True, text=True, timeout=600)
    bare_mb = float(bare.stdout.strip().splitlines()[-1])
    log(plan.stdout.split("configured parts")[0].rstrip())
    log(f"pipe=2 run at max_seq_len {seq}, {steps} steps: {wall:.0f} s wall; a bare rank (python, torch, DeepSpeed) "
        f"{bare_mb:.0f} MB")
    res = {}
    for name in sorted(os.listdir(out)):
        with open(os.path.join(out, name)) as f:
            r = json.load(f)
        stage = r["rank"]  # dims [2, 1]: rank = stage
        above = r["peak_mb"] - bare_mb
        res[stage] = (r["peak_mb"], above, planned.get(stage, float("nan")))
        log(f"  stage {stage}: peak RSS {r['peak_mb']:.0f} MB, {above:.0f} MB above a bare rank; --plan "
            f"{planned.get(stage, float('nan')):.0f} MB; measured/planned {above / planned.get(stage, float('nan')):.2f}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="4096,8192,16384,32768")
    ap.add_argument("--families", default="llama,mistral,bloom")
    ap.add_argument("--dense-max-gb", type=float, default=4.0)
    ap.add_argument("--no-layers", action="store_true")
    ap.add_argument("--pipe", action="store_true", help="also the pipe=2 run at --pipe-seq")
    ap.add_argument("--pipe-seq", type=int, default=16384)
    ap.add_argument("--pipe-steps", type=int, default=3)
    a = ap.parse_args()
    if a.smoke:
        a.sizes, a.families, a.rounds = "1024,2048", "llama", 1
    sizes = [int(s) for s in a.sizes.split(",")]
    fams = a.families.split(",")
    result = []
    if not a.no_layers:
        r = layers(fams, sizes, a.rounds, a.dense_max_gb)
        ratios = [r[(f, sizes[-1], "blockwise")][0] / max(r[(f, sizes[0], "blockwise")][0], 1e-9) for f in fams]
        result.append(f"mem_ratio={max(ratios):.3f}")
        t = [r[(f, sizes[0], "blockwise")][1] / r[(f, sizes[0], "dense")][1] for f in fams if (f, sizes[0], "dense") in r]
        if t:
            result.append(f"time_ratio_{sizes[0] // 1024}k={max(t):.3f}")
    if a.pipe:
        p = pipe_run(a.pipe_seq, a.pipe_steps)
        for stage, (_, above, planned) in sorted(p.items()):
            result.append(f"rss_vs_plan_stage{stage}={above / planned:.3f}")
    log("RESULT " + " ".join(result))


if __name__ == "__main__":
    main()
