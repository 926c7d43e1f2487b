"""``train_pp.py`` that, at exit, writes this rank's peak resident memory (``pipeline_efficiency.py
--schedule``): ``rank<N>.json`` = {"peak_rss_mb": ...} into ``$PPLLM_PEAK_RSS``."""
from __future__ import annotations

import atexit
import json
import os
import resource
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write() -> None:
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(os.environ["PPLLM_PEAK_RSS"], f"rank{rank}.json"), "w") as f:
        json.dump({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)


if __name__ == "__main__":
    os.makedirs(os.environ["PPLLM_PEAK_RSS"], exist_ok=True)
    atexit.register(write)
    sys.argv[0] = os.path.join(REPO, "train_pp.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
