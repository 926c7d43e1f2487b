"""Per-step training metrics: throughput, MFU, pipeline bubble; written to metrics.jsonl and tensorboard."""
from __future__ import annotations

import json
import os

import torch

# dense bf16 peak, TFLOP/s
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0, "H800": 989.0, "L40S": 362.0,
               "A10": 125.0, "V100": 125.0, "4090": 165.0}


def device_peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    from ppllm.launch import accelerator_name
    if accelerator_name() != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def flops_per_token(family, margs, seq_len: int) -> float:
    """PaLM's estimate: 6 * N_non_embedding + 12 * L * H * S (forward + backward)."""
    counts = family.layer_param_counts(margs)
    n = sum(counts) - counts[0]
    if counts[-1] == 0:  # tied head: its matmul still runs
        n += counts[0]
    L = family.num_layers(margs)
    return 6.0 * n + 12.0 * L * margs.hidden_size * seq_len


def bubble_fraction(pipe: int, micro_batches: int, schedule: str = "1f1b") -> float:
    """Idle share of the schedule in use with equal F, B and W costs: 1F1B (p - 1) / (m + p - 1); ZB-H1 as
    the engine runs it (ppllm.schedule_sim.engine_step_time: its instruction streams, DeepSpeed's transfer
    order). At p = 2 that is the paper's (p - 1)(F + B - W) per step; deeper, more."""
    if schedule == "1f1b" or pipe == 1:
        return (pipe - 1) / (micro_batches + pipe - 1)
    from ppllm.schedule_sim import StageCosts, engine_step_time
    step = engine_step_time(schedule, micro_batches, [StageCosts(1.0, 1.0, 1.0)] * pipe)
    return 1.0 - 3.0 * micro_batches / step


def batch_counts(batches: list | None) -> list[float]:
    """[real tokens, trained tokens, samples] of this rank's micro-batches (read after the step)."""
    out = [0.0, 0.0, 0.0]
    for (ids, _, doc), labels in batches or []:
        out[0] += float((doc >= 0).sum())
        out[1] += float((labels != -100).sum())
        out[2] += float(sum(len(set(row.tolist()) - {-1}) for row in doc))
    return out


class MetricsWriter:
    """Rank 0 only: appends one JSON object per record and mirrors scalars to tensorboard."""

    def __init__(self, save_path: str, tensorboard: bool):
        self.path = os.path.join(save_path, "metrics.jsonl")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=os.path.join(save_path, "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"train/{key}" if not key.startswith("eval") else key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
