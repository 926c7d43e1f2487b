"""The control plane: every collective ppllm itself issues, and nothing else.

DeepSpeed moves activations and gradients. ppllm only needs small agreements between ranks:
token counts for the loss normaliser, sums for the step log and the eval loss, whether any rank
failed and its message, row counts, which ranks share a node, a gradient norm, a few barriers.
Callers hand Python numbers (or picklable objects) and get Python numbers back; the tensors
exist only in this module, placed on the device the group's backend serves:

* a backend that reduces host tensors (gloo, mpi, DeepSpeed's CPU ccl) gets CPU tensors;
* NCCL (and every backend that serves only accelerators, per
  ``torch.distributed.Backend.backend_capability``) gets tensors on the **current** device,
  which ``ppllm.launch.bind_device`` set from the local rank before the process group existed.

No other module calls a ``torch.distributed`` collective (``tests/test_structure.py`` rejects
it), so reading this file tells whether a CPU tensor can reach NCCL. ``tests/nccl_standin.py``
makes a gloo group enforce NCCL's device rule on CPU, and the control-plane tests run every
caller under it.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_HOST_BACKENDS = ("ccl",)  # DeepSpeed's oneCCL CPU backend: not in torch's capability table


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def comm_device(group=None) -> torch.device:
    """The device whose tensors ``group``'s backend reduces."""
    backend = str(dist.get_backend(group))
    if "," in backend or ":" in backend:  # "cpu:gloo,cuda:nccl": the host has a backend of its own
        served = [part.split(":")[0] for part in backend.split(",")]
    else:
        served = dist.Backend.backend_capability.get(backend, ["cpu"] if backend in _HOST_BACKENDS else [])
    if "cpu" in served:
        return torch.device("cpu")
    accel = torch.accelerator.current_accelerator()
    if accel is None:
        raise RuntimeError(f"the process group's backend {backend!r} serves {served} only, and this process "
                           f"sees no accelerator")
    return torch.device(accel.type, torch.accelerator.current_device_index())


def all_reduce(values: Sequence[float], op: str = "sum", group=None, integer: bool = False) -> list:
    """Element-wise reduction of a short list of numbers over ``group``; a list of the same length.
    float64 by default (exact for counts below 2**53), int64 with ``integer``."""
    dtype = torch.int64 if integer else torch.float64
    t = torch.tensor(list(values), dtype=dtype, device=comm_device(group))
    dist.all_reduce(t, op=_OPS[op], group=group)
    return t.tolist()


def all_reduce_(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place reduction of a tensor computed elsewhere (a gradient norm on the training device):
    moved to the backend's device when it lives elsewhere, and back."""
    dev = comm_device(group)
    if tensor.device == dev:
        dist.all_reduce(tensor, op=_OPS[op], group=group)
        return tensor
    moved = tensor.to(dev)
    dist.all_reduce(moved, op=_OPS[op], group=group)
    tensor.copy_(moved)
    return tensor


def broadcast_object(obj: Any, src: int, group=None) -> Any:
    """``obj`` of global rank ``src``, on every rank of ``group``."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=comm_device(group))
    return box[0]


def all_gather_object(obj: Any, group=None) -> list:
    """Every rank's ``obj``, in rank order of ``group``."""
    out: list = [None] * dist.get_world_size(group)
    # no device argument here: torch stages through the current device, which bind_device set
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group=None) -> None:
    """Every rank of ``group`` reached this line. NCCL's barrier is an all-reduce on a device:
    name the current one rather than let it guess from the rank."""
    dev = comm_device(group)
    if dev.type == "cpu":
        dist.barrier(group=group)
    else:
        dist.barrier(group=group, device_ids=[dev.index])
