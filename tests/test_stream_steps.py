"""Small data sets through real launches: a 4-sample set at the default settings, 5 rows at 4 rows
per step, an eval set smaller than one step evaluated whole, one preparation per node, and a data
error printed once by rank 0 with a non-zero exit (the dry run says the same)."""
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.helpers import DEEPSPEED, PY, REPO, free_port, launch, read_metrics, run, run_group, tiny_pipeline_model

pytestmark = pytest.mark.multiprocess  # DeepSpeed launches: not in make test-fast

TEXTS = ["The lighthouse keeper counted the ships every evening.",
         "Maria planted tomatoes, beans and basil behind the kitchen.",
         "The train to the coast leaves at nine and arrives before noon.",
         "Every winter the lake freezes and children skate across it.",
         "A heron waited in the reeds until the fish came close."]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    pp, data = tiny_pipeline_model(root, TEXTS[:4])
    return root, pp, data


def config(root, pp, data, name, **extra):
    cfg = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
           "model_path": str(pp), "save_path": str(root / name), "data_path": str(data), "max_seq_len": 128,
           "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4, "precision": "fp32",
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}}}
    cfg.update(extra)
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def preparations(out: str, path) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"data: preparing {path} ")]


@pytest.mark.timeout(400)
def test_four_samples_train_at_default_settings_prepared_once(model):
    """packing (default) puts the 4 samples in 1 row; micro batch 1 x 4: one step per pass. The launch
    reads the same 4 documents from a Parquet file with a bare `text` column (no `type`), as corpora
    ship, from a cold cache."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root, pp, data = model
    cfg = config(root, pp, data, "four", max_seq_len=256)  # no packing / n_epoches / overlong keys: defaults
    dry = run([PY, "train_pp.py", "--config", str(cfg), "--dry-run"])
    assert "would train 1 optimizer steps: 1 pass(es) over 1 rows at 4 rows per step" in dry.stdout
    parquet = root / "texts.parquet"  # not prepared by the dry run: the launch starts from a cold cache
    pq.write_table(pa.table({"text": TEXTS[:4], "url": [f"https://example.org/{i}" for i in range(4)]}), parquet)
    cfg = config(root, pp, parquet, "four", max_seq_len=256)
    p = launch(["train_pp.py", "--config", str(cfg)], 2)
    out = p.stdout + p.stderr
    assert "pretrain=4" in out, out
    metrics = read_metrics(root / "four" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1]
    assert metrics[0]["samples"] == 16 and metrics[0]["loss"] > 0  # the one row four times, 4 samples each
    # both ranks read data (first and last stage) on this one node: the file was tokenized once
    assert len(preparations(out, parquet)) == 1, out
    cache = [n for n in os.listdir(root / ".ppllm-cache") if n.startswith("texts.parquet.") and ".tmp" not in n
             and not n.endswith("lock")]
    meta = json.loads((root / ".ppllm-cache" / cache[0] / "meta.json").read_text())
    assert meta["prepared_by"]["rank"] == "0"


@pytest.mark.timeout(500)
def test_five_rows_two_steps_and_small_eval_set_evaluated_whole(model):
    """pipe 2 x data 2: 5 rows at 4 per step train in 2 steps; a 3-row eval set (less than one
    step) is evaluated whole: its loss equals transformers' loss of the exported model on it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root, pp, _ = model
    data = root / "five.jsonl"
    data.write_text("\n".join(json.dumps({"type": "pretrain", "text": t}) for t in TEXTS))
    evalf = root / "three.jsonl"
    evalf.write_text("\n".join(json.dumps({"type": "pretrain", "text": t}) for t in TEXTS[1:4]))
    cfg = config(root, pp, data, "five", packing=False, gradient_accumulation_steps=2, eval_data_path=str(evalf),
                 eval_interval=1, template="plain",
                 model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [2, 2]}})
    p = launch(["train_pp.py", "--config", str(cfg)], 4)
    out = p.stdout + p.stderr
    assert "would train 2 optimizer steps: 1 pass(es) over 5 rows at 4 rows per step" in out
    assert "evaluation: 1 step(s) over 3 rows" in out
    metrics = read_metrics(root / "five" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and [m["samples"] for m in metrics] == [4, 4]
    assert len(preparations(out, data)) == 1 and len(preparations(out, evalf)) == 1, out  # 4 readers, once

    run([PY, "convert_model.py", "pp_to_hg", "--input-path", str(root / "five"), "--save-path", str(root / "hf5")])
    tok = AutoTokenizer.from_pretrained(root / "hf5")
    hf = AutoModelForCausalLM.from_pretrained(root / "hf5").eval()
    total, count = 0.0, 0
    for text in TEXTS[1:4]:
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
        x = torch.tensor([ids])
        with torch.no_grad():
            total += F.cross_entropy(hf(x).logits[0, :-1], x[0, 1:], reduction="sum").item()
        count += len(ids) - 1
    torch.testing.assert_close(metrics[-1]["eval_loss"], total / count, rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(300)
def test_data_error_at_launch_is_one_line_from_rank0_like_the_dry_run(model):
    root, pp, data = model
    bad = root / "bad_eval.jsonl"
    bad.write_text('{"type": "pretrain", "text": "fine"}\n{"type": "conversation", "rounds": [["ans", "hi"]]}\n')
    cfg = config(root, pp, data, "bad", eval_data_path=str(bad), eval_interval=5)
    dry = run([PY, "train_pp.py", "--config", str(cfg), "--dry-run"], check=False)
    assert dry.returncode == 2
    message = [line for line in dry.stdout.splitlines() if line.startswith("error: ")]
    assert len(message) == 1 and "eval data (eval_data_path)" in message[0], dry.stdout
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "train_pp.py", "--config", str(cfg)]
    # a fresh training file, prepared at launch by a pool of 2 worker processes forked from rank 0
    fresh = root / "fresh.jsonl"
    fresh.write_text("\n".join(json.dumps({"type": "pretrain", "text": f"{t} ({i})"}) for i in range(60)
                               for t in TEXTS))
    cfg = config(root, pp, fresh, "bad", eval_data_path=str(bad), eval_interval=5)
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "train_pp.py", "--config", str(cfg)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PPLLM_DATA_WORKERS="2")
    p = run_group(cmd, 240, env=env)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert f"data: preparing {fresh} " in out and "with 2 tokenizing process(es) on rank 0" in out, out
    cache = [n for n in os.listdir(root / ".ppllm-cache") if n.startswith("fresh.jsonl.") and ".tmp" not in n
             and not n.endswith(".lock")]
    meta = json.loads((root / ".ppllm-cache" / cache[0] / "meta.json").read_text())
    assert meta["workers"] == 2 and meta["samples"] == {"pretrain": 300}
    lines = [line for line in out.splitlines() if re.search(r"\berror: ", line) and "eval data" in line]
    assert len(lines) == 1 and lines[0].split("error: ", 1)[1] == message[0].split("error: ", 1)[1], out
    assert f"{bad}:2: " in out and "Traceback" not in out and "[ppllm watchdog]" not in out, out
    assert not (root / "bad" / "metrics.jsonl").exists()
