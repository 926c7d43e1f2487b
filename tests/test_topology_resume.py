"""A checkpoint resumed under another topology continues the loss curve of a run that never changed
topology; a run past max_steps says so; Ctrl-C stops every rank with one line saying where resume
continues."""
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
import yaml

from tests.helpers import DEEPSPEED, REPO, free_port, launch, read_metrics, tiny_pipeline_model

pytestmark = pytest.mark.multiprocess  # DeepSpeed launches: not in make test-fast

TEXTS = [f"Sample {i}: the ferry left the quay at dawn and crossed the bay with {i} crates." for i in range(32)]
STEPS, CUT = 8, 4


def config(root, pp, data, name, dims=(2, 1), gas=2, **extra):
    cfg = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": list(dims)}},
           "model_path": str(pp), "save_path": str(root / name), "data_path": str(data),
           "max_seq_len": 48, "max_steps": STEPS, "n_epoches": 100, "save_interval": CUT, "seed": 7,
           "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas, "precision": "fp32",
           "lr_schedule": {"warmup_steps": 2, "min_lr_ratio": 0.1},
           "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}}, "gradient_clipping": 1.0}
    cfg.update(extra)
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def copy_checkpoint(src_save, dst_save, step):
    tag = f"global_step{step}"
    os.makedirs(dst_save)
    shutil.copytree(os.path.join(src_save, tag), os.path.join(dst_save, tag))
    with open(os.path.join(dst_save, "latest"), "w") as f:
        f.write(tag)


@pytest.mark.timeout(900)
def test_resume_across_dims_and_parts_continues_the_curve(tmp_path):
    pp, data = tiny_pipeline_model(tmp_path, TEXTS, layers=4)
    launch(["train_pp.py", "--config", config(tmp_path, pp, data, "straight")], 2)
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [m["step"] for m in straight] == list(range(1, STEPS + 1))

    # pipe=2 x data=1 -> pipe=1 x data=2 (same rows per step: gas 2 -> 1), and pipe=2 with other parts
    for name, dims, gas, extra in (("as_1x2", (1, 2), 1, {}), ("as_parts", (2, 1), 2, {"model_topo": {
            "process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [2, 5]}})):
        copy_checkpoint(tmp_path / "straight", tmp_path / name, CUT)
        p = launch(["train_pp.py", "--config", config(tmp_path, pp, data, name, dims, gas, **extra)], 2)
        assert "(resharded)" in p.stdout and "resharded from pipe=2 x data=1, parts" in p.stdout, p.stdout[-3000:]
        after = read_metrics(tmp_path / name / "metrics.jsonl")
        assert [m["step"] for m in after] == list(range(CUT + 1, STEPS + 1))
        # fp32 on CPU; only the order of the sums differs (data-parallel all-reduce, other stage splits)
        torch.testing.assert_close([m["loss"] for m in after], [m["loss"] for m in straight[CUT:]],
                                   rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close([m["lr"] for m in after], [m["lr"] for m in straight[CUT:]], rtol=1e-12, atol=0)
        torch.testing.assert_close([m["grad_norm"] for m in after], [m["grad_norm"] for m in straight[CUT:]],
                                   rtol=1e-4, atol=1e-6)
        # a resharded run's own checkpoint resumes under the original topology again
        assert os.path.isfile(tmp_path / name / f"global_step{STEPS}" / "ppllm_params-stage00.json")

    # the finished run launched again: nothing to train, and it says how to train further
    p = launch(["train_pp.py", "--config", config(tmp_path, pp, data, "straight")], 2)
    said = [line for line in p.stdout.splitlines() if line.startswith("nothing to train")]
    assert said == [f"nothing to train: {tmp_path / 'straight'} already holds step {STEPS}, and this run ends at "
                    f"step {STEPS} (max_steps {STEPS}); raise max_steps or n_epoches to train further, or use "
                    f"resume: never or another save_path to start over"]
    assert len(read_metrics(tmp_path / "straight" / "metrics.jsonl")) == STEPS


@pytest.mark.timeout(600)
def test_ctrl_c_stops_every_rank_with_one_line(tmp_path):
    pp, data = tiny_pipeline_model(tmp_path, TEXTS, layers=2)
    cfg = config(tmp_path, pp, data, "run", max_steps=100000, save_interval=2)
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "train_pp.py", "--config", cfg]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # a terminal's Ctrl-C sends SIGINT to the whole foreground process group: launcher and ranks
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(read_metrics(metrics)) >= 5):
        assert proc.poll() is None, "the run ended before Ctrl-C"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    lines = [line for line in out.splitlines() if line.startswith("interrupted at step")]
    assert len(lines) == 1, out[-4000:]
    assert f"run the same command to resume from {tmp_path / 'run'}/global_step" in lines[0]
    # no rank prints a traceback (DeepSpeed's own `deepspeed` runner prints one for Ctrl-C on a single
    # node, from deepspeed/launcher/runner.py; that is not ours to change)
    ours = [f'File "{REPO}/{where}' for where in ("ppllm/", "models/", "data/", "train_pp.py")]
    assert not any(o in out for o in ours) and "Interrupted" not in out, out[-4000:]
    assert out.count("Traceback") == out.count("deepspeed/launcher/runner.py"), out[-4000:]
    assert not any(p.name().startswith("python") and "train_pp.py" in " ".join(p.cmdline())
                   for p in __import__("psutil").Process(os.getpid()).children(recursive=True))


@pytest.mark.timeout(900)
def test_bf16_zero1_resume_across_dims_carries_master_weights_and_moments(tmp_path):
    """The default GPU route (bf16, fp32 master weights and gradient sums, ZeRO-1) resharded from
    pipe=2 x data=1 to pipe=1 x data=2: one step after the resume, every fp32 master weight equals the
    straight run's to fp32 rounding (a lost or misplaced moment would move it by ~lr)."""
    from ppllm import ds_compat
    pp, data = tiny_pipeline_model(tmp_path, TEXTS, layers=2)
    # one row per micro-batch, so that both topologies form the same micro-batches: a bf16 weight gradient is
    # rounded to bf16 once per micro-batch, over the rows it holds, and other groupings of rows round otherwise
    # (about 2**-9 of a gradient: 0.5-1 % of this step after Adam). The fp32 sums are then reduced across the
    # two replicas in fp32 (communication_data_type; DeepSpeed's default, bf16, moved them as much), and the
    # two runs differ only in the order of fp32 additions.
    extra = {"precision": "bf16", "max_steps": CUT + 1, "save_interval": 1, "train_micro_batch_size_per_gpu": 1}
    launch(["train_pp.py", "--config", config(tmp_path, pp, data, "straight", gas=4, **extra)], 2)
    copy_checkpoint(tmp_path / "straight", tmp_path / "moved", CUT)
    p = launch(["train_pp.py", "--config", config(tmp_path, pp, data, "moved", (1, 2), 2, **extra)], 2)
    assert "resharded from pipe=2 x data=1" in p.stdout and "gradients summed in fp32, reduced across data replicas in fp32" in p.stdout, p.stdout[-3000:]

    def masters(save, tag, stages, data):
        out = {}
        for s in range(stages):
            found, _ = ds_compat.read_bf16_state(str(tmp_path / save / tag), s, data, lambda n: n)
            out.update({n: v["fp32"] for n, v in found.items() if not n.startswith("tied_modules.")})
        return out
    before = masters("straight", f"global_step{CUT}", 2, 1)
    straight = masters("straight", f"global_step{CUT + 1}", 2, 1)
    moved = masters("moved", f"global_step{CUT + 1}", 1, 2)
    assert set(moved) == set(straight) and len(straight) > 5
    for name in straight:
        step = (straight[name] - before[name]).abs().max().item()
        assert step > 1e-5, name  # the step moved every weight...
        # ...and the resharded run moved it the same way: gradients differ only in summation order
        torch.testing.assert_close(moved[name], straight[name], rtol=0, atol=max(1e-6, 1e-2 * step), msg=name)
    losses = [m["loss"] for m in read_metrics(tmp_path / "moved" / "metrics.jsonl")]
    ref = [m["loss"] for m in read_metrics(tmp_path / "straight" / "metrics.jsonl")][CUT:]
    torch.testing.assert_close(losses, ref, rtol=1e-2, atol=0)
