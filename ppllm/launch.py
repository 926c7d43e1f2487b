"""The launcher's environment, read in one place, and the device bound before the process group.

Every common launcher tells a process who it is, each in its own words:

============  =====================  ==================  ========================  ==========================
launcher      rank                   world size          local rank                local size
============  =====================  ==================  ========================  ==========================
deepspeed     RANK                   WORLD_SIZE          LOCAL_RANK                LOCAL_SIZE
torchrun      RANK                   WORLD_SIZE          LOCAL_RANK                LOCAL_WORLD_SIZE
srun (SLURM)  SLURM_PROCID           SLURM_NTASKS        SLURM_LOCALID             from SLURM_STEP_TASKS_PER_NODE
mpirun (Open  OMPI_COMM_WORLD_RANK   OMPI_COMM_WORLD_    OMPI_COMM_WORLD_LOCAL_    OMPI_COMM_WORLD_LOCAL_SIZE
MPI)                                 SIZE                RANK
============  =====================  ==================  ========================  ==========================

:func:`read` maps them onto one :class:`LaunchEnv`; :func:`export` writes the names torch and
DeepSpeed read (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_SIZE``, ``LOCAL_WORLD_SIZE``)
so that ``deepspeed.init_distributed`` works under each. Nothing else in ppllm reads these
variables.

:func:`bind_device` makes this process's accelerator the current device before the process
group exists. With every GPU of a node visible, that is GPU ``local rank``; when a launcher gives
each process only its own GPU (SLURM ``--gpus-per-task``, a per-rank ``CUDA_VISIBLE_DEVICES``),
it is the one visible GPU. DeepSpeed's engine and pipeline module pick their device from
``LOCAL_RANK``, so ``LOCAL_RANK`` is set to the bound device's index; the node-local rank itself
stays in :class:`LaunchEnv`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from ppllm.errors import UserError

DEFAULT_PORT = "29500"


class LaunchError(UserError):
    """The environment names a launch ppllm cannot use; the message says what to set."""


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    master_addr: str | None = None
    master_port: str | None = None


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not a whole number") from None


def slurm_tasks_on_node(spec: str, node: int) -> int:
    """Tasks on node ``node`` from SLURM's compressed list, e.g. ``"4(x2),3"`` -> 4, 4, 3."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LaunchError(f"cannot read SLURM's tasks per node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node < len(counts):
        raise LaunchError(f"SLURM_NODEID={node} is outside the tasks per node {spec!r}")
    return counts[node]


def read(env: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """Who this process is, from whichever launcher started it; None when none did."""
    env = os.environ if env is None else env
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if "RANK" in env and "WORLD_SIZE" in env:  # deepspeed, torchrun (also inside a SLURM allocation)
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env or "LOCAL_WORLD_SIZE" in env else "deepspeed"
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        size_var = "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in env else "LOCAL_SIZE"
        local_size = _int(env, size_var) if size_var in env else None
        world = _int(env, "WORLD_SIZE")
        return LaunchEnv(launcher, _int(env, "RANK"), world, local_rank,
                         local_size if local_size is not None else world, addr, port)
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchEnv("mpirun", _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE"),
                         _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"), _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"), addr, port)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # a task of an srun step (not the batch script)
        spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
        local_size = slurm_tasks_on_node(spec, _int(env, "SLURM_NODEID")) if spec else 1
        ntasks = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
        return LaunchEnv("srun", _int(env, "SLURM_PROCID"), _int(env, ntasks), _int(env, "SLURM_LOCALID"),
                         local_size, addr or env.get("SLURM_LAUNCH_NODE_IPADDR"), port or DEFAULT_PORT)
    return None


def export(le: LaunchEnv, env: dict | None = None) -> None:
    """Write the names torch's env:// rendezvous and DeepSpeed read."""
    env = os.environ if env is None else env
    if not le.master_addr:
        raise LaunchError(f"{le.launcher} started this process without MASTER_ADDR: set MASTER_ADDR to the host of "
                          f"rank 0 and MASTER_PORT to a free port on it (mpirun: -x MASTER_ADDR=... -x "
                          f"MASTER_PORT=29500)")
    env.update(RANK=str(le.rank), WORLD_SIZE=str(le.world_size), LOCAL_RANK=str(le.local_rank),
               LOCAL_SIZE=str(le.local_size), LOCAL_WORLD_SIZE=str(le.local_size),
               MASTER_ADDR=le.master_addr, MASTER_PORT=le.master_port or DEFAULT_PORT)


def accelerator_name() -> str:
    """The device kind DeepSpeed trains on ("cuda", "cpu", ...), without building anything."""
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name()


def device_index(local_rank: int, visible: int) -> int:
    """The accelerator of node-local rank ``local_rank`` among the ``visible`` ones: its own index
    when the node's GPUs are all visible, the one visible GPU when the launcher gave it only that."""
    if visible <= 0:
        raise LaunchError("no accelerator is visible to this process (CUDA_VISIBLE_DEVICES empty?)")
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise LaunchError(f"local rank {local_rank} but only {visible} devices are visible to it: start at most "
                          f"{visible} processes per node, or make one GPU visible to each process")
    return local_rank


def bind_device(le: LaunchEnv, env: dict | None = None) -> str:
    """Make this rank's accelerator current (before the process group exists); the device name."""
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    env = os.environ if env is None else env
    if acc.device_name() == "cpu":
        return "cpu"
    index = device_index(le.local_rank, acc.device_count())
    acc.set_device(index)
    env["LOCAL_RANK"] = str(index)  # DeepSpeed's engine and PipelineModule place the model on LOCAL_RANK
    return acc.current_device_name()
