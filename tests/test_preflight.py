"""Mistakes one step off the happy path stop the dry run (and so the launch) with one line:
DeepSpeed sections, the learning rate in two places, LoRA targets, resume across topologies,
the dry run's layer list, and pp_to_hg's messages. No process group is started here."""
import contextlib
import io
import json
import os

import pytest
import yaml

from ppllm.config import ConfigError, load_config
from tests.helpers import PY, REPO, run, tiny_pipeline_model

TEXTS = [f"Sample {i}: the lantern swung over the quay while the tide came in." for i in range(12)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    pp, data = tiny_pipeline_model(root, TEXTS, layers=4)
    return root, pp, data


def write_config(root, pp, data, name="c", **extra):
    cfg = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
           "model_path": str(pp), "save_path": str(root / f"run_{name}"), "data_path": str(data),
           "max_seq_len": 48, "max_steps": 4, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "AdamW", "params": {"lr": 1.0e-3}}, "precision": "fp32"}
    cfg.update(extra)
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def dry(config, *sets):
    """The dry run's exit code and its non-empty output lines (in this process: `train_pp.py --dry-run`
    is a thin door over ppllm.train.main, and tests/test_config.py runs the door itself)."""
    from ppllm.train import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = main(config, list(sets), dry=True)
    return rc, [line for line in out.getvalue().splitlines() if line.strip()]


def error_lines(lines):
    return [line for line in lines if line.startswith(("error", "  - "))]


def test_lr_written_as_1e_minus_4_is_a_number(tiny):
    cfg = load_config(write_config(*tiny), ["optimizer.params.lr=1e-4"])
    assert cfg.ds["optimizer"]["params"]["lr"] == pytest.approx(1e-4)
    quoted = load_config(write_config(*tiny, name="q", optimizer={"type": "AdamW", "params": {"lr": "3e-4"}}))
    assert quoted.ds["optimizer"]["params"]["lr"] == pytest.approx(3e-4)
    with pytest.raises(ConfigError) as e:
        load_config(write_config(*tiny, name="w"), ["optimizer.params.lr=fast"])
    assert e.value.problems == ["optimizer.params.lr: must be a number (got 'fast')"]


def test_deepspeed_sections_are_checked_by_name(tiny):
    with pytest.raises(ConfigError) as e:
        load_config(write_config(*tiny, name="ds"), ["optimizer.type=AdamWW", "bf16.enabeld=true",
                                                     "scheduler={type: WarmupLR, params: {warmup_steps: 5}}"])
    text = "\n".join(e.value.problems)
    assert "optimizer.type: 'AdamWW' is not an optimizer DeepSpeed builds; did you mean 'adamw'?" in text
    assert "bf16.enabeld: not a bf16 setting; did you mean 'enabled'?" in text
    assert "scheduler.params.warmup_steps: not a parameter of this scheduler; did you mean 'warmup_num_steps'?" in text
    with pytest.raises(ConfigError) as e:
        load_config(write_config(*tiny, name="ds2"), ["optimizer.params.betas=[0.9]"])
    assert e.value.problems == ["optimizer.params.betas: must be a pair of numbers (got [0.9])"]


def test_optimizer_lr_against_the_schedulers_peak(tiny):
    """The demo config's WarmupLR ramps to warmup_max_lr: an lr set on the optimizer alone was ignored."""
    rc, lines = dry("configs/demo.yml", "optimizer.params.lr=1.0e-4", f"model_path={tiny[1]}",
                    f"data_path={tiny[2]}", f"save_path={tiny[0] / 'demo_run'}")
    assert rc == 2
    errors = error_lines(lines)
    assert len(errors) == 1 and errors[0].startswith("error: configs/demo.yml: optimizer.params.lr is 0.0001 but ")
    assert ("optimizer.params.lr is 0.0001 but scheduler.params.warmup_max_lr is 0.005, and WarmupLR ramps to "
            "warmup_max_lr") in errors[0]
    rc, _ = dry("configs/demo.yml", "optimizer.params.lr=1.0e-4", "scheduler.params.warmup_max_lr=1.0e-4",
                f"model_path={tiny[1]}", f"data_path={tiny[2]}", f"save_path={tiny[0] / 'demo_run'}")
    assert rc == 0


def test_lr_schedule_and_a_deepspeed_scheduler_are_not_both_taken(tiny):
    path = write_config(*tiny, name="two", lr_schedule={"warmup_steps": 2},
                        scheduler={"type": "WarmupDecayLR", "params": {"warmup_max_lr": 1.0e-3, "total_num_steps": 9}})
    rc, lines = dry(path)
    assert rc == 2 and ("lr_schedule and the DeepSpeed scheduler (WarmupDecayLR) are both set, and only the "
                        "DeepSpeed scheduler would be used; remove one of them") in lines[-1]


@pytest.mark.parametrize("targets,message", [
    (["q_proj", "v_prj"], "lora.target_modules: 'v_prj' is not a linear layer of llama; did you mean 'v_proj'? "
                          "its linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
    (["qproj"], "lora.target_modules: 'qproj' is not a linear layer of llama; did you mean 'q_proj'?"),
])
def test_lora_targets_are_the_familys_module_names(tiny, targets, message):
    rc, lines = dry(write_config(*tiny, name="lora", lora={"r": 4, "target_modules": targets}))
    assert rc == 2 and len(error_lines(lines)) == 1 and message in lines[-1]


def test_dry_run_layer_list_is_true(tiny):
    rc, lines = dry(write_config(*tiny, name="layers"), "model_topo.process_topology.dims=[1,2]")
    assert rc == 0
    stage = [line for line in lines if line.strip().startswith("stage 0:")]
    assert stage == ["  stage 0: layers 0..6 (7), " + stage[0].split(", ", 1)[1].split("[")[0]
                     + "[0:Embed, 1..4: 4 x LlamaDecoderLayer, 5:FinalNorm, 6:Head]"]


def _fake_checkpoint(root, name, record, step=3):
    save = root / name
    tag = save / f"global_step{step}"
    tag.mkdir(parents=True)
    (tag / "ppllm_partition.json").write_text(json.dumps(record))
    (save / "latest").write_text(f"global_step{step}")
    return save


def test_resume_under_another_topology_is_checked_before_launch(tiny):
    root, pp, data = tiny
    base = {"stage_ranks": [[0], [1]], "rows_per_step": 2, "zero_stage": 0, "offload": False,
            "precision": "fp32", "lora": False, "optimizer": "adamw"}
    ok = _fake_checkpoint(root, "ok", dict(base, bounds=[0, 3, 7], dims=[2, 1]))
    rc, lines = dry(write_config(root, pp, data, name="rs", save_path=str(ok), gradient_accumulation_steps=1),
                    "model_topo.process_topology.dims=[1,2]")
    assert rc == 0
    assert (f"resume: from {ok}/global_step3, resharded from pipe=2 x data=1, parts [3, 4] to pipe=1 x data=2, "
            f"parts [7] (weights, optimizer state, schedule, data position)") in lines
    zero = _fake_checkpoint(root, "zero", dict(base, bounds=[0, 3, 7], dims=[2, 1], zero_stage=1))
    rc, lines = dry(write_config(root, pp, data, name="rz", save_path=str(zero), gradient_accumulation_steps=1),
                    "model_topo.process_topology.dims=[1,2]")
    assert rc == 2 and len(error_lines(lines)) == 1
    assert lines[-1] == (f"error: resume: {zero}/global_step3 was written with pipe=2 x data=1, parts [3, 4] and "
                         f"cannot be resharded to pipe=1 x data=2, parts [7]: ZeRO partitions the fp32 optimizer "
                         f"state into flat per-rank buffers; to start from its weights alone, set model_path: "
                         f"{zero}/global_step3 and resume: never (optimizer, schedule and data position start "
                         f"fresh), or resume with the topology it was written with (pipe=2 x data=1, parts [3, 4])")
    rc, lines = dry(write_config(root, pp, data, name="rb", save_path=str(ok)), "model_topo.process_topology.dims=[1,2]")
    assert rc == 2 and "a step held 2 rows and would now hold 4 rows" in lines[-1]
    # the default GPU route (bf16 with DeepSpeed's ZeRO-1 bf16 optimizer) reshards; a precision change does not
    bf16 = _fake_checkpoint(root, "bf16", dict(base, bounds=[0, 3, 7], dims=[2, 1], zero_stage=1, precision="bf16"))
    for precision, want in (("bf16", "resharded from pipe=2 x data=1"), ("fp32", "the precision changed (bf16 -> fp32)")):
        rc, lines = dry(write_config(root, pp, data, name=f"r{precision}", save_path=str(bf16), precision=precision,
                                     gradient_accumulation_steps=1), "model_topo.process_topology.dims=[1,2]")
        assert rc == (0 if precision == "bf16" else 2) and any(want in line for line in lines), lines[-3:]


def test_pp_to_hg_names_the_tags_and_a_missing_folder(tiny, tmp_path):
    root, pp, _ = tiny
    save = tmp_path / "save"
    for step in (5, 10):
        (save / f"global_step{step}").mkdir(parents=True)
    (save / "latest").write_text("global_step10")
    p = run([PY, "convert_model.py", "pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / "o"),
             "--tag", "global_step15"], check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (f"convert_model.py pp_to_hg: error: tag 'global_step15' not found "
                                                 f"in {save}; tags there: global_step5, global_step10")
    p = run([PY, "convert_model.py", "pp_to_hg", "--input-path", str(tmp_path / "nope"), "--save-path",
             str(tmp_path / "o")], check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (f"convert_model.py pp_to_hg: error: {tmp_path / 'nope'} does not "
                                                 f"exist (expected a pipeline folder from hg_to_pp, or a training "
                                                 f"save_path)")
    assert os.path.isdir(REPO)
