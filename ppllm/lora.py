"""LoRA inside pipeline layers.

``apply_lora`` swaps every ``nn.Linear`` whose own name is in ``target_modules``
(the family's module names: ``q_proj``, ``W_pack``, ``query_key_value``, ...)
for a :class:`LoRALinear`.  The base ``weight``/``bias`` keep their names, so base
layer files load unchanged; the adapters add ``<name>.lora_A.weight`` ``[r, in]``
and ``<name>.lora_B.weight`` ``[out, r]``, PEFT's names.  Everything else is frozen.

    y = x W^T + b + (alpha / r) * B(A(dropout(x)))
"""
from __future__ import annotations

import json
import math
import os

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ppllm.paths import LORA_META_FILE as ADAPTER_META


class LoraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: rank of the adapters
    r: int = Field(default=8, ge=1)
    #: scaling numerator: the update is (alpha / r) * B A
    alpha: float = Field(default=16.0, gt=0)
    #: dropout on the adapter input
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    #: module names to adapt, in the family's own naming
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device,
                                dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device,
                                dtype=base.weight.dtype)
        if base.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def apply_lora(model: nn.Module, cfg: LoraConfig) -> int:
    """Inject adapters, freeze the rest. Returns the number of adapted modules."""
    targets = set(cfg.target_modules)
    swaps = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if name in targets and isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, LoRALinear(child, cfg.r, cfg.alpha, cfg.dropout))
    for n, p in model.named_parameters():
        p.requires_grad = ".lora_" in f".{n}" or n.startswith("lora_")
    return len(swaps)


def is_lora_key(key: str) -> bool:
    return ".lora_A." in f".{key}" or ".lora_B." in f".{key}"


def write_meta(folder: str, cfg: LoraConfig, base_model_path: str) -> None:
    with open(os.path.join(folder, ADAPTER_META), "w") as f:
        json.dump({"lora": cfg.model_dump(), "base_model_path": os.path.abspath(base_model_path)}, f, indent=2)


def read_meta(folder: str) -> dict | None:
    path = os.path.join(folder, ADAPTER_META)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def linear_names(family, margs) -> set[str]:
    """The family's own names of its linear layers (what target_modules may name), from the meta model."""
    from ppllm.pipeline import SequentialModel
    with torch.device("meta"):
        model = SequentialModel(family.build_specs(margs))
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def trainable_fraction(family, margs, cfg: LoraConfig) -> float:
    """Share of parameters that LoRA trains, from the meta-device model (no memory)."""
    from ppllm.pipeline import SequentialModel
    with torch.device("meta"):
        model = SequentialModel(family.build_specs(margs))
        total = sum(p.numel() for p in model.parameters())
        apply_lora(model, cfg)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable / max(1, total)


def merge_into(base: dict, adapters: dict, scaling: float) -> dict:
    """W + scaling * B @ A for every adapted weight; computed in fp32, stored in W's dtype."""
    for key in [k for k in adapters if k.endswith(".lora_A.weight")]:
        prefix = key[: -len(".lora_A.weight")]
        a, b = adapters[key].float(), adapters[f"{prefix}.lora_B.weight"].float()
        w = base[f"{prefix}.weight"]
        base[f"{prefix}.weight"] = (w.float() + scaling * (b @ a)).to(w.dtype)
    return base
