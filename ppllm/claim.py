"""A run owns its ``save_path``: a second launch into a folder in use is refused.

Two runs training into one folder (a resubmitted job while the first still runs) would interleave
``metrics.jsonl`` and overwrite each other's checkpoints. Rank 0 therefore claims the folder before
anything is read or written there: ``save_path/.ppllm-run`` is created with ``O_CREAT | O_EXCL``
(atomic on local and network filesystems, where ``flock`` may not be honoured) and holds the
claimant's host, pid and process start time; a thread refreshes its modification time every
``BEAT`` seconds. A claim found there is

* this run's own (the same run id): fine;
* a dead run's: the pid is gone (or is another process now) on the same host, or, from another host,
  the heartbeat is older than ``STALE`` seconds: taken over, with a line that says so;
* otherwise a live run's: refused, naming its host and pid.

The run removes its claim when it ends (normally, on an error or Ctrl-C); a SIGKILLed run leaves it,
and the next launch takes it over as above.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from ppllm.errors import UserError

CLAIM_FILE = ".ppllm-run"
BEAT = 10.0  # seconds between heartbeats
STALE = 90.0  # a claim from another host whose heartbeat is older than this is a dead run's


class FolderInUse(UserError):
    """save_path is claimed by a live run."""


def process_start(pid: int) -> str | None:
    """The kernel's start time of a live process (it tells a reused pid apart); None when the process is
    gone (a zombie, killed and not yet reaped, counts as gone) or /proc is unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _me(run_id: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()), "run": run_id,
            "since": time.time()}


def _read(path: str) -> tuple[dict | None, float | None]:
    try:
        with open(path, "rb") as f:
            raw = f.read(65536)
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return None, None
    try:
        info = json.loads(raw.decode("utf-8"))
        if not isinstance(info, dict):
            raise ValueError
    except ValueError:
        info = {}  # a half-written or foreign file: judged by its age alone
    return info, age


def _alive(info: dict, age: float) -> bool:
    """Is the claimant still running? Same host: by its pid (and start time); elsewhere: by the heartbeat."""
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        now = process_start(info["pid"])
        if os.path.isdir("/proc/self"):
            return now is not None and (info.get("start") is None or now == info["start"])
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's live process
        return True
    return age < STALE


def describe(info: dict, age: float) -> str:
    return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')} (last heartbeat {age:.0f} s ago"
            + (f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['since']))}"
               if isinstance(info.get("since"), (int, float)) else "") + ")")


def in_use(save_path: str) -> str | None:
    """For the dry run: the live run holding save_path, described, or None."""
    info, age = _read(os.path.join(save_path, CLAIM_FILE))
    if info is None or not _alive(info, age):
        return None
    return describe(info, age)


class Claim:
    """This run's claim on save_path; :meth:`release` at the end."""

    def __init__(self, save_path: str, run_id: str):
        self.path = os.path.join(save_path, CLAIM_FILE)
        self.run_id = run_id
        self.note: str | None = None  # set when a dead run's claim was taken over
        self._stop = threading.Event()
        os.makedirs(save_path, exist_ok=True)
        for _ in range(5):
            if self._create():
                break
            info, age = _read(self.path)
            if info is None:
                continue  # released meanwhile: try again
            if info.get("run") == run_id:
                break  # ours (several nodes' leaders on a shared filesystem)
            if _alive(info, age):
                raise FolderInUse(f"save_path {save_path} is in use by another run: {describe(info, age)}; "
                                  f"wait for it to end, stop it, or set another save_path")
            self._take_over(info, age)
        else:
            raise FolderInUse(f"save_path {save_path}: could not claim {self.path} (other launches keep "
                              f"claiming it); launch one run at a time")
        self._thread = threading.Thread(target=self._beat, name="ppllm-claim", daemon=True)
        self._thread.start()

    def _create(self) -> bool:
        tmp = f"{self.path}.tmp-{socket.gethostname()}-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(_me(self.run_id), f)
        try:
            os.link(tmp, self.path)  # atomic; fails when the claim exists (O_EXCL semantics, NFS-safe)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    def _take_over(self, info: dict, age: float) -> None:
        """Remove a dead run's claim, but only the one judged dead (another launch may have replaced it)."""
        aside = f"{self.path}.dead-{socket.gethostname()}-{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved, _ = _read(aside)
        if moved is not None and moved.get("run") != info.get("run"):
            try:  # not the claim we judged: put it back unless a new one appeared meanwhile
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.remove(aside)
            return
        os.remove(aside)
        self.note = (f"save_path: took over the claim of a run that is gone ({describe(info, age)}"
                     f"{': its process no longer exists' if info.get('host') == socket.gethostname() else ''})")

    def _beat(self) -> None:
        while not self._stop.wait(BEAT):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        info, _ = _read(self.path)
        if info is not None and info.get("run") == self.run_id:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
