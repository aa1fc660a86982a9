"""Collectives of a training step: bucketed gradient reduction, tied-embedding sum, loss, norms.

All nonblocking and completed by polling (a waiting.Waiter), never by a spinning MPI wait.
Gradients are summed, not averaged: every replica's loss gradient is already scaled by
1/(B·T) of the global batch, so the sum over replicas is the average of their mean-loss
gradients — the gradient of the global mean loss.
(docs/design.md#gradient-reduction-and-zero-1)
"""

import time

import numpy as np
from mpi4py import MPI

from mpigpt2.model.params import LAYER_NAMES
from mpigpt2.parallel.waiting import Waiter


class GradReducer:
    """Sums a stage's gradients over its data-parallel group, one bucket per layer.

    A layer's bucket (its 12 tensors) starts as soon as the last backward of the step has
    finished that layer; wte is summed over the embed group (first and last stages of every
    replica: the tied embedding), wpe and lnf over the data group, after the backward.
    """

    def __init__(self, grid, stage, hierarchical=False, node_id=None):
        self.grid, self.stage, self.g = grid, stage, stage.g
        self.reqs = []
        self.nl = stage.nl
        self.started = set()
        self.data_active = grid.dp > 1
        self.embed_active = grid.embed != MPI.COMM_NULL and grid.embed.Get_size() > 1
        self.hier = []  # (comm, its NodeHierarchy) when reducing hierarchically
        if hierarchical:
            for comm, on in ((grid.data, self.data_active), (grid.embed, self.embed_active)):
                if on:
                    self.hier.append((comm, NodeHierarchy(comm, grid.waiter, node_id)))
        self.pending = []  # (NodeHierarchy, array) whose in-node reduce has started

    def _start(self, comm, arrays):
        h = next((h for c, h in self.hier if c is comm), None)
        for a in arrays:
            if h is None:
                self.reqs.append(comm.Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM))
            else:
                self.reqs.append(h.start(a))
                self.pending.append((h, a))

    def start_layer(self, i):
        """Layer i (local index) has its final gradient: start its bucket."""
        if self.data_active and i not in self.started:
            self.started.add(i)
            self._start(self.grid.data, [self.g[n][i] for n in LAYER_NAMES])
            # MPI progresses nonblocking collectives only inside MPI calls: poke the
            # buckets in flight so they advance while the next layers compute
            self.grid.waiter.checked(MPI.Request.Testall, self.reqs, "allreduce",
                                     lambda: f"{len(self.reqs)} gradient allreduces")

    def start_rest(self):
        """The embeddings and final LayerNorm are final once the whole backward ran; layers
        not started yet (--no-overlap) start now."""
        self.stage.finish_grads()
        for i in reversed(range(self.nl)):
            self.start_layer(i)
        if self.data_active:
            self._start(self.grid.data, [self.g[n] for n in ("wpe", "lnfw", "lnfb")
                                         if n in self.g])
        if self.embed_active:
            self._start(self.grid.embed, [self.g["wte"]])

    def wait(self):
        self.grid.waiter.wait(self.reqs, "allreduce", lambda: f"{len(self.reqs)} gradient allreduces")
        if self.pending:
            finish_hierarchical(self.pending, self.grid.waiter)
        self.reqs, self.started, self.pending = [], set(), []


def split_by_node(comm, color=None):
    """The ranks of comm sharing this rank's node (MPI's COMM_TYPE_SHARED), or its colour
    (the parity matrix emulates nodes on one machine so), ordered by their rank in comm."""
    rank = comm.Get_rank()
    return (comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank) if color is None
            else comm.Split(color, rank))


class NodeHierarchy:
    """A communicator's ranks grouped by node (docs/design.md#hierarchical-reduction): `node`
    holds the ranks sharing this rank's node, `leaders` the lowest of each node's (COMM_NULL
    elsewhere). color: group by this number instead of by shared memory (the parity matrix
    emulates nodes on one machine so)."""

    def __init__(self, comm, waiter, color=None):
        with waiter.bounded("the node groups of a reduction (Comm_split, set-up)"):
            rank = comm.Get_rank()
            self.node = split_by_node(comm, color)
            lead = self.node.Get_rank() == 0
            self.leaders = comm.Split(0 if lead else MPI.UNDEFINED, rank)
            sizes = comm.allgather(self.node.Get_size())
            self.nodes = sum(comm.allgather(lead))
        self.useful = self.nodes > 1 and max(sizes) > 1  # both levels do something

    def start(self, a):
        """Phase 1: reduce a onto the node's leader (in place there)."""
        if self.node.Get_rank() == 0:
            return self.node.Ireduce(MPI.IN_PLACE, a, op=MPI.SUM, root=0)
        return self.node.Ireduce(a, None, op=MPI.SUM, root=0)


def finish_hierarchical(pending, waiter):
    """Phases 2 and 3 of every started hierarchical reduction: allreduce between the node
    leaders, then broadcast inside each node (so every replica holds the same bits)."""
    reqs = [h.leaders.Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM) for h, a in pending
            if h.leaders != MPI.COMM_NULL and h.leaders.Get_size() > 1]
    waiter.wait(reqs, "allreduce", lambda: f"{len(reqs)} gradient allreduces between nodes")
    reqs = [h.node.Ibcast(a, root=0) for h, a in pending if h.node.Get_size() > 1]
    waiter.wait(reqs, "allreduce", lambda: f"{len(reqs)} in-node gradient broadcasts")


PROBE_FLOATS = 4 << 20  # the timed reductions' size, at most (16 MiB of float32)


def choose_reduction(grid, nparams, mode, reps=3):
    """(mode, {"mpi": s, "hier": s}) for --grad-reduce `mode`: auto times MPI's allreduce and
    the hierarchical reduction of min(nparams, PROBE_FLOATS) floats over the data group (best
    of reps, the slowest rank's) where some group spans nodes with several ranks on one, and
    every rank takes the faster; otherwise MPI's, untimed."""
    if mode != "auto":
        return mode, {}
    if grid.dp < 2:
        return "mpi", {}
    h = NodeHierarchy(grid.data, grid.waiter)
    if not allreduce_sum(grid.world, [float(h.useful)], grid.waiter)[0]:
        return "mpi", {}
    buf = np.ones(min(nparams, PROBE_FLOATS), dtype=np.float32)
    times = []
    for name in ("mpi", "hier"):
        best = float("inf")
        for _ in range(reps):
            barrier(grid.world, grid.waiter)
            t0 = time.perf_counter()
            if name == "mpi":
                grid.waiter.wait([grid.data.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)],
                                 "allreduce")
            else:
                grid.waiter.wait([h.start(buf)], "allreduce")
                finish_hierarchical([(h, buf)], grid.waiter)
            best = min(best, time.perf_counter() - t0)
        times.append(best)
    slowest = np.array(times)
    grid.waiter.wait([grid.world.Iallreduce(MPI.IN_PLACE, slowest, op=MPI.MAX)], "reduce")
    got = {"mpi": float(slowest[0]), "hier": float(slowest[1])}
    return ("hier" if got["hier"] < got["mpi"] else "mpi"), got


def sum_to_root(comm, values, waiter=None):
    """Sum a small float64 vector over comm onto rank 0 (polled); returns it on rank 0."""
    send = np.asarray(values, dtype=np.float64)
    recv = np.zeros_like(send)
    req = comm.Ireduce(send, recv, op=MPI.SUM, root=0)
    (waiter or Waiter()).wait([req], "reduce", lambda: "loss reduction")
    return recv


def allreduce_sum(comm, values, waiter=None, kind="reduce"):
    """Sum a small float64 vector over comm on every rank (polled)."""
    buf = np.array(values, dtype=np.float64)
    req = comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    (waiter or Waiter()).wait([req], kind, lambda: f"allreduce of {buf.size} values")
    return buf


def barrier(comm, waiter=None, kind="barrier", what="barrier"):
    """A polled barrier (its wait counted as `kind`, described as `what` if it stalls)."""
    (waiter or Waiter()).wait([comm.Ibarrier()], kind, lambda: what)


def gather_model(grid, stage, layout, grads=False, flat=None):
    """Collect replica 0's stage parameters (or gradients, or any flat array laid out like the
    parameters, e.g. Adam moments) on its pipe-rank-0 rank as global tensors; None elsewhere.
    Each rank's layers go to their global index (with virtual stages a rank's layers are
    not contiguous); wte and wpe come from the first stage's rank, lnf from the last's."""
    from mpigpt2.model.params import ParamLayout, PARAM_NAMES  # noqa: local to keep the top light
    if grid.replica != 0:
        return None
    cfg = stage.cfg
    specs = [layout.rank_spec(r) for r in range(grid.pp)]
    sizes = [ParamLayout(cfg, sp).size for sp in specs]
    recv = None
    if grid.stage == 0:
        recv = np.empty(sum(sizes), dtype=stage.dtype)
        mpitype = MPI.DOUBLE if stage.dtype == np.float64 else MPI.FLOAT
        recvspec = [recv, sizes, np.cumsum([0] + sizes[:-1]).tolist(), mpitype]
    src = flat if flat is not None else stage.grad_flat if grads else stage.flat
    req = grid.pipe.Igatherv(src, recvspec if grid.stage == 0 else None, root=0)
    grid.waiter.wait([req], "gather", lambda: "model gather")
    if grid.stage != 0:
        return None
    parts, off = [], 0
    for sp, size in zip(specs, sizes):
        parts.append(ParamLayout(cfg, sp).views(recv[off:off + size]))
        off += size
    first, last = layout.wte_ranks
    order = np.argsort([i for sp in specs for i in sp.layers])  # local rows -> global order
    out = {}
    for n in PARAM_NAMES:
        if n in LAYER_NAMES:
            out[n] = np.concatenate([p[n] for p in parts], axis=0)[order]
        elif n in ("wte", "wpe"):
            out[n] = parts[first][n]
        else:
            out[n] = parts[last][n]
    return out


def gather_rows(comm, phases, phase_seconds, loss_sum, stage, waiter, extra=()):
    """Polled gather of every rank's phase times (named by phases), loss sum and `extra`
    numbers (the same count on every rank) to rank 0.

    Returns (per-rank dicts, total loss sum) on rank 0 and (None, None) elsewhere; each dict
    has the phases, rank, stage and "extra" (an array). A blocking gather would busy-spin on
    ranks that finished their step early.
    """
    row = np.array(list(phase_seconds) + [loss_sum, stage] + list(extra), dtype=np.float64)
    out = np.empty((comm.Get_size(), row.size)) if comm.Get_rank() == 0 else None
    waiter.wait([comm.Igather(row, out, root=0)], "reduce", lambda: "per-step metrics gather")
    if out is None:
        return None, None
    n = len(phases)
    per_rank = [dict(zip(phases, r[:n]), rank=i, stage=int(r[n + 1]), extra=r[n + 2:])
                for i, r in enumerate(out)]
    return per_rank, float(out[:, n].sum())
