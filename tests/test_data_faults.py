"""Every input byte is accounted for (issue 22, items 3 and 7): each record of a file is trained or
reported with FILE:LINE and counted; a file's layout (JSON array or JSON Lines) is decided from its
content; content after an array is an error; a bad record or a bad UTF-8 byte costs that record
only; a lone surrogate or 10,000-deep nesting is one line naming FILE:LINE, not a traceback, and
leaves no staging folder behind."""
import json
import os
import subprocess

import pytest
import yaml

from data.dataset import DataError, build_rows
from data.templates import get_template
from tests.helpers import PY, REPO, tiny_pipeline_model
from tests.test_data_templates import _bpe


def pre(text: str) -> str:
    return json.dumps({"type": "pretrain", "text": text})


@pytest.fixture(scope="module")
def template():
    return get_template("plain", _bpe(["<unk>", "<s>", "</s>", "<pad>"], eos="</s>", pad="<pad>"))


def lenient(path, template):
    """(samples trained, skipped per reason, the listed errors) with strict: false."""
    from data.prepare import load_sources
    src = load_sources([str(path)], template, 64, strict=False, cache=False)[0]
    return src.meta["samples"], src.meta["skipped"], src.meta["errors"]


def test_jsonl_whose_first_line_is_an_array_reads_every_line(tmp_path, template):
    p = tmp_path / "first_array.jsonl"
    p.write_text("[1, 2]\n" + pre("one") + "\n" + pre("two") + "\n")
    with pytest.raises(DataError) as e:
        build_rows([str(p)], template, 64, cache=False)
    assert "1 bad sample(s)" in str(e.value) and f"{p}:1: a sample must be a JSON object, got list" in str(e.value)
    samples, skipped, _ = lenient(p, template)
    assert samples == {"pretrain": 2} and skipped == {"not an object": 1}
    p.write_text("[" * 10000 + "]" * 10000 + "\n" + pre("one") + "\n" + pre("two") + "\n")  # too deep to parse
    samples, skipped, errors = lenient(p, template)
    assert samples == {"pretrain": 2} and skipped == {"too deeply nested": 1} and errors[0].startswith(f"{p}:1: ")


def test_content_after_an_array_is_an_error_with_its_line(tmp_path, template):
    p = tmp_path / "after.json"
    p.write_text("[\n  " + pre("one") + ",\n  " + pre("two") + "\n]\n" + pre("three") + "\n" + pre("four") + "\n")
    with pytest.raises(DataError) as e:
        build_rows([str(p)], template, 64, cache=False)
    assert f"{p}:5: content after the JSON array's closing ']'" in str(e.value), str(e.value)
    samples, skipped, errors = lenient(p, template)
    assert samples == {"pretrain": 2} and skipped == {"content after array": 1}
    assert errors[0].startswith(f"{p}:5: ")


def test_lenient_bad_record_in_an_array_skips_only_that_record(tmp_path, template):
    p = tmp_path / "arr.json"
    body = [pre("one"), '{"type": "pretrain" "text": "missing comma"}', pre("three"), '{"type": "pretrain", "text": }',
            pre("five"), '{"type": "pretrain", "text": "unclosed string}', pre("seven")]
    p.write_text("[\n" + ",\n".join(body) + "\n]\n")
    samples, skipped, errors = lenient(p, template)
    assert samples == {"pretrain": 4}, errors
    assert skipped == {"invalid JSON": 3}
    assert [e.split(": ")[0] for e in errors] == [f"{p}:3", f"{p}:5", f"{p}:7"]


def test_lenient_bad_utf8_in_an_array_skips_only_that_record(tmp_path, template):
    p = tmp_path / "utf8.json"
    p.write_bytes(b"[\n" + pre("one").encode() + b",\n" + b'{"type": "pretrain", "text": "caf\xe9"},\n' +
                  pre("three \u00e9\u6c34").encode() + b"\n]\n")
    with pytest.raises(DataError, match=rf"{p}:3: not valid UTF-8"):
        build_rows([str(p)], template, 64, cache=False)
    samples, skipped, errors = lenient(p, template)
    assert samples == {"pretrain": 2} and skipped == {"not UTF-8": 1} and errors[0].startswith(f"{p}:3: ")


DEEP = '{"type": "pretrain", "text": "x", "meta": ' + "[" * 10000 + "]" * 10000 + "}"
SURROGATE = '{"type": "pretrain", "text": "broken \\ud800 pair"}'


@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_surrogate_and_deep_nesting_are_counted_records(tmp_path, template, layout):
    lines = [pre("one"), SURROGATE, pre("three"), DEEP, pre("five")]
    p = tmp_path / f"faults.{'jsonl' if layout == 'jsonl' else 'json'}"
    p.write_text("\n".join(lines) + "\n" if layout == "jsonl" else "[\n" + ",\n".join(lines) + "\n]\n")
    first = 1 if layout == "jsonl" else 2
    with pytest.raises(DataError) as e:
        build_rows([str(p)], template, 64)
    msg = str(e.value)
    assert f"{p}:{first + 1}: " in msg and "surrogate" in msg
    assert f"{p}:{first + 3}: " in msg and "nested" in msg
    assert not [n for n in os.listdir(tmp_path / ".ppllm-cache") if ".tmp" in n]
    samples, skipped, _ = lenient(p, template)
    assert samples == {"pretrain": 3} and sum(skipped.values()) == 2


def test_dry_run_names_surrogate_and_nesting_in_one_line_each_and_leaves_no_staging(tmp_path):
    pp, _ = tiny_pipeline_model(tmp_path, ["a few words of text"])
    data = tmp_path / "faults.jsonl"
    data.write_text("\n".join([pre("one"), SURROGATE, DEEP, pre("four")]) + "\n")
    cfg = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
           "model_path": str(pp), "save_path": str(tmp_path / "out"), "data_path": str(data), "max_seq_len": 64,
           "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    p = subprocess.run([PY, "train_pp.py", "--config", str(path), "--dry-run"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    assert "error: 2 bad sample(s)" in p.stdout
    assert f"  {data}:2: " in p.stdout and f"  {data}:3: " in p.stdout
    assert not [n for n in os.listdir(tmp_path / ".ppllm-cache") if ".tmp" in n]
    p = subprocess.run([PY, "train_pp.py", "--config", str(path), "--dry-run", "--set", "strict=false"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "skipped 2 bad sample(s)" in p.stdout, p.stdout + p.stderr
    assert "pretrain=2" in p.stdout


def test_failed_preparation_leaves_no_staging_and_stale_staging_is_removed(tmp_path, template, monkeypatch):
    from data import prepare
    p = tmp_path / "c.jsonl"
    p.write_text(pre("one") + "\n" + pre("two") + "\n")
    cache = tmp_path / ".ppllm-cache"
    cache.mkdir()
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    entry = prepare._entry_prefix(str(p)) + "0123456789abcdef"
    (cache / f"{entry}.tmp{dead.pid}").mkdir()  # a killed run's (older naming)
    (cache / f"{entry}.tmp-{os.uname().nodename}-{dead.pid}").mkdir()
    (cache / f"{entry}.tmp-otherhost-1").mkdir()  # another host's: maybe running

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(prepare, "_prepare_into", boom)
    with pytest.raises(OSError):
        build_rows([str(p)], template, 64)
    assert sorted(n for n in os.listdir(cache) if ".tmp" in n) == [f"{entry}.tmp-otherhost-1"]
    monkeypatch.undo()
    rows, stats = build_rows([str(p)], template, 64)
    assert stats.samples == {"pretrain": 2}
