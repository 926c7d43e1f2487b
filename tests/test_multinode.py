"""Multi-node launch as it really runs: `deepspeed --hostfile` -> pdsh -> ssh -> one launcher per node.

Two "nodes" on this machine: an sshd bound to 127.0.0.2 and 127.0.0.3 on a high port, with
throwaway keys (tests/loopback_cluster.py). pipe=2 puts stage 0 on 127.0.0.2 and stage 1 on
127.0.0.3. All traffic stays on 127.0.0.0/8: the store on --master_addr 127.0.0.2, gloo on lo.

Needs pdsh and openssh-server (bash scripts/system_deps.sh); without them the tests are
skipped with the reason.
"""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from transformers import AutoModelForCausalLM

from tests.fault_helpers import Streamed, kill_leftovers, rank_pid, run_processes, wait_gone, write_run_config
from tests.helpers import DEEPSPEED, PY, REPO, run, tiny_pipeline_model
from tests.loopback_cluster import HOSTS, LoopbackCluster, Unavailable, free_port_on

pytestmark = pytest.mark.multiprocess  # DeepSpeed launches: not in make test-fast

TEXTS = ["The lighthouse keeper counted the ships every evening.",
         "Maria planted tomatoes, beans and basil behind the kitchen.",
         "The train to the coast leaves at nine and arrives before noon.",
         "Every winter the lake freezes and children skate across it."]
STARTUP = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LoopbackCluster(tmp_path_factory.mktemp("sshd"))
    try:
        c.start()
    except Unavailable as e:
        print(f"\nSKIP multi-node tests: {e}", flush=True)
        pytest.skip(f"loopback two-host cluster unavailable: {e}")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    pp, data = tiny_pipeline_model(root, TEXTS)
    return root, pp, data


def launch_dir(root, name: str):
    """The launcher's cwd: DeepSpeed's runner cds every node to it and reads its .deepspeed_env."""
    d = root / f"{name}_launch"
    d.mkdir()
    (d / "hostfile").write_text("".join(f"{h} slots=1\n" for h in HOSTS))
    # the remote side starts in a fresh ssh shell: these are exported there before the launcher runs
    (d / ".deepspeed_env").write_text("\n".join([
        "DS_ACCELERATOR=cpu",
        "OMP_NUM_THREADS=1",
        "GLOO_SOCKET_IFNAME=lo",  # gloo's own sockets on loopback too (NCCL_SOCKET_IFNAME on GPUs)
        f"PATH={os.path.dirname(PY)}:/usr/local/bin:/usr/bin:/bin",
    ]) + "\n")
    return d


def start_multinode(cluster, root, name: str, config: str) -> Streamed:
    d = launch_dir(root, name)
    env = dict(os.environ, PDSH_SSH_ARGS_APPEND=cluster.ssh_args, PYTHONPATH=REPO, PYTHONUNBUFFERED="1",
               DS_ACCELERATOR="cpu")
    env["PATH"] = os.path.dirname(PY) + os.pathsep + env.get("PATH", "")
    cmd = [DEEPSPEED, "--hostfile", str(d / "hostfile"), "--master_addr", HOSTS[0],
           "--master_port", str(free_port_on(HOSTS[:1])),
           # DeepSpeed's own reachability check runs plain `ssh HOST` without PDSH_SSH_ARGS_APPEND
           # (our port and key); the fixture has already checked ssh to both hosts
           "--no_ssh_check",
           os.path.join(REPO, "train_pp.py"), "--config", config]
    return Streamed(cmd, env, cwd=str(d), name=f"deepspeed {name}")


@pytest.mark.timeout(STARTUP + 200)
def test_two_hosts_train_save_export(cluster, tiny):
    root, pp, data = tiny
    cfg = write_run_config(root, "mn", pp, data, steps=4, save_interval=2)
    t0 = time.monotonic()
    ds = start_multinode(cluster, root, "mn", cfg)
    try:
        end = ds.wait_end(STARTUP + 120)
        assert end is not None, "multi-node run did not finish:\n" + ds.text[-6000:]
        print(f"\ntwo-host run: {end - t0:.1f} s, rc {ds.proc.returncode}")
        assert ds.proc.returncode == 0, ds.text[-6000:]
        out = ds.text
        assert "127.0.0.2: step 4/4" in out, out[-4000:]  # rank 0 printed it through pdsh from node 127.0.0.2
        assert any(line.startswith("127.0.0.3: ") for line in out.splitlines()), out[-4000:]
    finally:
        ds.kill_tree()
        kill_leftovers(cfg)
    save = root / "mn"
    metrics = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert (save / "latest").read_text().strip() == "global_step4" and (save / "global_step2").is_dir()
    part = json.loads((save / "global_step4" / "ppllm_partition.json").read_text())
    assert part["stage_ranks"] == [[0], [1]], part

    # the layer files of both nodes are here (same filesystem): the checkpoint exports
    run([PY, "convert_model.py", "pp_to_hg", "--input-path", str(save), "--save-path", str(root / "mn_hf"),
         "--quiet"])
    assert AutoModelForCausalLM.from_pretrained(root / "mn_hf") is not None

    # without a shared filesystem node 127.0.0.2 would only hold stage 0's files: pp_to_hg names
    # exactly the missing ones and the stage (ranks) that wrote them
    half = root / "mn_node0_only"
    shutil.copytree(save / "global_step4", half)
    lo, hi = part["bounds"][1], part["bounds"][2]
    gone = sorted(f for f in os.listdir(half) if f.startswith("layer_") and lo <= int(f[6:8]) < hi)
    assert gone
    for f in gone:
        os.remove(half / f)
    p = run([PY, "convert_model.py", "pp_to_hg", "--input-path", str(half), "--save-path",
             str(root / "mn_hf_half"), "--quiet"], check=False)
    msg = p.stdout + p.stderr
    assert p.returncode != 0
    for f in gone:
        assert f"{f} was written by pipeline stage 1 (global ranks [1])" in msg, msg


@pytest.mark.timeout(STARTUP + 200)
def test_two_hosts_killed_rank_stops_everything(cluster, tiny):
    """SIGKILL the rank on 127.0.0.3: its node's launcher ends, and the watchdog stops rank 0 on
    127.0.0.2 (whose launcher knows nothing about the other node); pdsh and deepspeed then exit."""
    root, pp, data = tiny
    cfg = write_run_config(root, "mnkill", pp, data, steps=100000)
    ds = start_multinode(cluster, root, "mnkill", cfg)
    try:
        assert ds.wait_for(r"127\.0\.0\.2: step 3/", STARTUP), "training did not start:\n" + ds.text[-6000:]
        victim = rank_pid(cfg, 1)
        import psutil
        ssh_conn = psutil.Process(victim).environ().get("SSH_CONNECTION", "")
        assert ssh_conn.split()[2:3] == ["127.0.0.3"], ssh_conn  # rank 1 really runs on "node" 127.0.0.3
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        gone_at = wait_gone(cfg, 60)
        end = ds.wait_end(30)
        left = [(p.pid, " ".join(p.cmdline())[:200]) for p in run_processes(cfg)]
        assert gone_at is not None, f"processes left 60 s after the kill: {left}\n" + ds.text[-6000:]
        print(f"\ntwo-host kill of rank 1: every process of the run gone {gone_at - killed_at:.1f} s after the "
              f"SIGKILL; deepspeed exited rc {ds.proc.returncode} after {(end or 0) - killed_at:.1f} s")
        assert end is not None and ds.proc.returncode != 0, ds.text[-6000:]
        out = ds.text
        assert "127.0.0.2: [ppllm watchdog] rank 0" in out and "lost rank 1 (host " in out, out[-6000:]
        assert "ssh address 127.0.0.3" in out, out[-6000:]
    finally:
        ds.kill_tree()
        kill_leftovers(cfg)


def test_ssh_commands_stay_on_loopback(cluster):
    """The cluster answers on exactly the two loopback addresses we bound."""
    for h in HOSTS:
        r = cluster.ssh(h, "echo $SSH_CONNECTION")
        assert r.returncode == 0 and r.stdout.split()[2] == h, (r.stdout, r.stderr)
    assert subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", "-p", str(cluster.port),
                           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                           "-i", cluster.key, "127.0.0.1", "true"], capture_output=True, timeout=30).returncode != 0
