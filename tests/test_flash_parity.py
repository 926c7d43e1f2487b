"""bf16 flash-attn (varlen kernels over packed rows) against SDPA with the document mask.

On a CUDA machine with flash-attn installed this runs the real kernels, unchanged. Elsewhere the
same code path (StageContext.attention -> _flash_attention: reshapes, cu_seqlens, window) runs
against a stand-in ``flash_attn`` module that computes each segment with SDPA on the CPU, so the
plumbing around the kernel is checked on every machine.
"""
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from models.common import StageContext

REAL = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, window_size=(-1, -1), alibi_slopes=None):
    """flash_attn_varlen_func's contract on [total, heads, dim] tensors, one segment at a time
    (ALiBi as flash-attn defines it: a bias of -slope * |i - j| inside each segment)."""
    out = torch.empty_like(q)
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[s:e].transpose(0, 1).float() for t in (q, k, v))
        n = e - s
        i = torch.arange(n)
        allowed = i[None, :] <= i[:, None]
        if window_size[0] >= 0:
            allowed &= i[:, None] - i[None, :] <= window_size[0]
        if alibi_slopes is not None:
            bias = -alibi_slopes.float()[:, None, None] * (i[:, None] - i[None, :]).abs().float()
            allowed = torch.where(allowed, bias, float("-inf"))
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, enable_gqa=ks.shape[0] != qs.shape[0])
        out[s:e] = o.transpose(0, 1).to(q.dtype)
    return out


@pytest.fixture
def flash(monkeypatch):
    if REAL:
        return "cuda"
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = _reference_varlen
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    return "cpu"


@pytest.mark.parametrize("window", [None, 5])
def test_flash_matches_sdpa_in_bf16(flash, window):
    device = flash
    g = torch.Generator().manual_seed(0)
    B, N, K, S, D = 2, 4, 2, 24, 16
    q, k, v = (torch.randn(B, h, S, D, generator=g).to(device, torch.bfloat16) for h in (N, K, K))
    doc = torch.tensor([[0] * 9 + [1] * 10 + [-1] * 5, [0] * 24]).to(device)
    ctx = StageContext("flash")
    if device == "cpu":  # StageContext.attention takes flash only on CUDA: call its kernel wrapper
        from models.common import _flash_attention
        out = _flash_attention(q, k, v, ctx.cu_seqlens(doc), window)
    else:
        out = ctx.attention(q, k, v, doc, window=window)
    ref = StageContext("dense").attention(q.float(), k.float(), v.float(), doc, window=window)
    real = doc.reshape(-1) >= 0  # padding positions are free to differ
    torch.testing.assert_close(out.float().reshape(B * S, -1)[real], ref.reshape(B * S, -1)[real],
                               rtol=2e-2, atol=2e-2)


def test_flash_alibi_matches_bloom_alibi_in_bf16(flash):
    """bloom on flash-attn: its alibi_slopes bias (-slope * (i - j)) equals bloom's (slope * position of
    the key in its document) up to a constant per softmax row, on packed rows with padding."""
    from models.bloom import alibi_slopes
    device = flash
    g = torch.Generator().manual_seed(1)
    B, N, S, D = 2, 4, 24, 16
    q, k, v = (torch.randn(B, N, S, D, generator=g).to(device, torch.bfloat16) for _ in range(3))
    doc = torch.tensor([[0] * 9 + [1] * 10 + [-1] * 5, [0] * 24]).to(device)
    pos = torch.tensor([list(range(9)) + list(range(10)) + [0] * 5, list(range(24))]).to(device)
    slopes = alibi_slopes(N).to(device)
    ctx = StageContext("flash")
    if device == "cpu":
        from models.common import _flash_attention
        out = _flash_attention(q, k, v, ctx.cu_seqlens(doc), None, slopes)
    else:
        out = ctx.attention(q, k, v, doc, alibi_slopes_N=slopes, pos_BS=pos)
    ref = StageContext("dense").attention(q.float(), k.float(), v.float(), doc, alibi_slopes_N=slopes, pos_BS=pos)
    real = doc.reshape(-1) >= 0
    torch.testing.assert_close(out.float().reshape(B * S, -1)[real], ref.reshape(B * S, -1)[real],
                               rtol=2e-2, atol=2e-2)
