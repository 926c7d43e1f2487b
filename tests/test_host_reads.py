"""A micro-batch's forward and backward never wait for the host: no ``.item()``, ``.tolist()``,
``int()``/``float()``/``bool()`` of a tensor, no ``nonzero`` (its output size is data-dependent),
anywhere in a stage's layers, the attention kernel or the chunked loss, with or without activation
checkpointing; and the per-micro-batch tables (RoPE) are built once, not again in the recompute."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from models import common, get_family
from models.common import TokenLoss
from ppllm.engine import with_normaliser
from ppllm.pipeline import SequentialModel

pytestmark = pytest.mark.timeout(300)

#: every way a tensor's value reaches Python
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__float__,
         torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
         torch.Tensor.cpu, torch.Tensor.numpy, torch.argwhere, torch.masked_select, torch.Tensor.masked_select}


class CountHostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.reads.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


CONFIGS = {
    "llama": dict(model_type="mistral", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, sliding_window=40, rms_norm_eps=1e-6),
    "bloom": dict(model_type="bloom", vocab_size=300, hidden_size=64, n_layer=2, n_head=4),
    "baichuan2": dict(model_type="baichuan", vocab_size=300, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, z_loss_weight=0.1),
    "chatglm3": dict(model_type="chatglm", padded_vocab_size=300, hidden_size=64, ffn_hidden_size=96, num_layers=2,
                     num_attention_heads=4, kv_channels=16, multi_query_attention=True, multi_query_group_num=1,
                     add_qkv_bias=True),
}


def _batch(S=300):
    lengths = [90, 120, 60]
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((S - sum(lengths),), -1)])
    pos = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(S - sum(lengths), dtype=torch.long)])
    ids = torch.randint(0, 300, (1, S), generator=torch.Generator().manual_seed(0))
    labels = torch.where(doc[None] >= 0, torch.roll(ids, -1, 1), -100)
    return (ids, pos[None], doc[None]), labels


def _stage(family: str, grad_ckpt: bool):
    fam = get_family(CONFIGS[family]["model_type"])
    args = fam.parse_config(CONFIGS[family])
    torch.manual_seed(0)
    model = SequentialModel(fam.build_specs(args, "blockwise"), logits=False)
    if grad_ckpt:  # what DeepSpeed's activation checkpointing does: non-reentrant, per decoder layer, and
        # its recompute sees detached inputs (new tensor objects over the same storage), as here every call does
        for layer in model.layers:
            if isinstance(layer, fam.decoder_class):
                fwd = layer.forward
                layer.forward = lambda x, f=fwd: checkpoint(
                    lambda h, p, d: f((h, p.detach(), d.detach())), *x, use_reentrant=False)
    return fam, args, model


def _micro_batch(fam, args, model, count_builds=None):
    inputs, labels = _batch()
    loss_fn = fam.loss_fn(args)
    loss_fn.chunk_bytes = 64 * 4 * 300  # several chunks
    batch = with_normaliser([(inputs, labels)], 1 / 300, 1 / 280 if loss_fn.z_loss_weight else None, [loss_fn])
    inputs, labels = batch[0]
    with CountHostReads() as mode:
        loss = loss_fn(model(inputs), labels)
        loss.backward()
    return mode.reads


@pytest.mark.parametrize("grad_ckpt", [False, True])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_no_host_read_in_a_micro_batch(family, grad_ckpt, monkeypatch):
    fam, args, model = _stage(family, grad_ckpt)
    if grad_ckpt:
        assert any(getattr(layer.forward, "__name__", "") == "<lambda>" for layer in model.layers)
    builds = []
    original = common.RopeCache._build
    monkeypatch.setattr(common.RopeCache, "_build", lambda self, pos: builds.append(1) or original(self, pos))
    reads = _micro_batch(fam, args, model)
    assert reads == [], f"{family}: host reads in one micro-batch: {reads}"
    assert all(p.grad is not None for p in model.parameters())
    if family != "bloom":  # rope tables: once per micro-batch, shared by the layers and their recompute
        assert len(builds) == 1, builds


def test_the_counter_sees_a_host_read():
    """The plain-label loss (no step normaliser, outside the pipeline) counts its tokens on the host."""
    inputs, labels = _batch()
    h = torch.randn(1, 300, 8, requires_grad=True)
    w = torch.randn(300, 8, requires_grad=True)
    with CountHostReads() as mode:
        TokenLoss()(common.HeadOutput(h, w), labels).backward()
        torch.tensor([1, 0]).nonzero()
        float(torch.ones(()))
    assert mode.reads.count("nonzero") == 1 and len(mode.reads) == 3, mode.reads
