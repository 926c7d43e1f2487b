"""One logging helper: print on global rank 0 only."""
from __future__ import annotations

import torch.distributed as dist

from ppllm import launch


def is_rank0() -> bool:
    """Global rank 0 once the process group is up; before that, the launcher's rank (the only
    thing that tells ranks apart while the config is still being read)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    try:
        le = launch.read()
    except launch.LaunchError:
        return True
    return le is None or le.rank == 0


def log0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)
