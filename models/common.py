"""Building blocks shared by every model family.

Legend for tensor names used in this file:
  B batch, S sequence, H hidden, N query heads, K kv heads, D head dim.

Stage contract (checked by :func:`check_stage_tuple`): every pipeline layer
except the head takes and returns ``(x, position_ids, doc_ids)`` where
``x`` is either the int64 token ids (first layer) or the float hidden state
``[B, S, H]``, and ``position_ids``/``doc_ids`` are int64 ``[B, S]``.
``doc_ids`` numbers the packed documents of a row; attention never crosses a
change of ``doc_id``.  Only one float tensor ever crosses a stage boundary,
which is what DeepSpeed's pipeline engine expects. The head (always on the last stage) returns
a :class:`HeadOutput` for the loss instead of logits.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

StageTuple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(kw_only=True)
class ModelArgs:
    """What every family's parsed config holds; the planner, metrics and the shared stage
    modules below read only these. Families subclass it with their own switches."""
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    initializer_range: float = 0.02


def check_stage_tuple(inputs: StageTuple, where: str) -> StageTuple:
    if not isinstance(inputs, tuple) or len(inputs) != 3:
        raise TypeError(f"{where}: expected (x, position_ids, doc_ids), got {type(inputs).__name__}")
    _, pos, doc = inputs
    if pos.dtype != torch.long or doc.dtype != torch.long:
        raise TypeError(f"{where}: position_ids/doc_ids must be int64, got {pos.dtype}/{doc.dtype}")
    return inputs


# ---------------------------------------------------------------------------
# Norms


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32.

    ``weight_in_fp32`` picks where the weight multiply happens: llama casts the
    normalised activations back first (``w * x.to(dtype)``), chatglm multiplies
    in fp32 and casts afterwards.  Both agree exactly in fp32.
    """

    def __init__(self, hidden: int, eps: float, weight_in_fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps
        self.weight_in_fp32 = weight_in_fp32

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        dtype = x_BSH.dtype
        x = x_BSH.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_fp32:
            return (self.weight.float() * x).to(dtype)
        return self.weight * x.to(dtype)


# ---------------------------------------------------------------------------
# Stage modules shared by the families (first and last pipeline layers, the gated MLP)


class Embed(nn.Module):
    """Token embedding [V, H]; the first pipeline layer: ids -> hidden state."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(a.vocab_size, a.hidden_size))
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=a.initializer_range)

    def forward(self, inputs):
        ids, pos, doc = check_stage_tuple(inputs, "embed")
        return F.embedding(ids, self.weight), pos, doc


def _through_graph(weight: torch.Tensor) -> torch.Tensor:
    """The head's matrix as a stage output: a view (no copy), not the parameter itself. DeepSpeed hooks
    every output tensor of a stage to start its backward bookkeeping (its bf16 optimizer clears the
    low-precision gradients there); hooked on the parameter itself, that bookkeeping ran after the
    head's gradient had arrived and threw it away (tests/test_topology_resume.py, bf16)."""
    return weight.view_as(weight)


def tied_head_forward(embed: Embed, inputs) -> "HeadOutput":
    """The head of a tied model: the embedding matrix projects (a TiedLayerSpec forward_fn)."""
    h, _, _ = inputs
    return HeadOutput(h, _through_graph(embed.weight))


class Head(Embed):
    """Untied output projection: the same [V, H] matrix shape as the embedding. Like every head
    it returns a :class:`HeadOutput`; the loss forms the logits chunk by chunk."""

    def forward(self, inputs) -> "HeadOutput":
        h, _, _ = inputs
        return HeadOutput(h, _through_graph(self.weight))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with llama's names."""

    def __init__(self, a: ModelArgs, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FinalNorm(RMSNorm):
    """The RMSNorm after the last decoder layer, as its own pipeline layer."""

    weight_in_fp32 = False  # chatglm3 multiplies the weight in fp32

    def __init__(self, a: ModelArgs):
        super().__init__(a.hidden_size, a.norm_eps, weight_in_fp32=type(self).weight_in_fp32)

    def forward(self, inputs):
        h, pos, doc = inputs
        return super().forward(h), pos, doc


# ---------------------------------------------------------------------------
# Rotary embeddings


class RopeCache:
    """cos/sin tables for one inv_freq vector, computed in fp32.

    inv_freq is deliberately not a module buffer: DeepSpeed casts every buffer
    to bf16/fp16 with the module, which ruins the frequencies.
    """

    def __init__(self, inv_freq: torch.Tensor, scaling: float = 1.0):
        self.inv_freq = inv_freq.float()
        self.scaling = scaling
        self._tables = _PerBatch(self._build)

    def _build(self, position_ids_BS: torch.Tensor):
        inv = self.inv_freq.to(position_ids_BS.device)
        freqs = position_ids_BS[..., None].float() * inv  # [B,S,D/2]
        return freqs.cos() * self.scaling, freqs.sin() * self.scaling

    def cos_sin(self, position_ids_BS: torch.Tensor):
        """Computed once per micro-batch and shared by the layers of a stage."""
        return self._tables.get(position_ids_BS)


def rope_rotate_half(x_BNSD: torch.Tensor, cos_BSd: torch.Tensor, sin_BSd: torch.Tensor) -> torch.Tensor:
    """NeoX-style rope over the full head dim (llama, baichuan2)."""
    dtype = x_BNSD.dtype
    cos = torch.cat((cos_BSd, cos_BSd), -1).unsqueeze(1).to(dtype)
    sin = torch.cat((sin_BSd, sin_BSd), -1).unsqueeze(1).to(dtype)
    half = x_BNSD.shape[-1] // 2
    x1, x2 = x_BNSD[..., :half], x_BNSD[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x_BNSD * cos + rotated * sin


def rope_rotate_half_fp32(x_BNSD: torch.Tensor, cos_BSd: torch.Tensor, sin_BSd: torch.Tensor) -> torch.Tensor:
    """Same as :func:`rope_rotate_half` but computed in fp32 and cast back (baichuan2)."""
    return rope_rotate_half(x_BNSD.float(), cos_BSd, sin_BSd).to(x_BNSD.dtype)


def rope_interleaved_partial(x_BNSD: torch.Tensor, cos_BSd: torch.Tensor, sin_BSd: torch.Tensor) -> torch.Tensor:
    """chatglm rope: interleaved pairs over the first 2*len(inv_freq) dims; the rest passes through."""
    rot = cos_BSd.shape[-1] * 2
    x_rot, x_pass = x_BNSD[..., :rot], x_BNSD[..., rot:]
    xr = x_rot.float().unflatten(-1, (-1, 2))  # [B,N,S,d,2]
    cos = cos_BSd.unsqueeze(1)
    sin = sin_BSd.unsqueeze(1)
    out = torch.stack((xr[..., 0] * cos - xr[..., 1] * sin, xr[..., 1] * cos + xr[..., 0] * sin), -1)
    return torch.cat((out.flatten(-2).to(x_BNSD.dtype), x_pass), dim=-1)


def default_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


# ---------------------------------------------------------------------------
# Attention


def doc_causal_mask(doc_ids_BS: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean [B,1,S,S] mask: causal and block-diagonal over documents."""
    S = doc_ids_BS.shape[1]
    idx = torch.arange(S, device=doc_ids_BS.device)
    causal = idx[None, :] <= idx[:, None]
    if window is not None:
        causal = causal & (idx[:, None] - idx[None, :] < window)
    same_doc = doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :]
    return (same_doc & causal).unsqueeze(1)


class _PerBatch:
    """One value per micro-batch, shared by the layers of a stage and surviving their checkpoint
    recompute. The key is a tensor's storage (data pointer, version counter, shape, device), not its
    identity: DeepSpeed's non-reentrant checkpoint detaches the layer inputs before recomputing, which
    makes new tensor objects over the same storage. The last few micro-batches are kept (1F1B
    recomputes micro-batch m after later ones ran forward); holding their key tensors keeps that
    memory alive, so an address cannot be reused by another micro-batch while it is cached."""

    def __init__(self, build, keep: int = 4):
        self._build = build
        self._keep = keep
        self._entries: list[tuple[tuple, tuple, object]] = []  # (fingerprint, held key tensors, value)

    def get(self, *key):
        fp = tuple(_fingerprint(k) for k in key)
        for i, (f, _, value) in enumerate(self._entries):
            if f == fp:
                if i:
                    self._entries.insert(0, self._entries.pop(i))
                return value
        value = self._build(*key)
        self._entries.insert(0, (fp, tuple(k for k in key if isinstance(k, torch.Tensor)), value))
        del self._entries[self._keep:]
        return value


def _fingerprint(x):
    if isinstance(x, torch.Tensor):
        # inference-mode tensors have no version counter; they are never modified in place either
        version = -1 if x.is_inference() else x._version
        return ("t", x.data_ptr(), version, tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device))
    return ("v", x)


def _cu_seqlens(doc_ids_BS: torch.Tensor):
    """cu_seqlens and the longest segment of a packed batch, for flash-attn's varlen kernels (their
    argument list has one entry per segment: one host read per micro-batch, cached for the stage)."""
    B, S = doc_ids_BS.shape
    # a new segment starts at every row start and every change of doc id
    flat = (doc_ids_BS + (torch.arange(B, device=doc_ids_BS.device) * (S + 2))[:, None]).flatten()
    start = torch.ones_like(flat, dtype=torch.bool)
    start[1:] = flat[1:] != flat[:-1]
    starts = torch.nonzero(start).flatten()
    cu = torch.cat([starts, torch.tensor([B * S], device=flat.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


#: what each backend is, for the start-up notice and the dry run
BACKEND_TEXT = {
    "blockwise": "blockwise (ppllm's online-softmax kernel in torch: memory linear in S, documents, window, ALiBi "
                 "and grouped kv heads masked per block)",
    "dense": "dense (SDPA under a [B,1,S,S] document mask: memory grows with S^2)",
    "flash": "flash-attn 2 (varlen kernels for packed rows; bloom through alibi_slopes)",
}
BACKENDS = tuple(BACKEND_TEXT)


def attention_backend(use_flash_attn: bool, fallback: str = "blockwise") -> tuple[str, str]:
    """(backend, a notice): flash-attn 2 when asked for, installed and on CUDA, else ``fallback``
    ('blockwise' or 'dense'). On a CUDA device in fp32 the flash path still runs ``fallback``
    (flash-attn has no fp32 kernels), layer by layer: see :meth:`StageContext.attention`."""
    if fallback not in ("blockwise", "dense"):
        raise ValueError(f"attention {fallback!r}: use 'blockwise' or 'dense'")
    if not use_flash_attn:
        return fallback, f"attention: {BACKEND_TEXT[fallback]}"
    import importlib.util
    if not torch.cuda.is_available():
        why = "no CUDA device"
    elif importlib.util.find_spec("flash_attn") is None:
        why = "flash-attn is not installed (pip install -r requirements-gpu.txt)"
    else:
        return "flash", f"attention: {BACKEND_TEXT['flash']}"
    return fallback, f"use_flash_attn: {why}; attention: {BACKEND_TEXT[fallback]}"


class StageContext:
    """What the layers built by one ``Family.build_specs`` call share: the attention backend and
    the per-micro-batch caches (document mask, flash-attn cu_seqlens, and family extras such as
    RoPE tables through :meth:`memo`). Each layer gets it as a constructor argument; nothing is
    kept in module globals."""

    def __init__(self, backend: str = "blockwise"):
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r}: use one of {', '.join(BACKENDS)}")
        self.backend = backend
        self._masks = _PerBatch(doc_causal_mask)
        self._seqlens = _PerBatch(_cu_seqlens)
        self._memo: dict = {}

    def memo(self, key: str, build):
        """A value built once per model (RoPE tables, ALiBi slopes, a _PerBatch cache)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def mask(self, doc_ids_BS: torch.Tensor, window: int | None = None) -> torch.Tensor:
        return self._masks.get(doc_ids_BS, window)

    def cu_seqlens(self, doc_ids_BS: torch.Tensor):
        return self._seqlens.get(doc_ids_BS)

    def attention(self, q_BNSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, doc_ids_BS: torch.Tensor,
                  window: int | None = None, alibi_slopes_N: torch.Tensor | None = None,
                  pos_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Causal, document-masked attention (ALiBi: ``alibi_slopes_N`` and the positions that restart
        per document; the softmax is in fp32 on every backend). Returns [B,S,N*D]."""
        from .attention import blockwise_attention
        if (self.backend == "flash" and q_BNSD.is_cuda and q_BNSD.dtype in (torch.float16, torch.bfloat16)):
            return _flash_attention(q_BNSD, k_BKSD, v_BKSD, self.cu_seqlens(doc_ids_BS), window, alibi_slopes_N)
        if self.backend == "dense":
            bias = None
            if alibi_slopes_N is not None:
                bias = alibi_slopes_N.float().to(pos_BS.device)[None, :, None, None] * pos_BS[:, None, None, :].float()
            return sdpa_attention(q_BNSD, k_BKSD, v_BKSD, self.mask(doc_ids_BS, window), bias,
                                  softmax_fp32=alibi_slopes_N is not None)
        return blockwise_attention(q_BNSD, k_BKSD, v_BKSD, doc_ids_BS, window, alibi_slopes_N, pos_BS)


def _flash_attention(q_BNSD, k_BKSD, v_BKSD, cu_seqlens, window, alibi_slopes_N=None):
    """flash-attn's ALiBi bias is ``-slope * (i - j)``, bloom's ``slope * (position of j in its document)``:
    within a document they differ by ``slope * (position of i)``, constant along a softmax row."""
    from flash_attn import flash_attn_varlen_func
    B, N, S, D = q_BNSD.shape
    cu, max_len = cu_seqlens
    q = q_BNSD.transpose(1, 2).reshape(B * S, N, D)
    k = k_BKSD.transpose(1, 2).reshape(B * S, k_BKSD.shape[1], D)
    v = v_BKSD.transpose(1, 2).reshape(B * S, v_BKSD.shape[1], D)
    kw = {} if alibi_slopes_N is None else {"alibi_slopes": alibi_slopes_N.float().to(q.device)}
    out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True,
                                 window_size=(window - 1, 0) if window else (-1, -1), **kw)
    return out.reshape(B, S, N * D)


def sdpa_attention(q_BNSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, mask_B1SS: torch.Tensor,
                   bias_BNSS: torch.Tensor | None = None, softmax_fp32: bool = False) -> torch.Tensor:
    """Attention under a boolean mask (True = attend). Returns [B,S,N*D]."""
    B, N, S, D = q_BNSD.shape
    if bias_BNSS is not None or softmax_fp32:
        # explicit path (alibi): bias added before softmax, softmax in fp32
        scores = torch.matmul(q_BNSD, _repeat_kv(k_BKSD, N).transpose(-1, -2)) / math.sqrt(D)
        scores = scores.float()
        if bias_BNSS is not None:
            scores = scores + bias_BNSS
        scores = scores.masked_fill(~mask_B1SS, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(q_BNSD.dtype)
        out = torch.matmul(probs, _repeat_kv(v_BKSD, N))
    else:
        out = F.scaled_dot_product_attention(q_BNSD, k_BKSD, v_BKSD, attn_mask=mask_B1SS,
                                             enable_gqa=k_BKSD.shape[1] != N)
    return out.transpose(1, 2).reshape(B, S, N * D)


def _repeat_kv(x_BKSD: torch.Tensor, n_heads: int) -> torch.Tensor:
    K = x_BKSD.shape[1]
    if K == n_heads:
        return x_BKSD
    return x_BKSD.repeat_interleave(n_heads // K, dim=1)


# ---------------------------------------------------------------------------
# Loss
#
# The head layer does not form the logits: it returns a HeadOutput (the final hidden state and
# the [V, H] projection matrix it would multiply by), the only thing DeepSpeed hands the loss
# function on the last stage. TokenLoss then computes cross entropy (and baichuan2's z-loss)
# and their gradients over chunks of tokens or of the vocabulary (see early_gradients), so the
# fp32 logits of a whole micro-batch (B*S*V*4 bytes: 2 GB at llama-3's vocabulary and seq 4096)
# never exist at once. Given plain logits (what
# ``HeadOutput.logits()`` or ``SequentialModel`` returns) it computes the same loss unchunked.


class HeadOutput(NamedTuple):
    """What a head layer returns: ``logits = hidden @ weight.T``, not yet formed."""
    hidden: torch.Tensor  # [B, S, H] in the model dtype
    weight: torch.Tensor  # [V, H]; baichuan2's NormHead passes its row-normalised matrix

    def logits(self) -> torch.Tensor:
        return F.linear(self.hidden, self.weight)


#: fp32 bytes of one chunk's logits; the loss works on ~this many bytes of [tokens, V] at a time. On CPU
#: 32 MiB (cache-friendly); on a GPU ~1 GiB, where a 32 MiB chunk is a launch-bound 0.1 ms matmul
LOSS_CHUNK_BYTES = 32 << 20
GPU_LOSS_CHUNK_BYTES = 1 << 30


def default_loss_chunk_bytes(device_type: str, mb: int | None = None) -> int:
    """``loss_chunk_mb`` when set, else the device's default."""
    if mb is not None:
        return int(mb) << 20
    return LOSS_CHUNK_BYTES if device_type == "cpu" else GPU_LOSS_CHUNK_BYTES


def loss_chunk_tokens(vocab_size: int, chunk_bytes: int = LOSS_CHUNK_BYTES) -> int:
    return max(16, chunk_bytes // (4 * vocab_size))


def next_token_mask(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """Positions that predict a next token of their own document (real tokens, not a row's last
    position, not a document's last token): where baichuan2's original averages its z-loss."""
    mask = torch.zeros_like(doc_ids_BS, dtype=torch.bool)
    mask[:, :-1] = (doc_ids_BS[:, :-1] >= 0) & (doc_ids_BS[:, :-1] == doc_ids_BS[:, 1:])
    return mask


def _chunked_loss_and_grads(h_NH, w_VH, labels_N, zmask_N, ce_scale: float, z_coef: float, chunk: int,
                            want_h: bool, want_w: bool):
    """Loss ``ce_scale * sum(CE over labels != -100) + z_coef * sum(max(logits)^2 over zmask)`` and,
    if asked, its gradients w.r.t. h and w (for an incoming gradient of 1), ``chunk`` tokens at a time.
    The per-chunk arithmetic is autograd's for ``F.linear(h, w).float()`` followed by the loss."""
    N = h_NH.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=h_NH.device)
    gh = torch.empty_like(h_NH) if want_h else None
    gw = torch.zeros(w_VH.shape, dtype=torch.float32, device=w_VH.device) if want_w else None
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        h_c, y_c = h_NH[s:e], labels_N[s:e]
        logits = F.linear(h_c, w_VH).float()  # [c, V]
        valid = y_c != -100
        y_safe = torch.where(valid, y_c, 0)
        lse = torch.logsumexp(logits, dim=-1)
        target = logits.gather(1, y_safe[:, None]).squeeze(1)
        total = total + ce_scale * torch.where(valid, lse - target, 0.0).sum()
        if zmask_N is not None:
            zmax, zarg = logits.max(dim=-1)
            zm = zmask_N[s:e]
            total = total + z_coef * torch.where(zm, zmax * zmax, 0.0).sum()
        if not (want_h or want_w):
            continue
        g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
        row = ce_scale * valid.to(torch.float32)
        g.mul_(row[:, None])
        g.scatter_add_(1, y_safe[:, None], -row[:, None])
        if zmask_N is not None:
            g.scatter_add_(1, zarg[:, None], (2.0 * z_coef * zmax * zm)[:, None])
        g = g.to(h_NH.dtype)
        if want_h:
            gh[s:e] = g @ w_VH
        if want_w:
            if gw.dtype == g.dtype:
                gw.addmm_(g.t(), h_c)
            else:
                gw += (g.t() @ h_c).float()
        del logits, g
    return total, gh, gw


def _loss_by_vocab(h_NH, w_VH, labels_N, zmask_N, ce_scale: float, z_coef: float, vchunk: int):
    """The same loss over vocabulary chunks (an online logsumexp): returns it with what backward
    needs per token (logsumexp, and the max logit and its index for the z-loss)."""
    N, V = h_NH.shape[0], w_VH.shape[0]
    dev = h_NH.device
    run_max = torch.full((N,), float("-inf"), device=dev)
    run_sum = torch.zeros(N, device=dev)
    target = torch.zeros(N, device=dev)
    zarg = torch.zeros(N, dtype=torch.long, device=dev)
    valid = labels_N != -100
    for v0 in range(0, V, vchunk):
        v1 = min(V, v0 + vchunk)
        logits = F.linear(h_NH, w_VH[v0:v1]).float()  # [N, v]
        c_max, c_arg = logits.max(dim=-1)
        new_max = torch.maximum(run_max, c_max)
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max[:, None]).sum(-1)
        zarg = torch.where(c_max > run_max, c_arg + v0, zarg)  # the first maximum, as torch.max
        run_max = new_max
        inside = valid & (labels_N >= v0) & (labels_N < v1)
        local = torch.where(inside, labels_N - v0, 0)
        target = torch.where(inside, logits.gather(1, local[:, None]).squeeze(1), target)
        del logits
    lse = run_max + torch.log(run_sum)
    loss = ce_scale * torch.where(valid, lse - target, 0.0).sum()
    if zmask_N is not None:
        loss = loss + z_coef * torch.where(zmask_N, run_max * run_max, 0.0).sum()
    return loss, lse, run_max, zarg


def _grads_by_vocab(h_NH, w_VH, labels_N, zmask_N, ce_scale, z_coef, vchunk, lse, zmax, zarg,
                    want_h: bool, want_w: bool, grad_scale):
    """Gradients w.r.t. h and w, one vocabulary chunk of logits recomputed at a time: each row
    block of w's gradient is one matmul over all tokens (as unchunked), h's gradient is summed
    over the chunks in fp32."""
    N, V = h_NH.shape[0], w_VH.shape[0]
    valid = labels_N != -100
    gh = torch.zeros(h_NH.shape, dtype=torch.float32, device=h_NH.device) if want_h else None
    gw = torch.empty_like(w_VH) if want_w else None
    ce = ce_scale * grad_scale
    row = ce * valid.to(torch.float32)
    zg = 2.0 * z_coef * grad_scale * zmax * zmask_N if zmask_N is not None else None
    for v0 in range(0, V, vchunk):
        v1 = min(V, v0 + vchunk)
        g = F.linear(h_NH, w_VH[v0:v1]).float().sub_(lse[:, None]).exp_().mul_(row[:, None])
        # every token adds to one column of the chunk: -row at its label, or an exact 0 at column 0
        # when its label lies elsewhere (a scatter of fixed shape: no nonzero, no host read)
        inside = valid & (labels_N >= v0) & (labels_N < v1)
        g.scatter_add_(1, torch.where(inside, labels_N - v0, 0)[:, None], torch.where(inside, -row, 0.0)[:, None])
        if zg is not None:
            zin = zmask_N & (zarg >= v0) & (zarg < v1)
            g.scatter_add_(1, torch.where(zin, zarg - v0, 0)[:, None], torch.where(zin, zg, 0.0)[:, None])
        g = g.to(h_NH.dtype)
        if want_w:
            gw[v0:v1] = g.t() @ h_NH
        if want_h:
            gh += (g @ w_VH[v0:v1]).float()
        del g
    return (gh.to(h_NH.dtype) if want_h else None), gw


def early_gradients(n_tokens: int, hidden: int, vocab: int, dtype: torch.dtype,
                    chunk_bytes: int = LOSS_CHUNK_BYTES) -> bool:
    """Take the gradients during forward (token chunks; the head's three matmuls, as unchunked)
    when the micro-batch is a few token chunks and the V x H buffers that costs stay under a
    quarter of the unchunked loss's logits; else recompute the logits in backward by vocabulary
    chunks (a fourth matmul, but every matmul at full size: summing the head gradient over many
    token chunks is memory-bound and measured slower). fp16 always recomputes: its gradient must
    see the loss scale before it is cast."""
    if dtype == torch.float16 or n_tokens > 4 * loss_chunk_tokens(vocab, chunk_bytes):
        return False
    b = dtype.itemsize
    extra_per_vocab = (b + (4 if b != 4 else 0)) * hidden  # kept gradient + its fp32 sum
    return 4 * extra_per_vocab <= n_tokens * (b + 8)


class _ChunkedHeadLoss(torch.autograd.Function):
    """The head matmul and the loss as one function over chunks; see :func:`early_gradients`
    for its two ways. Neither holds more than one chunk of fp32 logits."""

    @staticmethod
    def forward(ctx, h_NH, w_VH, labels_N, zmask_N, ce_scale, z_coef, chunk_bytes):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, V = h_NH.shape[0], w_VH.shape[0]
        ctx.early = (want_h or want_w) and early_gradients(N, h_NH.shape[1], V, h_NH.dtype, chunk_bytes)
        ctx.args = (ce_scale, z_coef, max(16, chunk_bytes // (4 * max(1, N))))  # vocabulary entries per chunk
        if ctx.early or not (want_h or want_w):
            loss, gh, gw = _chunked_loss_and_grads(h_NH, w_VH, labels_N, zmask_N, ce_scale, z_coef,
                                                   loss_chunk_tokens(V, chunk_bytes), want_h and ctx.early,
                                                   want_w and ctx.early)
            # not saved tensors: backward scales them in place and drops them (no second copy)
            ctx.grads = (gh, gw.to(w_VH.dtype) if gw is not None else None)
            return loss
        loss, lse, zmax, zarg = _loss_by_vocab(h_NH, w_VH, labels_N, zmask_N, ce_scale, z_coef, ctx.args[2])
        ctx.save_for_backward(h_NH, w_VH, labels_N, zmask_N, lse, zmax, zarg)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.early:
            if ctx.grads is None:
                raise RuntimeError("the chunked loss's gradients were already used: backward runs once per forward")
            gh, gw = ctx.grads
            ctx.grads = None
            gh = gh.mul_(grad_loss.to(gh.dtype)) if gh is not None else None
            gw = gw.mul_(grad_loss.to(gw.dtype)) if gw is not None else None
        else:
            h, w, labels, zmask, lse, zmax, zarg = ctx.saved_tensors
            ce_scale, z_coef, vchunk = ctx.args
            gh, gw = _grads_by_vocab(h, w, labels, zmask, ce_scale, z_coef, vchunk, lse, zmax, zarg,
                                     ctx.needs_input_grad[0], ctx.needs_input_grad[1], grad_loss)
        return gh, gw, None, None, None, None, None


def split_labels(labels):
    """``labels`` | ``(labels, next_token_mask)`` -> the two (None where absent)."""
    if isinstance(labels, (tuple, list)):
        return labels[0], (labels[1] if len(labels) > 1 else None)
    return labels, None


def _fp32(x: float) -> float:
    """x rounded to fp32, as a Python float (the scale the fp32 loss multiplies by)."""
    return struct.unpack("f", struct.pack("f", x))[0]


class TokenLoss:
    """Next-token cross entropy, summed over trained tokens and divided by a normaliser, plus
    baichuan2's optional z-loss ``z_loss_weight * mean(max(logits)^2)``.

    Labels are already shifted by the data pipeline (``labels[t]`` is the target for
    position ``t``; -100 is ignored); they may come as ``(labels, next_token_mask)``.
    ``normaliser = (scale, z_scale)``, Python floats set once per optimizer step by
    ``ppllm.engine.with_normaliser`` with ``scale = grad_accum * dp / trained_tokens_in_step``, turns
    the engine's per-micro-batch averaging into a token-weighted mean over the whole step. Without
    one, the loss is the micro-batch's token mean (one host read, outside the pipeline).

    The z-loss is averaged, as in the original, over every position that predicts a next
    token, trained or not: with ``z_scale = grad_accum * dp / such positions in the step`` and
    the mask = :func:`next_token_mask` of the row's doc ids; with plain labels, every position
    but the last of each row (one document per row).

    ``outputs`` is a :class:`HeadOutput` (chunked, the pipeline's path) or logits (unchunked).
    """

    def __init__(self, z_loss_weight: float = 0.0, chunk_bytes: int = LOSS_CHUNK_BYTES):
        self.z_loss_weight = z_loss_weight
        self.chunk_bytes = chunk_bytes
        self.normaliser: tuple[float, float | None] | None = None
        self.__name__ = "TokenLoss"

    @property
    def needs_next_token_mask(self) -> bool:
        return bool(self.z_loss_weight)

    def _scales(self, labels_BS, zmask_BS):
        """(CE scale, z-loss coefficient, z mask or None) as fp32-rounded Python floats."""
        norm = self.normaliser
        if norm is None:
            ce = 1.0 / max(1, int((labels_BS != -100).sum()))
        else:
            ce = _fp32(norm[0])
        if not self.z_loss_weight:
            return ce, 0.0, None
        if zmask_BS is None:
            zmask_BS = torch.ones_like(labels_BS, dtype=torch.bool)
            zmask_BS[:, -1] = False
        if norm is None or norm[1] is None:
            zs = 1.0 / max(1, int(zmask_BS.sum()))
        else:
            zs = _fp32(norm[1])
        return ce, _fp32(self.z_loss_weight * zs), zmask_BS.to(labels_BS.device)

    def __call__(self, outputs, labels) -> torch.Tensor:
        labels_BS, zmask_BS = split_labels(labels)
        ce_scale, z_coef, zmask_BS = self._scales(labels_BS, zmask_BS)
        labels_N = labels_BS.reshape(-1)
        zmask_N = zmask_BS.reshape(-1) if zmask_BS is not None else None
        if isinstance(outputs, HeadOutput):
            h, w = outputs
            return _ChunkedHeadLoss.apply(h.reshape(-1, h.shape[-1]), w, labels_N, zmask_N, ce_scale, z_coef,
                                          self.chunk_bytes)
        logits = outputs.float().flatten(0, 1)
        loss = ce_scale * F.cross_entropy(logits, labels_N, ignore_index=-100, reduction="sum")
        if zmask_N is not None:
            z = logits.max(-1).values
            loss = loss + z_coef * (z * z)[zmask_N].sum()
        return loss
