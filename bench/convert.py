"""Checkpoint conversion speed and memory: hg_to_pp and pp_to_hg against `cp` of the same files.

A random llama checkpoint of about ``--size-gb`` (bf16, TinyLlama-like shapes: hidden 2048,
32 heads / 4 kv heads, ffn 5632, vocab 32000; the layer count sets the size) is written
tensor by tensor in a child process, so neither the generator nor this process holds more than one tensor.
Then, each as its own process:

  * ``cp -r`` of the HF folder           vs  ``convert_model.py hg_to_pp`` of it;
  * ``cp -r`` of the pipeline folder     vs  ``convert_model.py pp_to_hg`` of it.

Throughput ratio = cp seconds / converter seconds on the same bytes (1.0 = as fast as cp),
wall clock of the whole process (interpreter start and imports included; the figure
without them is printed too).  Peak RSS of each converter process comes from
``os.wait4``.  A second, smaller checkpoint (``--small-gb``) is converted too, to show
whether peak RSS grows with the model.  Files go to a temp dir (``--tmp``) that is
deleted at the end; page cache is flushed with ``sync`` between runs (not timed).

    python bench/convert.py [--size-gb 2] [--small-gb 0.5] [--shard-mb 500]
    python bench/convert.py --size-gb 0.02 --small-gb 0 --hidden 256 --vocab 4000   # seconds, for smoke tests
    python bench/convert.py --real-7b --tmp /tmp   # llama-2-7b shapes, 13.5 GB; writes ~45 GB, deleted after

The last line is ``RESULT hg_to_pp_vs_cp=... pp_to_hg_vs_cp=... peak_rss_mb=... peak_rss_small_mb=...``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from _common import PY, REPO, load_note, log, run_env


def llama_config(hidden: int, vocab: int, layers: int) -> dict:
    heads = max(1, hidden // 64)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": int(hidden * 2.75), "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 8), "vocab_size": vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (H // cfg["num_attention_heads"])
    out = [("model.embed_tokens.weight", (V, H))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (H,)), (p + "self_attn.q_proj.weight", (H, H)),
                (p + "self_attn.k_proj.weight", (kv, H)), (p + "self_attn.v_proj.weight", (kv, H)),
                (p + "self_attn.o_proj.weight", (H, H)), (p + "post_attention_layernorm.weight", (H,)),
                (p + "mlp.gate_proj.weight", (I, H)), (p + "mlp.up_proj.weight", (I, H)),
                (p + "mlp.down_proj.weight", (H, I))]
    out += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
    return out


def layers_for(size_gb: float, hidden: int, vocab: int) -> int:
    one = llama_config(hidden, vocab, 1)
    per_layer = sum(2 * _numel(s) for k, s in tensor_shapes(one) if ".layers." in k)
    fixed = sum(2 * _numel(s) for k, s in tensor_shapes(one) if ".layers." not in k)
    return max(1, round((size_gb * 1e9 - fixed) / per_layer))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def generate(folder: str, cfg: dict, shard_bytes: int, seed: int = 0) -> int:
    """Random bf16 checkpoint in safetensors shards + index, in a child process (so that this
    process never holds torch or tensors: its memory would show in the children's peak RSS).
    The child writes each shard tensor by tensor (one tensor in memory). Returns bytes."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    subprocess.run([PY, os.path.abspath(__file__), "--generate-into", folder, "--shard-bytes", str(shard_bytes),
                    "--seed", str(seed)], cwd=REPO, env=run_env(threads=1), check=True)
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        return json.load(f)["metadata"]["total_size"]


def _generate_child(folder: str, shard_bytes: int, seed: int) -> None:
    import torch

    from ppllm import tensor_io as tio
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    g = torch.Generator().manual_seed(seed)
    block = (torch.randn(1 << 24, generator=g) * 0.02).to(torch.bfloat16)  # random values, tiled into tensors
    state = {"at": 0}

    def make(shape):
        n = _numel(shape)
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        out = torch.empty(n, dtype=torch.bfloat16)
        done = 0
        while done < n:
            k = min(n - done, block.numel() - state["at"])
            out[done:done + k] = block[state["at"]:state["at"] + k]
            done += k
            state["at"] = (state["at"] + k) % block.numel()
        return out.reshape(shape)

    groups, cur, cur_bytes = [], [], 0
    for key, shape in tensor_shapes(cfg):
        nbytes = 2 * _numel(shape)
        if cur and cur_bytes + nbytes > shard_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append((key, shape))
        cur_bytes += nbytes
    groups.append(cur)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        items = [(key, tio.Lazy(torch.bfloat16, shape, lambda shape=shape: make(shape))) for key, shape in group]
        tio.write_safetensors(os.path.join(folder, name), items)
        total += sum(2 * _numel(shape) for _, shape in group)
        weight_map.update((key, name) for key, _ in group)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
               if os.path.isfile(os.path.join(folder, n)))


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def timed(cmd: list[str]) -> tuple[float, float, float, float]:
    """(wall seconds, peak RSS MB, peak anonymous RSS MB, peak file-backed RSS MB) of one child process.

    Peak RSS is the larger of the kernel's ru_maxrss from os.wait4 and the last sample of the
    process's own high-water mark (VmHWM); the anonymous / file-backed split (mmap'd checkpoint
    pages count as RSS too) is sampled from /proc every 20 ms.
    """
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    log_file = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(threads=1), stdout=log_file, stderr=subprocess.STDOUT)
    anon = filed = hwm = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        st = _status_kb(proc.pid)
        anon, filed = max(anon, st.get("RssAnon", 0)), max(filed, st.get("RssFile", 0) + st.get("RssShmem", 0))
        hwm = max(hwm, st.get("VmHWM", 0))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    log_file.seek(0)
    out = log_file.read().decode(errors="replace")
    log_file.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}")
    return wall, max(usage.ru_maxrss, hwm) / 1024, anon / 1024, filed / 1024  # KiB on Linux


USERSPACE_COPY = ("import os, sys\n"
                  "src, dst = sys.argv[1:3]\n"
                  "os.makedirs(dst)\n"
                  "for n in sorted(os.listdir(src)):\n"
                  "    with open(os.path.join(src, n), 'rb') as fi, open(os.path.join(dst, n), 'wb') as fo:\n"
                  "        while True:\n"
                  "            b = fi.read(16 << 20)\n"
                  "            if not b:\n"
                  "                break\n"
                  "            fo.write(b)\n")


LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
             "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
             "hidden_act": "silu", "initializer_range": 0.02}


def bench_size(tmp: str, size_gb: float, a, cfg: dict | None = None) -> dict:
    if cfg is None:
        cfg = llama_config(a.hidden, a.vocab, layers_for(size_gb, a.hidden, a.vocab))
    layers = cfg["num_hidden_layers"]
    hf, pp, back, copy = (os.path.join(tmp, n) for n in ("hf", "pp", "hf_back", "copy"))
    t0 = time.perf_counter()
    nbytes = generate(hf, cfg, a.shard_mb << 20)
    n_shards = sum(1 for n in os.listdir(hf) if n.endswith(".safetensors"))
    log(f"checkpoint: llama hidden {cfg['hidden_size']}, {layers} layers, vocab {cfg['vocab_size']}, bf16: {nbytes / 1e9:.2f} GB in "
        f"{n_shards} shard(s) (generated in {time.perf_counter() - t0:.1f} s)")

    r: dict = {"bytes": nbytes}
    converter = [PY, "convert_model.py"]
    best = lambda runs: min(runs, key=lambda x: x[0])  # noqa: E731
    cp_hf, h2p, cp_pp, p2h, user = [], [], [], [], []
    for _ in range(a.repeats):
        cp_hf.append(timed(["cp", "-r", hf, copy]))
        shutil.rmtree(copy)
        if not a.real_7b:  # 13 GB more to write; the in-kernel cp is the baseline
            user.append(timed([PY, "-c", USERSPACE_COPY, hf, copy]))
            shutil.rmtree(copy)
        h2p.append(timed(converter + ["hg_to_pp", "--input-path", hf, "--save-path", pp, "--quiet", "--force"]))
        cp_pp.append(timed(["cp", "-r", pp, copy]))
        shutil.rmtree(copy)
        extra = ["--max-shard-size", a.max_shard_size] if a.max_shard_size else []
        p2h.append(timed(converter + ["pp_to_hg", "--input-path", pp, "--save-path", back, "--quiet", "--force"]
                         + extra))
        assert folder_bytes(back) >= nbytes, "pp_to_hg wrote fewer bytes than the source checkpoint"
        shutil.rmtree(back)
    r.update(cp_hf=best(cp_hf), hg_to_pp=best(h2p), cp_pp=best(cp_pp), pp_to_hg=best(p2h),
             user=best(user) if user else None,
             pp_bytes=folder_bytes(pp))
    r["rss"] = max(x[1] for x in h2p + p2h)
    shutil.rmtree(pp)
    shutil.rmtree(hf)
    return r


def report(label: str, r: dict, startup: float) -> None:
    gb = r["bytes"] / 1e9
    tc = r["cp_hf"][0]
    if r["user"] is not None:
        tu = r["user"][0]
        log(f"{label}: cp -r {tc:.2f} s ({gb / tc:.2f} GB/s, in-kernel copy_file_range); python read/write copy "
            f"of the same files {tu:.2f} s ({gb / tu:.2f} GB/s) = {tc / tu:.3f} x cp")
    for name, base in (("hg_to_pp", "cp_hf"), ("pp_to_hg", "cp_pp")):
        t, rss, anon, filed = r[name]
        tc = r[base][0]
        net = max(1e-3, t - startup)
        log(f"{label}: {name} {t:.2f} s ({gb / t:.2f} GB/s; {gb / net:.2f} GB/s without the {startup:.1f} s "
            f"start-up) peak RSS {rss:.0f} MB (sampled peaks: anonymous {anon:.0f} MB, file-backed {filed:.0f} MB) "
            f"| cp {tc:.2f} s ({gb / tc:.2f} GB/s) | ratio {tc / t:.3f} (without start-up {tc / net:.3f}) "
            f"| {t / 60:.2f} min")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=2.0)
    p.add_argument("--small-gb", type=float, default=0.5, help="second, smaller checkpoint for RSS growth; 0 skips it")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-mb", type=int, default=500)
    p.add_argument("--repeats", type=int, default=1, help="best of N for every timed command")
    p.add_argument("--max-shard-size", default=None, help="pass --max-shard-size to pp_to_hg (default: its own, 2GB)")
    p.add_argument("--tmp", default="/tmp", help="where the work folder goes")
    p.add_argument("--real-7b", action="store_true",
                   help="a llama-2-7b-shaped checkpoint (6.7 B bf16 parameters, 13.5 GB in two ~10 GB/3.5 GB "
                        "shards as the release ships) instead of --size-gb; needs ~45 GB free under --tmp")
    p.add_argument("--generate-into", default=None, help=argparse.SUPPRESS)  # the generator child
    p.add_argument("--shard-bytes", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.generate_into:
        return _generate_child(a.generate_into, a.shard_bytes, a.seed)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # run_env would import torch here to find out
    if a.real_7b:
        a.shard_mb, a.small_gb, a.repeats = 9537, 0.0, 1  # 10 GB (decimal) shards

    tmp = tempfile.mkdtemp(prefix="bench_convert_", dir=a.tmp)
    try:
        # interpreter + imports of the converter alone, to tell start-up from streaming
        startup, base_rss, _, _ = timed([PY, "-c", "import convert_model"])
        log(f"converter start-up (python + imports): {startup:.2f} s, {base_rss:.0f} MB RSS; {load_note()}")
        big = bench_size(tmp, a.size_gb, a, LLAMA2_7B if a.real_7b else None)
        report("llama-2-7b shape" if a.real_7b else f"{a.size_gb:g} GB", big, startup)
        small = None
        if a.small_gb > 0:
            small = bench_size(tmp, a.small_gb, a)
            report(f"{a.small_gb:g} GB", small, startup)
            log(f"peak RSS: {small['rss']:.0f} MB at {small['bytes'] / 1e9:.2f} GB, {big['rss']:.0f} MB at "
                f"{big['bytes'] / 1e9:.2f} GB")
        log(f"after the runs: {load_note()}")
        h2p = big["cp_hf"][0] / big["hg_to_pp"][0]
        p2h = big["cp_pp"][0] / big["pp_to_hg"][0]
        line = f"RESULT hg_to_pp_vs_cp={h2p:.3f} pp_to_hg_vs_cp={p2h:.3f} peak_rss_mb={big['rss']:.0f}"
        if small is not None:
            line += f" peak_rss_small_mb={small['rss']:.0f}"
        log(line)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
