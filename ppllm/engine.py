"""Building the DeepSpeed pipeline engine and taking one token-weighted optimizer step.

``build_engine`` turns a family's layer list into this rank's stage of a ``PipeModel``, loads
its layer files, and hands it to ``deepspeed.initialize`` with ppllm's optimizer groups and
schedule. ``train_step`` / ``eval_step`` feed one step of micro-batches to ``train_batch`` /
``eval_batch`` with the step's token normaliser given to the loss function (Python floats, see with_normaliser).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from data.dataset import trained_tokens
from models.common import next_token_mask
from ppllm import collectives, ds_compat
from ppllm.log import log0


def ds_config(cfg) -> dict:
    """The DeepSpeed dict: the YAML's DeepSpeed keys plus ppllm's precision and defaults."""
    ds = json.loads(json.dumps(cfg.ds))
    ds.setdefault("steps_per_print", 10 ** 9)  # we do our own logging
    ds.setdefault("pipeline", {}).setdefault("use_reentrant", False)
    route = precision_route(cfg)
    if route.precision == "bf16":
        ds.setdefault("bf16", {"enabled": True})
    elif route.precision == "fp16":
        ds.setdefault("fp16", {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                               "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1})
    if route.grad_accum_dtype is not None:
        ds.setdefault("data_types", {})["grad_accum_dtype"] = route.grad_accum_dtype
        ds.setdefault("zero_optimization", {})["stage"] = route.zero_stage
    if route.reduce_dtype is not None:
        # DeepSpeed's data-parallel gradient all-reduce runs in the weights' dtype unless told: with bf16
        # it would round the fp32 sums to bf16 once per step, on every replica's share
        ds.setdefault("communication_data_type", route.reduce_dtype)
    opt = ds.get("optimizer")
    if opt and opt.get("type", "").lower() in ("adam", "adamw"):
        params = opt.setdefault("params", {})
        if accelerator() == "cpu":
            params.setdefault("torch_adam", True)  # DeepSpeed's fused Adam is a CUDA op
        elif not params.get("torch_adam") and not ds_compat.fused_adam_buildable():
            # no prebuilt FusedAdam and no nvcc to JIT-build it: torch's fused AdamW does the same on CUDA
            params.update(torch_adam=True, fused=True)
    return ds


def accelerator() -> str:
    """The device kind DeepSpeed trains on here ("cuda", "cpu", ...): DS_ACCELERATOR, else what it
    detects. Precision, the optimizer's implementation and the device checks follow it, not
    torch.cuda.is_available() (a GPU host running the CPU suite says "cpu")."""
    from ppllm.launch import accelerator_name
    return accelerator_name()


def resolve_precision(cfg) -> str:
    for key in ("bf16", "fp16"):
        if isinstance(cfg.ds.get(key), dict) and cfg.ds[key].get("enabled"):
            return key
    if cfg.run.precision == "auto":
        return "fp32" if accelerator() == "cpu" else "bf16"
    return cfg.run.precision


@dataclass(frozen=True)
class PrecisionRoute:
    """How a run keeps its numbers: weights/activations in ``precision``, the master weights and the
    optimizer in fp32, gradients accumulated over micro-batches in ``grad_accum_dtype`` (None: the
    weights' dtype, DeepSpeed's default)."""
    precision: str
    zero_stage: int
    grad_accum_dtype: str | None
    reduce_dtype: str | None = None  # DeepSpeed's communication_data_type (None: the weights' dtype)

    def describe(self) -> str:
        if self.precision == "fp32":
            return "precision fp32: weights, gradients and optimizer state in fp32"
        acc = self.grad_accum_dtype or self.precision
        red = self.reduce_dtype or self.precision
        return (f"precision {self.precision}: {self.precision} weights and activations, fp32 master weights and "
                f"optimizer state, gradients accumulated in {acc}" + (f" (ZeRO stage {self.zero_stage})"
                                                                       if self.zero_stage else "")
                + f", reduced across data replicas in {red}")


def precision_route(cfg) -> PrecisionRoute:
    """bf16 accumulates gradients in fp32 unless the config asks otherwise: DeepSpeed's bf16
    optimizer does that under the pipeline only with ZeRO stage 1 (``data_types.grad_accum_dtype:
    fp32``); without it, 128 micro-batches of gradients would be summed in bf16 (8 bits of
    mantissa). Stage 1 at data 1 partitions nothing; at data N it shards the fp32 state N ways."""
    precision = resolve_precision(cfg)
    zero = cfg.ds.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    asked = (cfg.ds.get("data_types") or {}).get("grad_accum_dtype")
    comm = cfg.ds.get("communication_data_type")
    if precision != "bf16" or (zero.get("offload_optimizer") or {}).get("device") == "cpu":
        return PrecisionRoute(precision, stage, asked, comm)
    if asked in (None, "fp32"):
        # sums kept in fp32 are also reduced across replicas in fp32 (DeepSpeed would cast them to bf16
        # for the all-reduce), unless the config chooses communication_data_type itself
        return PrecisionRoute(precision, max(stage, 1), "fp32", comm or "fp32")
    return PrecisionRoute(precision, stage, asked, comm)


def param_groups(model: torch.nn.Module, no_decay: list[str]) -> list[dict]:
    """Weight decay for matrices; none for biases, norm weights and names matching no_decay."""
    from torch import nn

    from models.common import RMSNorm
    norm_params = {id(p) for m in model.modules() if isinstance(m, (RMSNorm, nn.LayerNorm))
                   for p in m.parameters(recurse=False)}
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in norm_params or any(pat in name for pat in no_decay):
            plain.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def lr_lambda(sched, total_steps: int):
    """Warmup then cosine (or constant) decay to min_lr_ratio, as a LambdaLR factor."""
    total = sched.total_steps or total_steps
    warm = sched.warmup_steps if sched.warmup_steps is not None else int(sched.warmup_ratio * total)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if sched.type == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return sched.min_lr_ratio + (1 - sched.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_engine(family, margs, bounds: list[int], pipe: int, data: int, ds_cfg: dict, seed: int,
                 grad_ckpt: bool, model_path: str | None, no_decay: list[str] | None = None,
                 lr_scheduler=None, lora=None, attention: str = "blockwise", loss_chunk_bytes: int | None = None,
                 schedule: str = "1f1b"):
    """PipelineModule for this rank's stage (weights from model_path, or random) wrapped by DeepSpeed,
    training under ``schedule`` (``1f1b``: DeepSpeed's TrainSchedule; ``zb-h1``: ds_compat.use_zb_h1).
    Returns (engine, loss_fn, topology)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from ppllm.pipeline import PipeModel
    topo = ds_compat.topology(pipe, data)
    loss_fn = family.loss_fn(margs)
    if loss_chunk_bytes is not None:
        loss_fn.chunk_bytes = loss_chunk_bytes
    model = PipeModel(family.build_specs(margs, attention), bounds=bounds, topology=topo, loss_fn=loss_fn,
                      seed_layers=True, base_seed=seed,
                      activation_checkpoint_interval=1 if grad_ckpt else 0,
                      checkpointable_layers=[family.decoder_class.__name__] if grad_ckpt else None,
                      weights=model_path, device=get_accelerator().current_device_name(),
                      dtype=training_dtype(ds_cfg))
    if lora is not None:
        from ppllm.lora import apply_lora
        apply_lora(model, lora)
        model.flag_stage_parameters()
    groups = param_groups(model, no_decay if no_decay is not None else ["bias", "norm"])
    ds_cfg, optimizer = _client_optimizer(ds_cfg, groups)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_cfg, model_parameters=groups,
                                           optimizer=optimizer, lr_scheduler=lr_scheduler)
    ds_compat.measure_grad_norm_before_step(engine)
    check_precision(engine, ds_cfg)
    if schedule == "zb-h1":
        ds_compat.use_zb_h1(engine)
    elif schedule != "1f1b":
        raise ValueError(f"schedule {schedule!r}: one of 1f1b, zb-h1")
    return engine, loss_fn, topo


def training_dtype(ds_cfg: dict) -> torch.dtype:
    """The dtype the stage's weights live in (DeepSpeed keeps fp32 master copies for bf16/fp16)."""
    if (ds_cfg.get("bf16") or {}).get("enabled"):
        return torch.bfloat16
    if (ds_cfg.get("fp16") or {}).get("enabled"):
        return torch.float16
    return torch.float32


def check_precision(engine, ds_cfg: dict) -> None:
    """The engine keeps the numbers the config asked for: bf16 with fp32 accumulation really got
    DeepSpeed's bf16 optimizer with fp32 gradient buffers (a version that silently fell back to
    bf16 sums would fail here, at start-up)."""
    want = (ds_cfg.get("data_types") or {}).get("grad_accum_dtype")
    if want is None or not engine.bfloat16_enabled():
        return
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", None: "?"}
    got = names.get(ds_compat.grad_accumulation_dtype(engine))
    if got != want:
        raise RuntimeError(f"DeepSpeed accumulates gradients in {got}, but the config asks for {want}")
    reduce_want = ds_cfg.get("communication_data_type")
    reduced = names.get(ds_compat.gradient_reduce_dtype(engine))
    if reduce_want is not None and reduced != reduce_want:
        raise RuntimeError(f"DeepSpeed reduces gradients across data replicas in {reduced}, but the config asks "
                           f"for {reduce_want}")
    weights = {names.get(p.dtype, str(p.dtype)) for p in engine.module.parameters()}
    log0(f"engine: {'/'.join(sorted(weights))} weights, {names.get(ds_compat.master_weights_dtype(engine))} master "
         f"weights, gradients summed in {got}, reduced across data replicas in {reduced}")


def grad_norm(engine) -> float | None:
    """The step's gradient norm: measured by ppllm on the plain fp32 path, else DeepSpeed's."""
    norm = ds_compat.measured_grad_norm(engine)
    if norm is None:
        norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else None


def _client_optimizer(ds_cfg: dict, groups: list[dict]):
    """DeepSpeed builds Lion as FusedLion, a CUDA-only op; without CUDA use its CPU Lion instead."""
    opt = ds_cfg.get("optimizer") or {}
    offload = (ds_cfg.get("zero_optimization") or {}).get("offload_optimizer", {}).get("device") == "cpu"
    if opt.get("type", "").lower() != "lion" or accelerator() != "cpu" or offload:
        return ds_cfg, None
    from deepspeed.ops.lion import DeepSpeedCPULion
    ds_cfg = {k: v for k, v in ds_cfg.items() if k != "optimizer"}
    return ds_cfg, DeepSpeedCPULion(groups, **opt.get("params", {}))


def with_normaliser(batches: list | None, scale: float, z_scale: float | None = None, loss_fns=()) -> list | None:
    """Give the step's loss normaliser to the loss functions as Python floats (``TokenLoss.normaliser``;
    every micro-batch of a step shares it), so nothing travels to the device and back per micro-batch.
    Returns the micro-batches, with ``(labels, next_token_mask)`` as labels for a z-loss (a per-token
    tensor the last stage needs, computed from the doc ids of the first)."""
    for fn in loss_fns:
        if fn is not None and hasattr(fn, "normaliser"):
            fn.normaliser = (scale, z_scale)
    if batches is None:
        return None
    if z_scale is None:
        return list(batches)
    return [(inputs, (labels, next_token_mask(inputs[2]))) for inputs, labels in batches]


def _wants_z_mask(engine) -> bool:
    return bool(getattr(getattr(engine.module, "loss_fn", None), "needs_next_token_mask", False))


def z_positions(batches: list) -> int:
    """Positions of a step that predict a next token of their document (the z-loss's count)."""
    return int(sum(next_token_mask(inputs[2]).sum() for inputs, _ in batches))


def normalised(engine, batches: list | None) -> list | None:
    """The step's micro-batches with their loss normaliser set on the loss function (see with_normaliser).

    The engine averages per-micro-batch losses over grad-accum steps and data-parallel
    replicas; scaling each micro-batch's summed loss by gas * dp / (trained tokens of
    the whole step, over every replica) turns that average into sum / count. A z-loss is
    normalised the same way by the step's count of next-token positions. Only the last
    stage computes a loss; the others attach zeros of the same form.
    """
    scale, z_scale = 0.0, None
    wants_z = _wants_z_mask(engine)
    if engine.is_last_stage():
        grid = engine.grid
        tokens, positions = collectives.all_reduce(
            [float(trained_tokens(batches)) if batches else 0.0,
             float(z_positions(batches)) if wants_z and batches else 0.0], group=grid.get_data_parallel_group())
        factor = engine.gradient_accumulation_steps() * grid.get_data_parallel_world_size()
        scale = factor / max(1.0, tokens)
        z_scale = factor / max(1.0, positions) if wants_z else None
    elif wants_z:
        z_scale = 0.0
    return with_normaliser(batches, scale, z_scale, [getattr(engine.module, "loss_fn", None)])


def train_step(engine, batches: list | None) -> float:
    """One optimizer step whose loss is the token-weighted mean over every micro-batch and replica."""
    batches = normalised(engine, batches)
    return float(engine.train_batch(iter(batches) if batches is not None else None))


def eval_step(engine, batches: list | None) -> tuple[float, float]:
    """(summed loss, trained tokens) of one step of micro-batches on this replica; both are
    meaningful on the first stage, which receives the loss from the last.

    ``eval_batch`` returns the step's token-weighted mean over every replica (the normalisers of
    ``train_step``), so the replicas' shares ``mean * own tokens`` add up to its summed loss even
    when they hold unequal tokens (an eval step with padding rows)."""
    n = float(trained_tokens(batches)) if batches else 0.0
    loss = float(engine.eval_batch(iter(normalised(engine, batches)) if batches is not None else None))
    return loss * n, n
