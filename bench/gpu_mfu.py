"""Model FLOPs utilisation on one GPU: ppllm against transformers Trainer + DeepSpeed ZeRO-1.

A llama of TinyLlama's shape (hidden 2048, 22 layers, 32 heads / 4 kv heads, ffn 5632,
vocab 32000), randomly initialised from its config.json, trained at seq 2048 in bf16 on
the same packed rows (ppllm's data pipeline; the Trainer worker rebuilds them in ppllm's
order) with the same micro batch, accumulation and optimizer (DeepSpeed AdamW):

  * ppllm: ``train_pp.py`` with dims [1, 1] (SDPA; and flash-attn 2 when it is installed);
  * Trainer: ``Trainer`` + DeepSpeed ZeRO-1, ``attn_implementation="sdpa"``.

MFU = real tokens/s x FLOPs per token / peak FLOP/s, with ppllm's FLOPs-per-token
formula (6 N + 12 L H S, ``ppllm.metrics.flops_per_token``) for both, and the device's
dense bf16 peak (``ppllm.metrics.PEAK_TFLOPS``, or ``--peak-tflops``).  Median over the
steps after ``--warmup``.

``--smoke`` runs the same code path on the CPU at a tiny size in fp32 (a few steps, one
process each); its peak is a measured fp32 matmul rate, so its MFU figures only show
that the path works.

    python bench/gpu_mfu.py [--steps 12] [--micro-batch 4] [--grad-accum 4]
    python bench/gpu_mfu.py --smoke

The last line is ``RESULT mfu_ppllm=<fraction> mfu_hf=<fraction> ratio=<ppllm / hf>``
(plus ``mfu_ppllm_flash=`` when flash-attn ran).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

from _common import (launch, load_note, log, make_tokenizer, median, read_metrics, steady,
                     write_corpus, write_run_config)

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000)
SMOKE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=2048)


def write_model_config(folder: str, shape: dict, seq: int) -> str:
    os.makedirs(folder, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": max(2048, seq),
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1,
           "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02, **shape}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return folder


def cpu_peak_tflops(threads: int) -> float:
    """Measured fp32 matmul rate of one process with `threads` threads (the smoke run's 'peak')."""
    import torch
    torch.set_num_threads(threads)
    n = 1024
    x, y = torch.randn(n, n), torch.randn(n, n)
    x @ y
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x @ y
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, fp32, a few steps")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (smoke: 128)")
    p.add_argument("--micro-batch", type=int, default=None, help="default 4 (smoke: 2)")
    p.add_argument("--grad-accum", type=int, default=None, help="default 4 (smoke: 2)")
    p.add_argument("--steps", type=int, default=None, help="default 12 (smoke: 4)")
    p.add_argument("--warmup", type=int, default=None, help="default 3 (smoke: 1)")
    p.add_argument("--peak-tflops", type=float, default=None, help="default: from the GPU name")
    p.add_argument("--no-hf", action="store_true", help="skip the Trainer baseline")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (smoke)")
    p.add_argument("--keep", default=None)
    a = p.parse_args()

    import torch
    from models import load_family
    from ppllm.metrics import device_peak_tflops, flops_per_token

    smoke = a.smoke
    if not smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or pass --smoke for the tiny CPU path")
    seq = a.seq or (128 if smoke else 2048)
    mbs = a.micro_batch or (2 if smoke else 4)
    gas = a.grad_accum or (2 if smoke else 4)
    steps = a.steps or (4 if smoke else 12)
    warmup = a.warmup if a.warmup is not None else (1 if smoke else 3)
    precision = "fp32" if smoke else "bf16"
    shape = SMOKE if smoke else TINYLLAMA

    tmp = a.keep or tempfile.mkdtemp(prefix="bench_mfu_")
    try:
        data = os.path.join(tmp, "corpus.jsonl")
        rows = (steps + 1) * mbs * gas
        texts = write_corpus(data, n_docs=int(rows * 1.3) + 20, mean_words=seq * 0.45, seed=0)
        tok = make_tokenizer(os.path.join(tmp, "tok"), texts, vocab_size=2000)
        model_dir = write_model_config(os.path.join(tmp, "model"), shape, seq)
        family, margs = load_family(model_dir)
        fpt = flops_per_token(family, margs, seq)
        n_params = sum(family.layer_param_counts(margs))
        if smoke:
            peak = a.peak_tflops or cpu_peak_tflops(a.threads)
            device = f"CPU ({a.threads} thread(s)/process; peak = measured fp32 matmul {peak:.3f} TFLOP/s)"
        else:
            peak = device_peak_tflops(a.peak_tflops)
            if peak is None:
                p.error(f"unknown peak for {torch.cuda.get_device_name()}: pass --peak-tflops")
            device = f"{torch.cuda.get_device_name()} (dense bf16 peak {peak:.0f} TFLOP/s)"
        log(f"device: {device}; {load_note()}")
        log(f"model: llama {n_params / 1e6:.1f}M params (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} "
            f"layers, vocab {shape['vocab_size']}), seq {seq}, {precision}; micro batch {mbs} x accum {gas}; "
            f"{steps} steps ({warmup} warm-up); {fpt / 1e9:.3f} GFLOP per token")

        def mfu(tps: float) -> float:
            return tps * fpt / (peak * 1e12)

        def ppllm_run(name: str, flash: bool) -> tuple[float, float, list[int]]:
            save = os.path.join(tmp, name)
            cfg = write_run_config(os.path.join(tmp, f"{name}.yml"), pp_dir=model_dir, save_path=save, data=data,
                                   dims=[1, 1], seq=seq, mbs=mbs, gas=gas, steps=steps, precision=precision,
                                   extra={"from_scratch": True, "tokenizer_path": tok, "use_flash_attn": flash,
                                          "peak_tflops": peak})
            launch(["train_pp.py", "--config", cfg, "--quiet"], 1, threads=a.threads, direct=smoke)
            m = read_metrics(save)
            t = median(steady([r["step_time"] for r in m], warmup))
            tps = median(steady([r["tokens"] for r in m], warmup)) / t
            return t, tps, [r["tokens"] for r in m]

        results = {}
        t, tps, tok_pp = ppllm_run("ppllm_sdpa", False)
        results["mfu_ppllm"] = mfu(tps)
        log(f"ppllm (SDPA):        {t:.3f} s/step, {tps:,.0f} tok/s, MFU {mfu(tps):.4f}")
        if not smoke and importlib.util.find_spec("flash_attn") is not None:
            t, tps, _ = ppllm_run("ppllm_flash", True)
            results["mfu_ppllm_flash"] = mfu(tps)
            log(f"ppllm (flash-attn):  {t:.3f} s/step, {tps:,.0f} tok/s, MFU {mfu(tps):.4f}")
        elif not smoke:
            log("ppllm (flash-attn): skipped, flash_attn is not installed")

        if not a.no_hf:
            out = os.path.join(tmp, "hf.json")
            launch(["bench/_hf_worker.py", "--model", model_dir, "--from-config", "--data", data, "--tokenizer", tok,
                    "--seq", str(seq), "--seed", "1", "--micro-batch", str(mbs), "--grad-accum", str(gas),
                    "--steps", str(steps), "--zero", "1", "--precision", precision, "--out", out], 1,
                   threads=a.threads, direct=smoke)
            with open(out) as f:
                r = json.load(f)
            if r["tokens"] != tok_pp[:len(r["tokens"])]:
                log("warning: the Trainer saw different token counts per step than ppllm")
            t = median(steady(r["step_times"], warmup))
            tps = median(steady(r["tokens"], warmup)) / t
            results["mfu_hf"] = mfu(tps)
            log(f"Trainer + ZeRO-1:    {t:.3f} s/step, {tps:,.0f} tok/s, MFU {mfu(tps):.4f}")
            results["ratio"] = results["mfu_ppllm"] / results["mfu_hf"]
        order = ["mfu_ppllm", "mfu_ppllm_flash", "mfu_hf", "ratio"]
        log("RESULT " + " ".join(f"{k}={results[k]:.4f}" for k in order if k in results))
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
