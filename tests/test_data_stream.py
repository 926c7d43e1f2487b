"""The stream: cache beside the data, packing, weights, lazy rows, sharding, resume, and a
packed row giving the same per-document logits as the documents run alone."""
import json
import os

import numpy as np
import pytest
import torch

from data import dataset, prepare
from data.dataset import StepLoader, build_rows, pack_lengths, source_weights
from data.templates import get_template
from tests.test_data_templates import _bpe

WORDS = "river mill bridge orchard lantern harbor meadow quay tide stone".split()


@pytest.fixture(scope="module")
def template():
    return get_template("plain", _bpe(["<unk>", "<s>", "</s>", "<pad>"], eos="</s>", pad="<pad>"))


def corpus(path, n, seed=0, jsonl=True):
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 40))))
        recs.append({"type": "pretrain", "text": words} if i % 2 else
                    {"type": "instruct", "instruct": f"Echo {i}", "output": words})
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in recs) if jsonl else json.dumps(recs))
    return str(path)


def test_packing_rows_are_clean(tmp_path, template):
    rows, stats = build_rows([corpus(tmp_path / "a.jsonl", 120)], template, 512, seed=1)
    assert stats.rows < stats.docs and stats.efficiency > 0.9 > stats.padded_efficiency
    assert stats.tokens == int((rows["doc_ids"] >= 0).sum())
    assert stats.trained_tokens == int((rows["labels"] != -100).sum())
    for r in range(stats.rows):
        doc, pos, lab, ids = rows["doc_ids"][r], rows["position_ids"][r], rows["labels"][r], rows["input_ids"][r]
        for d in set(doc.tolist()) - {-1}:
            w = np.where(doc == d)[0]
            assert pos[w].tolist() == list(range(len(w)))
            assert lab[w[-1]] == -100  # no label reaches into the next document
            inner = w[:-1]
            trained = inner[lab[inner] != -100]
            assert (lab[trained] == ids[trained + 1]).all()
        assert (lab[doc == -1] == -100).all()
    _, s2 = build_rows([corpus(tmp_path / "a.jsonl", 120)], template, 512, packing=False)
    assert s2.rows == s2.docs == stats.docs and s2.trained_tokens == stats.trained_tokens


def test_best_fit_packing_fills_rows():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.0, 0.9, 4000).astype(int), 8, 2048)
    rows = pack_lengths(lengths, 2048)
    assert sorted(i for r in rows for i in r) == list(range(4000))
    assert max(sum(lengths[r]) for r in rows) <= 2048
    assert lengths.sum() / (len(rows) * 2048) > 0.97


def test_cache_reused_and_invalidated(tmp_path, template, monkeypatch):
    path = corpus(tmp_path / "c.jsonl", 30)
    _, s1 = build_rows([path], template, 64)
    assert any(n.startswith("c.jsonl.") for n in os.listdir(tmp_path / ".ppllm-cache"))
    calls = []
    real = prepare._prepare_into
    monkeypatch.setattr(prepare, "_prepare_into", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, s2 = build_rows([path], template, 64)
    assert not calls and s2.tokens == s1.tokens  # memory-mapped from the cache
    corpus(tmp_path / "c.jsonl", 31)
    _, s3 = build_rows([path], template, 64)
    assert calls and sum(s3.samples.values()) == 31
    caches = [n for n in os.listdir(tmp_path / ".ppllm-cache") if not n.endswith(".lock")]
    assert len(caches) == 1  # the stale version was removed


def test_weights_mix_sources(tmp_path, template):
    a, b = corpus(tmp_path / "a.jsonl", 40, 1), corpus(tmp_path / "b.json", 40, 2, jsonl=False)
    _, s = build_rows([a, b], template, 512, weights=[2.0, 0.5])  # no windows: one document per sample
    assert s.sources == {a: 80, b: 20}
    assert source_weights([str(tmp_path / "*.jsonl"), b], [1.5, 1.0]) == [1.5, 1.0]
    with pytest.raises(dataset.DataError, match="one weight per data_path entry"):
        source_weights([a, b], [1.0])


def test_lazy_loader_shards_disjoint_equal_and_resumes(tmp_path, template):
    rows, stats = build_rows([corpus(tmp_path / "d.jsonl", 200)], template, 64, seed=3)
    full_ids = rows["input_ids"]
    seen = []
    for rank in range(2):
        ld = StepLoader(rows, 2, 2, rank, 2, seed=9)
        whole = ld.n // ld.per_step  # the steps that lie inside the first epoch
        got = [b[0][0] for _ in range(whole) for b in ld.next_step()]
        seen.append({bytes(r.numpy().tobytes()) for t in got for r in t})
        assert sum(len(t) for t in got) == whole * 4
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] <= {bytes(r.tobytes()) for r in full_ids}
    a = StepLoader(rows, 2, 2, 0, 2, seed=9)
    for _ in range(a.steps_per_epoch + 1):  # into the second epoch
        a.next_step()
    state = a.state_dict()
    expect = a.next_step()
    b = StepLoader(rows, 2, 2, 0, 2, seed=9)
    b.load_state_dict(state)
    got = b.next_step()
    assert all(torch.equal(x[1], y[1]) and torch.equal(x[0][0], y[0][0]) for x, y in zip(expect, got))


def test_packed_row_logits_match_documents_alone(tmp_path, template):
    """Packing is invisible to the model: positions restart and attention stays in the document."""
    from models import get_family
    from ppllm.pipeline import SequentialModel
    fam = get_family("llama")
    args = fam.parse_config({"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False})
    torch.manual_seed(0)
    model = SequentialModel(fam.build_specs(args)).eval()
    rows, stats = build_rows([corpus(tmp_path / "e.jsonl", 12)], template, 96, seed=0)
    r = int(np.argmax([len(set(d.tolist()) - {-1}) for d in rows["doc_ids"]]))
    ids, pos, doc = (torch.from_numpy(rows[k][r:r + 1]) for k in ("input_ids", "position_ids", "doc_ids"))
    assert len(set(doc[0].tolist()) - {-1}) >= 2
    with torch.no_grad():
        packed = model((ids, pos, doc))
        for d in set(doc[0].tolist()) - {-1}:
            w = (doc[0] == d).nonzero().flatten()
            alone = model((ids[:, w], torch.arange(len(w))[None], torch.zeros(1, len(w), dtype=torch.long)))
            assert (packed[0, w] - alone[0]).abs().max().item() < 1e-5
