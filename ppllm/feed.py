"""What each rank feeds the engine: the validated, packed rows of a run and their step stream.

The first and last pipeline stage of every data-parallel replica read data (the engine pulls
inputs on the first stage and labels on the last); middle stages only learn the step count.
"""
from __future__ import annotations

import torch

from ppllm.log import is_rank0


def load_data(cfg, model_type: str, files: list[str] | None = None):
    """(tokenizer, packed rows, stats); every sample is validated first (strict: stop on any)."""
    from data.dataset import build_rows, source_weights
    from data.templates import get_template
    from data.tokenizer import load_tokenizer
    tok = load_tokenizer(cfg.tokenizer_path, model_type)
    template = get_template(cfg.run.template, tok, model_type, system_prompt=cfg.run.system_prompt)
    training = files is None or files == cfg.data_files()
    files = cfg.data_files() if files is None else files
    weights = source_weights(cfg.run.data_path, cfg.run.data_weights) if training else None
    rows, stats = build_rows(files, template, cfg.run.max_seq_len, cfg.run.packing, cfg.run.overlong, cfg.run.seed,
                             strict=cfg.run.strict, weights=weights, progress=is_rank0())
    stats.template = template.name
    return tok, rows, stats


def format_data_stats(stats) -> str:
    kinds = ", ".join(f"{k}={v}" for k, v in sorted(stats.samples.items()))
    template = f"template {stats.template}; " if getattr(stats, "template", None) else ""
    lines = [f"data: {sum(stats.samples.values())} samples ({kinds}) from {len(stats.sources)} file(s); {template}"
             f"{stats.tokens} tokens, {stats.trained_tokens} trained; {stats.truncated} truncated, "
             f"{stats.dropped} dropped; {stats.rows} rows, packing efficiency {stats.efficiency:.1%} "
             f"(one sample per row would be {stats.padded_efficiency:.1%})"]
    if stats.skipped:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items()))
        lines.append(f"data: skipped {sum(stats.skipped.values())} bad sample(s) (strict: false): {reasons}")
    return "\n".join(lines)


class NoData:
    """Stand-in loader for middle stages: knows the step count, holds no data."""
    has_data = False

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch

    def next_step(self):
        return None

    def load_state_dict(self, state):
        pass

    def state_dict(self):
        return {}


def make_loader(cfg, files: list[str], model_type: str, has_data: bool, dp_rank: int, dp_size: int,
                announce: bool):
    """StepLoader on data-reading ranks; every rank learns the (minimum) steps per epoch."""
    from data.dataset import StepLoader
    loader = None
    steps = torch.tensor([2 ** 62], dtype=torch.long)
    if has_data:
        _, rows, stats = load_data(cfg, model_type, files)
        if announce:
            print(format_data_stats(stats), flush=True)
        loader = StepLoader(rows, cfg.micro_batch, cfg.grad_accum, dp_rank, dp_size, cfg.run.seed)
        steps[0] = loader.steps_per_epoch
    torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MIN)
    if loader is None:
        return NoData(int(steps))
    loader.limit_steps_per_epoch(int(steps))
    return loader
