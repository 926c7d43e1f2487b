"""Errors a user can fix, and how the ranks of a launch agree that one happened.

A ``UserError`` carries a message meant for a person (what is wrong, where, and the fix); it
is printed as ``error: <message>`` with no traceback. At launch the problem is usually seen
by several ranks at once (every data-reading rank validates the same data), or by one rank
while the others wait for it in a collective. ``agree`` runs a block on every rank and then
lets them settle, in one small collective, whether any rank failed: if one did, every rank
raises a ``UserError`` with the message of the lowest failing rank, so rank 0 can print it
once and every rank exits promptly instead of waiting forever for a peer that has given up.

    loader = errors.agree(lambda: build_loader(...))   # every rank calls it, in the same order
"""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem the user caused and can fix; ``str(e)`` is the whole message."""


class PeerError(UserError):
    """Raised on the ranks that did not fail themselves: another rank's problem, same message."""


def agree(block: Callable[[], T], group=None) -> T:
    """Run ``block`` here; then every rank of ``group`` learns whether any rank failed.

    * nobody failed: returns ``block()``'s result;
    * a ``UserError`` (or any exception) on some rank: that rank re-raises its own exception
      (a bug keeps its traceback), every other rank raises ``PeerError`` with the message of
      the lowest failing rank (``rank R: <message>`` for a non-user error).

    Every rank of the group must call ``agree`` the same number of times, in the same order.
    Without an initialised process group it simply runs ``block``.
    """
    import torch.distributed as dist

    from ppllm import collectives
    if not collectives.active():
        return block()
    rank, world = dist.get_rank(), dist.get_world_size()
    failure: BaseException | None = None
    result = None
    try:
        result = block()
    except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks, or they wait forever
        failure = e
    src = collectives.all_reduce([rank if failure is not None else world], op="min", group=group, integer=True)[0]
    if src == world:
        return result
    text = ""
    if rank == src:
        text = str(failure) if isinstance(failure, UserError) else f"rank {rank}: {type(failure).__name__}: {failure}"
    message = collectives.broadcast_object(text, src=src, group=group)
    if failure is not None:
        raise failure
    raise PeerError(message)
