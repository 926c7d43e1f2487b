"""Attention backend selection and the varlen bookkeeping used by flash-attn."""
import torch

from models.common import SEQLENS, doc_causal_mask, set_attention_backend


def test_flash_falls_back_to_sdpa_with_one_notice_without_cuda():
    msg = set_attention_backend(True)
    if not torch.cuda.is_available():
        assert "falling back to SDPA" in msg
    assert set_attention_backend(False) == "attention: SDPA"


def test_cu_seqlens_split_rows_and_documents():
    doc = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    cu, max_len = SEQLENS.get(doc)
    assert cu.tolist() == [0, 3, 5, 6, 12] and max_len == 6


def test_mask_is_causal_and_block_diagonal():
    doc = torch.tensor([[0, 0, 1, 1]])
    m = doc_causal_mask(doc)[0, 0]
    assert m.tolist() == [[True, False, False, False], [True, True, False, False],
                          [False, False, True, False], [False, False, True, True]]
    w = doc_causal_mask(torch.zeros(1, 4, dtype=torch.long), window=2)[0, 0]
    assert w[3].tolist() == [False, False, True, True]
