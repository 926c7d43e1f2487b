"""Pretraining windows, the pool that prepares a file, the continuous step stream, the eval pass,
the dry run's step count and data errors, and the ranks' agreement on a failure."""
import json
import os

import numpy as np
import pytest
import torch

from data.dataset import DataError, StepLoader, build_rows, prepare_file, split_windows
from data.templates import get_template
from data.tokenizer import load_tokenizer
from ppllm.tiny import sample_texts, train_sentencepiece
from tests.helpers import REPO, SHARED_ASSETS

LLAMA2 = os.path.join(SHARED_ASSETS, "tokenizers", "llama2")
WORDS = "the river ran fast beneath the middle arch of an old stone bridge while lanterns swayed".split()


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    return load_tokenizer(train_sentencepiece(sample_texts(f"{REPO}/data/samples/demo.json"),
                                              str(tmp_path_factory.mktemp("tok"))))


def _tokenizer(name, tiny_tok):
    if name == "tiny":
        return tiny_tok
    if not os.path.isdir(LLAMA2):
        pytest.skip(f"{LLAMA2} not present")
    return load_tokenizer(LLAMA2, "llama")


def long_text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(f"{w}{i % 97}" if i % 11 == 0 else w for i, w in enumerate(rng.choice(WORDS, size=n_words)))


@pytest.mark.parametrize("tok_name", ["tiny", "llama2"])
def test_long_document_every_token_trained_exactly_once_across_windows(tmp_path, tiny_tok, tok_name):
    """Each token of the document is the target of exactly one position, over all windows."""
    tok = _tokenizer(tok_name, tiny_tok)
    template = get_template("llama2", tok)  # BOS + text + EOS
    text = long_text(1500)
    full = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    short = "A short note about the quay."
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"type": "pretrain", "text": text}) + "\n" + json.dumps({"type": "pretrain", "text": short}))
    L = 128
    rows, stats = build_rows([str(path)], template, L, seed=1)
    assert stats.windowed == 1 and stats.truncated == 0 and stats.dropped == 0
    assert stats.windows == len(split_windows([0] * (len(full) - 1) + [-100], L)) >= len(full) // L
    src = rows.sources[0]
    windows = [i for i in range(len(src.lengths)) if src.lines[i] == 1]
    assert len(windows) == stats.windows
    ids = np.concatenate([src.doc(i)[0] for i in windows])
    labels = np.concatenate([src.doc(i)[1] for i in windows])
    assert ids.tolist() == full  # the windows hold the whole document, in order
    targets = labels[labels != -100].tolist()
    assert targets == full[1:]  # every token after BOS is a target once; BOS is never one
    at = 0
    for i in windows:
        n = int(src.lengths[i])
        assert n <= L
        w_labels = src.doc(i)[1]
        if at + n < len(full):  # the cut: the next window's first input is this window's last target
            assert w_labels[-1] == full[at + n]
        at += n
    # in the packed rows: positions restart per window and the trained tokens add up
    assert stats.trained_tokens == int((rows["labels"] != -100).sum()) == len(full) - 1 + len(tok.encode(short)) + 1
    for r in range(len(rows)):
        doc, pos = rows["doc_ids"][r], rows["position_ids"][r]
        for d in set(doc.tolist()) - {-1}:
            assert pos[doc == d].tolist() == list(range(int((doc == d).sum())))


def test_split_windows_leaves_out_a_trailing_window_with_nothing_to_train():
    labels = [5] * 8 + [-100]  # 9 tokens: the last (EOS) predicts nothing
    assert split_windows(labels, 4) == [4, 8]  # the EOS alone would be window 3; it is window 2's target
    assert split_windows([5] * 9 + [-100], 4) == [4, 8, 10]
    assert split_windows([5, -100], 4) == [2]


def _mixed_file(path, n, bad_every=0):
    rng = np.random.default_rng(3)
    lines = []
    for i in range(n):
        if bad_every and i % bad_every == 7:
            lines.append('{"type": "pretrain", "text": }' if i % 2 else '{"type": "poem", "text": "x"}')
            continue
        k = int(rng.integers(3, 400))
        if i % 3 == 0:
            rec = {"type": "instruct", "instruct": long_text(5, i), "output": long_text(k, i)}
        elif i % 3 == 1:
            rec = {"type": "conversation", "rounds": [["ask", long_text(6, i)], ["ans", long_text(k, i)]]}
        else:
            rec = {"type": "pretrain", "text": long_text(k, i)}
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "array"])
def test_pool_prepares_the_same_bytes_as_one_process(tmp_path, tiny_tok, fmt, monkeypatch):
    from data import records
    monkeypatch.setattr(records, "CHUNK", 37)  # many small chunks, finishing out of order in the pool
    monkeypatch.setattr(records, "CHUNK_BYTES", 5000)
    path = _mixed_file(tmp_path / "m.jsonl", 400, bad_every=50 if fmt == "jsonl" else 0)
    if fmt == "array":
        recs = [json.loads(x) for x in open(path) if x.strip()]
        path = str(tmp_path / "m.json")
        with open(path, "w") as f:
            json.dump(recs, f, indent=1)
    template = get_template("plain", tiny_tok)
    one = prepare_file(path, template, 96, cache=False, workers=1)
    many = prepare_file(path, template, 96, cache=False, workers=2)
    assert one.meta["workers"] == 1 and many.meta["workers"] == 2
    for name in ("tokens", "labels", "offsets", "kinds", "lines", "trained"):
        assert np.array_equal(getattr(one, name), getattr(many, name)), name
    drop = {"workers"}
    assert {k: v for k, v in one.meta.items() if k not in drop} == {k: v for k, v in many.meta.items() if k not in drop}
    assert one.meta["windowed"] > 0 and one.meta["truncated"] > 0
    if fmt == "jsonl":
        assert one.meta["n_errors"] == 8 and one.meta["errors"][0].startswith(f"{path}:8: ")


def test_memory_of_prepare_holds_no_corpus(tmp_path, tiny_tok):
    """The per-document arrays are compact arrays, not Python lists (flat memory: see the benchmark)."""
    from data import prepare
    path = _mixed_file(tmp_path / "m.jsonl", 200)
    import io
    meta, arrays = prepare._prepare_into(path, get_template("plain", tiny_tok), 96, "truncate", io.BytesIO(),
                                         io.BytesIO(), False, workers=1)
    assert arrays["offsets"].dtype == np.int64 and len(arrays["offsets"]) == len(arrays["kinds"]) + 1


def _rows(n, seq=4):
    return {k: np.arange(n * seq).reshape(n, seq) + 1 for k in ("input_ids", "position_ids", "doc_ids", "labels")}


def _first_cells(step):
    return [int(x) for (ids, _, _), _ in step for x in ids[:, 0]]


def test_five_rows_four_per_step_train_all_five_in_two_steps():
    rows = _rows(5)
    ld = StepLoader(rows, 2, 2, 0, 1, seed=0)
    assert ld.steps(1) == 2
    seen = _first_cells(ld.next_step()) + _first_cells(ld.next_step())
    assert len(seen) == 8 and set(seen[:5]) == {1 + 4 * i for i in range(5)}  # epoch 1 whole, then epoch 2
    # the same with two data-parallel ranks: the union of both ranks' rows
    a, b = StepLoader(rows, 1, 2, 0, 2, seed=0), StepLoader(rows, 1, 2, 1, 2, seed=0)
    assert a.steps(1) == b.steps(1) == 2
    s1 = [_first_cells(a.next_step()), _first_cells(b.next_step())]
    s2 = [_first_cells(a.next_step()), _first_cells(b.next_step())]
    assert not set(s1[0]) & set(s1[1])
    assert set(s1[0] + s1[1]) | set(s2[0] + s2[1]) == {1 + 4 * i for i in range(5)}


def test_four_samples_default_batch_one_step_and_uneven_ranks_agree(tmp_path, tiny_tok):
    path = tmp_path / "four.jsonl"
    path.write_text("\n".join(json.dumps({"type": "pretrain", "text": long_text(8, i)}) for i in range(4)))
    rows, stats = build_rows([str(path)], get_template("plain", tiny_tok), 1024)
    assert stats.rows == 1  # packing puts all four in one row
    ld = StepLoader(rows, 1, 4, 0, 1, seed=0)
    assert ld.steps(1) == 1 and ld.steps(1000) == 250
    step = ld.next_step()
    assert len(step) == 4 and all(int((lab != -100).sum()) == stats.trained_tokens for _, lab in step)
    # 7 rows over 3 ranks, 2 rows per rank and step: every rank runs the same steps, same shapes
    loaders = [StepLoader(_rows(7), 1, 2, r, 3, seed=4) for r in range(3)]
    assert {ld.steps(2) for ld in loaders} == {3}
    for _ in range(3):
        steps = [ld.next_step() for ld in loaders]
        assert {tuple(x[1].shape) for s in steps for x in s} == {(1, 4)}
        assert {len(s) for s in steps} == {2}


def test_resume_is_exact_inside_a_step_that_spans_two_epochs():
    rows = _rows(10)
    a = StepLoader(rows, 2, 2, 1, 2, seed=3)  # 8 rows per step: step 2 holds rows of epochs 1 and 2
    a.next_step()
    state = a.state_dict()
    assert state == {"position": 8, "rows": 10, "per_step": 8}
    expect = [a.next_step() for _ in range(3)]
    b = StepLoader(rows, 2, 2, 1, 2, seed=3)
    b.load_state_dict(json.loads(json.dumps(state)))  # as stored in the checkpoint
    got = [b.next_step() for _ in range(3)]
    for x, y in zip(expect, got):
        for (xi, xl), (yi, yl) in zip(x, y):
            assert torch.equal(xl, yl) and all(torch.equal(p, q) for p, q in zip(xi, yi))
    # the global stream: epoch e is the permutation from seed + e
    full = StepLoader(rows, 8, 1, 0, 1, seed=3).stream(0, 20)
    assert full[:10].tolist() == np.random.default_rng(3).permutation(10).tolist()
    assert full[10:].tolist() == np.random.default_rng(4).permutation(10).tolist()
    legacy = StepLoader(rows, 2, 2, 1, 2, seed=3)
    legacy.load_state_dict({"epoch": 2, "step_in_epoch": 1})  # a checkpoint written before the stream
    assert legacy.state_dict()["position"] == 28


def test_eval_pass_covers_every_row_once_with_masked_padding():
    rows = _rows(3)
    seen, pad_rows = [], 0
    for rank in range(2):
        ld = StepLoader(rows, 1, 2, rank, 2, seed=0, pad_id=0)  # 4 rows per step, 3 rows: one padding row
        assert ld.eval_steps == 1
        ld.next_step()
        before = ld.state_dict()
        for step in ld.one_pass():
            for (ids, pos, doc), labels in step:
                if (labels == -100).all():
                    pad_rows += 1
                    assert (doc == -1).all() and (ids == 0).all()
                else:
                    seen.append(int(ids[0, 0]))
        assert ld.state_dict() == before  # evaluation does not move the training position
    assert sorted(seen) == [1, 5, 9] and pad_rows == 1


def _dry_config(tmp_path, data, **extra):
    from ppllm import convert as cm
    from ppllm.tiny import make_llama
    tok = train_sentencepiece(sample_texts(f"{REPO}/data/samples/demo.json"), str(tmp_path / "tok"))
    make_llama(str(tmp_path / "hf"), 400, tokenizer_dir=tok, num_hidden_layers=2, hidden_size=32,
               intermediate_size=64)
    cm.hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), quiet=True)
    cfg = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
           "model_path": str(tmp_path / "pp"), "save_path": str(tmp_path / "out"), "data_path": str(data),
           "max_seq_len": 256, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4}
    cfg.update(extra)
    path = tmp_path / "c.yml"
    path.write_text(json.dumps(cfg))
    return path


def test_dry_run_counts_steps_and_fails_like_the_launch_on_eval_data(tmp_path, capsys):
    from ppllm.train import main
    data = tmp_path / "four.jsonl"
    data.write_text("\n".join(json.dumps({"type": "pretrain", "text": long_text(8, i)}) for i in range(4)))
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"type": "pretrain", "text": "fine"}\n{"type": "instruct", "instruct": "x"}\n')
    cfg = _dry_config(tmp_path, data, eval_data_path=str(data))
    assert main(str(cfg), [], dry=True) == 0
    out = capsys.readouterr().out
    assert "would train 1 optimizer steps: 1 pass(es) over 1 rows at 4 rows per step" in out
    assert "eval data: 4 samples" in out and "evaluation: 1 step(s) over 1 rows" in out
    assert main(str(cfg), ["n_epoches=10"], dry=True) == 0
    assert "would train 3 optimizer steps" in capsys.readouterr().out  # ceil(10 * 1 / 4)
    assert main(str(cfg), [f"eval_data_path={bad}"], dry=True) == 2
    out = capsys.readouterr().out
    assert f"error: eval data (eval_data_path): 1 bad sample(s)" in out and f"{bad}:2: " in out
    assert "would train" not in out
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"type": "instruct", "instruct": long_text(400), "output": "ok"}) + "\n")
    assert main(str(cfg), [f"data_path={empty}", "overlong=drop"], dry=True) == 2
    out = capsys.readouterr().out
    assert "error: no trainable samples in" in out and "1 longer than max_seq_len 256 and dropped" in out


def _agree_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    from ppllm import errors
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result = {"ok": errors.agree(lambda: rank * 10)}
    try:
        def block():
            if rank == 1:
                raise DataError("data.jsonl:3: field 'text' must be a non-empty string")
            return "fine"
        errors.agree(block)
    except errors.UserError as e:
        result["error"] = [type(e).__name__, str(e)]
    try:
        errors.agree(lambda: 1 / (rank - 2))  # a bug on rank 2 only: its peers stop too
    except ZeroDivisionError:
        result["bug"] = "own"
    except errors.PeerError as e:
        result["bug"] = str(e)
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.multiprocess
def test_agree_every_rank_learns_the_lowest_failing_ranks_message(tmp_path):
    import torch.multiprocessing as mp

    from tests.helpers import free_port
    mp.start_processes(_agree_worker, args=(3, free_port(), str(tmp_path)), nprocs=3, start_method="spawn")
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(3)]
    assert [g["ok"] for g in got] == [0, 10, 20]
    msg = "data.jsonl:3: field 'text' must be a non-empty string"
    assert [g["error"] for g in got] == [["PeerError", msg], ["DataError", msg], ["PeerError", msg]]
    assert got[2]["bug"] == "own" and got[0]["bug"] == got[1]["bug"] == "rank 2: ZeroDivisionError: division by zero"


@pytest.mark.parametrize("max_records,max_bytes", [(1, 10), (3, 50), (4096, 64), (4096, 1 << 20)])
def test_jsonl_chunks_cover_every_line_once_with_its_number(tmp_path, max_records, max_bytes):
    from data import records
    lines = [json.dumps({"type": "pretrain", "text": "x" * (i * 37 % 300 + 1)}) for i in range(40)]
    lines[5] = ""  # a blank line keeps its number
    lines[9] = json.dumps({"type": "pretrain", "text": "y" * 500})  # longer than a block
    p = tmp_path / "c.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())  # a BOM, no newline at the end
    chunks = list(records.record_chunks(str(p), max_records=max_records, max_bytes=max_bytes))
    assert chunks[0][0] == 0 and chunks[-1][1] == p.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    got = [(n, raw.decode()) for c in chunks for n, raw in records.chunk_records(str(p), c)]
    assert got == [(i + 1, text) for i, text in enumerate(lines) if text]
    assert all(len([1 for _ in records.chunk_records(str(p), c)]) <= max_records for c in chunks)


@pytest.mark.parametrize("template_name", ["plain", "llama2", "chatglm3", "baichuan2"])
def test_fast_pretraining_path_equals_the_general_encoder(tmp_path, tiny_tok, template_name, monkeypatch):
    """Pretraining documents skip the label lists (labels = shifted ids): same bytes as encode_parts."""
    from data import prepare
    tok = tiny_tok
    if template_name in ("chatglm3", "baichuan2"):
        folder = os.path.join(SHARED_ASSETS, "tokenizers", template_name)
        if not os.path.isdir(folder):
            pytest.skip(f"{folder} not present")
        tok = load_tokenizer(folder, {"chatglm3": "chatglm", "baichuan2": "baichuan"}[template_name])
    template = get_template(template_name, tok)
    assert prepare.pretrain_frame(template) is not None
    L = 40
    path = _mixed_file(tmp_path / "m.jsonl", 120)
    with open(path, "a") as f:  # documents around multiples of the window length (a lone last token)
        for k in range(1, 60):
            f.write(json.dumps({"type": "pretrain", "text": " ".join(["bridge"] * k)}) + "\n")
    fast = prepare_file(path, template, L, cache=False, workers=1)
    monkeypatch.setattr(prepare, "FAST_PRETRAIN", False)
    slow = prepare_file(path, template, L, cache=False, workers=1)
    for name in ("tokens", "labels", "offsets", "kinds", "lines", "trained"):
        assert np.array_equal(getattr(fast, name), getattr(slow, name)), name
    assert fast.meta == slow.meta and fast.meta["windowed"] > 10
