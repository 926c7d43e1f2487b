"""Step time of a pipeline schedule from per-stage costs: 1F1B against ZB-H1.

Each stage runs, for every micro-batch, a forward F, a backward B and, under ZB-H1, the backward's
weight-gradient half W split off from B (B then only carries the gradient of the stage's input).

    F(s, i) needs F(s-1, i) plus one activation transfer,
    B(s, i) needs B(s+1, i) plus one gradient transfer, and F(s, i),
    W(s, i) needs B(s, i).

A stage runs one operation at a time, picking, whenever it is idle, the first that is ready of:
a backward (it unblocks the stage before), a forward while fewer than ``p - s`` micro-batches hold
activations on the stage, else a deferred W. A micro-batch holds its activations from its F until
its B, so both schedules keep at most ``p - s`` micro-batches' activations on stage s (1F1B's
peak); between its B and its W, ZB-H1 keeps only what W needs (each weight's input and output
gradient), counted apart as pending W's. Under 1F1B, W is part of B (its cost is added to B's). With equal costs and free transfers this reproduces the closed forms:
1F1B ``(m + p - 1)(F + B + W)``; ZB-H1 ``m (F + B + W) + (p - 1)(F + B - W)`` when W <= F, B.

    from ppllm.schedule_sim import simulate
    simulate("zb-h1", p=8, m=16, f=[1.0] * 8, b=[1.0] * 8, w=[1.0] * 8).step_time
"""
from __future__ import annotations

from dataclasses import dataclass, field

SCHEDULES = ("1f1b", "zb-h1")


@dataclass
class Result:
    schedule: str
    step_time: float
    busy: list[float]                     # per stage: time spent computing
    peak_in_flight: list[int]             # per stage: most micro-batches holding activations at once
    peak_pending_w: list[int]             # per stage: most deferred W's (their inputs and gradients kept)
    timeline: list[list[tuple[str, int, float, float]]] = field(repr=False)  # (op, micro-batch, start, end)

    @property
    def bubble(self) -> float:
        """Fraction of the stages' time idle within the step."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.step_time)


def _per_stage(x, p: int, name: str) -> list[float]:
    values = [float(x)] * p if isinstance(x, (int, float)) else [float(v) for v in x]
    if len(values) != p or any(v < 0 for v in values):
        raise ValueError(f"{name}: {p} non-negative costs expected, got {x!r}")
    return values


def simulate(schedule: str, p: int, m: int, f, b, w, comm: float = 0.0, w_cap=None) -> Result:
    """``f``, ``b``, ``w``: costs per stage (a number for all, or a list of ``p``); ``comm``: one
    activation or gradient transfer between neighbouring stages. ``w_cap`` (ZB-H1; a number for all
    stages or a list of ``p``): once a stage holds that many deferred W's, its next W goes before a new
    F (default: no bound, F always first, so W's pile up to the end of the step). The pipeline's
    ZB-H1 (``ppllm.ds_compat.ZBH1Schedule``) bounds them at ``p``: with equal costs the same step time."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: one of {', '.join(SCHEDULES)}")
    if p < 1 or m < 1:
        raise ValueError(f"p={p}, m={m}: both must be at least 1")
    f, b, w = _per_stage(f, p, "f"), _per_stage(b, p, "b"), _per_stage(w, p, "w")
    cap = _per_stage(w_cap, p, "w_cap") if w_cap is not None else None
    split = schedule == "zb-h1"
    if not split:
        b, w = [bi + wi for bi, wi in zip(b, w)], [0.0] * p
    limit = [p - s for s in range(p)]
    f_end = [[None] * m for _ in range(p)]
    b_end = [[None] * m for _ in range(p)]
    next_f, next_b, next_w = [0] * p, [0] * p, [0] * p
    free_at = [0.0] * p
    in_flight, peak = [0] * p, [0] * p
    pending_w, peak_w = [0] * p, [0] * p
    busy = [0.0] * p
    timeline: list[list[tuple[str, int, float, float]]] = [[] for _ in range(p)]
    done = 0
    total = p * m * (3 if split else 2)

    def ready(s: int) -> tuple[float, str] | None:
        """The operation stage s runs next and the earliest time it can start."""
        options = []
        i = next_b[s]
        if i < next_f[s]:  # its forward ran here
            if s == p - 1:
                options.append((f_end[s][i], 0, "B"))
            elif b_end[s + 1][i] is not None:
                options.append((b_end[s + 1][i] + comm, 0, "B"))
        i = next_f[s]
        if i < m and in_flight[s] < limit[s]:
            if s == 0:
                options.append((0.0, 1, "F"))
            elif f_end[s - 1][i] is not None:
                options.append((f_end[s - 1][i] + comm, 1, "F"))
        if split and next_w[s] < next_b[s]:
            urgent = cap is not None and next_b[s] - next_w[s] >= cap[s]
            options.append((b_end[s][next_w[s]], -1 if urgent else 2, "W"))
        if not options:
            return None
        start = min(max(t, free_at[s]) for t, _, _ in options)
        # of what can start at that moment, the highest priority (B, then F, then W)
        chosen = min((prio, op) for t, prio, op in options if max(t, free_at[s]) <= start)
        return start, chosen[1]

    while done < total:
        candidates = [(r[0], s, r[1]) for s in range(p) if (r := ready(s)) is not None]
        if not candidates:
            raise RuntimeError("schedule deadlocked")  # cannot happen with the in-flight bound >= 1
        start, s, op = min(candidates)
        if op == "F":
            i = next_f[s]
            end = start + f[s]
            f_end[s][i] = end
            next_f[s] += 1
            in_flight[s] += 1
            peak[s] = max(peak[s], in_flight[s])
        elif op == "B":
            i = next_b[s]
            end = start + b[s]
            b_end[s][i] = end
            next_b[s] += 1
            in_flight[s] -= 1
            if split:
                pending_w[s] += 1
                peak_w[s] = max(peak_w[s], pending_w[s])
        else:
            i = next_w[s]
            end = start + w[s]
            next_w[s] += 1
            pending_w[s] -= 1
        free_at[s] = end
        busy[s] += end - start
        timeline[s].append((op, i, start, end))
        done += 1
    return Result(schedule, max(free_at), busy, peak, peak_w, timeline)


def time_streams(streams: list[list], cost, comm: float = 0.0, blocking: bool = True,
                 done: list[list] | None = None) -> float:
    """Step time of every stage's DeepSpeed instruction stream (``streams[s]``: the stage's instructions
    in order) with ``cost(stage, instruction)`` seconds of compute each and transfers of ``comm``.
    ``blocking``: a send and its receive complete together (gloo's and NCCL's point-to-point as DeepSpeed
    issues them); otherwise a send returns at once and its receive completes ``comm`` after both were
    posted. ``OptimizerStep`` waits for every stage (the step's gradient norm is reduced across stages).
    ``done``: if given (one list per stage), each stage's instructions are appended in the order they
    complete. A deadlock raises RuntimeError."""
    from ppllm.ds_compat import ds_schedule as S
    peer = {S.SendActivation: (1, S.RecvActivation), S.SendGrad: (-1, S.RecvGrad)}
    p = len(streams)
    at, t = [0] * p, [0.0] * p
    posted: dict = {}
    count: dict = {}

    def advance(s: int) -> None:
        if done is not None:
            done[s].append(streams[s][at[s]])
        at[s] += 1

    while any(at[s] < len(streams[s]) for s in range(p)):
        moved = False
        for s in range(p):
            if at[s] >= len(streams[s]):
                continue
            c = streams[s][at[s]]
            kind = type(c)
            if kind in peer and not blocking:
                n = count[s, kind] = count.get((s, kind), 0) + 1
                posted[s + peer[kind][0], peer[kind][1], n] = t[s]
                advance(s)
                moved = True
            elif kind in peer:
                o = s + peer[kind][0]
                if at[o] < len(streams[o]) and type(streams[o][at[o]]) is peer[kind][1]:
                    t[s] = t[o] = max(t[s], t[o]) + comm
                    advance(s)
                    advance(o)
                    moved = True
            elif kind in (S.RecvActivation, S.RecvGrad):
                if not blocking:
                    n = count.get((s, kind), 0) + 1
                    if (s, kind, n) in posted:
                        count[s, kind] = n
                        t[s] = max(t[s], posted[s, kind, n] + comm)
                        advance(s)
                        moved = True
            elif kind is S.OptimizerStep:
                if all(at[o] < len(streams[o]) and type(streams[o][at[o]]) is S.OptimizerStep for o in range(p)):
                    start = max(t)
                    for o in range(p):
                        t[o] = start + cost(o, streams[o][at[o]])
                        advance(o)
                    moved = True
            else:
                t[s] += cost(s, c)
                advance(s)
                moved = True
        if not moved:
            heads = [streams[s][at[s]] if at[s] < len(streams[s]) else None for s in range(p)]
            raise RuntimeError(f"the instruction streams deadlocked at {heads}")
    return max(t)


@dataclass
class StageCosts:
    """Seconds per micro-batch on one stage: forward ``f``, input backward ``b``, weight backward ``w``,
    loading a micro-batch ``load`` (first and last stage); per step: ``end`` (gradient reductions and the
    optimizer step, after the stages meet)."""
    f: float
    b: float
    w: float
    load: float = 0.0
    end: float = 0.0


def engine_step_time(schedule: str, m: int, stages: list[StageCosts], comm: float = 0.0,
                     blocking: bool = True) -> float:
    """Step time of ppllm's pipeline engine: DeepSpeed's own 1F1B instruction streams, or ppllm's ZB-H1
    streams (``ppllm.ds_compat.ZBH1Schedule``: the same transfers, W's placed in them), for ``len(stages)``
    stages with measured per-stage costs, timed by :func:`time_streams`. Unlike :func:`simulate`, whose
    stages run free, this keeps DeepSpeed's order of sends and receives."""
    from ppllm.ds_compat import BackwardInput, WeightPass, ZBH1Schedule
    from ppllm.ds_compat import ds_schedule as S
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: one of {', '.join(SCHEDULES)}")
    p = len(stages)
    kind = ZBH1Schedule if schedule == "zb-h1" else S.TrainSchedule
    streams = [[c for step in kind(micro_batches=m, stages=p, stage_id=s).steps() for c in step] for s in range(p)]

    def cost(s: int, c) -> float:
        k, st = type(c), stages[s]
        return {S.ForwardPass: st.f, BackwardInput: st.b, WeightPass: st.w, S.BackwardPass: st.b + st.w,
                S.LoadMicroBatch: st.load, S.OptimizerStep: st.end}.get(k, 0.0)
    return time_streams(streams, cost, comm, blocking)


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--f", type=float, default=1.0)
    ap.add_argument("--b", type=float, default=1.0)
    ap.add_argument("--w", type=float, default=1.0)
    ap.add_argument("--comm", type=float, default=0.0)
    ap.add_argument("--p", type=int, nargs="+", default=[4, 8, 16])
    a = ap.parse_args(argv)
    print("p   m    1f1b     zb-h1    zb-h1/1f1b speed-up   engine: 1f1b   zb-h1   speed-up (DeepSpeed's transfer order)")
    for p in a.p:
        for m in (p, 2 * p, 4 * p):
            one = simulate("1f1b", p, m, a.f, a.b, a.w, a.comm)
            zb = simulate("zb-h1", p, m, a.f, a.b, a.w, a.comm)
            stages = [StageCosts(a.f, a.b, a.w)] * p
            e1, ez = engine_step_time("1f1b", m, stages, a.comm), engine_step_time("zb-h1", m, stages, a.comm)
            print(f"{p:<3} {m:<4} {one.step_time:8.2f} {zb.step_time:8.2f} {one.step_time / zb.step_time:8.3f}"
                  f"              {e1:8.2f} {ez:8.2f} {e1 / ez:8.3f}")


if __name__ == "__main__":
    main()
