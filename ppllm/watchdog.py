"""Heartbeat watchdog: no rank waits forever for a rank that is gone.

A rank that dies (killed, out of memory, a machine lost) leaves the others blocked in a
collective that only the process-group timeout would end, after many minutes, and a
launcher on another node never learns about it. The watchdog ends that wait in seconds:

* every rank runs a daemon thread that bumps a heartbeat counter in the job's rendezvous
  store (the TCPStore on MASTER_ADDR:MASTER_PORT that ``init_process_group`` created;
  the thread opens its own client connection to it) and watches the next rank in a ring;
* a rank whose counter has not moved for ``timeout`` seconds is declared lost; so is
  rank 0 when the store it hosts stops answering;
* a rank that raises an uncaught exception (a missing or corrupt layer file, bad data)
  reports it before exiting, so the others stop at once instead of waiting;
* the first report is written to the store, every rank prints it (naming the lost rank,
  its host and pid) and exits with ``EXIT_CODE``; DeepSpeed's launcher on each node then
  stops that node's remaining processes and pdsh returns a non-zero status.

Usage, right after ``deepspeed.init_distributed()``::

    dog = watchdog.start(timeout=30)   # None when disabled or single-process
    ...train...
    watchdog.stop(dog)                 # before the process exits normally
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from datetime import timedelta

from ppllm.claim import process_start as _start_time

EXIT_CODE = 17
PREFIX = "ppllm_watchdog/"


def describe_self() -> str:
    """'host vm (ssh address 127.0.0.3), pid 123': where this process runs, as a person would look for it."""
    parts = [f"host {socket.gethostname()}"]
    ssh = os.environ.get("SSH_CONNECTION", "").split()  # set when pdsh/ssh started the launcher on this node
    if len(ssh) == 4:
        parts[0] += f" (ssh address {ssh[2]})"
    return f"{parts[0]}, pid {os.getpid()}"


def _say(msg: str) -> None:
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - best effort before a hard exit
        pass
    print(f"[ppllm watchdog] {msg}", file=sys.stderr, flush=True)


class Watchdog:
    def __init__(self, rank: int, world: int, host: str, port: int, timeout: float, interval: float):
        import torch.distributed as dist
        self.rank, self.world, self.timeout, self.interval = rank, world, float(timeout), float(interval)
        self.addr = f"{host}:{port}"
        # our own client of the rendezvous store; short op timeout so a dead server is noticed quickly
        self.store = dist.TCPStore(host, port, world_size=None, is_master=False,
                                   timeout=timedelta(seconds=max(5.0, 3 * self.interval)), wait_for_workers=False)
        self.me = describe_self()
        self.store.set(f"{PREFIX}who/{rank}", self.me)
        self.store.set(f"{PREFIX}proc/{rank}", f"{socket.gethostname()} {os.getpid()} {_start_time(os.getpid())}")
        self.store.set(f"{PREFIX}hb/{rank}", "0")
        self._who: dict[int, str] = {}
        self._procs: dict[int, tuple[str, int, str]] = {}
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._exiting = False
        self._prev_hook = sys.excepthook
        sys.excepthook = self._excepthook
        try:  # every rank is here within moments of init_distributed: learn where each runs, once
            keys = [f"{PREFIX}who/{r}" for r in range(world)]
            self.store.wait(keys, timedelta(seconds=max(self.timeout, 5.0)))
            self._who = {r: v.decode() for r, v in enumerate(self.store.multi_get(keys))}
            procs = self.store.multi_get([f"{PREFIX}proc/{r}" for r in range(world)])
            for r, v in enumerate(procs):
                host, pid, start = v.decode().split(" ")
                self._procs[r] = (host, int(pid), start)
        except Exception:  # noqa: BLE001 - a rank missing here is reported by the thread
            pass
        self._thread = threading.Thread(target=self._run, name="ppllm-watchdog", daemon=True)
        self._thread.start()

    # -- helpers -------------------------------------------------------------------------
    def who(self, r: int) -> str:
        if r not in self._who:
            try:
                if self.store.check([f"{PREFIX}who/{r}"]):
                    self._who[r] = self.store.get(f"{PREFIX}who/{r}").decode()
            except Exception:  # noqa: BLE001 - the description is a courtesy
                pass
        return self._who.get(r, "host unknown")

    def _exit(self, msg: str, report: bool) -> None:
        """Print msg, publish it (first report wins), give the others time to read it, exit hard."""
        with self._lock:
            if self._exiting:
                return
            self._exiting = True
        if report:
            try:
                self.store.compare_set(f"{PREFIX}failed", "", msg)
            except Exception:  # noqa: BLE001 - the store may be what is gone
                pass
        _say(f"rank {self.rank} ({self.me}) stopping: {msg}")
        if self.rank == 0 and report:
            time.sleep(3 * self.interval)  # rank 0 hosts the store: let the others read the report
        os._exit(EXIT_CODE)

    def gone_local_ranks(self) -> list[int]:
        """Ranks on this host whose process no longer exists (instant, needs no store: rank 0 may be the one)."""
        host = socket.gethostname()
        gone = []
        for r, (h, pid, start) in sorted(self._procs.items()):
            if r == self.rank or h != host:
                continue
            now = _start_time(pid)
            if now is None or (start != "None" and now != start):
                try:
                    if self.store.check([f"{PREFIX}stopping/{r}"]):
                        continue  # it stopped on a signal (Ctrl-C, scancel), like this rank
                except Exception:  # noqa: BLE001 - no store (rank 0 is gone): judge by the process alone
                    pass
                gone.append(r)
        return gone

    def mark_stopping(self) -> None:
        try:
            self.store.set(f"{PREFIX}stopping/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass

    def lost_line(self) -> str | None:
        """Why this rank must stop because of another, when that is known now: a rank on this host whose
        process is gone, or a report another rank published."""
        gone = self.gone_local_ranks()
        if gone:
            return (f"rank {self.rank} ({self.me}) stopping: lost rank {gone[0]} ({self.who(gone[0])}): its process "
                    f"is gone (killed or crashed)" + (f"; also gone: ranks {gone[1:]}" if gone[1:] else ""))
        try:
            if self.store.check([f"{PREFIX}failed"]):
                return f"rank {self.rank} ({self.me}) stopping: {self.store.get(f'{PREFIX}failed').decode()}"
        except Exception:  # noqa: BLE001 - the store is gone: so is rank 0
            return f"rank {self.rank} ({self.me}) stopping: {self._store_lost(RuntimeError('no answer'))}"
        return None

    def _excepthook(self, etype, value, tb):
        import signal
        for sig in (signal.SIGINT, signal.SIGTERM):  # the launcher's SIGTERM must not cut this report short
            signal.signal(sig, lambda *_: None)
        if self._stopped.is_set() or etype is SystemExit:
            self._prev_hook(etype, value, tb)
            return
        if _peer_error(value):
            gone = self.gone_local_ranks()
            if gone:  # the peer's process is gone: one line naming it, no collective traceback
                self._exit(f"lost rank {gone[0]} ({self.who(gone[0])}): its process is gone (killed or crashed)"
                           + (f"; also gone: ranks {gone[1:]}" if gone[1:] else ""), report=True)
        self._prev_hook(etype, value, tb)
        text = f"{etype.__name__}: {value}".strip()
        if len(text) > 600:
            text = text[:600] + " ..."
        try:
            if self.store.check([f"{PREFIX}failed"]):  # someone else's failure caused ours
                self._exit(self.store.get(f"{PREFIX}failed").decode(), report=False)
            if _peer_error(value):
                # a collective failed because a peer vanished (its sockets closed): name the peer
                # whose heartbeat stopped rather than blaming this rank
                silent = self._silent_ranks(max(5.0, 5 * self.interval))
                if silent:
                    self._exit(f"lost rank {silent[0]} ({self.who(silent[0])}): its heartbeat stopped"
                               + (f" (also silent: ranks {silent[1:]})" if silent[1:] else "")
                               + f"; rank {self.rank} saw {text[:300]}", report=True)
        except Exception as e:  # noqa: BLE001 - the store is gone: so is rank 0, which hosts it
            self._exit(self._store_lost(e), report=False)
        self._exit(f"rank {self.rank} ({self.me}) failed with {text}", report=True)

    def _silent_ranks(self, window: float) -> list[int]:
        """Ranks whose heartbeat does not move during window seconds (ours keeps beating meanwhile)."""
        keys = [f"{PREFIX}hb/{r}" for r in range(self.world)]
        before = self.store.multi_get(keys)
        deadline = time.monotonic() + window
        moved = {self.rank}
        while time.monotonic() < deadline and len(moved) < self.world:
            time.sleep(self.interval)
            now = self.store.multi_get(keys)
            moved |= {r for r in range(self.world) if now[r] != before[r]}
            if self.store.check([f"{PREFIX}failed"]):
                self._exit(self.store.get(f"{PREFIX}failed").decode(), report=False)
        return [r for r in range(self.world) if r not in moved
                and not self.store.check([f"{PREFIX}done/{r}"])]

    def _store_lost(self, e: Exception) -> str:
        return (f"lost rank 0 ({self._who.get(0, 'host unknown')}): the rendezvous store it hosts at {self.addr} "
                f"stopped answering ({type(e).__name__}: {str(e)[:200]})")

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        beat = 0
        target = None
        target_value, target_since = None, time.monotonic()
        store_failing_since = None
        while not self._stopped.wait(self.interval):
            try:
                beat += 1
                self.store.set(f"{PREFIX}hb/{self.rank}", str(beat))
                if 0 not in self._who:
                    self.who(0)  # named in the message should the store (rank 0) vanish
                if self.store.check([f"{PREFIX}failed"]):
                    msg = self.store.get(f"{PREFIX}failed").decode()
                    if not self._stopped.is_set():
                        self._exit(msg, report=False)
                    return
                # watch the next rank in the ring that has not finished cleanly
                nxt = self._next_live()
                if nxt is None:
                    store_failing_since = None
                    continue
                if nxt != target:
                    target, target_value, target_since = nxt, None, time.monotonic()
                value = None
                if self.store.check([f"{PREFIX}hb/{target}"]):
                    value = self.store.get(f"{PREFIX}hb/{target}")
                now = time.monotonic()
                if value != target_value:
                    target_value, target_since = value, now
                elif now - target_since > self.timeout and not self._stopped.is_set():
                    self._exit(f"lost rank {target} ({self.who(target)}): no heartbeat for "
                               f"{now - target_since:.0f} s (watchdog_timeout {self.timeout:g} s); it died or hangs",
                               report=True)
                    return
                store_failing_since = None
            except Exception as e:  # noqa: BLE001 - any store failure
                if self._stopped.is_set():
                    return
                now = time.monotonic()
                store_failing_since = store_failing_since or now
                if now - store_failing_since >= max(3 * self.interval, 3.0):
                    self._exit(self._store_lost(e), report=False)
                    return

    def _next_live(self) -> int | None:
        for step in range(1, self.world):
            r = (self.rank + step) % self.world
            if not self.store.check([f"{PREFIX}done/{r}"]):
                return r
        return None

    # -- shutdown ------------------------------------------------------------------------
    def stop(self) -> None:
        """Normal end of the run: stop watching. Rank 0 (the store's host) waits for the others to stop first."""
        if self._stopped.is_set():
            return
        try:
            self.store.set(f"{PREFIX}done/{self.rank}", "1")  # the rank watching us moves on
        except Exception:  # noqa: BLE001
            pass
        self._stopped.set()
        self._thread.join(timeout=self.interval + 10)
        sys.excepthook = self._prev_hook
        try:
            if self.rank == 0:
                deadline = time.monotonic() + self.timeout
                others = [f"{PREFIX}done/{r}" for r in range(1, self.world)]
                while others and time.monotonic() < deadline and not self.store.check(others):
                    time.sleep(0.2)
        except Exception:  # noqa: BLE001 - nothing left to protect
            pass


def say(msg: str) -> None:
    """One ``[ppllm watchdog]`` line on stderr."""
    _say(msg)


def mark_stopping(dog: "Watchdog | None") -> None:
    """This rank stops on a signal: peers that find its process gone must not report it as lost."""
    if dog is not None:
        dog.mark_stopping()


def lost_ranks_line(dog: "Watchdog | None") -> str | None:
    """For a rank stopped by a signal (the launcher's SIGTERM after one of its ranks died): the line naming
    the rank that was lost, when one is, else None."""
    if dog is None:
        return None
    try:
        return dog.lost_line()
    except Exception:  # noqa: BLE001 - a courtesy on the way out
        return None


def _peer_error(e: BaseException) -> bool:
    """Does this exception look like a collective that failed because a peer went away?"""
    import torch.distributed as dist
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in (
        "gloo", "nccl", "connection reset", "connection closed", "broken pipe", "connection refused",
        "timed out", "timeout", "socket"))


def start(timeout: float | None = 30.0, interval: float = 1.0) -> Watchdog | None:
    """Start this rank's watchdog (after init_distributed). None when timeout is 0/None or world size 1."""
    import torch.distributed as dist
    if not timeout or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        _say("MASTER_ADDR/MASTER_PORT are not set: no watchdog (a lost rank may leave the others waiting "
             "until the process-group timeout)")
        return None
    return Watchdog(dist.get_rank(), dist.get_world_size(), host, int(port), timeout, interval)


def stop(dog: Watchdog | None) -> None:
    if dog is not None:
        dog.stop()
