"""The one partitioner: which pipeline layers each stage runs.

A model's pipeline layers are the family's ``layer_kinds`` (embed, decoder x L, norm, head).
Stage s owns layers ``bounds[s]:bounds[s+1]``; ``parts`` is the same as per-stage counts.
Explicit ``parts`` are taken as given; ``parts: auto`` balances per-layer costs
(``ppllm.planner.layer_weights``: compute and memory), falling back to an even split when a
balanced split would leave a stage empty.
"""
from __future__ import annotations

from typing import Any, Sequence


def bounds_from_parts(parts: Sequence[int]) -> list[int]:
    bounds = [0]
    for n in parts:
        bounds.append(bounds[-1] + int(n))
    return bounds


def parts_from_bounds(bounds: Sequence[int]) -> list[int]:
    return [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]


def even_parts(n: int, stages: int) -> list[int]:
    base, extra = divmod(n, stages)
    return [base + (1 if i < extra else 0) for i in range(stages)]


def balanced_bounds(costs: Sequence[float], stages: int) -> list[int]:
    """Contiguous bounds minimising the costliest stage; never an empty stage."""
    from ppllm import ds_compat
    bounds = ds_compat.balanced_bounds(list(costs), stages)
    if any(bounds[i] == bounds[i + 1] for i in range(stages)):
        bounds = ds_compat.uniform_bounds(len(costs), stages)
    return bounds


def stage_bounds(num_layers: int, num_stages: int, parts: Sequence[int] | None,
                 costs: Sequence[float] | None = None) -> list[int]:
    """Bounds from explicit parts, or balanced over costs (uniform costs when none are given)."""
    if parts is not None:
        return bounds_from_parts(parts)
    return balanced_bounds(list(costs) if costs is not None else [1.0] * num_layers, num_stages)


def parts_problems(parts: Sequence[int], num_layers: int | None, pipe: int) -> list[str]:
    """What is wrong with explicit parts for this model and pipeline degree (config messages)."""
    problems = []
    if len(parts) != pipe:
        problems.append(f"model_topo.parts: {len(parts)} entries but {pipe} pipeline stages (dims[0]); "
                        f"give one layer count per stage, or use parts: auto")
    if any(p < 1 for p in parts):
        problems.append(f"model_topo.parts: {list(parts)} has a stage with no layers; every stage needs at least one")
    if num_layers is not None and sum(parts) != num_layers:
        problems.append(f"model_topo.parts: {list(parts)} sums to {sum(parts)}, but the model has {num_layers} "
                        f"pipeline layers (embedding + decoder layers + final norm + head); e.g. "
                        f"{even_parts(num_layers, len(parts))}, or parts: auto")
    return problems


def layer_costs(family, args: Any, seq_len: int = 2048, flash: bool = False) -> list[float]:
    """Training FLOPs per token of each pipeline layer (forward + backward), the compute that
    ``parts: auto`` balances.

    * decoder: 6 x its parameters (the matmuls) + 12 x seq x (heads x head dim) for attention
      (attention: dense computes the full S x S; flash-attn and blockwise skip the upper triangle: half);
    * head + loss: 6 x V x H (logits and both gradients; the same for a tied head);
    * embedding: a gather (2 % of a decoder layer); norms: negligible.

    Calibration (BENCHMARKS.md, "Balance"): a timing of one decoder layer and of head + loss
    (forward + backward, CPU, one thread) at hidden 256/512 and vocabularies 2000-16032 gave
    head/decoder ratios within 0-15 % of these FLOP ratios; the loss's elementwise work (18-26 %
    of the head's matmul time) is about matched by the decoder's own (norms, rope, softmax), so
    neither gets an extra term. The parameter count alone overpriced the head by 18-35 %.
    """
    counts = family.layer_param_counts(args)
    kinds = family.layer_kinds(args)
    H, V = args.hidden_size, args.vocab_size
    attention = 12.0 * seq_len * args.num_heads * args.head_dim * (0.5 if flash else 1.0)
    decoder = [6.0 * c + attention for c, k in zip(counts, kinds) if k == "decoder"] or [1.0]
    costs = []
    for c, k in zip(counts, kinds):
        if k == "decoder":
            costs.append(6.0 * c + attention)
        elif k == "embed":
            costs.append(0.02 * max(decoder))
        elif k == "norm":
            costs.append(0.0)
        else:  # the head and the loss
            costs.append(6.0 * V * H)
    return costs
