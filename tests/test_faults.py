"""No hangs: a lost or failing rank stops every rank, with a message naming it.

The ranks are started one by one here, with the environment DeepSpeed's launcher would give
them, and NOT under the launcher: on one node the launcher itself stops the other local
ranks when one exits, which would hide whether the ranks can stop on their own, as they
must when the lost rank ran on another node (tests/test_multinode.py covers that path).
"""
import json
import os
import signal
import time

import pytest

from ppllm.watchdog import EXIT_CODE
from tests.fault_helpers import start_ranks, write_run_config
from tests.helpers import tiny_pipeline_model

pytestmark = pytest.mark.multiprocess  # DeepSpeed launches: not in make test-fast

TEXTS = [f"Sentence number {i} is about a {w} that sat on the {v} all afternoon."
         for i, (w, v) in enumerate([("cat", "mat"), ("dog", "porch"), ("bird", "fence"), ("fox", "hill"),
                                     ("owl", "branch"), ("cow", "meadow"), ("bee", "flower"), ("ant", "leaf")])]
BOUND = 60  # seconds: every rank gone after the fault
STARTUP = 240  # seconds: slow CI machines, first launch may JIT-build DeepSpeed's CPU op


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    pp, data = tiny_pipeline_model(root, TEXTS)
    return root, pp, data


def _cleanup(procs):
    for p in procs:
        p.kill_tree()


def _report(procs) -> str:
    return "\n".join(f"----- {p.name} (rc {p.proc.returncode}) -----\n{p.text[-4000:]}" for p in procs)


def _watchdog_lines(p) -> str:
    return "".join(line for line in p.lines if "[ppllm watchdog]" in line).strip()


@pytest.mark.timeout(STARTUP + BOUND + 60)
@pytest.mark.parametrize("victim,sig", [(1, signal.SIGKILL), (0, signal.SIGKILL), (1, signal.SIGSTOP)],
                         ids=["kill-rank1", "kill-rank0-store-host", "freeze-rank1"])
def test_lost_rank_stops_every_rank(tiny, victim, sig):
    """SIGKILL: the peer's sockets close, the survivor's collective fails and the watchdog names the
    rank whose heartbeat stopped. SIGSTOP (a frozen process or an unreachable machine: no error
    ever reaches the survivor): the heartbeat timeout (default 30 s) ends the wait."""
    root, pp, data = tiny
    cfg = write_run_config(root, f"lost{victim}{int(sig)}", pp, data, steps=100000)
    procs = start_ranks(cfg)
    try:
        assert procs[0].wait_for(r"^step 3/", STARTUP), "training did not start:\n" + _report(procs)
        killed_at = time.monotonic()
        os.kill(procs[victim].proc.pid, sig)
        survivor = procs[1 - victim]
        ended = survivor.wait_end(BOUND)
        assert ended is not None, f"rank {1 - victim} still running {BOUND} s after the fault:\n" + _report(procs)
        elapsed = ended - killed_at
        print(f"\n{signal.Signals(sig).name} rank {victim}: rank {1 - victim} exited {elapsed:.1f} s later "
              f"(rc {survivor.proc.returncode}): {_watchdog_lines(survivor)}")
        if sig == signal.SIGSTOP:
            procs[victim].kill_tree()
        assert procs[victim].wait_end(10) is not None
        assert survivor.proc.returncode == EXIT_CODE, _report(procs)
        assert f"lost rank {victim} (host " in survivor.text, _report(procs)
        assert elapsed < BOUND
    finally:
        _cleanup(procs)


@pytest.mark.timeout(STARTUP + BOUND + 60)
def test_rank_failing_to_load_weights_stops_every_rank(tiny):
    """A corrupt layer file on the last stage: rank 1 fails while loading; both ranks agree on it
    (ppllm.errors.agree), rank 0 prints the one-line message, and both exit 2."""
    root, pp, data = tiny
    import shutil
    bad = root / "pp_corrupt"
    shutil.copytree(pp, bad)
    last = sorted(p for p in os.listdir(bad) if p.startswith("layer_"))[-1]
    (bad / last).write_bytes(b"this is not a checkpoint" * 10)
    cfg = write_run_config(root, "badweights", bad, data, steps=3)
    t0 = time.monotonic()
    procs = start_ranks(cfg)
    try:
        ends = [p.wait_end(STARTUP + BOUND) for p in procs]
        assert all(e is not None for e in ends), "a rank hangs:\n" + _report(procs)
        print(f"\ncorrupt {last}: ranks exited {ends[0] - t0:.1f} s / {ends[1] - t0:.1f} s after launch, "
              f"{abs(ends[0] - ends[1]):.1f} s apart: {_watchdog_lines(procs[0])}")
        assert all(p.proc.returncode == 2 for p in procs), _report(procs)
        # the ranks agree on the failure: rank 0 prints the failing rank's message once, as one line
        said = [line for line in procs[0].text.splitlines() if line.startswith("error: ")]
        assert len(said) == 1 and last in said[0] and "is not a readable layer file" in said[0], _report(procs)
        assert not any(line.startswith("error: ") for line in procs[1].text.splitlines()), _report(procs)
        assert all("Traceback" not in p.text for p in procs), _report(procs)
        assert abs(ends[0] - ends[1]) < BOUND
    finally:
        _cleanup(procs)


@pytest.mark.timeout(STARTUP + 120)
def test_uneven_data_does_not_hang(tiny):
    """The first and last stage read different data (another file on one node): the ranks compare what
    they loaded before training and every rank stops at once with one line from rank 0, instead of one
    stage waiting for a batch the other never sends."""
    root, pp, data = tiny
    short = root / "short.jsonl"
    short.write_text("\n".join(data.read_text().splitlines()[:4]))  # 4 documents; the full file has 8
    cfg = write_run_config(root, "uneven", pp, data, steps=None, n_epoches=2)
    procs = start_ranks(cfg, per_rank_args={1: ["--set", f"data_path={short}"]})
    try:
        ends = [p.wait_end(STARTUP + 60) for p in procs]
        assert all(e is not None for e in ends), "a rank hangs:\n" + _report(procs)
        assert [p.proc.returncode for p in procs] == [2, 2], _report(procs)
        said = [line for line in procs[0].text.splitlines() if line.startswith("error: ")]
        assert len(said) == 1 and "the data-reading ranks see different data" in said[0], _report(procs)
        assert all("Traceback" not in p.text for p in procs), _report(procs)
        assert not (root / "uneven" / "metrics.jsonl").exists()
    finally:
        _cleanup(procs)
