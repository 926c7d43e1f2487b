"""The benchmark scripts' cheap paths still run and end with a parseable RESULT line.

No timing is asserted: these only keep bench/ alive on a CPU-only machine.
"""
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.multiprocess  # DeepSpeed launches: not in make test-fast


def run_bench(args: list[str], timeout: int) -> dict[str, float]:
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable] + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{args} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("RESULT "), p.stdout[-2000:]
    values = {}
    for item in lines[-1].split()[1:]:
        key, _, value = item.partition("=")
        values[key] = float(value)
    return values


# The first DeepSpeed process on a fresh machine compiles its CPU communication op (about a minute).
@pytest.mark.timeout(900)
def test_gpu_check_smoke(tmp_path):
    """make gpu-check's path on the CPU: probe, kernels vs fp32, a real launch with resume and export,
    and bench/gpu_mfu.py --smoke; every row must pass."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "scripts/gpu_check.py", "--smoke", "--work", str(tmp_path / "w"),
                        "--out", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=880)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    table = (tmp_path / "out" / "gpu_check.md").read_text().splitlines()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table[2:]}
    assert rows == {"probe": "ok", "kernels": "ok", "launch": "ok", "mfu": "ok"}, table
    assert "mfu_ppllm=" in table[-1] and "resumed 2" in "\n".join(table)


@pytest.mark.timeout(600)
def test_stage_startup_builds_the_same_weights_both_ways(tmp_path):
    """bench/stage_startup.py --smoke: the meta-built stage holds exactly the weights of the old path."""
    r = run_bench(["bench/stage_startup.py", "--smoke", "--work", str(tmp_path)], timeout=580)
    assert r["weights_mib"] > 0 and r["rss_before_mib"] > 0 and r["rss_after_mib"] > 0


@pytest.mark.timeout(240)
def test_convert_tiny():
    r = run_bench(["bench/convert.py", "--size-gb", "0.01", "--small-gb", "0", "--hidden", "128", "--vocab", "2000"],
                  timeout=220)
    assert set(r) == {"hg_to_pp_vs_cp", "pp_to_hg_vs_cp", "peak_rss_mb"}
    assert r["peak_rss_mb"] > 0


@pytest.mark.timeout(180)
def test_layers_vs_hf_tiny():
    r = run_bench(["bench/layers_vs_hf.py", "--repeats", "2", "--warmup", "1", "--hidden", "64", "--layers", "2",
                   "--seq", "64", "--vocab", "512", "--docs", "2"], timeout=160)
    assert set(r) == {"layers_vs_hf"} and r["layers_vs_hf"] > 0


@pytest.mark.timeout(240)
def test_data_throughput_pretrain_tiny():
    r = run_bench(["bench/data_throughput.py", "--pretrain", "--mb", "6", "--rounds", "1", "--workers", "2"],
                  timeout=220)
    assert set(r) == {"tokens_kept", "prepare_vs_tokenizer", "prepare_vs_tokenizer_cpu", "rss_mb_quarter",
                      "rss_mb_full", "worker_rss_mb_quarter", "worker_rss_mb_full"}
    assert r["tokens_kept"] == 1.0 and r["worker_rss_mb_full"] > 0


@pytest.mark.timeout(400)
def test_data_throughput_formats_tiny():
    r = run_bench(["bench/data_throughput.py", "--formats", "--mb", "2", "--rounds", "1"], timeout=380)
    assert set(r) == {"parquet_vs_tokenizer_cpu", "zst_vs_tokenizer_cpu", "jsonl_vs_tokenizer_cpu",
                      "two_preparers_speedup", "two_preparers_cpu_ratio", "rss_mb_parquet_quarter",
                      "rss_mb_parquet_full", "rss_mb_zst_quarter", "rss_mb_zst_full"}
    assert r["parquet_vs_tokenizer_cpu"] > 0 and r["rss_mb_parquet_full"] > 0


@pytest.mark.timeout(600)
def test_long_context_smoke():
    """bench/long_context.py --smoke: one llama layer, dense vs blockwise at S = 1024 and 2048."""
    r = run_bench(["bench/long_context.py", "--smoke"], timeout=580)
    assert r["mem_ratio"] > 0 and r["time_ratio_1k"] > 0
