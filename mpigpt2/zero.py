"""ZeRO-1 over each data-parallel group: reduce-scatter gradients, update only the own shard
of the stage's flat parameter buffer with the own Adam moments, allgather the updated shards.
(Per tensor segment the reduce-scatter is a rooted reduce per owner piece, and the allgather a
broadcast per owner piece: a segment usually lies in one shard.)

Shard r of a stage's N parameters is [r·N//dp, (r+1)·N//dp) (sizes differ by at most one; no
divisibility needed). Communication goes per contiguous tensor segment, bucketed by layer like
the allreduce of --zero 0: a layer's reduce-scatter starts as soon as the last backward of the
step finished it, and the allgather of a layer's updated parameters may complete during the
next step's forward, which waits only for the layer it is about to use.
"""

import numpy as np
from mpi4py import MPI

from mpigpt2.optim import AdamW
from mpigpt2.params import LAYER_NAMES
from mpigpt2.waiting import wait_all


def shard_bounds(N, dp):
    return [(r * N // dp, (r + 1) * N // dp) for r in range(dp)]


def segment_split(a, b, bounds):
    """Per-rank (count, displacement within [a, b)) of segment [a, b) over the shards."""
    counts, displs = [], []
    for lo, hi in bounds:
        c = max(0, min(b, hi) - max(a, lo))
        counts.append(c)
        displs.append(max(a, lo) - a if c else 0)
    return counts, displs


class ShardedAdam:
    """The optimizer of --zero 1; also the gradient reducer the runtime calls (same interface
    as collectives.GradReducer: start_layer, start_rest, wait)."""

    def __init__(self, grid, stage, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        self.grid, self.stage = grid, stage
        self.comm = grid.data
        self.dp, self.r = grid.dp, grid.data.Get_rank()
        N = stage.layout.size
        self.bounds = shard_bounds(N, self.dp)
        self.lo, self.hi = self.bounds[self.r]
        self.gshard = np.zeros(self.hi - self.lo, dtype=stage.dtype)  # summed grads of my shard
        self.adam = AdamW(self.hi - self.lo, stage.dtype, beta1, beta2, eps, weight_decay)
        self.mpitype = MPI.DOUBLE if stage.dtype == np.float64 else MPI.FLOAT
        lay = stage.layout
        # segments: (key, a, b); key = local layer index, or the tensor name outside layers
        self.segments = {}
        for n in lay.shapes:
            off, size = lay.offsets[n], int(np.prod(lay.shapes[n]))
            if n in LAYER_NAMES:
                per = size // stage.nl
                for i in range(stage.nl):
                    self.segments.setdefault(i, []).append((n, off + i * per, off + (i + 1) * per))
            else:
                self.segments.setdefault(n, []).append((n, off, off + size))
        self.tied = "wte" in lay.shapes and grid.pp > 1  # summed over the embed group first
        self.red_reqs, self.started = [], set()
        self.gather_reqs = {}

    # -- gradients ------------------------------------------------------------------------------
    def _pieces(self, a, b):
        """(owner rank, start, end) of the parts of segment [a, b) in each rank's shard."""
        counts, displs = segment_split(a, b, self.bounds)
        return [(r, a + d, a + d + c) for r, (c, d) in enumerate(zip(counts, displs)) if c]

    def _reduce_segment(self, name, a, b):
        # one rooted reduce per owner's piece: MPICH's reduce-scatter/allgatherv are
        # pathologically slow for the very uneven counts a segment's split usually has
        # (all of it on one rank), while reduce and bcast are not
        g = self.stage.grad_flat
        for owner, x, y in self._pieces(a, b):
            mine = self.gshard[x - self.lo:y - self.lo] if owner == self.r else None
            if self.dp == 1:
                mine[...] = g[x:y]
                continue
            self.red_reqs.append(self.comm.Ireduce(g[x:y], mine, op=MPI.SUM, root=owner))

    def _start(self, key):
        if key in self.started:
            return
        self.started.add(key)
        for name, a, b in self.segments[key]:
            if name == "wte" and self.tied:
                continue
            self._reduce_segment(name, a, b)

    def start_layer(self, i):
        self._start(i)
        MPI.Request.Testall(self.red_reqs)  # progress the buckets in flight (no MPI thread)

    def start_rest(self):
        for key in self.segments:
            self._start(key)
        if self.tied:
            g = self.stage.g["wte"]
            self.red_reqs.append(self.grid.embed.Iallreduce(MPI.IN_PLACE, g, op=MPI.SUM))

    def wait(self):
        wait_all(self.red_reqs, "allreduce", lambda: f"{len(self.red_reqs)} reduce-scatters")
        self.red_reqs, self.started = [], set()
        if self.tied:  # the embed group summed the whole wte: keep my shard of it
            a, b = self.segments["wte"][0][1:]
            counts, _ = segment_split(a, b, self.bounds)
            self.gshard[max(a, self.lo) - self.lo:][:counts[self.r]] = \
                self.stage.grad_flat[max(a, self.lo):max(a, self.lo) + counts[self.r]]

    def grad_sumsq(self):
        """Sum of squares of my shard's gradient, wte counted once across the pipeline."""
        g = self.gshard
        if self.tied and self.stage.spec.last:
            a, b = self.segments["wte"][0][1:]
            g = g[max(0, min(b, self.hi) - self.lo):]  # wte is at the front of the buffer
        return float(g @ g)

    # -- update and parameter allgather -----------------------------------------------------------
    def step(self, t, lr, grad_scale=1.0, overlap=True):
        """Update my shard, then start the per-layer allgathers of the updated parameters."""
        self.adam.step(self.stage.flat[self.lo:self.hi], self.gshard, t, lr, grad_scale)
        if self.dp == 1:
            return
        flat = self.stage.flat
        for key, segs in self.segments.items():
            self.gather_reqs[key] = [self.comm.Ibcast(flat[x:y], root=owner)
                                     for _, a, b in segs for owner, x, y in self._pieces(a, b)]
        if not overlap:
            self.sync()

    def wait_param(self, key):
        """Called before a layer (index) or tensor group ('wte', 'wpe', 'lnfw') is used."""
        reqs = self.gather_reqs.pop(key, None)
        if reqs:
            wait_all(reqs, "allgather", lambda: f"parameter allgather of {key}")
        for later in self.gather_reqs.values():  # progress the gathers of later layers
            MPI.Request.Testall(later)

    def sync(self):
        for key in list(self.gather_reqs):
            self.wait_param(key)

    # -- checkpoints ------------------------------------------------------------------------------
    def full_moments(self):
        """Stage-sized Adam m and v assembled from the shards (collective over the data group)."""
        out = []
        for mine in (self.adam.m, self.adam.v):
            full = np.empty(self.stage.layout.size, dtype=self.stage.dtype)
            counts = [hi - lo for lo, hi in self.bounds]
            displs = [lo for lo, _ in self.bounds]
            req = self.comm.Iallgatherv(mine, [full, counts, displs, self.mpitype])
            wait_all([req], "allgather", lambda: "Adam moment gather")
            out.append(full)
        return out

    def set_moments(self, m_full, v_full):
        self.adam.m[...] = m_full[self.lo:self.hi]
        self.adam.v[...] = v_full[self.lo:self.hi]

    @property
    def nbytes(self):
        return self.adam.m.nbytes + self.adam.v.nbytes
