"""The chunked head + loss equals the unchunked one in fp32: loss, the hidden state's gradient and
the head matrix's gradient, for untied, tied (llama, bloom) and baichuan2's NormHead, with token
weighting and z-loss; and the z-loss follows the original's definition on packed rows."""
import pytest
import torch
import torch.nn.functional as F

from models import get_family
from models import common
from models.common import HeadOutput, TokenLoss, loss_chunk_tokens, next_token_mask
from ppllm.engine import with_normaliser, z_positions
from ppllm.pipeline import SequentialModel

V, H = 97, 24
SMALL_CHUNK = 16 * 4 * V  # 16 tokens per chunk: several chunks and a ragged last one


def packed_batch(seed: int, B: int = 2, S: int = 29):
    """Rows of several documents, a padded tail, and labels trained on part of each document."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S), generator=g)
    doc = torch.full((B, S), -1)
    pos = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, S), -100)
    for r in range(B):
        at, d = 0, 0
        while at < S - 3:
            n = min(int(torch.randint(3, 12, (1,), generator=g)), S - 3 - at)
            if n < 2:
                break
            doc[r, at:at + n], pos[r, at:at + n] = d, torch.arange(n)
            start = at + int(torch.randint(0, n - 1, (1,), generator=g))
            labels[r, start:at + n - 1] = ids[r, start + 1:at + n]
            at, d = at + n, d + 1
    return ids, pos, doc, labels


def head_output(kind: str, seed: int = 0):
    """(HeadOutput, leaf hidden, leaf matrix) for a head of the given kind."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 29, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    if kind == "normhead":
        return HeadOutput(h, F.normalize(w, dim=-1)), h, w
    return HeadOutput(h, w), h, w


def grads(loss, h, w):
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), gh, gw


@pytest.fixture(params=["early", "recompute"])
def mode(request, monkeypatch):
    """Both ways of the chunked loss: gradients in forward by token chunks, or recomputed in
    backward by vocabulary chunks (chosen by size; forced here)."""
    monkeypatch.setattr(common, "early_gradients", lambda *a: request.param == "early")
    return request.param


@pytest.mark.parametrize("kind", ["untied", "normhead"])
@pytest.mark.parametrize("z_weight", [0.0, 0.3])
@pytest.mark.parametrize("labels_form", ["plain", "normaliser"])
def test_chunked_equals_unchunked_fp32(kind, z_weight, labels_form, mode):
    ids, pos, doc, labels = packed_batch(1)
    chunked, unchunked = TokenLoss(z_weight, chunk_bytes=SMALL_CHUNK), TokenLoss(z_weight)
    if labels_form == "plain":
        lab = labels
    else:
        lab = with_normaliser([((ids, pos, doc), labels)], 0.037, 0.011 if z_weight else None,
                              [chunked, unchunked])[0][1]
        assert chunked.normaliser == unchunked.normaliser == (0.037, 0.011 if z_weight else None)
    assert loss_chunk_tokens(V, SMALL_CHUNK) == 16
    out, h, w = head_output(kind)
    a = grads(chunked(out, lab) * 2.5, h, w)  # an incoming gradient other than 1
    out, h, w = head_output(kind)
    b = grads(unchunked(out.logits(), lab) * 2.5, h, w)
    for x, y, what in zip(a, b, ("loss", "hidden grad", "head weight grad")):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=lambda m: f"{what}: {m}")


def test_chunked_loss_without_grad_and_frozen_head(mode):
    ids, pos, doc, labels = packed_batch(2)
    out, h, w = head_output("untied")
    ref = TokenLoss()(out.logits(), labels)
    with torch.no_grad():
        torch.testing.assert_close(TokenLoss(chunk_bytes=SMALL_CHUNK)(out, labels), ref)
    frozen = HeadOutput(h, w.detach())
    gh, = torch.autograd.grad(TokenLoss(chunk_bytes=SMALL_CHUNK)(frozen, labels), (h,))
    gh_ref, = torch.autograd.grad(TokenLoss()(frozen.logits(), labels), (h,))
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_low_precision_close_to_unchunked(dtype):
    """bf16 takes the gradients in forward here; fp16 recomputes them in backward under the loss scale."""
    assert common.early_gradients(58, H, V, dtype, SMALL_CHUNK) == (dtype == torch.bfloat16)
    ids, pos, doc, labels = packed_batch(3)
    res = []
    for loss_fn, form in ((TokenLoss(0.2, chunk_bytes=SMALL_CHUNK), "chunked"), (TokenLoss(0.2), "logits")):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(2, 29, H, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
        out = HeadOutput(h, w)
        loss = loss_fn(out if form == "chunked" else out.logits(), labels)
        res.append(grads(loss * 1024.0, h, w))  # a loss scale, as fp16 training uses
    for x, y in zip(*res):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x.float(), y.float(), rtol=2e-2, atol=2e-2 * float(y.float().abs().max()))


def test_z_loss_matches_hand_computed_reference_on_packed_rows():
    """CE: token-weighted mean over the trained labels of the whole step; z-loss: weight x mean of
    max(logits)^2 over every position whose next token is in the same document, trained or not,
    over the whole step; the engine averages the micro-batch losses over grad accumulation."""
    zw, gas = 0.25, 3
    micro = [packed_batch(10 + m) for m in range(gas)]
    batches = [((ids, pos, doc), labels) for ids, pos, doc, labels in micro]
    heads = [head_output("normhead", seed=m) for m in range(gas)]
    # by hand, position by position
    ce_sum, n_ce, z_sum, n_z = 0.0, 0, 0.0, 0
    for (ids, pos, doc, labels), (out, _, _) in zip(micro, heads):
        logits = out.logits().detach().double()
        B, S, _ = logits.shape
        for b in range(B):
            for t in range(S):
                if labels[b, t] != -100:
                    ce_sum += float(torch.logsumexp(logits[b, t], 0) - logits[b, t, labels[b, t]])
                    n_ce += 1
                if t + 1 < S and doc[b, t] >= 0 and doc[b, t + 1] == doc[b, t]:
                    z_sum += float(logits[b, t].max()) ** 2
                    n_z += 1
    expected = ce_sum / n_ce + zw * z_sum / n_z
    assert z_positions(batches) == n_z
    assert n_z > n_ce  # untrained positions count for the z-loss
    loss_fn, plain = TokenLoss(zw, chunk_bytes=SMALL_CHUNK), TokenLoss(zw)
    step = with_normaliser(batches, gas / n_ce, gas / n_z, [loss_fn, plain])
    total = sum(loss_fn(out, lab) for (out, _, _), (_, lab) in zip(heads, step)) / gas
    torch.testing.assert_close(total.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    unchunked = sum(plain(out.logits(), lab) for (out, _, _), (_, lab) in zip(heads, step)) / gas
    torch.testing.assert_close(total, unchunked, rtol=1e-6, atol=0)


def test_way_is_chosen_by_size():
    # a few token chunks with a small head gradient: early; llama-3's vocabulary: many chunks, recompute
    assert common.early_gradients(512, 256, 8016, torch.float32)
    assert not common.early_gradients(2048, 512, 128256, torch.float32)
    assert not common.early_gradients(512, 4096, 8016, torch.bfloat16)  # V x H would outweigh the logits
    assert not common.early_gradients(512, 64, 2000, torch.float16)


def test_next_token_mask():
    doc = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [0, 0, 0, 0, 0, 0, 0]])
    assert next_token_mask(doc).tolist() == [[True, True, False, True, False, False, False],
                                             [True, True, True, True, True, True, False]]


def tiny_args(family: str, **kw):
    fam = get_family({"baichuan2": "baichuan"}.get(family, family))
    base = {"llama": dict(model_type="llama", vocab_size=V, hidden_size=H, intermediate_size=40, num_hidden_layers=1,
                          num_attention_heads=2),
            "bloom": dict(model_type="bloom", vocab_size=V, hidden_size=H, n_layer=1, n_head=2),
            "baichuan2": dict(model_type="baichuan", vocab_size=V, hidden_size=H, intermediate_size=40,
                              num_hidden_layers=1, num_attention_heads=2, z_loss_weight=0.1)}[family]
    return fam, fam.parse_config({**base, **kw})


@pytest.mark.parametrize("family,kw", [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("bloom", {}),
                                       ("baichuan2", {})])
def test_family_heads_chunked_equal_unchunked(family, kw, mode):
    """Through the families' real layer lists: every parameter's gradient (the tied matrix gets
    both its embedding and its head part) equals the unchunked loss's."""
    fam, args = tiny_args(family, **kw)
    ids, pos, doc, labels = packed_batch(4)
    z_scale = 0.02 if fam.loss_fn(args).z_loss_weight else None
    lab = with_normaliser([((ids, pos, doc), labels)], 0.05, z_scale)[0][1]
    results = []
    for logits in (False, True):
        torch.manual_seed(0)
        model = SequentialModel(fam.build_specs(args), logits=logits)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        loss_fn = fam.loss_fn(args)
        loss_fn.chunk_bytes = SMALL_CHUNK
        with_normaliser(None, 0.05, z_scale, [loss_fn])
        out = model((ids, pos, doc))
        assert isinstance(out, torch.Tensor) == logits
        loss = loss_fn(out, lab)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=0)
    assert set(ga) == set(gb)
    # The two differ only in the order of the head's fp32 sums (over V for the hidden state's gradient,
    # over the B*S tokens for the matrix's), which the layers below then carry back linearly (sums over
    # H). Each computed sum is within gamma_n * sum|terms| of the exact one (gamma_n = n u / (1 - n u),
    # u = 2^-24); with the terms of a parameter's gradient bounded by its largest entry, twice that
    # (two computations) bounds an element's difference, whatever the vector width of the CPU.
    n_terms = V + ids.numel() + H
    gamma = n_terms * 2.0 ** -24 / (1 - n_terms * 2.0 ** -24)
    for n in ga:
        atol = 2 * gamma * float(gb[n].abs().max())
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=atol, msg=lambda m: f"{n}: {m}")
