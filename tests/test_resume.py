"""Exact resume: SIGKILL a run (probably mid-save) and start it again; the loss curve is identical."""
import os
import re
import signal
import subprocess
import time

import pytest
import yaml

from tests.helpers import DEEPSPEED, REPO, free_port, launch, read_metrics, tiny_pipeline_model

pytestmark = pytest.mark.multiprocess  # DeepSpeed launches: not in make test-fast

# 7 rows, 4 per step: steps 2, 4, 6 and 9 span two epochs
TEXTS = [f"Sample {i}: the river ran fast beneath the middle arch of the old bridge." for i in range(7)]
STEPS = 10


def config(root, pp, data, name, **extra):
    cfg = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
           "model_path": str(pp), "save_path": str(root / name), "data_path": str(data),
           "max_seq_len": 48, "max_steps": STEPS, "n_epoches": 100, "save_interval": 1, "seed": 7,
           "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "precision": "fp32",
           "lr_schedule": {"warmup_steps": 2, "min_lr_ratio": 0.1},
           "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
           "gradient_clipping": 1.0}
    cfg.update(extra)
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.timeout(600)
def test_kill_and_resume_reproduces_the_loss_curve(tmp_path):
    pp, data = tiny_pipeline_model(tmp_path, TEXTS)
    launch(["train_pp.py", "--config", str(config(tmp_path, pp, data, "straight"))], 2)
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [m["step"] for m in straight] == list(range(1, STEPS + 1))

    cfg = config(tmp_path, pp, data, "killed", keep_last=3)
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "train_pp.py", "--config", str(cfg)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if metrics.exists() and len(read_metrics(metrics)) >= STEPS // 2:
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = len(read_metrics(metrics))
    assert killed_at < STEPS

    p = launch(["train_pp.py", "--config", str(cfg)], 2)
    assert "resumed from" in p.stdout
    # the resumed part holds a step that takes the end of one epoch and the start of the next
    from data.dataset import build_rows
    from data.templates import get_template
    from data.tokenizer import load_tokenizer
    tok = load_tokenizer(str(pp), "llama")
    rows, _ = build_rows([str(data)], get_template("auto", tok, "llama"), 48, seed=7, cache=False)
    per_step = 4
    resumed_at = int(re.search(r"resumed from .* at step (\d+)", p.stdout).group(1))
    assert len(rows) % per_step and resumed_at < STEPS
    assert any((k * per_step) // len(rows) != ((k + 1) * per_step - 1) // len(rows) for k in range(resumed_at, STEPS))
    resumed = read_metrics(metrics)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]  # bit for bit
    assert [m["lr"] for m in resumed] == [m["lr"] for m in straight]
    kept = sorted(int(n[len("global_step"):]) for n in os.listdir(tmp_path / "killed") if n.startswith("global_step"))
    assert kept == list(range(STEPS - 2, STEPS + 1))
    assert not [n for n in os.listdir(tmp_path / "killed") if n.startswith(".tmp-")]


def test_partial_save_is_ignored(tmp_path):
    from ppllm.checkpoint import resolve_resume
    from ppllm.paths import read_latest, write_atomic as _write_atomic
    save = tmp_path / "run"
    (save / "global_step4").mkdir(parents=True)
    (save / "global_step4" / "ppllm_manifest.json").write_text('{"version": 1, "files": {}}')  # a finished save
    _write_atomic(str(save / "latest"), "global_step4")
    (save / ".tmp-global_step5").mkdir()  # a save that was killed half way
    (save / ".tmp-global_step5" / "layer_00-model_states.pt").write_bytes(b"truncated")
    assert read_latest(str(save)) == "global_step4"
    assert resolve_resume("auto", str(save)) == (str(save), "global_step4")
    assert resolve_resume("never", str(save)) is None
    assert resolve_resume(str(save / "global_step4"), str(tmp_path / "elsewhere")) == (str(save), "global_step4")
