"""Data path of the foundation slice: rendering, labels, packing, sharding, file errors."""
import json

import numpy as np
import pytest

from data.dataset import DataError, StepLoader, build_rows, read_records
from data.templates import get_template
from data.tokenizer import load_tokenizer
from ppllm.tiny import sample_texts, train_sentencepiece
from tests.helpers import REPO

DEMO = f"{REPO}/data/samples/demo.json"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(train_sentencepiece(sample_texts(DEMO), str(tmp_path_factory.mktemp("tok"))))


def write(tmp_path, records, jsonl=False):
    p = tmp_path / ("d.jsonl" if jsonl else "d.json")
    p.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records, indent=1))
    return str(p)


def test_pretrain_all_tokens_trained_with_bos_and_single_eos(tmp_path, tok):
    t = get_template("llama2", tok)
    rows, stats = build_rows([write(tmp_path, [{"type": "pretrain", "text": "The old bridge"}])], t, 32)
    ids = tok.encode("The old bridge")
    n = len(ids) + 2
    assert rows["input_ids"][0, :n].tolist() == [tok.bos_id] + ids + [tok.eos_id]
    assert rows["labels"][0, :n - 1].tolist() == ids + [tok.eos_id]
    assert (rows["labels"][0, n - 1:] == -100).all()
    assert stats.samples == {"pretrain": 1} and stats.trained_tokens == len(ids) + 1


def test_instruct_trains_only_output_and_one_eos(tmp_path, tok):
    t = get_template("llama2", tok)
    rec = {"type": "instruct", "instruct": "Add the numbers.", "input": "1 and 2", "output": "3"}
    rows, _ = build_rows([write(tmp_path, [rec])], t, 64)
    prompt = t.prompt_ids(t.instruct_prompt("Add the numbers.", "1 and 2"))
    out = tok.encode("3 ") + [tok.eos_id]  # Meta's llama-2-chat: " {answer} " then </s>
    n = len(prompt) + len(out)
    assert rows["input_ids"][0, :n].tolist() == prompt + out
    lab = rows["labels"][0]
    assert (lab[:len(prompt) - 1] == -100).all()
    assert lab[len(prompt) - 1:n - 1].tolist() == out
    assert (lab[n - 1:] == -100).all()
    assert list(rows["input_ids"][0, :n]).count(tok.eos_id) == 1


def test_packing_restarts_positions_and_never_labels_across_documents(tmp_path, tok):
    recs = [{"type": "pretrain", "text": f"sample number {i} about the orchard"} for i in range(12)]
    rows, stats = build_rows([write(tmp_path, recs)], get_template("plain", tok), 64)
    assert stats.rows < 12 and stats.efficiency > 0.5
    for r in range(stats.rows):
        doc, pos, lab = rows["doc_ids"][r], rows["position_ids"][r], rows["labels"][r]
        for d in set(doc.tolist()) - {-1}:
            where = np.where(doc == d)[0]
            assert pos[where].tolist() == list(range(len(where)))
            assert lab[where[-1]] == -100  # last token of a document predicts nothing
    unpacked, s2 = build_rows([write(tmp_path, recs)], get_template("plain", tok), 64, packing=False)
    assert s2.rows == 12 and s2.trained_tokens == stats.trained_tokens


def test_overlong_pretrain_windows_conversations_truncate_or_drop(tmp_path, tok):
    long_text = " ".join(["orchard"] * 80)
    recs = [{"type": "pretrain", "text": long_text}, {"type": "pretrain", "text": "short"},
            {"type": "instruct", "instruct": "Say", "output": long_text}]
    for mode in ("truncate", "drop"):
        rows, s = build_rows([write(tmp_path, recs)], get_template("plain", tok), 64, overlong=mode)
        # the long pretraining text is windowed in both modes: nothing of it is lost
        n_long = len(tok.encode(long_text)) + 1  # text + EOS are trained
        assert s.windowed == 1 and s.windows == -(-(n_long + 1) // 64)
        if mode == "truncate":
            assert s.truncated == 1 and s.dropped == 0 and s.rows >= s.windows
        else:
            assert s.truncated == 0 and s.dropped == 1
        assert sum(s.samples.values()) == 3


def test_jsonl_and_array_line_numbers(tmp_path):
    p = write(tmp_path, [{"type": "pretrain", "text": "a"}, {"type": "pretrain", "text": "b"}])
    assert [n for n, _ in read_records(p)] == [2, 6]
    p = write(tmp_path, [{"type": "pretrain", "text": "a"}, {"type": "pretrain", "text": "b"}], jsonl=True)
    assert [n for n, _ in read_records(p)] == [1, 2]


@pytest.mark.parametrize("content,needle", [
    ('{"type": "pretrain", "text": "a"}\n{"type": oops}\n', ":2: invalid JSON"),
    ('{"type": "pretrain", "text": "a"}\n[1, 2]\n', ":2: a sample must be a JSON object"),
    ('{"type": "poem", "text": "a"}\n', ":1: unknown or missing 'type' 'poem'"),
    ('{"type": "instruct", "instruct": "x"}\n', ":1: field 'output' must be a non-empty string"),
    ('{"type": "pretrain", "text": ""}\n', ":1: field 'text' must be a non-empty string"),
])
def test_bad_records_name_file_and_line(tmp_path, tok, content, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataError) as e:
        build_rows([str(p)], get_template("plain", tok), 32)
    assert f"{p}{needle}" in str(e.value)


def test_non_utf8(tmp_path, tok):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"type": "pretrain", "text": "a"}\n{"type": "pretrain", "text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8"):
        build_rows([str(p)], get_template("plain", tok), 32)


def test_step_loader_shards_disjoint_deterministic_and_resumable():
    n = 40
    rows = {k: np.arange(n * 4).reshape(n, 4) for k in ("input_ids", "position_ids", "doc_ids", "labels")}
    a = StepLoader(rows, 2, 3, 0, 2, seed=5)
    b = StepLoader(rows, 2, 3, 1, 2, seed=5)
    assert a.steps_per_epoch == b.steps_per_epoch == 4  # ceil(40 / 12): the 4th step reaches into epoch 2
    seen_a = {int(x[0][0][r, 0]) for _ in range(3) for x in a.next_step() for r in range(2)}
    seen_b = {int(x[0][0][r, 0]) for _ in range(3) for x in b.next_step() for r in range(2)}
    assert not seen_a & seen_b and len(seen_a) == len(seen_b) == 18
    c = StepLoader(rows, 2, 3, 0, 2, seed=5)
    c.next_step()
    state = c.state_dict()
    expect = c.next_step()
    d = StepLoader(rows, 2, 3, 0, 2, seed=5)
    d.load_state_dict(state)
    got = d.next_step()
    assert all((x[1] == y[1]).all() for x, y in zip(expect, got))
    # a batch larger than the data still trains: the step takes the rows of several epochs
    big = StepLoader(rows, 8, 8, 0, 2, seed=0)
    assert big.steps_per_epoch == 1 and big.steps(3) == 1 and big.steps(4) == 2  # ceil(passes * 40 / 128)
    step = big.next_step()
    assert len(step) == 8 and all(x[1].shape == (8, 4) for x in step)
    with pytest.raises(DataError, match="no rows"):
        StepLoader({k: v[:0] for k, v in rows.items()}, 1, 1, 0, 1, seed=0)
