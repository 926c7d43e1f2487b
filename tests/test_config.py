"""Config validation: one test per error, overrides, --dry-run, and every shipped YAML loads."""
import glob
import os

import pytest
import yaml

from ppllm import convert as cm
from ppllm.config import ConfigError, load_config, validate
from ppllm.tiny import make_llama
from tests.helpers import PY, REPO, run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    make_llama(str(root / "hf"), 64, num_hidden_layers=4, hidden_size=32, intermediate_size=64)
    cm.hg_to_pp(str(root / "hf"), str(root / "pp"), quiet=True)
    return str(root / "pp")


@pytest.fixture
def raw(model_dir, tmp_path):
    data = tmp_path / "d.json"
    data.write_text('[{"type": "pretrain", "text": "hello"}]')
    return {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
            "model_path": model_dir, "save_path": str(tmp_path / "out"), "data_path": str(data),
            "max_seq_len": 64, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2}


def problems(raw, **kw):
    with pytest.raises(ConfigError) as e:
        validate(raw, "x.yml", **kw)
    return e.value.problems


def test_valid_config_and_defaults(raw):
    cfg = validate(raw, "x.yml", world_size=2)
    assert cfg.pipe == 2 and cfg.data == 1 and cfg.grad_accum == 2
    assert cfg.tokenizer_path == raw["model_path"]
    assert cfg.run.packing and cfg.run.n_epoches == 1


def test_unknown_key_suggests(raw):
    raw["max_seq_length"] = 10
    assert any("max_seq_length: unknown key; did you mean 'max_seq_len'" in p for p in problems(raw))


def test_wrong_type(raw):
    raw["max_seq_len"] = "long"
    assert any(p.startswith("max_seq_len:") for p in problems(raw))


def test_missing_required_key(raw):
    del raw["model_path"]
    assert any("model_path: required key is missing" in p for p in problems(raw))


def test_missing_model_folder(raw):
    raw["model_path"] = "/nonexistent/pp"
    assert any("model_path: folder '/nonexistent/pp' does not exist" in p and "hg_to_pp" in p
               for p in problems(raw))


def test_missing_data_file(raw):
    raw["data_path"] = ["/nope.json"]
    assert any("data_path: file '/nope.json' does not exist" in p for p in problems(raw))


def test_glob_matching_nothing(raw):
    raw["data_path"] = "/nowhere/*.jsonl"
    assert any("matches no file" in p for p in problems(raw))


def test_parts_sum(raw):
    raw["model_topo"]["parts"] = [3, 3]
    msg = " ".join(problems(raw))
    assert "sums to 6, but the model has 7 pipeline layers" in msg and "[4, 3]" in msg


def test_parts_length(raw):
    raw["model_topo"]["parts"] = [7]
    assert any("1 entries but 2 pipeline stages" in p for p in problems(raw))


def test_dims_vs_world_size(raw):
    msg = " ".join(problems(raw, world_size=4))
    assert "needs 2 processes, but 4 were launched" in msg and "--num_gpus 2" in msg and "[2, 2]" in msg


def test_bad_axes(raw):
    raw["model_topo"]["process_topology"]["axes"] = ["data", "pipe"]
    assert any("axes" in p for p in problems(raw))


def test_batch_arithmetic(raw):
    raw["train_batch_size"] = 5
    assert any("train_batch_size: 5 != micro batch 1" in p for p in problems(raw))


def test_epochs_alias_and_conflict(raw):
    raw["epochs"] = 3
    assert validate(dict(raw), "x.yml").run.n_epoches == 3
    raw["n_epoches"] = 2
    assert any("epochs and n_epoches both given" in p for p in problems(raw))


def test_all_problems_reported_at_once(raw):
    raw["max_seq_length"] = 1
    raw["seed"] = "x"
    raw["model_topo"]["parts"] = [1]
    assert len(problems(raw)) >= 3


def test_overrides(raw, tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(str(path), ["max_steps=7", "model_topo.parts=[4,3]", "optimizer.type=AdamW",
                                  "optimizer.params.lr=0.1"])
    assert cfg.run.max_steps == 7 and cfg.run.model_topo.parts == [4, 3]
    assert cfg.ds["optimizer"]["params"]["lr"] == 0.1


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yml"))))
def test_shipped_configs_load(path):
    cfg = load_config(path, check_paths=False)
    assert cfg.pipe >= 1


def test_dry_run_prints_plan(raw, tmp_path):
    path = tmp_path / "c.yml"
    raw["data_path"] = os.path.join(REPO, "data", "samples", "demo.json")
    raw["tokenizer_path"] = None
    path.write_text(yaml.safe_dump(raw))
    # the tiny model folder has no tokenizer: borrow the demo's by training one
    from ppllm.tiny import sample_texts, train_sentencepiece
    tok = train_sentencepiece(sample_texts(raw["data_path"]), str(tmp_path / "tok"))
    p = run([PY, "train_pp.py", "--config", str(path), "--dry-run", "--set", f"tokenizer_path={tok}"])
    out = p.stdout
    assert "stage 0: layers 0.." in out and "stage 1:" in out and "params" in out
    assert "pretrain=30" in out and "instruct=12" in out and "packing efficiency" in out
    p = run([PY, "train_pp.py", "--config", str(path), "--dry-run", "--set", "model_topo.parts=[1,1]"], check=False)
    assert p.returncode == 2 and "model_topo.parts" in p.stdout


def test_tensorboard_switch_is_ppllms_and_a_mapping_is_deepspeeds(raw):
    for value in (True, False):
        cfg = validate(dict(raw, tensorboard=value), "x.yml", world_size=2)
        assert cfg.run.tensorboard is value and "tensorboard" not in cfg.ds
    monitor = {"enabled": True, "output_path": "tb", "job_name": "run"}
    cfg = validate(dict(raw, tensorboard=monitor), "x.yml", world_size=2)
    assert cfg.ds["tensorboard"] == monitor and cfg.run.tensorboard is False


def test_readme_config_table_is_generated_from_the_schema():
    from ppllm.config import describe_config
    readme = open(os.path.join(REPO, "README.md")).read()
    start = readme.index("<!-- config-table")
    body = readme[readme.index("\n", start) + 1: readme.index("<!-- /config-table -->")].strip()
    assert body == describe_config(), "README's config table is stale: run `python scripts/config_table.py`"
    p = run([PY, "train_pp.py", "--help-config"])
    assert p.stdout.strip() == describe_config()


def test_schedule_key(raw, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert validate(raw, "x.yml").run.schedule == "1f1b"
    assert validate({**raw, "schedule": "zb-h1"}, "x.yml").run.schedule == "zb-h1"
    [msg] = problems({**raw, "schedule": "zb"})
    assert msg.startswith("schedule: ") and "'1f1b'" in msg and "'zb-h1'" in msg and "\n" not in msg


@pytest.mark.parametrize("extra,named", [
    ({"fp16": {"enabled": True}}, "precision fp16"),
    ({"precision": "fp16"}, "precision fp16"),
    ({"zero_optimization": {"stage": 1}}, "zero_optimization.stage 1"),
    ({"precision": "bf16", "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}},
     "optimizer offload"),
    ({"precision": "bf16", "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "bf16"}},
     "data_types.grad_accum_dtype bf16 with zero_optimization.stage 1")])
def test_zb_h1_refuses_what_defers_grads_elsewhere(raw, monkeypatch, extra, named):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    [msg] = problems({**raw, "schedule": "zb-h1", **extra})
    assert msg.startswith("schedule: zb-h1") and named in msg and "schedule: 1f1b" in msg and "\n" not in msg
    validate({**raw, **extra}, "x.yml")  # the same settings under 1F1B are fine


@pytest.mark.parametrize("extra", [{"precision": "bf16"}, {"bf16": {"enabled": True}},
                                   {"precision": "bf16", "zero_optimization": {"stage": 1}},
                                   {"precision": "bf16", "data_types": {"grad_accum_dtype": "bf16"}}])
def test_zb_h1_runs_under_deepspeeds_bf16_optimizer(raw, monkeypatch, extra):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert validate({**raw, "schedule": "zb-h1", **extra}, "x.yml").run.schedule == "zb-h1"
