"""Attention backends for packed rows: causal, never across documents, optionally a sliding window
(mistral), ALiBi (bloom) and grouped/multi-query heads (llama-3, mistral, qwen2, chatglm3).

Legend: B batch, S sequence, N query heads, K kv heads, G = N / K query heads per kv head, D head dim.

* ``blockwise`` (the default where flash-attn is not used): :class:`BlockAttention`, an online-softmax
  kernel in plain torch. Forward walks query blocks x key blocks, keeping a running max, sum and
  output per query row (fp32); it saves only the output and the row logsumexp ([B, N, S]). Backward
  recomputes each block's probabilities from them. The largest temporary is one block of scores,
  ``B * N * block_q * block_k`` fp32, so memory is linear in S. Key blocks wholly after a query block
  (causal) or before its window are skipped (static bounds, no host read); documents and padding are
  masked inside each block from the doc ids, so nothing depends on the data's layout on the host.
  Grouped heads are computed as ``[B, K, G * block_q, D] @ [B, K, D, block_k]``: K/V are never
  repeated to N heads.
* ``dense``: the former path, SDPA (or explicit fp32 softmax for ALiBi) under a ``[B, 1, S, S]``
  document mask. Memory grows with S^2; kept selectable as the reference and for the benchmark.
* ``flash``: flash-attn 2's varlen kernels (CUDA, fp16/bf16), bloom through their ``alibi_slopes``.

Masking semantics (all backends): query i attends key j iff ``doc[i] == doc[j]`` and ``j <= i`` (and
``i - j < window``). Padding (doc id -1) thus attends to earlier padding only, never to real tokens.
"""
from __future__ import annotations

import math

import torch

#: query/key block edge of the blockwise kernel (measured in bench/long_context.py --blocks)
BLOCK = 256


def _block_mask(doc_BS, i0, i1, j0, j1, window):
    """[B, 1, 1, bq, bk] True where query i in [i0,i1) may attend key j in [j0,j1)."""
    allowed = doc_BS[:, i0:i1, None] == doc_BS[:, None, j0:j1]
    if j1 - 1 > i0 or window is not None:  # the block touches the diagonal or the window's edge
        qi = torch.arange(i0, i1, device=doc_BS.device)[:, None]
        kj = torch.arange(j0, j1, device=doc_BS.device)[None, :]
        rule = kj <= qi
        if window is not None:
            rule = rule & (qi - kj < window)
        allowed = allowed & rule
    return allowed[:, None, None]


def _key_blocks(i0, i1, block, window):
    """Start of every key block query block [i0, i1) can see: causal, and inside the window."""
    lo = 0 if window is None else max(0, i0 - window + 1)
    return range((lo // block) * block, i1, block)


def _scores(q_blk, k_BKSD, doc_BS, slopes_KG, kpos_BS, i0, i1, j0, j1, window):
    """Masked scores [B, K, G, bq, bk] in fp32 of one block pair; q_blk is [B, K, G*bq, D] fp32,
    already multiplied by 1/sqrt(D)."""
    B, K = q_blk.shape[:2]
    cdt = q_blk.dtype
    k = k_BKSD[:, :, j0:j1].to(cdt)
    s = torch.matmul(q_blk, k.transpose(-1, -2))
    s = s.view(B, K, -1, i1 - i0, j1 - j0)
    if slopes_KG is not None:  # ALiBi: slope times the key's position in its document
        s.add_(slopes_KG[None, :, :, None, None] * kpos_BS[:, None, None, None, j0:j1].to(cdt))
    # -inf, not the dtype's lowest finite value: exp() of -inf is 0 at full speed, while exp() of
    # finfo.min takes the slow out-of-range path on x86 (about 12x slower per element, measured); a row
    # with no allowed key in this block stays finite because the running maximum starts at finfo.min
    return s.masked_fill_(~_block_mask(doc_BS, i0, i1, j0, j1, window), float("-inf"))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs (softmax and sums in fp32, as bloom's original); fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


class BlockAttention(torch.autograd.Function):
    """Exact attention in blocks; see the module docstring. Inputs q [B,N,S,D], k/v [B,K,S,D], doc ids
    [B,S]; ``slopes_N``/``kpos_BS`` (ALiBi) or None; returns [B, S, N*D] in q's dtype."""

    @staticmethod
    def forward(ctx, q, k, v, doc_BS, slopes_N, kpos_BS, window, block):
        B, N, S, D = q.shape
        K = k.shape[1]
        G = N // K
        scale = 1.0 / math.sqrt(D)
        cdt = _compute_dtype(q.dtype)
        slopes = slopes_N.to(cdt).view(K, G) if slopes_N is not None else None
        qg = q.unflatten(1, (K, G))
        out = torch.empty(B, S, K, G, D, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, K, G, S, dtype=cdt, device=q.device)
        for i0 in range(0, S, block):
            i1 = min(S, i0 + block)
            bq = i1 - i0
            q_blk = qg[:, :, :, i0:i1].to(cdt).reshape(B, K, G * bq, D) * scale
            m = torch.full((B, K, G, bq), torch.finfo(cdt).min, dtype=cdt, device=q.device)
            l = torch.zeros(B, K, G, bq, dtype=cdt, device=q.device)
            acc = torch.zeros(B, K, G * bq, D, dtype=cdt, device=q.device)
            for j0 in _key_blocks(i0, i1, block, window):
                j1 = min(S, j0 + block)
                s = _scores(q_blk, k, doc_BS, slopes, kpos_BS, i0, i1, j0, j1, window)
                m_new = torch.maximum(m, s.amax(-1))
                alpha = torch.exp(m - m_new)
                p = s.sub_(m_new[..., None]).exp_()
                l = l.mul_(alpha).add_(p.sum(-1))
                acc.mul_(alpha.view(B, K, G * bq, 1)).add_(torch.matmul(p.view(B, K, G * bq, -1), v[:, :, j0:j1].to(cdt)))
                m = m_new
                del s, p
            o = acc.view(B, K, G, bq, D).div_(l[..., None])
            out[:, i0:i1] = o.permute(0, 3, 1, 2, 4).to(q.dtype)
            lse[:, :, :, i0:i1] = m + torch.log(l)
        out = out.view(B, S, N * D)
        ctx.save_for_backward(q, k, v, doc_BS, slopes_N, kpos_BS, out, lse)
        ctx.args = (window, block)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, doc_BS, slopes_N, kpos_BS, out, lse = ctx.saved_tensors
        window, block = ctx.args
        B, N, S, D = q.shape
        K = k.shape[1]
        G = N // K
        scale = 1.0 / math.sqrt(D)
        cdt = _compute_dtype(q.dtype)
        slopes = slopes_N.to(cdt).view(K, G) if slopes_N is not None else None
        qg = q.unflatten(1, (K, G))
        do = d_out.reshape(B, S, K, G, D).permute(0, 2, 3, 1, 4)  # [B,K,G,S,D] view
        o = out.view(B, S, K, G, D).permute(0, 2, 3, 1, 4)
        delta = (do.to(cdt) * o.to(cdt)).sum(-1)  # [B,K,G,S]: rowsum(dO * O)
        dq = torch.zeros(B, K, G, S, D, dtype=cdt, device=q.device)
        dk = torch.zeros(B, K, S, D, dtype=cdt, device=q.device)
        dv = torch.zeros(B, K, S, D, dtype=cdt, device=q.device)
        for i0 in range(0, S, block):
            i1 = min(S, i0 + block)
            bq = i1 - i0
            q_blk = qg[:, :, :, i0:i1].to(cdt).reshape(B, K, G * bq, D) * scale  # dK = dS^T (scale Q)
            do_blk = do[:, :, :, i0:i1].to(cdt).reshape(B, K, G * bq, D)
            lse_blk = lse[:, :, :, i0:i1, None]
            delta_blk = delta[:, :, :, i0:i1, None]
            dq_blk = torch.zeros(B, K, G * bq, D, dtype=cdt, device=q.device)
            for j0 in _key_blocks(i0, i1, block, window):
                j1 = min(S, j0 + block)
                p = _scores(q_blk, k, doc_BS, slopes, kpos_BS, i0, i1, j0, j1, window)
                p = p.sub_(lse_blk).exp_()  # [B,K,G,bq,bk]; masked entries are exactly 0
                p2 = p.view(B, K, G * bq, -1)
                dv[:, :, j0:j1] += torch.matmul(p2.transpose(-1, -2), do_blk)
                dp = torch.matmul(do_blk, v[:, :, j0:j1].to(cdt).transpose(-1, -2)).view_as(p)
                ds = p.mul_(dp.sub_(delta_blk)).view(B, K, G * bq, -1)  # dS = P * (dP - delta), in place of P
                dq_blk += torch.matmul(ds, k[:, :, j0:j1].to(cdt))
                dk[:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), q_blk)
                del p, p2, dp, ds
            dq[:, :, :, i0:i1] = dq_blk.view(B, K, G, bq, D)
        dq = dq.mul_(scale).view(B, N, S, D).to(q.dtype)
        dk = dk.to(k.dtype)
        return dq, dk, dv.to(v.dtype), None, None, None, None, None


def blockwise_attention(q_BNSD, k_BKSD, v_BKSD, doc_BS, window: int | None = None,
                        alibi_slopes_N: torch.Tensor | None = None, pos_BS: torch.Tensor | None = None,
                        block: int | None = None) -> torch.Tensor:
    """Causal, document-masked attention with memory linear in S. Returns [B, S, N*D]."""
    block = block or BLOCK
    if q_BNSD.shape[1] % k_BKSD.shape[1]:
        raise ValueError(f"{q_BNSD.shape[1]} query heads are not a multiple of {k_BKSD.shape[1]} kv heads")
    if alibi_slopes_N is not None and pos_BS is None:
        raise ValueError("ALiBi needs the position ids (each key's position in its document)")
    return BlockAttention.apply(q_BNSD, k_BKSD, v_BKSD, doc_BS, alibi_slopes_N,
                                pos_BS if alibi_slopes_N is not None else None, window, block)


def block_scores_bytes(batch: int, heads: int, seq_len: int, block: int = BLOCK) -> int:
    """The blockwise kernel's largest temporaries, freed after each block pair: a block of fp32
    scores/probabilities, dP, and the block's masks and running sums; independent of S beyond one block."""
    b = min(block, seq_len)
    return 3 * 4 * batch * heads * b * b
