"""Data pipeline throughput and packing efficiency.

Generates a mixed corpus (all five sample types, log-normal lengths), then measures
  * the whole pipeline (read, validate, render, tokenize, truncate, write the cache, pack)
    in tokens/s, against the raw tokenizer alone encoding the same texts in one batch;
  * packing efficiency (real tokens / token slots) against one sample per padded row.

    python bench/data_throughput.py [--samples 20000] [--max-seq-len 2048] [--tokenizer DIR] [--rounds 3]

The last line is ``RESULT data_vs_tokenizer=<ratio> packing_efficiency=<fraction>``.
The real llama-2 tokenizer from ../shared/assets is used when present, else a small one is trained.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np


from data.dataset import build_rows
from data.templates import get_template
from data.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA2 = os.path.join(REPO, "..", "shared", "assets", "tokenizers", "llama2")


def make_corpus(path: str, n: int, seed: int) -> list[str]:
    """Write n mixed samples as JSON Lines; return every text field (what the raw tokenizer sees)."""
    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ren", "ta", "vo", "shi", "an", "qu", "el", "dor", "ni", "pa", "us", "ex", "ri"]
    words = ["".join(rng.choice(syll, size=rng.integers(1, 4))) for _ in range(3000)]

    def text(mean_words: float) -> str:
        k = int(np.clip(rng.lognormal(np.log(mean_words), 0.8), 3, 3000))
        ws = rng.choice(words, size=k)
        return " ".join(ws) + "."

    texts = []
    with open(path, "w") as f:
        for i in range(n):
            kind = ("pretrain", "instruct", "conversation", "conver_has_api", "ref_qa")[i % 5]
            if kind == "pretrain":
                rec = {"type": kind, "text": text(220)}
            elif kind == "instruct":
                rec = {"type": kind, "instruct": text(15), "input": text(30), "output": text(80)}
            elif kind == "conversation":
                rec = {"type": kind, "rounds": [[r, text(25 if r == "ask" else 60)]
                                                for _ in range(int(rng.integers(1, 4))) for r in ("ask", "ans")]}
            elif kind == "conver_has_api":
                act = {"inner_thought": text(10), "api_name": "search",
                       "api_param": json.dumps({"query": text(4)}), "api_res": text(50)}
                rec = {"type": kind, "api_desc": text(40),
                       "rounds": [["ask", text(20)], ["ans-api", {"actions": [act], "ans": text(50)}]]}
            else:
                rec = {"type": kind, "reference": text(150), "rounds": [["ask", text(15)], ["ans", text(30)]]}
            f.write(json.dumps(rec) + "\n")
            texts += _texts(rec)
    return texts


def _texts(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [t for k, v in obj.items() if k != "type" for t in _texts(v)]
    if isinstance(obj, list):
        return [t for v in obj if v not in ("ask", "ans", "ans-api") for t in _texts(v)]
    return []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: shared llama-2, else a tiny one)")
    p.add_argument("--template", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="best of N for both sides, alternating")
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = a.tokenizer or (LLAMA2 if os.path.isdir(LLAMA2) else None)
        if tok_dir is None:
            from ppllm.tiny import train_sentencepiece
            tok_dir = train_sentencepiece(make_corpus(os.path.join(tmp, "t.jsonl"), 300, 1)[:2000],
                                          os.path.join(tmp, "tok"), vocab_size=2000)
        tok = load_tokenizer(tok_dir, "llama")
        template = get_template(a.template, tok, "llama")
        path = os.path.join(tmp, "corpus.jsonl")
        texts = make_corpus(path, a.samples, a.seed)
        mb = os.path.getsize(path) / 1e6
        print(f"corpus: {a.samples} samples, {mb:.1f} MB; tokenizer {tok_dir} ({type(tok).__name__}); "
              f"template {template.name}; max_seq_len {a.max_seq_len}")

        # best of --rounds, alternating the two sides, each pipeline round cold (cache removed):
        # on a small shared machine single timings of either side vary by 20 %
        t_raw = t_pipe = float("inf")
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            raw = sum(len(x) for x in tok.encode_batch(texts))
            t_raw = min(t_raw, time.perf_counter() - t0)
            shutil.rmtree(os.path.join(tmp, ".ppllm-cache"), ignore_errors=True)
            t0 = time.perf_counter()
            rows, stats = build_rows([path], template, a.max_seq_len, packing=True, seed=a.seed)
            rows.get(np.arange(min(len(rows), 256)))  # assemble some rows too
            t_pipe = min(t_pipe, time.perf_counter() - t0)
        t0 = time.perf_counter()
        build_rows([path], template, a.max_seq_len, packing=True, seed=a.seed)
        t_cached = time.perf_counter() - t0

    raw_tps = raw / t_raw
    pipe_tps = stats.tokens / t_pipe
    print(f"raw tokenizer: {raw} tokens in {t_raw:.2f}s = {raw_tps:,.0f} tok/s")
    print(f"data pipeline (cold, writes the cache): {stats.tokens} tokens in {t_pipe:.2f}s = {pipe_tps:,.0f} tok/s "
          f"({stats.truncated} truncated, {stats.dropped} dropped)")
    print(f"data pipeline (cache hit): {t_cached:.2f}s")
    print(f"packing: {stats.rows} rows for {stats.docs} samples, efficiency {stats.efficiency:.4f}; "
          f"one sample per padded row: {stats.padded_efficiency:.4f}")
    print(f"RESULT data_vs_tokenizer={pipe_tps / raw_tps:.3f} packing_efficiency={stats.efficiency:.4f}")


if __name__ == "__main__":
    main()
