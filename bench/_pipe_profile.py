"""``train_pp.py`` with every pipeline instruction timed (``pipeline_efficiency.py --profile``).

DeepSpeed's own ``wall_clock_breakdown`` stops the pipeline engine with "bwd_microstep
timer has already been started", so this wraps the engine's instruction handlers
instead and adds up seconds per instruction on each rank.  After the run each rank
writes ``rank<N>.json`` into ``$PPLLM_PIPE_PROFILE``: {instruction: [seconds, calls, fastest call]}
for the steps after the first ``$PPLLM_PIPE_PROFILE_SKIP`` (default 3).
"""
from __future__ import annotations

import json
import os
import runpy
import sys
import time
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install(out_dir: str, skip: int) -> None:
    from deepspeed.runtime.pipe.engine import PipelineEngine
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, float("inf")])  # seconds, calls, fastest call
    state = {"batches": 0, "t_batch": 0.0}

    def wrap(fn):
        label = fn.__name__.replace("_exec_", "")

        def timed(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = fn(self, *args, **kwargs)
            if state["batches"] >= skip:
                rec, took = totals[label], time.perf_counter() - t0
                rec[0] += took
                rec[1] += 1
                rec[2] = min(rec[2], took)
            return out
        return timed

    # the engine dispatches through this class-level table, not through attribute lookup
    for cls, fn in list(PipelineEngine._INSTRUCTION_MAP.items()):
        PipelineEngine._INSTRUCTION_MAP[cls] = wrap(fn)
    train_batch = PipelineEngine.train_batch

    def counted(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = train_batch(self, *args, **kwargs)
        if state["batches"] >= skip:
            state["t_batch"] += time.perf_counter() - t0
        state["batches"] += 1
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"train_batch": [state["t_batch"], max(0, state["batches"] - skip)], **totals}, f)
        return out
    PipelineEngine.train_batch = counted

    # ZB-H1's B and W handlers live on the engine instance (ppllm.ds_compat.use_zb_h1): time them too
    from ppllm import ds_compat
    use_zb_h1 = ds_compat.use_zb_h1

    def use_zb_h1_timed(engine):
        n = use_zb_h1(engine)
        for cls in (ds_compat.BackwardInput, ds_compat.WeightPass):
            engine._INSTRUCTION_MAP[cls] = wrap(engine._INSTRUCTION_MAP[cls])
        return n
    ds_compat.use_zb_h1 = use_zb_h1_timed


if __name__ == "__main__":
    out = os.environ["PPLLM_PIPE_PROFILE"]
    os.makedirs(out, exist_ok=True)
    install(out, int(os.environ.get("PPLLM_PIPE_PROFILE_SKIP", "3")))
    if os.environ.get("PPLLM_PEAK_RSS"):  # pipeline_efficiency.py --schedule --profile: peak memory as well
        import atexit
        from _peak_rss import write  # bench/ is this script's folder, first on sys.path
        os.makedirs(os.environ["PPLLM_PEAK_RSS"], exist_ok=True)
        atexit.register(write)
    sys.argv[0] = os.path.join(REPO, "train_pp.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
