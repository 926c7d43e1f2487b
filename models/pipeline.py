"""Partitioning, the PipelineModule subclass, layer-file I/O and an unpipelined runner."""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from deepspeed.runtime.utils import partition_balanced
from torch import nn

from .family import Family


def layer_file(directory: str, index: int) -> str:
    """DeepSpeed's per-layer file name; independent of the pipeline degree."""
    return os.path.join(directory, f"layer_{index:02d}-model_states.pt")


def layer_costs(family: Family, args: Any) -> list[float]:
    """Relative compute per pipeline layer: a matmul costs its parameter count.

    The embedding is a gather (almost free); the head is a [H,V] matmul plus the
    loss over V; norms are negligible.
    """
    counts = family.layer_param_counts(args)
    costs = [float(c) for c in counts]
    costs[0] = 0.02 * max(counts[1:-2] or [1])
    costs[-2] = 0.0
    if counts[-1] == 0:  # tied head re-uses the embedding matrix
        costs[-1] = float(counts[0])
    return costs


def stage_bounds(num_layers: int, num_stages: int, parts: Sequence[int] | None,
                 costs: Sequence[float] | None = None) -> list[int]:
    """Boundaries [b0=0, b1, ..., bP=num_layers]; stage s owns layers b[s]:b[s+1]."""
    if parts is not None:
        bounds = [0]
        for n in parts:
            bounds.append(bounds[-1] + int(n))
        return bounds
    if costs is None:
        costs = [1.0] * num_layers
    bounds = [int(b) for b in partition_balanced(list(costs), num_stages)]
    # balanced partition may leave a stage empty for tiny models; fall back to uniform
    if any(bounds[i] == bounds[i + 1] for i in range(num_stages)):
        from deepspeed.runtime.utils import partition_uniform
        bounds = list(partition_uniform(num_layers, num_stages))
    return bounds


class PipeModel(PipelineModule):
    """PipelineModule that honours an explicit per-stage layer count (``model_topo.parts``)."""

    def __init__(self, layers, *, bounds: list[int], **kwargs):
        self._ppllm_bounds = [int(b) for b in bounds]
        super().__init__(layers, **kwargs)
        self.freeze_unused_tied_parts()
        # DeepSpeed's fp32 gradient clipping (runtime.utils.clip_grad_norm_) sums norms over the
        # pipeline group but only counts parameters of stage 0 unless a parameter is flagged
        # model-parallel, so later stages were ignored. Flag every parameter this stage owns;
        # tied copies on non-owner stages stay unflagged so they are counted once.
        # Proven by tests/test_pipeline_grad.py (clip scenarios).
        self.flag_stage_parameters()

    def freeze_unused_tied_parts(self) -> None:
        """A tied module is built whole on every stage that uses it, but a stage that only runs its
        ``forward_fn`` (bloom's head) uses just the tied attribute; the rest (bloom's embedding
        LayerNorm) would sit in the optimizer with no gradient and never be loaded. Freeze it there."""
        for key, module in self.tied_modules.items():
            owners = [i for i, s in enumerate(self._layer_specs)
                      if isinstance(s, TiedLayerSpec) and s.key == key and s.forward_fn is None]
            if any(self._local_start <= i < self._local_stop for i in owners):
                continue
            shared = set(self.tied_weight_attrs[key])
            for name, p in module.named_parameters():
                if name not in shared:
                    p.requires_grad_(False)

    def flag_stage_parameters(self) -> None:
        """Call again after adding parameters (LoRA)."""
        for p in self.parameters():
            p.model_parallel = not getattr(p, "ds_pipe_replicated", False)

    def _partition_layers(self, method: str = "uniform") -> None:
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self.parts = list(self._ppllm_bounds)
        if len(self.parts) != self.num_stages + 1 or self.parts[-1] != len(self._layer_specs):
            raise ValueError(f"partition {self.parts} does not fit {self.num_stages} stages "
                             f"and {len(self._layer_specs)} layers")
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    def load_layer_files(self, directory: str) -> None:
        """Strictly load this stage's layer files, then re-sync tied weights."""
        for local_idx, layer in enumerate(self.forward_funcs):
            if not isinstance(layer, nn.Module):
                continue
            index = self._local_start + local_idx
            load_layer(layer, directory, index)
        self._synchronize_tied_weights()


def load_layer(module: nn.Module, directory: str, index: int) -> None:
    path = layer_file(directory, index)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the pipeline folder is incomplete "
                                f"(re-run convert_model.py hg_to_pp, or gather the files every stage wrote)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise RuntimeError(f"{path} is not a readable layer file (truncated or corrupt: {str(e)[:200]}); "
                           f"restore it, or re-create the folder with convert_model.py hg_to_pp") from e
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".lora_" not in k]  # adapters are not in base weights
    if missing or unexpected:
        raise KeyError(f"{path}: missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}")


class SequentialModel(nn.Module):
    """The same layer list run in one process: the unpipelined reference and a CPU runner."""

    def __init__(self, specs: list):
        super().__init__()
        self.layers = nn.ModuleList()
        self.funcs: list = []
        tied: dict[str, nn.Module] = {}
        for idx, spec in enumerate(specs):
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in tied:
                    tied[spec.key] = spec.build()
                module = tied[spec.key]
                if spec.forward_fn is not None:
                    fn = spec.forward_fn
                    self.funcs.append(lambda x, m=module, fn=fn: fn(m, x))
                    self.layers.append(nn.Identity())  # keeps indices aligned with file numbers
                    continue
            else:
                module = spec.build()
            self.layers.append(module)
            self.funcs.append(module)

    def forward(self, inputs):
        x = inputs
        for f in self.funcs:
            x = f(x)
        return x

    def load_layer_files(self, directory: str) -> None:
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, nn.Identity):
                continue
            load_layer(layer, directory, idx)
