"""Shared pieces of the benchmarks: tiny corpora, tokenizers, models, run configs and launches.

Nothing here measures anything; each ``bench/*.py`` script does its own timing and
prints its own ``RESULT`` line.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
DEEPSPEED = os.path.join(os.path.dirname(PY), "deepspeed")


def log(*args) -> None:
    print(*args, flush=True)


def load_note() -> str:
    """1-minute load average against the core count: other work on a shared machine skews timings."""
    return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(threads: int = 1, extra: dict | None = None) -> dict:
    """Environment for a worker: CPU accelerator unless a GPU is there, fixed thread count."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false")
    if "DS_ACCELERATOR" not in env:
        import torch
        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    env["PATH"] = os.path.dirname(PY) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    if extra:
        env.update(extra)
    return env


def launch(script_args: list[str], nprocs: int, threads: int = 1, timeout: int = 1800,
           env: dict | None = None, direct: bool = False) -> tuple[subprocess.CompletedProcess, float]:
    """`deepspeed --num_gpus N script ...`; returns (process, wall seconds).

    ``direct`` with one process skips the launcher and sets the rendezvous variables
    itself (what the launcher would set), saving a few seconds of start-up.
    """
    e = run_env(threads, env)
    if direct and nprocs == 1:
        e.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(free_port()))
        cmd = [PY] + script_args
    else:
        cmd = [DEEPSPEED, "--num_gpus", str(nprocs), "--master_port", str(free_port())] + script_args
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-5000:]}\n{p.stderr[-5000:]}")
    return p, wall


# ----------------------------------------------------------------------------------------
# data, tokenizer, model


def write_corpus(path: str, n_docs: int, mean_words: float, seed: int = 0) -> list[str]:
    """Pretrain samples of made-up words with log-normal lengths, as JSON Lines; returns the texts."""
    import numpy as np
    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ren", "ta", "vo", "shi", "an", "qu", "el", "dor", "ni", "pa", "us", "ex", "ri"]
    words = ["".join(rng.choice(syll, size=rng.integers(1, 4))) for _ in range(3000)]
    texts = []
    with open(path, "w") as f:
        for _ in range(n_docs):
            k = int(np.clip(rng.lognormal(np.log(mean_words), 0.6), 5, 20 * mean_words))
            text = " ".join(rng.choice(words, size=k)) + "."
            texts.append(text)
            f.write(json.dumps({"type": "pretrain", "text": text}) + "\n")
    return texts


def make_tokenizer(out_dir: str, texts: list[str], vocab_size: int = 2000) -> str:
    from ppllm.tiny import train_sentencepiece
    return train_sentencepiece(texts[:3000], out_dir, vocab_size=vocab_size)


def tokenizer_vocab(tok_dir: str) -> int:
    from transformers import AutoTokenizer
    return len(AutoTokenizer.from_pretrained(tok_dir))


def make_models(root: str, tok_dir: str, seed: int = 0, model_vocab: int | None = None,
                **llama_kw) -> tuple[str, str]:
    """A random llama as a HF folder (root/hf) and its pipeline folder (root/pp). ``model_vocab``
    gives the model more vocabulary rows than the tokenizer has (a large-vocabulary head)."""
    from ppllm import convert as cm
    from ppllm.tiny import make_llama
    hf, pp = os.path.join(root, "hf"), os.path.join(root, "pp")
    make_llama(hf, max(model_vocab or 0, tokenizer_vocab(tok_dir)), tokenizer_dir=tok_dir, seed=seed, **llama_kw)
    cm.hg_to_pp(hf, pp, quiet=True)
    return hf, pp


def setup_tiny(root: str, n_docs: int, mean_words: float, vocab_size: int = 2000, seed: int = 0,
               model_vocab: int | None = None, **llama_kw) -> dict:
    """Corpus + tokenizer + random llama (HF and pipeline folders) under root."""
    os.makedirs(root, exist_ok=True)
    data = os.path.join(root, "corpus.jsonl")
    texts = write_corpus(data, n_docs, mean_words, seed)
    tok = make_tokenizer(os.path.join(root, "tok"), texts, vocab_size)
    hf, pp = make_models(root, tok, seed=seed, model_vocab=model_vocab, **llama_kw)
    return {"data": data, "tok": tok, "hf": hf, "pp": pp, "root": root}


# ----------------------------------------------------------------------------------------
# ppllm runs


def write_run_config(path: str, *, pp_dir: str, save_path: str, data: str, dims: list[int], seq: int, mbs: int,
                     gas: int, steps: int, precision: str = "fp32", extra: dict | None = None) -> str:
    import yaml
    cfg = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": dims}, "parts": "auto"},
           "model_path": pp_dir, "save_path": save_path, "data_path": data, "max_seq_len": seq,
           "packing": True, "max_steps": steps, "n_epoches": 1000, "template": "plain", "seed": 1,
           "train_micro_batch_size_per_gpu": mbs, "gradient_accumulation_steps": gas,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.0}},
           "lr_schedule": {"type": "constant"}, "gradient_clipping": 1.0, "precision": precision,
           "log_interval": 0, "watchdog_timeout": 0}
    cfg.update(extra or {})
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def read_metrics(save_path: str) -> list[dict]:
    with open(os.path.join(save_path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def steady(values: list[float], skip: int) -> list[float]:
    """Drop the first `skip` (warm-up) values; keep at least one."""
    return values[skip:] if len(values) > skip else values[-1:]


def median(values: list[float]) -> float:
    return float(statistics.median(values))
