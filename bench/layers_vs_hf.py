"""ppllm's llama pipeline layers against transformers' LlamaForCausalLM: forward + backward.

One random llama is saved as a HF folder and converted with ``hg_to_pp``; the pipeline
layers (``SequentialModel`` over the family's layer list, loaded from the layer files)
and ``LlamaForCausalLM.from_pretrained`` (SDPA attention) then hold the same fp32
weights in the same process.  Each repetition runs loss + backward on the same batch
(one document per row: plain causal attention on both sides; ``--docs N``: N packed documents per row,
ppllm with its document ids, transformers with position ids restarting per document), the two models in
alternating order; the median times are compared. ``--attention`` picks ppllm's backend (blockwise,
the default, or dense).

    python bench/layers_vs_hf.py [--repeats 15] [--hidden 512] [--layers 4] [--seq 512] [--threads 1]
    python bench/layers_vs_hf.py --hidden 256 --layers 8 --seq 256 --vocab 2000 --docs 4   # vs_zero.py's model and rows

The last line is ``RESULT layers_vs_hf=<hf_time / ppllm_time>`` (> 1: ppllm is faster).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from _common import load_note, log, median


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: keep it small)")
    p.add_argument("--docs", type=int, default=1, help="packed documents per row (equal lengths)")
    p.add_argument("--attention", default="blockwise", choices=["blockwise", "dense"], help="ppllm's backend")
    a = p.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    from ppllm import convert as cm
    from models import load_family
    from ppllm.pipeline import SequentialModel
    from ppllm.tiny import make_llama

    torch.set_num_threads(a.threads)
    tmp = tempfile.mkdtemp(prefix="bench_layers_")
    try:
        hf_dir, pp_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "pp")
        make_llama(hf_dir, a.vocab, hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.6875) // 8 * 8,
                   num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 64),
                   num_key_value_heads=max(1, a.hidden // 128), max_position_embeddings=max(512, a.seq))
        cm.hg_to_pp(hf_dir, pp_dir, quiet=True)

        family, margs = load_family(pp_dir)
        ours = SequentialModel(family.build_specs(margs, a.attention))
        ours.load_layer_files(pp_dir)
        ours.train()
        loss_fn = family.loss_fn(margs)
        hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
        hf.train()

        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, a.vocab, (a.batch, a.seq), generator=g)
        doc = (torch.arange(a.seq) * a.docs // a.seq).expand(a.batch, a.seq).contiguous()
        starts = torch.searchsorted(doc[0], doc[0], right=False)  # first position of each token's document
        pos = (torch.arange(a.seq) - starts).expand(a.batch, a.seq).contiguous()
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]  # ppllm's rows carry already-shifted labels

        def step_ours() -> float:
            ours.zero_grad(set_to_none=True)
            loss = loss_fn(ours((ids, pos, doc)), labels)
            loss.backward()
            return float(loss.detach())

        def step_hf() -> float:
            hf.zero_grad(set_to_none=True)
            loss = hf(input_ids=ids, labels=ids, position_ids=pos if a.docs > 1 else None).loss
            loss.backward()
            return float(loss.detach())

        l_ours, l_hf = step_ours(), step_hf()
        g_ours = ours.layers[1].mlp.down_proj.weight.grad
        g_hf = hf.model.layers[0].mlp.down_proj.weight.grad
        grad_diff = float((g_ours - g_hf).abs().max())
        log(f"model: llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; batch {a.batch} x {a.seq}; "
            f"{a.docs} document(s) per row; fp32, {a.threads} thread(s); ppllm attention {a.attention}, transformers "
            f"{hf.config._attn_implementation}; {load_note()}")
        log(f"same weights: loss ppllm {l_ours:.6f} hf {l_hf:.6f}; max |grad diff| layer 0 down_proj {grad_diff:.2e}")

        times = {"ppllm": [], "hf": []}
        steps = {"ppllm": step_ours, "hf": step_hf}
        for r in range(a.warmup + a.repeats):
            order = ("ppllm", "hf") if r % 2 == 0 else ("hf", "ppllm")
            for name in order:
                t0 = time.perf_counter()
                steps[name]()
                dt = time.perf_counter() - t0
                if r >= a.warmup:
                    times[name].append(dt)
        t_ours, t_hf = median(times["ppllm"]), median(times["hf"])
        tok = a.batch * a.seq
        log(f"ppllm layers:     median {t_ours * 1e3:.1f} ms ({tok / t_ours:,.0f} tok/s) "
            f"min {min(times['ppllm']) * 1e3:.1f} max {max(times['ppllm']) * 1e3:.1f}")
        log(f"LlamaForCausalLM: median {t_hf * 1e3:.1f} ms ({tok / t_hf:,.0f} tok/s) "
            f"min {min(times['hf']) * 1e3:.1f} max {max(times['hf']) * 1e3:.1f}")
        log(f"after the runs: {load_note()}")
        log(f"RESULT layers_vs_hf={t_hf / t_ours:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
