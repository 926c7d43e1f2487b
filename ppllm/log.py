"""One logging helper: print on global rank 0 only."""
from __future__ import annotations

import os

import torch.distributed as dist


def is_rank0() -> bool:
    """Global rank 0 once the process group is up; before that, the launcher's RANK variable
    (the only thing that tells ranks apart while the config is still being read)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def log0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)
