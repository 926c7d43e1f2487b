"""Atomic, resumable checkpoints on top of DeepSpeed's save/load.

Layout of ``save_path``::

    global_step8/      layer_XX-model_states.pt (weights), mp_rank_XX_model_states.pt
                       (optimizer, scheduler, client state), rng_rank{r}.pt, config and
                       tokenizer files, ppllm_partition.json, ppllm_manifest.json (size and
                       sha256 of every file; written last, checked before a resume opens anything)
    latest             names the newest complete checkpoint (parsed strictly: see strict_latest)
    .ppllm-run         the claim of the run that owns the folder (ppllm.claim)
    metrics.jsonl

A save first writes ``.tmp-global_stepN``; after every rank finished, the folder is
renamed and only then ``latest`` is replaced (write + rename).  A run killed during
a save therefore leaves ``latest`` on the previous complete checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import time

import numpy as np
import torch
import torch.distributed as dist

from ppllm import collectives
from ppllm.errors import UserError
from ppllm.paths import (LATEST_FILE, LAYER_FILE_RE, MANIFEST_FILE, META_FILE, PARTITION_FILE, TAG_RE, TMP_PREFIX,
                         copy_side_files, list_tags, read_latest, tag_for, write_atomic)


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
    index, count = node_place()
    write_manifest_part(tmp_dir, index, count)
    collectives.barrier()
    if node_leader:
        _add_side_files(tmp_dir, side_files_from, partition, lora)
    collectives.barrier()
    if index == 0:  # one process per node; the side files are in place
        merge_manifest(tmp_dir, count)
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


class ResumeSourceError(UserError):
    """``latest`` or a checkpoint folder that cannot be resumed; the message names the file and the way out."""


def complete_tags(save_path: str) -> list[str]:
    """Tags of save_path whose save finished (the manifest, or for checkpoints written before ppllm
    recorded one, ppllm_partition.json, is written before the folder gets its final name), oldest first."""
    return [t for t in list_tags(save_path) if is_complete(os.path.join(save_path, t))]


def is_complete(tag_dir: str) -> bool:
    return os.path.isdir(tag_dir) and any(os.path.isfile(os.path.join(tag_dir, n)) for n in (MANIFEST_FILE,
                                                                                          PARTITION_FILE))


def _way_out(save_path: str, damaged: str | None = None) -> str:
    tags = [t for t in complete_tags(save_path) if t != damaged]
    if damaged is not None:
        if not tags:
            return f"no other complete checkpoint exists in {save_path}"
        return (f"other complete checkpoints there: {', '.join(tags)}; set resume: "
                f"{os.path.join(save_path, tags[-1])} to continue from the newest of them")
    if not tags:
        return (f"no complete checkpoint exists in {save_path}: delete the file to start a new run there, "
                f"or set another save_path")
    return (f"complete checkpoints there: {', '.join(tags)}; set resume: {os.path.join(save_path, tags[-1])} "
            f"to continue from the newest (or write its name into the file)")


def strict_latest(save_path: str) -> str | None:
    """The tag ``save_path/latest`` names, checked: None only when there is no ``latest`` and no checkpoint.
    Anything else that names no complete checkpoint (garbage text or bytes, a tag that is gone or was
    never finished, checkpoints without ``latest``) raises ResumeSourceError naming the file and the tags
    that exist; never a silent fresh start that would overwrite them."""
    path = os.path.join(save_path, LATEST_FILE)
    if not os.path.lexists(path):
        tags = complete_tags(save_path)
        if tags:
            raise ResumeSourceError(f"{path} is missing but {save_path} holds checkpoints ({', '.join(tags)}); "
                                    f"set resume: {os.path.join(save_path, tags[-1])} to continue from the newest, "
                                    f"or resume: never to start over (it overwrites them)")
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read(4097)
    except OSError as e:
        raise ResumeSourceError(f"{path} cannot be read ({e.strerror}); {_way_out(save_path)}") from None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        text = None
    if text is None or len(raw) > 4096 or not TAG_RE.fullmatch(text):
        shown = repr(raw[:40]) + ("..." if len(raw) > 40 else "")
        raise ResumeSourceError(f"{path} does not name a checkpoint (it holds {shown}, not global_stepN); "
                                f"{_way_out(save_path)}")
    if not is_complete(os.path.join(save_path, text)):
        state = "is missing" if not os.path.exists(os.path.join(save_path, text)) else "is not a complete checkpoint"
        raise ResumeSourceError(f"{path} names {text}, which {state}; {_way_out(save_path)}")
    return text


def resolve_resume(resume: str, save_path: str) -> tuple[str, str] | None:
    """(directory, tag) to resume from, or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        tag = strict_latest(save_path)
        return (save_path, tag) if tag else None
    path = resume.rstrip("/")
    if os.path.lexists(os.path.join(path, LATEST_FILE)) or (os.path.isdir(path) and complete_tags(path)):
        tag = strict_latest(path)
        if tag is None:
            raise ResumeSourceError(f"resume: {path} holds no checkpoint")
        return path, tag
    if os.path.isdir(path):
        if not is_complete(path):
            raise ResumeSourceError(f"resume: {path} is not a complete checkpoint folder (no {MANIFEST_FILE}); "
                                    f"{_way_out(os.path.dirname(path) or '.')}")
        return os.path.dirname(path) or ".", os.path.basename(path)
    raise ResumeSourceError(f"resume: {resume!r} is neither 'auto', 'never' nor a checkpoint folder")


# --- the manifest: size and checksum of every file, recorded at save, checked at resume -----------

def node_place() -> tuple[int, int]:
    """(this rank's index among the ranks on its host, how many there are): a collective. The ranks of a
    node share the checksum work of the files on that node."""
    hosts = collectives.all_gather_object(socket.gethostname()) if collectives.active() else [socket.gethostname()]
    rank = dist.get_rank() if collectives.active() else 0
    mine = [r for r, h in enumerate(hosts) if h == hosts[rank]]
    return mine.index(rank), len(mine)


def file_digest(path: str) -> tuple[int, str]:
    """(size, sha256 hex) of a file, streamed (hashlib releases the GIL: several ranks hash at once)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        return os.fstat(f.fileno()).st_size, digest


def _payload(tag_dir: str) -> list[str]:
    """The files of a checkpoint folder the manifest covers: every plain file but hidden and the manifest."""
    return sorted(n for n in os.listdir(tag_dir) if not n.startswith(".") and n != MANIFEST_FILE
                  and os.path.isfile(os.path.join(tag_dir, n)))


def _part_file(tag_dir: str, index: int) -> str:
    return os.path.join(tag_dir, f".manifest-{socket.gethostname()}-{index}.json")


def write_manifest_part(tag_dir: str, index: int, count: int) -> None:
    """Checksum this rank's share of the files on this node (after every rank wrote its files)."""
    names = _payload(tag_dir)[index::count]
    part = {n: dict(zip(("size", "sha256"), file_digest(os.path.join(tag_dir, n)))) for n in names}
    write_atomic(_part_file(tag_dir, index), json.dumps(part))


def merge_manifest(tag_dir: str, count: int) -> None:
    """Node leader: the shares of the node's ranks, plus the side files added meanwhile, as the manifest."""
    files: dict = {}
    for i in range(count):
        with open(_part_file(tag_dir, i)) as f:
            files.update(json.load(f))
    for n in _payload(tag_dir):
        if n not in files:  # config, tokenizer, ppllm_partition.json: small, written after the shares
            files[n] = dict(zip(("size", "sha256"), file_digest(os.path.join(tag_dir, n))))
    write_atomic(os.path.join(tag_dir, MANIFEST_FILE), json.dumps({"version": 1, "files": files}, indent=0,
                                                                  sort_keys=True))
    for i in range(count):
        try:
            os.remove(_part_file(tag_dir, i))
        except FileNotFoundError:
            pass


def read_manifest(tag_dir: str) -> dict | None:
    path = os.path.join(tag_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            files = json.loads(f.read().decode("utf-8"))["files"]
        if not all(isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str) for v in files.values()):
            raise ValueError("an entry without size and sha256")
        return files
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ResumeSourceError(f"{path} is damaged ({str(e)[:120]}): the checkpoint cannot be verified; "
                                f"{_way_out(os.path.dirname(tag_dir) or '.')}") from None


def verify(tag_dir: str, needed: list[str], index: int = 0, count: int = 1) -> float:
    """Before anything in ``tag_dir`` is opened: every file the manifest records is there with its size
    (each rank checks all sizes, and the checksums of its share: index::count of the node's ranks), the
    files this rank will read (``needed``) exist, and this rank's share of DeepSpeed's and ppllm's state
    files (``*.pt`` but layer files, which are always read with weights_only=True) passes the restricted
    unpickler. Raises ResumeSourceError (one line naming the file and what to do); returns seconds spent."""
    from ppllm import ds_compat
    t0 = time.monotonic()
    parent = os.path.dirname(tag_dir) or "."
    fix = (f"restore it from a copy, or resume from an earlier checkpoint "
           f"({_way_out(parent, os.path.basename(tag_dir))})")
    files = read_manifest(tag_dir)
    for name in needed:
        if not os.path.isfile(os.path.join(tag_dir, name)):
            raise ResumeSourceError(f"{os.path.join(tag_dir, name)} is missing from the checkpoint; {fix}")
    if files is not None:
        for name, rec in sorted(files.items()):
            path = os.path.join(tag_dir, name)
            if not os.path.isfile(path):
                raise ResumeSourceError(f"{path} is missing (the save recorded it in {MANIFEST_FILE}); {fix}")
            size = os.path.getsize(path)
            if size != rec["size"]:
                raise ResumeSourceError(f"{path} has {size} bytes, the save wrote {rec['size']} (truncated or "
                                        f"replaced); {fix}")
        for name in sorted(files)[index::count]:
            path = os.path.join(tag_dir, name)
            if file_digest(path)[1] != files[name]["sha256"]:
                raise ResumeSourceError(f"{path} differs from what the save wrote (sha256 mismatch: corrupt or "
                                        f"modified); {fix}")
    states = [n for n in _payload(tag_dir) if n.endswith(".pt") and not LAYER_FILE_RE.fullmatch(n)]
    for name in states[index::count]:
        try:
            ds_compat.safe_load(os.path.join(tag_dir, name), mmap=True)
        except ds_compat.UnsafeCheckpoint as e:
            raise ResumeSourceError(f"{os.path.join(tag_dir, name)}: refused, {e}; nothing from it was run. "
                                    f"{fix[0].upper() + fix[1:]}") from None
    return time.monotonic() - t0


def load(engine, directory: str, tag: str, strict: bool = True, reshard: bool = False) -> dict:
    """Weights, optimizer, scheduler and client state; this rank's RNG state.
    strict=False for adapter-only (LoRA) checkpoints on top of already loaded base weights;
    reshard=True for a checkpoint written under another topology (ppllm.reshard)."""
    from ppllm import ds_compat
    ds_compat.load_safely(engine)  # DeepSpeed's own reads of its files: the restricted unpickler too
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
