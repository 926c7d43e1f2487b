"""What every model family provides, and the generic machinery built on it.

Every family lays its pipeline out the same way::

    index 0          embed       token embedding (+ family extras)
    index 1..L       layers.{i}  decoder blocks
    index L+1        norm        final norm
    index L+2        head        output projection (a TiedLayerSpec when tied)

A *pipeline name* is ``<slot>.<local key>``, e.g. ``layers.3.self_attn.q_proj.weight``;
its layer file is ``layer_{index:02d}-model_states.pt`` holding ``{local key: tensor}``.
The HF <-> pipeline key map is a declarative list of prefix rules per family.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .common import StageContext


@dataclass
class Layer:
    """One pipeline layer, described without DeepSpeed (a conversion never imports it):
    ``cls(*args)`` builds it; ``tied_key`` shares its ``weight`` with the other layers of that key;
    ``forward_fn`` marks a re-use of a tied module (no module, no layer file of its own).
    :meth:`Family.layer_specs` turns these into DeepSpeed's LayerSpec / TiedLayerSpec."""
    cls: type
    args: tuple = ()
    tied_key: str | None = None
    forward_fn: Callable | None = None

    def build(self) -> torch.nn.Module:
        return self.cls(*self.args)

    @property
    def reuses_tied(self) -> bool:
        return self.forward_fn is not None

    @property
    def name(self) -> str:
        return f"{self.cls.__name__}(tied:{self.tied_key})" if self.reuses_tied else self.cls.__name__


def layer(cls: type, *args) -> Layer:
    return Layer(cls, args)


def tied_layer(key: str, cls: type, *args, forward_fn: Callable | None = None) -> Layer:
    return Layer(cls, args, key, forward_fn)


@dataclass
class KeyMap:
    """Prefix rules between HF names and pipeline names.

    ``rules``: ``(hf_prefix, pp_prefix)``; ``{}`` stands for the layer index.
    The first rule for a pp prefix is the one used on export; later ones are
    accepted aliases on import (e.g. bloom without ``transformer.``).
    ``drop``: HF keys (regex) that are deliberately ignored on import.
    """

    rules: list[tuple[str, str]]
    drop: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._fwd = [(_prefix_regex(h), p) for h, p in self.rules]
        seen: dict[str, str] = {}
        for h, p in self.rules:
            seen.setdefault(p, h)
        self._back = [(_prefix_regex(p), h) for p, h in seen.items()]
        self._drop = [re.compile(d) for d in self.drop]

    def to_pp(self, hf_key: str) -> str | None:
        """Pipeline name for an HF key, None if deliberately dropped. KeyError if unknown."""
        if any(d.fullmatch(hf_key) for d in self._drop):
            return None
        return _apply(self._fwd, hf_key)

    def to_hf(self, pp_key: str) -> str:
        return _apply(self._back, pp_key)


def _prefix_regex(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix).replace(re.escape("{}"), r"(\d+)"))


def _apply(rules: list[tuple[re.Pattern, str]], key: str) -> str:
    for pattern, target in rules:
        m = pattern.match(key)
        if m:
            out = target.replace("{}", m.group(1)) if m.groups() else target
            return out + key[m.end():]
    raise KeyError(key)


class Family:
    """Base class of a model family. Subclasses fill in the class attributes and hooks."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    decoder_class: type | None = None  # checkpointed by use_grad_ckpt
    default_template: str = "plain"

    # --- hooks every family implements -------------------------------------------------
    def parse_config(self, cfg: dict) -> Any:
        raise NotImplementedError

    def num_layers(self, args: Any) -> int:
        return args.num_layers

    def is_tied(self, args: Any) -> bool:
        return False

    def layers(self, args: Any, ctx: StageContext) -> list[Layer]:
        """[embed, layers..., norm, head] in ``layer_kinds`` order; layers that attend take ``ctx``."""
        raise NotImplementedError

    def layer_specs(self, args: Any, ctx: StageContext) -> list:
        """:meth:`layers` as DeepSpeed's LayerSpec / TiedLayerSpec (imported here, not at module
        import, so that conversion and planning run without DeepSpeed)."""
        from deepspeed.pipe import LayerSpec, TiedLayerSpec
        return [LayerSpec(x.cls, *x.args) if x.tied_key is None else
                TiedLayerSpec(x.tied_key, x.cls, *x.args, forward_fn=x.forward_fn, tied_weight_attr="weight")
                for x in self.layers(args, ctx)]

    def build_specs(self, args: Any, attention: str = "blockwise") -> list:
        """The layer list of one model: its layers share one StageContext (backend and caches)."""
        return self.layer_specs(args, StageContext(attention))

    def key_map(self, args: Any) -> KeyMap:
        raise NotImplementedError

    def loss_fn(self, args: Any):
        from .common import TokenLoss
        return TokenLoss()

    def export_extra(self, args: Any, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """HF tensors that are not trained but belong in an exported checkpoint."""
        return {}

    def export_layout(self, args: Any) -> str:
        """'safetensors' or 'bin': the file layout pp_to_hg writes by default."""
        return "safetensors"

    # --- generic machinery ----------------------------------------------------------------
    def layer_kinds(self, args: Any) -> list[str]:
        """The one description of the pipeline layout: the kind of every pipeline layer, in order.
        Layer i is written to ``layer_{i:02d}-model_states.pt``; decoder layer j is pipeline layer 1 + j."""
        return ["embed"] + ["decoder"] * self.num_layers(args) + ["norm", "head"]

    def num_pipe_layers(self, args: Any) -> int:
        return len(self.layer_kinds(args))

    def slot_of(self, args: Any, index: int) -> str:
        """Pipeline layer index -> its name prefix in the family's key map ('embed', 'layers.3', ...)."""
        kinds = self.layer_kinds(args)
        kind = kinds[index]
        return f"layers.{index - kinds.index('decoder')}" if kind == "decoder" else kind

    def locate(self, args: Any, pp_key: str) -> tuple[int, str]:
        """Pipeline name -> (layer file index, key inside that file)."""
        kinds = self.layer_kinds(args)
        m = re.match(r"layers\.(\d+)\.(.+)$", pp_key)
        if m:
            i = int(m.group(1))
            if i >= kinds.count("decoder"):
                raise KeyError(pp_key)
            return kinds.index("decoder") + i, m.group(2)
        slot, _, rest = pp_key.partition(".")
        if slot == "decoder" or slot not in kinds or not rest:
            raise KeyError(pp_key)
        return kinds.index(slot), rest

    def layer_names(self, args: Any) -> list[str]:
        return [x.name for x in self.layers(args, StageContext())]

    def expected_shapes(self, args: Any) -> dict[int, dict[str, tuple[torch.Size, torch.dtype]]]:
        """Layer index -> {local key: shape}, built on the meta device (no memory)."""
        out: dict[int, dict[str, Any]] = {}
        with torch.device("meta"):
            for idx, x in enumerate(self.layers(args, StageContext())):
                if not x.reuses_tied:  # a re-use of a tied module has no file of its own
                    out[idx] = {k: tuple(v.shape) for k, v in x.build().state_dict().items()}
        return out

    def layer_param_counts(self, args: Any) -> list[int]:
        with torch.device("meta"):
            return [0 if x.reuses_tied else sum(p.numel() for p in x.build().parameters())
                    for x in self.layers(args, StageContext())]


def init_linear_(module: torch.nn.Module, std: float) -> None:
    """HF-style init: normal(0, std) for Linear/Embedding weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            if m.weight.device.type != "meta":
                torch.nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None and m.bias.device.type != "meta":
                torch.nn.init.zeros_(m.bias)


__all__ = ["Family", "KeyMap", "Layer", "layer", "tied_layer", "init_linear_"]
