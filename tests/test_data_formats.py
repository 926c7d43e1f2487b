"""Corpora as they ship (issue 21): bare `text` records, compressed JSON (by content, not by name),
Parquet, datasets' save_to_disk Arrow folders, globs over a mix, column mappings; errors with their
place (FILE:LINE, FILE:ROWGROUP:ROW, FILE:ROW); a file that cannot be decoded in one line naming the
format tried; one cache entry for concurrent preparers; `python -m ppllm.prepare --share K/N`."""
import bz2
import gzip
import json
import lzma
import os
import subprocess
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard

from data.dataset import DataError, build_rows, prepare_file
from data.templates import get_template
from ppllm.config import data_path_fields, expand_data_paths
from tests.helpers import PY, REPO, tiny_pipeline_model
from tests.test_data_templates import _bpe

TEXTS = [f"document {i}: the tide came in over the old quay and the boats rose {i % 7} feet" for i in range(40)]


@pytest.fixture(scope="module")
def template():
    return get_template("plain", _bpe(["<unk>", "<s>", "</s>", "<pad>"], eos="</s>", pad="<pad>"))


def jsonl(texts, key="text", extra=True) -> bytes:
    return "".join(json.dumps({"id": i, key: t, "url": f"https://x/{i}"} if extra else {key: t}) + "\n"
                   for i, t in enumerate(texts)).encode()


def tokens(path, template, **kw):
    src = prepare_file(str(path), template, 64, cache=False, **kw)
    return src.tokens.tolist(), src.labels.tolist(), src.meta["samples"], src.meta["n_errors"]


def write_parquet(path, texts, column="text", row_group_size=16):
    table = pa.table({"id": list(range(len(texts))), column: texts})
    pq.write_table(table, str(path), row_group_size=row_group_size)


def write_arrow_folder(folder, texts, column="text", files=2):
    """The layout datasets' Dataset.save_to_disk writes: IPC stream files, state.json, dataset_info.json."""
    os.makedirs(folder)
    names, per = [], -(-len(texts) // files)
    for k in range(files):
        name = f"data-{k:05d}-of-{files:05d}.arrow"
        part = pa.table({column: texts[k * per:(k + 1) * per]})
        with pa.OSFile(os.path.join(folder, name), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as w:
            for batch in part.to_batches(max_chunksize=7):
                w.write_batch(batch)
        names.append({"filename": name})
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"_data_files": names, "_fingerprint": "0", "_format_type": None, "_split": "train"}, f)
    with open(os.path.join(folder, "dataset_info.json"), "w") as f:
        json.dump({"features": {column: {"dtype": "string", "_type": "Value"}}}, f)


def test_bare_text_records_are_pretraining_documents(tmp_path, template):
    p = tmp_path / "web.jsonl"
    p.write_bytes(jsonl(TEXTS))
    rows, stats = build_rows([str(p)], template, 64, cache=False)
    assert stats.samples == {"pretrain": len(TEXTS)} and not stats.skipped
    typed = tmp_path / "typed.jsonl"
    typed.write_text("".join(json.dumps({"type": "pretrain", "text": t}) + "\n" for t in TEXTS))
    assert tokens(p, template)[:2] == tokens(typed, template)[:2]


@pytest.mark.parametrize("codec", ["gzip", "zstd", "bzip2", "xz"])
@pytest.mark.parametrize("layout", ["lines", "array"])
def test_compressed_json_is_recognised_by_content(tmp_path, template, codec, layout):
    raw = jsonl(TEXTS) if layout == "lines" else json.dumps([{"text": t} for t in TEXTS], indent=1).encode()
    plain = tmp_path / "plain.json"
    plain.write_bytes(raw)
    pack = {"gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress, "bzip2": bz2.compress,
            "xz": lzma.compress}[codec]
    packed = tmp_path / "corpus.jsonl.gz"  # the suffix is not what decides: the content is
    packed.write_bytes(pack(raw))
    want = tokens(plain, template)
    assert tokens(packed, template) == want
    assert tokens(packed, template, workers=2) == want


def test_compressed_malformed_record_keeps_its_line_and_truncation_is_one_line(tmp_path, template):
    lines = jsonl(TEXTS[:5]).decode().splitlines()
    lines[3] = '{"text": '
    p = tmp_path / "c.jsonl.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(DataError, match=rf"{p}:4: invalid JSON"):
        build_rows([str(p)], template, 64, cache=False)
    g = tmp_path / "cut.jsonl.gz"
    g.write_bytes(gzip.compress(jsonl(TEXTS * 50))[:-300])
    with pytest.raises(DataError) as e:
        build_rows([str(g)], template, 64)
    msg = str(e.value)
    assert msg.startswith(f"{g}: cannot be read as JSON Lines / JSON array compressed with gzip") and "\n" not in msg
    assert not [n for n in os.listdir(tmp_path / ".ppllm-cache") if ".tmp" in n]


def test_parquet_reads_like_json_lines_and_names_rowgroup_and_row(tmp_path, template):
    p = tmp_path / "web.parquet"
    write_parquet(p, TEXTS, row_group_size=16)
    assert pq.ParquetFile(str(p)).num_row_groups == 3
    j = tmp_path / "web.jsonl"
    j.write_bytes(jsonl(TEXTS))
    assert tokens(p, template)[:2] == tokens(j, template)[:2]
    assert tokens(p, template, workers=2)[:2] == tokens(j, template)[:2]
    bad = list(TEXTS)
    bad[18] = "   "  # row group 1, row 2
    write_parquet(p, bad, row_group_size=16)
    with pytest.raises(DataError, match=rf"{p}:1:2: field 'text' must be a non-empty string \(it is empty\)"):
        build_rows([str(p)], template, 64, cache=False)
    rows, stats = build_rows([str(p)], template, 64, cache=False, strict=False)
    assert stats.samples == {"pretrain": 39} and stats.skipped == {"empty field": 1}


def test_unknown_binary_file_is_one_line(tmp_path, template):
    p = tmp_path / "corpus.jsonl"
    p.write_bytes(b"\x04\x22\x4d\x18" + bytes(range(256)) * 4)  # an lz4 frame: not a format read here
    with pytest.raises(DataError) as e:
        build_rows([str(p)], template, 64)
    assert str(e.value).startswith(f"{p}: binary content") and "\n" not in str(e.value)


def test_truncated_parquet_is_one_line_naming_the_format(tmp_path, template):
    p = tmp_path / "cut.parquet"
    write_parquet(p, TEXTS)
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError) as e:
        build_rows([str(p)], template, 64)
    assert str(e.value).startswith(f"{p}: cannot be read as Parquet") and "\n" not in str(e.value)
    assert not [n for n in os.listdir(tmp_path / ".ppllm-cache") if ".tmp" in n]


def test_save_to_disk_folder_and_a_glob_over_a_mix(tmp_path, template):
    folder = tmp_path / "ds"
    write_arrow_folder(str(folder), TEXTS)
    files = expand_data_paths(str(folder))
    assert [os.path.basename(f) for f in files] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    j = tmp_path / "all.jsonl"
    j.write_bytes(jsonl(TEXTS))
    arrow_tokens = sum((tokens(f, template)[0] for f in files), [])
    assert arrow_tokens == tokens(j, template)[0]
    mix = tmp_path / "mix"
    mix.mkdir()
    write_parquet(mix / "a.parquet", TEXTS[:10])
    (mix / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(TEXTS[10:20])))
    (mix / "c.json").write_text(json.dumps([{"text": t} for t in TEXTS[20:30]]))
    (mix / "d.jsonl.gz").write_bytes(gzip.compress(jsonl(TEXTS[30:])))
    got = expand_data_paths([str(mix / "*"), str(folder)])
    assert len(got) == 6
    _, stats = build_rows(got, template, 64, cache=False)
    assert stats.samples == {"pretrain": 2 * len(TEXTS)}
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        expand_data_paths(str(mix))


def test_bad_row_in_an_arrow_file_names_file_and_row(tmp_path, template):
    folder = tmp_path / "ds"
    texts = list(TEXTS)
    texts[25] = ""
    write_arrow_folder(str(folder), texts, files=1)
    with pytest.raises(DataError, match=r"data-00000-of-00001.arrow:25: field 'text'"):
        build_rows(expand_data_paths(str(folder)), template, 64, cache=False)


def test_column_mapping_per_source(tmp_path, template):
    code = tmp_path / "code.parquet"
    write_parquet(code, TEXTS, column="content")
    entry = {"path": str(tmp_path / "*.parquet"), "text": "content"}
    assert expand_data_paths([entry]) == [str(code)] and data_path_fields([entry]) == [{"text": "content"}]
    with pytest.raises(DataError, match=r"code.parquet:0:0: unknown or missing 'type'"):
        build_rows([str(code)], template, 64, cache=False)
    _, stats = build_rows([str(code)], template, 64, fields=[{"text": "content"}])
    assert stats.samples == {"pretrain": len(TEXTS)}
    chat = tmp_path / "chat.jsonl"
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    chat.write_text(json.dumps({"conversation": conv}) + "\n" + json.dumps({"dialog": conv}) + "\n")
    with pytest.raises(DataError) as e:
        build_rows([str(chat)], template, 64, fields=[{"messages": "conversation"}])
    assert f"{chat}:2: column 'conversation' (data_path reads it as 'messages') is missing" in str(e.value)
    _, stats = build_rows([str(chat)], template, 64, fields=[{"messages": "conversation"}], strict=False)
    assert stats.samples == {"messages": 1} and stats.skipped == {"missing field": 1}


PREPARER = textwrap.dedent("""
    import sys, time
    from data import prepare
    from data.templates import get_template
    from tests.test_data_templates import _bpe
    real = prepare._prepare_into
    def slow(*a, **k):
        time.sleep(1.5)  # both preparers are inside the preparation at once
        return real(*a, **k)
    prepare._prepare_into = slow
    t = get_template("plain", _bpe(["<unk>", "<s>", "</s>", "<pad>"], eos="</s>", pad="<pad>"))
    src = prepare.prepare_file(sys.argv[1], t, 64, cache_dir=sys.argv[2], workers=1)
    print("TOKENS", int(src.tokens.sum()), len(src.tokens))
""")


@pytest.mark.parametrize("lock", ["1", "0"])
def test_two_concurrent_preparers_make_one_complete_entry(tmp_path, lock):
    """With the machine's lock one prepares and the other waits and reuses; without it (a network
    filesystem) both prepare, the first rename publishes and the other discards its own."""
    p = tmp_path / "web.jsonl"
    p.write_bytes(jsonl(TEXTS * 20))
    cache = tmp_path / "shared-cache"
    env = dict(os.environ, PPLLM_CACHE_LOCK=lock, PYTHONPATH=REPO)
    procs = [subprocess.Popen([PY, "-c", PREPARER, str(p), str(cache)], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outs = [pr.communicate(timeout=120)[0] for pr in procs]
    assert all(pr.returncode == 0 for pr in procs), outs
    entries = [n for n in os.listdir(cache) if not n.endswith("lock")]
    assert len(entries) == 1 and ".tmp" not in entries[0], entries
    assert os.path.isfile(cache / entries[0] / "meta.json")
    sums = {line for o in outs for line in o.splitlines() if line.startswith("TOKENS")}
    assert len(sums) == 1, outs
    preparing = sum("data: preparing" in o for o in outs)
    meanwhile = sum("prepared meanwhile" in o for o in outs)
    if lock == "1":
        assert preparing == 1 and meanwhile == 0, outs
    else:
        assert preparing == 2 and meanwhile == 1, outs


def test_prepare_command_shares_files_between_machines(tmp_path):
    from ppllm.prepare import share_files
    sizes = [50, 10, 40, 30, 20]
    shares = [share_files(list("abcde"), sizes, k, 2) for k in range(2)]
    assert sorted(shares[0] + shares[1]) == [0, 1, 2, 3, 4] and not set(shares[0]) & set(shares[1])
    assert abs(sum(sizes[i] for i in shares[0]) - sum(sizes[i] for i in shares[1])) <= 10

    pp, _ = tiny_pipeline_model(tmp_path, ["a few words"])
    data = tmp_path / "corpus"
    data.mkdir()
    for k in range(4):
        write_parquet(data / f"part{k}.parquet", TEXTS[k * 10:(k + 1) * 10])
    cache = tmp_path / "cache"
    cfg = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
           "model_path": str(pp), "save_path": str(tmp_path / "out"), "data_path": str(data / "*.parquet"),
           "cache_dir": str(cache), "max_seq_len": 64, "train_micro_batch_size_per_gpu": 1,
           "gradient_accumulation_steps": 1}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PPLLM_PROGRESS_S="0")
    procs = [subprocess.Popen([PY, "-m", "ppllm.prepare", "--config", str(path), "--share", f"{k}/2"], cwd=REPO,
                              env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for k in range(2)]
    outs = [pr.communicate(timeout=300)[0] for pr in procs]
    assert [pr.returncode for pr in procs] == [0, 0], outs
    for k, out in enumerate(outs):
        assert f"prepare: share {k}/2: 2 of 4 file(s)" in out and "ETA" in out and "tokens/s" in out, out
        assert out.count("data: preparing") == 2, out
    entries = [n for n in os.listdir(cache) if not n.endswith("lock")]
    assert len(entries) == 4
    pids = {json.loads((cache / e / "meta.json").read_text())["prepared_by"]["pid"] for e in entries}
    assert len(pids) == 2  # two preparers, two files each
    dry = subprocess.run([PY, "train_pp.py", "--config", str(path), "--dry-run"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert dry.returncode == 0 and "data: preparing" not in dry.stdout, dry.stdout + dry.stderr
    assert f"pretrain={len(TEXTS)}" in dry.stdout
    # at launch, with a cache_dir on 2 nodes, each node's preparer first takes the same share
    from ppllm.config import load_config
    from ppllm.feed import prepare_node
    from ppllm.prepare import share_files
    prepare_node(load_config(str(path), [f"cache_dir={tmp_path / 'node1'}"]), "llama", (1, 2))
    files = expand_data_paths(str(data / "*.parquet"))
    want = sorted(os.path.basename(files[i]) for i in share_files(files, [os.path.getsize(f) for f in files], 1, 2))
    assert sorted(n.split(".")[0] + ".parquet" for n in os.listdir(tmp_path / "node1") if not n.endswith("lock")) == want
    bad = subprocess.run([PY, "-m", "ppllm.prepare", "--config", str(path), "--share", "2/2"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error: --share '2/2'" in bad.stdout and "Traceback" not in bad.stderr


def test_memory_arrays_of_a_parquet_source_are_compact(tmp_path, template):
    p = tmp_path / "w.parquet"
    write_parquet(p, TEXTS)
    src = prepare_file(str(p), template, 64)
    assert src.tokens.dtype == np.int32 and isinstance(src.tokens, np.memmap)
    assert src.lines.tolist()[:3] == [0, 1, 2]  # rows counted from 0


def test_column_chunks_are_bounded_in_bytes_and_cover_every_row_once(tmp_path):
    from data.records import chunk_records, location, record_chunks
    p = tmp_path / "w.parquet"
    write_parquet(p, TEXTS, row_group_size=16)
    chunks = list(record_chunks(str(p), max_records=4096, max_bytes=400))
    assert len(chunks) > 3 and all(c.batch.num_rows < 16 for c in chunks)
    got = [(line, rec["text"], location(c, line)) for c in chunks for line, rec in chunk_records(str(p), c)]
    assert [t for _, t, _ in got] == TEXTS and [n for n, _, _ in got] == list(range(len(TEXTS)))
    assert [w for _, _, w in got][15:18] == ["0:15", "1:0", "1:1"]
    folder = tmp_path / "ds"
    write_arrow_folder(str(folder), TEXTS, files=1)
    arrow = expand_data_paths(str(folder))[0]
    chunks = list(record_chunks(arrow, max_records=4096, max_bytes=300))
    assert [rec["text"] for c in chunks for _, rec in chunk_records(arrow, c)] == TEXTS and len(chunks) > 3
