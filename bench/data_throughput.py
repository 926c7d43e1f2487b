"""Data pipeline throughput and packing efficiency; ``--pretrain``: a long-tailed pretraining corpus.

Generates a mixed corpus (all five sample types, log-normal lengths), then measures
  * the whole pipeline (read, validate, render, tokenize, truncate, write the cache, pack)
    in tokens/s, against the raw tokenizer alone encoding the same texts in one batch;
  * packing efficiency (real tokens / token slots) against one sample per padded row.

    python bench/data_throughput.py [--samples 20000] [--max-seq-len 2048] [--tokenizer DIR] [--rounds 3]

The last line is ``RESULT data_vs_tokenizer=<ratio> packing_efficiency=<fraction>``.

    python bench/data_throughput.py --pretrain [--mb 200] [--max-seq-len 2048] [--workers N] [--rounds 3]

generates a web-like pretraining corpus (log-normal words per document, a long tail of documents
longer than max_seq_len) of at least ``--mb`` MB and reports
  * ``tokens_kept``: trained tokens in the packed rows / the tokens the raw tokenizer finds in
    the documents (text + EOS of each one: what a model can be trained to predict);
  * ``prepare_vs_tokenizer``: cold preparation (read, validate, render, tokenize on the worker
    pool, window, write the cache) in tokens/s against the raw tokenizer alone on the same cores
    (SentencePiece's own threads, or the HF tokenizer's), in chunks of documents;
  * peak RSS of preparing + packing a quarter of the corpus and all of it, each in a fresh
    process (the main process and, separately, the largest pool worker).
  * ``prepare_vs_tokenizer_cpu``: the same in CPU seconds (raw: the process and its threads;
    prepare: the main process and its pool workers), which other load on the machine does not change.
Last line: ``RESULT tokens_kept=<f> prepare_vs_tokenizer=<ratio> prepare_vs_tokenizer_cpu=<ratio>
rss_mb_quarter=<a> rss_mb_full=<b> worker_rss_mb_quarter=<c> worker_rss_mb_full=<d>``.
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


from data.dataset import build_rows, prepare_file
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


def make_pretrain_corpus(path: str, mb: float, seed: int, typed: bool = True) -> int:
    """Pretraining documents with log-normal word counts (median ~330 words, a tail past 20,000)
    until the file holds ``mb`` MB; returns the number of documents. ``typed=False``: bare
    ``{"text": ...}`` records, as FineWeb ships them."""
    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ren", "ta", "vo", "shi", "an", "qu", "el", "dor", "ni", "pa", "us", "ex", "ri",
            "the", "of", "and", "to", "in", "is", "was", "for"]
    vocab = np.asarray(["".join(rng.choice(syll, size=rng.integers(1, 4))) for _ in range(20000)] +
                       [",", ".", "\n"], dtype=object)
    target, n, size = mb * 1e6, 0, 0
    with open(path, "w") as f:
        while size < target:
            k = int(np.clip(rng.lognormal(np.log(330), 1.1), 5, 60000))
            # Zipf-like word frequencies, as in natural text
            w = vocab[np.minimum(rng.zipf(1.2, size=k) - 1, len(vocab) - 1)]
            rec = {"type": "pretrain", "text": " ".join(w.tolist())} if typed else {"text": " ".join(w.tolist())}
            line = json.dumps(rec) + "\n"
            f.write(line)
            size += len(line)
            n += 1
    return n


def _cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its waited-for children (pool workers)."""
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _raw_count(tok, path: str, docs_per_chunk: int = 512) -> tuple[int, int, float, float]:
    """(tokens of BOS + text + EOS, trainable targets, seconds encoding, CPU seconds encoding)
    with the raw tokenizer."""
    tokens = targets = 0
    spent = cpu = 0.0
    with open(path) as f:
        while True:
            texts = [json.loads(line)["text"] for _, line in zip(range(docs_per_chunk), f)]
            if not texts:
                break
            t0, c0 = time.perf_counter(), _cpu_seconds()
            lens = [len(x) for x in tok.encode_batch(texts)]
            spent += time.perf_counter() - t0
            cpu += _cpu_seconds() - c0
            tokens += sum(lens) + (2 if tok.adds_bos else 1) * len(lens)
            targets += sum(lens) + len(lens)
    return tokens, targets, spent, cpu


def _rss_child(path: str, tok_dir: str, max_len: int, workers: int | None) -> None:
    """Prepare + pack ``path`` from a cold cache in this fresh process; print the peak RSS."""
    import resource
    tok = load_tokenizer(tok_dir, "llama")
    template = get_template("auto", tok, "llama")
    build_rows([path], template, max_len, packing=True, seed=0, workers=workers)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"rss_mb": round(own, 1), "worker_rss_mb": round(kids, 1)}))


def _tokenizer(a, tmp):
    """--tokenizer, else the shipped llama-2 tokenizer, else a small SentencePiece model trained here."""
    tok_dir = a.tokenizer or (LLAMA2 if os.path.isdir(LLAMA2) else None)
    if tok_dir is None:
        from ppllm.tiny import train_sentencepiece
        tok_dir = train_sentencepiece(make_corpus(os.path.join(tmp, "t.jsonl"), 300, 1)[:2000],
                                      os.path.join(tmp, "tok"), vocab_size=2000)
    tok = load_tokenizer(tok_dir, "llama")
    return tok_dir, tok, get_template("auto", tok, "llama")


def pretrain_main(a) -> None:
    import subprocess
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        tok_dir, tok, template = _tokenizer(a, tmp)
        path = os.path.join(tmp, "corpus.jsonl")
        t0 = time.perf_counter()
        n_docs = make_pretrain_corpus(path, a.mb, a.seed)
        mb = os.path.getsize(path) / 1e6
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"corpus: {n_docs} pretraining documents, {mb:.1f} MB (generated in {time.perf_counter() - t0:.0f}s); "
              f"tokenizer {tok_dir} ({type(tok).__name__}); max_seq_len {a.max_seq_len}; {cores} cores")
        # best of --rounds, alternating; wall time (throughput) and CPU time (work per token, which
        # other load on a shared machine does not change)
        t_raw = t_prep = c_raw = c_prep = float("inf")
        for _ in range(a.rounds):
            corpus_tokens, corpus_targets, spent, cpu = _raw_count(tok, path)
            t_raw, c_raw = min(t_raw, spent), min(c_raw, cpu)
            shutil.rmtree(os.path.join(tmp, ".ppllm-cache"), ignore_errors=True)
            t0, c0 = time.perf_counter(), _cpu_seconds()
            src = prepare_file(path, template, a.max_seq_len, workers=a.workers)
            t_prep, c_prep = min(t_prep, time.perf_counter() - t0), min(c_prep, _cpu_seconds() - c0)
        t0 = time.perf_counter()
        rows, stats = build_rows([path], template, a.max_seq_len, packing=True, seed=a.seed)
        t_pack = time.perf_counter() - t0
        m = src.meta
        kept = stats.trained_tokens / corpus_targets
        print(f"raw tokenizer: {corpus_tokens} tokens (BOS + text + EOS) in {t_raw:.2f}s = "
              f"{corpus_tokens / t_raw:,.0f} tok/s ({c_raw:.1f} CPU s)")
        print(f"prepare (cold, {m['workers']} worker processes, writes the cache): {m['encoded_tokens']} tokens in "
              f"{t_prep:.2f}s = {m['encoded_tokens'] / t_prep:,.0f} tok/s ({c_prep:.1f} CPU s); packing from the "
              f"cache {t_pack:.2f}s")
        print(f"documents: {n_docs}, {stats.windowed} longer than max_seq_len split into {stats.windows} windows; "
              f"{stats.truncated} truncated, {stats.dropped} dropped")
        print(f"kept: {stats.trained_tokens} trained of {corpus_targets} trainable tokens ({kept:.6f}); "
              f"{stats.tokens} of {corpus_tokens} tokens in the rows; {stats.rows} rows, packing efficiency "
              f"{stats.efficiency:.4f}")
        assert m["encoded_tokens"] == corpus_tokens, (m["encoded_tokens"], corpus_tokens)
        # peak RSS: a quarter of the corpus and all of it, each prepared cold in a fresh process
        quarter = os.path.join(tmp, "quarter.jsonl")
        with open(path, "rb") as f, open(quarter, "wb") as g:
            for i, line in enumerate(f):
                if i % 4 == 0:
                    g.write(line)
        rss = {}
        for name, p in (("quarter", quarter), ("full", path)):
            shutil.rmtree(os.path.join(tmp, ".ppllm-cache"), ignore_errors=True)
            cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", p, "--tokenizer", tok_dir,
                   "--max-seq-len", str(a.max_seq_len)] + (["--workers", str(a.workers)] if a.workers else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rss[name] = json.loads(out)
            print(f"peak RSS, {name} corpus ({os.path.getsize(p) / 1e6:.0f} MB): main {rss[name]['rss_mb']:.0f} MB, "
                  f"largest worker {rss[name]['worker_rss_mb']:.0f} MB")
    ratio = (m["encoded_tokens"] / t_prep) / (corpus_tokens / t_raw)
    print(f"RESULT tokens_kept={kept:.6f} prepare_vs_tokenizer={ratio:.3f} prepare_vs_tokenizer_cpu={c_raw / c_prep:.3f} "
          f"rss_mb_quarter={rss['quarter']['rss_mb']:.0f} rss_mb_full={rss['full']['rss_mb']:.0f} "
          f"worker_rss_mb_quarter={rss['quarter']['worker_rss_mb']:.0f} "
          f"worker_rss_mb_full={rss['full']['worker_rss_mb']:.0f}")


def _write_formats(path: str, tmp: str) -> dict[str, str]:
    """The JSON Lines corpus also as .jsonl.zst and as Parquet (row groups of 1024 documents), both
    written streaming."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    out = {"jsonl": path, "jsonl.zst": os.path.join(tmp, "corpus.jsonl.zst"),
           "parquet": os.path.join(tmp, "corpus.parquet")}
    with open(path, "rb") as f, open(out["jsonl.zst"], "wb") as g:
        zstandard.ZstdCompressor(level=3).copy_stream(f, g)
    writer = None
    with open(path) as f:
        while True:
            texts = [json.loads(line)["text"] for _, line in zip(range(1024), f)]
            if not texts:
                break
            table = pa.table({"text": texts})
            writer = writer or pq.ParquetWriter(out["parquet"], table.schema, compression="zstd")
            writer.write_table(table)
    writer.close()
    return out


def _split_corpus(path: str, folder: str, parts: int) -> list[str]:
    """The corpus as ``parts`` Parquet files (documents dealt round-robin)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(folder)
    buckets = [[] for _ in range(parts)]
    with open(path) as f:
        for i, line in enumerate(f):
            buckets[i % parts].append(json.loads(line)["text"])
    files = []
    for k, texts in enumerate(buckets):
        files.append(os.path.join(folder, f"part{k:02d}.parquet"))
        pq.write_table(pa.table({"text": texts}), files[-1], row_group_size=1024)
    return files


def _share_child(spec: str, files: list[str], tok_dir: str, max_len: int, cache_dir: str) -> None:
    """Prepare share K/N of ``files`` (one tokenizing process: one "machine"); print its CPU seconds."""
    from ppllm.prepare import parse_share, share_files
    k, n = parse_share(spec)
    tok = load_tokenizer(tok_dir, "llama")
    template = get_template("auto", tok, "llama")
    open(os.path.join(cache_dir + ".go", f"ready{k}"), "w").close()
    while not os.path.exists(os.path.join(cache_dir + ".go", "go")):  # all preparers start working together
        time.sleep(0.01)
    c0, t0 = _cpu_seconds(), time.time()
    for i in share_files(files, [os.path.getsize(f) for f in files], k, n):
        prepare_file(files[i], template, max_len, workers=1, cache_dir=cache_dir)
    print(json.dumps({"cpu": _cpu_seconds() - c0, "start": t0, "end": time.time()}))


def formats_main(a) -> None:
    """Parquet and .jsonl.zst against the raw tokenizer; 2 preparers against 1; RSS flat in corpus size."""
    import subprocess
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        tok_dir, tok, template = _tokenizer(a, tmp)
        path = os.path.join(tmp, "corpus.jsonl")
        n_docs = make_pretrain_corpus(path, a.mb, a.seed, typed=False)
        files = _write_formats(path, tmp)
        sizes = ", ".join(f"{k} {os.path.getsize(v) / 1e6:.1f} MB" for k, v in files.items())
        print(f"corpus: {n_docs} bare-text documents ({sizes}); tokenizer {tok_dir}; max_seq_len {a.max_seq_len}; "
              f"workers {a.workers or 'all cores'}; {a.rounds} alternating rounds")
        ratios: dict[str, list[float]] = {k: [] for k in files}
        for r in range(a.rounds):
            for name, p in files.items():
                _, _, _, c_raw = _raw_count(tok, path)
                shutil.rmtree(os.path.join(tmp, ".ppllm-cache"), ignore_errors=True)
                c0 = _cpu_seconds()
                src = prepare_file(p, template, a.max_seq_len, workers=a.workers)
                c_prep = _cpu_seconds() - c0
                ratios[name].append(c_raw / c_prep)
                print(f"round {r + 1} {name}: raw tokenizer {c_raw:.1f} CPU s, prepare {c_prep:.1f} CPU s "
                      f"({src.meta['encoded_tokens']} tokens): {c_raw / c_prep:.3f}", flush=True)
        # 2 "machines" (two processes, each with its share of 8 files and one tokenizing process) against 1
        parts = _split_corpus(path, os.path.join(tmp, "parts"), 8)
        base = [sys.executable, os.path.abspath(__file__), "--tokenizer", tok_dir, "--max-seq-len", str(a.max_seq_len)]
        walls: dict[int, list[float]] = {1: [], 2: []}
        cpus: dict[int, list[float]] = {1: [], 2: []}
        for r in range(a.rounds):
            for n in (1, 2):
                cache = os.path.join(tmp, f"cache{n}-{r}")
                os.makedirs(cache + ".go")
                procs = [subprocess.Popen(base + ["--share-child", f"{k}/{n}", "--cache-dir", cache, *parts],
                                          stdout=subprocess.PIPE, text=True) for k in range(n)]
                while len(os.listdir(cache + ".go")) < n:  # interpreter start-up is not preparation
                    time.sleep(0.01)
                open(os.path.join(cache + ".go", "go"), "w").close()
                got = [json.loads(pr.communicate()[0].strip().splitlines()[-1]) for pr in procs]
                # from the first preparer starting to work to the last one done (interpreter start-up excluded)
                walls[n].append(max(g["end"] for g in got) - min(g["start"] for g in got))
                cpus[n].append(sum(g["cpu"] for g in got))
                assert len([e for e in os.listdir(cache) if not e.endswith("lock")]) == len(parts)
                shutil.rmtree(cache)
                shutil.rmtree(cache + ".go")
            print(f"round {r + 1} shares: 1 preparer {walls[1][-1]:.1f} s ({cpus[1][-1]:.1f} CPU s), 2 preparers "
                  f"{walls[2][-1]:.1f} s ({cpus[2][-1]:.1f} CPU s)", flush=True)
        # peak RSS: a quarter and all of the corpus, per format, each prepared cold in a fresh process
        rss = {}
        for name in ("jsonl.zst", "parquet"):
            quarter = os.path.join(tmp, "quarter.jsonl")
            with open(path, "rb") as f, open(quarter, "wb") as g:
                for i, line in enumerate(f):
                    if i % 4 == 0:
                        g.write(line)
            qdir = os.path.join(tmp, f"q-{name}")
            os.makedirs(qdir)
            q = _write_formats(quarter, qdir)[name]
            for label, p in (("quarter", q), ("full", files[name])):
                shutil.rmtree(os.path.join(os.path.dirname(p), ".ppllm-cache"), ignore_errors=True)
                cmd = base + ["--rss-child", p] + (["--workers", str(a.workers)] if a.workers else [])
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                rss[name, label] = json.loads(out)
                print(f"peak RSS {name} {label} ({os.path.getsize(p) / 1e6:.1f} MB): main {rss[name, label]['rss_mb']:.0f} "
                      f"MB, largest worker {rss[name, label]['worker_rss_mb']:.0f} MB", flush=True)

    def spread(v):
        return f"{min(v):.3f}..{max(v):.3f}"
    ws = [walls[1][i] / walls[2][i] for i in range(a.rounds)]
    cs = [cpus[2][i] / cpus[1][i] for i in range(a.rounds)]
    print(f"spread over rounds (min..max): parquet {spread(ratios['parquet'])}, jsonl.zst {spread(ratios['jsonl.zst'])}, "
          f"jsonl {spread(ratios['jsonl'])}; two preparers: speedup {spread(ws)}, CPU ratio {spread(cs)}")
    print(f"RESULT parquet_vs_tokenizer_cpu={np.median(ratios['parquet']):.3f} "
          f"zst_vs_tokenizer_cpu={np.median(ratios['jsonl.zst']):.3f} jsonl_vs_tokenizer_cpu={np.median(ratios['jsonl']):.3f} "
          f"two_preparers_speedup={np.median(ws):.2f} two_preparers_cpu_ratio={np.median(cs):.3f} "
          f"rss_mb_parquet_quarter={rss['parquet', 'quarter']['rss_mb']:.0f} rss_mb_parquet_full={rss['parquet', 'full']['rss_mb']:.0f} "
          f"rss_mb_zst_quarter={rss['jsonl.zst', 'quarter']['rss_mb']:.0f} rss_mb_zst_full={rss['jsonl.zst', 'full']['rss_mb']:.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: shared llama-2, else a tiny one)")
    p.add_argument("--template", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=None, help="best of N for both sides, alternating (default 3)")
    p.add_argument("--pretrain", action="store_true", help="the long-tailed pretraining corpus mode")
    p.add_argument("--mb", type=float, default=200.0, help="--pretrain: corpus size in MB")
    p.add_argument("--workers", type=int, default=None, help="--pretrain: tokenizing processes (default: all cores)")
    p.add_argument("--tmp", default=None, help="folder for the generated corpus (default: the system's)")
    p.add_argument("--formats", action="store_true",
                   help="Parquet and .jsonl.zst against the raw tokenizer, 2 preparers against 1, RSS per format")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--share-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rss_child:
        return _rss_child(a.rss_child, a.tokenizer, a.max_seq_len, a.workers)
    if a.share_child:
        return _share_child(a.share_child, a.files, a.tokenizer, a.max_seq_len, a.cache_dir)
    a.rounds = a.rounds or 3
    if a.pretrain:
        return pretrain_main(a)
    if a.formats:
        return formats_main(a)

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
