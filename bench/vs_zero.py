"""ppllm pipe=2 against transformers Trainer + DeepSpeed ZeRO-1 / ZeRO-3 data-parallel 2.

Same random llama (one HF folder; ppllm loads its hg_to_pp conversion), same packed rows
in the same order (the worker rebuilds them with ppllm's data pipeline and StepLoader
order), same optimizer (DeepSpeed's AdamW config, torch implementation on CPU), same
global batch per optimizer step (ppllm: micro batch b x m micro-batches x pipe 2;
Trainer: micro batch b x m/2 accumulation x 2 replicas), same precision.  All three run
as two processes through the ``deepspeed`` launcher with ``--threads`` per process.

Throughput = real (non-pad) tokens per optimizer step / step wall time, median over the
steps after ``--warmup``, pooled over ``--rounds`` alternating launches; ppllm's step times
come from metrics.jsonl, the Trainer's from a callback at every optimizer step.
vs_zeroN = ppllm tokens/s / Trainer ZeRO-N tokens/s.

    python bench/vs_zero.py [--steps 10] [--micro-batches 8] [--hidden 256] [--layers 8]
    python bench/vs_zero.py --attention dense     # ppllm on SDPA with a [B, 1, S, S] mask instead of blockwise
    python bench/vs_zero.py --cross-doc           # the Trainer without a document mask (cheaper, not the same attention)

The Trainer keeps attention inside each packed document with a [1, S, S] mask per row, as ppllm does.

The last line is ``RESULT vs_zero1=<ratio> vs_zero3=<ratio>``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from _common import launch, load_note, log, median, read_metrics, setup_tiny, steady, write_run_config


def hf_run(s: dict, out: str, zero: int, a, world: int = 2) -> dict:
    cmd = ["bench/_hf_worker.py", "--model", s["hf"], "--data", s["data"], "--tokenizer", s["tok"],
           "--seq", str(a.seq), "--seed", "1", "--micro-batch", str(a.micro_batch),
           "--grad-accum", str(a.micro_batches // world), "--steps", str(a.steps), "--zero", str(zero),
           "--precision", "fp32", "--out", out] + (["--cross-doc"] if a.cross_doc else [])
    launch(cmd, world, threads=a.threads)
    with open(out) as f:
        return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro-batches", type=int, default=8, help="per optimizer step, whole job (even)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="alternating ppllm / ZeRO-1 / ZeRO-3 launches; steps pooled")
    p.add_argument("--keep", default=None)
    p.add_argument("--attention", default="blockwise", choices=["blockwise", "dense"], help="ppllm's attention backend")
    p.add_argument("--cross-doc", action="store_true", help="the Trainer attends across packed documents (no document mask)")
    a = p.parse_args()
    if a.micro_batches % 2:
        p.error("--micro-batches must be even (split over two data-parallel replicas)")

    tmp = a.keep or tempfile.mkdtemp(prefix="bench_zero_")
    try:
        rows_needed = (a.steps + 1) * a.micro_batches * a.micro_batch
        s = setup_tiny(os.path.join(tmp, "m"), n_docs=int(rows_needed * 1.3) + 50, mean_words=a.seq * 0.45,
                       hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.75) // 8 * 8,
                       num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 32),
                       num_key_value_heads=max(1, a.hidden // 64), max_position_embeddings=max(512, a.seq))
        log(f"model: llama hidden {a.hidden}, {a.layers} layers; {a.micro_batches} x {a.micro_batch} rows of {a.seq} "
            f"tokens per optimizer step; {a.steps} steps ({a.warmup} warm-up) x {a.rounds} round(s); fp32; "
            f"2 processes x {a.threads} thread(s); {load_note()}")

        times: dict[str, list[float]] = {"ppllm": [], "zero1": [], "zero3": []}
        tokens: dict[str, list[int]] = {k: [] for k in times}
        failed: dict[str, str] = {}
        for r in range(a.rounds):  # alternate the three, so background load hits all alike
            save = os.path.join(tmp, f"pipe{r}")
            cfg = write_run_config(os.path.join(tmp, f"pipe{r}.yml"), pp_dir=s["pp"], save_path=save, data=s["data"],
                                   dims=[2, 1], seq=a.seq, mbs=a.micro_batch, gas=a.micro_batches, steps=a.steps,
                                   extra={"attention": a.attention})
            _, wall = launch(["train_pp.py", "--config", cfg, "--quiet"], 2, threads=a.threads)
            mp = read_metrics(save)
            tok_pp = [x["tokens"] for x in mp]
            steps = steady([x["step_time"] for x in mp], a.warmup)
            times["ppllm"] += steps
            tokens["ppllm"] += steady(tok_pp, a.warmup)
            log(f"round {r + 1}: ppllm pipe=2 {median(steps):.3f} s/step (process wall {wall:.1f} s); {load_note()}")
            for zero in (1, 3):
                key = f"zero{zero}"
                if key in failed:
                    continue
                try:
                    res = hf_run(s, os.path.join(tmp, f"hf_{key}_{r}.json"), zero, a)
                except Exception as e:  # report what could be measured
                    failed[key] = str(e)[-2000:]
                    log(f"Trainer ZeRO-{zero}: could not run: {failed[key]}")
                    continue
                if res["tokens"] != tok_pp[:len(res["tokens"])]:
                    log(f"warning: Trainer ZeRO-{zero} saw different token counts per step than ppllm")
                steps = steady(res["step_times"], a.warmup)
                times[key] += steps
                tokens[key] += steady(res["tokens"], a.warmup)
                log(f"round {r + 1}: Trainer ZeRO-{zero} dp=2 {median(steps):.3f} s/step; {load_note()}")

        tps = {k: median(tokens[k]) / median(times[k]) for k in times if times[k]}
        log(f"ppllm pipe=2:          {median(times['ppllm']):.3f} s/step, {tps['ppllm']:,.0f} tok/s")
        results = {}
        for zero in (1, 3):
            key = f"zero{zero}"
            if key in tps:
                results[zero] = tps["ppllm"] / tps[key]
                log(f"Trainer ZeRO-{zero} dp=2:  {median(times[key]):.3f} s/step, {tps[key]:,.0f} tok/s "
                    f"-> ppllm / ZeRO-{zero} = {results[zero]:.3f}")
        bubble = 1 / (a.micro_batches + 1)
        log(f"for scale: the 1F1B bubble at pipe 2 with {a.micro_batches} micro-batches idles each stage "
            f"{bubble:.1%} of the step; data parallelism has no bubble")
        log(f"after the runs: {load_note()}")
        line = "RESULT " + " ".join(f"vs_zero{z}={v:.3f}" for z, v in sorted(results.items()))
        log(line if results else "RESULT vs_zero1=nan vs_zero3=nan")
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
