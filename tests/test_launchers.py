"""Every common launcher, the device each rank binds, and precision keyed on DeepSpeed's accelerator.

The environments are the ones each launcher sets (deepspeed, torchrun, srun, mpirun); a real
torchrun launch on CPU trains in bf16 with fp32 gradient accumulation, resumes, and exports."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import yaml

from ppllm import launch
from tests.helpers import PY, REPO, free_port, read_metrics, tiny_pipeline_model

DS_ENV = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4", "CROSS_RANK": "1",
          "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
TORCHRUN_ENV = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                "TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
# srun -n 8 --distribution=cyclic over 2 nodes of 4 tasks: global rank 5 is node 1's local task 2
SRUN_ENV = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
            "SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_TASKS_PER_NODE": "4(x2)",
            "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7", "SLURM_JOB_ID": "77"}
MPI_ENV = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "10.0.0.1"}


@pytest.mark.parametrize("env,want", [
    (DS_ENV, launch.LaunchEnv("deepspeed", 5, 8, 1, 4, "10.0.0.1", "29500")),
    (TORCHRUN_ENV, launch.LaunchEnv("torchrun", 5, 8, 1, 4, "10.0.0.1", "29400")),
    (SRUN_ENV, launch.LaunchEnv("srun", 5, 8, 2, 4, "10.0.0.7", "29500")),
    (MPI_ENV, launch.LaunchEnv("mpirun", 5, 8, 1, 4, "10.0.0.1", None)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "77"}, None),  # the batch script itself
    ({}, None)])
def test_each_launchers_environment_maps_to_one_launch_env(env, want):
    assert launch.read(env) == want


def test_export_writes_the_names_torch_and_deepspeed_read():
    out: dict = {}
    launch.export(launch.read(SRUN_ENV), out)
    assert out == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"}
    with pytest.raises(launch.LaunchError, match="without MASTER_ADDR.*mpirun: -x MASTER_ADDR"):
        launch.export(launch.read({k: v for k, v in MPI_ENV.items() if k != "MASTER_ADDR"}), {})


def test_slurm_tasks_per_node_and_a_bad_value():
    assert [launch.slurm_tasks_on_node("4(x2),3", n) for n in range(3)] == [4, 4, 3]
    with pytest.raises(launch.LaunchError, match="SLURM_NODEID=3"):
        launch.slurm_tasks_on_node("4(x2),3", 3)
    with pytest.raises(launch.LaunchError, match="RANK='x'"):
        launch.read({"RANK": "x", "WORLD_SIZE": "2"})


def test_device_of_each_rank_with_all_or_one_gpu_visible():
    assert launch.device_index(3, 8) == 3          # every GPU of the node visible: its own
    assert launch.device_index(3, 1) == 0          # per-rank CUDA_VISIBLE_DEVICES / --gpus-per-task
    with pytest.raises(launch.LaunchError, match="local rank 3 but only 2 devices"):
        launch.device_index(3, 2)


class FakeAccelerator:
    def __init__(self, name, count):
        self.name, self.count, self.current = name, count, None

    def device_name(self, index=None):
        return self.name if index is None else f"{self.name}:{index}"

    def device_count(self):
        return self.count

    def set_device(self, index):
        self.current = index

    def current_device_name(self):
        return f"{self.name}:{self.current}"


def test_bind_device_sets_the_device_before_the_process_group(monkeypatch):
    import deepspeed.accelerator as dsa
    acc = FakeAccelerator("cuda", 1)  # SLURM --gpus-per-task=1: each task sees one GPU
    monkeypatch.setattr(dsa, "get_accelerator", lambda: acc)
    env = {"LOCAL_RANK": "2"}
    assert launch.bind_device(launch.read(SRUN_ENV), env) == "cuda:0"
    assert acc.current == 0 and env["LOCAL_RANK"] == "0"  # DeepSpeed places the model on LOCAL_RANK
    acc = FakeAccelerator("cuda", 4)
    monkeypatch.setattr(dsa, "get_accelerator", lambda: acc)
    assert launch.bind_device(launch.read(SRUN_ENV), {}) == "cuda:2"


def test_rank0_before_the_process_group_under_srun_and_mpirun(monkeypatch):
    from ppllm.log import is_rank0
    for env in (SRUN_ENV, MPI_ENV):
        for k in list(os.environ):
            if k.startswith(("SLURM_", "OMPI_")) or k in ("RANK", "WORLD_SIZE"):
                monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert not is_rank0()  # rank 5 stays quiet while the config is read


def test_one_preparer_per_host_under_cyclic_placement():
    from types import SimpleNamespace

    from ppllm.feed import node_preparer
    cfg = SimpleNamespace(pipe=2, data=2, world_size=4)
    # srun --distribution=cyclic: ranks 0 and 2 on host a, 1 and 3 on host b
    hosts = ["a", "b", "a", "b"]
    assert [node_preparer(cfg, r, hosts) for r in range(4)] == [True, True, False, False]
    cfg = SimpleNamespace(pipe=4, data=1, world_size=4)  # only stages 0 and 3 read data
    assert [node_preparer(cfg, r, ["a", "a", "b", "b"]) for r in range(4)] == [True, False, False, True]


# ---------------------------------------------------------------------------------------------
# precision and the optimizer follow DeepSpeed's accelerator, not torch.cuda.is_available()


def _cfg(tmp_path, **over):
    from ppllm.config import load_config
    src = yaml.safe_load(open(os.path.join(REPO, "configs", "ds_config_pp.yml")))
    src.update(over)
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(src))
    return load_config(str(path), [], check_paths=False)


def test_auto_precision_and_adam_follow_the_accelerator(tmp_path, monkeypatch):
    from ppllm import engine as eng
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host running the CPU suite
    cfg = _cfg(tmp_path, bf16={"enabled": False}, precision="auto")
    monkeypatch.setattr(eng, "accelerator", lambda: "cpu")
    assert eng.resolve_precision(cfg) == "fp32"
    assert eng.ds_config(cfg)["optimizer"]["params"]["torch_adam"] is True
    monkeypatch.setattr(eng, "accelerator", lambda: "cuda")
    assert eng.resolve_precision(cfg) == "bf16"
    monkeypatch.setattr(eng.ds_compat, "fused_adam_buildable", lambda: False)  # no nvcc, nothing prebuilt
    params = eng.ds_config(cfg)["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    monkeypatch.setattr(eng.ds_compat, "fused_adam_buildable", lambda: True)
    assert "torch_adam" not in eng.ds_config(cfg)["optimizer"]["params"]


def test_lion_on_the_cpu_accelerator_of_a_gpu_host(tmp_path, monkeypatch):
    from ppllm import engine as eng
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(eng, "accelerator", lambda: "cpu")
    ds, opt = eng._client_optimizer({"optimizer": {"type": "Lion", "params": {"lr": 1e-4}}},
                                    [{"params": [torch.nn.Parameter(torch.zeros(2))]}])
    assert type(opt).__name__ == "DeepSpeedCPULion" and "optimizer" not in ds


def test_bf16_accumulates_in_fp32_by_default_and_the_plan_counts_it(tmp_path, monkeypatch):
    from ppllm import engine as eng
    from ppllm.planner import setup_from_config
    cfg = _cfg(tmp_path, zero_optimization={"stage": 0}, data_types={})  # an older config: bf16 at stage 0
    route = eng.precision_route(cfg)
    assert (route.precision, route.zero_stage, route.grad_accum_dtype) == ("bf16", 1, "fp32")
    ds = eng.ds_config(cfg)
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["zero_optimization"]["stage"] == 1
    assert ds["communication_data_type"] == "fp32"  # the sums are not cast to bf16 for the all-reduce
    assert "gradients accumulated in fp32 (ZeRO stage 1), reduced across data replicas in fp32" in route.describe()
    setup = setup_from_config(cfg)
    assert (setup.zero_stage, setup.grad_accum_dtype) == (1, "fp32")
    # asked for bf16 sums explicitly: kept, and said
    cfg = _cfg(tmp_path, data_types={"grad_accum_dtype": "bf16"}, zero_optimization={"stage": 0})
    # (the shipped config's communication_data_type: fp32 stays what it says)
    assert eng.precision_route(cfg).describe().endswith("gradients accumulated in bf16, reduced across data "
                                                         "replicas in fp32")
    # the shipped config states the route itself
    shipped = yaml.safe_load(open(os.path.join(REPO, "configs", "ds_config_pp.yml")))
    assert shipped["data_types"]["grad_accum_dtype"] == "fp32" and shipped["zero_optimization"]["stage"] == 1
    assert shipped["communication_data_type"] == "fp32"


def test_bf16_on_a_device_without_bf16_is_refused_in_one_line(tmp_path, monkeypatch):
    import deepspeed.accelerator as dsa

    from ppllm import engine as eng
    from ppllm import train
    acc = FakeAccelerator("cuda", 1)
    acc.is_bf16_supported = lambda: False  # a V100
    monkeypatch.setattr(dsa, "get_accelerator", lambda: acc)
    monkeypatch.setattr(eng, "accelerator", lambda: "cuda")
    assert train.device_problem(_cfg(tmp_path)) == ("precision bf16 is not supported by this cuda device (cuda); "
                                                    "use precision: fp16 (or fp32)")


TEXTS = [f"Sample {i}: the river ran fast beneath the middle arch of the old bridge." for i in range(7)]


def _torchrun(cfg, nodes: int = 1):
    """``torchrun`` on this machine: one node of 2 processes, or 2 "nodes" of 1 process each (two
    torchrun agents meeting at the same master, as on two hosts)."""
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    torchrun = os.path.join(os.path.dirname(PY), "torchrun")
    port = str(free_port())
    per_node = 2 // nodes
    procs = [subprocess.Popen([torchrun, "--nnodes", str(nodes), "--node-rank", str(i), "--nproc-per-node",
                               str(per_node), "--master-addr", "127.0.0.1", "--master-port", port, "train_pp.py",
                               "--config", str(cfg)], cwd=REPO, env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(nodes)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-6000:]
    return outs[0]


@pytest.mark.timeout(900)
@pytest.mark.multiprocess
def test_torchrun_on_two_nodes_trains_bf16_then_one_node_resumes_and_exports(tmp_path):
    pp, data = tiny_pipeline_model(tmp_path, TEXTS)
    base = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
            "model_path": str(pp), "save_path": str(tmp_path / "run"), "data_path": str(data),
            "max_seq_len": 48, "max_steps": 3, "n_epoches": 100, "save_interval": 2, "seed": 7,
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "precision": "bf16",
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}}, "gradient_clipping": 1.0}
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(base))
    out = _torchrun(cfg, nodes=2)  # pipe=2 across two torchrun "nodes"
    assert "launched by torchrun: 2 processes, rank 0 on cpu" in out, out
    assert "gradients accumulated in fp32 (ZeRO stage 1)" in out, out
    # read off the engine DeepSpeed built, not the config
    assert "engine: bf16 weights, fp32 master weights, gradients summed in fp32, reduced across data replicas in fp32" in out, out
    cfg.write_text(yaml.safe_dump({**base, "max_steps": 5}))
    out = _torchrun(cfg)
    assert f"resumed from {tmp_path / 'run' / 'global_step3'} at step 3" in out, out
    steps = [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5]
    # every parameter got gradients in bf16 (the head's used to be dropped by DeepSpeed's bf16 optimizer)
    from ppllm import ds_compat
    for stage in range(2):
        found, _ = ds_compat.read_bf16_state(str(tmp_path / "run" / "global_step5"), stage, 1, lambda n: n)
        assert found and all(v["exp_avg"].abs().max() > 0 for v in found.values()), \
            [n for n, v in found.items() if not v["exp_avg"].abs().max() > 0]
    from ppllm import convert
    convert.pp_to_hg(str(tmp_path / "run"), str(tmp_path / "export"), quiet=True)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert model(torch.tensor([[1, 5, 9]])).logits.isfinite().all()


def test_make_runs_the_suite_on_cpu_on_a_gpu_host(tmp_path):
    """With nvidia-smi on PATH the Makefile used to export an empty DS_ACCELERATOR, which DeepSpeed
    rejects; now make demo/test/test-fast run CPU processes there too (make gpu-check uses the GPU)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200'\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "MAKEFLAGS", "MAKELEVEL")}
    env["PATH"] = f"{fake}:{env['PATH']}"
    p = subprocess.run(["make", "-pn", "test-fast"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    lines = [line.strip() for line in p.stdout.splitlines() if line.startswith("DS_ACCELERATOR")]
    assert lines and lines[-1].split("=")[-1].strip() == "cpu", lines
