"""Every sample is checked before training: FILE:LINE messages, strict and lenient modes, CLI."""
import json
import os

import pytest

from data.dataset import DataError, build_rows, iter_records, RecordError
from data.templates import get_template
from tests.helpers import REPO
from tests.test_data_templates import _bpe

GOOD = {"type": "conversation", "rounds": [["ask", "Hi"], ["ans", "Hello"]]}
ACT = {"inner_thought": "t", "api_name": "f", "api_param": "{\"a\": 1}", "api_res": "r"}


def api(**change):
    act = dict(ACT, **change)
    return json.dumps({"type": "conver_has_api", "api_desc": "f: a tool",
                       "rounds": [["ask", "q"], ["ans-api", {"actions": [act], "ans": "done"}]]})


# (line content, expected message fragment, reason counted with strict: false)
BAD = [
    ('{"type": "pretrain", "text": oops}', "invalid JSON", "invalid JSON"),
    ('[1, 2]', "a sample must be a JSON object, got list", "not an object"),
    ('"just text"', "a sample must be a JSON object, got str", "not an object"),
    ('{"content": "no type, no text"}', "unknown or missing 'type' None", "missing type"),
    ('{"type": "poem", "text": "x"}', "unknown or missing 'type' 'poem'", "unknown type"),
    ('{"type": "pretrain"}', "field 'text' must be a non-empty string (it is missing)", "missing field"),
    ('{"type": "pretrain", "text": "   "}', "field 'text' must be a non-empty string (it is empty)", "empty field"),
    ('{"type": "pretrain", "text": 42}', "field 'text' must be a non-empty string, got int", "wrong field type"),
    ('{"type": "instruct", "instruct": "x", "input": 3, "output": "y"}', "field 'input' must be a string",
     "wrong field type"),
    ('{"type": "instruct", "instruct": "x"}', "field 'output' must be a non-empty string", "missing field"),
    ('{"type": "conversation", "rounds": []}', "field 'rounds' must be a non-empty list", "bad rounds"),
    ('{"type": "conversation", "rounds": "hi"}', "field 'rounds' must be a non-empty list", "bad rounds"),
    ('{"type": "conversation", "rounds": [["ask"]]}', "round 1 must be a [role, text] pair", "bad rounds"),
    ('{"type": "conversation", "rounds": [["ask", "a"], ["bot", "b"]]}', "round 2: unknown role 'bot'",
     "unknown role"),
    ('{"type": "conversation", "rounds": [["ask", "a"], ["ans-api", {"actions": [], "ans": "b"}]]}',
     "ans-api is only allowed in conver_has_api", "unknown role"),
    ('{"type": "conversation", "rounds": [["ask", "a"], ["ask", "b"]]}', "no 'ans' round: nothing to train on",
     "nothing to train"),
    ('{"type": "conversation", "rounds": [["ans", "a"], ["ask", "b"]]}', "a conversation starts with 'ask'",
     "bad round order"),
    ('{"type": "conversation", "rounds": [["ask", "a"], ["ans", ""]]}', "round 2 (ans): the text must be a non-empty",
     "empty field"),
    (api(api_param={"a": 1}), "api_param must be a JSON string", "api_param not a JSON string"),
    (api(api_param="{a: 1"), "api_param is not valid JSON", "api_param not a JSON string"),
    (api(api_name=""), "round 2 action 1.api_name must be a non-empty string", "empty field"),
    (api(api_res=None), "round 2 action 1.api_res must be a string", "wrong field type"),
    ('{"type": "conver_has_api", "rounds": [["ask", "a"], ["ans", "b"]]}', "field 'api_desc' must be a non-empty",
     "missing field"),
    ('{"type": "conver_has_api", "api_desc": "d", "rounds": [["ask", "a"], ["ans-api", "call"]]}',
     "an ans-api turn must be an object", "bad api action"),
    ('{"type": "ref_qa", "rounds": [["ask", "a"], ["ans", "b"]]}', "field 'reference' must be a non-empty",
     "missing field"),
]


@pytest.fixture(scope="module")
def template():
    return get_template("plain", _bpe(["<unk>", "<s>", "</s>", "<pad>"], eos="</s>", pad="<pad>"))


def test_at_least_fifteen_kinds():
    assert len({msg for _, msg, _ in BAD}) >= 15


def test_strict_lists_every_bad_line(tmp_path, template):
    p = tmp_path / "bad.jsonl"
    lines = [json.dumps(GOOD)] + [c for c, _, _ in BAD] + [json.dumps(GOOD)]
    p.write_bytes(("\n".join(lines) + "\n").encode() + b'{"type": "pretrain", "text": "\xff"}\n')
    with pytest.raises(DataError) as e:
        build_rows([str(p)], template, 64, cache=False)
    msg = str(e.value)
    assert f"{len(BAD) + 1} bad sample(s)" in msg
    for i, (_, needle, _) in enumerate(BAD):
        assert f"{p}:{i + 2}: " in msg and needle in msg.split(f"{p}:{i + 2}: ")[1].split("\n")[0], needle
    assert f"{p}:{len(BAD) + 3}: not valid UTF-8" in msg


def test_lenient_skips_and_counts_per_reason(tmp_path, template):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join([json.dumps(GOOD)] + [c for c, _, _ in BAD]) + "\n")
    rows, stats = build_rows([str(p)], template, 64, strict=False)
    expect = {}
    for _, _, reason in BAD:
        expect[reason] = expect.get(reason, 0) + 1
    assert stats.skipped == expect
    assert stats.samples == {"conversation": 1} and stats.rows == 1


def test_json_array_errors_name_the_line_where_the_object_starts(tmp_path, template):
    p = tmp_path / "arr.json"
    p.write_text('[\n  {"type": "pretrain", "text": "a"},\n  {"type": "pretrain",\n   "text": ""},\n'
                 '  {"type": "instruct", "instruct": "x", "output": "y"}\n]\n')
    with pytest.raises(DataError, match=r"arr.json:3: field 'text'"):
        build_rows([str(p)], template, 64, cache=False)
    p.write_text('[\n  {"type": "pretrain", "text": "a"},\n  {"type": "pretrain" "text": "b"}\n]')
    with pytest.raises(DataError, match=r"arr.json:3: invalid JSON"):
        build_rows([str(p)], template, 64, cache=False)
    p.write_text('[{"type": "pretrain", "text": "a"},\n')
    with pytest.raises(DataError, match=r"unterminated JSON array|invalid JSON"):
        build_rows([str(p)], template, 64, cache=False)


def test_array_streams_through_small_windows(tmp_path):
    """Objects that straddle read blocks and multi-byte characters at block ends."""
    from data import records
    recs = [{"type": "pretrain", "text": "é水" * (i % 7 + 1)} for i in range(60)]
    p = tmp_path / "big.json"
    p.write_text(json.dumps(recs, indent=2, ensure_ascii=False))
    with open(p, "rb") as f:
        got = list(records._iter_array(f, None, block=37))
    assert [o for _, o in got] == recs
    assert [n for n, _ in got][:2] == [2, 6]
    assert all(not isinstance(o, RecordError) for _, o in iter_records(str(p)))


def test_dry_run_cli_mixed_ok_and_bad_file_lists_every_line(tmp_path, capsys):
    """--dry-run: a file of all five types counts each; one problem per line exits non-zero."""
    from ppllm import convert as cm
    from ppllm.tiny import make_llama
    from ppllm.train import main
    tok = _bpe(["<unk>", "<s>", "</s>", "<pad>"], eos="</s>", pad="<pad>")
    tok.hf.save_pretrained(str(tmp_path / "tok"))
    make_llama(str(tmp_path / "hf"), 300, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    cm.hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), quiet=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(c for c, _, _ in BAD[:6]) + "\n")
    cfg = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
           "model_path": str(tmp_path / "pp"), "tokenizer_path": str(tmp_path / "tok"),
           "save_path": str(tmp_path / "out"), "template": "plain",
           "data_path": os.path.join(REPO, "data", "samples", "mixed.jsonl"), "max_seq_len": 512,
           "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    path = tmp_path / "c.yml"
    path.write_text(json.dumps(cfg))
    assert main(str(path), [], dry=True, show_samples=2) == 0
    out = capsys.readouterr().out
    for kind in ("pretrain=1", "instruct=2", "conversation=1", "conver_has_api=1", "ref_qa=1", "packing efficiency",
                 "== sample 2:", "«"):
        assert kind in out, kind
    assert main(str(path), [f"data_path={bad}"], dry=True) != 0
    out = capsys.readouterr().out
    for line in range(1, 7):
        assert f"{bad}:{line}: " in out
