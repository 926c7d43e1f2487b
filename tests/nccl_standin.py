"""A stand-in for NCCL's device rule, on a CPU machine with a gloo process group.

NCCL reduces only tensors on the process's current CUDA device; a host tensor fails the
collective (on every rank, even at world size 1). On CPU every tensor is a host tensor, so
the rule cannot be seen. The stand-in makes it visible:

* ``torch.distributed.get_backend`` answers ``"nccl"``, so ``ppllm.collectives`` places its
  tensors as it would on a GPU machine (``torch.distributed.Backend.backend_capability``
  says NCCL serves only ``cuda``);
* the process has a fake current CUDA device (``torch.accelerator`` / ``torch.cuda``'s
  current device and ``set_device`` are replaced); its index is set by ``install``;
* a torch-function mode turns every tensor made or moved to ``cuda:K`` into a host tensor
  *tagged* ``cuda:K`` (the tag follows through arithmetic, ``.cpu()`` drops it);
* every tensor collective of ``torch.distributed`` first checks that each tensor carries the
  tag of the current device, and raises :class:`NcclRuleError` otherwise, as NCCL would;
  then the real gloo collective runs on the host data. Object collectives check their
  ``device`` argument the same way.

Use ``install(local_rank)`` in a process whose gloo group is up, and ``uninstall()`` after.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

TAG = "_standin_device"
TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce",
                      "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "all_to_all_single")
OBJECT_COLLECTIVES = ("broadcast_object_list", "scatter_object_list")


class NcclRuleError(RuntimeError):
    """What NCCL would have raised: a tensor handed to a collective is not on the current device."""


class _State:
    index = 0
    saved: dict = {}
    mode: "FakeCudaMode | None" = None


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    return torch.device(device).type == "cuda"


def _cuda_name(device) -> str:
    if isinstance(device, int):
        return f"cuda:{device}"
    d = torch.device(device)
    return f"cuda:{d.index if d.index is not None else _State.index}"


def _tag(out, name):
    if isinstance(out, torch.Tensor):
        setattr(out, TAG, name)
    elif isinstance(out, (list, tuple)):
        for o in out:
            _tag(o, name)
    return out


def _first_tag(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor) and getattr(a, TAG, None):
            return getattr(a, TAG)
        if isinstance(a, (list, tuple)):
            t = _first_tag(a, {})
            if t:
                return t
    return None


class FakeCudaMode(TorchFunctionMode):
    """Tensors on ``cuda:K`` become host tensors tagged ``cuda:K``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        target = None
        if _is_cuda(kwargs.get("device")):
            target = _cuda_name(kwargs["device"])
            kwargs["device"] = "cpu"
        if name in ("to", "cuda") and isinstance(args[0] if args else None, torch.Tensor):
            rest = list(args[1:])
            dev = kwargs.get("device", rest[0] if rest and isinstance(rest[0], (str, torch.device, int)) else None)
            if name == "cuda":
                target = _cuda_name(rest[0] if rest else _State.index)
                return _tag(args[0].clone(), target)
            if _is_cuda(dev):
                target = _cuda_name(dev)
                if "device" in kwargs:
                    kwargs["device"] = "cpu"
                else:
                    rest[0] = "cpu"
                out = func(args[0], *rest, **kwargs)
                return _tag(out.clone() if out is args[0] else out, target)
            if dev is not None:  # to the host (or another non-CUDA device): the tag goes
                out = func(*args, **kwargs)
                if out is args[0]:
                    out = out.clone()
                return _tag(out, None)
        if name == "cpu":
            return _tag(func(*args, **kwargs).clone(), None)
        out = func(*args, **kwargs)
        tag = target or _first_tag(args, kwargs)
        if tag and isinstance(out, (torch.Tensor, list, tuple)):
            _tag(out, tag)
        return out


def _tensors(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def _check(what: str, tensors) -> None:
    want = f"cuda:{_State.index}"
    for t in tensors:
        have = getattr(t, TAG, None) or str(t.device)
        if have != want:
            raise NcclRuleError(f"stand-in NCCL: {what} got a tensor on {have}; NCCL only takes tensors on the "
                                f"current device {want}")


def _wrap_tensor_collective(name, real):
    def wrapped(*args, **kwargs):
        _check(f"{name}()", _tensors(args, kwargs))
        return real(*args, **kwargs)
    return wrapped


def _wrap_object_collective(name, real):
    def wrapped(*args, **kwargs):
        device = kwargs.pop("device", None)
        if device is not None and (not _is_cuda(device) or _cuda_name(device) != f"cuda:{_State.index}"):
            raise NcclRuleError(f"stand-in NCCL: {name}() was told device={device}; NCCL only takes tensors on the "
                                f"current device cuda:{_State.index}")
        return real(*args, **kwargs)
    return wrapped


def _wrap_barrier(real):
    def wrapped(*args, **kwargs):
        ids = kwargs.pop("device_ids", None)
        if ids is not None and list(ids) != [_State.index]:
            raise NcclRuleError(f"stand-in NCCL: barrier(device_ids={ids}) on a process whose device is "
                                f"cuda:{_State.index}")
        return real(*args, **kwargs)
    return wrapped


def _set_device(index):
    _State.index = index.index if isinstance(index, torch.device) else int(index)


def install(local_rank: int = 0) -> None:
    """From here on this process's gloo group behaves like NCCL for device placement."""
    if _State.mode is not None:
        return
    _State.index = local_rank
    s = _State.saved
    patches = [(dist, "get_backend", lambda group=None: "nccl"),
               (torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda")),
               (torch.accelerator, "current_device_index", lambda: _State.index),
               (torch.accelerator, "set_device_index", _set_device),
               (torch.cuda, "current_device", lambda: _State.index),
               (torch.cuda, "set_device", _set_device)]
    for name in TENSOR_COLLECTIVES:
        patches.append((dist, name, _wrap_tensor_collective(name, getattr(dist, name))))
    for name in OBJECT_COLLECTIVES:
        patches.append((dist, name, _wrap_object_collective(name, getattr(dist, name))))
    patches.append((dist, "barrier", _wrap_barrier(dist.barrier)))
    for obj, name, new in patches:
        s[(obj, name)] = getattr(obj, name)
        setattr(obj, name, new)
    _State.mode = FakeCudaMode()
    _State.mode.__enter__()


def uninstall() -> None:
    if _State.mode is None:
        return
    _State.mode.__exit__(None, None, None)
    _State.mode = None
    for (obj, name), old in _State.saved.items():
        setattr(obj, name, old)
    _State.saved.clear()
