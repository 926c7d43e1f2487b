"""The one wall between ppllm and DeepSpeed's internals.

ppllm needs a few things DeepSpeed's pipeline engine does not offer publicly: an explicit
per-stage partition, the layer list of this stage, tied-module bookkeeping, the flag that
makes fp32 clipping count every stage, and a gradient norm on the plain fp32 path. Every
use of a private name lives here, behind small functions with public names, and the
supported DeepSpeed range is checked on import. ``tests/test_pipeline_grad.py`` is the
contract test of this module: gradients and weights after a step equal an unpipelined run.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

SUPPORTED = ((0, 19, 0), (0, 20, 0))  # [low, high): the versions these internals were checked on


def _version_tuple(text: str) -> tuple[int, int, int]:
    nums = []
    for part in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        nums.append(int(digits) if digits else 0)
    return tuple((nums + [0, 0, 0])[:3])


def check_version(version: str) -> None:
    low, high = SUPPORTED
    if not (low <= _version_tuple(version) < high):
        raise ImportError(
            f"ppllm needs DeepSpeed >={'.'.join(map(str, low))},<{'.'.join(map(str, high))} (it relies on "
            f"pipeline-engine internals checked on that range); found {version}. "
            f"Install the pinned version: pip install -r requirements.txt")


import deepspeed  # noqa: E402

check_version(deepspeed.__version__)

from deepspeed.pipe import PipelineModule, TiedLayerSpec  # noqa: E402
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology  # noqa: E402
from deepspeed.runtime.utils import partition_balanced as _partition_balanced  # noqa: E402
from deepspeed.runtime.utils import partition_uniform as _partition_uniform  # noqa: E402


def topology(pipe: int, data: int) -> PipeDataParallelTopology:
    return PipeDataParallelTopology(num_pp=pipe, num_dp=data)


def balanced_bounds(costs: list[float], stages: int) -> list[int]:
    """Contiguous stage bounds minimising the costliest stage (DeepSpeed's partitioner)."""
    return [int(b) for b in _partition_balanced(list(costs), stages)]


def uniform_bounds(n: int, stages: int) -> list[int]:
    return [int(b) for b in _partition_uniform(n, stages)]


class BoundedPipelineModule(PipelineModule):
    """A PipelineModule with the stage bounds given up front, and public names for what ppllm reads.

    DeepSpeed's ``partition_method`` cannot take an explicit list of layer counts, so
    ``_partition_layers`` is overridden to install ``bounds`` instead.
    """

    def __init__(self, layers, *, bounds: list[int], materialise=None, **kwargs):
        self._ppllm_bounds = [int(b) for b in bounds]
        self._ppllm_materialise = materialise
        super().__init__(layers, **kwargs)

    def _build(self) -> None:  # DeepSpeed hook: builds this stage's layers, before moving them
        """With ``materialise``: every layer is built on the meta device (no memory, no random
        init), then ``materialise(self)`` gives it storage on the training device in the
        training dtype and fills it (from layer files). DeepSpeed's ``.to(device)`` that follows
        is then a no-op, so no host copy of the stage in fp32 ever exists."""
        if self._ppllm_materialise is None:
            super()._build()
            return
        with torch.device("meta"):
            super()._build()
        self._ppllm_materialise(self)

    def _partition_layers(self, method: str = "uniform") -> None:  # DeepSpeed hook
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self.parts = list(self._ppllm_bounds)
        if len(self.parts) != self.num_stages + 1 or self.parts[-1] != len(self._layer_specs):
            raise ValueError(f"partition {self.parts} does not fit {self.num_stages} stages "
                             f"and {len(self._layer_specs)} layers")
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    # --- read-only views of DeepSpeed's bookkeeping ------------------------------------------
    @property
    def stage_range(self) -> range:
        """Global layer indices this stage runs."""
        return range(self._local_start, self._local_stop)

    @property
    def layer_specs(self) -> list:
        return list(self._layer_specs)

    def local_layers(self) -> Iterator[tuple[int, nn.Module]]:
        """(global layer index, module) for this stage's layers that own weights (a tied re-use,
        a plain function, is skipped: it has no layer file)."""
        for local_idx, layer in enumerate(self.forward_funcs):
            if isinstance(layer, nn.Module):
                yield self._local_start + local_idx, layer

    def tied_groups(self) -> Iterator[tuple[str, nn.Module, list[str], list[int]]]:
        """(key, module, tied attribute names, layer indices that build it) per tied module here."""
        for key, module in self.tied_modules.items():
            owners = [i for i, s in enumerate(self._layer_specs)
                      if isinstance(s, TiedLayerSpec) and s.key == key and s.forward_fn is None]
            yield key, module, list(self.tied_weight_attrs[key]), owners

    def sync_tied_weights(self) -> None:
        """Copy tied weights from their owning stage to every stage that re-uses them."""
        self._synchronize_tied_weights()


def is_replicated(p: torch.Tensor) -> bool:
    """A tied copy on a stage that re-uses it (DeepSpeed marks those ``ds_pipe_replicated``)."""
    return bool(getattr(p, "ds_pipe_replicated", False))


def count_in_clip_norm(module: nn.Module) -> None:
    """DeepSpeed's fp32 gradient clipping (runtime.utils.clip_grad_norm_) sums norms over the
    pipeline group but counts only stage 0's parameters unless a parameter is flagged
    model-parallel, so later stages were ignored. Flag every parameter this stage owns; tied
    copies on non-owner stages stay unflagged so they count once. Call again after adding
    parameters (LoRA). Proven by the clip scenarios of tests/test_pipeline_grad.py."""
    for p in module.parameters():
        p.model_parallel = not is_replicated(p)


def measure_grad_norm_before_step(engine) -> None:
    """DeepSpeed reports no gradient norm on its plain fp32 path; measure it just before the
    optimizer step (wrapping the engine's step function on this instance)."""
    take_step = engine._take_model_step

    def with_norm(*args, **kwargs):
        plain_fp32 = not (engine.bfloat16_enabled() or engine.fp16_enabled() or engine.zero_optimization())
        if plain_fp32:
            engine.ppllm_grad_norm = pipeline_grad_norm(engine.module.parameters(),
                                                        engine.grid.get_pipe_parallel_group())
        return take_step(*args, **kwargs)

    engine.ppllm_grad_norm = None
    engine._take_model_step = with_norm


def pipeline_grad_norm(params, group) -> float:
    """L2 norm of the gradients of every stage: this stage's parameters (tied copies counted once,
    on their owner) reduced over the pipeline group.

    One norm kernel over the stage's gradients where they are (torch's foreach norm, fp32
    accumulation), one reduction of its square across the pipe group, one host read per step; no
    fp64 copy of any gradient."""
    from ppllm import collectives
    grads = [p.grad.detach() for p in params if p.grad is not None and not is_replicated(p)]
    if grads:
        sq = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True).double().square().reshape(1)
    else:
        sq = torch.zeros(1, dtype=torch.float64)
    collectives.all_reduce_(sq, group=group)
    return float(sq.sqrt())


def measured_grad_norm(engine) -> float | None:
    return getattr(engine, "ppllm_grad_norm", None)


def grad_accumulation_dtype(engine) -> torch.dtype | None:
    """The dtype DeepSpeed sums micro-batch gradients in: its bf16 optimizer's flat gradient buffers
    (None when another optimizer wrapper is in use: plain fp32 sums in the parameters' .grad)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    opt = engine.optimizer
    if isinstance(opt, BF16_Optimizer):
        return opt.fp32_groups_gradients_flat[0].dtype if opt.fp32_groups_gradients_flat else opt.grad_acc_dtype
    return None


def gradient_reduce_dtype(engine) -> torch.dtype:
    """The dtype of DeepSpeed's data-parallel gradient all-reduce (its ``communication_data_type``:
    the weights' dtype unless the config sets it; the pipeline's bf16 path casts its fp32 sums to it)."""
    return engine.communication_data_type


def master_weights_dtype(engine) -> torch.dtype | None:
    """The dtype of the weights the optimizer updates (the bf16 optimizer's flat master copy)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    opt = engine.optimizer
    if isinstance(opt, BF16_Optimizer):
        return opt.fp32_groups_flat_partition[0].dtype
    return None


def fused_adam_buildable() -> bool:
    """Can DeepSpeed's FusedAdam run here: prebuilt into the installed wheel, or JIT-buildable
    (a CUDA compiler on the machine and a compatible torch)? Otherwise torch's fused AdamW is used."""
    import shutil
    from deepspeed.git_version_info import installed_ops
    if installed_ops.get("fused_adam"):
        return True
    from deepspeed.ops.op_builder import FusedAdamBuilder
    try:
        compatible = FusedAdamBuilder().is_compatible(verbose=False)
    except Exception:  # noqa: BLE001 - a builder probe that crashes means "not buildable"
        return False
    import os
    nvcc = shutil.which("nvcc") or (os.environ.get("CUDA_HOME") and os.path.exists(
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")))
    return bool(compatible and nvcc)


# --- DeepSpeed's bf16 optimizer (ZeRO-1) state, by parameter name ---------------------------------

BF16_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def bf16_optimizer_file(tag_dir: str, stage: int, dp_rank: int) -> str:
    import os
    return os.path.join(tag_dir, f"bf16_zero_pp_rank_{dp_rank}_mp_rank_{stage:02d}_optim_states.pt")


def read_bf16_state(tag_dir: str, stage: int, data: int, rename) -> tuple[dict, dict]:
    """One stage's fp32 master weights and Adam moments, whole again: ``{name: {"fp32", "exp_avg",
    "exp_avg_sq"}}`` (flat tensors) gathered from the ``data`` ranks' partitions of DeepSpeed's bf16
    optimizer files, plus ``{"step", "lr"}``. ``rename`` maps DeepSpeed's parameter names to ppllm's.

    Each rank's file holds a contiguous slice of every group's flat buffer and, per parameter, where
    its part of that slice is (``param_slice_mappings``); a parameter is its parts in rank order."""
    parts: dict[str, dict[str, list]] = {}
    meta = {}
    for d in range(data):
        sd = safe_load_or_refuse(bf16_optimizer_file(tag_dir, stage, d))["optimizer_state_dict"]
        base = sd["base_optimizer_state"]
        for g, mapping in enumerate(sd["param_slice_mappings"]):
            flat = {"fp32": sd["single_partition_of_fp32_groups"][g]}
            flat.update({k: base["state"][g][k] for k in BF16_STATE_KEYS if g in base["state"]})
            for ds_name, addr in mapping.items():
                slot = parts.setdefault(rename(ds_name), {})
                for key, buf in flat.items():
                    slot.setdefault(key, []).append(buf.narrow(0, addr.start, addr.numel))
            if not meta and g in base["state"]:
                meta = {"step": base["state"][g]["step"], "lr": base["param_groups"][g]["lr"]}
    whole = {name: {k: torch.cat(v) for k, v in slot.items()} for name, slot in parts.items()}
    return whole, meta


def load_bf16_state(engine, by_name: dict, meta: dict, names: dict) -> None:
    """Hand this rank's partition of DeepSpeed's bf16 optimizer the master weights and moments of its
    parameters, from :func:`read_bf16_state` (``names``: id(parameter) -> ppllm name); the low-precision
    weights are then refreshed from the master copy."""
    import deepspeed
    opt = engine.optimizer
    base_sd = opt.optimizer.state_dict()
    partitions, states = [], {}
    for g, lps in enumerate(opt.bf16_groups):
        part = torch.zeros_like(opt.fp32_groups_flat_partition[g], device="cpu")
        moments = {k: torch.zeros_like(part) for k in BF16_STATE_KEYS}
        for lp in lps:
            if lp._hp_mapping is None:
                continue
            hp, lp_at = lp._hp_mapping.get_hp_fragment_address(), lp._hp_mapping.lp_fragment_address
            saved = by_name[names[id(lp)]]
            if saved["fp32"].numel() != lp.numel():
                raise ValueError(f"{names[id(lp)]}: {saved['fp32'].numel()} values saved, {lp.numel()} now")
            for buf, key in [(part, "fp32")] + [(moments[k], k) for k in BF16_STATE_KEYS]:
                buf.narrow(0, hp.start, hp.numel).copy_(saved[key].narrow(0, lp_at.start, lp_at.numel))
        partitions.append(part)
        states[g] = {"step": meta["step"].clone(), **moments}
    for group in base_sd["param_groups"]:
        group["lr"] = meta["lr"]
    base_sd["state"] = states
    dp_rank = torch.distributed.get_rank(group=engine.grid.get_data_parallel_group())
    mine = {"base_optimizer_state": base_sd, "single_partition_of_fp32_groups": partitions,
            "ds_version": deepspeed.__version__, "clip_grad": opt.clip_grad}
    opt.load_state_dict([mine if r == dp_rank else None for r in range(dp_rank + 1)], load_from_fp32_weights=True)
    opt.update_lp_params()


def ds_param_name_to_layer_name(ds_name: str, tied_owner: dict[str, int]) -> str:
    """DeepSpeed's name of a pipeline parameter (``"3.mlp.up.weight"``, ``"tied_modules.embed.weight"``)
    as ppllm's ``"<layer index>.<name>"`` (a tied copy named after the layer that owns it)."""
    if ds_name.startswith("tied_modules."):
        key, _, attr = ds_name[len("tied_modules."):].partition(".")
        return f"{tied_owner[key]}.{attr}"
    return ds_name


def client_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed steps (plain fp32, no ZeRO: the one built from our groups)."""
    return engine.optimizer


def restore_counters(engine, state: dict) -> None:
    """The step counters DeepSpeed keeps in its per-stage checkpoint file, for a resume that reads
    that file itself (ppllm.reshard) instead of through engine.load_checkpoint."""
    engine.global_steps = state["global_steps"]
    engine.global_samples = state.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = state.get("skipped_steps", 0)


def release_shm_buffer() -> None:
    """DeepSpeed's CPU communication op maps a ~70 MB /dev/shm buffer per rank and never unlinks it, so
    every CPU run left its buffers behind until reboot (hundreds of MB per launch). Each rank removes its
    own at exit; the others have theirs mapped already (they open every peer's buffer at start-up)."""
    import os
    addr, port, rank = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), os.environ.get("RANK")
    if not (addr and port and rank is not None):
        return
    try:
        os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")
    except OSError:
        pass  # no buffer (GPU run, one process) or already gone


# --- loading DeepSpeed's checkpoint files without running code (issue 22) -------------------------
# DeepSpeed loads its own files (mp_rank_XX_model_states.pt, *optim_states.pt, the bf16/ZeRO-1
# partitions) with torch.load(weights_only=False): a crafted pickle in one of them runs at resume.
# Every read of those files goes through safe_load: torch's restricted unpickler (weights_only=True)
# with the few DeepSpeed classes its states hold as the only non-torch globals.

class UnsafeCheckpoint(Exception):
    """A checkpoint file that does not pass the restricted unpickler (or cannot be read at all)."""


def ds_safe_globals() -> list:
    """The non-torch globals DeepSpeed's model, optimizer and ZeRO/bf16 states legitimately hold:
    plain data classes, constructed without running code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]


def safe_load(path: str, map_location="cpu", mmap: bool = False):
    """torch.load with weights_only=True and DeepSpeed's safe globals; UnsafeCheckpoint (one line,
    naming what the file wanted to run, or why it is unreadable) on any failure."""
    try:
        with torch.serialization.safe_globals(ds_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a crafted or damaged file
        text = " ".join(str(e).split())
        if "Weights only load failed" in text:
            import re
            what = re.search(r"GLOBAL ([\w.]+)", text)
            raise UnsafeCheckpoint(f"it holds a pickled reference to {what.group(1) if what else 'a global'} "
                                   f"that only code execution could rebuild") from None
        raise UnsafeCheckpoint(f"not a readable checkpoint file (truncated or corrupt: {text[:160]})") from None


class _SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with ``load`` through :func:`safe_load`; everything else unchanged."""

    def __init__(self, inner):
        self._inner = inner

    def load(self, path, map_location=None):
        return safe_load_or_refuse(path, map_location=map_location)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def safe_load_or_refuse(path: str, map_location="cpu"):
    """:func:`safe_load`, a failure as ppllm's one-line UserError naming the file."""
    try:
        return safe_load(path, map_location=map_location)
    except UnsafeCheckpoint as e:
        from ppllm.errors import UserError
        raise UserError(f"{path}: refused: {e}; restore it, or resume from another checkpoint") from None


def load_safely(engine) -> None:
    """Make every checkpoint file this engine reads go through the restricted unpickler."""
    if not isinstance(engine.checkpoint_engine, _SafeCheckpointEngine):
        engine.checkpoint_engine = _SafeCheckpointEngine(engine.checkpoint_engine)


# --- ZB-H1: the backward split into B (input gradient) and W (weight gradient) (issue 23) ---------
# DeepSpeed's TrainSchedule runs each micro-batch's whole backward in one BackwardPass. Under ZB-H1
# the linear layers' weight gradients are deferred: their backward returns the input's gradient only
# and queues (input, output gradient) per micro-batch; a WeightPass instruction later turns a
# micro-batch's queue into weight (and bias) gradients. The F/B order and every send/receive stay
# DeepSpeed's own 1F1B order (so the blocking point-to-point pairs match as before, and each stage
# keeps at most p - s micro-batches' activations); the W's go where ppllm.schedule_sim's greedy
# ZB-H1 timeline (equal F, B, W costs, at most p deferred W's per stage) puts them: one after each B
# in the steady state, into the gaps where a stage waits, and after its last B. Everything else
# (embeddings, norms, the chunked loss with its head, LoRA's frozen base) gets its gradient in B.
# ReduceTiedGrads, ReduceGrads and OptimizerStep follow the last W.

from deepspeed.runtime.pipe import schedule as _ds_schedule  # noqa: E402

ds_schedule = _ds_schedule  # DeepSpeed's pipeline instruction classes (ppllm.schedule_sim times their streams)


class BackwardInput(_ds_schedule.BackwardPass):
    """B of micro-batch ``micro_batch``: its backward with the linear weights' gradients queued."""

    def __init__(self, buffer_id, micro_batch, **kwargs):
        super().__init__(buffer_id, micro_batch=micro_batch, **kwargs)


class WeightPass(_ds_schedule.PipeInstruction):
    """W of micro-batch ``micro_batch``: the weight gradients its B queued."""

    def __init__(self, micro_batch, **kwargs):
        super().__init__(micro_batch=micro_batch, **kwargs)


def zb_h1_timeline(stages: int, micro_batches: int) -> list:
    """The ZB-H1 timeline of :func:`ppllm.schedule_sim.simulate` this schedule follows: equal F, B, W
    costs, at most ``stages`` deferred W's per stage (the same step time as unbounded deferral with
    equal costs, and memory for deferred W's that does not grow with m)."""
    from ppllm.schedule_sim import simulate
    return simulate("zb-h1", stages, micro_batches, 1.0, 1.0, 1.0, w_cap=stages)


def zb_h1_w_slots(stages: int, micro_batches: int, stage_id: int) -> list[int]:
    """For each W of this stage (micro-batch order), how many of the stage's F/B operations precede it
    in :func:`zb_h1_timeline`."""
    timeline = zb_h1_timeline(stages, micro_batches).timeline[stage_id]
    slots, fb = [], 0
    for op, _, _, _ in timeline:
        if op == "W":
            slots.append(fb)
        else:
            fb += 1
    return slots


class ZBH1Schedule(_ds_schedule.TrainSchedule):
    """DeepSpeed's 1F1B steps with each BackwardPass as a :class:`BackwardInput` and the deferred
    :class:`WeightPass` instructions inserted into the steps (W needs no communication, so the
    send/receive pairing of 1F1B is untouched).

    DeepSpeed's transfers block until the peer takes them (gloo's sends wait for the receive), so where
    a W goes inside a step matters. On stage 0 a due W goes before the step's first receive (it fills
    the wait for the gradient); on every later stage right before the step's compute, after its
    transfers, so that it delays neither the gradient it sends upstream nor the receive of the
    activation the stage before is blocked sending. tests/test_zb_schedule.py times both streams
    with blocking and with buffered transfers: this placement is never slower than 1F1B in either."""

    def steps(self):
        slots = zb_h1_w_slots(self.stages, self.micro_batches, self.stage_id)
        compute = (_ds_schedule.ForwardPass, _ds_schedule.BackwardPass, _ds_schedule.ReduceTiedGrads,
                   _ds_schedule.ReduceGrads, _ds_schedule.OptimizerStep)
        waits = compute if self.stage_id > 0 else compute + (
            _ds_schedule.RecvActivation, _ds_schedule.RecvGrad, _ds_schedule.LoadMicroBatch)
        fb_done, next_b, next_w = 0, 0, 0
        for cmds in super().steps():
            out = []
            for cmd in cmds:
                if isinstance(cmd, waits):
                    while next_w < len(slots) and slots[next_w] <= fb_done:
                        out.append(WeightPass(next_w))
                        next_w += 1
                if type(cmd) is _ds_schedule.BackwardPass:
                    cmd = BackwardInput(cmd.buffer_id, next_b)
                    next_b += 1
                if isinstance(cmd, (_ds_schedule.ForwardPass, _ds_schedule.BackwardPass)):
                    fb_done += 1
                out.append(cmd)
            yield out
        if next_w != len(slots) or next_b != self.micro_batches:
            raise RuntimeError(f"ZB-H1 stage {self.stage_id}: {next_b} B and {next_w} W of {self.micro_batches}")


class _WeightGradQueue:
    """Where the deferred linear backward puts (weight, bias, input, output gradient) while a B runs."""
    collecting: list | None = None


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def _master_grad_adder(opt):
    """Under DeepSpeed's bf16 optimizer a W adds its (bf16) weight gradient straight into the parameter's
    fp32 gradient buffer, as the optimizer itself does after each 1F1B backward with the bf16 .grad
    (which it zeroes before the next backward, so a W cannot leave its gradient there)."""
    index = {id(lp): (i, j) for i, group in enumerate(opt.bf16_groups) for j, lp in enumerate(group)}

    def add(param: torch.Tensor, grad: torch.Tensor) -> None:
        i, j = index[id(param)]
        hp = opt.fp32_groups_gradients[i][j]
        hp.add_(grad.to(hp.dtype).view(hp.shape))
        param._hp_grad = hp
        opt.fp32_groups_has_gradients[i][j] = True
    return add


@torch.no_grad()
def _weight_grads(weight, bias, x, g, add=_accumulate) -> None:
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    if weight is not None and weight.requires_grad:
        add(weight, (g2.t() @ x2).to(weight.dtype))
    if bias is not None and bias.requires_grad:
        add(bias, g2.sum(0).to(bias.dtype))


class _DeferredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        # the parameters themselves on ctx, not through save_for_backward: activation checkpointing
        # hands saved tensors back as detached copies, and W must add to the parameter's own .grad
        ctx.save_for_backward(x)
        ctx.weight, ctx.bias = weight, bias
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        (x,), weight = ctx.saved_tensors, ctx.weight
        grad_x = g @ weight if ctx.needs_input_grad[0] else None
        if _WeightGradQueue.collecting is not None:
            _WeightGradQueue.collecting.append((weight, ctx.bias, x, g))
        else:  # a backward outside a B (none in ppllm's own paths): the weight gradient at once
            _weight_grads(weight, ctx.bias, x, g)
        return grad_x, None, None


def _deferred_linear_forward(self, x):
    if torch.is_grad_enabled() and self.weight.requires_grad:
        return _DeferredLinear.apply(x, self.weight, self.bias)
    return torch.nn.functional.linear(x, self.weight, self.bias)


def zb_h1_stats(engine) -> dict | None:
    """{linears, w_passes, deferred, peak_pending_w, peak_pending_mb (storage the queued inputs and output
    gradients hold)} of an engine under ZB-H1, None under 1F1B."""
    stats = getattr(engine, "ppllm_zb_stats", None)
    return dict(stats) if stats is not None else None


def use_zb_h1(engine) -> int:
    """Run this engine's training steps under ZB-H1: on the plain fp32 path, or under DeepSpeed's bf16
    optimizer (bf16 weights, fp32 gradient sums; ZeRO stage 1 or none), where the W's add to its fp32
    gradient buffers. fp16 (loss scaling) and ZeRO's own optimizer are refused, as ppllm.config does
    beside ``schedule: zb-h1``. Every plain ``nn.Linear`` of the stage whose weight trains (under LoRA:
    the adapters; LoRALinear's frozen base is left alone) defers its weight gradient. Returns the number
    of such linear layers."""
    import types

    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.pipe.engine import PipelineEngine
    bf16_opt = isinstance(engine.optimizer, BF16_Optimizer)
    if engine.fp16_enabled() or (engine.zero_optimization() or engine.bfloat16_enabled()) and not bf16_opt:
        raise ValueError("schedule zb-h1 runs on the plain fp32 path or DeepSpeed's bf16 optimizer only "
                         "(no fp16, no ZeRO optimizer)")
    add = _master_grad_adder(engine.optimizer) if bf16_opt else _accumulate
    n = 0
    for m in engine.module.modules():
        if type(m) is torch.nn.Linear and m.weight.requires_grad:  # under LoRA: the adapters
            m.forward = types.MethodType(_deferred_linear_forward, m)
            n += 1
    queues: dict[int, list] = {}

    def _exec_backward_input(self, buffer_id, micro_batch):
        if micro_batch in queues:
            raise RuntimeError(f"ZB-H1: micro-batch {micro_batch} has a pending W already")
        queue = []
        _WeightGradQueue.collecting = queue
        try:
            PipelineEngine._exec_backward_pass(self, buffer_id)
        finally:
            _WeightGradQueue.collecting = None
        # The output gradient DeepSpeed received from the next stage lives in a buffer the next RecvGrad
        # overwrites (self.grad_layer); a linear whose output is the stage's output (or a residual
        # sum's branch) gets that very tensor as its gradient. Keep a copy of it for the W.
        received = self.grad_layer if isinstance(self.grad_layer, (list, tuple)) else [self.grad_layer]
        reused = {t.untyped_storage().data_ptr() for t in received if torch.is_tensor(t)}
        queues[micro_batch] = [(w, b, x, g.clone() if g.untyped_storage().data_ptr() in reused else g)
                               for w, b, x, g in queue]
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for q in queues.values() for _, _, x, g in q for t in (x, g)}
        stats["peak_pending_w"] = max(stats["peak_pending_w"], len(queues))
        stats["peak_pending_mb"] = max(stats["peak_pending_mb"], sum(held.values()) / 2 ** 20)

    def _exec_weight_pass(self, micro_batch):
        queue = queues.pop(micro_batch)
        for weight, bias, x, g in queue:
            _weight_grads(weight, bias, x, g, add)
        stats["w_passes"] += 1
        stats["deferred"] += len(queue)

    def train_schedule():
        if queues:
            raise RuntimeError(f"ZB-H1: W of micro-batches {sorted(queues)} never ran")
        return ZBH1Schedule(micro_batches=engine.micro_batches, stages=engine.num_stages, stage_id=engine.stage_id)

    engine._INSTRUCTION_MAP = {**type(engine)._INSTRUCTION_MAP, BackwardInput: _exec_backward_input,
                               WeightPass: _exec_weight_pass}
    engine._train_schedule = train_schedule
    stats = {"linears": n, "w_passes": 0, "deferred": 0, "peak_pending_w": 0, "peak_pending_mb": 0.0}
    engine.ppllm_zb_stats = stats  # what the W's did since the engine was built (tests, benchmarks)
    return n
