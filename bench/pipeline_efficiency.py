"""Pipeline efficiency: pipe=2 on two ranks against the ideal schedule built from one rank.

Both runs go through ``train_pp.py`` on the same random llama, the same packed rows and
the same micro-batches (micro batch b, m = gradient_accumulation_steps micro-batches per
step); each rank gets the same compute (``--threads`` per process, default 1).

  * single: dims [1, 1] on one process: every layer, m micro-batches one after the other;
  * pipe:   dims [2, 1] on two processes (1F1B schedule, ``parts: auto``).

With two equal stages the best a 1F1B schedule can do is (m + 1) slots of half a
micro-batch each, so

    ideal_pipe_time     = single_step_time * (m + 1) / (2 m)
    pipeline_efficiency = ideal_pipe_time / measured_pipe_step_time

Step times are the per-step ``step_time`` from metrics.jsonl, median over the steps after
``--warmup``, pooled over ``--rounds`` alternating single/pipe launches (the machine may be
shared; alternating spreads background load over both).  1.0 means no loss beyond the
bubble; what is lost is stage imbalance, activation send/recv and per-micro-batch overhead.
``--profile`` adds per-rank milliseconds per step for each pipeline instruction. The stage split
``parts: auto`` chose is printed with each stage's share of the cost model
(``ppllm.partition.layer_costs``). ``--vocab`` gives the model more vocabulary rows than the
tokenizer (``--vocab 8016`` at hidden 256 is llama-3's vocabulary/hidden ratio, 128256 / 4096).

``--loss-memory`` instead measures the peak memory of the head + loss alone (forward and
backward, one process each, fp32 on the CPU) chunked and unchunked, at ``--loss-vocab`` x
``--loss-hidden`` x ``--loss-seq`` tokens, against the planner's estimate.

    python bench/pipeline_efficiency.py [--micro-batches 8] [--steps 10] [--hidden 256] [--layers 8] [--profile]
    python bench/pipeline_efficiency.py --vocab 8016                 # the large-vocabulary case
    python bench/pipeline_efficiency.py --loss-memory                # vocab 128256, hidden 512, seq 2048
    python bench/pipeline_efficiency.py --calibrate                  # head + loss vs a decoder layer, timed
    python bench/pipeline_efficiency.py --schedule [--m-list 2 4 8]  # 1F1B against ZB-H1 at pipe=2

``--schedule`` runs, for each m of ``--m-list``, one process, pipe=2 under ``schedule: 1f1b`` and pipe=2
under ``schedule: zb-h1``, alternating within each round, and prints each schedule's speed-up over one
process, the share of 1F1B's bubble ZB-H1 recovers ((t_1f1b - t_zb) / (t_1f1b - t_single / 2)), and each
rank's peak resident memory; its last line is ``RESULT speedup_1f1b_m<m>=... speedup_zb_m<m>=... ...``. With
``--profile`` it also feeds each run's measured per-stage F, B, W costs to ``ppllm.schedule_sim.engine_step_time``,
prints predicted against measured step times (``sim_error_*``) and predicts p = 4, 8, 16.

The last line is ``RESULT pipeline_efficiency=<fraction> ...``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from _common import launch, load_note, log, median, read_metrics, setup_tiny, steady, write_run_config


def run(cfg_path: str, nprocs: int, threads: int, profile_dir: str | None = None, skip: int = 3) -> float:
    script = "train_pp.py"
    env = None
    if profile_dir:  # the same run with every pipeline instruction timed (bench/_pipe_profile.py)
        script = "bench/_pipe_profile.py"
        env = {"PPLLM_PIPE_PROFILE": profile_dir, "PPLLM_PIPE_PROFILE_SKIP": str(skip)}
    _, wall = launch([script, "--config", cfg_path, "--quiet"], nprocs, threads=threads, env=env)
    return wall


def run_peak(cfg_path: str, nprocs: int, threads: int, folder: str, profile_dir: str | None = None,
             skip: int = 3) -> tuple[float, list[float]]:
    """A run with each rank's peak resident memory recorded (bench/_peak_rss.py; with ``profile_dir``
    through bench/_pipe_profile.py, every pipeline instruction timed): (wall, [MB per rank])."""
    import json
    env = {"PPLLM_PEAK_RSS": folder}
    script = "bench/_peak_rss.py"
    if profile_dir:
        script = "bench/_pipe_profile.py"
        env.update(PPLLM_PIPE_PROFILE=profile_dir, PPLLM_PIPE_PROFILE_SKIP=str(skip))
    _, wall = launch([script, "--config", cfg_path, "--quiet"], nprocs, threads=threads, env=env)
    peaks = []
    for r in range(nprocs):
        with open(os.path.join(folder, f"rank{r}.json")) as f:
            peaks.append(json.load(f)["peak_rss_mb"])
    return wall, peaks


def compare_schedules(a, s: dict, tmp: str) -> None:
    """1F1B against ZB-H1 at pipe=2 for each m, with one process as the baseline, alternating."""
    times = {(kind, m): [] for m in a.m_list for kind in ("single", "1f1b", "zb-h1")}
    peaks = {key: [] for key in times}
    for r in range(a.rounds):
        for m in a.m_list:
            common = dict(pp_dir=s["pp"], data=s["data"], seq=a.seq, mbs=a.micro_batch, gas=m, steps=a.steps)
            tokens = None
            for kind, dims in (("single", [1, 1]), ("1f1b", [2, 1]), ("zb-h1", [2, 1])):
                save = os.path.join(tmp, f"{kind}_m{m}_r{r}")
                extra = {"schedule": kind} if kind != "single" else None
                cfg = write_run_config(save + ".yml", save_path=save, dims=dims, extra=extra, **common)
                prof = save + "_profile" if a.profile else None
                wall, peak = run_peak(cfg, dims[0], a.threads, save + "_rss", prof, a.warmup)
                recs = read_metrics(save)
                if tokens is None:
                    tokens = [x["tokens"] for x in recs]
                assert [x["tokens"] for x in recs] == tokens, "the runs saw different batches"
                steps = steady([x["step_time"] for x in recs], a.warmup)
                times[kind, m] += steps
                peaks[kind, m].append(peak)
                log(f"round {r + 1} m={m}: {kind:6s} {median(steps):.3f} s/step (median of {len(steps)}, min "
                    f"{min(steps):.3f}); peak RSS per rank {', '.join(f'{x:.0f}' for x in peak)} MB; bubble field "
                    f"{recs[-1]['bubble']}; wall {wall:.1f} s; {load_note()}")
                if prof:
                    print_profile(f"{kind} m={m}", prof)
    result = []
    log("m  single s/step  1f1b s/step (speed-up)  zb-h1 s/step (speed-up)  1F1B bubble recovered  "
        "peak RSS MB per rank 1f1b | zb-h1 (max over rounds)")
    for m in a.m_list:
        t1, tf, tz = (median(times[k, m]) for k in ("single", "1f1b", "zb-h1"))
        recovered = (tf - tz) / (tf - t1 / 2) if tf > t1 / 2 else float("nan")
        pk = {k: [max(p[i] for p in peaks[k, m]) for i in range(2)] for k in ("1f1b", "zb-h1")}
        log(f"{m:<2} {t1:13.3f}  {tf:11.3f} ({t1 / tf:.3f}x)  {tz:12.3f} ({t1 / tz:.3f}x)  {recovered:21.3f}  "
            f"{pk['1f1b'][0]:.0f}, {pk['1f1b'][1]:.0f} | {pk['zb-h1'][0]:.0f}, {pk['zb-h1'][1]:.0f}")
        result += [f"speedup_1f1b_m{m}={t1 / tf:.3f}", f"speedup_zb_m{m}={t1 / tz:.3f}",
                   f"bubble_recovered_m{m}={recovered:.3f}",
                   f"peak_mb_zb_over_1f1b_m{m}={max(pk['zb-h1']) / max(pk['1f1b']):.3f}"]
    if a.profile:
        result += validate_simulator(a, times, tmp)
    log(f"after the runs: {load_note()}")
    log("RESULT " + " ".join(result))


def measured_costs(folders: list[str]):
    """Per-stage costs of one kind of pipe=2 run, pooled over its rounds' instruction profiles
    (bench/_pipe_profile.py): seconds per micro-batch of F, B (ZB-H1's input backward, or 1F1B's whole
    backward), W, loading; per step the reductions + optimizer step after the stages meet (the fastest
    rank's: the others also wait there); the time a rank spends outside any instruction is spread over
    its forwards. ``comm``: the fastest send or receive seen (one transfer without waiting)."""
    import json

    from ppllm.schedule_sim import StageCosts
    pooled: dict[int, dict[str, list[float]]] = {}
    for folder in folders:
        for name in os.listdir(folder):
            with open(os.path.join(folder, name)) as f:
                prof = json.load(f)
            rank = pooled.setdefault(int(name[4:-5]), {})
            for k, (sec, calls, *fast) in prof.items():
                rec = rank.setdefault(k, [0.0, 0, float("inf")])
                rec[0] += sec
                rec[1] += calls
                rec[2] = min(rec[2], fast[0] if fast else float("inf"))
    stages, ends, comm = [], [], float("inf")
    for r in sorted(pooled):
        prof = pooled[r]
        steps = prof["train_batch"][1]

        def per_call(k):
            return prof[k][0] / prof[k][1] if prof.get(k, [0, 0])[1] else 0.0
        m = prof["forward_pass"][1] / steps
        outside = (prof["train_batch"][0] - sum(v[0] for k, v in prof.items() if k != "train_batch")) / steps
        ends.append(sum(prof.get(k, [0.0])[0] for k in ("optimizer_step", "reduce_grads", "reduce_tied_grads")) / steps)
        b = per_call("backward_input") if "backward_input" in prof else per_call("backward_pass")
        stages.append(StageCosts(per_call("forward_pass") + outside / m, b, per_call("weight_pass"),
                                 per_call("load_micro_batch")))
        comm = min([comm] + [prof[k][2] for k in ("send_activations", "recv_activations", "send_grads", "recv_grads")
                             if k in prof])
    for st in stages:
        st.end = min(ends)
    return stages, comm


def validate_simulator(a, times: dict, tmp: str) -> list[str]:
    """The step time ppllm.schedule_sim.engine_step_time predicts for each run from its own measured costs,
    against the measured median; then predictions for deeper pipelines from the ZB-H1 costs of the largest m."""
    from ppllm.schedule_sim import StageCosts, engine_step_time, simulate
    log("simulator validation (pipe=2; each run's measured per-stage costs -> predicted step time):")
    log("m  schedule  F ms (stage 0, 1)  B ms  W ms  comm ms  predicted s  measured s  error")
    out, costs = [], {}
    for m in a.m_list:
        for kind in ("1f1b", "zb-h1"):
            folders = [os.path.join(tmp, f"{kind}_m{m}_r{r}_profile") for r in range(a.rounds)]
            stages, comm = measured_costs(folders)
            costs[kind, m] = stages, comm
            pred = engine_step_time(kind, m, stages, comm)
            meas = median(times[kind, m])
            err = pred / meas - 1
            log(f"{m:<2} {kind:8s}  {stages[0].f * 1e3:6.1f}, {stages[1].f * 1e3:6.1f}  "
                f"{stages[0].b * 1e3:5.1f}, {stages[1].b * 1e3:5.1f}  {stages[0].w * 1e3:4.1f}, {stages[1].w * 1e3:4.1f}  "
                f"{comm * 1e3:6.2f}  {pred:10.3f}  {meas:10.3f}  {err:+.1%}")
            out.append(f"sim_error_{kind.replace('-', '')}_m{m}={err:+.3f}")
    stages, comm = costs["zb-h1", max(a.m_list)]
    first, last = stages
    middle = StageCosts(first.f, first.b, first.w, 0.0, first.end)
    log(f"predicted deeper pipelines (stages like the measured ones: stage 0, p - 2 x stage 0 without its "
        f"loading, the head + loss stage; ZB-H1 costs of m={max(a.m_list)}):")
    log("p   m    1F1B s   ZB-H1 ppllm s (vs 1F1B)   ZB-H1 free-running s (vs 1F1B)")
    for p in (4, 8, 16):
        deep = [first] + [middle] * (p - 2) + [last]
        for m in (p, 2 * p, 4 * p):
            one = engine_step_time("1f1b", m, deep, comm)
            zb = engine_step_time("zb-h1", m, deep, comm)
            free = simulate("zb-h1", p, m, [st.f + st.load for st in deep], [st.b for st in deep],
                            [st.w for st in deep], comm, w_cap=p).step_time + first.end
            log(f"{p:<3} {m:<4} {one:7.3f}  {zb:7.3f} ({one / zb:.3f}x)        {free:7.3f} ({one / free:.3f}x)")
            if m == 2 * p:
                out.append(f"predicted_zb_over_1f1b_p{p}_m{m}={one / zb:.3f}")
    return out


def print_profile(label: str, folder: str) -> None:
    import json
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            prof = json.load(f)
        steps = max(1, prof["train_batch"][1])
        total = prof["train_batch"][0] / steps
        parts = {k: v[0] / steps for k, v in prof.items() if k != "train_batch" and v[1]}
        other = total - sum(parts.values())
        cells = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        log(f"  {label} {name[:-5]}: {total * 1e3:.0f} ms per step = {cells}, other {other * 1e3:.0f} (ms)")


LOSS_CHILD = """
import resource, sys, time, torch
torch.set_num_threads(1)
from models.common import HeadOutput, TokenLoss
mode, V, H, S = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
h = torch.randn(1, S, H, generator=g).requires_grad_()
w = (torch.randn(V, H, generator=g) * 0.02).requires_grad_()
labels = torch.randint(0, V, (1, S), generator=g)
w.grad = torch.zeros_like(w)  # the parameter gradient exists in training (accumulation): not the loss's memory
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
out = HeadOutput(h, w)
loss = TokenLoss()(out if mode == "chunked" else out.logits(), labels)
loss.backward()
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"RESULT peak_mb={(peak - base) / 1024:.1f} seconds={dt:.3f} loss={loss.item():.6f}")
"""


def loss_memory(a) -> None:
    import subprocess

    from _common import PY, REPO, run_env
    res = {}
    for mode in ("unchunked", "chunked"):
        p = subprocess.run([PY, "-c", LOSS_CHILD, mode, str(a.loss_vocab), str(a.loss_hidden), str(a.loss_seq)],
                           cwd=REPO, env=run_env(threads=1), capture_output=True, text=True, check=True)
        line = p.stdout.strip().splitlines()[-1]
        res[mode] = {k: float(v) for k, v in (x.split("=") for x in line.split()[1:])}
        log(f"head + loss, {mode:9s}: peak {res[mode]['peak_mb']:.0f} MB above the inputs, "
            f"{res[mode]['seconds']:.2f} s forward + backward, loss {res[mode]['loss']:.6f}")
    from models import get_family
    from ppllm.planner import Setup, head_loss_bytes
    margs = get_family("llama").parse_config(dict(model_type="llama", vocab_size=a.loss_vocab, hidden_size=a.loss_hidden,
                                                  intermediate_size=4 * a.loss_hidden, num_hidden_layers=1,
                                                  num_attention_heads=8, rms_norm_eps=1e-5))
    s = Setup(pipe=1, data=1, micro_batch=1, grad_accum=1, seq_len=a.loss_seq, precision="fp32")
    log(f"planner estimate: chunked {head_loss_bytes(margs, s) / 2**20:.0f} MiB + the head gradient "
        f"{4 * a.loss_vocab * a.loss_hidden / 2**20:.0f} MiB (counted with the gradients there), unchunked "
        f"{head_loss_bytes(margs, s, chunked=False) / 2**20:.0f} MiB; {load_note()}")
    ratio = res["chunked"]["peak_mb"] / res["unchunked"]["peak_mb"]
    log(f"RESULT loss_memory_ratio={ratio:.3f} chunked_mb={res['chunked']['peak_mb']:.0f} "
        f"unchunked_mb={res['unchunked']['peak_mb']:.0f} time_ratio={res['chunked']['seconds'] / res['unchunked']['seconds']:.3f}")


def calibrate() -> None:
    """One decoder layer and the head + loss, forward + backward, timed (best of 5, one thread)
    against the cost model's ratio (ppllm.partition.layer_costs)."""
    import time

    import torch

    from models import get_family
    from models.common import StageContext, TokenLoss
    from ppllm.partition import layer_costs
    torch.set_num_threads(1)
    fam = get_family("llama")

    def best(fn, n=5):
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return min(out)
    for H, V, S, B in ((256, 2000, 256, 2), (256, 8016, 256, 2), (512, 16032, 256, 1)):
        margs = fam.parse_config(dict(model_type="llama", vocab_size=V, hidden_size=H, rms_norm_eps=1e-5,
                                      intermediate_size=int(H * 2.75) // 8 * 8, num_hidden_layers=1,
                                      num_attention_heads=H // 32, num_key_value_heads=H // 64))
        layers = fam.layers(margs, StageContext())
        dec, head = layers[1].build(), layers[3].build()
        x = torch.randn(B, S, H, requires_grad=True)
        pos, doc = torch.arange(S).expand(B, S), torch.zeros(B, S, dtype=torch.long)
        labels = torch.randint(0, V, (B, S))
        t_dec = best(lambda: dec((x, pos, doc))[0].sum().backward())
        t_head = best(lambda: TokenLoss()(head((x, pos, doc)), labels).backward())
        costs = layer_costs(fam, margs, S)
        log(f"hidden {H}, vocab {V}, {B} x {S} tokens: decoder {t_dec * 1e3:.1f} ms, head + loss "
            f"{t_head * 1e3:.1f} ms: measured head/decoder {t_head / t_dec:.3f}, cost model "
            f"{costs[3] / costs[1]:.3f}; {load_note()}")


def stage_split(pp_dir: str, seq: int, mbs: int, gas: int) -> str:
    """The stages parts: auto picks for pipe=2 and each one's share of the cost model."""
    from models import load_family
    from ppllm.partition import layer_costs, parts_from_bounds
    from ppllm.planner import Setup, propose_bounds
    family, margs = load_family(pp_dir)
    s = Setup(pipe=2, data=1, micro_batch=mbs, grad_accum=gas, seq_len=seq, precision="fp32")
    bounds = propose_bounds(family, margs, s)
    costs = layer_costs(family, margs, seq)
    shares = [sum(costs[bounds[i]:bounds[i + 1]]) / sum(costs) for i in range(2)]
    head = costs[-1] / max(c for c, k in zip(costs, family.layer_kinds(margs)) if k == "decoder")
    return (f"parts: auto -> {parts_from_bounds(bounds)}; cost-model compute share per stage "
            f"{shares[0]:.3f} / {shares[1]:.3f} (head + loss = {head:.2f} decoder layers)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro-batches", type=int, default=8, help="m = gradient_accumulation_steps")
    p.add_argument("--micro-batch", type=int, default=2, help="rows per micro-batch")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--rounds", type=int, default=2, help="alternating single/pipe runs; steps are pooled")
    p.add_argument("--keep", default=None, help="keep the work folder here instead of a temp dir")
    p.add_argument("--profile", action="store_true", help="time every pipeline instruction per rank (ms per step)")
    p.add_argument("--vocab", type=int, default=None, help="model vocabulary (default: the tokenizer's, 2000)")
    p.add_argument("--loss-memory", action="store_true", help="only measure the head + loss peak memory")
    p.add_argument("--calibrate", action="store_true", help="only time one decoder layer and the head + loss "
                   "against the cost model")
    p.add_argument("--schedule", action="store_true", help="1F1B against ZB-H1 at pipe=2 for each m of --m-list")
    p.add_argument("--m-list", type=int, nargs="+", default=[2, 4, 8], help="micro-batches per step (--schedule)")
    p.add_argument("--loss-vocab", type=int, default=128256)
    p.add_argument("--loss-hidden", type=int, default=512)
    p.add_argument("--loss-seq", type=int, default=2048)
    a = p.parse_args()
    if a.loss_memory:
        return loss_memory(a)
    if a.calibrate:
        return calibrate()
    m = max(a.m_list) if a.schedule else a.micro_batches

    tmp = a.keep or tempfile.mkdtemp(prefix="bench_pipe_")
    try:
        rows_needed = (a.steps + 1) * m * a.micro_batch
        words = a.seq * 0.45  # ~2.2 tokens per made-up word with a 2000-piece vocab
        s = setup_tiny(os.path.join(tmp, "m"), n_docs=int(rows_needed * 1.3) + 50, mean_words=words,
                       hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.75) // 8 * 8,
                       num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 32),
                       num_key_value_heads=max(1, a.hidden // 64), max_position_embeddings=max(512, a.seq),
                       model_vocab=a.vocab)
        common = dict(pp_dir=s["pp"], data=s["data"], seq=a.seq, mbs=a.micro_batch, gas=m, steps=a.steps)
        log(stage_split(s["pp"], a.seq, a.micro_batch, m))
        if a.schedule:
            log(f"model: llama hidden {a.hidden}, {a.layers} layers; {a.micro_batch} x {a.seq} tokens per "
                f"micro-batch; m in {a.m_list}; {a.steps} steps ({a.warmup} warm-up) x {a.rounds} round(s); "
                f"{a.threads} thread(s) per process; {load_note()}")
            return compare_schedules(a, s, tmp)
        log(f"model: llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab or 'of the tokenizer'}; {m} micro-batches of {a.micro_batch} x {a.seq} "
            f"tokens per step; {a.steps} steps ({a.warmup} warm-up) x {a.rounds} round(s); {a.threads} thread(s) "
            f"per process; {load_note()}")

        times = {"single": [], "pipe": []}
        per_round = []
        prof = {}
        for r in range(a.rounds):  # alternate the two, so background load hits both alike
            med = {}
            for kind, dims, nprocs in (("single", [1, 1], 1), ("pipe", [2, 1], 2)):
                save = os.path.join(tmp, f"{kind}{r}")
                cfg = write_run_config(os.path.join(tmp, f"{kind}{r}.yml"), save_path=save, dims=dims, **common)
                prof[kind] = os.path.join(tmp, f"profile_{kind}{r}") if a.profile else None
                wall = run(cfg, nprocs, a.threads, prof[kind], a.warmup)
                recs = read_metrics(save)
                steps = steady([x["step_time"] for x in recs], a.warmup)
                times[kind] += steps
                med[kind] = median(steps)
                if kind == "single":
                    tokens = [x["tokens"] for x in recs]
                    tok = median(steady(tokens, a.warmup))
                else:
                    assert [x["tokens"] for x in recs] == tokens, "the two runs saw different batches"
                log(f"round {r + 1}: {kind:6s} {med[kind]:.3f} s/step (median of {len(steps)}; min {min(steps):.3f}); "
                    f"process wall {wall:.1f} s; {load_note()}")
            per_round.append(med["single"] * (m + 1) / (2 * m) / med["pipe"])
        t_single, t_pipe = median(times["single"]), median(times["pipe"])
        ideal = t_single * (m + 1) / (2 * m)
        eff = ideal / t_pipe
        eff_min = min(times["single"]) * (m + 1) / (2 * m) / min(times["pipe"])
        log(f"single rank (dims [1,1]): {t_single:.3f} s/step, {tok / t_single:,.0f} tok/s")
        log(f"pipe=2     (dims [2,1]): {t_pipe:.3f} s/step, {tok / t_pipe:,.0f} tok/s")
        log(f"ideal pipe=2 step = single x (m+1)/(2m) = {t_single:.3f} x {(m + 1) / (2 * m):.4f} = {ideal:.3f} s")
        log(f"speed-up {t_single / t_pipe:.3f}x (ideal {2 * m / (m + 1):.3f}x); efficiency per round "
            f"{', '.join(f'{e:.3f}' for e in per_round)}; from the fastest steps {eff_min:.3f}")
        if a.profile:
            log("per-instruction time, ms per optimizer step (steps after the warm-up):")
            print_profile("single", prof["single"])
            print_profile("pipe", prof["pipe"])
        log(f"after the runs: {load_note()}")
        log(f"RESULT pipeline_efficiency={eff:.3f} speedup={t_single / t_pipe:.3f} ideal_speedup={2 * m / (m + 1):.3f} "
            f"efficiency_fastest_steps={eff_min:.3f}")
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
