"""Every attention backend ppllm runs on a CPU (blockwise, dense) against a written-out dense reference,
forward and backward (dq, dk, dv), at real head dims (64, 128), S >= 1024 in one row of several
documents and padding, for each family's attention shape: llama/qwen2 (grouped kv heads), mistral
(grouped + sliding window), bloom (ALiBi, fp32 softmax), chatglm3 (multi-query), baichuan2 (MHA).

Two checks per case:
* fp64: the kernel's algorithm (block walk, online softmax, masks, block skipping, gradients) equals
  the reference to fp64 rounding, so any logic error shows at ~1e-3, far above the tolerance;
* fp32: the blockwise kernel and the dense backend agree within twice a first-order forward error
  bound of fp32 attention, computed per element from the data (each of the two is within one bound
  of the exact value). The bound depends on the inputs only, not on a machine's rounding, so it
  holds for AVX2 and AVX-512 kernels alike.
"""
import math

import pytest
import torch

from models.attention import BLOCK, blockwise_attention
from models.bloom import alibi_slopes
from models.common import StageContext

pytestmark = pytest.mark.timeout(240)

#: family -> (query heads, kv heads, sliding window, ALiBi)
SHAPES = {
    "llama": (4, 2, None, False),
    "mistral": (4, 2, 300, False),
    "bloom": (4, 4, None, True),
    "chatglm3": (4, 1, None, False),
    "baichuan2": (2, 2, None, False),
}
S = 4 * BLOCK + 40  # a ragged last block


def _row():
    """One packed row: four documents (one shorter than a block, one spanning three), then padding."""
    lengths = [200, 610, 37, 151]
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((S - sum(lengths),), -1)])
    pos = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(S - sum(lengths))])
    return doc[None], pos[None]


def _inputs(n, k, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = (1.5 * torch.randn(1, n, S, d, generator=g, dtype=torch.float64)).to(dtype)
    kk = torch.randn(1, k, S, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(1, k, S, d, generator=g, dtype=torch.float64).to(dtype)
    do = torch.randn(1, S, n * d, generator=g, dtype=torch.float64).to(dtype)
    return q, kk, v, do


def _allowed(doc, window):
    i = torch.arange(S)
    a = (doc[0][:, None] == doc[0][None, :]) & (i[None, :] <= i[:, None])
    if window is not None:
        a &= i[:, None] - i[None, :] < window
    return a  # [S, S]


def _reference(q, k, v, doc, pos, window, slopes):
    """Dense attention as the formulas read: [B,S,N*D]."""
    B, N, _, D = q.shape
    kr, vr = (t.repeat_interleave(N // t.shape[1], dim=1) for t in (k, v))
    s = q @ kr.transpose(-1, -2) / math.sqrt(D)
    if slopes is not None:
        s = s + slopes.to(s.dtype)[None, :, None, None] * pos[:, None, None, :].to(s.dtype)
    s = s.masked_fill(~_allowed(doc, window), float("-inf"))
    return (torch.softmax(s, -1) @ vr).transpose(1, 2).reshape(B, S, N * D)


def _run(fn, q, k, v, do):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do))


def _bounds(q, k, v, do, doc, pos, window, slopes, u):
    """First-order bounds on |computed - exact| of out, dq, dk, dv for attention evaluated in a
    precision of unit roundoff u (Higham's gamma_n = n u / (1 - n u) for sums of n products):
      scores   |ds_ij| <= Es_ij = gamma_{D+2} (scale |q_i|.|k_j| + |bias_ij|)
      probs    |dp_ij| <= c_i p_ij, c_i = 2 max_j Es_ij + gamma_{n+4}  (max, exp, sum of n, divide;
               n = S bounds the keys of a row and the blockwise kernel's rescalings)
      out      |do_id| <= (c_i + gamma_n) sum_j p_ij |v_jd|
      dv       sum_i (c_i + gamma_n) p_ij |dO_id|
      dS_ij = p_ij (dP_ij - delta_i) with dP = dO v^T, delta_i = dO_i.o_i (or sum_j p_ij dP_ij)
               |d dS_ij| <= p_ij (c_i |dP_ij - delta_i| + Edp_ij + Edelta_i)
      dq, dk   scale (sum_j |d dS_ij| |k_j| + gamma_n sum_j |dS_ij| |k_j|), and transposed for dk."""
    f = lambda t: t.to(torch.float64)  # noqa: E731
    q, k, v, do = f(q), f(k), f(v), f(do)
    B, N, _, D = q.shape
    K = k.shape[1]
    gam = lambda n: n * u / (1 - n * u)  # noqa: E731
    scale = 1 / math.sqrt(D)
    kr, vr = (t.repeat_interleave(N // K, dim=1) for t in (k, v))
    allowed = _allowed(doc, window)
    s = q @ kr.transpose(-1, -2) * scale
    a = q.abs() @ kr.abs().transpose(-1, -2) * scale
    if slopes is not None:
        bias = f(slopes)[None, :, None, None] * f(pos)[:, None, None, :]
        s, a = s + bias, a + bias.abs()
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1)
    es = (gam(D + 2) * a).masked_fill(~allowed, 0)
    c = 2 * es.amax(-1, keepdim=True) + gam(S + 4)  # [B,N,S,1]
    dO = do.view(B, S, N, D).transpose(1, 2)
    o = p @ vr
    e_out = (c + gam(S)) * (p @ vr.abs())
    dv = ((c + gam(S)) * p).transpose(-1, -2) @ dO.abs()
    dP = dO @ vr.transpose(-1, -2)
    e_dp = gam(D) * (dO.abs() @ vr.abs().transpose(-1, -2))
    delta = (dO * o).sum(-1, keepdim=True)
    e_delta = gam(D) * (dO.abs() * o.abs()).sum(-1, keepdim=True) + (dO.abs() * e_out).sum(-1, keepdim=True) \
        + gam(S) * (p * dP.abs()).sum(-1, keepdim=True)
    dS = p * (dP - delta)
    e_dS = p * (c * (dP - delta).abs() + e_dp + e_delta)
    e_dq = scale * ((e_dS + gam(S) * dS.abs()) @ kr.abs())
    e_dk = scale * ((e_dS + gam(S) * dS.abs()).transpose(-1, -2) @ q.abs())
    dk_heads = scale * (dS.transpose(-1, -2) @ q).abs()
    dv_heads = (p.transpose(-1, -2) @ dO).abs()
    fold = lambda t: t.unflatten(1, (K, N // K)).sum(2)  # noqa: E731  (a kv head sums its query heads)
    return (e_out.transpose(1, 2).reshape(B, S, N * D), e_dq, fold(e_dk) + gam(N // K) * fold(dk_heads),
            fold(dv) + gam(N // K) * fold(dv_heads))


def _family_case(family, d, dtype, seed=0):
    n, k, window, alibi = SHAPES[family]
    q, kk, v, do = _inputs(n, k, d, dtype, seed)
    doc, pos = _row()
    slopes = alibi_slopes(n) if alibi else None
    return q, kk, v, do, doc, pos, window, slopes


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("family", sorted(SHAPES))
def test_blockwise_equals_reference_in_fp64(family, d):
    q, k, v, do, doc, pos, window, slopes = _family_case(family, d, torch.float64)
    got = _run(lambda a, b, c: blockwise_attention(a, b, c, doc, window, slopes, pos), q, k, v, do)
    ref = _run(lambda a, b, c: _reference(a, b, c, doc, pos, window, slopes), q, k, v, do)
    bounds = _bounds(q, k, v, do, doc, pos, window, slopes, u=2.0 ** -53)
    for name, x, r, e in zip(("out", "dq", "dk", "dv"), got, ref, bounds):
        worst = ((x - r).abs() / (2 * e + 1e-300)).max().item()
        assert worst <= 1.0, f"{family} D={d} {name}: error {worst:.3g} x the fp64 bound"
        assert x.abs().max() > 0.01  # a real signal, not all zeros


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("family", sorted(SHAPES))
def test_blockwise_and_dense_agree_in_fp32_within_error_bound(family, d):
    q, k, v, do, doc, pos, window, slopes = _family_case(family, d, torch.float32, seed=1)
    got = _run(lambda a, b, c: StageContext("blockwise").attention(a, b, c, doc, window, slopes, pos), q, k, v, do)
    dense = _run(lambda a, b, c: StageContext("dense").attention(a, b, c, doc, window, slopes, pos), q, k, v, do)
    exact = _run(lambda a, b, c: _reference(a, b, c, doc, pos, window, slopes),
                 *(t.double() for t in (q, k, v, do)))
    bounds = _bounds(q, k, v, do, doc, pos, window, slopes, u=2.0 ** -24)
    for name, x, y, r, e in zip(("out", "dq", "dk", "dv"), got, dense, exact, bounds):
        assert x.dtype == torch.float32 and y.dtype == torch.float32
        for label, t in (("blockwise", x), ("dense", y)):
            worst = ((t.double() - r).abs() / e).max().item()
            assert worst <= 1.0, f"{family} D={d} {name}: {label} is {worst:.3g} x the fp32 bound from exact"
        worst = ((x.double() - y.double()).abs() / (2 * e)).max().item()
        assert worst <= 1.0, f"{family} D={d} {name}: blockwise - dense is {worst:.3g} x twice the fp32 bound"


def test_documents_and_padding_never_mix():
    """A key's value changed in one document moves no other document's output or gradient."""
    n, k, window, alibi = SHAPES["llama"]
    q, kk, v, do = _inputs(n, k, 64, torch.float32, 3)
    doc, pos = _row()
    base = _run(lambda a, b, c: blockwise_attention(a, b, c, doc), q, kk, v, do)
    v2 = v.clone()
    v2[:, :, 300] += 10.0  # a key of document 1 (positions 200..809)
    moved = _run(lambda a, b, c: blockwise_attention(a, b, c, doc), q, kk, v2, do)
    other = (doc[0] != 1)
    assert torch.equal(base[0][0, other], moved[0][0, other])
    assert not torch.equal(base[0][0, ~other], moved[0][0, ~other])
    assert torch.equal(base[1][:, :, other], moved[1][:, :, other])  # dq outside document 1


def test_saved_for_backward_is_linear_in_s():
    """What the kernel keeps for backward is O(S): q, k, v, doc ids, output, row logsumexp."""
    def saved_bytes(s_len):
        q = torch.randn(1, 4, s_len, 64, requires_grad=True)
        k = torch.randn(1, 2, s_len, 64, requires_grad=True)
        v = torch.randn(1, 2, s_len, 64, requires_grad=True)
        doc = torch.zeros(1, s_len, dtype=torch.long)
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            blockwise_attention(q, k, v, doc)
        return sum(total)
    a, b = saved_bytes(1024), saved_bytes(2048)
    assert b == 2 * a, (a, b)
    per_token = a // 1024  # q (4 heads) + k + v (2 heads) + out (4 heads) of 64 fp32, lse (4 heads), doc id
    assert per_token == 4 * 64 * (4 + 2 + 2 + 4) + 4 * 4 + 8
