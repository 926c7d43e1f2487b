"""Is this GPU ready for ppllm? One command, one table, in a few minutes, with no network.

    make gpu-check                        # on a machine with one CUDA GPU
    python scripts/gpu_check.py --smoke   # the same path on the CPU (gloo, tiny sizes): the suite runs it

Checks, in order (each row of the table says what it measured):

1. probe    the device, its bf16 support, the versions; a process group of one rank on the
            device's backend (NCCL) and ppllm's control-plane collectives on it;
2. kernels  a llama-shaped model at real head dims (64) and 1,024 packed tokens (several
            documents and padding) in bf16 on the device against the same weights in fp32 on
            the CPU: logits, the chunked loss and its gradient;
3. launch   ``deepspeed --num_gpus 1 train_pp.py`` at pipe=1 x data=1 in bf16 (fp32 gradient
            sums): train with evaluation and saves, a second launch that resumes, ``pp_to_hg``,
            then transformers' logits of the export against ppllm's on the device;
4. mfu      ``bench/gpu_mfu.py`` (ppllm against Trainer + ZeRO-1 at TinyLlama's shape).

Exit status 0 when every check passed. ``--out DIR`` also writes the table there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str, float]] = []

    def run(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            detail = fn()
            status = "ok"
        except Exception as e:  # noqa: BLE001 - a failed check is a row, the next check still runs
            detail, status = " ".join(f"{type(e).__name__}: {e}".split())[:400], "FAILED"
        self.rows.append((name, status, detail, time.perf_counter() - t0))
        print(f"[gpu-check] {name}: {status} ({time.perf_counter() - t0:.1f} s) {detail}", flush=True)

    def render(self) -> str:
        lines = ["| check | result | measured | seconds |", "|---|---|---|---|"]
        lines += [f"| {n} | {s} | {d} | {t:.1f} |" for n, s, d, t in self.rows]
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        return all(s == "ok" for _, s, _, _ in self.rows)


def env_for(device: str) -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu" if device == "cpu" else "cuda")
    e.setdefault("OMP_NUM_THREADS", "2")
    e["PATH"] = os.path.dirname(PY) + os.pathsep + e.get("PATH", "")
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    return e


# ---------------------------------------------------------------------------------------------
# 1. probe


def probe(device: str) -> str:
    import torch
    import torch.distributed as dist

    import deepspeed
    from ppllm import collectives
    parts = [f"torch {torch.__version__}", f"deepspeed {deepspeed.__version__}"]
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        torch.cuda.set_device(0)
        parts += [torch.cuda.get_device_name(0), f"bf16={torch.cuda.is_bf16_supported()}",
                  f"{torch.cuda.get_device_properties(0).total_memory / 2 ** 30:.0f} GiB"]
        if not torch.cuda.is_bf16_supported():
            raise RuntimeError("this GPU has no bf16")
    try:
        import flash_attn  # noqa: F401
        parts.append("flash-attn present")
    except ImportError:
        parts.append("no flash-attn (SDPA)")
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        got = collectives.all_reduce([1.0, 2.5])
        obj = collectives.broadcast_object({"x": 1}, src=0)
        collectives.barrier()
        if got != [1.0, 2.5] or obj != {"x": 1}:
            raise RuntimeError(f"collectives returned {got}, {obj}")
        parts.append(f"{backend} world 1: all_reduce/broadcast/barrier on {collectives.comm_device()}")
    finally:
        dist.destroy_process_group()
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# 2. kernels


def kernels(device: str, smoke: bool) -> str:
    import torch
    import torch.nn.functional as F

    from models import load_family
    from models.common import TokenLoss
    from ppllm.pipeline import SequentialModel
    from ppllm.tiny import make_llama
    from ppllm import convert
    work = os.path.join(RUN_DIR, "kernels")
    hidden = 256 if smoke else 512  # head dim 64 either way
    hf = make_llama(os.path.join(work, "hf"), 4096, seed=1, hidden_size=hidden, intermediate_size=2 * hidden,
                    num_hidden_layers=2, num_attention_heads=hidden // 64, num_key_value_heads=2,
                    max_position_embeddings=2048)
    pp = os.path.join(work, "pp")
    convert.hg_to_pp(hf, pp, force=True, quiet=True)
    fam, margs = load_family(pp)
    g = torch.Generator().manual_seed(0)
    S, B = (512, 1) if smoke else (1024, 2)
    ids = torch.randint(3, margs.vocab_size, (B, S), generator=g)
    pos = torch.zeros(B, S, dtype=torch.long)
    doc = torch.full((B, S), -1, dtype=torch.long)
    for r, lengths in enumerate([(150, 250, 75), (350, 125)][:B] if smoke else [(300, 500, 150), (700, 250)]):
        # several documents, then padding
        at = 0
        for d, n in enumerate(lengths):
            pos[r, at:at + n] = torch.arange(n)
            doc[r, at:at + n] = d
            at += n
    labels = torch.where(doc >= 0, torch.roll(ids, -1, 1), torch.full_like(ids, -100))

    def run(dev, dtype):
        model = SequentialModel(fam.build_specs(margs), logits=False)
        model.load_layer_files(pp)
        model = model.to(dev, dtype)
        inputs = tuple(t.to(dev) for t in (ids, pos, doc))
        out = model(inputs)
        loss = TokenLoss()(out, labels.to(dev))
        loss.backward()
        head = [p for n, p in model.named_parameters() if n.startswith(f"layers.{len(model.layers) - 1}.")][0]
        logits = out.logits()
        return logits.float().cpu(), float(loss), head.grad.float().cpu()

    ref_logits, ref_loss, ref_grad = run("cpu", torch.float32)
    logits, loss, grad = run(device, torch.bfloat16)
    real = doc >= 0
    err = (logits - ref_logits)[real].abs().max().item() / ref_logits[real].abs().max().item()
    loss_err = abs(loss - ref_loss) / ref_loss
    grad_err = ((grad - ref_grad).norm() / ref_grad.norm()).item()
    ce = F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), ignore_index=-100).item()
    # bf16 keeps 8 bits: relative errors of a few 2^-8 through two layers; fp32's loss equals plain CE
    bound = 8 * 2 ** -8
    if not (err < bound and loss_err < bound and grad_err < 2 * bound and abs(ce - ref_loss) < 1e-4 * ref_loss):
        raise RuntimeError(f"logits rel err {err:.2e}, loss rel err {loss_err:.2e}, head grad rel err {grad_err:.2e}, "
                           f"fp32 chunked loss {ref_loss:.6f} vs cross_entropy {ce:.6f} (bound {bound:.2e})")
    return (f"bf16 on {device} vs fp32: logits {err:.1e}, loss {loss_err:.1e}, head grad {grad_err:.1e} "
            f"(bound {bound:.1e}); S={S}, head dim {margs.head_dim}")


# ---------------------------------------------------------------------------------------------
# 3. a real launch


def launch(device: str) -> str:
    import torch
    import yaml

    from ppllm import convert
    from ppllm.tiny import make_llama, sample_texts, train_sentencepiece
    work = os.path.join(RUN_DIR, "launch")
    tok = train_sentencepiece(sample_texts(os.path.join(REPO, "data/samples/demo.json")), os.path.join(work, "tok"))
    from transformers import AutoTokenizer
    vocab = len(AutoTokenizer.from_pretrained(tok))
    hf = make_llama(os.path.join(work, "hf"), vocab, tokenizer_dir=tok, seed=2, hidden_size=128,
                    intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    pp = os.path.join(work, "pp")
    convert.hg_to_pp(hf, pp, force=True, quiet=True)
    save = os.path.join(work, "ckpt")
    base = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}},
            "model_path": pp, "save_path": save, "data_path": os.path.join(REPO, "data/samples/demo.json"),
            "eval_data_path": os.path.join(REPO, "data/samples/demo.json"), "eval_interval": 3,
            "max_seq_len": 128, "max_steps": 4, "n_epoches": 100, "save_interval": 2, "seed": 3,
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "precision": "bf16",
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "gradient_clipping": 1.0,
            "log_interval": 1}
    cfg = os.path.join(work, "run.yml")
    ds = os.path.join(os.path.dirname(PY), "deepspeed")
    ds_cmd = [ds] if os.path.exists(ds) else [PY, "-m", "deepspeed.launcher.runner"]
    outs = []
    for steps in (4, 6):
        with open(cfg, "w") as f:
            yaml.safe_dump({**base, "max_steps": steps}, f)
        p = subprocess.run(ds_cmd + ["--num_gpus", "1", "--master_port", str(free_port()), "train_pp.py",
                                     "--config", cfg], cwd=REPO, env=env_for(device), capture_output=True, text=True,
                           timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"launch to step {steps} failed ({p.returncode}): {p.stdout[-1500:]} {p.stderr[-1500:]}")
        outs.append(p.stdout)
    need = ["gradients summed in fp32, reduced across data replicas in fp32", "resumed from"]
    if "gradients summed in fp32, reduced across data replicas in fp32" not in outs[0] or f"resumed from {save}/global_step4 at step 4" not in outs[1]:
        raise RuntimeError(f"expected {need} in the launch logs: {outs[0][-800:]} {outs[1][-800:]}")
    metrics = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl")) if line.strip()]
    if [m["step"] for m in metrics] != list(range(1, 7)) or not all(math.isfinite(m["loss"]) for m in metrics):
        raise RuntimeError(f"metrics.jsonl: {metrics}")
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    export = os.path.join(work, "export")
    convert.pp_to_hg(save, export, force=True, quiet=True)
    from transformers import AutoModelForCausalLM

    from models import load_family
    from ppllm.pipeline import SequentialModel
    dev = torch.device(device)
    hf_model = AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32).to(dev).eval()
    fam, margs = load_family(export)
    ours = SequentialModel(fam.build_specs(margs))
    ours.load_layer_files(os.path.join(save, "global_step6"))
    ours = ours.to(dev).float().eval()
    ids = torch.randint(3, vocab, (2, 96), generator=torch.Generator().manual_seed(5)).to(dev)
    pos = torch.arange(96, device=dev).expand(2, 96)
    with torch.no_grad():
        a = hf_model(ids).logits.float()
        b = ours((ids, pos, torch.zeros_like(ids))).float()
    diff = (a - b).abs().max().item() / a.abs().max().item()
    if diff > 1e-3:  # TF32 matmuls on the GPU (both sides) leave ~1e-4
        raise RuntimeError(f"exported model's logits differ from ppllm's by {diff:.2e} (relative)")
    return (f"6 steps (4 + resumed 2), loss {metrics[0]['loss']:.3f} -> {metrics[-1]['loss']:.3f}, eval "
            f"{', '.join(f'{e:.3f}' for e in evals)}; export vs ppllm logits rel diff {diff:.1e}")


# ---------------------------------------------------------------------------------------------
# 4. MFU


def mfu(device: str, smoke: bool) -> str:
    args = [PY, os.path.join(REPO, "bench", "gpu_mfu.py")] + (["--smoke"] if smoke else [])
    p = subprocess.run(args, cwd=os.path.join(REPO, "bench"), env=env_for(device), capture_output=True, text=True,
                       timeout=900)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"bench/gpu_mfu.py failed ({p.returncode}): {p.stdout[-1500:]} {p.stderr[-1500:]}")
    return lines[-1][len("RESULT "):]


RUN_DIR = os.path.join(REPO, "runs", "gpu_check")


def main() -> int:
    global RUN_DIR
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the same checks on the CPU at tiny sizes")
    ap.add_argument("--skip-mfu", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="also write the table here")
    ap.add_argument("--work", default=RUN_DIR)
    args = ap.parse_args()
    RUN_DIR = args.work
    os.makedirs(RUN_DIR, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    os.environ["DS_ACCELERATOR"] = "cpu" if device == "cpu" else "cuda"
    table = Table()
    table.run("probe", lambda: probe(device))
    table.run("kernels", lambda: kernels(device, args.smoke))
    table.run("launch", lambda: launch(device))
    if not args.skip_mfu:
        table.run("mfu", lambda: mfu(device, args.smoke))
    text = table.render()
    print(text, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
            f.write(text + "\n")
    return 0 if table.ok else 1


if __name__ == "__main__":
    sys.exit(main())
