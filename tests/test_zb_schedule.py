"""The ZB-H1 instruction stream (ppllm.ds_compat.ZBH1Schedule) each stage hands DeepSpeed's engine.

Per stage: m F, m B and m W; W(i) after B(i); every W before the step-end reductions; at most p - s
micro-batches' activations held (F done, B not yet), as 1F1B; the F/B order and every send/receive
exactly DeepSpeed's 1F1B stream (so the point-to-point pairing is unchanged), and the streams of all
stages run to the end under rendezvous (blocking) sends; the W's where ppllm.schedule_sim's ZB-H1
timeline puts them."""
import itertools

import pytest
from deepspeed.runtime.pipe import schedule as S

from ppllm.ds_compat import BackwardInput, WeightPass, ZBH1Schedule, zb_h1_timeline
from ppllm.schedule_sim import simulate, time_streams

pytestmark = pytest.mark.timeout(120)

SHAPES = [(p, m) for p in (2, 3, 4, 8) for m in (1, 2, 3, p, p + 1, 2 * p, 4 * p)]
END = (S.ReduceTiedGrads, S.ReduceGrads, S.OptimizerStep)
COMM = (S.SendActivation, S.RecvActivation, S.SendGrad, S.RecvGrad)


def stream(sched) -> list:
    return [cmd for step in sched.steps() for cmd in step]


def ops(cmds) -> list[tuple[str, int]]:
    """(F|B|W, micro-batch) in stream order (F's numbered in order: the engine runs them in order)."""
    out, f = [], 0
    for c in cmds:
        if type(c) is S.ForwardPass:
            out.append(("F", f))
            f += 1
        elif type(c) is BackwardInput:
            out.append(("B", c.kwargs["micro_batch"]))
        elif type(c) is WeightPass:
            out.append(("W", c.kwargs["micro_batch"]))
    return out


@pytest.mark.parametrize("p,m", SHAPES)
def test_counts_order_and_activations_in_flight(p, m):
    for s in range(p):
        cmds = stream(ZBH1Schedule(micro_batches=m, stages=p, stage_id=s))
        seq = ops(cmds)
        for op in "FBW":
            assert [i for o, i in seq if o == op] == list(range(m)), (p, m, s, op)
        assert not any(type(c) is S.BackwardPass for c in cmds)  # every backward is a B
        pos = {o: k for k, o in enumerate(seq)}
        for i in range(m):
            assert pos["F", i] < pos["B", i] < pos["W", i]
        last_w = max(k for k, c in enumerate(cmds) if type(c) is WeightPass)
        assert [type(c) for c in cmds[last_w + 1:]] == list(END)
        held = peak = 0
        for o, _ in seq:
            held += {"F": 1, "B": -1, "W": 0}[o]
            peak = max(peak, held)
        assert peak == min(m, p - s) == simulate("1f1b", p, m, 1, 1, 1).peak_in_flight[s]
        # the W's sit where the simulator's ZB-H1 timeline has them, F/B as in its timeline; at most p
        # deferred W's (B done, W not yet) at any time
        assert seq == [(o, i) for o, i, _, _ in simulate("zb-h1", p, m, 1, 1, 1, w_cap=p).timeline[s]]
        pending = peak_w = 0
        for o, _ in seq:
            pending += {"F": 0, "B": 1, "W": -1}[o]
            peak_w = max(peak_w, pending)
        assert peak_w == zb_h1_timeline(p, m).peak_pending_w[s] <= min(p, m)


@pytest.mark.parametrize("p,m", SHAPES)
def test_transfers_and_fb_order_are_deepspeeds_1f1b(p, m):
    for s in range(p):
        zb = stream(ZBH1Schedule(micro_batches=m, stages=p, stage_id=s))
        ref = stream(S.TrainSchedule(micro_batches=m, stages=p, stage_id=s))
        keep = COMM + (S.LoadMicroBatch, S.ForwardPass, S.BackwardPass) + END
        assert [(c.name if type(c) is not BackwardInput else "BackwardPass", c.kwargs.get("buffer_id"))
                for c in zb if isinstance(c, keep)] == [(c.name, c.kwargs.get("buffer_id")) for c in ref]
        assert ZBH1Schedule(micro_batches=m, stages=p, stage_id=s).num_pipe_buffers() == \
            S.TrainSchedule(micro_batches=m, stages=p, stage_id=s).num_pipe_buffers()


def run_with_rendezvous(streams) -> list[list]:
    """Execute every stage's stream with blocking sends (a send completes only together with its
    receive); returns the order the operations completed in, or fails on a deadlock."""
    done: list[list] = [[] for _ in streams]
    time_streams(streams, lambda s, c: 0.0, blocking=True, done=done)
    return done


@pytest.mark.parametrize("p,m", SHAPES)
def test_all_stages_run_to_the_end_with_blocking_transfers(p, m):
    streams = [stream(ZBH1Schedule(micro_batches=m, stages=p, stage_id=s)) for s in range(p)]
    done = run_with_rendezvous(streams)
    for s in range(p):
        # the k-th activation a stage receives is micro-batch k's, before its F; gradients likewise before B
        recv_a = [k for k, c in enumerate(done[s]) if type(c) is S.RecvActivation]
        recv_g = [k for k, c in enumerate(done[s]) if type(c) is S.RecvGrad]
        f_at = [k for k, c in enumerate(done[s]) if type(c) is S.ForwardPass]
        b_at = [k for k, c in enumerate(done[s]) if type(c) is BackwardInput]
        if s > 0:
            assert len(recv_a) == m and all(r < f for r, f in zip(recv_a, f_at))
        if s < p - 1:
            assert len(recv_g) == m and all(r < b for r, b in zip(recv_g, b_at))


def test_bounding_deferred_ws_keeps_the_step_time_with_equal_costs():
    for p, m in itertools.product((2, 3, 4, 8), range(1, 33)):
        bounded = zb_h1_timeline(p, m)
        assert bounded.step_time == pytest.approx(simulate("zb-h1", p, m, 1, 1, 1).step_time)
        assert bounded.step_time < simulate("1f1b", p, m, 1, 1, 1).step_time
        assert max(bounded.peak_pending_w) <= p


def test_metrics_bubble_reports_the_schedule_in_use():
    from ppllm.metrics import bubble_fraction
    from ppllm.schedule_sim import StageCosts, engine_step_time
    assert bubble_fraction(2, 4) == bubble_fraction(2, 4, "1f1b") == 1 / 5
    for p, m in ((2, 4), (2, 8)):  # at p = 2 the engine's ZB-H1 is the paper's
        zb = bubble_fraction(p, m, "zb-h1")
        assert zb == pytest.approx(simulate("zb-h1", p, m, 1, 1, 1).bubble)
        # the closed form: (p - 1)(F + B - W) idle per stage in a step of m(F + B + W) + (p - 1)(F + B - W)
        assert zb == pytest.approx((p - 1) / (3 * m + (p - 1)))
    for p, m in ((4, 4), (8, 16)):  # deeper, the engine's streams (DeepSpeed's transfer order) idle more
        zb = bubble_fraction(p, m, "zb-h1")
        step = engine_step_time("zb-h1", m, [StageCosts(1.0, 1.0, 1.0)] * p)
        assert zb == pytest.approx(1 - 3 * m / step)
        assert simulate("zb-h1", p, m, 1, 1, 1).bubble < zb < bubble_fraction(p, m, "1f1b")


def timed(streams, cost, buffered: bool, comm: float = 0.05) -> float:
    return time_streams(streams, cost, comm, blocking=not buffered)


@pytest.mark.parametrize("f,b,w", [(1.0, 1.0, 1.0), (1.0, 1.0, 0.6), (1.0, 0.8, 0.5)])
@pytest.mark.parametrize("buffered", [False, True], ids=["blocking", "buffered"])
def test_zb_h1_streams_are_never_slower_than_1f1b(f, b, w, buffered):
    def cost(s, c):
        return {S.ForwardPass: f, S.BackwardPass: b + w, BackwardInput: b, WeightPass: w}.get(type(c), 0.0)
    for p in (2, 3, 4):
        for m in (1, 2, p, 2 * p, 4 * p):
            one = timed([stream(S.TrainSchedule(m, p, s)) for s in range(p)], cost, buffered)
            zb = timed([stream(ZBH1Schedule(m, p, s)) for s in range(p)], cost, buffered)
            assert zb <= one + 1e-9, (p, m, zb, one)
            if m >= 2:
                assert zb < one - 1e-9, (p, m, zb, one)  # and it gains something
