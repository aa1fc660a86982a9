"""Where node-shared dp switches on: the trainer's agreed decision (shared.choose, over MPI, on
nodes emulated by colour) against the rule every estimate uses (Layout.shared_replicas on
the same node map): the memory check, the default layout and the planner must not count one
copy per node where the run would keep a private copy per rank.

Run under MPI with 8 ranks (make test does); each case takes the first pp·dp ranks."""

import pytest
from mpi4py import MPI

from mpigpt2.parallel.grid import make_grid
from mpigpt2.parallel.layout import Layout
from mpigpt2.parallel.shared import choose

NODE = {  # colour (emulated node) of each world rank
    "blocks of 3": lambda r: r // 3,
    "blocks of 4": lambda r: r // 4,
    "blocks of 2": lambda r: r // 2,
    "by parity": lambda r: r % 2,
}


@pytest.mark.mpi(min_size=8)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("pp,dp,node,order,shares", [
    (2, 3, "blocks of 3", "pipe", 1),  # node 0: two ranks of stage 0, one of stage 1: unequal
    (2, 4, "blocks of 4", "pipe", 2),
    (1, 8, "blocks of 2", "pipe", 2),
    (2, 4, "by parity", "pipe", 4),    # every rank of a stage on one node
    (4, 2, "blocks of 4", "pipe", 1),  # one replica of each stage per node: nothing to share
    (2, 3, "blocks of 2", "pipe", 1),
    (2, 4, "blocks of 4", "data", 4),  # a stage's replicas side by side: one node each
    (2, 3, "blocks of 2", "data", 1),  # node 1 holds one rank of each stage
])
def test_the_run_shares_exactly_where_the_estimates_count_it(pp, dp, node, order, shares):
    world = MPI.COMM_WORLD
    inside = world.Get_rank() < pp * dp
    comm = world.Split(0 if inside else MPI.UNDEFINED, world.Get_rank())
    verdict = None
    if inside:
        lay = Layout(pp, dp, (1,) * pp, 1, 32, "1f1b", rank_order=order)
        rule = lay.shared_replicas([NODE[node](r) for r in range(pp * dp)])  # the estimates'
        grid = make_grid(comm, pp, dp, order=order)
        on, why = choose(grid, 1000, 4, "auto", color=NODE[node](comm.Get_rank()))
        if rule != shares or on != (shares > 1):
            verdict = f"choose: {on} ({why}); the estimates' rule: {rule}; expected {shares}"
        elif on and not why.startswith(f"{shares} replicas of a stage per node"):
            verdict = f"choose shares by another count: {why}"
        comm.Free()
    verdicts = [v for v in world.allgather(verdict) if v]  # (agreed: no rank fails alone)
    assert not verdicts, verdicts
