"""Atomic, resumable checkpoints on top of DeepSpeed's save/load.

Layout of ``save_path``::

    global_step8/      layer_XX-model_states.pt (weights), mp_rank_XX_model_states.pt
                       (optimizer, scheduler, client state), rng_rank{r}.pt, config and
                       tokenizer files, ppllm_partition.json
    latest             names the newest complete checkpoint
    metrics.jsonl

A save first writes ``.tmp-global_stepN``; after every rank finished, the folder is
renamed and only then ``latest`` is replaced (write + rename).  A run killed during
a save therefore leaves ``latest`` on the previous complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import socket

import numpy as np
import torch
import torch.distributed as dist

from ppllm import collectives
from ppllm.errors import UserError
from ppllm.paths import (LATEST_FILE, META_FILE, PARTITION_FILE, TMP_PREFIX, copy_side_files, latest_target,
                         list_tags, read_latest, tag_for, write_atomic)


def rng_state() -> dict:
    """This rank's RNG state as plain tensors and numbers (it loads with ``weights_only=True``:
    nothing in it can run code), with the device RNG of the current device only, so a resume on a
    node that shows fewer GPUs (per-rank CUDA_VISIBLE_DEVICES, SLURM --gpus-per-task) works."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_words, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": (torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)),
             "python": (int(py_version), torch.tensor(py_words, dtype=torch.int64), py_gauss)}
    if _device_rng() is not None:
        state["device"] = _device_rng().get_rng_state()  # the current device (set from the local rank)
    return state


def _device_rng():
    """torch's RNG module of the device DeepSpeed trains on, None on CPU."""
    from ppllm.engine import accelerator
    kind = accelerator()
    module = getattr(torch, kind, None) if kind != "cpu" else None
    return module if module is not None and module.is_available() else None


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state(("MT19937", np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    py_version, py_words, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_words.tolist()), py_gauss))
    if state.get("device") is not None and _device_rng() is not None:
        _device_rng().set_rng_state(state["device"])


def load_rng_state(path: str) -> dict:
    """``weights_only=True``: a pickle that would run code is refused, in one line."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it is the same user-facing fault
        raise UserError(f"{path}: not a ppllm RNG state of plain tensors ({str(e).splitlines()[0][:160]}); "
                        "a checkpoint written by another program or damaged: delete the file to resume "
                        "without restoring the random state") from None


def save(engine, save_path: str, step: int, client_state: dict, side_files_from: str,
         partition: dict, keep_last: int | None, lora=None) -> str:
    """Collective: every rank must call it. With ``lora`` only the adapters are written,
    plus ppllm_lora.json naming the base model folder."""
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    rank = dist.get_rank()
    node_leader = int(os.environ.get("LOCAL_RANK", "0")) == 0
    final = os.path.join(save_path, tag)
    tmp_dir = os.path.join(save_path, tmp_tag)
    # Nodes may or may not share a filesystem, so every node's leader finishes its own copy of the
    # folder, and every step below is safe when several leaders do it on the same folder at once.
    if node_leader:
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again (a resumed run)
    collectives.barrier()
    engine.save_checkpoint(save_path, tag=tmp_tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=lora is not None)
    os.makedirs(tmp_dir, exist_ok=True)
    torch.save(rng_state(), os.path.join(tmp_dir, f"rng_rank{rank}.pt"))
    if engine.grid.get_data_parallel_rank() == 0 and partition.get("precision") == "fp32" and not partition.get(
            "zero_stage") and lora is None:
        from ppllm.reshard import write_param_index
        write_param_index(engine, tmp_dir)
    collectives.barrier()
    if node_leader:
        _add_side_files(tmp_dir, side_files_from, partition, lora)
    collectives.barrier()
    if node_leader:
        try:
            os.replace(tmp_dir, final)
        except FileNotFoundError:
            pass  # another node's leader on a shared filesystem renamed it first
        write_atomic(os.path.join(save_path, LATEST_FILE), tag)
    collectives.barrier()
    if node_leader and keep_last:
        prune(save_path, keep_last)
    collectives.barrier()
    return tag


def _add_side_files(tmp_dir: str, side_files_from: str, partition: dict, lora) -> None:
    """config, tokenizer and ppllm metadata beside the layer files. Each file is staged in a
    folder of this node's own and moved in with os.replace, so leaders of several nodes writing
    the same file on a shared filesystem never leave a half-written one."""
    stage = os.path.join(tmp_dir, f".side-{socket.gethostname()}-{os.getpid()}")
    os.makedirs(stage, exist_ok=True)
    copy_side_files(side_files_from, stage)
    meta = os.path.join(side_files_from, META_FILE)
    if os.path.isfile(meta):
        shutil.copy2(meta, stage)
    with open(os.path.join(stage, PARTITION_FILE), "w") as f:
        json.dump(partition, f)
    if lora is not None:
        from ppllm.lora import write_meta
        write_meta(stage, lora, side_files_from)
    for name in os.listdir(stage):
        os.replace(os.path.join(stage, name), os.path.join(tmp_dir, name))
    os.rmdir(stage)


def prune(save_path: str, keep_last: int) -> None:
    for name in list_tags(save_path)[:-keep_last]:
        shutil.rmtree(os.path.join(save_path, name), ignore_errors=True)
    for name in os.listdir(save_path):  # leftovers of saves that were killed
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(save_path, name), ignore_errors=True)


def resolve_resume(resume: str, save_path: str) -> tuple[str, str] | None:
    """(directory, tag) to resume from, or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        tag = read_latest(save_path)
        return (save_path, tag) if tag else None
    path = resume.rstrip("/")
    if latest_target(path) is not None:
        tag = read_latest(path)
        if tag is None:
            raise FileNotFoundError(f"resume: {path}/latest points to a missing checkpoint")
        return path, tag
    if os.path.isdir(path):
        return os.path.dirname(path) or ".", os.path.basename(path)
    raise FileNotFoundError(f"resume: {resume!r} is neither 'auto', 'never' nor a checkpoint folder")


def load(engine, directory: str, tag: str, strict: bool = True, reshard: bool = False) -> dict:
    """Weights, optimizer, scheduler and client state; this rank's RNG state.
    strict=False for adapter-only (LoRA) checkpoints on top of already loaded base weights;
    reshard=True for a checkpoint written under another topology (ppllm.reshard)."""
    if reshard:
        from ppllm.reshard import load_resharded
        client = load_resharded(engine, os.path.join(directory, tag))
    else:
        _, client = engine.load_checkpoint(directory, tag=tag, load_module_strict=strict)
    rng = os.path.join(directory, tag, f"rng_rank{dist.get_rank()}.pt")
    if os.path.isfile(rng):
        set_rng_state(load_rng_state(rng))
    return client or {}


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop lines a killed run wrote after the checkpoint it resumes from."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    write_atomic(path, "".join(lines))
