"""Suite-wide hygiene: DeepSpeed's CPU communication op leaves a ~70 MB /dev/shm buffer per rank of
every launch (ppllm's own runs remove theirs; test workers, killed ranks and the HF Trainer baselines do
not). Remove the ones no live process maps after each test, so a full run does not fill memory."""
import glob
import os
import time

import sys

import pytest

# DeepSpeed JIT-builds its CPU ops into torch's extension cache, keyed by op name only: two checkouts
# with their own venvs rebuild each other's op (the include paths differ) and wait on each other's
# lock file. One cache per venv, for the suite and every process it starts.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def _mapped() -> set[str]:
    names = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                names.update(line.split()[-1] for line in f if "deepspeed_allreduce_buffer" in line)
        except OSError:
            pass
    return names


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return time.time()  # gone already: never removed here


@pytest.fixture(autouse=True)
def _release_deepspeed_shm():
    yield
    leftovers = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*")
    if leftovers:
        live = _mapped()
        now = time.time()
        for path in leftovers:
            # a buffer younger than a minute may belong to a launch starting now (another pytest on this
            # machine, or a test's background run): its rank creates the file and maps it a moment later,
            # and a peer that finds it gone spins in DeepSpeed's shm_initialize forever
            if path not in live and now - _mtime(path) > 60:
                try:
                    os.unlink(path)
                except OSError:
                    pass
