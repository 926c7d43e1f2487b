"""Shared test utilities: tiny checkpoints, synthetic batches, DeepSpeed launches."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_ASSETS = os.path.join(REPO, "..", "shared", "assets")
PY = sys.executable
DEEPSPEED = os.path.join(os.path.dirname(PY), "deepspeed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(cmd: list[str], timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own: on a timeout (or the test's own timeout interrupting the
    wait) the whole process group goes, not only the launcher. A launcher killed alone leaves its ranks
    running, one of them possibly spinning on a peer forever and slowing every later test."""
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(p)
        out, err = p.communicate()
        raise AssertionError(f"{' '.join(cmd)} still running after {timeout} s (killed with its process "
                             f"group):\n{out[-6000:]}\n{err[-6000:]}") from None
    finally:
        if p.poll() is None:
            _kill_group(p)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def launch(script_args: list[str], nprocs: int, timeout: int = 400, env: dict | None = None) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N ...` on CPU with a free master port; output captured."""
    cmd = [DEEPSPEED, "--num_gpus", str(nprocs), "--master_port", str(free_port())] + script_args
    e = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e["PATH"] = os.path.dirname(PY) + os.pathsep + e.get("PATH", "")
    if env:
        e.update(env)
    p = run_group(cmd, timeout, env=e)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}")
    return p


def run(cmd: list[str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    p = run_group(cmd, timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def synthetic_batches(seed: int, n_micro: int, mbs: int, seq: int, vocab: int):
    """Micro-batches of packed rows with very unequal numbers of trained tokens.

    Returns a list of ((ids, pos, doc), labels). Rows hold 1-3 documents plus padding;
    only random spans are trained, and the amount trained differs a lot between
    micro-batches, so a mean of per-micro-batch means would give different gradients.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in range(n_micro):
        ids = torch.randint(3, vocab, (mbs, seq), generator=g)
        pos = torch.zeros(mbs, seq, dtype=torch.long)
        doc = torch.full((mbs, seq), -1, dtype=torch.long)
        labels = torch.full((mbs, seq), -100, dtype=torch.long)
        for r in range(mbs):
            at, d = 0, 0
            n_docs = int(torch.randint(1, 4, (1,), generator=g))
            for _ in range(n_docs):
                n = int(torch.randint(4, seq // 2, (1,), generator=g))
                n = min(n, seq - at)
                if n < 2:
                    break
                pos[r, at:at + n] = torch.arange(n)
                doc[r, at:at + n] = d
                # train a span whose size depends strongly on the micro-batch index
                frac = 0.1 if m % 2 == 0 else 0.9
                start = int(n * (1 - frac))
                labels[r, at + start:at + n - 1] = ids[r, at + start + 1:at + n]
                at, d = at + n, d + 1
        out.append(((ids, pos, doc), labels))
    return out


def token_weighted_loss(model, batches) -> torch.Tensor:
    import torch.nn.functional as F
    total = torch.zeros(())
    count = 0
    for inputs, labels in batches:
        logits = model(inputs)
        total = total + F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                        reduction="sum")
        count += int((labels != -100).sum())
    return total / count


def tiny_pipeline_model(root, texts: list[str], layers: int = 2, seed: int = 3, **llama_kw):
    """A tokenizer trained on the demo samples, a tiny llama converted to a pipeline folder,
    and a JSONL file of pretrain samples. Returns (pp_dir, data_file)."""
    import json

    from transformers import AutoTokenizer

    from ppllm import convert as cm
    from ppllm.tiny import make_llama, sample_texts, train_sentencepiece
    tok = train_sentencepiece(sample_texts(f"{REPO}/data/samples/demo.json"), str(root / "tok"))
    vocab = len(AutoTokenizer.from_pretrained(tok))
    make_llama(str(root / "hf"), vocab, tokenizer_dir=tok, seed=seed, num_hidden_layers=layers, **llama_kw)
    cm.hg_to_pp(str(root / "hf"), str(root / "pp"), quiet=True)
    data = root / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"type": "pretrain", "text": t}) for t in texts))
    return root / "pp", data


def read_metrics(path) -> list[dict]:
    import json
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def seed_lora(layers) -> int:
    """Give every LoRA adapter of ``layers`` ((global layer index, module) pairs) values fixed by its layer
    index and name, both factors non-zero, so a pipelined and an unpipelined model start alike and both
    adapter matrices get gradients in the first step. Returns the number of adapted modules."""
    import zlib

    from ppllm.lora import LoRALinear
    n = 0
    with torch.no_grad():
        for idx, layer in layers:
            for name, m in layer.named_modules():
                if isinstance(m, LoRALinear):
                    g = torch.Generator().manual_seed(1000 * idx + zlib.crc32(name.encode()) % 1000)
                    for lin in (m.lora_A, m.lora_B):
                        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)
                    n += 1
    return n
