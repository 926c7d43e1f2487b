"""Every name ppllm reads or writes on disk, and the one way an output folder appears atomically.

A pipeline folder (from ``hg_to_pp``) and a checkpoint tag folder (from training) share one
layout, so ``pp_to_hg`` reads either::

    layer_XX-model_states.pt    one file per pipeline layer, {local key: tensor}; independent of
                                the pipeline degree (DeepSpeed's own naming)
    config.json, tokenizer ...  side files copied from the HF folder
    ppllm.json                  what hg_to_pp converted (family, layer names, dtype)
    ppllm_partition.json        training only: stage bounds and the ranks of each stage
    ppllm_lora.json             adapter-only checkpoints: LoRA settings and the base folder
    mp_rank_XX_model_states.pt  training only, DeepSpeed's per-stage optimizer/scheduler/counters
    ppllm_params-stageXX.json   training only, that stage's optimizer parameters by name (resharding)

A training ``save_path`` holds ``global_stepN/`` tag folders, ``latest`` naming the newest
complete one, and ``metrics.jsonl``.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from typing import Iterator

LAYER_FILE_RE = re.compile(r"layer_(\d+)-model_states\.pt")
META_FILE = "ppllm.json"
PARTITION_FILE = "ppllm_partition.json"
LORA_META_FILE = "ppllm_lora.json"
LATEST_FILE = "latest"
MANIFEST_FILE = "ppllm_manifest.json"  # size and sha256 of every file of a checkpoint tag, written at save
METRICS_FILE = "metrics.jsonl"
TMP_PREFIX = ".tmp-"
TAG_RE = re.compile(r"global_step(\d+)")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def layer_file(directory: str, index: int) -> str:
    """DeepSpeed's per-layer checkpoint name; the same for every pipeline degree."""
    return os.path.join(directory, f"layer_{index:02d}-model_states.pt")


def layer_index(path: str) -> int:
    """The layer index in a layer file's name (the inverse of layer_file)."""
    m = LAYER_FILE_RE.fullmatch(os.path.basename(path))
    if m is None:
        raise ValueError(f"{path} is not a layer file name (layer_XX-model_states.pt)")
    return int(m.group(1))


def ds_model_states_file(tag_dir: str, stage: int) -> str:
    """DeepSpeed's per-stage file in a checkpoint tag: optimizer, scheduler, counters, client state."""
    return os.path.join(tag_dir, f"mp_rank_{stage:02d}_model_states.pt")


def param_index_file(tag_dir: str, stage: int) -> str:
    """ppllm's list of a stage's optimizer parameters by name, in the optimizer's order."""
    return os.path.join(tag_dir, f"ppllm_params-stage{stage:02d}.json")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int | None:
    m = TAG_RE.fullmatch(tag)
    return int(m.group(1)) if m else None


def list_tags(save_path: str) -> list[str]:
    """Complete checkpoint tags in a save_path, oldest first."""
    if not os.path.isdir(save_path):
        return []
    tags = [(step_of(n), n) for n in os.listdir(save_path) if step_of(n) is not None
            and os.path.isdir(os.path.join(save_path, n))]
    return [n for _, n in sorted(tags)]


def read_latest(save_path: str) -> str | None:
    """The tag ``latest`` names, if that folder exists."""
    path = os.path.join(save_path, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag if os.path.isdir(os.path.join(save_path, tag)) else None


def latest_target(save_path: str) -> str | None:
    """What ``latest`` says, whether or not that folder exists (None without a latest file)."""
    path = os.path.join(save_path, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def write_atomic(path: str, text: str) -> None:
    """Write + fsync + rename; the temp name is unique across nodes sharing a filesystem."""
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_side_file(name: str) -> bool:
    """Config, tokenizer and generation files: everything of a model folder but weights and ppllm's own."""
    if name.endswith(WEIGHT_SUFFIXES) or name in WEIGHT_INDEXES:
        return False
    return not (name.startswith(("layer_", "mp_rank_", "ppllm")) or name == LATEST_FILE)


def copy_side_files(src: str, dst: str) -> list[str]:
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and is_side_file(name):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied


class OutputExists(FileExistsError):
    """The output folder is there and not empty, and replacing it was not asked for."""


@contextlib.contextmanager
def staged_output(save_path: str, force: bool = False) -> Iterator[str]:
    """Yield a temporary folder beside ``save_path``; on success it replaces ``save_path``,
    on any error (Ctrl-C too) it is removed and ``save_path`` is untouched."""
    if os.path.exists(save_path) and (not os.path.isdir(save_path) or os.listdir(save_path)) and not force:
        raise OutputExists(f"{save_path} exists and is not empty; pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(save_path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        yield tmp
        if os.path.exists(save_path):
            shutil.rmtree(save_path)
        os.replace(tmp, save_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
