"""Issue 22's fault matrix, checkpoint and training-run half: nothing lost, nothing executed.

Each test asserts the exit code, the one-line message, and that nothing was lost (checkpoints,
metrics unchanged) or executed (a crafted pickle's marker file never appears). The fast tests work
on files; the ``multiprocess`` ones group their DeepSpeed launches: one base run whose checkpoint
every resume fault copies, and one long run for the dead rank and the folder claim.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch
import yaml

from ppllm import checkpoint as ckpt
from ppllm import claim, ds_compat
from tests.fault_helpers import Streamed, kill_leftovers, rank_pid, wait_gone
from tests.helpers import DEEPSPEED, PY, REPO, free_port, launch, run_group, tiny_pipeline_model

TEXTS = [f"Line {i}: a {w} crossed the {v} before the evening rain started to fall." for i, (w, v) in
         enumerate([("cat", "road"), ("dog", "yard"), ("fox", "field"), ("owl", "barn"), ("hen", "lane"),
                    ("elk", "river"), ("bee", "garden"), ("ram", "bridge")])]
MARKER_NAME = "EXECUTED"


class Evil:
    """Unpickling it opens (creates) a marker file: a stand-in for any code a crafted pickle runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def craft(path, marker) -> None:
    torch.save({"step": 1, "payload": Evil(marker)}, str(path))


def one_error_line(text: str) -> str:
    said = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(said) == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    return said[0]


def snapshot(folder) -> dict:
    """Every file under folder: (size, sha256); 'nothing lost' means this does not change."""
    out = {}
    for root, _, files in os.walk(folder):
        for n in files:
            p = os.path.join(root, n)
            if n != claim.CLAIM_FILE:
                out[os.path.relpath(p, folder)] = ckpt.file_digest(p)
    return out


def fake_tag(save, step: int) -> str:
    """A finished checkpoint folder of plain files and its manifest (no DeepSpeed)."""
    tag = os.path.join(save, f"global_step{step}")
    os.makedirs(tag)
    torch.save({"w": torch.arange(1000.0)}, os.path.join(tag, "layer_00-model_states.pt"))
    torch.save({"optimizer": {"state": {0: {"exp_avg": torch.ones(50)}}}, "global_steps": step},
               os.path.join(tag, "mp_rank_00_model_states.pt"))
    with open(os.path.join(tag, "ppllm_partition.json"), "w") as f:
        json.dump({"bounds": [0, 1]}, f)
    ckpt.write_manifest_part(tag, 0, 1)
    ckpt.merge_manifest(tag, 1)
    return tag


# --- item 1: latest parsed strictly ---------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("latest,expect", [
    (b"hello, world\n", r"does not name a checkpoint \(it holds b'hello, world\\n'"),
    (b"\x80\xff\x00garbage\xfe", r"does not name a checkpoint \(it holds b'\\x80"),
    (b"global_step9", r"names global_step9, which is missing"),
    (b"global_step6", r"names global_step6, which is not a complete checkpoint"),
    (None, r"latest is missing but .* holds checkpoints \(global_step2, global_step4\)"),
], ids=["garbage-text", "binary", "tag-gone", "tag-unfinished", "no-latest"])
def test_damaged_latest_is_an_error_naming_the_tags(tmp_path, latest, expect):
    save = tmp_path / "run"
    fake_tag(save, 2)
    fake_tag(save, 4)
    os.makedirs(save / "global_step6")  # renamed folders always hold a manifest; this one never finished
    if latest is not None:
        (save / "latest").write_bytes(latest)
    before = snapshot(save)
    with pytest.raises(ckpt.ResumeSourceError) as e:
        ckpt.resolve_resume("auto", str(save))
    msg = str(e.value)
    assert "\n" not in msg and re.search(expect, msg), msg
    if latest is not None:
        assert msg.startswith(f"{save}/latest") and "complete checkpoints there: global_step2, global_step4" in msg
        assert f"resume: {save}/global_step4" in msg
    assert snapshot(save) == before


@pytest.mark.timeout(60)
def test_good_latest_and_explicit_tags_resolve(tmp_path):
    save = tmp_path / "run"
    fake_tag(save, 2)
    (save / "latest").write_text("global_step2\n")
    assert ckpt.resolve_resume("auto", str(save)) == (str(save), "global_step2")
    assert ckpt.resolve_resume(str(save / "global_step2"), str(tmp_path / "x")) == (str(save), "global_step2")
    assert ckpt.resolve_resume("auto", str(tmp_path / "empty")) is None  # a new run


# --- checkpoints are verified: size and checksum per file -----------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", ["flip-byte", "truncate", "delete"])
def test_manifest_names_the_file_that_differs(tmp_path, fault):
    tag = fake_tag(tmp_path / "run", 2)
    assert ckpt.verify(tag, ["layer_00-model_states.pt"]) >= 0  # intact: passes
    victim = os.path.join(tag, "layer_00-model_states.pt")
    data = bytearray(open(victim, "rb").read())
    if fault == "flip-byte":
        data[len(data) // 2] ^= 0x01
        open(victim, "wb").write(bytes(data))
    elif fault == "truncate":
        open(victim, "wb").write(bytes(data[:100]))
    else:
        os.remove(victim)
    with pytest.raises(ckpt.ResumeSourceError) as e:
        ckpt.verify(tag, [])
    msg = str(e.value)
    expect = {"flip-byte": "differs from what the save wrote (sha256 mismatch", "truncate": "has 100 bytes, the save wrote",
              "delete": "is missing (the save recorded it"}[fault]
    assert msg.startswith(victim) and expect in msg and "\n" not in msg, msg
    assert "restore it from a copy, or resume from an earlier checkpoint" in msg


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["rng_rank0.pt", "mp_rank_00_model_states.pt",
                                  "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_crafted_pickle_is_refused_and_never_run(tmp_path, name):
    tag = fake_tag(tmp_path / "run", 2)
    marker = tmp_path / MARKER_NAME
    craft(os.path.join(tag, name), marker)
    ckpt.write_manifest_part(tag, 0, 1)  # an attacker who can write the files can write the manifest too
    ckpt.merge_manifest(tag, 1)
    with pytest.raises(ckpt.ResumeSourceError) as e:
        ckpt.verify(tag, [])
    msg = str(e.value)
    assert msg.startswith(os.path.join(tag, name)) and "refused" in msg and "io.open" in msg, msg
    assert "nothing from it was run" in msg and "\n" not in msg
    with pytest.raises(ds_compat.UnsafeCheckpoint):
        ds_compat.safe_load(os.path.join(tag, name))
    assert not marker.exists()


# --- item 9 (files): the folder claim ------------------------------------------------------------

@pytest.mark.timeout(60)
def test_claim_refuses_a_live_run_and_takes_over_a_dead_one(tmp_path):
    save = str(tmp_path / "run")
    first = claim.Claim(save, "run-1")
    try:
        with pytest.raises(claim.FolderInUse) as e:
            claim.Claim(save, "run-2")
        import socket
        assert f"is in use by another run: host {socket.gethostname()}, pid {os.getpid()}" in str(e.value)
        assert claim.in_use(save) is not None
        claim.Claim(save, "run-1").release()  # the same run (another node's leader) is fine ... and
        assert not os.path.exists(os.path.join(save, claim.CLAIM_FILE))  # releasing removes it
    finally:
        first.release()
    assert claim.in_use(save) is None
    # a dead run's claim (its pid is gone) is taken over
    gone = subprocess.Popen(["true"])
    gone.wait()
    path = os.path.join(save, claim.CLAIM_FILE)
    import socket
    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": gone.pid, "start": "1", "run": "old"}, f)
    assert claim.in_use(save) is None
    taken = claim.Claim(save, "run-3")
    assert "took over the claim of a run that is gone" in taken.note and f"pid {gone.pid}" in taken.note
    taken.release()
    # another host: judged by the heartbeat
    with open(path, "w") as f:
        json.dump({"host": "node-elsewhere", "pid": 1, "run": "remote"}, f)
    with pytest.raises(claim.FolderInUse, match="host node-elsewhere, pid 1"):
        claim.Claim(save, "run-4")
    old = time.time() - claim.STALE - 5
    os.utime(path, (old, old))
    claim.Claim(save, "run-5").release()


# --- the launches ------------------------------------------------------------------------------

def run_config(root, name, pp, data, **extra) -> str:
    cfg = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
           "model_path": str(pp), "save_path": str(root / name), "data_path": str(data),
           "max_seq_len": 32, "packing": False, "max_steps": 4, "n_epoches": 1000, "template": "plain",
           "save_interval": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
           "log_interval": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}},
           "precision": "fp32", "lr_schedule": {"type": "constant"}}
    cfg.update(extra)
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def launch_raw(config: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "train_pp.py", "--config", config,
           *args]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PATH"] = os.path.dirname(PY) + os.pathsep + env.get("PATH", "")
    return run_group(cmd, timeout, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    pp, data = tiny_pipeline_model(root, TEXTS)
    return root, pp, data


def _rewrite_manifest(tag):
    for n in os.listdir(tag):
        if n.startswith(".manifest-"):
            os.remove(os.path.join(tag, n))
    ckpt.write_manifest_part(tag, 0, 1)
    ckpt.merge_manifest(tag, 1)


FAULTS = {  # name: (apply(tag, marker), the file the message must name, what it must say)
    "crafted-mp_rank_00": (lambda t, m: (craft(os.path.join(t, "mp_rank_00_model_states.pt"), m),
                                         _rewrite_manifest(t)), "mp_rank_00_model_states.pt", "refused"),
    "crafted-rng_rank0": (lambda t, m: (craft(os.path.join(t, "rng_rank0.pt"), m), _rewrite_manifest(t)),
                          "rng_rank0.pt", "refused"),
    "truncated-mp_rank_00": (lambda t, m: open(os.path.join(t, "mp_rank_00_model_states.pt"), "r+b").truncate(300),
                             "mp_rank_00_model_states.pt", "has 300 bytes, the save wrote"),
    "missing-layer": (lambda t, m: os.remove(os.path.join(t, "layer_04-model_states.pt")),
                      "layer_04-model_states.pt", "is missing"),
    "garbage-latest": (lambda t, m: open(os.path.join(os.path.dirname(t), "latest"), "wb").write(b"\x89PNG\r\n\x1a\n"),
                       "latest", "does not name a checkpoint"),
}


@pytest.mark.multiprocess
@pytest.mark.timeout(1500)
def test_resume_faults_refused_in_one_line_nothing_lost_or_run(tiny):
    """One base run (pipe=2, saves at steps 2 and 4); every fault is applied to a copy of its save_path,
    which is resumed with max_steps 6: exit 2, one line naming the file, the copy unchanged, no marker."""
    root, pp, data = tiny
    base_cfg = run_config(root, "base", pp, data)
    launch(["train_pp.py", "--config", base_cfg], 2)
    tag4 = root / "base" / "global_step4"
    manifest = json.loads((tag4 / "ppllm_manifest.json").read_text())["files"]
    for name in ("mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt", "rng_rank0.pt", "rng_rank1.pt",
                 "layer_00-model_states.pt", "layer_04-model_states.pt", "ppllm_partition.json", "config.json"):
        assert name in manifest, sorted(manifest)
    assert manifest["mp_rank_00_model_states.pt"]["size"] == os.path.getsize(tag4 / "mp_rank_00_model_states.pt")
    # every DeepSpeed state file of a real save passes the restricted unpickler
    for n in os.listdir(tag4):
        if n.endswith(".pt"):
            ds_compat.safe_load(str(tag4 / n))
    failures = []
    for fault, (apply, name, says) in FAULTS.items():
        save = root / f"copy-{fault}"
        shutil.copytree(root / "base", save)
        marker = root / f"{MARKER_NAME}-{fault}"
        apply(str(save / "global_step4"), marker)
        before = snapshot(save)
        cfg = run_config(root, f"copy-{fault}", pp, data, max_steps=6)
        p = launch_raw(cfg)
        out = p.stdout + p.stderr
        try:
            assert p.returncode != 0, out[-3000:]
            line = one_error_line(out)
            assert name in line and says in line, line
            assert not marker.exists(), f"{fault}: the crafted pickle ran"
            assert snapshot(save) == before, f"{fault}: the checkpoint folder changed"
            assert not (save / "global_step6").exists()
            print(f"\n{fault}: rc {p.returncode}: {line}")
        except AssertionError as e:
            failures.append(f"{fault}: {e}")
    assert not failures, "\n".join(failures)


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_dead_rank_named_and_save_path_claimed(tiny):
    """A long run A under the deepspeed launcher: a second launch B into its save_path is refused naming
    A's host and pid, and the dry run says the folder is in use; then rank 0 of A is SIGKILLed: rank 1
    names rank 0 and its host in one line (the launcher's own line shows the command of local rank 1);
    finally a new launch C takes over A's dead claim, resumes and finishes with a clean metrics curve."""
    root, pp, data = tiny
    cfg = run_config(root, "owned", pp, data, max_steps=100000, save_interval=3)
    port = free_port()
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PATH"] = os.path.dirname(PY) + os.pathsep + env.get("PATH", "")
    a = Streamed([DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), "train_pp.py", "--config", cfg],
                 env, name="A")
    try:
        assert a.wait_for(r"^step 4/", 300), a.text[-4000:]
        a_rank0 = rank_pid(cfg, 0)
        import socket
        dry = subprocess.run([PY, "train_pp.py", "--config", cfg, "--dry-run"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert (f"note: save_path {root / 'owned'} is in use by another run: host {socket.gethostname()}, "
                f"pid {a_rank0}") in dry.stdout, dry.stdout
        b = launch_raw(cfg)
        line = one_error_line(b.stdout + b.stderr)
        assert b.returncode == 2 and f"is in use by another run: host {socket.gethostname()}, pid {a_rank0}" in line
        assert a.proc.poll() is None, "A stopped: " + a.text[-3000:]
        steps = [json.loads(x)["step"] for x in open(root / "owned" / "metrics.jsonl")]
        assert steps == list(range(1, len(steps) + 1))  # B wrote nothing into A's curve
        assert a.wait_for(r"^step 7/", 300), a.text[-4000:]  # a checkpoint at step 6 exists

        os.kill(a_rank0, signal.SIGKILL)
        assert a.wait_end(120) is not None, "A still running after rank 0 was killed:\n" + a.text[-4000:]
        lost = [x for x in a.lines if "[ppllm watchdog]" in x and "lost rank 0" in x]
        assert lost and f"lost rank 0 (host {socket.gethostname()}" in lost[0] and f"pid {a_rank0}" in lost[0], \
            a.text[-4000:]
        assert a.proc.returncode != 0 and "Traceback" not in a.text, a.text[-4000:]
        # DeepSpeed's launcher names the command of its last local rank, whichever rank died
        assert re.search(r"--local_rank=1.* exits with return code = (-9|17)", a.text), a.text[-2000:]
        print(f"\nkill rank 0: {lost[0].strip()}")
    finally:
        a.kill_tree()
        kill_leftovers(cfg)
        wait_gone(cfg, 30)
    assert os.path.exists(root / "owned" / claim.CLAIM_FILE)  # left by the killed run
    latest = (root / "owned" / "latest").read_text().strip()
    resume_at = int(latest[len("global_step"):])
    c = launch_raw(cfg, "--set", f"max_steps={resume_at + 2}")
    out = c.stdout + c.stderr
    assert c.returncode == 0, out[-4000:]
    assert "took over the claim of a run that is gone" in out and f"pid {a_rank0}" in out, out[-3000:]
    steps = [json.loads(x)["step"] for x in open(root / "owned" / "metrics.jsonl")]
    assert steps == list(range(1, resume_at + 3)), steps
    assert not os.path.exists(root / "owned" / claim.CLAIM_FILE)  # released at the end
