"""Samples -> token rows of fixed length -> micro-batches for the pipeline engine.

A row is ``max_seq_len`` tokens holding one or more whole documents (packing)
or one document plus padding.  For every row we keep
  input_ids, labels (already shifted; -100 = not trained), position_ids
  (restart per document) and doc_ids (attention never crosses a change).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from .templates import Segments, Template

SAMPLE_TYPES = ("pretrain", "instruct")


class DataError(Exception):
    pass


def read_records(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for a JSON array or JSON Lines file."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason})")
    stripped = text.lstrip()
    if stripped.startswith("["):
        return _read_json_array(path, text)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg})")
    return out


def _read_json_array(path: str, text: str) -> list[tuple[int, dict]]:
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    out = []
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: unterminated JSON array")
        if text[i] == "]":
            return out
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{text.count(chr(10), 0, e.pos) + 1}: invalid JSON ({e.msg})")
        out.append((line, obj))


def render(sample: dict, template: Template, where: str) -> Segments:
    if not isinstance(sample, dict):
        raise DataError(f"{where}: a sample must be a JSON object, got {type(sample).__name__}")
    kind = sample.get("type")
    if kind not in SAMPLE_TYPES:
        raise DataError(f"{where}: unknown or missing 'type' {kind!r}; expected one of {', '.join(SAMPLE_TYPES)}")
    if kind == "pretrain":
        return template.pretrain(_text(sample, "text", where))
    inp = sample.get("input")
    if inp is not None and not isinstance(inp, str):
        raise DataError(f"{where}: 'input' must be a string")
    return template.instruct(_text(sample, "instruct", where), inp or None, _text(sample, "output", where))


def _text(sample: dict, key: str, where: str) -> str:
    v = sample.get(key)
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty string")
    return v


@dataclass
class Doc:
    ids: np.ndarray      # int64 tokens
    labels: np.ndarray   # int64, shifted, -100 = not trained


def segments_to_doc(segs: Segments, max_len: int, overlong: str) -> Doc | None:
    ids = [t for s, _ in segs for t in s]
    mask = [m for s, m in segs for _ in s]
    if len(ids) > max_len:
        if overlong == "drop":
            return None
        ids, mask = ids[:max_len], mask[:max_len]
    ids_a = np.asarray(ids, dtype=np.int64)
    labels = np.full(len(ids), -100, dtype=np.int64)
    nxt = np.asarray(mask[1:], dtype=bool)
    labels[:-1][nxt] = ids_a[1:][nxt]
    if not (labels != -100).any():
        return None
    return Doc(ids_a, labels)


@dataclass
class DataStats:
    samples: dict = field(default_factory=dict)
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    rows: int = 0
    row_len: int = 1

    @property
    def efficiency(self) -> float:
        """Real tokens / all token slots."""
        return self.tokens / max(1, self.rows * self.row_len)


def build_rows(files: list[str], template: Template, max_len: int, packing: bool = True,
               overlong: str = "truncate", seed: int = 0) -> tuple[dict[str, np.ndarray], DataStats]:
    stats = DataStats(row_len=max_len)
    docs: list[Doc] = []
    for path in files:
        for line, obj in read_records(path):
            where = f"{path}:{line}"
            segs = render(obj, template, where)
            kind = obj["type"]
            stats.samples[kind] = stats.samples.get(kind, 0) + 1
            n = sum(len(s) for s, _ in segs)
            doc = segments_to_doc(segs, max_len, overlong)
            if n > max_len:
                if doc is None:
                    stats.dropped += 1
                else:
                    stats.truncated += 1
            if doc is not None:
                docs.append(doc)
    if not docs:
        raise DataError(f"no trainable samples in {', '.join(files)}")
    random.Random(seed).shuffle(docs)
    rows = pack(docs, max_len) if packing else [[d] for d in docs]
    out = {k: np.zeros((len(rows), max_len), dtype=np.int64) for k in ("input_ids", "position_ids")}
    out["labels"] = np.full((len(rows), max_len), -100, dtype=np.int64)
    out["doc_ids"] = np.full((len(rows), max_len), -1, dtype=np.int64)
    out["input_ids"][:] = template.tok.pad_id
    for r, row in enumerate(rows):
        at = 0
        for d_i, d in enumerate(row):
            n = len(d.ids)
            out["input_ids"][r, at:at + n] = d.ids
            out["labels"][r, at:at + n] = d.labels
            out["position_ids"][r, at:at + n] = np.arange(n)
            out["doc_ids"][r, at:at + n] = d_i
            at += n
    stats.rows = len(rows)
    stats.tokens = int(sum(len(d.ids) for d in docs))
    stats.trained_tokens = int((out["labels"] != -100).sum())
    return out, stats


def pack(docs: list[Doc], max_len: int, window: int = 256) -> list[list[Doc]]:
    """First-fit packing over a window of open rows; order otherwise kept."""
    rows: list[list[Doc]] = []
    free: list[int] = []
    open_rows: list[int] = []
    for d in docs:
        n = len(d.ids)
        for j, r in enumerate(open_rows):
            if free[r] >= n:
                rows[r].append(d)
                free[r] -= n
                if free[r] == 0:
                    open_rows.pop(j)
                break
        else:
            rows.append([d])
            free.append(max_len - n)
            if free[-1] > 0:
                open_rows.append(len(rows) - 1)
                if len(open_rows) > window:
                    open_rows.pop(0)
    return rows


class StepLoader:
    """Deterministic, data-parallel-sharded stream of optimizer steps.

    Each step is a list of ``grad_accum`` micro-batches ``((ids, pos, doc), labels)``.
    Rows are reshuffled every epoch from ``seed + epoch``; rank r takes every
    dp-th row, and every rank sees the same number of steps.
    """

    def __init__(self, rows: dict[str, np.ndarray], micro_batch: int, grad_accum: int, dp_rank: int,
                 dp_size: int, seed: int):
        self.rows = rows
        self.mbs, self.gas = micro_batch, grad_accum
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        n = len(rows["input_ids"])
        self.steps_per_epoch = n // dp_size // (micro_batch * grad_accum)
        if self.steps_per_epoch == 0:
            raise DataError(f"{n} rows of data are not enough for one optimizer step: it needs micro batch "
                            f"{micro_batch} x gradient_accumulation_steps {grad_accum} x data {dp_size} = "
                            f"{micro_batch * grad_accum * dp_size} rows; add data or shrink the batch")
        self.epoch = 0
        self.step_in_epoch = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]

    def _order(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.rows["input_ids"]))
        per_rank = self.steps_per_epoch * self.mbs * self.gas
        return order[self.dp_rank::self.dp_size][:per_rank]

    def next_step(self) -> list:
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        order = self._order(self.epoch)
        k = self.step_in_epoch * self.mbs * self.gas
        self.step_in_epoch += 1
        batches = []
        for m in range(self.gas):
            idx = order[k + m * self.mbs: k + (m + 1) * self.mbs]
            t = {name: torch.from_numpy(arr[idx]) for name, arr in self.rows.items()}
            batches.append(((t["input_ids"], t["position_ids"], t["doc_ids"]), t["labels"]))
        return batches


def trained_tokens(batches: list) -> int:
    return int(sum((labels != -100).sum() for _, labels in batches))
