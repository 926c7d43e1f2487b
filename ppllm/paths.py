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

from ppllm.errors import UserError

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


class OutputRefused(UserError):
    """The output cannot go where asked (a file is there, it overlaps the input, the folder is not writable)."""


STAGING_PREFIX = ".convert-"
# .convert-HOST-PIDNS-PID-XXXXXXXX: the host, pid namespace and process that stage there, so a later
# run can tell a folder left by a killed conversion (its process is gone) from one still being
# written, also by a container that shares this host name but not its process ids
_STAGING_RE = re.compile(r"\.convert-(?P<host>.+)-(?P<ns>\d+)-(?P<pid>\d+)-(?P<rand>[A-Za-z0-9_]{8})(?P<old>\.old)?")


def _pid_namespace() -> int:
    """This process's pid namespace (0 where /proc does not say)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def staging_prefix() -> str:
    return f"{STAGING_PREFIX}{socket.gethostname()}-{_pid_namespace()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _tree_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def clean_stale_staging(parent: str, log=None) -> tuple[list[str], list[str]]:
    """Staging folders beside an output left by conversions that were killed (SIGKILL, a lost node):
    those of this host whose process is gone are removed; those of other hosts, or of an older
    ppllm that did not record its process, are named (they may belong to a conversion still
    running). Returns (removed, named)."""
    import sys
    log = log or (lambda text: print(text, file=sys.stderr))
    removed, named = [], []
    try:
        names = sorted(n for n in os.listdir(parent) if n.startswith(STAGING_PREFIX))
    except OSError:
        return removed, named
    host, ns = socket.gethostname(), str(_pid_namespace())
    for name in names:
        path = os.path.join(parent, name)
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        m = _STAGING_RE.fullmatch(name)
        ours = m is not None and m["host"] == host and m["ns"] == ns  # process ids we can check
        if ours and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            size = _tree_size(path)
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                removed.append(path)
                log(f"note: removed {path} ({size / 2 ** 20:.1f} MiB), the staging folder of a conversion "
                    f"(pid {m['pid']}) that was killed")
                continue
        if ours:
            continue  # a conversion running on this host right now
        named.append(path)
        who = (f"host {m['host']}, pid {m['pid']}" + (" in another container" if m["host"] == host else "")
               if m else "an older ppllm or another tool that did not record its process")
        log(f"note: {path} ({_tree_size(path) / 2 ** 20:.1f} MiB) is the staging folder of another conversion "
            f"({who}); remove it if that conversion is no longer running")
    return removed, named


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _inside(inner: str, outer: str) -> bool:
    return os.path.commonpath([inner, outer]) == outer


def check_output_place(save_path: str, inputs=(), force: bool = False) -> None:
    """Refuse an output that is a file, or that would replace, hold or sit inside an input
    (symlinks resolved); without ``force`` a non-empty folder is not replaced either."""
    out = _real(save_path)
    for src in inputs:
        if not src:
            continue
        real = _real(src)
        if out == real:
            raise OutputRefused(f"--save-path {save_path} is the input {src}"
                                + (f" (both are {real})" if save_path != src else "")
                                + "; converting in place would replace the input; give another --save-path")
        if _inside(real, out) and (force or os.path.exists(save_path)):
            raise OutputRefused(f"--save-path {save_path} holds the input {src}; replacing it would delete the "
                                f"input; give a --save-path outside {src}")
        if _inside(out, real) and force and os.path.exists(save_path):
            raise OutputRefused(f"--save-path {save_path} is inside the input {src}; --force would replace part "
                                f"of the input; give a --save-path outside {src}")
    if os.path.lexists(save_path) and not os.path.isdir(save_path):
        raise OutputRefused(f"--save-path {save_path} is a file; the output is a folder: give a new folder name, or "
                            f"move the file away")
    if os.path.exists(save_path) and os.listdir(save_path) and not force:
        raise OutputExists(f"{save_path} exists and is not empty; pass --force to replace it")


class Terminated(KeyboardInterrupt):
    """SIGTERM during a conversion: unwinds like Ctrl-C, so the staging folder is removed."""


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """SIGTERM (and SIGINT, if something replaced Python's default) raise in the main thread."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_term(signum, frame):
        raise Terminated(f"signal {signum}")
    previous = {}
    for sig, handler in ((signal.SIGTERM, raise_term), (signal.SIGINT, signal.default_int_handler)):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def staged_output(save_path: str, force: bool = False, inputs=()) -> Iterator[str]:
    """Yield a temporary folder beside ``save_path``; on success it replaces ``save_path``,
    on any error or signal (Ctrl-C, SIGTERM) it is removed and ``save_path`` is untouched.
    The output may not be a file, nor replace, hold or (with ``force``) lie inside one of ``inputs``.
    Staging folders of killed conversions found beside the output are removed or named."""
    check_output_place(save_path, inputs, force)
    parent = os.path.dirname(os.path.abspath(save_path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise OutputRefused(f"cannot create {parent} for --save-path {save_path}: {e.strerror}; choose a "
                            f"--save-path in a writable folder") from None
    clean_stale_staging(parent)
    try:
        tmp = tempfile.mkdtemp(prefix=staging_prefix(), dir=parent)
    except OSError as e:
        raise OutputRefused(f"cannot write in {parent} (for --save-path {save_path}): {e.strerror}; choose a "
                            f"--save-path in a writable folder, or make {parent} writable") from None
    try:
        with _signals_unwind():
            yield tmp
            if os.path.lexists(save_path):  # replaced with --force: out of the way first, removed after
                old = tmp + ".old"
                os.replace(save_path, old)
                try:
                    os.replace(tmp, save_path)
                except BaseException:
                    os.replace(old, save_path)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, save_path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        name = e.filename if isinstance(e.filename, str) else None
        if name and os.path.abspath(name).startswith(tmp + os.sep):  # name the output file, not the staging one
            raise OSError(e.errno, e.strerror, os.path.join(save_path, os.path.relpath(name, tmp))) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
