"""Memory planner: per-stage parameters, gradients, optimizer states and activations.

Activations follow what the decoder layers in ``models/`` save for backward
(counted with ``torch.autograd.graph.saved_tensors_hooks`` in
tests/test_planner.py), per micro-batch of B x S tokens, in bytes:

    decoder layer  b * (9*B*S*H + 2*B*S*K*D + 4*B*S*I + 4*B*S*D) + 4*B*N*S + mask
    mask           4 * B * S * S   (attention: dense, SDPA with a document mask; none with blockwise or
                   flash-attn, whose only per-row state is the logsumexp 4*B*N*S; blockwise adds, once per
                   stage, its transient block of scores: models.attention.block_scores_bytes)
    head + loss    chunked (models.common.TokenLoss), one chunk of fp32 logits at a time:
                   with a few token chunks per micro-batch (early_gradients) both gradients are taken
                   in forward: b*B*S*H, + 4*V*H for the head gradient's fp32 sum (bf16), + a chunk;
                   else backward recomputes by vocabulary chunks: b*B*S*H + 4*B*S*H + a chunk
                   (the head's own gradient, b*V*H, is counted with the gradients)
                   (unchunked it was B*S*V*(b + 8): logits, their fp32 copy and its gradient)
    with use_grad_ckpt a layer keeps only its input, b * B*S*H, plus one layer's
    full activations while it is recomputed.

Under 1F1B, stage s holds the activations of min(P - s, M) micro-batches.
"""
from __future__ import annotations

from dataclasses import dataclass

from models.common import ModelArgs
from ppllm.partition import balanced_bounds, bounds_from_parts, layer_costs, parts_from_bounds

GB = 1 << 30

#: bytes of optimizer state per trainable parameter (beyond the weights themselves)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "lion": 4, "sgd": 0, "adagrad": 4}


@dataclass
class Setup:
    pipe: int
    data: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    precision: str  # bf16 | fp16 | fp32
    zero_stage: int = 0
    grad_accum_dtype: str = ""  # the dtype micro-batch gradients are summed in ("" = the weights')
    offload_optimizer: bool = False
    grad_ckpt: bool = False
    optimizer: str = "adamw"
    flash: bool = False
    attention: str = "blockwise"  # the torch backend where flash-attn is not used: blockwise | dense
    loss_chunk_bytes: int = 32 << 20
    trainable_fraction: float = 1.0  # < 1 with LoRA


@dataclass
class StageMemory:
    stage: int
    layers: tuple[int, int]
    params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    act_bytes_per_micro_batch: int
    micro_batches_in_flight: int

    @property
    def activation_bytes(self) -> int:
        return self.act_bytes_per_micro_batch * self.micro_batches_in_flight

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


def _dtype_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def layer_activation_bytes(margs: ModelArgs, kind: str, s: Setup) -> int:
    """Bytes one pipeline layer keeps for backward for one micro-batch."""
    b = _dtype_bytes(s.precision)
    B, S = s.micro_batch, s.seq_len
    H = margs.hidden_size
    if kind == "decoder":
        N = margs.num_heads
        K, D, inter = margs.num_kv_heads, margs.head_dim, margs.intermediate_size
        mask = 0 if s.flash or s.attention != "dense" else 4 * B * S * S
        if mask and margs.model_type == "bloom":  # dense ALiBi: fp32 probabilities per head kept, + the bool mask
            mask = 4 * B * N * S * S + B * S * S
        full = b * (9 * B * S * H + 2 * B * S * K * D + 4 * B * S * inter + 4 * B * S * D) + 4 * B * N * S + mask
        return b * B * S * H if s.grad_ckpt else full
    if kind == "head":
        return head_loss_bytes(margs, s)
    if kind == "embed":
        return 8 * B * S  # token ids
    return b * B * S * H  # final norm input


def head_loss_bytes(margs: ModelArgs, s: Setup, chunked: bool = True) -> int:
    """Peak bytes of the head + loss for one micro-batch (models.common.TokenLoss over a HeadOutput;
    what it keeps is measured against this in tests/test_planner.py, its peak in
    bench/pipeline_efficiency.py --loss-memory)."""
    import torch

    from models.common import early_gradients, loss_chunk_tokens
    b = _dtype_bytes(s.precision)
    N, H, V = s.micro_batch * s.seq_len, margs.hidden_size, margs.vocab_size
    if not chunked:
        return N * V * (b + 8)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[s.precision]
    # the head matrix's gradient (b*V*H) is not counted here: it is the parameter's gradient, which
    # the unchunked loss makes too and estimate() counts with the gradients
    if early_gradients(N, H, V, dtype, s.loss_chunk_bytes):  # token chunks, both gradients taken in forward
        c = min(N, loss_chunk_tokens(V, s.loss_chunk_bytes))
        fp32_sum = 4 * V * H if b != 4 else 0  # the head gradient's fp32 sum (bf16)
        return b * N * H + fp32_sum + c * V * (4 + b)
    # recomputed in backward by vocabulary chunks: h's gradient and its fp32 sum, one chunk
    vc = min(V, max(16, s.loss_chunk_bytes // (4 * N)))
    return b * N * H + 4 * N * H + N * vc * (4 + b)


def estimate(family, margs, bounds: list[int], s: Setup) -> list[StageMemory]:
    counts = family.layer_param_counts(margs)
    kinds = family.layer_kinds(margs)
    b = _dtype_bytes(s.precision)
    mixed = s.precision != "fp32"
    out = []
    for stage in range(s.pipe):
        lo, hi = bounds[stage], bounds[stage + 1]
        params = sum(counts[lo:hi])
        if family.is_tied(margs) and stage == s.pipe - 1 and lo > 0:
            params += counts[0]  # the last stage holds its own copy of the tied embedding
        trainable = int(params * s.trainable_fraction)
        # mixed precision keeps fp32 master weights (and, in DeepSpeed's bf16 optimizer, fp32 grads)
        opt_per = OPTIMIZER_STATE_BYTES.get(s.optimizer.lower(), 8) + (4 if mixed else 0)
        optim = trainable * opt_per
        if s.zero_stage >= 1:
            optim //= s.data
        if s.offload_optimizer:
            optim = 0
        # the parameters' own gradients, plus the mixed-precision optimizer's accumulation buffer
        accum = s.grad_accum_dtype or s.precision
        grads = trainable * (b + (_dtype_bytes(accum) if mixed else 0))
        act = sum(layer_activation_bytes(margs, kinds[i], s) for i in range(lo, hi))
        if s.grad_ckpt and any(kinds[i] == "decoder" for i in range(lo, hi)):
            full = Setup(**{**s.__dict__, "grad_ckpt": False})
            act += layer_activation_bytes(margs, "decoder", full)  # one layer recomputed at a time
        if not s.flash and s.attention == "blockwise" and any(kinds[i] == "decoder" for i in range(lo, hi)):
            from models.attention import block_scores_bytes
            act += block_scores_bytes(s.micro_batch, margs.num_heads, s.seq_len)  # one block pair at a time
        inflight = min(s.pipe - stage, s.grad_accum)
        out.append(StageMemory(stage, (lo, hi - 1), params, params * b, grads, optim, act, inflight))
    return out


def layer_weights(family, margs, s: Setup) -> list[float]:
    """Per-layer cost mixing compute (parameter count as matmul work) and memory (bytes)."""
    compute = layer_costs(family, margs, s.seq_len, s.flash or s.attention == "blockwise")
    kinds = family.layer_kinds(margs)
    counts = family.layer_param_counts(margs)
    per_param = _dtype_bytes(s.precision) * 2 + OPTIMIZER_STATE_BYTES.get(s.optimizer.lower(), 8)
    memory = [counts[i] * per_param + layer_activation_bytes(margs, kinds[i], s) * max(1, s.pipe // 2)
              for i in range(len(kinds))]
    c_tot, m_tot = sum(compute) or 1.0, sum(memory) or 1.0
    return [0.5 * c / c_tot + 0.5 * m / m_tot for c, m in zip(compute, memory)]


def propose_bounds(family, margs, s: Setup) -> list[int]:
    return balanced_bounds(layer_weights(family, margs, s), s.pipe)


def _attention_text(s: Setup) -> str:
    if s.flash:
        return "flash-attn 2 where installed on CUDA in bf16/fp16 (else %s, counted: none)" % s.attention
    if s.attention == "dense":
        return "dense (SDPA with a document mask: 4*B*S*S bytes per decoder layer, counted)"
    from models.attention import block_scores_bytes
    return f"blockwise (linear in S: logsumexp 4*B*N*S per decoder layer, one block of scores per stage, {block_scores_bytes(s.micro_batch, 1, s.seq_len) >> 10} KiB per head)"


def format_plan(stages: list[StageMemory], s: Setup) -> str:
    unit, div = ("GiB", GB) if max(st.total_bytes for st in stages) >= GB else ("MiB", 1 << 20)

    def gb(x: int) -> str:
        return f"{x / div:8.2f}"
    lines = [f"memory plan: pipe={s.pipe} data={s.data} micro_batch={s.micro_batch} seq={s.seq_len} "
             f"grad_accum={s.grad_accum} precision={s.precision}"
             f"{f' accumulate={s.grad_accum_dtype}' if s.grad_accum_dtype and s.precision != 'fp32' else ''}"
             f" zero={s.zero_stage}"
             f"{' offload' if s.offload_optimizer else ''} grad_ckpt={s.grad_ckpt} optimizer={s.optimizer}"
             f"{' lora' if s.trainable_fraction < 1 else ''}",
             f"attention: {_attention_text(s)}; loss chunks of {s.loss_chunk_bytes >> 20} MiB of fp32 logits",
             f"stage  layers      params(M)  weights   grads  optim  act/mb  in-flight  act  total ({unit})"]
    for st in stages:
        lines.append(f"{st.stage:5d}  {st.layers[0]:3d}..{st.layers[1]:<4d} {st.params / 1e6:10.2f} {gb(st.param_bytes)}"
                     f"{gb(st.grad_bytes)}{gb(st.optimizer_bytes)}{gb(st.act_bytes_per_micro_batch)}"
                     f"{st.micro_batches_in_flight:9d} {gb(st.activation_bytes)}{gb(st.total_bytes)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# a run's plan: the config's partition, --plan and the dry run's layer list


def setup_from_config(cfg, family=None, margs=None) -> Setup:
    from ppllm.engine import precision_route
    route = precision_route(cfg)
    zero = cfg.ds.get("zero_optimization") or {}
    opt = (cfg.ds.get("optimizer") or {}).get("type", "adamw")
    fraction = 1.0
    if cfg.run.lora is not None and family is not None:
        from ppllm.lora import trainable_fraction
        fraction = trainable_fraction(family, margs, cfg.run.lora)
    return Setup(pipe=cfg.pipe, data=cfg.data, micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum,
                 seq_len=cfg.run.max_seq_len, precision=route.precision, zero_stage=route.zero_stage,
                 grad_accum_dtype=route.grad_accum_dtype or route.precision,
                 offload_optimizer=(zero.get("offload_optimizer") or {}).get("device") == "cpu",
                 grad_ckpt=cfg.run.use_grad_ckpt, optimizer=opt, flash=cfg.run.use_flash_attn,
                 attention=cfg.run.attention, loss_chunk_bytes=loss_chunk_bytes(cfg),
                 trainable_fraction=fraction)


def loss_chunk_bytes(cfg) -> int:
    """The chunked loss's logits bytes of this run: ``loss_chunk_mb``, else the accelerator's default."""
    from models.common import default_loss_chunk_bytes
    from ppllm.engine import accelerator
    return default_loss_chunk_bytes(accelerator(), cfg.run.loss_chunk_mb)


def resolve_partition(cfg):
    """(family, model args, stage bounds) of a run: explicit parts as given, ``auto`` balanced."""
    from models import load_family
    family, margs = load_family(cfg.run.model_path)
    parts = cfg.run.model_topo.parts
    if parts in (None, "auto"):
        return family, margs, propose_bounds(family, margs, setup_from_config(cfg, family, margs))
    return family, margs, bounds_from_parts(parts)


def memory_plan(cfg) -> str:
    """--plan: per-stage memory for the configured partition, and the partition we propose."""
    family, margs, bounds = resolve_partition(cfg)
    setup = setup_from_config(cfg, family, margs)
    proposal = propose_bounds(family, margs, setup)
    lines = [format_plan(estimate(family, margs, bounds, setup), setup),
             f"configured parts: {parts_from_bounds(bounds)}",
             f"proposed parts (balances compute and memory): {parts_from_bounds(proposal)}"]
    if proposal != bounds:
        lines.append(format_plan(estimate(family, margs, proposal, setup), setup))
    return "\n".join(lines)


def _runs(names: list[str], lo: int, hi: int) -> str:
    """'0:Embed, 1..4: 4 x LlamaDecoderLayer, 5:FinalNorm': consecutive equal layers folded."""
    out, i = [], lo
    while i < hi:
        j = i
        while j + 1 < hi and names[j + 1] == names[i]:
            j += 1
        out.append(f"{i}:{names[i]}" if j - i < 2 else f"{i}..{j}: {j - i + 1} x {names[i]}")
        if 0 < j - i < 2:
            out.extend(f"{k}:{names[k]}" for k in range(i + 1, j + 1))
        i = j + 1
    return ", ".join(out)


def format_layout(cfg, family, margs, bounds: list[int]) -> str:
    names = family.layer_names(margs)
    counts = family.layer_param_counts(margs)
    lines = [f"model: {family.name} ({margs.model_type}), {len(names)} pipeline layers, "
             f"{sum(counts) / 1e6:.2f}M parameters",
             f"topology: pipe={cfg.pipe} x data={cfg.data} = {cfg.world_size} processes; "
             f"micro batch {cfg.micro_batch} x grad accum {cfg.grad_accum} x data {cfg.data} = "
             f"{cfg.micro_batch * cfg.grad_accum * cfg.data} rows of {cfg.run.max_seq_len} tokens per step",
             f"attention: {_attention_text(setup_from_config(cfg, family, margs))}"]
    for s in range(cfg.pipe):
        lo, hi = bounds[s], bounds[s + 1]
        lines.append(f"  stage {s}: layers {lo}..{hi - 1} ({hi - lo}), "
                     f"{sum(counts[lo:hi]) / 1e6:.2f}M params  [{_runs(names, lo, hi)}]")
    return "\n".join(lines)
