"""A family's layer list as this rank's pipeline stage, layer-file loading, and the same list run
unpipelined in one process (the reference of the gradient-equivalence tests)."""
from __future__ import annotations

import os

import torch
from torch import nn

from models.common import HeadOutput
from ppllm import ds_compat, errors
from ppllm.errors import UserError
from ppllm.ds_compat import TiedLayerSpec
from ppllm.paths import layer_file


class PipeModel(ds_compat.BoundedPipelineModule):
    """This rank's stage of a family's layer list, with explicit stage bounds (``model_topo.parts``).

    ``weights``: a pipeline folder to load. Then the stage is built on the meta device and each
    layer gets its storage on ``device`` in ``dtype`` and its values from its file, one layer at
    a time: host memory stays near one layer (the file is memory-mapped), and nothing is
    initialised randomly only to be overwritten. Without ``weights`` (``from_scratch``) the layers
    are built and initialised directly on ``device`` (DeepSpeed seeds each layer), then cast."""

    def __init__(self, layers, *, bounds: list[int], weights: str | None = None, device: str | None = None,
                 dtype: torch.dtype = torch.float32, **kwargs):
        self._device = torch.device(device or "cpu")
        self._dtype = dtype
        if weights is None:
            with torch.device(self._device):
                super().__init__(layers, bounds=bounds, **kwargs)
            self.to(dtype)
        else:
            super().__init__(layers, bounds=bounds, materialise=lambda m: m._materialise(weights), **kwargs)
        self.freeze_unused_tied_parts()
        self.flag_stage_parameters()

    def _materialise(self, directory: str) -> None:
        """Storage and values for the meta-built stage: layer files for this stage's layers; a
        tied module re-used here but owned elsewhere is zeroed (DeepSpeed's tied-weight sync,
        right after, copies the owner's values in)."""
        def load_all():
            for index, layer in self.local_layers():
                layer.to(self._dtype).to_empty(device=self._device)
                load_layer(layer, directory, index)
        errors.agree(load_all)
        for _, module, _, owners in self.tied_groups():
            if not any(i in self.stage_range for i in owners):
                module.to(self._dtype).to_empty(device=self._device)
                for p in module.parameters():
                    p.detach().zero_()

    def freeze_unused_tied_parts(self) -> None:
        """A tied module is built whole on every stage that uses it, but a stage that only runs its
        ``forward_fn`` (bloom's head) uses just the tied attribute; the rest (bloom's embedding
        LayerNorm) would sit in the optimizer with no gradient and never be loaded. Freeze it there."""
        for _, module, shared, owners in self.tied_groups():
            if any(i in self.stage_range for i in owners):
                continue
            for name, p in module.named_parameters():
                if name not in shared:
                    p.requires_grad_(False)

    def flag_stage_parameters(self) -> None:
        """Call again after adding parameters (LoRA)."""
        ds_compat.count_in_clip_norm(self)

    def load_layer_files(self, directory: str) -> None:
        """Strictly load this stage's layer files, then re-sync tied weights. Every rank calls this; a
        missing or damaged file on any stage stops every rank with that file's one-line message."""
        errors.agree(lambda: [load_layer(layer, directory, index) for index, layer in self.local_layers()])
        self.sync_tied_weights()


class CheckpointError(UserError):
    """A layer file that is missing, unreadable or of another model; the message names it and the fix."""


def load_layer(module: nn.Module, directory: str, index: int) -> None:
    path = layer_file(directory, index)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the pipeline folder is incomplete "
                              f"(re-run convert_model.py hg_to_pp, or gather the files every stage wrote)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        first = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path} is not a readable layer file (truncated or corrupt: {first}); "
                              f"restore it, or re-create the folder with convert_model.py hg_to_pp") from e
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".lora_" not in k]  # adapters are not in base weights
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}; "
                              f"it belongs to another model than config.json describes")


class SequentialModel(nn.Module):
    """The same layer list run in one process: the unpipelined reference and a CPU runner.
    It returns the logits (``logits=True``), or what the head returns, a ``HeadOutput`` that the
    family's loss turns into a chunked loss (``logits=False``, as in the pipeline)."""

    def __init__(self, specs: list, logits: bool = True):
        super().__init__()
        self.return_logits = logits
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
        return x.logits() if self.return_logits and isinstance(x, HeadOutput) else x

    def load_layer_files(self, directory: str) -> None:
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, nn.Identity):
                continue
            load_layer(layer, directory, idx)
