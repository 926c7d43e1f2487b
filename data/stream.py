"""The step stream: packed rows -> an endless, seeded, data-parallel-sharded stream of optimizer
steps (``StepLoader``); ``one_pass`` walks every row once for evaluation."""
from __future__ import annotations

import numpy as np
import torch

from .packing import PackedRows
from .records import DataError


def total_steps(rows: int, rows_per_step: int, passes: int, max_steps: int | None = None) -> int:
    """Optimizer steps of a run: ``passes`` over ``rows`` rows, ``rows_per_step`` at a time, the
    last step completed from the next pass; capped by ``max_steps``."""
    steps = -(-passes * rows // rows_per_step)
    return min(steps, max_steps) if max_steps else steps


class StepLoader:
    """Deterministic, data-parallel-sharded, continuous stream of optimizer steps.

    The rows form one endless stream: epoch e is a permutation of all rows drawn from
    ``seed + e``, and the epochs follow one another. Step k takes the stream's rows
    ``[k * per_step, (k + 1) * per_step)``, where ``per_step = micro_batch * grad_accum * dp_size``,
    so a step that reaches the end of an epoch completes itself from the next epoch's shuffle:
    no row is dropped and any number of rows (at least one) trains. Within a step, data-parallel
    rank r takes every dp_size-th row starting at r, so the ranks' rows are disjoint within an
    epoch and every rank runs the same steps with the same shapes.

    Each step is a list of ``grad_accum`` micro-batches ``((ids, pos, doc), labels)``; rows are
    assembled only when used. ``rows`` is a PackedRows or a dict of equally long [rows, seq] arrays.
    The position (``state_dict``) is the number of stream rows consumed: resume is exact.
    ``one_pass`` walks every row once, in order, for evaluation.
    """

    has_data = True

    def __init__(self, rows, micro_batch: int, grad_accum: int, dp_rank: int, dp_size: int, seed: int,
                 pad_id: int | None = None):
        self.rows = rows
        self.mbs, self.gas = micro_batch, grad_accum
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.n = len(rows) if isinstance(rows, PackedRows) else len(rows["input_ids"])
        if self.n == 0:
            raise DataError("no rows of data to train on")
        self.pad_id = pad_id if pad_id is not None else (rows.pad_id if isinstance(rows, PackedRows) else 0)
        self.per_step = micro_batch * grad_accum * dp_size
        self._position = 0
        self._orders: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> int:
        """Steps of one pass over the rows (the last one partly from the next pass)."""
        return total_steps(self.n, self.per_step, 1)

    def steps(self, passes: int, max_steps: int | None = None) -> int:
        return total_steps(self.n, self.per_step, passes, max_steps)

    @property
    def epoch(self) -> int:
        """The epoch the next step starts in."""
        return self._position // self.n

    def state_dict(self) -> dict:
        return {"position": self._position, "rows": self.n, "per_step": self.per_step}

    def load_state_dict(self, state: dict) -> None:
        if "position" not in state:  # checkpoints written before the continuous stream
            state = {"position": state["epoch"] * self.n + state["step_in_epoch"] * self.per_step, "rows": self.n}
        pos = int(state["position"])
        if state.get("rows", self.n) != self.n:
            # other data than the checkpoint's: start over at the same epoch of the new rows
            pos = pos // int(state["rows"]) * self.n
        self._position = pos

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a step spans at most a few epochs; keep the recent ones
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng(self.seed + epoch).permutation(self.n)
        return self._orders[epoch]

    def stream(self, start: int, count: int) -> np.ndarray:
        """Row indices at stream positions ``start .. start + count``."""
        pos = np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(pos // self.n).tolist():
            sel = pos // self.n == e
            out[sel] = self._order(e)[pos[sel] % self.n]
        return out

    def _fetch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``idx``; an index of -1 is a padding row (pad ids, nothing trained, doc -1)."""
        real = idx >= 0
        if isinstance(self.rows, PackedRows):
            got = self.rows.get(idx[real])
        else:
            got = {name: np.asarray(arr[idx[real]]) for name, arr in self.rows.items()}
        if real.all():
            return got
        fill = {"input_ids": self.pad_id, "labels": -100, "position_ids": 0, "doc_ids": -1}
        out = {}
        for name, arr in got.items():
            full = np.full((len(idx),) + arr.shape[1:], fill.get(name, 0), dtype=arr.dtype)
            full[real] = arr
            out[name] = full
        return out

    def _batches(self, idx: np.ndarray) -> list:
        """This rank's micro-batches of one step whose stream rows are ``idx`` (per_step of them)."""
        mine = idx[self.dp_rank::self.dp_size]
        batches = []
        for m in range(self.gas):
            rows = self._fetch(mine[m * self.mbs:(m + 1) * self.mbs])
            t = {name: torch.from_numpy(np.ascontiguousarray(arr)) for name, arr in rows.items()}
            batches.append(((t["input_ids"], t["position_ids"], t["doc_ids"]), t["labels"]))
        return batches

    def next_step(self) -> list:
        idx = self.stream(self._position, self.per_step)
        self._position += self.per_step
        return self._batches(idx)

    @property
    def eval_steps(self) -> int:
        return total_steps(self.n, self.per_step, 1)

    def one_pass(self):
        """Every row exactly once, in row order; the last step is filled with padding rows
        (all labels -100: no tokens, no loss). Does not move the training position."""
        for k in range(self.eval_steps):
            idx = np.arange(k * self.per_step, (k + 1) * self.per_step, dtype=np.int64)
            idx[idx >= self.n] = -1
            yield self._batches(idx)


def trained_tokens(batches: list) -> int:
    return int(sum((labels != -100).sum() for _, labels in batches))
