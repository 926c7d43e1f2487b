"""Attention backend selection, the varlen bookkeeping used by flash-attn, and the per-model caches."""
import torch

from models import get_family
from models.common import BACKEND_TEXT, StageContext, attention_backend, doc_causal_mask


def test_flash_falls_back_to_sdpa_with_one_notice_without_cuda():
    name, msg = attention_backend(True)
    if not torch.cuda.is_available():
        assert name == "blockwise" and "no CUDA device; attention: blockwise" in msg
    assert attention_backend(False)[0] == "blockwise" and "memory linear in S" in attention_backend(False)[1]
    assert attention_backend(True, "dense")[0] in ("flash", "dense")
    assert attention_backend(False, "dense") == ("dense", "attention: " + BACKEND_TEXT["dense"])


def test_cu_seqlens_split_rows_and_documents():
    doc = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    cu, max_len = StageContext().cu_seqlens(doc)
    assert cu.tolist() == [0, 3, 5, 6, 12] and max_len == 6


def test_mask_is_causal_and_block_diagonal():
    doc = torch.tensor([[0, 0, 1, 1]])
    m = doc_causal_mask(doc)[0, 0]
    assert m.tolist() == [[True, False, False, False], [True, True, False, False],
                          [False, False, True, False], [False, False, True, True]]
    w = doc_causal_mask(torch.zeros(1, 4, dtype=torch.long), window=2)[0, 0]
    assert w[3].tolist() == [False, False, True, True]


def test_caches_are_per_model_and_per_micro_batch():
    ctx = StageContext()
    doc = torch.zeros(1, 4, dtype=torch.long)
    assert ctx.mask(doc) is ctx.mask(doc)  # shared by the layers of a micro-batch
    assert ctx.mask(doc.clone()) is not ctx.mask(doc)  # a new micro-batch builds its own
    assert ctx.mask(doc.detach()) is ctx.mask(doc)  # checkpoint recompute detaches: same storage, same value
    later = doc.clone()
    ctx.mask(later)
    assert ctx.mask(doc.detach()) is ctx.mask(doc)  # still cached after a later micro-batch (1F1B)
    doc2 = doc.clone()
    first = ctx.mask(doc2)
    doc2[0, 0] = 1  # written in place: a new version, a new value
    assert ctx.mask(doc2) is not first and ctx.mask(doc2)[0, 0, 1, 0].item() is False
    assert ctx.mask(doc, 4096) is ctx.mask(doc, 4096)  # equal windows compare by value
    assert StageContext().mask(doc) is not ctx.mask(doc)  # two models never share state
    fam = get_family("llama")
    args = fam.parse_config({"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                             "num_hidden_layers": 2, "num_attention_heads": 2})
    specs = fam.build_specs(args, "dense")
    contexts = {id(s.module_args[1]) for s in specs[1:-2]}
    assert len(contexts) == 1, "the decoder layers of one model share one StageContext"
    assert id(fam.build_specs(args)[1].module_args[1]) not in contexts


def test_caches_work_in_inference_mode():
    ctx = StageContext()
    with torch.inference_mode():
        doc = torch.zeros(1, 4, dtype=torch.long)
        assert ctx.mask(doc) is ctx.mask(doc)
