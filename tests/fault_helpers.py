"""Processes started by the fault and multi-node tests: streamed output, waiting for a line,
finding the training ranks of one run, and making sure nothing we started outlives a test."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import psutil
import yaml

from tests.helpers import PY, REPO, free_port


class Streamed:
    """A Popen whose stdout+stderr lines are collected by a thread (so pipes never fill)."""

    def __init__(self, cmd: list[str], env: dict, cwd: str = REPO, name: str = ""):
        self.name = name or os.path.basename(cmd[1] if len(cmd) > 1 else cmd[0])
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True)
        self.lines: list[str] = []
        self.ended_at: float | None = None
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()
        self.proc.wait()
        with self._cv:
            self.ended_at = time.monotonic()
            self._cv.notify_all()

    @property
    def text(self) -> str:
        with self._cv:
            return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> bool:
        """True once a line matches pattern; False on timeout or when the process ended without it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                if any(rx.search(line) for line in self.lines):
                    return True
                if self.ended_at is not None or time.monotonic() > deadline:
                    return False
                self._cv.wait(timeout=0.5)

    def wait_end(self, timeout: float) -> float | None:
        """Monotonic time the process ended (its output fully read), or None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.ended_at is None and time.monotonic() < deadline:
                self._cv.wait(timeout=0.5)
            return self.ended_at

    def kill_tree(self):
        """Our own cleanup: the process group we started (start_new_session) and its children."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def run_processes(marker: str) -> list[psutil.Process]:
    """Live processes (any parent: pdsh/ssh start them under sshd) whose command line holds marker
    (a unique temp path, so only this test's launchers and ranks match)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(marker in part for part in (p.info["cmdline"] or [])):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def rank_pid(marker: str, rank: int, timeout: float = 60) -> int:
    """pid of the training process with RANK=rank among this run's processes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in run_processes(marker):
            try:
                cmd = " ".join(p.cmdline())
                if "train_pp.py" in cmd and "deepspeed.launcher" not in cmd and p.environ().get("RANK") == str(rank):
                    return p.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.2)
    raise AssertionError(f"no training process with RANK={rank} for {marker}")


def kill_leftovers(marker: str) -> list[int]:
    """SIGKILL this run's processes, by pid (test cleanup after a failure). Returns the pids killed."""
    pids = []
    for p in run_processes(marker):
        try:
            p.kill()
            pids.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def wait_gone(marker: str, timeout: float) -> float | None:
    """Monotonic time by which no process of this run is left, or None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not run_processes(marker):
            return time.monotonic()
        time.sleep(0.25)
    return None


def write_run_config(root, name: str, pp_dir, data, steps: int, **extra) -> str:
    """A pipe=2 fp32 config for the tiny model; extra keys override."""
    cfg = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
           "model_path": str(pp_dir), "save_path": str(root / name), "data_path": str(data),
           "max_seq_len": 32, "packing": False, "max_steps": steps, "n_epoches": 1000, "template": "plain",
           "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "log_interval": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}},
           "precision": "fp32", "lr_schedule": {"type": "constant"}}
    cfg.update(extra)
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def rank_env(rank: int, world: int, port: int) -> dict:
    """What DeepSpeed's launcher gives each rank, for ranks started one by one (no launcher to
    clean up after a lost rank: only the watchdog can stop the others)."""
    e = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
             RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
             CROSS_RANK="0", CROSS_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    e["PATH"] = os.path.dirname(PY) + os.pathsep + e.get("PATH", "")
    return e


def start_ranks(config: str, world: int = 2, per_rank_args: dict[int, list[str]] | None = None) -> list[Streamed]:
    port = free_port()
    return [Streamed([PY, "train_pp.py", "--config", config, f"--local_rank={r}",
                      *(per_rank_args or {}).get(r, [])], rank_env(r, world, port), name=f"rank{r}")
            for r in range(world)]
