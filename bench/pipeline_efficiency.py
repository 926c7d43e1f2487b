"""Pipeline efficiency: pipe=2 on two ranks against the ideal schedule built from one rank.

Both runs go through ``train_pp.py`` on the same random llama, the same packed rows and
the same micro-batches (micro batch b, m = gradient_accumulation_steps micro-batches per
step); each rank gets the same compute (``--threads`` per process, default 1).

  * single: dims [1, 1] on one process: every layer, m micro-batches one after the other;
  * pipe:   dims [2, 1] on two processes (1F1B schedule, ``parts: auto``).

With two equal stages the best a 1F1B schedule can do is (m + 1) slots of half a
micro-batch each, so

    ideal_pipe_time     = single_step_time * (m + 1) / (2 m)
    pipeline_efficiency = ideal_pipe_time / measured_pipe_step_time

Step times are the per-step ``step_time`` from metrics.jsonl, median over the steps after
``--warmup``, pooled over ``--rounds`` alternating single/pipe launches (the machine may be
shared; alternating spreads background load over both).  1.0 means no loss beyond the
bubble; what is lost is stage imbalance, activation send/recv and per-micro-batch overhead.
``--profile`` adds per-rank milliseconds per step for each pipeline instruction.

    python bench/pipeline_efficiency.py [--micro-batches 8] [--steps 10] [--hidden 256] [--layers 8] [--profile]

The last line is ``RESULT pipeline_efficiency=<fraction> ...``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from _common import launch, load_note, log, median, read_metrics, setup_tiny, steady, write_run_config


def run(cfg_path: str, nprocs: int, threads: int, profile_dir: str | None = None, skip: int = 3) -> float:
    script = "train_pp.py"
    env = None
    if profile_dir:  # the same run with every pipeline instruction timed (bench/_pipe_profile.py)
        script = "bench/_pipe_profile.py"
        env = {"PPLLM_PIPE_PROFILE": profile_dir, "PPLLM_PIPE_PROFILE_SKIP": str(skip)}
    _, wall = launch([script, "--config", cfg_path, "--quiet"], nprocs, threads=threads, env=env)
    return wall


def print_profile(label: str, folder: str) -> None:
    import json
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            prof = json.load(f)
        steps = max(1, prof["train_batch"][1])
        total = prof["train_batch"][0] / steps
        parts = {k: v[0] / steps for k, v in prof.items() if k != "train_batch" and v[1]}
        other = total - sum(parts.values())
        cells = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        log(f"  {label} {name[:-5]}: {total * 1e3:.0f} ms per step = {cells}, other {other * 1e3:.0f} (ms)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro-batches", type=int, default=8, help="m = gradient_accumulation_steps")
    p.add_argument("--micro-batch", type=int, default=2, help="rows per micro-batch")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--rounds", type=int, default=2, help="alternating single/pipe runs; steps are pooled")
    p.add_argument("--keep", default=None, help="keep the work folder here instead of a temp dir")
    p.add_argument("--profile", action="store_true", help="time every pipeline instruction per rank (ms per step)")
    a = p.parse_args()
    m = a.micro_batches

    tmp = a.keep or tempfile.mkdtemp(prefix="bench_pipe_")
    try:
        rows_needed = (a.steps + 1) * m * a.micro_batch
        words = a.seq * 0.45  # ~2.2 tokens per made-up word with a 2000-piece vocab
        s = setup_tiny(os.path.join(tmp, "m"), n_docs=int(rows_needed * 1.3) + 50, mean_words=words,
                       hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.75) // 8 * 8,
                       num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 32),
                       num_key_value_heads=max(1, a.hidden // 64), max_position_embeddings=max(512, a.seq))
        common = dict(pp_dir=s["pp"], data=s["data"], seq=a.seq, mbs=a.micro_batch, gas=m, steps=a.steps)
        log(f"model: llama hidden {a.hidden}, {a.layers} layers; {m} micro-batches of {a.micro_batch} x {a.seq} "
            f"tokens per step; {a.steps} steps ({a.warmup} warm-up) x {a.rounds} round(s); {a.threads} thread(s) "
            f"per process; {load_note()}")

        times = {"single": [], "pipe": []}
        per_round = []
        prof = {}
        for r in range(a.rounds):  # alternate the two, so background load hits both alike
            med = {}
            for kind, dims, nprocs in (("single", [1, 1], 1), ("pipe", [2, 1], 2)):
                save = os.path.join(tmp, f"{kind}{r}")
                cfg = write_run_config(os.path.join(tmp, f"{kind}{r}.yml"), save_path=save, dims=dims, **common)
                prof[kind] = os.path.join(tmp, f"profile_{kind}{r}") if a.profile else None
                wall = run(cfg, nprocs, a.threads, prof[kind], a.warmup)
                recs = read_metrics(save)
                steps = steady([x["step_time"] for x in recs], a.warmup)
                times[kind] += steps
                med[kind] = median(steps)
                if kind == "single":
                    tokens = [x["tokens"] for x in recs]
                    tok = median(steady(tokens, a.warmup))
                else:
                    assert [x["tokens"] for x in recs] == tokens, "the two runs saw different batches"
                log(f"round {r + 1}: {kind:6s} {med[kind]:.3f} s/step (median of {len(steps)}; min {min(steps):.3f}); "
                    f"process wall {wall:.1f} s; {load_note()}")
            per_round.append(med["single"] * (m + 1) / (2 * m) / med["pipe"])
        t_single, t_pipe = median(times["single"]), median(times["pipe"])
        ideal = t_single * (m + 1) / (2 * m)
        eff = ideal / t_pipe
        eff_min = min(times["single"]) * (m + 1) / (2 * m) / min(times["pipe"])
        log(f"single rank (dims [1,1]): {t_single:.3f} s/step, {tok / t_single:,.0f} tok/s")
        log(f"pipe=2     (dims [2,1]): {t_pipe:.3f} s/step, {tok / t_pipe:,.0f} tok/s")
        log(f"ideal pipe=2 step = single x (m+1)/(2m) = {t_single:.3f} x {(m + 1) / (2 * m):.4f} = {ideal:.3f} s")
        log(f"speed-up {t_single / t_pipe:.3f}x (ideal {2 * m / (m + 1):.3f}x); efficiency per round "
            f"{', '.join(f'{e:.3f}' for e in per_round)}; from the fastest steps {eff_min:.3f}")
        if a.profile:
            log("per-instruction time, ms per optimizer step (steps after the warm-up):")
            print_profile("single", prof["single"])
            print_profile("pipe", prof["pipe"])
        log(f"after the runs: {load_note()}")
        log(f"RESULT pipeline_efficiency={eff:.3f} speedup={t_single / t_pipe:.3f} ideal_speedup={2 * m / (m + 1):.3f} "
            f"efficiency_fastest_steps={eff_min:.3f}")
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
