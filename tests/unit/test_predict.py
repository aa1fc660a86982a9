"""The simulator with measured costs (parallel/costs.measured_pipeline) and the predicted
timeline of a traced step (observe/predict.py), on hand-computed cases."""

import pytest

from mpigpt2.observe.predict import predict_step
from mpigpt2.parallel import costs, schedule as S


def test_measured_pipeline_by_hand():
    """p 2, one unit: 0F (10) → 1F (20) → 1B (30) → 0B (15): the step is 75, and the two
    ranks are busy 25 + 50 of 2 × 75."""
    progs = S.build("1f1b", 2, 1, 1)
    sec = {S.F(0, 0, 0): 10, S.F(1, 0, 0): 20, S.B(1, 0, 0): 30, S.B(0, 0, 0): 15}
    timeline, end, bubble = costs.measured_pipeline(progs, sec)
    assert [[(t, str(a)) for t, a in tl] for tl in timeline] == [[(0, "0F0.0"), (60, "0B0.0")],
                                                                  [(10, "1F0.0"), (30, "1B0.0")]]
    assert end == 75 and bubble == pytest.approx(0.5)


def test_w_fills_the_wait():
    """zb-h1, p 2, one unit: stage 0's W runs after its I, and the I chain (not the W) sets
    the step: 0F 1, 1F 1, 1I 1, 0I 1, then 0W 3 and 1W 3 in parallel."""
    progs = S.build("zb-h1", 2, 1, 1)
    cost = {"F": 1, "I": 1, "W": 3}
    _, end, _ = costs.measured_pipeline(progs, {a: cost[a.kind] for p in progs for a in p
                                                if a.kind in S.COMPUTE})
    assert end == 7


def test_predict_step_two_replicas():
    """Spans of pp 2 × dp 2 (world ranks 0,1 replica 0; 2,3 replica 1), µs: each replica
    simulated on its own, from its first measured start."""
    spans = {0: [("0F0.0", 100, 10), ("0B0.0", 190, 15)],
             1: [("1F0.0", 115, 20), ("1B0.0", 140, 30)],
             2: [("0F0.0", 500, 10), ("0B0.0", 560, 10)],
             3: [("1F0.0", 510, 10), ("1B0.0", 520, 10)]}
    where = {0: (0, 0), 1: (1, 0), 2: (0, 1), 3: (1, 1)}
    out, measured = predict_step(spans, where)
    assert out[0] == [("0F0.0", 100, 10), ("0B0.0", 160, 15)]
    assert out[1] == [("1F0.0", 110, 20), ("1B0.0", 130, 30)]
    assert out[3] == [("1F0.0", 510, 10), ("1B0.0", 520, 10)]
    assert measured == {0: (105, 75), 1: (70, 40)}
    assert predict_step({0: [("not an action", 0, 1)], 1: []}, {0: (0, 0), 1: (1, 0)}) is None
