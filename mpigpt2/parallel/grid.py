"""Communicators of the pp × dp grid, built once and passed explicitly.

Rank r is stage r % pp of replica r // pp, so a replica's stages are neighbouring ranks (on one
node when ranks fill nodes in order). pipe: the pp ranks of one replica, ordered by stage.
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

    def stage_rank(self, stage, replica=None):
        """World rank holding (stage, replica)."""
        return (self.replica if replica is None else replica) * self.pp + stage


def make_grid(world, pp, dp, waiter=None, wte_ranks=None):
    """Split world (size pp·dp) into the pipe, data and embed communicators. wte_ranks: the
    pipe ranks holding the first and the last stage (default 0 and pp-1; with virtual stages
    Layout.stages_of tells)."""
    assert world.Get_size() == pp * dp
    rank = world.Get_rank()
    stage, replica = rank % pp, rank // pp
    waiter = waiter or Waiter()
    holds_wte = stage in (wte_ranks if wte_ranks is not None else (0, pp - 1))
    with waiter.bounded("the grid's communicator splits (Comm_split, set-up)"):
        pipe = world.Split(color=replica, key=stage)
        data = world.Split(color=stage, key=replica)
        embed = world.Split(color=0 if holds_wte else MPI.UNDEFINED, key=rank)
    return Grid(world, pipe, data, embed, pp, dp, stage, replica, waiter)
