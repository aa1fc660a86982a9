"""Communicators of the pp × dp grid, built once and passed explicitly.

With the "pipe" rank order rank r is stage r % pp of replica r // pp, so a replica's stages are
neighbouring ranks (on one node when ranks fill nodes in order); with "data" it is stage r // dp
of replica r % dp, so a stage's replicas are (Layout.coords). pipe: the pp ranks of one replica, ordered by stage.
data: the dp ranks holding the same stage. embed: the ranks holding wte (first and last stages
of every replica), over which the tied embedding's gradient is summed (and, with --zero 1 and
pp > 1, its optimizer state sharded).
(docs/design.md#layout)
"""

from dataclasses import dataclass, field

from mpi4py import MPI

from mpigpt2.parallel.waiting import Waiter


@dataclass
class Grid:
    world: MPI.Comm
    pipe: MPI.Comm
    data: MPI.Comm
    embed: MPI.Comm  # MPI.COMM_NULL on ranks without wte
    pp: int
    dp: int
    stage: int
    replica: int
    waiter: Waiter = field(default_factory=Waiter)  # every wait of this rank goes through it

    @property
    def rank(self):
        return self.world.Get_rank()


def make_grid(world, pp, dp, waiter=None, wte_ranks=None, order="pipe"):
    """Split world (size pp·dp) into the pipe, data and embed communicators. wte_ranks: the
    pipe ranks holding the first and the last stage (default 0 and pp-1; with virtual stages
    Layout.stages_of tells)."""
    assert world.Get_size() == pp * dp
    rank = world.Get_rank()
    stage, replica = (rank // dp, rank % dp) if order == "data" else (rank % pp, rank // pp)
    waiter = waiter or Waiter()
    holds_wte = stage in (wte_ranks if wte_ranks is not None else (0, pp - 1))
    with waiter.bounded("the grid's communicator splits (Comm_split, set-up)"):
        pipe = world.Split(color=replica, key=stage)
        data = world.Split(color=stage, key=replica)
        # ordered as the pipe rank order would order them, whatever the rank order: the sum of
        # the tied wte's gradients then adds in one order, so both orders agree bit for bit
        embed = world.Split(color=0 if holds_wte else MPI.UNDEFINED, key=replica * pp + stage)
    return Grid(world, pipe, data, embed, pp, dp, stage, replica, waiter)
