"""The schedule simulator against closed forms and its own invariants."""
import itertools

import pytest

from ppllm.schedule_sim import simulate

pytestmark = pytest.mark.timeout(60)

COSTS = [(1.0, 1.0, 1.0), (1.0, 2.0, 1.0), (2.0, 1.0, 1.0), (1.0, 1.0, 0.5), (1.3, 1.1, 0.7), (0.5, 1.0, 0.9)]


@pytest.mark.parametrize("f,b,w", COSTS)
def test_1f1b_matches_its_closed_form(f, b, w):
    for p, m in itertools.product((1, 2, 3, 4, 8), range(1, 20)):
        assert simulate("1f1b", p, m, f, b, w).step_time == pytest.approx((m + p - 1) * (f + b + w), abs=1e-9)


@pytest.mark.parametrize("f,b,w", [(1.0, 1.0, 1.0), (1.0, 2.0, 1.0), (1.0, 1.5, 1.0)])
def test_zb_h1_matches_the_papers_closed_form(f, b, w):
    """Qi et al. (arXiv 2401.10241): ZB-H1's bubble is (p - 1)(F + B - W), a third of 1F1B's at F=B=W."""
    for p in (2, 3, 4, 8):
        for m in range(p, 4 * p + 1):
            got = simulate("zb-h1", p, m, f, b, w).step_time
            assert got == pytest.approx(m * (f + b + w) + (p - 1) * (f + b - w), abs=1e-9)


@pytest.mark.parametrize("f,b,w", COSTS)
def test_zb_h1_is_never_slower_and_keeps_1f1bs_activations(f, b, w):
    for p, m in itertools.product((2, 3, 4, 8), (1, 2, 3, 5, 8, 16, 32)):
        one, zb = simulate("1f1b", p, m, f, b, w), simulate("zb-h1", p, m, f, b, w)
        assert zb.step_time <= one.step_time + 1e-9
        assert zb.peak_in_flight == one.peak_in_flight == [min(m, p - s) for s in range(p)]
        assert one.peak_pending_w == [0] * p


def check_timeline(r, p, m, comm):
    end = {(op, s, i): stop for s, ops in enumerate(r.timeline) for op, i, _, stop in ops}
    for s, ops in enumerate(r.timeline):
        for (_, _, _, e0), (_, _, s1, _) in zip(ops, ops[1:]):
            assert s1 >= e0 - 1e-12  # one operation at a time
        for op, i, start, stop in ops:
            if op == "F" and s > 0:
                assert start >= end["F", s - 1, i] + comm - 1e-12
            if op == "B":
                assert start >= end["F", s, i] - 1e-12
                if s < p - 1:
                    assert start >= end["B", s + 1, i] + comm - 1e-12
            if op == "W":
                assert start >= end["B", s, i] - 1e-12
    ops_per_mb = 3 if r.schedule == "zb-h1" else 2
    assert sorted(end) == sorted((op, s, i) for op in "FBW"[:ops_per_mb] for s in range(p) for i in range(m))


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_every_dependency_holds_with_uneven_stages_and_transfers(schedule):
    f, b, w = [1.0, 0.9, 1.1, 2.5], [1.8, 1.7, 2.0, 3.1], [1.0, 1.0, 1.2, 1.9]  # the last: head + loss
    for m in (1, 3, 4, 9, 16):
        r = simulate(schedule, 4, m, f, b, w, comm=0.3)
        check_timeline(r, 4, m, 0.3)
        assert r.step_time >= max(m * (fi + bi + wi) for fi, bi, wi in zip(f, b, w))
        assert 0 <= r.bubble < 1


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="schedule 'gpipe'"):
        simulate("gpipe", 2, 4, 1, 1, 1)
    with pytest.raises(ValueError, match="f: 2 non-negative costs"):
        simulate("1f1b", 2, 4, [1.0], 1, 1)
    with pytest.raises(ValueError, match="p=0"):
        simulate("1f1b", 0, 4, 1, 1, 1)


def test_bounded_deferred_ws_keep_every_dependency_and_the_bound():
    f, b, w = [1.0, 0.9, 1.1, 2.5], [1.8, 1.7, 2.0, 3.1], [1.0, 1.0, 1.2, 1.9]
    for cap, m in itertools.product((1, 2, 4), (1, 3, 4, 9, 16)):
        r = simulate("zb-h1", 4, m, f, b, w, comm=0.3, w_cap=cap)
        check_timeline(r, 4, m, 0.3)
        assert max(r.peak_pending_w) <= cap
        assert r.peak_in_flight == [min(m, 4 - s) for s in range(4)]


def test_engine_streams_timed_with_measured_costs():
    """engine_step_time times DeepSpeed's own instruction streams (and ppllm's ZB-H1 streams) under blocking
    transfers: 1F1B's closed form with equal costs, the end of the step once after the stages meet, uneven
    stages bounded by the slowest, ZB-H1 never slower."""
    from ppllm.schedule_sim import StageCosts, engine_step_time
    for p in (2, 3, 4, 8):
        for m in (1, 2, p, 2 * p):
            eq = [StageCosts(1.0, 1.0, 1.0)] * p
            assert engine_step_time("1f1b", m, eq) == pytest.approx(3 * (m + p - 1))
            assert engine_step_time("1f1b", m, [StageCosts(1.0, 1.0, 1.0, end=0.5)] * p) == pytest.approx(
                3 * (m + p - 1) + 0.5)
            assert engine_step_time("zb-h1", m, eq) <= 3 * (m + p - 1)
            uneven = [StageCosts(1.0, 1.0, 1.0)] * (p - 1) + [StageCosts(1.5, 1.2, 0.6, load=0.1)]
            one = engine_step_time("1f1b", m, uneven)
            assert one >= m * (1.5 + 1.2 + 0.6 + 0.1) and one >= 3 * (m + p - 1)
            assert engine_step_time("1f1b", m, uneven, comm=0.01) > one
    # at p = 2 the engine's ZB-H1 runs as the free-running simulator's
    for m in (2, 4, 8):
        assert engine_step_time("zb-h1", m, [StageCosts(1.0, 1.0, 1.0)] * 2) == pytest.approx(
            simulate("zb-h1", 2, m, 1, 1, 1).step_time)
    with pytest.raises(ValueError, match="one of 1f1b, zb-h1"):
        engine_step_time("gpipe", 2, [StageCosts(1.0, 1.0, 1.0)] * 2)
